"""Where the served models came from, as the page and the predict JSON say it: a real git
repository with DVC experiment refs, internal ones included (``refs/exps/exec/EXEC_HEAD``,
``refs/exps/apply/ORIG_HEAD``, stashes: what ``dvc exp run`` / ``dvc exp apply`` leave behind).

Only real experiment names are shown; a model is traced to its experiment through the md5 in the
experiment's dvc.lock (after ``dvc exp apply`` HEAD is the baseline), or to the checked-out
commit; the data it was trained and tested on come from the cache index, the split or the
model card, and synthetic data are flagged.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from stages.common import paths
from stages.serve import provenance

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
INTERNAL = ("EXEC_HEAD", "EXEC_BASELINE", "ORIG_HEAD", "stash")


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip()


def _lock(model_bytes: bytes) -> str:
    md5 = hashlib.md5(model_bytes, usedforsecurity=False).hexdigest()
    return (
        "schema: '2.0'\nstages:\n  train-detector:\n    cmd: python -m stages.train --task detection\n"
        f"    outs:\n    - path: {paths.DETECTOR_MODEL.as_posix()}\n      hash: md5\n"
        f"      md5: {md5}\n      size: {len(model_bytes)}\n"
    )


BASE, EXP, OTHER = b"baseline weights", b"experiment weights", b"other weights"


@pytest.fixture
def repo(tmp_path) -> dict[str, object]:
    """A baseline commit, two experiment commits under refs/exps and DVC's internal refs."""
    repo = tmp_path / "repo"
    (repo / paths.MODELS).mkdir(parents=True)
    _git(repo, "init", "-q")
    card = repo / paths.DETECTION.report_dir / "model_card.md"
    card.parent.mkdir(parents=True)
    card.write_text("# Model card\n\n## Data\n- Sources: synthetic; cache image size 192 px.\n")
    commits = {}
    for name, weights in (("baseline", BASE), ("exp", EXP), ("other", OTHER)):
        (repo / paths.DVC_LOCK).write_text(_lock(weights))
        (repo / "params.yaml").write_text(f"seed: {len(name)}\n")
        _git(repo, "add", "dvc.lock", "params.yaml", str(card.relative_to(repo)))
        _git(repo, "commit", "-q", "-m", name)
        commits[name] = _git(repo, "rev-parse", "HEAD")
        if name != "baseline":
            _git(repo, "reset", "-q", "--hard", commits["baseline"])
    base = commits["baseline"]
    refs = {
        f"refs/exps/{base[:2]}/{base[2:]}/exp-cheery-moss": commits["exp"],
        f"refs/exps/{base[:2]}/{base[2:]}/exp-other": commits["other"],
        "refs/exps/exec/EXEC_HEAD": commits["exp"],
        "refs/exps/exec/EXEC_BASELINE": base,
        "refs/exps/apply/ORIG_HEAD": base,
        "refs/exps/stash": base,
        "refs/exps/celery/stash": base,
    }
    for ref, sha in refs.items():
        _git(repo, "update-ref", ref, sha)
    return {"root": repo, "commits": commits, "model": repo / paths.DETECTOR_MODEL}


def _check_no_internal_refs(prov: provenance.Provenance) -> None:
    text = prov.markdown()
    for name in INTERNAL:
        assert name not in text
    assert all(name not in e for e in prov.experiments for name in INTERNAL)


def test_after_dvc_exp_apply_the_experiment_is_named(repo):
    """`dvc exp apply`: HEAD stays the baseline, the workspace holds the experiment's lock and
    model (the internal refs point at HEAD: the old page showed `ORIG_HEAD, EXEC_BASELINE`)."""
    root = repo["root"]
    (root / paths.DVC_LOCK).write_text(_lock(EXP))
    repo["model"].write_bytes(EXP)
    prov = provenance.collect([], repo["model"], root=root)
    assert prov.experiments == ["exp-cheery-moss"]
    _check_no_internal_refs(prov)
    (det,) = prov.of("detector")
    assert det.experiment.name == "exp-cheery-moss"
    assert det.experiment.sha == repo["commits"]["exp"]
    assert det.state.startswith("matches dvc.lock")
    record = det.to_json()
    assert record["experiment"] == "exp-cheery-moss"
    assert record["commit"] == repo["commits"]["exp"][:7]
    assert "**DVC experiment:** `exp-cheery-moss`" in prov.markdown()
    assert "DVC experiment `exp-cheery-moss`" in det.markdown()


def test_checked_out_experiment_commit(repo):
    root = repo["root"]
    _git(root, "checkout", "-q", "--detach", repo["commits"]["exp"])
    repo["model"].write_bytes(EXP)
    prov = provenance.collect([], repo["model"], root=root)
    assert prov.experiments == ["exp-cheery-moss"]
    (det,) = prov.of("detector")
    assert det.commit == repo["commits"]["exp"][:7]
    assert det.experiment.name == "exp-cheery-moss"
    _check_no_internal_refs(prov)


def test_baseline_model_is_traced_to_its_commit_not_an_experiment(repo):
    repo["model"].write_bytes(BASE)
    prov = provenance.collect([], repo["model"], root=repo["root"])
    assert prov.experiments == []  # EXEC_BASELINE / ORIG_HEAD / stashes point at HEAD
    _check_no_internal_refs(prov)
    (det,) = prov.of("detector")
    assert det.experiment is None and det.commit == repo["commits"]["baseline"][:7]
    assert f"git commit `{det.commit}`" in det.markdown()


def test_unknown_model_and_synthetic_data_from_the_model_card(repo):
    repo["model"].write_bytes(b"weights nobody recorded")
    prov = provenance.collect([], repo["model"], root=repo["root"])
    (det,) = prov.of("detector")
    assert det.experiment is None and det.commit is None
    assert "no git commit or DVC experiment records this file" in det.markdown()
    assert det.state.startswith("differs from dvc.lock")
    # at the pipeline's model path: its data are the pipeline's (here only the model card)
    assert det.trained_on == {"synthetic": 0} and det.synthetic
    assert "model card" in det.data_from
    assert "SYNTHETIC DATA: the detector was trained and tested on synthetic" in prov.markdown()


def test_cache_index_wins_over_split_and_card(tmp_path):
    task = paths.DETECTION
    for folder, name, source in (
        (task.augment / "fit" / "train", "index.csv", "nih_bbox"),
        (task.augment / "test", "index.csv", "chestxdet10"),
        (task.split, "train.csv", "synthetic"),
    ):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / name).write_text(f"path,source\na.png,{source}\nb.png,{source}\n")
    train, test, where = provenance.task_data(task, tmp_path)
    assert (train, test) == ({"nih_bbox": 2}, {"chestxdet10": 2})
    assert "augment cache index" in where
    assert provenance.describe({"synthetic": 5, "kermany": 2}) == (
        "synthetic phantoms (5 images), kermany (2 images)"
    )


@pytest.mark.parametrize(
    ("ref", "name"),
    [
        ("refs/exps/ab/" + "c" * 38 + "/exp-1", "exp-1"),
        ("refs/exps/exec/EXEC_HEAD", None),
        ("refs/exps/exec/EXEC_BASELINE", None),
        ("refs/exps/apply/ORIG_HEAD", None),
        ("refs/exps/stash", None),
        ("refs/exps/celery/stash", None),
        ("refs/exps/ab/" + "c" * 38, None),  # a baseline without a name
        ("refs/heads/main", None),
    ],
)
def test_experiment_name_of_a_ref(ref, name):
    assert provenance.experiment_name(ref) == name
