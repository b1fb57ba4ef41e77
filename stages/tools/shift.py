"""Per-class image statistics of the augment cache, split by split: a look for shortcuts and shift.

Inputs: a classification augment cache (default ``data/augment/classification``: meta.json and
``<split>/images.npy`` + ``index.csv`` for train, val and test) and, when present, the lung
segmenter (default ``models/segmenter.pt``; ``--segmenter none`` skips it). Outputs: Markdown on
stdout, with ``--out FILE`` the same text written atomically, and with ``--plot FILE`` a PNG of
each statistic's distribution per class and split (the AUC in each panel's title):
- per split and class, the mean over the class's images of: the mean grey level and its spread
  within an image, the 1st and 99th percentile grey levels, the sharpness (mean absolute
  difference between horizontally adjacent pixels, in grey levels), the anisotropy (log of that
  horizontal difference over the vertical one: a film squeezed sideways to fit a square has
  steeper horizontal edges) and, with the segmenter, the framing: the lungs' box height and width
  as shares of the image's, and the lungs' share of its pixels (images without lungs left out);
- for a two-class cache, how well each statistic alone separates the classes in each split: its
  ROC-AUC as a score for the second class (0.5: not at all; 0 or 1: completely).
Reads the images in chunks (the cache is memory-mapped), so memory stays flat. No TensorFlow;
torch only with the segmenter.
Run: ``python -m stages.shift [--cache DIR] [--segmenter FILE | none] [--out FILE] [--plot FILE]``.

Why: a statistic that separates the classes in train is a feature a network can use instead of
the disease; if it stops separating them in the test split, the errors follow. On Kermany's
train, normal films are sharper than pneumonia films: the model called the official test's
blurrier normal films pneumonia until training added random blur (reports/generalization.md, 2e).
Kermany's 224 px copy squeezed every film to a square, and its pneumonia films were wider
originals (2h). And its pneumonia films are framed tighter: the lungs fill more of the film's
height, while the official test's normal films are framed like train's pneumonia films (5c).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from stages.classifier.metrics import roc_auc
from stages.common import paths
from stages.common.cache import IMAGES_FILE, open_split, split_path
from stages.common.utils import (
    ArgumentParser,
    StageError,
    run_cli,
    write_png_atomic,
    write_text_atomic,
)

SPLITS = ("train", "val", "test")
IMAGE_COLUMNS = (
    "mean grey",
    "sd within image",
    "1st percentile",
    "99th percentile",
    "sharpness",
    "anisotropy",
)
LUNG_COLUMNS = ("lung height", "lung width", "lung area")
_CHUNK = 256

Split = tuple[str, np.ndarray, np.ndarray]  # split, labels, per-image statistics (N, columns)
Row = tuple[str, str, int, np.ndarray]  # split, class, images, the statistics' class means


class Segmenter(Protocol):
    """What ``lung_stats`` needs of ``stages.segmenter.predict.LungSegmenter``."""

    def segment(self, films: list[np.ndarray], margin: float = ...) -> list: ...


def image_stats(images: np.ndarray) -> np.ndarray:
    """(N, 6) per image: mean, sd, 1st and 99th percentile grey level, sharpness, anisotropy."""
    out = np.empty((len(images), 6), np.float64)
    for start in range(0, len(images), _CHUNK):
        x = np.asarray(images[start : start + _CHUNK], np.float32)
        flat = x.reshape(len(x), -1)
        out[start : start + len(x), 0] = flat.mean(axis=1)
        out[start : start + len(x), 1] = flat.std(axis=1)
        out[start : start + len(x), 2:4] = np.percentile(flat, [1, 99], axis=1).T
        dx = np.abs(np.diff(x, axis=2)).mean(axis=(1, 2))
        dy = np.abs(np.diff(x, axis=1)).mean(axis=(1, 2))
        out[start : start + len(x), 4] = dx
        # A flat image has no edges either way: anisotropy 0, not a division by zero.
        out[start : start + len(x), 5] = np.log((dx + 1e-6) / (dy + 1e-6))
    return out


def lung_stats(images: np.ndarray, segmenter: Segmenter, desc: str = "lungs") -> np.ndarray:
    """(N, 3) per image: the lungs' box height and width over the image's, and the lungs' share
    of its pixels; NaN where the segmenter found no lungs (a whole-image box would read as
    framing)."""
    out = np.full((len(images), 3), np.nan)
    with tqdm(total=len(images), desc=desc, mininterval=2.0) as bar:
        for start in range(0, len(images), _CHUNK):
            films = list(np.asarray(images[start : start + _CHUNK], np.uint8))
            for i, lungs in enumerate(segmenter.segment(films, margin=0.0)):
                if lungs.found:
                    x0, y0, x1, y1 = lungs.box
                    h, w = lungs.mask.shape
                    out[start + i] = ((y1 - y0) / h, (x1 - x0) / w, float(lungs.mask.mean()))
            bar.update(len(films))
    return out


def _require(cache_dir: Path) -> None:
    if not Path(cache_dir).is_dir():
        raise StageError(f"{cache_dir} not found: run dvc repro augment, or give --cache")


def split_stats(cache_dir: Path, segmenter: Segmenter | None = None) -> list[Split]:
    """(split, labels, per-image statistics) of every split present; the lungs' three columns
    after the image's six when a segmenter is given."""
    _require(cache_dir)
    out = []
    for split in SPLITS:
        if not (split_path(cache_dir, split) / IMAGES_FILE).is_file():
            continue
        part = open_split(cache_dir, split)
        if len(part) == 0:
            continue
        stats = image_stats(part.images)
        if segmenter is not None:
            stats = np.hstack([stats, lung_stats(part.images, segmenter, f"lungs ({split})")])
        out.append((split, part.index["label"].astype(str).to_numpy(), stats))
    if not out:
        raise StageError(f"{cache_dir} has no images in {', '.join(SPLITS)}: run dvc repro augment")
    return out


