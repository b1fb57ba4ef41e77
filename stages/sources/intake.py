"""Image intake of the download stage: decode, check, write, hash every record of every source.

Input: the loaders' records. Output: 8-bit grayscale PNGs under ``<images_dir>/<source key>/``
(relative structure kept, suffix ``.png``), one manifest row per written image, and for
detection the boxes clipped to the written image. Files the decoder rejects or that cannot be
read are skipped and listed with their reason; boxes partly outside are clipped, empty or
inverted ones dropped, and both are counted. Segmentation records carry a mask: it is checked by
``stages.sources.masks`` and written as 8-bit 0/255 PNG under ``<images_dir>/../masks/`` with
the image's relative path (manifest column ``mask_path``); a bad mask stops the stage naming the
file, or with the source's ``bad_masks: skip`` rejects the pair like an undecodable image.
Decoding runs in a small thread pool (PIL and zlib release the GIL).
Run: no CLI; called by ``stages.download``, tested by tests/test_download.py.
"""

from __future__ import annotations

import math
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from stages.common.cache import resize_gray
from stages.common.imageio import ImageRejected, load_gray, pixel_sha256, to_gray_uint8
from stages.common.paths import MASKS_DIR
from stages.common.utils import StageError
from stages.sources.base import Box, Record
from stages.sources.masks import MaskRejected, read_mask

MANIFEST_COLUMNS = (
    "path",
    "label",
    "subtype",
    "patient_id",
    "source",
    "source_split",
    "width",
    "height",
    "sha256",
)
SEGMENTATION_COLUMNS = (*MANIFEST_COLUMNS, "mask_path")  # the mask beside each image


@dataclass
class Item:
    """One record bound to its source and output location."""

    record: Record
    source: str  # source name (manifest column)
    key: str  # folder below images/
    out_rel: str  # path below images/, e.g. kermany/train/NORMAL/IM-0001-0001.png
    render_size: int | None = None  # classification: store the image resized to N x N
    bad_masks: str = "error"  # segmentation: error (stop the stage) | skip (reject the pair)


@dataclass
class IntakeResult:
    rows: list[dict] = field(default_factory=list)
    boxes: list[tuple[Box, ...]] = field(default_factory=list)  # per row (detection)
    rejected: list[dict] = field(default_factory=list)
    box_stats: Counter = field(default_factory=Counter)
    dropped_boxes: list[dict] = field(default_factory=list)


def output_names(records: list[Record], key: str) -> list[str]:
    """Output path of each record below images/; a clash (a.jpg + a.png) keeps the old suffix."""
    names = [f"{key}/{PurePosixPath(r.rel).with_suffix('.png')}" for r in records]
    counts = Counter(names)
    return [
        f"{key}/{r.rel}.png" if counts[n] > 1 else n for r, n in zip(records, names, strict=True)
    ]


def _is_gray8_png(path: Path) -> bool:
    """Header-only check: such files can be copied byte for byte instead of re-encoded."""
    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.mode == "L" and "transparency" not in im.info
    except (OSError, UnidentifiedImageError, ValueError):
        return False


def write_png(arr: np.ndarray, dest: Path) -> None:
    """8-bit gray PNG at zlib level 1: ~4x faster than PIL's default 6 for ~15 % larger files.

    Not imageio.save_gray_png's per-file temp + rename: the whole images/ tree is already built
    in a temporary folder that replaces the output in one rename.
    """
    Image.fromarray(arr).save(dest, format="PNG", compress_level=1)


