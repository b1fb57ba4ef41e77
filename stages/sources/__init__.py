"""Data sources of the download stage: one loader module per on-disk format.

Each loader is ``load(root: Path, source_entry, ctx: Context) -> list[Record]`` (see
``stages.sources.base``). ``synthetic`` has no loader of its own: it writes the Kermany,
ChestX-Det10 or lung_masks layout and is read back by that loader, so real and synthetic data
share one path.

``LOADERS`` names modules rather than importing them: ``loader()`` imports only the loaders of
the task being run, so each chain's download stage depends on its own loaders alone (dvc.yaml).
Inputs/Outputs: none (the loader table).
Run: no CLI; used by ``stages.download``, tested by tests/test_sources.py.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

Loader = Callable[..., list]

LOADERS: dict[str, dict[str, str]] = {
    "classification": {
        "synthetic": "stages.sources.classification.kermany",
        "kermany": "stages.sources.classification.kermany",
        "pneumoniamnist": "stages.sources.classification.pneumoniamnist",
        "covid_radiography": "stages.sources.classification.covid_radiography",
        "folder": "stages.sources.classification.folder",
    },
    "detection": {
        "synthetic": "stages.sources.detection.chestxdet10",
        "chestxdet10": "stages.sources.detection.chestxdet10",
        "nih_bbox": "stages.sources.detection.nih_bbox",
    },
    "segmentation": {
        "synthetic": "stages.sources.segmentation.lung_masks",
        "lung_masks": "stages.sources.segmentation.lung_masks",
    },
}


def loader(task: str, name: str) -> Loader:
    """The ``load`` function of source ``name`` for ``task``."""
    return importlib.import_module(LOADERS[task][name]).load


__all__ = ["LOADERS", "loader"]
