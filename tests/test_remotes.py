"""Team sharing through DVC remotes against real servers on loopback, started by the tests.

Round trips (push, then a clone or a wiped copy pulls, outputs byte-identical, `dvc status` clean,
`dvc repro` runs nothing) to a local folder, an S3 server (`rclone serve s3`) and an OpenSSH
server; and an experiment shared through a bare git remote (`dvc exp push` / `dvc exp pull`).
The remotes are configured by `python -m stages.remote setup` from environment variables, as
`make remote` does. A push whose server is killed midway: tests/test_remote_faults.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from stages.common.utils import StageError
from stages.tools.remote import plan_remote, plan_shared_cache, shown
from tests.dvc_helpers import (
    Built,
    built_repo,
    cached_outs,
    dvc,
    experiment_metrics,
    experiment_repo,
    git,
    ran_stages,
    status_clean,
    tree_digest,
)
from tests.remote_servers import (
    RcloneS3,
    SSHServer,
    assert_objects_intact,
    run_setup,
    setup_remote,
    sshd_missing_reason,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    return built_repo(tmp_path_factory)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3")
    server = RcloneS3(root / "data", root).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    reason = sshd_missing_reason()
    if reason:
        pytest.skip(reason)
    server = SSHServer(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.stop()


def clone_and_pull(src: Path, dst: Path, env: dict[str, str]) -> Path:
    git(src.parent, "clone", "-q", str(src), str(dst))
    setup_remote(dst, env, "--local")
    dvc(dst, "pull")
    return dst


def assert_same_outputs_and_nothing_to_run(built: Built, work: Path) -> None:
    outs = cached_outs(built.path)
    assert outs, "dvc.lock lists no cached outputs"
    assert tree_digest(work, outs) == tree_digest(built.path, outs)
    assert status_clean(work), dvc(work, "status")
    out = dvc(work, "repro")
    assert ran_stages(out) == set(), out[-3000:]


# ----------------------------------------------------------------------------- set-up module


def test_setup_keeps_secrets_out_of_the_project_config() -> None:
    env = {
        "CXR_REMOTE_URL": "s3://team-bucket/cxr",
        "CXR_S3_ENDPOINT": "https://minio.example:9000",
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "very-secret",
    }
    commands = plan_remote(env)
    assert commands[0] == [
        "remote",
        "add",
        "--force",
        "--default",
        "storage",
        "s3://team-bucket/cxr",
    ]
    project = [c for c in commands if "--local" not in c]
    assert ["remote", "modify", "storage", "endpointurl", "https://minio.example:9000"] in project
    assert not any("very-secret" in c or "AKIAEXAMPLE" in c for c in project)
    assert all("very-secret" not in shown(c) for c in commands)
    assert all("--local" in c for c in plan_remote(env, local=True))
    ssh = plan_remote({"CXR_REMOTE_URL": "ssh://me@host:2222/srv/dvc", "CXR_SSH_KEY": "k"})
    assert ssh[1][:4] == ["remote", "modify", "--local", "storage"] and ssh[1][4] == "keyfile"
    folder = plan_remote({"CXR_REMOTE_URL": "shared", "CXR_REMOTE_NAME": "nas"})
    assert folder == [["remote", "add", "--force", "--default", "nas", str(Path.cwd() / "shared")]]
    assert ["config", "--local", "cache.shared", "group"] in plan_shared_cache(
        {"CXR_SHARED_CACHE": "/srv/dvc-cache"}
    )
    with pytest.raises(StageError, match="CXR_REMOTE_URL"):
        plan_remote({})
    with pytest.raises(StageError, match="unsupported scheme"):
        plan_remote({"CXR_REMOTE_URL": "gs://bucket"})


def test_setup_writes_the_config_and_a_failed_command_is_one_line(tmp_path):
    """`python -m stages.remote setup` (DVC's command line run inside its one process): the remote
    lands in .dvc/config, the keys only in .dvc/config.local, the secret is printed masked; in a
    folder that is no DVC repository the first command fails with one line naming it."""
    repo = tmp_path / "repo"
    repo.mkdir()
    dvc(repo, "init", "--no-scm", "-q")
    env = {"CXR_REMOTE_URL": "s3://team/cache", "CXR_S3_ENDPOINT": "http://127.0.0.1:9",
           "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "very-secret"}  # fmt: skip
    out = setup_remote(repo, env)
    project = (repo / ".dvc" / "config").read_text()
    assert "s3://team/cache" in project and "http://127.0.0.1:9" in project
    assert "very-secret" not in project and "very-secret" not in out
    assert "secret_access_key = very-secret" in (repo / ".dvc" / "config.local").read_text()
    proc = run_setup(tmp_path, env)
    assert proc.returncode == 2  # run_cli's code for an expected error
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: dvc remote add --force --default storage s3://team/cache failed")
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- round trips


@pytest.mark.slow
def test_local_folder_remote_round_trip(built: Built, tmp_path: Path) -> None:
    store = tmp_path / "remote"
    setup_remote(built.path, {"CXR_REMOTE_URL": str(store), "CXR_REMOTE_NAME": "folder"}, "--local")
    dvc(built.path, "push")
    assert_objects_intact(store)
    # A copy of the workspace with every cached output and the cache wiped, then pulled back.
    work = tmp_path / "work"
    shutil.copytree(built.path, work, symlinks=True)
    for rel in cached_outs(built.path):
        target = work / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    shutil.rmtree(work / ".dvc" / "cache")
    assert not status_clean(work)
    dvc(work, "pull")
    assert_same_outputs_and_nothing_to_run(built, work)


@pytest.mark.slow
def test_s3_round_trip_and_shared_experiment(
    built: Built, s3: RcloneS3, tmp_path: Path, tmp_path_factory
) -> None:
    s3.make_bucket("team")
    env = s3.env("team")
    setup_remote(built.path, env, "--local")
    dvc(built.path, "push")
    assert_objects_intact(s3.root / "team" / "cache")

    # Teammate A: clone, set the remote up for the team (URL and endpoint in .dvc/config, keys in
    # .dvc/config.local only), pull, find everything up to date.
    a = tmp_path / "a"
    git(tmp_path, "clone", "-q", str(built.path), str(a))
    setup_remote(a, env)
    project = (a / ".dvc" / "config").read_text()
    assert "s3://team/cache" in project and s3.endpoint in project
    assert s3.secret_key not in project and s3.access_key not in project
    assert f"secret_access_key = {s3.secret_key}" in (a / ".dvc" / "config.local").read_text()
    dvc(a, "pull")
    assert_same_outputs_and_nothing_to_run(built, a)

    # Teammate C ran an experiment (the session's `dvc exp run`, on a copy of the same commit)
    # and shares it through a bare git remote and the S3 remote; B clones, pulls it, sees it.
    ran = experiment_repo(tmp_path_factory)
    c = tmp_path / "c"
    shutil.copytree(ran.path, c, symlinks=True)
    setup_remote(c, env, "--local")
    origin = tmp_path / "origin.git"
    git(tmp_path, "init", "-q", "--bare", str(origin))
    branch = git(c, "rev-parse", "--abbrev-ref", "HEAD").strip()
    git(c, "remote", "add", "origin", str(origin))
    git(c, "push", "-q", "origin", f"HEAD:refs/heads/{branch}")
    dvc(c, "exp", "push", "origin", ran.name)
    shown_c = json.loads(dvc(c, "exp", "show", "--json"))
    model = tree_digest(c, ["models/classifier.keras"])  # the experiment ran in c's workspace

    b = tmp_path / "b"
    git(tmp_path, "clone", "-q", "--branch", branch, str(origin), str(b))
    setup_remote(b, env, "--local")
    dvc(b, "exp", "pull", "origin", ran.name)
    shown_b = json.loads(dvc(b, "exp", "show", "--json"))
    metrics_b = experiment_metrics(shown_b, ran.name)
    assert 0.0 <= metrics_b["accuracy"] <= 1.0
    assert metrics_b == experiment_metrics(shown_c, ran.name)
    assert not (b / "models" / "classifier.keras").exists()  # a clone holds no outputs
    dvc(b, "exp", "apply", ran.name)  # the experiment's model came with it from the remote
    assert tree_digest(b, ["models/classifier.keras"]) == model


@pytest.mark.slow
def test_ssh_round_trip(built: Built, sshd: SSHServer, tmp_path: Path) -> None:
    store = tmp_path / "ssh-store"
    env = {**sshd.env(store), "CXR_REMOTE_NAME": "ssh"}
    setup_remote(built.path, env, "--local")
    dvc(built.path, "push")
    assert_objects_intact(store)
    c = clone_and_pull(built.path, tmp_path / "c", env)
    assert_same_outputs_and_nothing_to_run(built, c)


def test_sshd_skip_reason_names_the_install_script(monkeypatch) -> None:
    monkeypatch.setattr(Path, "exists", lambda _self: False)
    reason = sshd_missing_reason()
    assert reason is not None and ".ci/system-deps" in reason
