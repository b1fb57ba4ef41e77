"""End to end through DVC itself: a private copy of the session's tiny pipeline (a temporary
git+DVC copy of this repository, built once by tests/dvc_helpers.py).

Checks what users rely on: `dvc repro` built everything, a second `dvc repro` runs nothing, the
task chains never invalidate each other, the run cache restores a configuration run before (in
a fresh clone too), `dvc exp run -S` re-runs only the stages that read the changed key, and
`dvc exp show` is readable: its columns are the few params and the test figures, which a
160-column terminal never folds.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.dvc_helpers import (
    BIN,
    changed_stages,
    dvc,
    experiment_metrics,
    experiment_repo,
    git,
    ran_stages,
    tool_env,
)

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
FIGURES = {"accuracy", "roc_auc", "specificity", "cam_in_lungs", "map", "map_50", "froc"}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A private copy of the session's built pipeline with its one experiment (`asis`) run in the
    workspace (these tests run more experiments in it)."""
    src = experiment_repo(tmp_path_factory).path
    work = tmp_path_factory.mktemp("pipeline") / "repo"
    shutil.copytree(src, work, symlinks=True)
    return work


def test_repro_builds_every_output(built: Path) -> None:
    for path in [
        "data/raw/classification/manifest.csv",
        "data/split/detection/test.json",
        "data/augment/classification/fit/meta.json",
        "data/augment/classification/test/images.npy",
        "models/classifier.keras",
        "models/detector.pt",
        "reports/augment/detection_preview.png",
        "reports/params/resolved.json",
        "reports/split/classification.json",
        "reports/live/classifier/training.json",
    ]:
        assert (built / path).exists(), path
    cls = json.loads((built / "metrics/classifier.json").read_text())
    det = json.loads((built / "metrics/detector.json").read_text())
    assert set(cls) == {"accuracy", "roc_auc", "specificity", "cam_in_lungs"}
    assert all(0.0 <= v <= 1.0 for v in cls.values())
    assert set(det) == {"map", "map_50", "froc"}
    seg = json.loads((built / "metrics/segmenter.json").read_text())
    assert set(seg) == {"n_test", "dice", "iou", "hd95"} and 0.0 <= seg["dice"] <= 1.0
    # What `dvc metrics show` compares: the test figures of each task, each name once.
    shown = json.loads(dvc(built, "metrics", "show", "--json"))
    files = {path for entry in shown.values() for path in entry.get("data", {})}
    assert files == {f"metrics/{m}.json" for m in ("classifier", "detector", "segmenter")}


def test_second_repro_runs_nothing(built: Path) -> None:
    out = dvc(built, "repro")
    assert ran_stages(out) == set(), out
    assert "changed" not in dvc(built, "status")


def _set_param(repo: Path, dotted: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    node = params
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
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
        (  # lungs: none, so the segmenter's change reaches classification's lungs meter only
            "augment.segmentation.image_size",
            48,
            {
                "augment@segmentation",
                "train-segmenter",
                "evaluate@segmentation",
                "lungs@classification",
                "evaluate@classification",
            },
        ),  # fmt: skip
    ],
)
def test_param_change_reruns_only_its_chain(built: Path, key, value, expected) -> None:
    before = (built / "params.yaml").read_text()
    try:
        _set_param(built, key, value)
        changed = changed_stages(built) - {"check-params"}  # it reads every section
        assert changed <= expected and changed, (key, changed)
        other = DET_STAGES if expected & CLS_STAGES else CLS_STAGES
        assert not changed & other
    finally:
        (built / "params.yaml").write_text(before)


def test_exp_run_as_is_reruns_only_classifier_and_reports_metrics(
    built: Path, tmp_path_factory
) -> None:
    ran = ran_stages(experiment_repo(tmp_path_factory).output) - {"check-params"}
    assert ran == {"train-classifier", "evaluate@classification"}, ran
    shown = json.loads(dvc(built, "exp", "show", "--json"))
    assert '"asis"' in json.dumps(shown)
    found = experiment_metrics(shown, "asis")
    assert 0.0 <= found["accuracy"] <= 1.0 and 0.0 <= found["roc_auc"] <= 1.0
    params = yaml.safe_load((built / "params.yaml").read_text())["train_classifier"]
    assert (params["arch"], params["head"]["units"]) == ("as_is", 2)  # the ++ keys reached it


def test_a_fresh_clone_restores_from_the_run_cache_in_experiments(built, tmp_path) -> None:
    """A configuration run once is restored, not recomputed, when it comes back (a queued
    seed, a teammate after `dvc pull --run-cache`): augment, training and the lungs meter keep
    run-cache records (no untracked plain output, no persist). Here in a fresh clone, which has
    the commit's dvc.lock and none of its outputs in the cache: of two experiments sharing a
    segmenter (each in a temporary copy, as queued ones run), the first trains it and the second
    restores augment, train-segmenter and lungs@classification and goes on. DVC stopped there
    ("failed to load directory") while train-segmenter depended on a folder inside augment's
    output (tests/test_layout.py keeps every dep a whole output)."""
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(built), str(clone))
    assert not (clone / ".dvc" / "cache").exists()
    size = yaml.safe_load((built / "params.yaml").read_text())["augment"]["segmentation"]
    shared = ["-S", f"augment.segmentation.image_size={size['image_size'] + 16}"]
    restored = {"augment@segmentation", "train-segmenter", "lungs@classification"}
    outs = {}
    for name, seed in (("first", 1), ("second", 2)):
        argv = ["exp", "run", "--temp", "-n", name, *shared]
        outs[name] = dvc(clone, *argv, "-S", f"++evaluate.segmentation.seed={seed}",
                         "evaluate@segmentation", "lungs@classification")  # fmt: skip
    assert restored <= ran_stages(outs["first"]), outs["first"][-3000:]
    # lungs: none, so a new segmenter re-runs no classification training
    assert not ran_stages(outs["first"]) & {"augment@classification", "train-classifier"}
    cached = set(re.findall(r"Stage '([^']+)' is cached - skipping run", outs["second"]))
    assert restored <= cached, outs["second"][-3000:]
    assert not ran_stages(outs["second"]) & cached, outs["second"][-3000:]
    assert "evaluate@segmentation" in ran_stages(outs["second"])
    shown = json.loads(dvc(clone, "exp", "show", "--json"))
    first = experiment_metrics(shown, "first", "metrics/segmenter.json")
    second = experiment_metrics(shown, "second", "metrics/segmenter.json")
    assert 0.0 <= second["dice"] <= 1.0
    assert second["dice"] == first["dice"]  # the same restored segmenter, scored again


def test_bad_value_stops_before_any_output_is_removed(built: Path) -> None:
    """check-params runs first: a wrong value fails the run with one line, and every output of
    the workspace (models, metrics, reports) is still there, unchanged."""
    keep = ["models/classifier.keras", "metrics/classifier.json", "reports/classifier"]
    keep += ["reports/live/classifier/training.json", "models/detector.pt"]
    before = {p: _digest(built / p) for p in keep}
    for override in ("++evaluate.classification.tta=unknown", "train_classifier.epochs=-3"):
        proc = subprocess.run(
            [str(BIN / "dvc"), "exp", "run", "-S", override],
            cwd=built, env=tool_env(), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, out[-2000:]
        assert "check-params" in out and re.search(r"error: .*(tta|epochs)", out), out[-2000:]
        assert {p: _digest(built / p) for p in keep} == before, override
        git(built, "checkout", "--", "params.yaml")


def _digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            h.update(f.relative_to(path if path.is_dir() else path.parent).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()
