"""Augment stage: resize every split once into the uint8 cache and preview the augmentation policy.

Inputs:  data/split/<task>/{train,val,test}.csv (+ detection {split}.json, COCO in original pixels),
         the image files at each row's ``path`` (segmentation: and its ``mask_path``); params
         section ``augment.<task>``; classification with ``lungs`` crop | mask or
         ``lungs_framings``: data/lungs/classification/ (``stages.lungs``: each film's lung mask
         and box).
Outputs: data/augment/<task>/ (``stages.common.cache``: meta.json, policy.json,
         <split>/images.npy, index.csv, detection <split>/annotations.json in cache pixels,
         segmentation <split>/masks.npy: 0/1, resized like the image then thresholded;
         classification with lungs: the films cropped to / masked by their lungs before
         resizing, and <split>/masks.npy their lung masks in the cache's frame; with
         ``lungs_framings``, train/ also holds every film once more per margin, cropped to its
         lungs' box, its ``framing`` column the margin, empty on the films as they are) and
         reports/augment/<task>_preview.png.
         index.csv ``label_index``: classification and segmentation = index into meta classes;
         detection = 1 if the image has boxes else 0.
Run:     python -m stages.augment --task classification|detection|segmentation

The task's policy schema and preview drawing live in its package (``stages.classifier`` /
``stages.detector`` / ``stages.segmenter``) and are loaded for the task being run only, so the
chains share no code dependency in dvc.yaml (``task_module``).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from stages.common import cache, paths
from stages.common.config import load_section, to_dict
from stages.common.imageio import ImageRejected, load_gray
from stages.common.paths import SPLITS
from stages.common.utils import (
    StageError,
    atomic_parts,
    read_json,
    run_cli,
    task_arg_parser,
    task_module,
    write_png_atomic,
)

log = logging.getLogger("stages.augment")
PREVIEW_COPIES = 3
PREVIEW_DPI = 80
PREVIEW_TITLE_SIZE = 8  # points
# Saturated colours that stay visible on grayscale X-rays (tab10 has a gray).
BOX_COLOURS = ("red", "lime", "cyan", "yellow", "magenta", "orange", "deepskyblue", "springgreen")


# ----------------------------------------------------------------------------- inputs


def read_splits(task: str, split_dir: Path) -> dict[str, tuple[pd.DataFrame, dict | None]]:
    out: dict[str, tuple[pd.DataFrame, dict | None]] = {}
    for split in SPLITS:
        csv = split_dir / f"{split}.csv"
        if not csv.is_file():
            raise StageError(f"{csv} not found: run the split stage first (dvc repro split@{task})")
        coco = None
        if task == "detection":
            js = split_dir / f"{split}.json"
            if not js.is_file():
                raise StageError(
                    f"{js} not found: run the split stage first (dvc repro split@{task})"
                )
            coco = read_json(js)
        out[split] = (cache.read_index(csv), coco)
    if len(out["train"][0]) == 0:
        raise StageError(
            f"{split_dir / 'train.csv'} has no rows: nothing to train on; check the download "
            f"report (data/raw/{task}/report.json) and split.{task}.ratios"
        )
    return out


def _bounded_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
    """Ordered ``map`` over a thread pool with at most 4*workers results in flight (flat memory)."""
    with ThreadPoolExecutor(workers) as pool:
        pending: deque[Future] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _load_resized(
    path: str, cfg: cache.AugmentConfig, expect: tuple[int, int] | None
) -> np.ndarray:
    img = _decode(path)
    if expect is not None and img.shape != expect:
        raise StageError(
            f"{path}: file is {img.shape[1]}x{img.shape[0]} but its COCO entry says "
            f"{expect[1]}x{expect[0]}; boxes would be misplaced, re-run download"
        )
    return cache.prepare_gray(img, cfg.image_size, cfg.resize, cfg.intensity)[0]


def _load_pair(
    path: str, mask_path: str, cfg: cache.AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Segmentation: the cache image and its 0/1 mask, moved by the same resize."""
    try:
        mask = load_gray(mask_path)
        img = load_gray(path)
    except FileNotFoundError as exc:
        raise StageError(
            f"{exc.filename}: listed in the split but missing; re-run download"
        ) from None
    except ImageRejected as exc:
        raise StageError(f"{exc.name}: cannot decode ({exc}); re-run download") from None
    if mask.shape != img.shape:
        raise StageError(
            f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {path} is "
            f"{img.shape[1]}x{img.shape[0]}; re-run download"
        )
    image = cache.prepare_gray(img, cfg.image_size, cfg.resize, cfg.intensity)[0]
    return image, cache.prepare_mask(mask, cfg.image_size, cfg.resize)


