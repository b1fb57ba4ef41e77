"""Pictures for the page and the predict command, drawn at the ORIGINAL image size.

Inputs: the uint8 (H, W) decoded image, a Grad-CAM map in model-input pixels (S, S) with the
``stages.common.cache.Affine`` that took the image there, detector boxes already in original pixels.
Outputs: float32 (H, W) heatmaps, RGB uint8 (H, W, 3) overlays, PNG files (written atomically
by ``stages.common.utils.atomic_file``). No run command.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from stages.common.utils import atomic_file

if TYPE_CHECKING:  # the cache module imports pandas: not needed to draw
    from stages.common.cache import Affine

# One colour per detector class (cycled), readable on a grey X-ray.
_COLOURS = ((255, 64, 64), (64, 200, 255), (255, 200, 0), (120, 255, 120), (255, 120, 255))


def cam_to_original(cam: np.ndarray, affine: Affine, shape: tuple[int, int]) -> np.ndarray:
    """Undo the resize: crop the padded border (pad mode) and scale back to ``shape`` (H, W).
    A film cropped to its lungs first (a negative offset) gets the map inside the crop, 0
    around it."""
    h, w = shape
    if affine.tx < 0 or affine.ty < 0:
        src = Image.fromarray(np.ascontiguousarray(cam, dtype=np.float32), mode="F")
        # each film pixel's centre, in cache pixels: x' = sx * x + tx (PIL maps output -> input)
        data = (affine.sx, 0.0, affine.tx + 0.5 * affine.sx - 0.5, 0.0, affine.sy,
                affine.ty + 0.5 * affine.sy - 0.5)  # fmt: skip
        out = src.transform((w, h), Image.Transform.AFFINE, data, Image.Resampling.BILINEAR)
        return np.clip(np.asarray(out), 0.0, 1.0).astype(np.float32)
    nw, nh = max(1, round(affine.sx * w)), max(1, round(affine.sy * h))
    left, top = int(affine.tx), int(affine.ty)
    inner = np.ascontiguousarray(cam[top : top + nh, left : left + nw], dtype=np.float32)
    out = np.asarray(Image.fromarray(inner, mode="F").resize((w, h), Image.Resampling.BILINEAR))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def draw_outline(rgb: np.ndarray, mask: np.ndarray, colour=(0, 255, 0)) -> np.ndarray:
    """``rgb`` (H, W, 3) with the border of the bool ``mask`` (H, W) drawn in ``colour``: the
    lungs a lung-aware classifier was given."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    width = max(1, round(min(mask.shape) / 200))
    edge = mask & ~ndimage.binary_erosion(mask, iterations=width)
    out = np.array(rgb, copy=True)
    out[edge] = colour
    return out


def boxes_to_original(boxes: np.ndarray, affine: Affine, shape: tuple[int, int]) -> np.ndarray:
    """(K, 4) xyxy in model-input pixels -> original pixels, clipped to the (H, W) image."""
    h, w = shape
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = np.empty_like(b)
    out[:, [0, 2]] = np.clip((b[:, [0, 2]] - affine.tx) / affine.sx, 0.0, float(w))
    out[:, [1, 3]] = np.clip((b[:, [1, 3]] - affine.ty) / affine.sy, 0.0, float(h))
    return out.astype(np.float32)


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def draw_boxes(
    gray: np.ndarray, boxes: Sequence[dict[str, Any]], classes: Sequence[str]
) -> np.ndarray:
    """RGB uint8 copy of ``gray`` with every box outlined and labelled "class score"."""
    img = Image.fromarray(np.asarray(gray, dtype=np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(img)
    side = max(img.size)
    width, font = max(1, side // 300), _font(max(10, side // 45))
    for box in boxes:
        idx = classes.index(box["label"]) if box["label"] in classes else 0
        colour = _COLOURS[idx % len(_COLOURS)]
        x0, y0, x1, y1 = box["box_xyxy"]
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        text = f"{box['label']} {box['score']:.2f}"
        tx, ty = x0, max(0.0, y0 - getattr(font, "size", 10) - 2 * width)  # above the box
        left, top, right, bottom = draw.textbbox((tx, ty), text, font=font)
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=(0, 0, 0))
        draw.text((tx, ty), text, fill=colour, font=font)
    return np.asarray(img)


def save_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Write an RGB (or gray) uint8 array as PNG, atomically, creating the folder."""
    path = Path(path)
    with atomic_file(path) as tmp:
        Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(tmp, format="PNG")
    return path


__all__ = ["boxes_to_original", "cam_to_original", "draw_boxes", "draw_outline", "save_png"]
