"""The lung_masks layout: ``[train|val|test/]images/<name>.png`` <-> ``masks/<name>.png``.

Input: the resolved folder (the shallowest one holding ``images/`` and ``masks/``, any casing,
or split folders that each hold both; any image size; spaces in names are fine). Output: one
record per image with its mask file (``Record.mask``), label ``lungs``, the source's split (the
split folder, else none) and the patient id = the file name without its last ``_<n>`` part
(``CHNCXR_0001_0`` -> ``CHNCXR_0001``; a name without such a part is its own patient, listed
as unparsed). A mask pairs with the image of the same relative path and name, whatever the
suffix (``a.jpg`` <-> ``a.png``); ``<name>_mask.png`` is accepted too (Kaggle's copy of the
Shenzhen set). An image without its mask, or a mask without its image, stops the stage naming
the file, or with ``bad_masks: skip`` is left out and listed (``ignored`` in the report). The
mask pixels are checked later, with the image (``stages.sources.masks``). The synthetic
segmentation source writes this layout and is read by this loader.
Run: no CLI; the download stage calls ``load``; tested by tests/test_sources.py.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from stages.common.imageio import is_candidate
from stages.common.paths import SPLITS
from stages.common.utils import StageError
from stages.sources.base import Context, Record, child_ci, find_shallowest, iter_files

LABEL = "lungs"  # every image shows lungs: one label, so the split stratifies nothing away
MASK_SUFFIX = "_mask"
_PATIENT = re.compile(r"^(.+)_\d+$")


def patient_of(stem: str) -> str | None:
    """``CHNCXR_0001_0`` -> ``CHNCXR_0001``; None when the name has no final ``_<n>`` part."""
    m = _PATIENT.match(stem)
    return m.group(1) if m else None


def _pair_dirs(d: Path) -> tuple[Path, Path] | None:
    images, masks = child_ci(d, "images"), child_ci(d, "masks")
    return (images, masks) if images is not None and masks is not None else None


def _split_dirs(d: Path) -> list[tuple[str, Path]]:
    out = []
    for split in SPLITS:
        sub = child_ci(d, split)
        if sub is not None and _pair_dirs(sub):
            out.append((split, sub))
    return out


def find_layout(root: Path) -> list[tuple[str, Path]]:
    """(source split, folder holding images/ and masks/) pairs of the shallowest layout."""
    base = find_shallowest(root, lambda d: bool(_split_dirs(d) or _pair_dirs(d)))
    if base is None:
        raise StageError(
            f"{root}: no lung_masks layout found (expected [train|val|test/]images/<name>.png "
            "beside masks/<name>.png); point the path at the folder that holds images/ and masks/"
        )
    splits = _split_dirs(base)
    return splits if splits else [("", base)]


def _files(folder: Path, ctx: Context) -> dict[str, Path]:
    """Image-like files below ``folder`` keyed by relative path without suffix."""
    out: dict[str, Path] = {}
    for path in iter_files(folder, ctx):
        if not is_candidate(path):
            ctx.notes.ignored.append(path.as_posix())
            continue
        key = path.relative_to(folder).with_suffix("").as_posix()
        if key in out:
            raise StageError(
                f"{folder}: {out[key].name} and {path.name} share the name {key!r}; an image and "
                "its mask are paired by name, so keep one of them"
            )
        out[key] = path
    return out


def _unpaired(ctx: Context, policy: str, path: Path, what: str, expected: Path) -> None:
    if policy == "error":
        raise StageError(
            f"{path}: {what} (expected {expected}); add it, or set bad_masks: skip on this "
            "source to leave such files out (listed in report.json)"
        )
    ctx.notes.ignored.append(f"{path.as_posix()} ({what})")


def load(root: Path, src, ctx: Context) -> list[Record]:
    """Records of every image with its mask, in sorted order (see the module docstring)."""
    policy = getattr(src, "bad_masks", "error")
    layout = find_layout(root)
    records: list[Record] = []
    for split, folder in layout:
        images_dir, masks_dir = _pair_dirs(folder)
        images, masks = _files(images_dir, ctx), _files(masks_dir, ctx)
        by_alt = {k.removesuffix(MASK_SUFFIX): k for k in masks if k.endswith(MASK_SUFFIX)}
        used: set[str] = set()
        for key, image in images.items():
            mask_key = key if key in masks else by_alt.get(key)
            if mask_key is None:
                expected = masks_dir / f"{key}.png"
                _unpaired(ctx, policy, image, "no mask for this image", expected)
                continue
            used.add(mask_key)
            rel = PurePosixPath(split, key) if split else PurePosixPath(key)
            stem = PurePosixPath(key).name
            patient = patient_of(stem)
            if patient is None:
                ctx.notes.unparsed_names.append(f"{rel}{image.suffix}")
                patient = stem
            parent = PurePosixPath(key).parent
            pid = patient if parent == PurePosixPath(".") else f"{parent}/{patient}"
            records.append(
                Record(
                    rel=f"{rel}{image.suffix}",
                    label=LABEL,
                    patient_id=ctx.patient(pid),
                    source_split=split,
                    src=image,
                    mask=masks[mask_key],
                    where=f"{rel}{image.suffix}",
                )
            )
        for key in sorted(set(masks) - used):
            image_key = key if key in images else key.removesuffix(MASK_SUFFIX)
            expected = images_dir / f"{image_key}.png"
            _unpaired(ctx, policy, masks[key], "no image for this mask", expected)
    return records
