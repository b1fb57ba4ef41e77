"""The augment cache (data/augment/<task>/): resize geometry, a streaming writer and the reader API.

Layout of ``data/augment/<task>/``::

    fit/                      everything training reads (train-<model> depends on this folder
                              alone, so a new external test set does not retrain the model)
      meta.json               {"task", "image_size", "resize", "intensity", "classes", "counts"}
      policy.json             the augmentation policy (augment.<task>.policy as a dict)
      train/, val/            one split folder each (below)
    test/                     the test split folder
    (fit/ and test/ are two DVC outputs: each consumer depends on a whole output)
    <split folder>/images.npy        uint8 (N, S, S), written through np.lib.format.open_memmap
    <split folder>/index.csv         the split csv rows in the same order + label_index
    <split folder>/annotations.json  detection only: COCO, boxes in cache pixels, id = row index
    <split folder>/masks.npy         segmentation only: uint8 (N, S, S) lung masks, 0/1 by row

Writers are used by ``python -m stages.augment --task <task>`` (and by tests to build tiny caches
from arrays); readers by the training and evaluation stages. No run command of its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from stages.common.config import check
from stages.common.utils import StageError, read_json, write_json

ResizeMode = Literal["stretch", "pad"]
Intensity = Literal["none", "equalize", "standardize"]
INTENSITY_MODES: tuple[str, ...] = get_args(Intensity)
# standardize: every image's grey levels mapped to this mean and standard deviation (uint8 room
# for about +-2.6 sd either side before clipping)
STANDARD_MEAN, STANDARD_SD = 128.0, 48.0
META_FILE = "meta.json"
POLICY_FILE = "policy.json"
IMAGES_FILE = "images.npy"
MASKS_FILE = "masks.npy"
INDEX_FILE = "index.csv"
COCO_FILE = "annotations.json"
FIT_DIR = "fit"  # meta, policy, train and val: the training inputs
FIT_SPLITS = ("train", "val")
PARTS = (FIT_DIR, "test")  # the cache's two DVC outputs (stages.common.utils.atomic_parts)
# Manifest columns that must stay strings when read back ("" subtype, "007" patient ids).
_STR_COLUMNS = (
    "path",
    "label",
    "subtype",
    "patient_id",
    "source",
    "source_split",
    "sha256",
    "split",
)


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class AugmentConfig:
    """The ``augment.<task>`` keys shared by both tasks; each task package adds its ``policy``
    (``stages.classifier.config`` / ``stages.detector.config``)."""

    image_size: int  # px of the square cache images
    resize: ResizeMode  # stretch | pad (keep the aspect ratio, zero border)
    preview_count: int = 8  # rows of the preview grid (train images)
    preview_seed: int = 0  # preview draws only; training seeds its own augmenter
    workers: int = 2  # decoding threads
    # none | equalize (global histogram equalisation) | standardize (per-image mean and standard
    # deviation set to STANDARD_MEAN / STANDARD_SD), before resizing; serving repeats it: the
    # mode is stored in meta.json and the model files
    intensity: Intensity = "none"

    def __post_init__(self) -> None:
        check(16 <= self.image_size <= 2048, f"image_size not in [16, 2048]: {self.image_size}")
        check(0 <= self.preview_count <= 64, f"preview_count not in [0, 64]: {self.preview_count}")
        check(1 <= self.workers <= 32, f"workers must be in [1, 32], got {self.workers}")
        check(
            0 <= self.preview_seed < 2**32,
            f"preview_seed must be in [0, 2**32), got {self.preview_seed}",
        )


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Affine:
    """Maps original pixel coordinates to cache coordinates: x' = sx*x + tx, y' = sy*y + ty."""

    sx: float
    sy: float
    tx: float = 0.0
    ty: float = 0.0


def resize_affine(h: int, w: int, size: int, mode: ResizeMode) -> Affine:
    """The affine ``resize_gray`` applies to an (h, w) image; needs only the shape, so boxes can
    be moved before (or without) decoding the pixels."""
    if h <= 0 or w <= 0:
        raise ValueError(f"resize: empty image shape {(h, w)}")
    if mode == "stretch":
        return Affine(size / w, size / h)
    if mode != "pad":
        raise ValueError(f"resize mode must be 'stretch' or 'pad', got {mode!r}")
    scale = size / max(h, w)
    nw, nh = max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))
    # The exact per-axis scale (nw/w) keeps box edges on the resized pixel edges after rounding.
    return Affine(nw / w, nh / h, float((size - nw) // 2), float((size - nh) // 2))


def resize_gray(img: np.ndarray, size: int, mode: ResizeMode) -> tuple[np.ndarray, Affine]:
    """Resize a uint8 (H, W) image to (size, size); ``pad`` keeps the aspect ratio.

    pad: the long side becomes ``size``, the image is centred and the rest filled with 0.
    Lanczos in PIL widens its kernel when shrinking, so downscaling is antialiased.
    ``img`` (uint8, 2-D) becomes a PIL "L" image.
    """
    if img.ndim != 2 or img.dtype != np.uint8:
        raise ValueError(f"resize_gray expects a uint8 (H, W) array, got {img.dtype} {img.shape}")
    h, w = img.shape
    affine = resize_affine(h, w, size, mode)
    nw, nh = round(affine.sx * w), round(affine.sy * h)
    left, top = int(affine.tx), int(affine.ty)
    # reducing_gap: a box pre-shrink to ~2x the target, then Lanczos: 3-4x faster on 1024 px
    # images, within ~0.3 grey levels on average of a pure Lanczos resize.
    resized = Image.fromarray(img).resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=2.0)
    if (nw, nh) == (size, size):
        return np.array(resized, dtype=np.uint8), affine  # a writable copy
    out = np.zeros((size, size), dtype=np.uint8)
    out[top : top + nh, left : left + nw] = np.asarray(resized, dtype=np.uint8)
    return out, affine


def equalize(img: np.ndarray) -> np.ndarray:
    """Global histogram equalisation of a uint8 (H, W) image (PIL's ImageOps.equalize): the same
    film exposed or windowed differently maps to about the same grey levels."""
    return np.asarray(ImageOps.equalize(Image.fromarray(img)), dtype=np.uint8)


def standardize(img: np.ndarray) -> np.ndarray:
    """Per-image intensity standardisation of a uint8 (H, W) image: its grey levels shifted and
    scaled to mean STANDARD_MEAN and standard deviation STANDARD_SD, then rounded and clipped to
    uint8. A film exposed brighter or with more contrast (another machine, another hospital)
    maps to about the same grey levels; a flat image becomes flat STANDARD_MEAN."""
    x = img.astype(np.float32)
    mean, sd = float(x.mean()), float(x.std())
    scale = STANDARD_SD / sd if sd > 1e-6 else 0.0
    return np.clip(np.rint(STANDARD_MEAN + (x - mean) * scale), 0, 255).astype(np.uint8)


def prepare_gray(
    img: np.ndarray, size: int, mode: ResizeMode, intensity: Intensity = "none"
) -> tuple[np.ndarray, Affine]:
    """The cache's preprocessing of one decoded image, shared by the augment stage and serving:
    intensity normalisation (on the original pixels), then ``resize_gray``."""
    if intensity == "equalize":
        img = equalize(img)
    elif intensity == "standardize":
        img = standardize(img)
    elif intensity != "none":
        raise ValueError(f"intensity must be one of {INTENSITY_MODES}, got {intensity!r}")
    return resize_gray(img, size, mode)


def prepare_mask(mask: np.ndarray, size: int, mode: ResizeMode) -> np.ndarray:
    """A 0/255 uint8 (H, W) mask moved exactly like its image by ``prepare_gray`` (intensity
    aside): the same smooth resize, then thresholded at 128 into 0/1 uint8 (size, size)."""
    return (resize_gray(mask, size, mode)[0] >= 128).astype(np.uint8)


def transform_boxes(boxes_xyxy: np.ndarray, affine: Affine, size: int) -> np.ndarray:
    """Apply ``affine`` to (K, 4) xyxy boxes and clip them to the (size, size) image."""
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    out = np.empty_like(b)
    out[:, [0, 2]] = b[:, [0, 2]] * affine.sx + affine.tx
    out[:, [1, 3]] = b[:, [1, 3]] * affine.sy + affine.ty
    return np.clip(out, 0.0, float(size)).astype(np.float32)


# --------------------------------------------------------------------------- writer


def write_split(
    out_dir: Path,
    split: str,
    images: Iterable[np.ndarray] | np.ndarray,
    index: pd.DataFrame,
    image_size: int,
    coco: dict | None = None,
    masks: Iterable[np.ndarray] | np.ndarray | None = None,
) -> None:
    """Stream ``len(index)`` uint8 (S, S) images into ``out_dir/split/images.npy`` (+ index, coco;
    segmentation: ``masks``, consumed in step with the images, into ``masks.npy``).

    Memory stays flat in N: each image is copied into the memory map as it arrives.
    """
    split_dir = split_path(out_dir, split)
    split_dir.mkdir(parents=True, exist_ok=True)
    n = len(index)
    shape = (n, image_size, image_size)
    files = [(IMAGES_FILE, "image", images)]
    if masks is not None:
        files.append((MASKS_FILE, "mask", masks))
    arrs = [
        np.lib.format.open_memmap(split_dir / name, mode="w+", dtype=np.uint8, shape=shape)
        for name, _, _ in files
    ]
    count = 0
    try:
        for items in zip(*(source for _, _, source in files), strict=False):
            if count >= n:
                raise ValueError(f"write_split({split}): more images than index rows ({n})")
            for arr, (_, what, _), img in zip(arrs, files, items, strict=True):
                img = np.asarray(img)
                if img.shape != shape[1:] or img.dtype != np.uint8:
                    raise ValueError(
                        f"write_split({split}): {what} {count} is {img.dtype} {img.shape}, "
                        f"expected uint8 {shape[1:]}"
                    )
                arr[count] = img
            count += 1
        if count != n:
            raise ValueError(f"write_split({split}): got {count} images for {n} index rows")
        for arr in arrs:
            arr.flush()
    finally:
        del arrs
    index.to_csv(split_dir / INDEX_FILE, index=False)
    if coco is not None:
        write_json(split_dir / COCO_FILE, coco)


def write_meta(out_dir: Path, meta: dict) -> None:
    write_json(fit_path(out_dir) / META_FILE, meta)


def write_policy(out_dir: Path, policy: dict) -> None:
    write_json(fit_path(out_dir) / POLICY_FILE, policy)


def fit_path(cache_dir: Path) -> Path:
    """The folder of the training inputs (meta, policy, train, val) inside a cache."""
    return Path(cache_dir) / FIT_DIR


def split_path(cache_dir: Path, split: str) -> Path:
    """The folder of one split inside a cache: fit/train, fit/val or test."""
    if split not in (*FIT_SPLITS, "test"):
        raise ValueError(f"unknown split {split!r}; splits: train, val, test")
    return fit_path(cache_dir) / split if split in FIT_SPLITS else Path(cache_dir) / split


# --------------------------------------------------------------------------- reader


class CocoIndex:
    """Per-image lookup over a COCO dict: built once, then ``boxes(image_id)`` is O(1)."""

    def __init__(self, coco: dict) -> None:
        grouped: dict[int, list[tuple[list[float], int]]] = {}
        for ann in coco.get("annotations", []):
            grouped.setdefault(int(ann["image_id"]), []).append(
                (ann["bbox"], int(ann["category_id"]))
            )
        self._boxes: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for image_id, items in grouped.items():
            xywh = np.asarray([b for b, _ in items], dtype=np.float32).reshape(-1, 4)
            xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
            self._boxes[image_id] = (xyxy, np.asarray([c for _, c in items], dtype=np.int64))
        self.categories: dict[int, str] = {
            int(c["id"]): str(c["name"]) for c in coco.get("categories", [])
        }

    def boxes(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        found = self._boxes.get(int(image_id))
        if found is None:
            return np.zeros((0, 4), dtype=np.float32), np.zeros((0,), dtype=np.int64)
        return found[0].copy(), found[1].copy()


# Identity-keyed cache: holding the dict itself keeps its id() from being reused.
_COCO_INDEX_CACHE: list[tuple[dict, CocoIndex]] = []


def coco_index(coco: dict) -> CocoIndex:
    for cached, idx in _COCO_INDEX_CACHE:
        if cached is coco:
            return idx
    idx = CocoIndex(coco)
    _COCO_INDEX_CACHE.insert(0, (coco, idx))
    del _COCO_INDEX_CACHE[4:]
    return idx


def boxes_for(coco: dict | CocoIndex, image_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(boxes xyxy float32 (K, 4), category ids int64 (K,)) of one image; K may be 0."""
    idx = coco if isinstance(coco, CocoIndex) else coco_index(coco)
    return idx.boxes(image_id)


@dataclass
class CacheSplit:
    """One split of the cache, opened read-only (images are a memory map, never loaded whole)."""

    images: np.ndarray
    index: pd.DataFrame
    meta: dict
    coco: dict | None = None
    masks: np.ndarray | None = None  # segmentation: uint8 (N, S, S) 0/1, a memory map
    _coco_index: CocoIndex | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def boxes(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Boxes of row ``i`` (image id = row index) in cache pixels."""
        if self.coco is None:
            raise ValueError("this cache split has no annotations (classification task)")
        if self._coco_index is None:
            self._coco_index = CocoIndex(self.coco)
        return self._coco_index.boxes(i)


def load_meta(cache_dir: Path) -> dict:
    path = fit_path(cache_dir) / META_FILE
    if not path.is_file():
        raise StageError(f"{path} not found: run the augment stage first (dvc repro augment)")
    return read_json(path)


def load_policy(cache_dir: Path) -> dict:
    path = fit_path(cache_dir) / POLICY_FILE
    if not path.is_file():
        raise StageError(f"{path} not found: run the augment stage first (dvc repro augment)")
    return read_json(path)


def read_index(path: Path) -> pd.DataFrame:
    header = pd.read_csv(path, nrows=0).columns
    dtypes: dict[str, Any] = {c: str for c in _STR_COLUMNS if c in header}
    return pd.read_csv(path, dtype=dtypes, keep_default_na=False)


def open_split(cache_dir: Path, split: str) -> CacheSplit:
    """Open one split of a cache read-only; checks that images and index agree."""
    meta = load_meta(cache_dir)
    split_dir = split_path(cache_dir, split)
    if not (split_dir / IMAGES_FILE).is_file():
        raise StageError(f"{split_dir / IMAGES_FILE} not found: run the augment stage first")
    images = np.load(split_dir / IMAGES_FILE, mmap_mode="r")
    index = read_index(split_dir / INDEX_FILE)
    if len(index) != images.shape[0]:
        raise StageError(
            f"{split_dir}: {images.shape[0]} images but {len(index)} index rows; re-run augment"
        )
    coco = read_json(split_dir / COCO_FILE) if (split_dir / COCO_FILE).is_file() else None
    masks = None
    if (split_dir / MASKS_FILE).is_file():
        masks = np.load(split_dir / MASKS_FILE, mmap_mode="r")
        if masks.shape != images.shape:
            raise StageError(
                f"{split_dir}: masks {masks.shape} do not match images {images.shape}; "
                "re-run augment"
            )
    return CacheSplit(images=images, index=index, meta=meta, coco=coco, masks=masks)


__all__ = [
    "Affine",
    "CacheSplit",
    "CocoIndex",
    "boxes_for",
    "coco_index",
    "PARTS",
    "fit_path",
    "split_path",
    "load_meta",
    "load_policy",
    "open_split",
    "prepare_mask",
    "read_index",
    "resize_affine",
    "resize_gray",
    "transform_boxes",
    "write_meta",
    "write_policy",
    "write_split",
]
