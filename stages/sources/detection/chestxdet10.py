"""ChestX-Det10 layout: ``train.json`` / ``test.json`` + the images.

Input: the resolved folder with the JSON files (records ``{file_name, syms, boxes}``, boxes
x1, y1, x2, y2 in pixels) and the images in ``images/``, ``train_data/`` / ``test_data/`` or
the official ``train_data.zip`` / ``test_data.zip`` (extracted into the work dir). Output:
records with source_split = which JSON they came from and their boxes. The synthetic detection
source writes this layout (its records may add ``patient_id``); otherwise each image is its own
patient. An image named in a JSON but absent on disk stops the run, unless the source sets
``missing_images: skip`` (then it is counted and listed in the report).
Run: no CLI; the download stage calls ``load``; tested by tests/test_sources.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from stages.common import fetch
from stages.common.imageio import is_candidate
from stages.common.utils import StageError
from stages.sources.base import Box, Context, Record, find_shallowest, iter_files

OWN_SPLITS = ("train", "test")  # ChestX-Det10 ships no val split


def _has_json(d: Path) -> bool:
    return any((d / f"{s}.json").is_file() for s in OWN_SPLITS)


def image_index(roots: list[Path]) -> dict[str, list[Path]]:
    """Base name -> image files with that name below ``roots`` (junk folders skipped)."""
    index: dict[str, list[Path]] = {}
    for root in roots:
        for path in iter_files(root):
            if is_candidate(path):
                index.setdefault(path.name, []).append(path)
    return index


def pick(candidates: list[Path], split: str) -> Path:
    """Prefer the copy in the split's own folder (``train_data``), then ``images``, then any."""

    def rank(p: Path) -> tuple[int, int, str]:
        parts = {q.lower() for q in p.parts}
        return (
            0 if f"{split}_data" in parts else 1 if "images" in parts else 2,
            len(p.parts),
            str(p),
        )

    return min(candidates, key=rank)


def parse_boxes(rec: object, where: str, fixed: tuple[str, ...] | None) -> tuple[Box, ...]:
    """Validate one JSON record's syms/boxes; StageError naming the record when malformed."""
    if not isinstance(rec, dict) or not isinstance(rec.get("file_name"), str):
        raise StageError(f"{where}: not a record with a 'file_name' string")
    syms, boxes = rec.get("syms", []), rec.get("boxes", [])
    if not isinstance(syms, list) or not isinstance(boxes, list) or len(syms) != len(boxes):
        raise StageError(f"{where}: 'syms' and 'boxes' must be lists of equal length")
    out = []
    for k, (sym, box) in enumerate(zip(syms, boxes, strict=True)):
        if not isinstance(box, list) or len(box) != 4:
            raise StageError(f"{where}: box #{k} must be [x1, y1, x2, y2], got {box!r}")
        try:
            x1, y1, x2, y2 = (float(v) for v in box)
        except (TypeError, ValueError):
            raise StageError(f"{where}: box #{k} has a non-numeric value {box!r}") from None
        if fixed is not None and sym not in fixed:
            raise StageError(
                f"{where}: class {sym!r} of box #{k} is not in the configured classes "
                f"({', '.join(fixed)}); add it to 'classes' or remove the key"
            )
        out.append(Box(str(sym), x1, y1, x2, y2))
    return tuple(out)


def _extract_official_zips(base: Path, ctx: Context) -> list[Path]:
    extra = []
    for split in OWN_SPLITS:
        zipped = base / f"{split}_data.zip"
        if zipped.is_file() and not (base / f"{split}_data").is_dir():
            extra.append(
                fetch.resolve(
                    str(zipped), ctx.work_dir, what="the ChestX-Det10 images", param=ctx.param
                ).path
            )
    return extra


def load(root: Path, src, ctx: Context) -> list[Record]:
    base = find_shallowest(root, _has_json)
    if base is None:
        raise StageError(
            f"{root}: no train.json / test.json found (ChestX-Det10 layout); point the path at "
            "the folder holding them and the images"
        )
    index = image_index([base, *_extract_official_zips(base, ctx)])
    records: list[Record] = []
    used: set[Path] = set()
    for split in OWN_SPLITS:
        json_path = base / f"{split}.json"
        if not json_path.is_file():
            continue
        try:
            data = json.loads(json_path.read_text())
        except (OSError, ValueError) as exc:
            raise StageError(f"{json_path}: not readable JSON ({exc})") from None
        if not isinstance(data, list):
            raise StageError(f"{json_path}: expected a list of records")
        seen: dict[str, int] = {}
        for i, rec in enumerate(data):
            where = f"{json_path.name} record #{i}"
            boxes = parse_boxes(rec, where, src.classes)
            name = rec["file_name"]
            where = f"{where} (file_name {name!r})"
            if name in seen:
                raise StageError(f"{where}: same file_name as record #{seen[name]}")
            seen[name] = i
            ctx.notes.categories.update(b.category for b in boxes)
            found = index.get(Path(name).name)
            if not found:
                ctx.notes.missing_image(src.missing_images, name, where, base)
                continue
            path = pick(found, split)
            used.add(path)
            patient = rec.get("patient_id")
            records.append(
                Record(
                    rel=f"{split}/{Path(name).name}",
                    label="",  # set by the intake from the boxes that survive clipping
                    patient_id=ctx.patient(
                        str(patient) if patient is not None else Path(name).stem
                    ),
                    source_split=split,
                    src=path,
                    boxes=boxes,
                    where=where,
                )
            )
    unused = sorted(p.as_posix() for paths in index.values() for p in paths if p not in used)
    ctx.notes.ignored.extend(unused)  # images without an annotation record
    return records