# ----------------------------------------------------------------------------- cache


def cache_coco(
    coco: dict, paths: Iterable[str], cfg: cache.AugmentConfig
) -> tuple[dict, list, int]:
    """COCO for the cache: row i of the split = image id i, boxes moved into cache pixels.

    The affine needs only the image size (from the COCO entry), so this runs before decoding;
    returns (coco, expected (h, w) per row, boxes dropped because nothing was left in the image).
    """
    by_name = {img["file_name"]: img for img in coco.get("images", [])}
    src, size = cache.coco_index(coco), cfg.image_size
    images, anns, shapes, dropped = [], [], [], 0
    for row, path in enumerate(paths):
        info = by_name.get(path)
        if info is None:
            raise StageError(f"{path}: in the split csv but not in its COCO json; re-run split")
        h, w = int(info["height"]), int(info["width"])
        shapes.append((h, w))
        images.append({"id": row, "file_name": path, "width": size, "height": size})
        boxes, cats = src.boxes(info["id"])
        moved = cache.transform_boxes(boxes, cache.resize_affine(h, w, size, cfg.resize), size)
        for (x1, y1, x2, y2), cat in zip(moved.tolist(), cats.tolist(), strict=True):
            bw, bh = x2 - x1, y2 - y1
            if bw <= 0 or bh <= 0:  # only boxes lying outside the image end up empty
                dropped += 1
                continue
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": row,
                    "category_id": cat,
                    "bbox": [x1, y1, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
    out = {"images": images, "annotations": anns, "categories": coco["categories"]}
    return out, shapes, dropped


def _classes(task: str, splits: dict[str, tuple[pd.DataFrame, dict | None]]) -> list[str]:
    if task != "detection":  # what the model can learn: a label train lacks is not a class
        return sorted({str(v) for v in splits["train"][0]["label"]})
    cats = sorted(splits["train"][1]["categories"], key=lambda c: int(c["id"]))
    return [str(c["name"]) for c in cats]


def _images(
    task: str, split: str, index: pd.DataFrame, shapes: list | None, cfg: cache.AugmentConfig
):
    expects = shapes if shapes is not None else [None] * len(index)
    jobs = zip(index["path"], expects, strict=True)
    loaded = _bounded_map(lambda job: _load_resized(job[0], cfg, job[1]), jobs, cfg.workers)
    return tqdm(loaded, total=len(index), desc=f"augment {task}/{split}", mininterval=2.0)


class Lungs:
    """The lungs@<task> output (``stages.lungs``) the cache's lung-aware preprocessing reads."""

    def __init__(self, folder: Path, cfg: cache.AugmentConfig) -> None:
        info_path = Path(folder) / paths.LUNGS_INFO_NAME
        if not info_path.is_file():
            raise StageError(f"{info_path} not found: run the lungs stage first (dvc repro)")
        info = read_json(info_path)
        held = (info.get("lungs"), info.get("framings", []))
        asked = (cfg.lungs, list(cfg.lungs_framings))
        if held != asked:
            raise StageError(
                f"{folder} holds lungs {held[0]} with framings {held[1]}, the params ask for "
                f"{asked[0]} with {asked[1]}: re-run the lungs stage (dvc repro)"
            )
        boxes = pd.read_csv(Path(folder) / paths.LUNGS_BOXES_NAME, dtype={"sha256": str})
        self.folder, self.mode, self.margin = Path(folder), cfg.lungs, cfg.lungs_margin
        self.segmenter = str(info.get("segmenter", ""))
        self.boxes = {r.path: r for r in boxes.itertuples(index=False)}

    def load(
        self, path: str, cfg: cache.AugmentConfig, framing: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(cache image, cache lung mask 0/1) of one film after the lungs' preprocessing, or,
        with ``framing``, cropped to its lungs' box with that margin (a training framing)."""
        from stages.common.lungs import apply

        mode, margin = (self.mode, self.margin) if framing is None else ("crop", framing)
        row = self.boxes.get(path)
        if row is None:
            raise StageError(f"{path}: not in {self.folder}: re-run the lungs stage (dvc repro)")
        film = _decode(path)
        mask = np.asarray(Image.open(self.folder / paths.LUNGS_MASKS_NAME / f"{row.sha256}.png"))
        film, mask = apply(film, mask > 127, (row.x0, row.y0, row.x1, row.y1), mode, margin)
        image = cache.prepare_gray(film, cfg.image_size, cfg.resize, cfg.intensity)[0]
        return image, cache.prepare_mask(mask.astype(np.uint8) * 255, cfg.image_size, cfg.resize)


def _lunged(split: str, index: pd.DataFrame, cfg: cache.AugmentConfig, lungs: Lungs, masks: bool):
    """Classification with lungs: (images, lung masks), consumed in step like ``_pairs``; with
    ``masks`` false (lungs none, framings only) (images, None), as a cache without lungs. Each
    row is read with its ``framing`` (``_with_framings``) when the index has that column."""
    framings = index["framing"] if "framing" in index else [np.nan] * len(index)

    def read(job: tuple[str, float]) -> tuple[np.ndarray, np.ndarray | None]:
        path, framing = job
        if pd.isna(framing):
            if not masks:  # a film as it is, beside no lung masks: read as without lungs
                return _load_resized(path, cfg, None), None
            return lungs.load(path, cfg)
        return lungs.load(path, cfg, float(framing))

    jobs = zip(index["path"], framings, strict=True)
    loaded = _bounded_map(read, jobs, cfg.workers)
    bar = tqdm(loaded, total=len(index), desc=f"augment classification/{split}", mininterval=2.0)
    if not masks:
        return (pair[0] for pair in bar), None
    a, b = itertools.tee(bar)
    return (pair[0] for pair in a), (pair[1] for pair in b)


def _with_framings(index: pd.DataFrame, framings: tuple[float, ...]) -> pd.DataFrame:
    """The train index followed by one copy of it per training framing, each copy's
    ``framing`` column its margin (NaN, written empty, on the films as they are)."""
    copies = [index.assign(framing=np.nan)] + [index.assign(framing=m) for m in framings]
    return pd.concat(copies, ignore_index=True)


def _decode(path: str) -> np.ndarray:
    try:
        return load_gray(path)
    except FileNotFoundError:
        raise StageError(f"{path}: image listed in the split is missing; re-run download") from None
    except ImageRejected as exc:
        raise StageError(f"{path}: cannot decode ({exc}); re-run download") from None


def _pairs(split: str, index: pd.DataFrame, cfg: cache.AugmentConfig):
    """Segmentation: (images, masks), two iterators to consume in step (one decoding pass)."""
    if "mask_path" not in index:
        raise StageError(f"the {split} split has no mask_path column; re-run download and split")
    jobs = zip(index["path"], index["mask_path"], strict=True)
    loaded = _bounded_map(lambda job: _load_pair(job[0], job[1], cfg), jobs, cfg.workers)
    bar = tqdm(loaded, total=len(index), desc=f"augment segmentation/{split}", mininterval=2.0)
    a, b = itertools.tee(bar)
    return (pair[0] for pair in a), (pair[1] for pair in b)


def run(
    task: str,
    cfg: cache.AugmentConfig,
    split_dir: Path,
    out_dir: Path,
    preview: Path,
    lungs_dir: Path | None = None,
) -> dict:
    """Build the cache for ``task`` from ``split_dir`` into ``out_dir``; returns a summary. With
    ``lungs`` crop | mask (classification), each film first goes through the lungs of
    ``lungs_dir`` (``stages.lungs``), and the cache keeps the lung masks beside the images;
    with ``lungs_framings``, the train split also holds the films' extra framings."""
    t0 = time.perf_counter()
    splits = read_splits(task, Path(split_dir))
    classes = _classes(task, splits)
    lung_mode = getattr(cfg, "lungs", "none")
    lungs_dir = lungs_dir or paths.task_paths(task).lungs_preprocess
    framings = tuple(getattr(cfg, "lungs_framings", ()))
    lungs = Lungs(lungs_dir, cfg) if getattr(cfg, "needs_lungs", False) else None
    counts: dict[str, int] = {}
    dropped = 0
    with atomic_parts(out_dir, cache.PARTS) as tmp:
        for split, (index, coco) in splits.items():
            index, out_coco, shapes, masks = index.copy(), None, None, None
            if task != "detection":
                index["label_index"] = [
                    classes.index(v) if v in classes else -1 for v in index["label"].astype(str)
                ]
            else:
                out_coco, shapes, n_drop = cache_coco(coco, index["path"], cfg)
                dropped += n_drop
                has_box = {a["image_id"] for a in out_coco["annotations"]}
                index["label_index"] = [int(i in has_box) for i in range(len(index))]
            if task == "segmentation":
                images, masks = _pairs(split, index, cfg)
            elif lungs is not None:
                if split == "train" and framings:
                    index = _with_framings(index, framings)
                images, masks = _lunged(split, index, cfg, lungs, lung_mode != "none")
            else:
                images = _images(task, split, index, shapes, cfg)
            cache.write_split(tmp, split, images, index, cfg.image_size, out_coco, masks)
            counts[split] = len(index)
        meta = {"task": task, "image_size": cfg.image_size, "resize": cfg.resize}
        meta["intensity"] = cfg.intensity
        if hasattr(cfg, "lungs"):  # serving repeats it: training copies it into the model
            meta.update(lungs=cfg.lungs, lungs_margin=cfg.lungs_margin)
            meta["lungs_segmenter"] = lungs.segmenter if lungs is not None else ""
        # train/val only: meta.json is a training input, and a new test set must not retrain
        fit = {s: counts[s] for s in ("train", "val")}
        cache.write_meta(tmp, {**meta, "classes": classes, "counts": fit})
        cache.write_policy(tmp, to_dict(cfg.policy))
        if cfg.preview_count:
            write_preview(task, cfg, cache.open_split(tmp, "train"), Path(preview))
    seconds = round(time.perf_counter() - t0, 2)
    summary = {"task": task, "counts": counts, "dropped_boxes": dropped, "seconds": seconds}
    log.info("augment %s: %s", task, summary)
    return summary


# ----------------------------------------------------------------------------- preview


def _preview_rows(split: cache.CacheSplit, count: int) -> list[int]:
    """Round-robin over label_index so every class shows up; deterministic."""
    groups = [list(g.index) for _, g in split.index.reset_index(drop=True).groupby("label_index")]
    rows: list[int] = []
    while len(rows) < min(count, len(split)):
        for g in groups:
            if g and len(rows) < count:
                rows.append(g.pop(0))
    return rows


def wrap_to_width(parts: Iterable[str], sep: str, width_px: float, measure) -> list[str]:
    """Greedy lines of ``parts`` joined by ``sep``, each at most ``width_px`` wide as
    ``measure(text) -> px`` says; a part wider than a line on its own is cut where it must be."""
    lines: list[str] = []
    line = ""
    for part in parts:
        joined = f"{line}{sep}{part}" if line else part
        if not line or measure(joined) <= width_px:
            line = joined
            continue
        lines.append(line + sep.rstrip())
        line = part
    while line and measure(line) > width_px and len(line) > 1:
        cut = len(line) - 1
        while cut > 1 and measure(line[:cut]) > width_px:
            cut -= 1
        lines.append(line[:cut])
        line = line[cut:]
    return [*lines, line] if line else lines


def preview_figure(task: str, cfg: cache.AugmentConfig, split: cache.CacheSplit):
    """The preview's matplotlib figure (at PREVIEW_DPI): each row one train image (cache version)
    and PREVIEW_COPIES augmented copies, under a title naming the size and the whole policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.font_manager import FontProperties
    from matplotlib.patches import Rectangle

    rows = _preview_rows(split, cfg.preview_count)
    cells = task_module(task, "augment").preview_cells(
        cfg.policy, cfg.preview_seed, split, rows, PREVIEW_COPIES
    )
    names = {int(c["id"]): c["name"] for c in (split.coco or {}).get("categories", [])}
    fig, axes = plt.subplots(
        len(rows),
        1 + PREVIEW_COPIES,
        figsize=(2.4 * (1 + PREVIEW_COPIES), 2.5 * len(rows)),
        squeeze=False,
        layout="constrained",
        dpi=PREVIEW_DPI,
    )
    for r, (row, row_cells) in enumerate(zip(rows, cells, strict=True)):
        label = str(split.index["label"].iloc[row])
        for c, (img, boxes, cats, *mask) in enumerate(row_cells):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            if mask and np.any(mask[0]):  # segmentation: the (augmented) lung outline
                ax.contour(mask[0], levels=[0.5], colors="lime", linewidths=0.8)
            ax.set_axis_off()
            ax.set_title(f"{label} (cache)" if c == 0 else f"augmented #{c}", fontsize=8)
            for (x1, y1, x2, y2), cat in zip(boxes, cats, strict=True):
                colour = BOX_COLOURS[int(cat) % len(BOX_COLOURS)]
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.2, ec=colour))
                ax.text(
                    x1, y1 - 1, names.get(int(cat), str(cat)), color=colour, fontsize=6, va="bottom"
                )
    # The policy is wrapped to the figure's width (as the renderer measures it): on one line,
    # every key of it is wider than the figure and both ends were cut off.
    renderer = fig.canvas.get_renderer()
    font = FontProperties(size=PREVIEW_TITLE_SIZE)

    def measure(text: str) -> float:
        return renderer.get_text_width_height_descent(text, font, ismath=False)[0]

    policy = [f"{k}={v}" for k, v in to_dict(cfg.policy).items()] or ["none"]
    policy[0] = f"policy: {policy[0]}"
    head = f"augment {task}: {cfg.image_size} px, {cfg.resize}"
    lines = wrap_to_width(policy, ", ", 0.94 * fig.bbox.width, measure)
    fig.suptitle("\n".join([head, *lines]), fontsize=PREVIEW_TITLE_SIZE)
    return fig


def write_preview(task: str, cfg: cache.AugmentConfig, split: cache.CacheSplit, path: Path) -> None:
    """The preview grid (``preview_figure``) as a PNG at ``path``."""
    write_png_atomic(preview_figure(task, cfg, split), path, dpi=PREVIEW_DPI)


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> dict:
    parser = task_arg_parser("Resize the split images into the uint8 cache; preview the policy.")
    args = parser.parse_args(argv)
    schema = task_module(args.task, "config").AUGMENT_CONFIG
    cfg = load_section(schema, f"augment.{args.task}", args.params)
    p = paths.task_paths(args.task)
    return run(args.task, cfg, split_dir=p.split, out_dir=p.augment, preview=p.preview)


if __name__ == "__main__":
    run_cli(main)
