"""NIH ChestX-ray14 boxes: ``BBox_List_2017.csv`` + the images (``images/`` or ``images_001/images/``).

Input: the resolved folder (or the CSV itself, images beside it). The CSV's header is irregular
(``Bbox [x,y,w,h]`` spread over several columns, trailing empty columns), so rows are read by
position: image name, finding label, then the first four numbers (x, y, w, h). Output: one record
per image with its boxes converted to x1, y1, x2, y2; patient from the file name
(``00013118_008.png`` -> ``nih:00013118``); no source split. Images listed but absent follow the
``missing_images`` option (error / skip), as for ChestX-Det10.
Run: no CLI; the download stage calls ``load``; tested by tests/test_sources.py.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from stages.common.utils import StageError
from stages.sources.base import Box, Context, Record, find_shallowest
from stages.sources.detection.chestxdet10 import image_index

_PATIENT = re.compile(r"^(\d+)_\d+$")


def _find_csv(d: Path) -> Path | None:
    hits = sorted(p for p in d.iterdir() if p.is_file() and re.match(r"bbox.*\.csv$", p.name, re.I))
    return hits[0] if hits else None


def read_boxes(csv_path: Path, fixed: tuple[str, ...] | None) -> dict[str, list[Box]]:
    """Image name -> boxes (x1, y1, x2, y2), in file order; StageError naming a bad line."""
    out: dict[str, list[Box]] = {}
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        for lineno, row in enumerate(csv.reader(fh), start=1):
            cells = [c.strip() for c in row]
            if not any(cells) or (lineno == 1 and cells[0].lower().startswith("image")):
                continue
            where = f"{csv_path.name} line {lineno}"
            if len(cells) < 3 or not cells[0] or not cells[1]:
                raise StageError(f"{where}: expected 'image, finding, x, y, w, h', got {row!r}")
            numbers = [c.strip("[]") for c in cells[2:] if c.strip("[]")]
            if len(numbers) < 4:
                raise StageError(f"{where}: expected 4 box values x, y, w, h, got {numbers!r}")
            try:
                x, y, w, h = (float(v) for v in numbers[:4])
            except ValueError:
                raise StageError(
                    f"{where}: box values must be numbers, got {numbers[:4]!r}"
                ) from None
            name, finding = cells[0], cells[1]
            if fixed is not None and finding not in fixed:
                raise StageError(
                    f"{where} ({name}): class {finding!r} is not in the configured classes "
                    f"({', '.join(fixed)}); add it to 'classes' or remove the key"
                )
            out.setdefault(name, []).append(Box(finding, x, y, x + w, y + h))
    return out


def load(root: Path, src, ctx: Context) -> list[Record]:
    if root.is_file():
        csv_path, base = root, root.parent
    else:
        base = find_shallowest(root, lambda d: _find_csv(d) is not None)
        if base is None:
            raise StageError(f"{root}: no BBox_List_2017.csv found; point the path at its folder")
        csv_path = _find_csv(base)
    boxes_by_image = read_boxes(csv_path, src.classes)
    index = image_index([base])
    records: list[Record] = []
    used: set[Path] = set()
    for name, boxes in boxes_by_image.items():
        ctx.notes.categories.update(b.category for b in boxes)
        found = index.get(name)
        where = f"{csv_path.name} rows of {name}"
        if not found:
            ctx.notes.missing_image(src.missing_images, name, where, base)
            continue
        path = min(found, key=lambda p: (len(p.parts), str(p)))
        used.add(path)
        m = _PATIENT.match(Path(name).stem)
        records.append(
            Record(
                rel=path.relative_to(base).as_posix(),
                label="",
                patient_id=ctx.patient(m.group(1) if m else Path(name).stem),
                src=path,
                boxes=tuple(boxes),
                where=where,
            )
        )
    ctx.notes.ignored.extend(
        sorted(p.as_posix() for paths in index.values() for p in paths if p not in used)
    )
    return records
