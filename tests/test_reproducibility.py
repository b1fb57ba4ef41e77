"""Reproducibility as a checked property of the pipeline.

- Same params and seeds: byte-identical raw data, split csv/json and augment cache (the data
  stages run twice into two folders).
- Two trainings of the classifier with the same params: validation accuracy within 0.5 %.
- `dvc status` is clean right after `dvc repro`; no stage writes outside its declared outputs
  (workspace snapshot around each `dvc repro -s <stage>` of the shared tiny build).
- The params -> stages table (`python -m stages.param_table`) matches DVC's own view of dvc.yaml
  and what `dvc status` reports after a change of each params section, and docs/reproducibility.md
  carries the current table.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from stages.common.utils import read_json
from stages.tools.param_table import load_stages, param_rows
from tests.conftest import REPO
from tests.dvc_helpers import (
    BIN,
    Built,
    built_repo,
    changed_stages,
    dvc,
    status_clean,
    tool_env,
    tree_digest,
)

DATA_OUTPUTS = ["data/raw", "data/split", "data/augment", "metrics", "reports/augment"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    return built_repo(tmp_path_factory)


def run_module(module: str, cwd: Path, *args: str, timeout: float = 600) -> None:
    proc = subprocess.run(
        [str(BIN / "python"), "-m", module, *args],
        cwd=cwd,
        env={**tool_env(), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{module} {args} failed:\n{proc.stderr[-3000:]}"


def normalised_digest(root: Path) -> dict[str, str]:
    digests = tree_digest(root, DATA_OUTPUTS)
    for path in digests:
        if path.endswith("report.json"):
            # download's report names the synthetic source's temporary folder (synth-<random>):
            # bookkeeping, not data; masked so the check covers everything else byte for byte.
            text = re.sub(r"synth-[A-Za-z0-9_]+", "synth-*", (root / path).read_text())
            digests[path] = hashlib.sha256(text.encode()).hexdigest()
    return digests


@pytest.mark.slow
def test_data_stages_are_byte_identical(tmp_path: Path, tiny_params: dict, monkeypatch) -> None:
    from stages import augment, download, split

    digests = []
    for run in ("a", "b"):
        work = tmp_path / run
        work.mkdir()
        (work / "params.yaml").write_text(yaml.safe_dump(tiny_params, sort_keys=False))
        monkeypatch.chdir(work)  # stages use paths relative to the repository root
        for stage in (download, split, augment):
            for task in ("classification", "detection"):
                stage.main(["--task", task])
        digests.append(normalised_digest(work))
    a, b = digests
    assert any(p.endswith("images.npy") for p in a) and any(p.endswith("train.csv") for p in a)
    differing = sorted(p for p in a.keys() | b.keys() if a.get(p) != b.get(p))
    assert not differing, differing


@pytest.mark.slow
def test_classifier_retrained_within_half_a_percent(built: Built, tmp_path: Path) -> None:
    """A second training, same params and cache, outside DVC: same validation figures."""
    first = read_json(built.path / "reports/live/classifier/training.json")
    metrics = tmp_path / "training.json"
    run_module(
        "stages.train",
        tmp_path,  # outside any repository: dvclive probes the cwd's git/DVC repo
        "--task",
        "classification",
        "--params",
        str(built.path / "params.yaml"),
        "--cache-dir",
        str(built.path / "data/augment/classification"),
        "--model",
        str(tmp_path / "classifier.keras"),
        "--summary",
        str(metrics),
        "--live-dir",
        str(tmp_path / "live"),
    )
    second = read_json(metrics)
    assert abs(second["val_accuracy"] - first["val_accuracy"]) <= 0.005, (first, second)
    # Deterministic kernels and seeded pipelines (stages.common.utils.seed_everything): same losses too.
    assert second["val_loss"] == pytest.approx(first["val_loss"], rel=1e-5, abs=1e-6)
    assert second["train_loss"] == pytest.approx(first["train_loss"], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_status_clean_after_repro(built: Built) -> None:
    # The stages ran as on a user's machine, writing bytecode beside their code; it is no part
    # of their code deps (.dvcignore), or every stage would show changed after its first run.
    assert list((built.path / "stages").rglob("__pycache__/*.pyc"))
    assert status_clean(built.path), dvc(built.path, "status")


@pytest.mark.slow
def test_no_stage_writes_outside_its_outs(built: Built) -> None:
    stages = load_stages(built.path / "dvc.yaml")
    assert set(built.writes) == set(stages)
    strays: dict[str, list[str]] = {}
    for name, touched in built.writes.items():
        outs = stages[name].outs
        assert touched, f"{name} wrote nothing"

        def allowed(path: str, outs=outs) -> bool:
            if path == "dvc.lock":
                return True
            if any(path == o or path.startswith(o.rstrip("/") + "/") for o in outs):
                return True
            # DVC's own .gitignore next to an output
            parent = path.rsplit("/", 1)[0] if "/" in path else ""
            return path.endswith(".gitignore") and any(
                o == parent or o.startswith(f"{parent}/") or not parent for o in outs
            )

        stray = sorted(p for p in touched if not allowed(p))
        if stray:
            strays[name] = stray
    assert not strays, f"stages wrote outside their declared outs: {strays}"


@pytest.mark.slow
def test_param_table_matches_dvc(built: Built) -> None:
    """Our reading of dvc.yaml (foreach expansion, params, dependency graph) equals DVC's."""
    import networkx as nx
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    declared: dict[str, set] = {}  # params key -> the stages declaring it (DVC's reading)
    with Repo(str(built.path)) as repo:
        graph = repo.index.graph  # edges: stage -> the stages it depends on
        by_name = {s.name: s for s in repo.index.stages if s.name}
        for stage in by_name.values():
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency) and stage.name != "check-params":
                    for key in dep.params:
                        declared.setdefault(key, set()).add(stage.name)
        expected = {}
        for key in declared:  # readers: the key's own and its sections' (a.b reads a.b.c)
            readers = {n for k, ns in declared.items() if key == k or key.startswith(k + ".")
                       for n in ns}  # fmt: skip
            below = {s.name for n in readers for s in nx.ancestors(graph, by_name[n])}
            expected[key] = [readers, below - readers]
    ours = {k: [set(r), set(b)] for k, r, b in param_rows(load_stages(built.path / "dvc.yaml"))}
    assert ours == expected


