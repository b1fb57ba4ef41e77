"""Lung-aware preprocessing of a film: the one function the classifier's cache and serving share.

Input: a uint8 grey film (H, W), its lung mask (bool, H, W, from the segmenter:
``stages.segmenter.predict``), the lungs' tight box (x0, y0, x1, y1, in film pixels, x1/y1
exclusive), the mode and the margin. Output: the film as it goes on to ``stages.common.cache.prepare_gray``
(intensity, resize) and the lung mask in the same frame:
- ``none``: both unchanged;
- ``crop``: the box's pixels (the lungs with the margin around them), before resizing, so the
  lungs fill the classifier's input at full resolution;
- ``mask``: every pixel farther than the margin from the lungs set to 0 (what air looks like on a
  film), the frame unchanged.
``LungsConfig`` holds the params (``augment.classification.lungs``, ``lungs_margin`` and
``lungs_framings``, the extra framings of the training films).
No run command: ``python -m stages.lungs`` finds the lungs, ``python -m stages.augment`` and
``python -m stages.predict`` apply them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from stages.common.config import check

LungsMode = Literal["none", "crop", "mask"]
LUNGS_MODES: tuple[str, ...] = get_args(LungsMode)


@dataclass(frozen=True)
class LungsConfig:
    """Where the classifier looks: the whole film, or the lungs the segmenter finds."""

    # none | crop (the lungs' box with the margin, before resizing) | mask (outside the lungs
    # blanked); crop and mask make the classification chain depend on the segmenter
    lungs: LungsMode = "none"
    # share of the lungs' box width / height kept around them (crop), or distance from the lungs
    # kept (mask), so the lung borders and the costophrenic angles stay in view
    lungs_margin: float = 0.05
    # margins of extra training framings: the train split also holds every film cropped to its
    # lungs' box with each margin, so framing (how much neck and belly a film shows) no longer
    # tells the classes apart in training; validation, test and serving see `lungs` alone
    lungs_framings: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        check(
            0.0 <= self.lungs_margin <= 0.5,
            f"lungs_margin must be in [0, 0.5], got {self.lungs_margin}",
        )
        for m in self.lungs_framings:
            check(0.0 <= m <= 0.5, f"lungs_framings must be margins in [0, 0.5], got {m}")
        check(
            len(set(self.lungs_framings)) == len(self.lungs_framings),
            f"lungs_framings must not repeat a margin, got {list(self.lungs_framings)}",
        )
        # a framing is a crop of the film: beside masked films it would show training what
        # validation, test and serving never see (the pixels outside the lungs)
        check(
            not (self.lungs == "mask" and self.lungs_framings),
            "lungs_framings go with lungs none or crop, not mask",
        )

    @property
    def needs_lungs(self) -> bool:
        """Whether the cache reads the segmenter's lungs (a mode, or training framings)."""
        return self.lungs != "none" or bool(self.lungs_framings)


def grow(
    box: tuple[int, int, int, int], margin: float, shape: tuple[int, int]
) -> tuple[int, int, int, int]:
    """The lungs' tight box grown by ``margin`` x its width / height on every side, clipped to
    a film of ``shape`` (H, W)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    h, w = shape
    return (
        max(0, math.floor(x0 - mx)),
        max(0, math.floor(y0 - my)),
        min(w, math.ceil(x1 + mx)),
        min(h, math.ceil(y1 + my)),
    )


def apply(
    film: np.ndarray, mask: np.ndarray, box: tuple[int, int, int, int], mode: str, margin: float
) -> tuple[np.ndarray, np.ndarray]:
    """(film, lung mask) after the ``mode``'s preprocessing (module docstring). ``box``: the
    lungs' tight box (x0, y0, x1, y1, exclusive), the whole film when no lung was found."""
    film, mask = np.asarray(film), np.asarray(mask, dtype=bool)
    if film.shape != mask.shape or film.ndim != 2:
        raise ValueError(f"lungs: film {film.shape} and mask {mask.shape} must be one (H, W)")
    if mode == "none" or not mask.any():  # no lung found: keep the whole film
        return film, mask
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= film.shape[1] and 0 <= y0 < y1 <= film.shape[0]):
        raise ValueError(f"lungs: box {box} does not lie inside the film {film.shape}")
    if mode == "crop":
        x0, y0, x1, y1 = grow(box, margin, film.shape)
        return film[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    if mode == "mask":
        from scipy import ndimage

        reach = margin * max(x1 - x0, y1 - y0)
        keep = ndimage.distance_transform_edt(~mask) <= reach
        return np.where(keep, film, 0).astype(film.dtype), mask
    raise ValueError(f"lungs: unknown mode {mode!r}; modes: {', '.join(LUNGS_MODES)}")


__all__ = ["LUNGS_MODES", "LungsConfig", "LungsMode", "apply", "grow"]
