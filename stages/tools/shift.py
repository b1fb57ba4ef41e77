"""Per-class image statistics of the augment cache, split by split: a look for shortcuts and shift.

Inputs: a classification augment cache (default ``data/augment/classification``: meta.json and
``<split>/images.npy`` + ``index.csv`` for train, val and test). Outputs: a Markdown table on
stdout, and with ``--out FILE`` the same table written atomically. Per split and class: the
image count, the mean grey level and its spread within an image, the 1st and 99th percentile
grey levels, the sharpness (mean absolute difference between horizontally adjacent pixels,
in grey levels) and the anisotropy (log of that horizontal difference over the vertical one: a
film squeezed sideways to fit a square has steeper horizontal edges), each the mean over the
class's images. Reads the images in chunks (the cache is memory-mapped), so memory stays flat.
No TensorFlow, no torch.
Run: ``python -m stages.shift [--cache DIR] [--out FILE]``.

Why: a statistic that separates the classes in train is a feature a network can use instead of
the disease; if it moves in the test split, so do the errors. On Kermany's train, normal films are
sharper than pneumonia films (7.4 against 5.9 at 150 px): the model called the official test's
blurrier normal films pneumonia until training added random blur (reports/generalization.md, 2e).
Kermany's 224 px copy squeezed every film to a square, and its pneumonia films were wider
originals: anisotropy 0.43 against 0.25 for normal films at 150 px, and the official test's normal
films sit at 0.36, between the two (2h).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stages.common import paths
from stages.common.cache import IMAGES_FILE, open_split, split_path
from stages.common.utils import ArgumentParser, StageError, run_cli, write_text_atomic

SPLITS = ("train", "val", "test")
COLUMNS = (
    "images",
    "mean grey",
    "sd within image",
    "1st percentile",
    "99th percentile",
    "sharpness",
    "anisotropy",
)
_CHUNK = 256


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


def class_stats(cache_dir: Path) -> list[tuple[str, str, int, np.ndarray]]:
    """(split, class, count, the six means) for every split present and every class in it."""
    if not Path(cache_dir).is_dir():
        raise StageError(f"{cache_dir} not found: run dvc repro augment, or give --cache")
    rows = []
    for split in SPLITS:
        if not (split_path(cache_dir, split) / IMAGES_FILE).is_file():
            continue
        part = open_split(cache_dir, split)
        if len(part) == 0:
            continue
        labels = part.index["label"].astype(str).to_numpy()
        stats = image_stats(part.images)
        for label in sorted(set(labels)):
            mask = labels == label
            rows.append((split, label, int(mask.sum()), stats[mask].mean(axis=0)))
    if not rows:
        raise StageError(f"{cache_dir} has no images in {', '.join(SPLITS)}: run dvc repro augment")
    return rows


def to_markdown(rows: list[tuple[str, str, int, np.ndarray]], cache_dir: Path) -> str:
    lines = [
        f"Per-class image statistics of `{cache_dir}` (grey levels 0-255, means over images)",
        "",
        "| split | class | " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for split, label, n, m in rows:
        lines.append(f"| {split} | {label} | {n} | " + " | ".join(f"{v:.2f}" for v in m) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = ArgumentParser(
        prog="python -m stages.shift",
        description="Per-class image statistics of the augment cache, split by split.",
    )
    ap.add_argument("--cache", type=Path, default=paths.CLASSIFICATION.augment)
    ap.add_argument("--out", type=Path, help="also write the table here (Markdown)")
    args = ap.parse_args(argv)
    text = to_markdown(class_stats(args.cache), args.cache)
    if args.out:
        write_text_atomic(args.out, text)
    print(text, end="")
    return text


if __name__ == "__main__":
    run_cli(main)
