"""The benchmarks keep working as the code under them moves.

Speed is bench/'s business and nothing here asserts a timing. What is asserted is that a script
still runs end to end and writes its figures: the classifier scripts' shared Kermany cache (the
real download -> split -> augment stages) and the remote benchmark's copy of the pipeline both
broke once without any test noticing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.imports import REPO
from tests.stage_graph import stage_entries

# The benchmarks read the real data at this path, relative to the repository (bench/README.md).
KERMANY = REPO.parent / "shared" / "data" / "kermany224"


def _remote_pipeline_files() -> list[str]:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import remote_transfer
    finally:
        sys.path.remove(str(REPO / "bench"))
    return remote_transfer.PIPELINE_FILES


def test_remote_benchmark_copies_every_dependency_of_the_data_stages():
    """remote_transfer.py runs the data stages in a copy of the pipeline: every dep they
    declare that is a source file (not another stage's output) must be in that copy."""
    copied = [Path(p) for p in _remote_pipeline_files()]
    outs = [Path(o) for e in stage_entries() for o in e.outs]
    data_stages = [
        e for e in stage_entries() if e.name.split("@")[0] in ("download", "split", "augment")
    ]
    assert {e.name.split("@")[0] for e in data_stages} == {"download", "split", "augment"}
    missing = [
        (e.name, dep)
        for e in data_stages
        for dep in e.deps
        if not any(Path(dep) == p or p in Path(dep).parents for p in [*outs, *copied])
    ]
    assert not missing, f"remote_transfer.PIPELINE_FILES lacks {missing}"


@pytest.mark.slow
def test_recipe_epoch_smoke_run_writes_three_feeds(tmp_path):
    """bench/recipe_epoch.py --quick on a from-scratch recipe (no weights file needed): the
    Kermany cache is built by the real stages, the recipe's params are applied, three feeds timed."""
    if not KERMANY.is_dir():
        pytest.skip(f"{KERMANY} is absent (the benchmarks read the real data there)")
    out = tmp_path / "r.json"
    cmd = [sys.executable, "bench/recipe_epoch.py", "--quick", "--recipe", "seed002-to-be"]
    proc = subprocess.run(
        [*cmd, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert (res["recipe"], res["arch"], res["weights"]) == ("seed002-to-be", "to_be", "none")
    assert res["train_images"] > 100  # 200 images limited, split 80/10/10
    feeds = [r["feed"][:3] for r in res["rows"]]
    assert feeds == ["(a)", "(b)", "(c)"]
    assert all(r["timed_steps"] == 3 and r["images_per_s"] > 0 for r in res["rows"])
    assert res["ratio_aug_vs_floor_s_per_epoch"] > 0 and res["ratio_noaug_vs_floor_s_per_epoch"] > 0
    assert "seed002-to-be: to_be" in proc.stdout


def test_recipe_epoch_without_the_weights_file_stops_before_any_work(tmp_path):
    """ours-kermany-best needs the ImageNet weights file: one line naming the fetch command,
    before the Kermany cache is built or anything is written."""
    out = tmp_path / "r.json"
    env = {**os.environ, "HOME": str(tmp_path), "KERAS_HOME": str(tmp_path / "keras")}
    proc = subprocess.run(
        [sys.executable, "bench/recipe_epoch.py", "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: weights: imagenet needs ")
    assert "python -m stages.weights efficientnet_lite0" in proc.stderr
    assert "Traceback" not in proc.stderr and "building the augment cache" not in proc.stdout
    assert not out.exists()
