"""The model registry: dvc.yaml's artifacts, GTO tags as versions and stages, and serving
``classifier@prod`` from the team's DVC remote into a cache.

Fast: the references, GTO tag names and the state they make (register / deregister / assign /
unassign, the same second told apart by GTO's counter), the --model selection, the table, and a
git-only toy registry (no DVC: its files are git-tracked) for the cache (reused when verified,
fetched again when a file is damaged), the origin fallback and the offline mirror.
Slow (end to end, on a copy of the session's tiny built pipeline): clone 1 pushes its outputs to
a folder DVC remote, registers both models, promotes the classifier to prod and pushes the tags
to a bare origin; a fresh clone 2 (no `dvc pull`, no training) predicts with
``--model classifier@prod``: the same probabilities as clone 1, the JSON naming version, stage
and commit; `dvc artifacts get <origin> <name>` works for each artifact; a new version promoted
to prod is what @prod serves next; a damaged cached file is fetched again; unknown names,
versions and stages are one line.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import stages  # noqa: F401  (torch before TensorFlow)
from stages.common import paths
from stages.common.cache import FIT_DIR
from stages.common.utils import StageError
from stages.serve import registry
from stages.serve.registry import Spec, build_state, parse_spec, parse_tag, resolve
from stages.tools import registry as tool
from tests.conftest import REPO
from tests.dvc_helpers import BIN, Built, built_repo, dvc, git, tool_env

# ------------------------------------------------------------------------------ references


def test_references_parse_to_name_and_version_or_stage():
    assert parse_spec("classifier@prod") == Spec("classifier", stage="prod")
    assert parse_spec("classifier#staging") == Spec("classifier", stage="staging")
    assert parse_spec("detector@v1.2.0") == Spec("detector", version="v1.2.0")
    assert parse_spec("seg/menter@v0.1.0-rc.1") == Spec("seg/menter", version="v0.1.0-rc.1")
    assert parse_spec("classifier@latest") == Spec("classifier")
    for path in ("models/classifier.keras", "classifier.keras", "/abs/model.pt", "./a@b/c"):
        assert parse_spec(path) is None, path
    with pytest.raises(StageError, match=r"unknown stage 'qa' \(stages: dev, staging, prod\)"):
        parse_spec("classifier@qa")
    with pytest.raises(StageError, match="not a version"):
        parse_spec("classifier@v1.2")


def test_dvc_yaml_lists_every_model_with_the_paths_module_paths():
    artifacts = registry.read_artifacts((REPO / "dvc.yaml").read_text())
    assert set(artifacts) == {paths.task_paths(t).name for t in paths.TASKS}  # every model
    seg = artifacts["segmenter"]
    assert seg.path == paths.SEGMENTER_MODEL.as_posix() and seg.companions == ()
    assert seg.metrics == paths.SEGMENTATION.metrics.as_posix()
    cls, det = artifacts["classifier"], artifacts["detector"]
    c, d = paths.CLASSIFICATION, paths.DETECTION
    assert cls.path == paths.CLASSIFIER_MODEL.as_posix()
    assert cls.companions == (paths.CLASSIFIER_SIDECAR.as_posix(), paths.SEGMENTER_MODEL.as_posix())
    assert cls.decision == c.evaluation.as_posix()
    assert (cls.metrics, cls.card) == (
        c.metrics.as_posix(),
        (c.report_dir / "model_card.md").as_posix(),
    )
    # the data version: the training part of the augment cache (fit/, a DVC output of its own)
    assert cls.data == ((c.augment / FIT_DIR).as_posix(),)
    assert det.data == ((d.augment / FIT_DIR).as_posix(),)
    assert det.path == paths.DETECTOR_MODEL.as_posix() and det.companions == ()
    assert det.metrics == d.metrics.as_posix()
    for art in artifacts.values():
        assert art.type == "model" and art.desc and art.meta["framework"] in art.labels
        assert art.task in art.labels and art.role == paths.task_paths(art.task).name
    # the stages GTO enforces are the ones the commands offer
    assert yaml.safe_load((REPO / ".gto").read_text())["stages"] == list(registry.STAGES)


# ------------------------------------------------------------------------------- tag state
def _tags(*rows):
    """(tag name, commit, time) -> Tags."""
    return [parse_tag(name, commit, time, "".join(msg)) for name, commit, time, *msg in rows]


def test_tag_names_are_read_as_gto_writes_them():
    t = parse_tag("classifier@v1.0.0", "c1", 5, "m")
    assert (t.name, t.action, t.version, t.commit) == ("classifier", "register", "v1.0.0", "c1")
    t = parse_tag("classifier#prod#3", "c1")
    assert (t.action, t.stage, t.counter) == ("assign", "prod", 3)
    assert parse_tag("classifier#prod!#4", "c1").action == "unassign"
    assert parse_tag("classifier@v1.0.0!", "c1").action == "deregister"
    assert parse_tag("classifier@deprecated", "c1").action == "deprecate"
    assert parse_tag("path/to=model@v0.0.1", "c").name == "path/to:model"
    for other in ("v1.0.0", "release-2024", "classifier@v1", "classifier@1.0.0"):
        assert parse_tag(other, "c") is None, other


def test_a_stage_names_the_version_most_recently_promoted_to_it():
    states = build_state(
        _tags(
            ("classifier@v1.0.0", "c1", 10),
            ("classifier@v1.1.0", "c2", 20),
            ("classifier@v2.0.0-rc.1", "c3", 25),
            ("classifier#prod#1", "c2", 30),
            ("classifier#staging#2", "c2", 30),
            ("classifier#prod#3", "c1", 40),  # a roll back to v1.0.0
            ("classifier#staging#4", "c3", 50),
            ("classifier#staging!#5", "c3", 50),  # same second: the counter orders them
            ("detector@v0.1.0", "d1", 10),
        )
    )
    cls = states["classifier"]
    assert cls.stages["prod"].version == "v1.0.0"
    assert cls.stages["staging"].version == "v1.1.0"  # v2.0.0-rc.1's promotion was undone
    assert cls.latest().version == "v2.0.0-rc.1"  # SemVer: 2.0.0-rc.1 > 1.1.0
    assert sorted(cls.versions) == ["v1.0.0", "v1.1.0", "v2.0.0-rc.1"]
    assert cls.stages_of("v1.1.0") == ["staging"]
    r = resolve(Spec("classifier", stage="prod"), states, "here")
    assert (r.version.version, r.version.commit, r.stage, r.stages) == (
        "v1.0.0",
        "c1",
        "prod",
        ("prod",),
    )
    assert resolve(Spec("detector"), states, "here").version.version == "v0.1.0"


def test_latest_is_the_highest_release_and_deregistered_versions_are_gone():
    states = build_state(
        _tags(
            ("m@v1.9.0", "a", 1),
            ("m@v1.10.0", "b", 2),
            ("m@v2.0.0-rc.1", "c", 3),
            ("m@v1.10.0!", "b", 4),
            ("m#prod#1", "b", 5),  # promotes a deregistered version: ignored
        )
    )
    m = states["m"]
    assert sorted(m.versions, key=registry.semver_key) == ["v1.9.0", "v2.0.0-rc.1"]
    assert m.latest().version == "v2.0.0-rc.1" and "prod" not in m.stages
    assert registry.semver_key("v2.0.0") > registry.semver_key("v2.0.0-rc.1")
    assert registry.semver_key("v1.10.0") > registry.semver_key("v1.9.0")
    gone = build_state(_tags(("m@v1.0.0", "a", 1), ("m@deprecated", "a", 2)))
    with pytest.raises(StageError, match="deprecated"):
        resolve(Spec("m"), gone, "here")


def test_unknown_name_version_or_stage_is_one_line_naming_what_exists():
    states = build_state(_tags(("classifier@v1.0.0", "c1", 1), ("classifier#dev#1", "c1", 2)))
    cases = {
        Spec("nope", stage="prod"): "no registered model named 'nope' in X (registered: "
        "classifier)",
        Spec("classifier", version="v9.9.9"): "classifier has no version v9.9.9 in X "
        "(versions: v1.0.0)",
        Spec("classifier", stage="prod"): "no version of classifier is in stage prod in X "
        "(stages: dev=v1.0.0)",
    }
    for spec, text in cases.items():
        with pytest.raises(StageError) as err:
            resolve(spec, states, "X")
        assert text in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------- selection
def test_model_files_keep_working_and_pick_their_role(tmp_path):
    sel = registry.select(
        ["a.keras", "b.keras", "d.pt"], None, None, None, Path("e.json"), "default", Path("x")
    )
    assert sel.classifier == [Path("a.keras"), Path("b.keras")] and sel.detector == Path("d.pt")
    assert sel.registry == {} and sel.evaluation == Path("e.json")
    # without --model: today's behaviour (the defaults)
    sel = registry.select(None, None, None, None, Path("e.json"), "default", Path("det.pt"))
    assert (sel.classifier, sel.detector) == ("default", Path("det.pt"))
    # with --model, only what is named is served
    sel = registry.select(["a.keras"], None, None, None, Path("e.json"), "default", Path("d"))
    assert sel.detector is None
    with pytest.raises(StageError, match="not a registry reference"):
        registry.select(["model.h5"], None, None, None, Path("e"), "default", Path("d"))
    with pytest.raises(StageError, match="more than one detector"):
        registry.select(["a.pt", "b.pt"], None, None, None, Path("e"), "default", Path("d"))


def test_the_table_and_the_status_line_are_readable():
    facts = json.dumps({"metrics": {"accuracy": 0.91234, "roc_auc": 0.95}})
    states = build_state(_tags(("classifier@v1.0.0", "abcdef123456", 0, f"Registering\n\n{facts}")))
    text = tool.table(states, ["classifier", "detector"])
    lines = text.splitlines()
    assert lines[0].split() == [
        "model", "latest", "dev", "staging", "prod", "commit", "registered", "(UTC)",
        "metrics", "(latest)",
    ]  # fmt: skip
    assert lines[2].split()[:7] == ["classifier", "v1.0.0", "-", "-", "-", "abcdef1", "1970-01-01"]
    assert lines[2].endswith("accuracy 0.912, roc_auc 0.950")
    assert lines[3].split()[:2] == ["detector", "-"] and lines[3].endswith("not registered")
    deps = {"stages/common": "modified", "params.yaml": {"train_classifier.lr": "modified"}}
    status = {"train-classifier": [{"changed deps": deps}, "changed command"]}
    assert tool.status_line(status) == (
        "train-classifier: changed deps (stages/common, params.yaml: train_classifier.lr); "
        "changed command"
    )


# ---------------------------------------------------------------- a git-only toy registry
TOY_YAML = """\
artifacts:
  toy:
    path: models/toy.bin
    type: model
    labels: [classification, test]
    meta:
      task: classification
      files: [models/toy.meta.json]
      decision: reports/toy/evaluation.json
      metrics: metrics/toy.json
