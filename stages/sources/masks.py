"""Lung masks entering the project: every mask is decoded, checked and made binary here.

Input: a mask file (any format ``stages.common.imageio`` decodes) and the (H, W) of its image.
Output: a uint8 (H, W) array of 0 / 255, or ``MaskRejected`` with a ``reason`` (one of
``REASONS``) and a one-line ``detail``. Library module, no CLI; used by ``stages.sources.intake``
for the segmentation task, tested by tests/test_sources.py and tests/test_segmenter_data.py.

The rules (the lung_masks layout: 0 = background, 255 = lung, both lungs in one mask):
- Decoding as for images (colour -> luma, 16 bit scaled to 8). A mask holding only the values 0
  and 1 is a label map and is read as 0 / 255.
- ``mask_size_mismatch``: the mask's width x height differs from its image's.
- ``mask_not_binary``: a pixel is grey when its value lies in [GREY_LOW, GREY_HIGH] (away from
  both ends, so JPEG ringing next to 0 or 255 is not grey). Grey pixels are expected within
  EDGE_BAND px of the lung edge (the edge of the mask thresholded at THRESHOLD: a resized mask
  interpolates there); more than MAX_STRAY_GREY of all pixels grey away from the edge is a soft
  map or a film saved as a mask, not a binary mask.
- ``mask_empty``: no pixel at or above THRESHOLD (no lung drawn).
- ``mask_not_lung_shaped``: the lungs cover less than MIN_AREA or more than MAX_AREA of the
  image, or more than MAX_FRAME of the image's outermost pixel ring (an inverted mask, a white
  frame), or the two largest 8-connected regions hold less than MIN_TWO_REGIONS of the lung
  pixels (scattered specks or noise, not one or two lungs).
On the real lung_masks set (704 masks at 512 px) the lungs cover 8-43 % of the image and at most
3 % of the frame, and no grey pixel lies away from an edge: every rule has a wide margin.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from stages.common.imageio import ImageRejected, load_gray

THRESHOLD = 128  # lung where the mask is >= 128 (the layout's rule for interpolated edges)
GREY_LOW, GREY_HIGH = 32, 223
EDGE_BAND = 2  # px either side of the thresholded edge where grey pixels are expected
MAX_STRAY_GREY = 0.005  # share of all pixels
MIN_AREA, MAX_AREA = 0.01, 0.80  # share of the image covered by lung
MAX_FRAME = 0.5  # share of the outermost pixel ring covered by lung
MIN_TWO_REGIONS = 0.8  # share of the lung pixels in the two largest connected regions
REASONS = (
    "mask_unreadable",
    "mask_size_mismatch",
    "mask_not_binary",
    "mask_empty",
    "mask_not_lung_shaped",
)


class MaskRejected(Exception):
    """A mask that cannot serve as a lung mask; ``.reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        self.reason = reason
        self.detail = " ".join(str(detail).split())
        super().__init__(f"{reason.replace('_', ' ')}: {self.detail}")


def read_mask(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """Decode and check the mask file of an image of ``shape`` (H, W); 0 / 255 uint8."""
    try:
        values = load_gray(path)
    except ImageRejected as exc:
        what = exc.reason.replace("_", " ") + (f": {exc.detail}" if exc.detail else "")
        raise MaskRejected("mask_unreadable", f"cannot decode the mask ({what})") from None
    return check_mask(values, shape)


def _edge_band(lung: np.ndarray) -> np.ndarray:
    """Pixels within EDGE_BAND px (chessboard distance) of the lung edge."""
    size = 2 * EDGE_BAND + 1
    im = Image.fromarray(lung.astype(np.uint8) * 255)
    grown = np.asarray(im.filter(ImageFilter.MaxFilter(size))) > 0
    shrunk = np.asarray(im.filter(ImageFilter.MinFilter(size))) > 0
    return grown & ~shrunk


def two_region_share(lung: np.ndarray) -> float:
    """Share of the lung pixels in the two largest 8-connected regions (1.0 for 1-2 regions)."""
    from scipy import ndimage

    labels, n = ndimage.label(lung, structure=np.ones((3, 3), dtype=bool))
    if n <= 2:
        return 1.0
    sizes = np.bincount(labels.ravel())[1:]
    return float(np.sort(sizes)[-2:].sum() / sizes.sum())


def check_mask(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The rules of the module docstring on decoded uint8 ``values``; 0 / 255 uint8 out."""
    if values.shape != tuple(shape):
        raise MaskRejected(
            "mask_size_mismatch",
            f"mask is {values.shape[1]}x{values.shape[0]} px but its image is "
            f"{shape[1]}x{shape[0]}; a mask must have its image's size",
        )
    if values.max() == 1:  # a 0/1 label map
        values = values * np.uint8(255)
    lung = values >= THRESHOLD
    total = lung.size
    grey = (values >= GREY_LOW) & (values <= GREY_HIGH)
    if grey.any():
        stray = int((grey & ~_edge_band(lung)).sum())
        if stray > MAX_STRAY_GREY * total:
            raise MaskRejected(
                "mask_not_binary",
                f"{100 * stray / total:.1f} % of the pixels are grey ({GREY_LOW}-{GREY_HIGH}) away "
                f"from the lung edges (at most {100 * MAX_STRAY_GREY:g} % allowed): a mask holds "
                "0 for background and 255 for lung",
            )
    area = int(lung.sum())
    if area == 0:
        raise MaskRejected("mask_empty", f"no pixel >= {THRESHOLD}: the mask shows no lung")
    share = area / total
    if not MIN_AREA <= share <= MAX_AREA:
        raise MaskRejected(
            "mask_not_lung_shaped",
            f"the lungs cover {100 * share:.1f} % of the image (expected "
            f"{100 * MIN_AREA:g}-{100 * MAX_AREA:g} %)",
        )
    frame = np.concatenate([lung[0], lung[-1], lung[1:-1, 0], lung[1:-1, -1]])
    if frame.mean() > MAX_FRAME:
        raise MaskRejected(
            "mask_not_lung_shaped",
            f"the lungs cover {100 * frame.mean():.0f} % of the image border (at most "
            f"{100 * MAX_FRAME:g} %): an inverted mask?",
        )
    two = two_region_share(lung)
    if two < MIN_TWO_REGIONS:
        raise MaskRejected(
            "mask_not_lung_shaped",
            f"the two largest regions hold {100 * two:.0f} % of the lung pixels (at least "
            f"{100 * MIN_TWO_REGIONS:g} % expected): scattered specks, not lungs",
        )
    return np.where(lung, np.uint8(255), np.uint8(0))


__all__ = ["REASONS", "THRESHOLD", "MaskRejected", "check_mask", "read_mask", "two_region_share"]
