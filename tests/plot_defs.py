"""The plots dvc.yaml declares, read as DVC reads them, for the tests of the reports and the page.

No tests here; imported by tests/test_plots.py, tests/test_plots_browser.py and the evaluation
tests (which check that every image a report writes or a model card names is declared).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.conftest import REPO

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg")  # dvc_render's ImageRenderer
_IMAGE_NAME = re.compile(r"[\w./-]+\.(?:png|jpe?g|gif|svg)\b")


@dataclass(frozen=True)
class Plot:
    id: str  # the key in dvc.yaml (a file, or a title with `y:` files)
    files: tuple[str, ...]  # the files it draws
    title: str  # what the page shows above it
    template: str | None  # Vega template; None for an image plot

    @property
    def is_image(self) -> bool:
        return self.template is None


def declared_plots(dvc_yaml: Path = REPO / "dvc.yaml") -> list[Plot]:
    out = []
    for entry in yaml.safe_load(dvc_yaml.read_text())["plots"]:
        (pid, props), = (entry.items() if isinstance(entry, dict) else [(entry, None)])  # fmt: skip
        props = props or {}
        y = props.get("y")
        files = tuple(y) if isinstance(y, dict) else (pid,)
        image = Path(pid).suffix.lower() in IMAGE_SUFFIXES
        template = None if image else props.get("template", "linear")
        out.append(Plot(pid, files, props.get("title", pid), template))
    return out


def stage_plots(dvc_yaml: Path = REPO / "dvc.yaml") -> list[Plot]:
    """The plots a stage declares (``plots:`` inside the stage, foreach expanded): images here,
    drawn on the page after the top-level ones."""
    out = []
    for body in yaml.safe_load(dvc_yaml.read_text())["stages"].values():
        spec = body.get("do", body)
        keys = body.get("foreach", [None])
        for key in keys if isinstance(keys, (list, dict)) else [None]:
            for entry in spec.get("plots", []):
                pid = entry if isinstance(entry, str) else next(iter(entry))
                if key is not None:  # a list's item is its key; a dict's item is a mapping
                    pid = pid.replace("${key}", str(key))
                    if isinstance(keys, list):
                        pid = pid.replace("${item}", str(key))
                out.append(Plot(pid, (pid,), pid, None))
    return out


def declared_images(dvc_yaml: Path = REPO / "dvc.yaml") -> set[str]:
    return {p.id for p in declared_plots(dvc_yaml) if p.is_image}


def image_names(markdown: str) -> set[str]:
    """Every image file name a text mentions (links, inline code, prose alike)."""
    return set(_IMAGE_NAME.findall(markdown))


def undeclared_report_images(written: Path, repo_dir: Path) -> list[str]:
    """Images in the report folder ``written`` (top level) or named by its model card, as repo
    paths under ``repo_dir`` (e.g. reports/classifier), that dvc.yaml does not declare. The
    detector's cases/ folder holds full-size copies of the declared grids: not plots."""
    names = {p.name for p in written.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    card = written / "model_card.md"
    if card.is_file():
        names |= image_names(card.read_text())
    declared = declared_images()
    return sorted(n for n in names if (Path(repo_dir) / n).as_posix() not in declared)


__all__ = [
    "Plot",
    "declared_images",
    "declared_plots",
    "image_names",
    "stage_plots",
    "undeclared_report_images",
]