@pytest.mark.slow
def test_param_table_agrees_with_dvc_status(built: Built) -> None:
    """Changing one key of each params section invalidates exactly the stages the table says."""
    params_file = built.path / "params.yaml"
    original = params_file.read_text()
    rows = param_rows(load_stages(built.path / "dvc.yaml"))
    own_rows = {section for section, _, _ in rows}
    try:
        for section, readers, _below in rows:
            params = yaml.safe_load(original)
            node = params
            for part in section.split("."):
                node = node[part]
            if not isinstance(node, dict):  # a single key with a row of its own (data.root)
                node, key = params, None
                for part in section.split(".")[:-1]:
                    node = node[part]
                key = section.split(".")[-1]
            else:  # a key of the section that has no row of its own (that row tests it)
                scalars = [k for k, v in node.items() if isinstance(v, int | float | str)]
                key = next((k for k in scalars if f"{section}.{k}" not in own_rows), None)
                if key is None:
                    continue
            value = node[key]
            node[key] = (
                (not value)
                if isinstance(value, bool)
                else (value + 1 if isinstance(value, int | float) else f"{value}-changed")
            )
            params_file.write_text(yaml.safe_dump(params, sort_keys=False))
            changed = changed_stages(built.path)
            # check-params declares every section: it re-runs on any change, alone of its kind
            assert changed == {"check-params", *readers}, (section, key, changed)
    finally:
        params_file.write_text(original)
    assert status_clean(built.path)
