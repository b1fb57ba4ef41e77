"""End to end through DVC itself: a temporary git+DVC copy of this repository with tiny params.

Checks what users rely on: `dvc repro` builds everything, a second `dvc repro` runs nothing, the
classification and detection chains never invalidate each other, and `dvc exp run -S` re-runs only
the stages that read the changed key, with metrics readable from `dvc exp show --json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.dvc_helpers import dvc, experiment_metrics, git, make_repo, ran_stages

pytestmark = pytest.mark.slow

CLS_STAGES = {
    "download@classification",
    "split@classification",
    "augment@classification",
    "train-classifier",
    "evaluate@classification",
}
DET_STAGES = {
    "download@detection",
    "split@detection",
    "augment@detection",
    "train-detector",
    "evaluate@detection",
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("cxr_repo"))


@pytest.fixture(scope="module")
def built(repo: Path) -> Path:
    out = dvc(repo, "repro")
    assert ran_stages(out) == CLS_STAGES | DET_STAGES, out[-3000:]
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "baseline")
    return repo


def test_repro_builds_every_output(built: Path) -> None:
    for path in [
        "data/raw/classification/manifest.csv",
        "data/split/detection/test.json",
        "data/augment/classification/meta.json",
        "models/classifier.keras",
        "models/detector.pt",
        "reports/augment/detection_preview.png",
    ]:
        assert (built / path).exists(), path
    cls = json.loads((built / "metrics/classifier.json").read_text())
    det = json.loads((built / "metrics/detector.json").read_text())
    for key in ("accuracy", "roc_auc", "precision", "recall", "specificity", "f1"):
        assert 0.0 <= cls[key] <= 1.0, key
    for key in ("map", "map_50", "froc_avg_recall", "n_test_images"):
        assert key in det, key
    assert {k for k in det if k.startswith("ap50_")} == {
        "ap50_Consolidation", "ap50_Effusion", "ap50_Mass", "ap50_Nodule"
    }  # fmt: skip
    # What `dvc metrics show` compares: few flat values, no duplicates of dvclive's summaries.
    shown = json.loads(dvc(built, "metrics", "show", "--json"))
    values = {}
    for entry in shown.values():
        for path, doc in entry.get("data", {}).items():
            for key, value in doc.get("data", {}).items():
                assert not isinstance(value, dict | list), (path, key)
                assert "." not in key, (path, key)
                values[(path, key)] = value
    assert 30 <= len(values) <= 60, sorted(values)
    assert not any("live" in path for path, _ in values)


def test_second_repro_runs_nothing(built: Path) -> None:
    out = dvc(built, "repro")
    assert ran_stages(out) == set(), out
    assert "changed" not in dvc(built, "status")


def _set_param(repo: Path, dotted: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    node = params
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        (
            "split.detection.seed",
            7,
            {"split@detection", "augment@detection", "train-detector", "evaluate@detection"},
        ),
        (
            "augment.classification.policy.rotation",
            5.0,
            {"augment@classification", "train-classifier", "evaluate@classification"},
        ),
        ("evaluate.detection.score_thresh", 0.4, {"evaluate@detection"}),
    ],
)
def test_param_change_reruns_only_its_chain(built: Path, key, value, expected) -> None:
    before = (built / "params.yaml").read_text()
    try:
        _set_param(built, key, value)
        status = dvc(built, "status", "--json")
        changed = set(json.loads(status))
        assert changed <= expected and changed, (key, changed)
        other = DET_STAGES if expected & CLS_STAGES else CLS_STAGES
        assert not changed & other
    finally:
        (built / "params.yaml").write_text(before)


def test_exp_run_as_is_reruns_only_classifier_and_reports_metrics(built: Path) -> None:
    out = dvc(
        built,
        "exp",
        "run",
        "-n",
        "asis",
        "-S",
        "train_classifier.arch=as_is",
        "-S",
        "train_classifier.head.activation=softmax",
        "-S",
        "train_classifier.head.units=2",
        "-S",
        "train_classifier.loss=categorical_crossentropy",
    )
    assert ran_stages(out) == {"train-classifier", "evaluate@classification"}, out[-3000:]
    shown = json.loads(dvc(built, "exp", "show", "--json"))
    text = json.dumps(shown)
    assert '"asis"' in text
    found = experiment_metrics(shown, "asis")
    assert 0.0 <= found["accuracy"] <= 1.0 and 0.0 <= found["roc_auc"] <= 1.0