"""


def _toy_commit(repo: Path, weights: bytes, message: str) -> str:
    (repo / "models").mkdir(parents=True, exist_ok=True)
    (repo / "models/toy.bin").write_bytes(weights)
    (repo / "models/toy.meta.json").write_text('{"classes": ["A", "B"]}')
    (repo / "reports/toy").mkdir(parents=True, exist_ok=True)
    (repo / "reports/toy/evaluation.json").write_text('{"decision": {"threshold": 0.3}}')
    (repo / "metrics").mkdir(exist_ok=True)
    (repo / "metrics/toy.json").write_text('{"accuracy": 0.5}')
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD").strip()


@pytest.fixture
def toy(tmp_path, monkeypatch) -> dict:
    """A repository whose model files are git-tracked: the registry without DVC."""
    monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "cache"))
    repo = tmp_path / "toy"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "config", "user.name", "t")
    git(repo, "config", "user.email", "t@example.invalid")
    (repo / "dvc.yaml").write_text(TOY_YAML)
    one = _toy_commit(repo, b"weights one", "one")
    git(repo, "tag", "-a", "toy@v1.0.0", "-m", "Registering toy\n\n{}")
    git(repo, "tag", "-a", "toy#prod#1", "-m", "Promoting")
    two = _toy_commit(repo, b"weights two", "two")
    git(repo, "tag", "-a", "toy@v1.1.0", "-m", "Registering toy")
    git(repo, "tag", "not-a-gto-tag")  # lightweight, ignored
    return {"repo": repo, "one": one, "two": two, "cache": tmp_path / "cache"}


def test_fetch_puts_the_version_and_its_rule_in_the_cache_and_reuses_it(toy, caplog):
    served = registry.fetch_spec(Spec("toy", stage="prod"), root=toy["repo"])
    assert (served.version, served.commit, served.stage) == ("v1.0.0", toy["one"], "prod")
    assert served.root == toy["cache"] / "models/toy/v1.0.0"
    assert served.path.read_bytes() == b"weights one"
    assert (served.root / "models/toy.meta.json").is_file()  # the sidecar travels with it
    assert json.loads(served.decision.read_text())["decision"]["threshold"] == 0.3
    record = json.loads((served.root / registry.RECORD).read_text())
    assert record["commit"] == toy["one"] and "models/toy.bin" in record["files"]
    assert served.to_json() == {
        "name": "toy",
        "version": "v1.0.0",
        "stage": "prod",
        "stages": ["prod"],
        "commit": toy["one"],
        "registry": f"this checkout ({toy['repo']})",
    }
    # reused: a marker left in the folder survives a second resolution
    (served.root / "marker").write_text("x")
    again = registry.fetch_spec(Spec("toy", version="v1.0.0"), root=toy["repo"])
    assert (again.root / "marker").is_file() and again.stage is None
    # damaged: fetched again (the folder is replaced whole)
    served.path.write_bytes(b"damaged")
    with caplog.at_level(logging.WARNING):
        fixed = registry.fetch_spec(Spec("toy", stage="prod"), root=toy["repo"])
    assert fixed.path.read_bytes() == b"weights one" and not (fixed.root / "marker").exists()
    assert "does not match its md5: fetching it again" in caplog.text
    latest = registry.fetch_spec(Spec("toy"), root=toy["repo"])
    assert (latest.version, latest.commit) == ("v1.1.0", toy["two"])


def test_a_checkout_without_the_tags_asks_its_origin(toy, tmp_path, caplog):
    origin = tmp_path / "origin.git"
    git(tmp_path, "clone", "-q", "--bare", str(toy["repo"]), str(origin))
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    git(fresh, "init", "-q")
    git(fresh, "remote", "add", "origin", "../origin.git")  # relative, as a clone may have it
    served = registry.fetch_spec(Spec("toy", stage="prod"), root=fresh)
    assert served.source == str(origin.resolve()) and served.commit == toy["one"]
    # a later promotion on the origin is seen (the mirror is refreshed on each resolution)
    git(toy["repo"], "tag", "-a", "toy#prod#2", "-m", "Promoting", toy["two"])
    git(toy["repo"], "push", "-q", str(origin), "toy#prod#2")
    assert registry.fetch_spec(Spec("toy", stage="prod"), root=fresh).version == "v1.1.0"
    # the origin gone: the mirror answers as last fetched, and says so
    shutil.rmtree(origin)
    with caplog.at_level(logging.WARNING):
        assert registry.fetch_spec(Spec("toy", version="v1.1.0"), root=fresh).commit == toy["two"]
    assert "tags as last fetched" in caplog.text
    # no mirror and no origin: one line
    with pytest.raises(StageError, match="cannot reach the registry") as err:
        registry.fetch_spec(Spec("toy", stage="prod"), registry=str(tmp_path / "none.git"))
    assert "\n" not in str(err.value)


def test_a_file_neither_cached_nor_reachable_is_one_line(toy, tmp_path):
    """A DVC-tracked file of a version, with no DVC remote to fetch it from."""
    source = registry.Source(toy["repo"], "toy")
    yaml_text = TOY_YAML.replace("files: [models/toy.meta.json]", "files: [models/absent.bin]")
    (toy["repo"] / "dvc.yaml").write_text(yaml_text)
    lock = (
        "schema: '2.0'\nstages:\n  t:\n    outs:\n    - path: models/absent.bin\n      md5: 0123\n"
    )
    (toy["repo"] / "dvc.lock").write_text(lock)
    git(toy["repo"], "commit", "-qam", "three")
    commit = git(toy["repo"], "rev-parse", "HEAD").strip()
    version = registry.Version("toy", "v2.0.0", commit, 0, "toy@v2.0.0")
    resolution = registry.Resolution("toy", version, None, (), "toy")
    with pytest.raises(StageError) as err:
        registry.fetch(resolution, source, tmp_path / "cache2")
    text = str(err.value)
    assert text.startswith("models/absent.bin of commit") and "not in the model cache" in text
    assert "\n" not in text and not (tmp_path / "cache2/models/toy/v2.0.0").exists()


# ------------------------------------------------------------------------- end to end (DVC)
def _run(cwd: Path, *args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(BIN / "python"), "-m", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _predict(cwd: Path, image: Path, model: str, env: dict) -> dict:
    proc = _run(cwd, "stages.predict", str(image), "--model", model, env=env)
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.strip()]
    assert len(lines) == 1, proc.stdout
    return lines[0]


@pytest.fixture(scope="module")
def team(tmp_path_factory) -> dict:
    """Clone 1 (a copy of the built pipeline) shares outputs and tags; clone 2 is fresh."""
    built: Built = built_repo(tmp_path_factory)
    base = tmp_path_factory.mktemp("registry")
    one, origin, store = base / "one", base / "origin.git", base / "dvc-store"
    shutil.copytree(built.path, one, symlinks=True)
    (one / ".dvc" / "config.local").unlink(missing_ok=True)  # a clone has no local remotes
    shutil.copy2(REPO / ".gto", one / ".gto")
    env = {**tool_env(), registry.CACHE_ENV: str(base / "cache")}
    git(base, "init", "-q", "--bare", str(origin))
    git(one, "remote", "add", "origin", str(origin))
    dvc(one, "remote", "add", "-d", "team", str(store))
    git(one, "add", "-A")
    git(one, "commit", "-q", "-m", "the team's DVC remote and registry stages")
    dvc(one, "push")
    for name in ("classifier", "detector"):
        _run(one, "stages.registry", "register", name, "--version", "v1.0.0", env=env)
    _run(one, "stages.registry", "promote", "classifier", "v1.0.0", "--stage", "prod", env=env)
    git(one, "push", "-q", "origin", "HEAD", "--tags")
    two = base / "two"
    git(base, "clone", "-q", str(origin), str(two))
    image = base / "xray.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (256, 224), dtype=np.uint8)).save(image)
    commit = git(one, "rev-parse", "HEAD").strip()
    return {"one": one, "two": two, "origin": origin, "store": store, "env": env,
            "image": image, "commit": commit, "base": base}  # fmt: skip


@pytest.mark.slow
def test_a_fresh_clone_serves_prod_without_training(team):
    """The reason for the registry: clone 2 has no models, no DVC cache, no training."""
    two, env = team["two"], team["env"]
    assert not (two / paths.CLASSIFIER_MODEL).exists() and not (two / ".dvc/cache").exists()
    ours = _predict(team["one"], team["image"], paths.CLASSIFIER_MODEL.as_posix(), env)
    theirs = _predict(two, team["image"], "classifier@prod", env)
    c1, c2 = ours["classification"], theirs["classification"]
    assert c2["probabilities"] == pytest.approx(c1["probabilities"], abs=1e-6)
    evaluation = json.loads((team["one"] / paths.CLASSIFICATION.evaluation).read_text())
    assert c2["threshold"] == evaluation["decision"]["threshold"]  # the version's own rule
    assert c2["threshold_source"].endswith(f"({evaluation['decision']['threshold_method']})")
    (model,) = c2["models"]
    assert model["registry"] == {
        "name": "classifier",
        "version": "v1.0.0",
        "stage": "prod",
        "stages": ["prod"],
        "commit": team["commit"],
        "registry": f"this checkout ({two})",
    }
    assert model["commit"] == team["commit"][:7] and model["dvc_lock"].startswith("matches")
    assert "detection" not in theirs  # only the models named are served
    assert "registry" not in c1["models"][0]  # a plain path keeps working, as before
    assert not (two / paths.CLASSIFIER_MODEL).exists()  # served from the cache, not the clone


@pytest.mark.slow
def test_the_page_names_the_registry_version(team, monkeypatch):
    from stages.serve.app import create

    monkeypatch.chdir(team["two"])
    monkeypatch.setenv(registry.CACHE_ENV, team["env"][registry.CACHE_ENV])
    sel = registry.select(["classifier@prod"], None, None, None, Path("x"), "default", Path("d"))
    demo, predictor = create(
        sel.classifier, sel.detector, sel.evaluation, 0.3, registry=sel.registry,
        segmenter=sel.segmenter,
    )  # fmt: skip
    texts = {
        c.get("props", {}).get("elem_id"): str(c.get("props", {}).get("value", ""))
        for c in demo.config["components"]
    }
    assert texts["registry"].startswith("**Model registry:** **classifier** **v1.0.0**, stage")
    assert f"`{team['commit'][:7]}`" in texts["registry"] and "**prod**" in texts["registry"]
    order = [c.get("props", {}).get("elem_id") for c in demo.config["components"]]
    assert order.index("registry") == order.index("provenance") - 1  # beside the provenance
    assert "model registry `classifier` v1.0.0, stage prod" in texts["provenance"]
    assert predictor.notes == []  # the decision was chosen for this very model


@pytest.mark.slow
def test_dvc_artifacts_get_works_for_each_artifact(team, tmp_path):
    for name in ("classifier", "detector"):
        out = tmp_path / name
        dvc(tmp_path, "artifacts", "get", str(team["origin"]), name, "-o", str(out))
        path = registry.read_artifacts((REPO / "dvc.yaml").read_text())[name].path
        assert out.read_bytes() == (team["one"] / path).read_bytes(), name
    out = tmp_path / "prod"
    dvc(tmp_path, "artifacts", "get", str(team["origin"]), "classifier", "--stage", "prod",
        "-o", str(out))  # fmt: skip
    assert out.read_bytes() == (team["one"] / paths.CLASSIFIER_MODEL).read_bytes()


@pytest.mark.slow
def test_prod_follows_a_promotion_and_a_damaged_cache_is_fetched_again(team, monkeypatch, caplog):
    one, two, env = team["one"], team["two"], team["env"]
    monkeypatch.setenv(registry.CACHE_ENV, env[registry.CACHE_ENV])
    (one / "CHANGELOG.md").write_text("a new version of the same pipeline\n")
    git(one, "add", "CHANGELOG.md")
    git(one, "commit", "-q", "-m", "v1.1.0")
    _run(one, "stages.registry", "register", "classifier", "--bump", "minor", env=env)
    _run(one, "stages.registry", "promote", "classifier", "v1.1.0", "--stage", "prod", env=env)
    git(one, "push", "-q", "origin", "HEAD", "--tags")
    new = git(one, "rev-parse", "HEAD").strip()
    # the team's origin says so at once; clone 2's own tags once fetched
    served = registry.fetch_spec(Spec("classifier", stage="prod"), registry="origin", root=two)
    assert (served.version, served.commit, served.stage) == ("v1.1.0", new, "prod")
    git(two, "fetch", "-q", "--tags")
    served = registry.fetch_spec(Spec("classifier", stage="prod"), root=two)
    assert (served.version, served.commit) == ("v1.1.0", new)
    assert served.source == f"this checkout ({two})"
    shown = _run(two, "stages.registry", "show", env=env).stdout.splitlines()
    row = next(x.split() for x in shown if x.startswith("classifier"))
    assert row[:5] == ["classifier", "v1.1.0", "-", "-", "v1.1.0"] and row[5] == new[:7]
    assert "accuracy" in shown[2]  # the headline metrics register recorded
    # a damaged cached file is fetched again from the DVC remote
    good = served.path.read_bytes()
    served.path.write_bytes(good[:100])
    with caplog.at_level(logging.WARNING):
        again = registry.fetch_spec(Spec("classifier", version="v1.1.0"), root=two)
    assert again.path.read_bytes() == good and "fetching it again" in caplog.text
    # offline (the remote unreachable) with nothing cached: one line naming the file
    monkeypatch.setenv(registry.CACHE_ENV, str(team["base"] / "empty-cache"))
    moved = team["store"].with_name("dvc-store.away")
    team["store"].rename(moved)
    try:
        with pytest.raises(StageError) as err:
            registry.fetch_spec(Spec("classifier", stage="prod"), root=two)
    finally:
        moved.rename(team["store"])
    text = str(err.value)
    assert text.startswith(f"{paths.CLASSIFIER_MODEL.as_posix()} of commit {new[:7]} is not in")
    assert "\n" not in text


@pytest.mark.slow
def test_register_refuses_a_stale_pipeline_and_unknown_references_are_one_line(team):
    one, two, env = team["one"], team["two"], team["env"]
    params = one / "params.yaml"
    saved = params.read_text()
    doc = yaml.safe_load(saved)
    doc["train_classifier"]["epochs"] = doc["train_classifier"].get("epochs", 1) + 1
    params.write_text(yaml.safe_dump(doc, sort_keys=False))
    git(one, "commit", "-qam", "more epochs, not run")
    try:
        proc = _run(one, "stages.registry", "register", "classifier", env=env, check=False)
    finally:
        git(one, "reset", "-q", "--hard", "HEAD~1")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "classifier: the pipeline is stale at HEAD (" in proc.stderr
    assert "train-classifier: changed deps (params.yaml: train_classifier)" in proc.stderr
    proc = _run(one, "stages.registry", "register", "tokenizer", env=env, check=False)
    assert "tokenizer: not an artifact of dvc.yaml" in proc.stderr and proc.returncode == 2
    for model, said in (
        ("nope@prod", "no registered model named 'nope'"),
        ("classifier@v9.9.9", "classifier has no version v9.9.9"),
        ("classifier@qa", "unknown stage 'qa'"),
        ("detector@staging", "no version of detector is in stage staging"),
    ):
        proc = _run(two, "stages.predict", str(team["image"]), "--model", model, env=env,
                    check=False)  # fmt: skip
        assert proc.returncode == 2, (model, proc.stderr)
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert said in proc.stderr, proc.stderr
    proc = _run(one, "stages.registry", "promote", "classifier", "v1.0.0", "--stage", "qa",
                env=env, check=False)  # fmt: skip
    assert proc.returncode == 2 and "invalid choice: 'qa'" in proc.stderr
