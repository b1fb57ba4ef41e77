"""COVID-19 Radiography Database layout: ``COVID/``, ``Normal/``, ``Viral Pneumonia/``,
``Lung_Opacity/``, each holding ``images/`` (the Kaggle v4 release, next to ``masks/``) or the
image files directly.

Input: the resolved folder (possibly wrapped in one top folder); any subset of the class folders.
Output: records labelled by the ``classes`` mapping (default COVID -> COVID, Normal -> NORMAL,
Viral Pneumonia -> VIRUS, Lung_Opacity -> LUNG_OPACITY: NORMAL and VIRUS share Kermany's
vocabulary so the sets merge). The database has no patient ids: each file is its own patient
(``covid_radiography:COVID-12``), which is why its near-duplicate repeat studies are only caught
when they are exact (same pixels) by the split's duplicate grouping.
Run: no CLI; the download stage calls ``load``; tested by tests/test_sources.py.
"""

from __future__ import annotations

from pathlib import Path

from stages.common.utils import StageError
from stages.sources.base import (
    Context,
    Record,
    child_ci,
    find_shallowest,
    iter_dirs,
    iter_files,
    norm_key,
)
from stages.sources.config import CATEGORIES

SUBTYPES = {"COVID": "covid", "VIRAL_PNEUMONIA": "virus"}


def _class_dirs(d: Path) -> list[tuple[str, Path]]:
    allowed = CATEGORIES["covid_radiography"]
    return [(norm_key(c.name), c) for c in iter_dirs(d) if norm_key(c.name) in allowed]


def load(root: Path, src, ctx: Context) -> list[Record]:
    classes = src.class_map()
    base = find_shallowest(root, lambda d: bool(_class_dirs(d)))
    if base is None:
        raise StageError(
            f"{root}: no COVID-19 Radiography class folder found (expected COVID/, Normal/, "
            "Viral Pneumonia/ or Lung_Opacity/); point the path at the database folder"
        )
    records: list[Record] = []
    for category, class_dir in _class_dirs(base):
        images = child_ci(class_dir, "images")
        if images is not None:
            ctx.notes.ignored.extend(
                d.as_posix()
                for d in iter_dirs(class_dir)
                if d != images  # e.g. masks/
            )
            files = list(iter_files(images, ctx, recursive=False))
        else:
            files = list(iter_files(class_dir, ctx, recursive=False))
            ctx.notes.ignored.extend(d.as_posix() for d in iter_dirs(class_dir))
        label = classes.get(category)
        if label is None:
            ctx.notes.not_selected[category] += len(files)
            continue
        for path in files:
            rel = path.relative_to(base).as_posix()
            records.append(
                Record(
                    rel=rel,
                    label=label,
                    patient_id=ctx.patient(path.stem),
                    subtype=SUBTYPES.get(category, ""),
                    src=path,
                    where=rel,
                )
            )
    return records
