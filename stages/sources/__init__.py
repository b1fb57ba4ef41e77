"""Data sources of the download stage: one loader module per on-disk format.

Each loader is ``load(root: Path, source_entry, ctx: Context) -> list[Record]`` (see
``stages.sources.base``). ``synthetic`` has no loader of its own: it writes the Kermany or
ChestX-Det10 layout and is read back by that loader, so real and synthetic data share one path.
"""

from __future__ import annotations

from collections.abc import Callable

from stages.sources import chestxdet10, covid_radiography, folder, kermany, nih_bbox, pneumoniamnist

Loader = Callable[..., list]

LOADERS: dict[str, dict[str, Loader]] = {
    "classification": {
        "synthetic": kermany.load,
        "kermany": kermany.load,
        "pneumoniamnist": pneumoniamnist.load,
        "covid_radiography": covid_radiography.load,
        "folder": folder.load,
    },
    "detection": {
        "synthetic": chestxdet10.load,
        "chestxdet10": chestxdet10.load,
        "nih_bbox": nih_bbox.load,
    },
}

__all__ = ["LOADERS"]
