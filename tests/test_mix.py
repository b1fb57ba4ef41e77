"""stages.mix: finished classifier runs scored as one model from their committed predictions."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stages.classifier import metrics as M
from stages.classifier.evaluate import predictions_table
from stages.common import paths
from stages.common.utils import StageError
from stages.tools import mix as X
from tests.conftest import REPO
from tests.dvc_helpers import git

CLS = paths.CLASSIFICATION
RULE = {"threshold_method": "specificity", "target_specificity": 0.9}


def _table(split: str, n: int, p: np.ndarray, y: np.ndarray, thr: float) -> str:
    """The table as evaluate@classification writes it (its own writer)."""
    index = pd.DataFrame(
        {
            "path": [f"data/raw/classification/images/k/{split}/{i:03d}.png" for i in range(n)],
            "sha256": [f"{split}{i:061d}" for i in range(n)],
        }
    )
    table = predictions_table(index, np.full(n, "k"), ["NORMAL", "PNEUMONIA"], y, y, p, thr)
    return table.to_csv(index=False)


def _run_files(p_val, p_test, y_val, y_test, rule=RULE, reverse=False) -> dict[str, str]:
    """A run's committed evaluate outputs; ``reverse`` writes its rows in another order."""
    thr = X.threshold_for((rule["threshold_method"], rule.get("target_specificity")), y_val, p_val)
    tables = {}
    for split, p, y in (("val", p_val, y_val), ("test", p_test, y_test)):
        text = _table(split, len(y), p, y, thr)
        if reverse:
            head, *rows = text.splitlines()
            text = "\n".join([head, *rows[::-1]]) + "\n"
        tables[split] = text
    doc = {"classes": ["NORMAL", "PNEUMONIA"], "threshold": thr, **rule}
    return {
        str(CLS.evaluation): json.dumps(doc),
        str(CLS.val_predictions): tables["val"],
        str(CLS.predictions): tables["test"],
    }


