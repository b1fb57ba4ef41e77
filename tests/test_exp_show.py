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
FIGURES = {"accuracy", "roc_auc", "specificity", "cam_in_lungs", "map", "map_50", "froc"}


def _figures(cls_run: int = 0, det_run: int = 0) -> dict[str, dict]:
    """Headline metrics through the evaluate code's own headline functions: the classifier's
    figures of classifier run ``cls_run``, the detector's of detector run ``det_run`` (an
    experiment that trains one model leaves the other's figures as they were)."""
    from stages.classifier.evaluate import headline as cls_headline
    from stages.detector.evaluate import headline as det_headline

    i, j = cls_run, det_run
    cls = {"accuracy": 0.80 + i / 97, "roc_auc": 0.90 + i / 201, "specificity": 0.6 + i / 53}
    cls |= {"recall": 0.7 + i / 89, "cam_in_lungs": {"all": 0.4 + i / 41}}
    det = {"map": 0.20 + j / 301, "map_50": 0.6 + j / 211, "froc_avg_recall": 0.5 + j / 131}
    return {
        paths.CLASSIFICATION.metrics.as_posix(): cls_headline(cls),
        paths.DETECTION.metrics.as_posix(): det_headline(det),
    }


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """HEAD: `dvc repro`'s baseline with three classifier experiments (a learning-rate change,
    an epochs grid); its parent commit: the same baseline with one detector experiment."""
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

    def save(name: str | None, overrides: list[str], cls_run: int = 0, det_run: int = 0) -> None:
        doc = X.apply_overrides(params, overrides)
        (root / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        for path, figures in _figures(cls_run, det_run).items():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(json.dumps(figures))
        if name is None:  # the baseline as after `dvc repro`: its dvc.lock records every stage
            dvc(root, "commit", "-f", "-q")
            git(root, "add", "-A")
            git(root, "commit", "-qm", "baseline")
        else:
            dvc(root, "exp", "save", "-n", name, "-f")
            git(root, "checkout", "--", ".")

    save(None, [])
    save("det-epochs-8", ["train_detector.epochs=8"], det_run=1)
    git(root, "commit", "-q", "--allow-empty", "-m", "the next baseline")
    save("lr-high", ["train_classifier.learning_rate=0.01"], cls_run=1)
    for j, epochs in enumerate((5, 30), 2):  # an ablation grid
        save(f"epochs-{epochs}", [f"train_classifier.epochs={epochs}"], cls_run=j)
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
    for name in ("accuracy", "roc_auc", "specificity", "cam_in_lungs"):
        assert re.search(rf"\b{name}\b", header), (name, text)
    for name in ("learning_rate", "epochs"):  # the changed params, named in full
        assert re.search(rf"train_classifier\.{name}\b", header), (name, text)
    for name in ("lr-high", "epochs-5", "epochs-30"):
        assert name in text
    assert not re.search(r"\bmap\b", header), "the detector's unchanged figures are left out"


def test_only_changed_shows_a_detector_rows_figures(repo: Path) -> None:
    parent = git(repo, "rev-parse", "HEAD~1").strip()
    text = _exp_show(repo, "--only-changed", "--rev", parent, columns=160)
    header = next(line for line in text.splitlines() if "Experiment" in line)
    for name in ("map", "map_50", "froc", r"train_detector\.epochs"):
        assert re.search(rf"\b{name}\b", header), (name, text)
    assert "det-epochs-8" in text and not re.search(r"\baccuracy\b", header)


def _compare(repo: Path, *args: str) -> list[str]:
    proc = subprocess.run(
        [str(BIN / "python"), "-m", "stages.compare", "--width", "120", *args],
        cwd=repo, env=tool_env(), capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    lines = proc.stdout.splitlines()
    assert all(len(line) <= 120 for line in lines), proc.stdout
    assert "also changed" not in proc.stdout
    return lines


def test_compare_shows_the_same_at_120_columns(repo: Path) -> None:
    lines = _compare(repo)
    head = lines[0].split()
    assert {"acc", "auc", "spec", "cam", "learning_rate", "epochs"} <= set(head), lines
    assert "mAP" not in head  # no detector row here: its figures are all equal
    row = next(line for line in lines if line.strip().startswith("lr-high"))
    assert "0.01" in row.split()
    parent = git(repo, "rev-parse", "HEAD~1").strip()
    head = _compare(repo, "--rev", parent)[0].split()
    assert {"mAP", "mAP50", "FROC", "epochs"} <= set(head) and "acc" not in head
