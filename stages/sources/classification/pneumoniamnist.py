"""PneumoniaMNIST (MedMNIST v2) npz: keys ``{train,val,test}_{images,labels}``, any subset.

Input: the npz file, or a folder holding one. Labels 0 -> NORMAL, 1 -> PNEUMONIA; each array row
becomes one record (pixels in memory, written as PNG by the intake) under ``<split>/``. The npz
has no patient ids, so every image is its own patient (``pneumoniamnist:train-123``).

With ``path`` null the download stage fetches MedMNIST's own file (``stages.download``'s
``DEFAULT_DOWNLOADS``; unreachable offline, which gives a clear message). Output: the records.

Run: no CLI; the download stage calls ``load``; tested by tests/test_sources.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stages.common.paths import SPLITS
from stages.common.utils import StageError
from stages.sources.base import Context, Record, map_label

LABEL_NAMES = {0: "NORMAL", 1: "PNEUMONIA"}


def find_npz(root: Path) -> Path:
    if root.is_file():
        return root
    found = sorted(p for p in root.rglob("*.npz") if "__MACOSX" not in p.parts)
    named = [p for p in found if "pneumoniamnist" in p.name.lower()]
    pick = named or found
    if len(pick) != 1:
        what = "no .npz file" if not pick else f"several .npz files ({', '.join(map(str, pick))})"
        raise StageError(f"{root}: {what}; point the path at the PneumoniaMNIST npz file itself")
    return pick[0]


def load(root: Path, src, ctx: Context) -> list[Record]:
    npz_path = find_npz(root)
    classes = src.class_map()
    try:
        npz = np.load(npz_path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise StageError(f"{npz_path}: cannot read as a MedMNIST npz ({exc})") from None
    records: list[Record] = []
    with npz:
        present = [s for s in SPLITS if f"{s}_images" in npz.files]
        if not present:
            raise StageError(
                f"{npz_path}: no '<split>_images' arrays (keys: {', '.join(npz.files)}); "
                "expected MedMNIST keys train_images/train_labels, val_*, test_*"
            )
        for split in present:
            if f"{split}_labels" not in npz.files:
                raise StageError(f"{npz_path}: '{split}_images' has no '{split}_labels' array")
            images = npz[f"{split}_images"]
            labels = np.asarray(npz[f"{split}_labels"]).reshape(len(images), -1)
            if labels.shape[1] != 1:
                raise StageError(f"{npz_path}: '{split}_labels' must hold one label per image")
            for i, (img, value) in enumerate(zip(images, labels[:, 0], strict=True)):
                category = LABEL_NAMES.get(int(value))
                if category is None:
                    raise StageError(
                        f"{npz_path}: {split}_labels[{i}] = {value}; PneumoniaMNIST labels are "
                        "0 (normal) and 1 (pneumonia)"
                    )
                label = map_label(category, classes)
                if label is None:
                    ctx.notes.not_selected[category] += 1
                    continue
                records.append(
                    Record(
                        rel=f"{split}/{split}-{i:05d}",
                        label=label,
                        patient_id=ctx.patient(f"{split}-{i}"),
                        source_split=split,
                        pixels=img,
                        where=f"{npz_path.name} {split}_images[{i}]",
                    )
                )
    return records