def class_means(per_split: list[Split]) -> list[Row]:
    """(split, class, count, the statistics' means over the class's images) for every split of
    ``split_stats``' result and every class in it; NaN where a column has no value."""
    rows = []
    for split, labels, stats in per_split:
        for label in sorted(set(labels)):
            part = stats[labels == label]
            seen = np.isfinite(part).any(axis=0)
            means = np.full(part.shape[1], np.nan)
            means[seen] = np.nanmean(part[:, seen], axis=0)
            rows.append((split, label, len(part), means))
    return rows


def separation(per_split: list[Split]) -> list[tuple[str, np.ndarray]]:
    """(split, ROC-AUC of each statistic as a score for the second class) for a two-class cache;
    NaN where a split lacks a class or the statistic's values; [] for any other class count."""
    classes = sorted({c for _, labels, _ in per_split for c in set(labels)})
    if len(classes) != 2:
        return []
    out = []
    for split, labels, stats in per_split:
        y = (labels == classes[1]).astype(int)
        aucs = np.full(stats.shape[1], np.nan)
        for j, column in enumerate(stats.T):
            ok = np.isfinite(column)
            if 0 < y[ok].sum() < ok.sum():
                aucs[j] = roc_auc(y[ok], column[ok])
        out.append((split, aucs))
    return out


def _cell(v: float) -> str:
    return "-" if not np.isfinite(v) else f"{v:.2f}"


