"""Kermany 2018 chest X-ray layout: ``[chest_xray/]{train,test,val}/{NORMAL,PNEUMONIA}/*.jpeg``.

Input: the resolved folder (Kaggle or Mendeley archive extracted, or a plain folder; any casing;
only ``train/`` is fine; a folder that directly holds NORMAL/PNEUMONIA works too). Output:
records with the source's split kept, label from the folder (or, with ``classes``, the subtype
classes NORMAL / BACTERIA / VIRUS), patient id and subtype parsed from the file name. The
synthetic classification source writes this same layout and is read by this loader.
Run: no CLI; the download stage calls ``load``; tested by tests/test_sources.py.
"""

from __future__ import annotations

import re
from pathlib import Path

from stages.common.paths import SPLITS
from stages.common.utils import StageError
from stages.sources.base import (
    Context,
    Record,
    child_ci,
    find_shallowest,
    iter_files,
    map_label,
)

# person63_bacteria_306, person1_virus_1_2, person447_virus_921_1 (odd suffixes exist)
_PERSON = re.compile(r"^(person\d+)(?:_(bacteria|virus))?(?:[_\-]\d+)*$", re.IGNORECASE)
# IM-0001-0001, IM-0429-0001-0002, NORMAL2-IM-0588-0001
_IM = re.compile(r"^((?:NORMAL\d*-)?IM-\d+)(?:-\d+)+$", re.IGNORECASE)


def parse_name(filename: str) -> tuple[str | None, str]:
    """(patient id, subtype) from a Kermany file name; (None, "") when it has no known pattern."""
    stem = Path(filename).stem.strip()
    m = _PERSON.match(stem)
    if m:
        return m.group(1).lower(), (m.group(2) or "").lower()
    m = _IM.match(stem)
    if m:
        return m.group(1).upper(), ""
    return None, ""


def _class_dirs(d: Path) -> list[tuple[str, Path]]:
    out = []
    for name in ("NORMAL", "PNEUMONIA"):
        sub = child_ci(d, name)
        if sub is not None:
            out.append((name, sub))
    return out


def _split_dirs(d: Path) -> list[tuple[str, Path]]:
    out = []
    for split in SPLITS:
        sub = child_ci(d, split)
        if sub is not None and _class_dirs(sub):
            out.append((split, sub))
    return out


def find_layout(root: Path) -> list[tuple[str, Path]]:
    """(source split, folder holding NORMAL/PNEUMONIA) pairs of the shallowest Kermany tree."""
    base = find_shallowest(root, lambda d: bool(_split_dirs(d) or _class_dirs(d)))
    if base is None:
        raise StageError(
            f"{root}: no Kermany layout found (expected [chest_xray/]train|val|test/NORMAL|PNEUMONIA"
            "/*.jpeg); point the path at the folder or archive of the chest-xray-pneumonia set"
        )
    splits = _split_dirs(base)
    return splits if splits else [("", base)]


def load(root: Path, src, ctx: Context) -> list[Record]:
    """Records of every file below the class folders (non-images are rejected later, by name)."""
    classes = src.class_map()
    layout = find_layout(root)
    top = layout[0][1].parent if layout[0][0] else layout[0][1]
    class_dirs = [(split, c, d) for split, split_dir in layout for c, d in _class_dirs(split_dir)]
    ctx.walk.claim(d for _, _, d in class_dirs)  # each read at its own place, not through a link
    records: list[Record] = []
    for split, folder_class, class_dir in class_dirs:
        for path in iter_files(class_dir, ctx):
            rel = path.relative_to(top).as_posix()
            patient, subtype = parse_name(path.name)
            if patient is None:
                ctx.notes.unparsed_names.append(rel)
                patient = Path(rel).with_suffix("").as_posix()
            if folder_class == "NORMAL":
                subtype = ""
            category = subtype.upper() if subtype else folder_class
            parents = ("PNEUMONIA",) if folder_class == "PNEUMONIA" else ()
            label = map_label(category, classes, parents)
            if label is None:
                ctx.notes.not_selected[category] += 1
                continue
            records.append(
                Record(
                    rel=rel,
                    label=label,
                    patient_id=ctx.patient(patient),
                    source_split=split,
                    subtype=subtype,
                    src=path,
                    where=rel,
                )
            )
    return records