def _commit(repo: Path, branch: str, files: dict[str, str]) -> None:
    git(repo, "checkout", "-q", "-B", branch, "base")
    for rel, text in files.items():
        path = repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", branch)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs on one split whose errors differ (independent noise around the labels), so
    that their mean ranks better than each; and a run of another split and of another rule."""
    repo = tmp_path_factory.mktemp("mix") / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "base")
    git(repo, "config", "user.name", "test")
    git(repo, "config", "user.email", "test@example.invalid")
    (repo / "README").write_text("runs\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "base")
    rng = np.random.default_rng(0)
    y = {"val": (rng.random(300) < 0.6).astype(int), "test": (rng.random(200) < 0.6).astype(int)}
    probs = {}
    for k, name in enumerate(("a", "b", "c")):
        probs[name] = {
            s: 1 / (1 + np.exp(-(2.0 * (2 * y[s] - 1) + rng.normal(0, 2.2, y[s].size)))) for s in y
        }
        files = _run_files(probs[name]["val"], probs[name]["test"], y["val"], y["test"])
        if k == 1:  # another row order: runs are matched by image, not by row
            files = _run_files(
                probs[name]["val"], probs[name]["test"], y["val"], y["test"], reverse=True
            )
        _commit(repo, name, files)
    short = {s: v[:-1] for s, v in probs["a"].items()}
    _commit(
        repo, "other-split", _run_files(short["val"], short["test"], y["val"][:-1], y["test"][:-1])
    )
    youden = {"threshold_method": "youden"}
    _commit(
        repo,
        "youden",
        _run_files(probs["a"]["val"], probs["a"]["test"], y["val"], y["test"], youden),
    )
    files = _run_files(probs["c"]["val"], probs["c"]["test"], y["val"], y["test"])
    _commit(repo, "no-val", {k: v for k, v in files.items() if k != str(CLS.val_predictions)})
    return repo, probs, y


def test_the_mix_is_the_mean_probability_scored_at_a_threshold_fitted_on_validation(runs, tmp_path):
    repo, probs, y = runs
    md = X.run_mix(["a", "b", "c"], tmp_path / "mixes", None, repo)
    assert md == tmp_path / "mixes" / "a+b+c.md"
    members, mixed = X.mix([X.read_run(n, repo) for n in ("a", "b", "c")])
    mean = {s: np.mean([probs[n][s] for n in "abc"], axis=0) for s in y}
    order = {s: np.argsort([f"{s}{i:061d}" for i in range(y[s].size)]) for s in y}
    thr = M.specificity_threshold(y["val"], mean["val"], 0.9)
    assert mixed.threshold == pytest.approx(thr)
    assert mixed.test["roc_auc"] == pytest.approx(M.roc_auc(y["test"], mean["test"]))
    expected = M.binary_metrics(y["test"], mean["test"], thr)
    assert mixed.test["accuracy"] == pytest.approx(expected["accuracy"])
    assert mixed.test["specificity"] == pytest.approx(expected["specificity"])
    assert mixed.test["sensitivity"] == pytest.approx(expected["recall"])
    # each run alone scores as its own evaluate did: the same predictions at the same threshold
    for s, name in zip(members, "abc", strict=True):
        assert s.name == name
        assert s.test["roc_auc"] == pytest.approx(M.roc_auc(y["test"], probs[name]["test"]))
        assert np.array_equal(s.y["test"], y["test"][order["test"]])
    # independent errors: the mean ranks better than every run, on validation and on test
    assert mixed.val["roc_auc"] > max(s.val["roc_auc"] for s in members)
    assert mixed.test["roc_auc"] > max(s.test["roc_auc"] for s in members)
    text = md.read_text()
    assert "Validation picks **the mix**" in text
    assert "| `b` |" in text and "| **mix** (mean probability) |" in text
    assert "![ROC curves of the runs and the mix](a+b+c.png)" in text
    assert re.search(r"test \(200 images\): \+0\.\d{4}, 95 % interval \[[-+]0\.\d{4}, \+0\.", text)
    assert (tmp_path / "mixes" / "a+b+c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validation_keeps_the_best_run_when_the_mix_ranks_worse_there(runs, tmp_path):
    repo, probs, y = runs
    # a run that is its own best: mixing it with noise can only lower its validation ROC-AUC
    exact = {s: np.where(y[s] == 1, 0.9, 0.1) for s in y}
    _commit(repo, "perfect", _run_files(exact["val"], exact["test"], y["val"], y["test"]))
    md = X.run_mix(["a", "perfect"], tmp_path, "pair", repo)
    text = md.read_text()
    assert md.name == "pair.md"
    assert "Validation picks **`perfect`**" in text
    assert "ROC-AUC, mix - `perfect`, validation (300 images)" in text


@pytest.mark.parametrize(
    "names, message",
    [
        (["a"], "give at least two runs"),
        (["a", "a"], "a run is given twice"),
        (["a", "other-split"], "scored different val images"),
        (["a", "youden"], "choose their thresholds differently"),
        (["a", "no-val"], "no reports/classifier/val_predictions.csv at"),
        (["a", "nonesuch"], "nonesuch: unknown revision"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, names, message):
    repo, _, _ = runs
    with pytest.raises(StageError, match=message):
        X.run_mix(names, tmp_path / "out", None, repo)
    assert not (tmp_path / "out").exists()


def test_command_line_prints_the_report_path(runs, tmp_path):
    repo, _, _ = runs
    proc = subprocess.run(
        [sys.executable, "-m", "stages.mix", "a", "c", "--out", str(tmp_path), "--repo", str(repo)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "a+c.md")
    proc = subprocess.run(
        [sys.executable, "-m", "stages.mix", "a", "--repo", str(repo)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: give at least two runs to mix"


def test_long_default_names_are_shortened_and_stay_distinct():
    names = [f"ours-kermany-best-with-a-long-name-seed{i}" for i in range(6)]
    a, b = X.default_name(names), X.default_name(names[::-1])
    assert len(a) <= X.MAX_NAME and a.startswith(names[0]) and "+5-more-" in a
    assert a != b
    assert X.default_name(["x", "y"]) == "x+y"
    assert X.default_name(["run/a", "b c"]) == "run_a+b_c"
