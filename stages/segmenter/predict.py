"""Lung masks and lung boxes for chest films of any size: the segmenter as a library.

Input: uint8 grey films (H, W) of any size and a trained segmenter (``models/segmenter.pt`` by
default). Output per film: ``Lungs`` = the bool lung mask at the film's size, the lungs'
bounding box with a margin (x0, y0, x1, y1 in film pixels, x1/y1 exclusive, clipped to the
film) and whether any lung was found (else the box is the whole film, so a crop is a no-op).
No run command; the segmentation evaluation scores the same decision (``cache_masks``), and
the classifier's lung-aware preprocessing calls ``LungSegmenter.segment`` (train = serve).

Each film goes through the cache's own preprocessing (``stages.common.cache.prepare_gray`` with
the image size, resize and intensity stored in the model file), the network gives lung
probabilities at the cache size, ``cache_masks`` thresholds them and keeps the largest regions,
and the kept probabilities are mapped back onto the film (the resize undone, bilinear) and
thresholded again there. Importing this module is cheap (numpy and PIL); torch and MONAI load
with the first model. Inference runs in fp32 on the CPU, in batches.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from stages.common import paths
from stages.common.cache import prepare_gray
from stages.segmenter.config import EvalSegmentationConfig

DEFAULT_MARGIN = 0.05  # the box grows by this share of its width / height on every side
_DEFAULTS = EvalSegmentationConfig()


@dataclass(frozen=True)
class Lungs:
    """The segmenter's answer for one film."""

    mask: np.ndarray  # bool (H, W), the film's size
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) with the margin, in film pixels
    found: bool  # False: no lung predicted, box = the whole film


def keep_largest(mask: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` largest 8-connected regions of a bool mask (k = 0: the mask unchanged)."""
    from scipy import ndimage

    if k <= 0 or not mask.any():
        return mask
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n <= k:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = np.argsort(sizes, kind="stable")[-k:]
    return np.isin(labels, keep)


def cache_masks(
    probs: np.ndarray,
    threshold: float = _DEFAULTS.threshold,
    keep_regions: int = _DEFAULTS.keep_regions,
) -> np.ndarray:
    """bool lung masks (N, S, S) from probabilities at the cache size: >= threshold, then the
    ``keep_regions`` largest regions of each."""
    out = np.asarray(probs) >= threshold
    return np.stack([keep_largest(m, keep_regions) for m in out]) if len(out) else out


def lung_box(
    mask: np.ndarray, margin: float = DEFAULT_MARGIN
) -> tuple[tuple[int, int, int, int], bool]:
    """(box, found): the bounding box of ``mask`` grown by ``margin`` x its size on each side,
    clipped to the mask; the whole mask's frame when it holds no lung."""
    h, w = mask.shape
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return (0, 0, w, h), False
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    box = (
        max(0, math.floor(x0 - mx)),
        max(0, math.floor(y0 - my)),
        min(w, math.ceil(x1 + mx)),
        min(h, math.ceil(y1 + my)),
    )
    return box, True


def to_film(prob: np.ndarray, shape: tuple[int, int], resize: str) -> np.ndarray:
    """Cache-size probabilities (S, S) back onto a film of ``shape`` (H, W): the inverse of
    ``stages.common.cache.resize_gray`` (stretch: resize; pad: crop the image area, resize)."""
    from stages.common.cache import resize_affine

    h, w = shape
    size = prob.shape[0]
    a = resize_affine(h, w, size, resize)
    nw, nh = round(a.sx * w), round(a.sy * h)
    left, top = int(a.tx), int(a.ty)
    area = np.ascontiguousarray(prob[top : top + nh, left : left + nw], dtype=np.float32)
    back = Image.fromarray(area).resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(back, dtype=np.float32)


class LungSegmenter:
    """A loaded segmenter (``path``: a file of ``stages.segmenter.model.save_segmenter``)."""

    def __init__(
        self,
        path: str | Path = paths.SEGMENTER_MODEL,
        threshold: float = _DEFAULTS.threshold,
        keep_regions: int = _DEFAULTS.keep_regions,
    ) -> None:
        from stages.segmenter.model import load_segmenter  # torch + MONAI: only with a model

        self.path = Path(path)
        self.model, self.config, meta = load_segmenter(self.path)
        self.image_size = int(meta["image_size"])
        self.resize = str(meta["resize"])
        self.intensity = str(meta["intensity"])
        self.threshold = threshold
        self.keep_regions = keep_regions

    def cache_images(self, films: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 (N, S, S): each film as the augment stage stores it in the cache."""
        out = np.empty((len(films), self.image_size, self.image_size), dtype=np.uint8)
        for i, film in enumerate(films):
            film = np.asarray(film)
            if film.ndim != 2 or film.dtype != np.uint8:
                raise ValueError(f"film {i}: expected uint8 (H, W), got {film.dtype} {film.shape}")
            out[i] = prepare_gray(film, self.image_size, self.resize, self.intensity)[0]
        return out

    def segment(
        self, films: Sequence[np.ndarray], margin: float = DEFAULT_MARGIN, batch_size: int = 16
    ) -> list[Lungs]:
        """The lungs of every film (module docstring), ``batch_size`` films at a time."""
        from stages.segmenter.model import predict_proba

        out: list[Lungs] = []
        for start in range(0, len(films), batch_size):
            chunk = films[start : start + batch_size]
            probs = predict_proba(self.model, self.cache_images(chunk), batch_size)
            kept = cache_masks(probs, self.threshold, self.keep_regions)
            for film, prob, keep in zip(chunk, probs, kept, strict=True):
                shape = np.asarray(film).shape
                mask = to_film(np.where(keep, prob, 0.0), shape, self.resize) >= self.threshold
                box, found = lung_box(mask, margin)
                out.append(Lungs(mask=mask, box=box, found=found))
        return out


_LOADED: dict[tuple[str, int], LungSegmenter] = {}
_LOCK = threading.Lock()


def load(path: str | Path = paths.SEGMENTER_MODEL) -> LungSegmenter:
    """The segmenter at ``path``, loaded once per file version (path and modification time)."""
    path = Path(path)
    key = (str(path.resolve()), path.stat().st_mtime_ns if path.is_file() else -1)
    with _LOCK:
        if key not in _LOADED:
            _LOADED[key] = LungSegmenter(path)
        return _LOADED[key]


def segment_lungs(
    films: Sequence[np.ndarray],
    model_path: str | Path = paths.SEGMENTER_MODEL,
    margin: float = DEFAULT_MARGIN,
) -> list[Lungs]:
    """``load(model_path).segment(films, margin)``: lung masks at each film's size and boxes."""
    return load(model_path).segment(films, margin)


__all__ = [
    "DEFAULT_MARGIN",
    "LungSegmenter",
    "Lungs",
    "cache_masks",
    "keep_largest",
    "load",
    "lung_box",
    "segment_lungs",
    "to_film",
]
