"""`dvc exp show` reads: after `dvc repro` and a few experiments (an ablation grid, a learning-rate
change), the plain CSV has at most 60 columns; at 160 columns `--only-changed` shows every test
figure and the param that changed, unfolded; `python -m stages.compare` shows the same at 120.

The experiments are recorded with `dvc exp save` in a repository holding this project's real
dvc.yaml and params.yaml, with headline metric files written by the evaluate code's own
``headline`` functions (every key, varying figures), so DVC sees the real columns without a
training run: the column set is decided by dvc.yaml, params.yaml and the metric keys.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from stages.common import paths
from stages.tools import experiments as X
from stages.tools.param_table import load_stages
from tests.conftest import REPO
from tests.dvc_helpers import BIN, dvc, git, init_repo, tool_env

pytestmark = pytest.mark.slow  # a dozen dvc commands, ~30 s
FIGURES = {"accuracy", "roc_auc", "specificity", "map", "map_50", "froc"}


def _figures(i: int) -> dict[str, dict]:
    """Headline metrics of run ``i`` through the evaluate code's own headline functions."""
    from stages.classifier.evaluate import headline as cls_headline
    from stages.detector.evaluate import headline as det_headline

    cls = {"accuracy": 0.80 + i / 97, "roc_auc": 0.90 + i / 201, "specificity": 0.6 + i / 53}
    cls["recall"] = 0.7 + i / 89
    det = {"map": 0.20 + i / 301, "map_50": 0.6 + i / 211, "froc_avg_recall": 0.5 + i / 131}
    return {
        paths.CLASSIFICATION.metrics.as_posix(): cls_headline(cls),
        paths.DETECTION.metrics.as_posix(): det_headline(det),
    }


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("expshow") / "repo"
    root.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy2(REPO / name, root / name)
    shutil.copytree(REPO / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "data" / "inputs").mkdir(parents=True)
    stages = load_stages(root / "dvc.yaml").values()
    for out in {p for s in stages for p in (*s.outs, *s.deps)}:  # placeholders: exp save hashes
        path = root / out
        if not path.exists():
            if Path(out).suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}")
            else:
                path.mkdir(parents=True, exist_ok=True)
                (path / "placeholder").write_text("")
    init_repo(root)
    params = yaml.safe_load((root / "params.yaml").read_text())

    def save(i: int, name: str | None, overrides: list[str]) -> None:
        doc = X.apply_overrides(params, overrides)
        (root / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        for path, figures in _figures(i).items():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(json.dumps(figures))
        if name is None:
            git(root, "add", "-A")
            git(root, "commit", "-qm", "baseline")
        else:
            dvc(root, "exp", "save", "-n", name, "-f")
            git(root, "checkout", "--", ".")

    save(0, None, [])
    save(1, "lr-high", ["train_classifier.learning_rate=0.01"])
    for j, epochs in enumerate((5, 30), 2):  # an ablation grid
        save(j, f"epochs-{epochs}", [f"train_classifier.epochs={epochs}"])
    return root


def _exp_show(repo: Path, *args: str, columns: int) -> str:
    env = {**tool_env(), "COLUMNS": str(columns), "TERM": "dumb"}
    proc = subprocess.run(
        [str(BIN / "dvc"), "exp", "show", "--no-pager", *args],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    return re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)


def test_plain_csv_has_at_most_60_columns(repo: Path) -> None:
    header = next(csv.reader(io.StringIO(_exp_show(repo, "--csv", columns=160))))
    assert len(header) <= 60, (len(header), header)
    assert set(header) >= FIGURES, set(header)
    assert not [h for h in header if ":" in h], "a metric name repeats across metric files"


def test_only_changed_at_160_columns_shows_the_figures_and_the_changed_param(repo: Path) -> None:
    text = _exp_show(repo, "--only-changed", columns=160)
    lines = text.splitlines()
    assert all(len(line) <= 160 for line in lines), text
    header = next(line for line in lines if "Experiment" in line)
    for name in ("accuracy", "roc_auc", "specificity", "map", "map_50", "froc"):
        assert re.search(rf"\b{name}\b", header), (name, text)
    for name in ("learning_rate", "epochs"):  # the changed params, named in full
        assert re.search(rf"train_classifier\.{name}\b", header), (name, text)
    for name in ("lr-high", "epochs-5", "epochs-30"):
        assert name in text


def test_compare_shows_the_same_at_120_columns(repo: Path) -> None:
    proc = subprocess.run(
        [str(BIN / "python"), "-m", "stages.compare", "--width", "120"],
        cwd=repo, env=tool_env(), capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    lines = proc.stdout.splitlines()
    assert all(len(line) <= 120 for line in lines), proc.stdout
    head = lines[0].split()
    assert {"acc", "auc", "spec", "mAP", "mAP50", "FROC", "learning_rate", "epochs"} <= set(head)
    assert "also changed" not in proc.stdout
    row = next(line for line in lines if line.strip().startswith("lr-high"))
    assert "0.01" in row.split()
