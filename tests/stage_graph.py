"""dvc.yaml's stages with foreach expanded (``name@key``), read the way DVC names them."""

from __future__ import annotations

from stages.tools.param_table import Stage, load_stages
from tests.imports import REPO


def stage_entries() -> list[Stage]:
    return list(load_stages(REPO / "dvc.yaml").values())