def to_markdown(
    rows: list[Row], cache_dir: Path, seps: list[tuple[str, np.ndarray]] | None = None
) -> str:
    columns = (IMAGE_COLUMNS + LUNG_COLUMNS)[: len(rows[0][3])]
    lines = [
        f"Per-class image statistics of `{cache_dir}` (grey levels 0-255, means over images)",
        "",
        "| split | class | images | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for split, label, n, m in rows:
        lines.append(f"| {split} | {label} | {n} | " + " | ".join(_cell(v) for v in m) + " |")
    if seps:
        first, second = sorted({r[1] for r in rows})
        lines += [
            "",
            f"How well each statistic alone separates {second} from {first}: its ROC-AUC as a "
            f"score for {second} (0.50: not at all; far from 0.50 in train and near it in test: "
            "a shortcut the test does not share)",
            "",
            "| split | " + " | ".join(columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for split, aucs in seps:
            lines.append(f"| {split} | " + " | ".join(_cell(v) for v in aucs) + " |")
    return "\n".join(lines) + "\n"


def plot(per_split: list[Split], seps: list[tuple[str, np.ndarray]], path: Path) -> None:
    """The distributions behind the tables: one row per statistic, one column per split, each
    class's histogram (bins shared along a row), the statistic's ROC-AUC (``separation``'s
    result, ``seps``) in the title."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    n_stats = per_split[0][2].shape[1]
    columns = (IMAGE_COLUMNS + LUNG_COLUMNS)[:n_stats]
    classes = sorted({c for _, labels, _ in per_split for c in set(labels)})
    aucs = dict(seps)
    fig, axes = plt.subplots(
        n_stats, len(per_split), figsize=(3.0 * len(per_split), 1.7 * n_stats), squeeze=False
    )
    for j, name in enumerate(columns):
        values = np.concatenate([stats[:, j] for _, _, stats in per_split])
        values = values[np.isfinite(values)]
        lo, hi = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 1.0)
        bins = np.linspace(lo, max(hi, lo + 1e-6), 31)
        for k, (split, labels, stats) in enumerate(per_split):
            ax = axes[j, k]
            for c, label in enumerate(classes):
                v = stats[labels == label, j]
                v = v[np.isfinite(v)]
                if v.size:
                    ax.hist(np.clip(v, bins[0], bins[-1]), bins=bins, density=True,
                            histtype="step", color=f"C{c}", label=label)  # fmt: skip
            auc = aucs[split][j] if split in aucs else np.nan
            ax.set_title(f"{split}: {name}" + (f", AUC {auc:.2f}" if np.isfinite(auc) else ""),
                         fontsize=8)  # fmt: skip
            ax.tick_params(labelsize=7)
            ax.set_yticks([])
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    write_png_atomic(fig, path, dpi=80)


def _segmenter(arg: str | None) -> Segmenter | None:
    """The segmenter to measure framing with: ``none`` skips it; the default file only if it
    exists; a file named on the command line must exist."""
    if arg == "none":
        return None
    path = Path(arg) if arg else paths.SEGMENTER_MODEL
    if not path.is_file():
        if arg:
            raise StageError(f"{path} not found: give a segmenter file, or --segmenter none")
        return None
    from stages.segmenter.predict import load  # torch and MONAI: only with a segmenter

    return load(path)


def main(argv: list[str] | None = None) -> str:
    ap = ArgumentParser(
        prog="python -m stages.shift",
        description="Per-class image statistics of the augment cache, split by split, and how "
        "well each separates the classes.",
    )
    ap.add_argument("--cache", type=Path, default=paths.CLASSIFICATION.augment)
    ap.add_argument(
        "--segmenter",
        help=f"lung segmenter for the framing columns (default {paths.SEGMENTER_MODEL} when it "
        "exists; none: skip them)",
    )
    ap.add_argument("--out", type=Path, help="also write the tables here (Markdown)")
    ap.add_argument("--plot", type=Path, help="also draw each statistic's distributions (PNG)")
    args = ap.parse_args(argv)
    _require(args.cache)  # before a segmenter is loaded for nothing
    per_split = split_stats(args.cache, _segmenter(args.segmenter))
    seps = separation(per_split)
    text = to_markdown(class_means(per_split), args.cache, seps)
    if args.plot:
        plot(per_split, seps, args.plot)
    if args.out:
        write_text_atomic(args.out, text)
    print(text, end="")
    return text


if __name__ == "__main__":
    run_cli(main)