def _ingest(item: Item, images_dir: Path) -> tuple[int, int, str] | dict:
    rec = item.record
    try:
        arr = to_gray_uint8(rec.pixels) if rec.pixels is not None else load_gray(rec.src)
    except ImageRejected as exc:
        return {"path": str(rec.src or rec.where), "reason": exc.reason, "detail": exc.detail}
    except ValueError as exc:  # an in-memory array of an unusable shape or dtype
        return {"path": rec.where, "reason": "unsupported", "detail": str(exc)}
    except OSError as exc:  # a file without read permission, or gone since it was listed
        return {"path": str(rec.src), "reason": "unreadable", "detail": exc.strerror or str(exc)}
    mask = None
    if rec.mask is not None:
        try:
            mask = read_mask(rec.mask, arr.shape)
        except MaskRejected as exc:
            if item.bad_masks == "error":
                raise StageError(
                    f"{rec.mask}: {exc}; fix or remove the pair, or set bad_masks: skip on "
                    "this source to leave such pairs out (listed in report.json)"
                ) from None
            return {"path": str(rec.mask), "reason": exc.reason, "detail": exc.detail}
    dest = images_dir / item.out_rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    if mask is not None:
        mask_dest = images_dir.parent / MASKS_DIR / item.out_rel
        mask_dest.parent.mkdir(parents=True, exist_ok=True)
        write_png(mask, mask_dest)
    if item.render_size:  # e.g. 28 px like MedMNIST's files (whole film: see render_size)
        arr = resize_gray(arr, item.render_size, "stretch")[0]
        write_png(arr, dest)
    elif rec.src is not None and _is_gray8_png(rec.src):
        shutil.copyfile(rec.src, dest)
    else:
        write_png(arr, dest)
    return arr.shape[1], arr.shape[0], pixel_sha256(arr)


def clip_boxes(
    boxes: tuple[Box, ...], width: int, height: int, stats: Counter
) -> tuple[tuple[Box, ...], list[tuple[Box, str]]]:
    """Clip boxes to the image; drop empty, inverted, non-finite or fully-outside ones."""
    kept, dropped = [], []
    for b in boxes:
        coords = (b.x1, b.y1, b.x2, b.y2)
        if not all(math.isfinite(v) for v in coords) or b.x2 <= b.x1 or b.y2 <= b.y1:
            stats["dropped_degenerate"] += 1
            dropped.append((b, "zero-area, inverted or non-finite"))
            continue
        c = replace(
            b,
            x1=min(max(b.x1, 0.0), width),
            y1=min(max(b.y1, 0.0), height),
            x2=min(max(b.x2, 0.0), width),
            y2=min(max(b.y2, 0.0), height),
        )
        if c.x2 <= c.x1 or c.y2 <= c.y1:
            stats["dropped_outside"] += 1
            dropped.append((b, "outside the image"))
            continue
        if c != b:
            stats["clipped"] += 1
        kept.append(c)
    stats["kept"] += len(kept)
    return tuple(kept), dropped


def ingest_all(
    items: list[Item], images_dir: Path, final_images_dir: Path, detection: bool, workers: int = 2
) -> IntakeResult:
    """Write every item's image into ``images_dir``; manifest paths point at ``final_images_dir``."""
    result = IntakeResult()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        outcomes = pool.map(lambda it: _ingest(it, images_dir), items)
        for item, outcome in tqdm(
            zip(items, outcomes, strict=True), total=len(items), desc="intake", unit="img"
        ):
            rec = item.record
            if isinstance(outcome, dict):
                result.rejected.append({"source": item.key, **outcome})
                continue
            width, height, sha = outcome
            label, subtype = rec.label, rec.subtype
            if detection:
                boxes, dropped = clip_boxes(rec.boxes, width, height, result.box_stats)
                result.dropped_boxes += [
                    {"file": rec.where, "box": [b.x1, b.y1, b.x2, b.y2], "reason": why}
                    for b, why in dropped
                ]
                result.boxes.append(boxes)
                label = "abnormal" if boxes else "normal"
            result.rows.append(
                {
                    "path": (final_images_dir / item.out_rel).as_posix(),
                    "label": label,
                    "subtype": subtype,
                    "patient_id": rec.patient_id,
                    "source": item.source,
                    "source_split": rec.source_split,
                    "width": width,
                    "height": height,
                    "sha256": sha,
                }
            )
            if rec.mask is not None:
                mask_path = final_images_dir.parent / MASKS_DIR / item.out_rel
                result.rows[-1]["mask_path"] = mask_path.as_posix()
    return result
