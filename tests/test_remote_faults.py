"""A push whose S3 server is killed midway (SIGKILL), against a real `rclone serve s3` on loopback.

Its own file (not in tests/test_remotes.py) because it needs none of the session's built pipeline:
the test workers can run it beside the tests that do.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.dvc_helpers import (
    BIN,
    commit_all,
    dvc,
    git,
    init_repo,
    status_clean,
    tool_env,
    tree_digest,
)
from tests.remote_servers import RcloneS3, assert_objects_intact, object_files, setup_remote


@pytest.mark.slow
def test_push_survives_server_killed_midway(tmp_path: Path) -> None:
    """SIGKILL the S3 server after ~50 of 400 objects, bring it back 6 s later (longer than the
    client's retries), push again: the remote is complete and intact, a fresh clone pulls it."""
    repo = tmp_path / "repo"
    repo.mkdir()
    init_repo(repo)
    rng = np.random.default_rng(0)
    (repo / "data").mkdir()
    for i in range(400):
        size = int(rng.integers(1_000, 60_000))
        (repo / "data" / f"f{i:04d}.bin").write_bytes(rng.bytes(size))
    dvc(repo, "add", "data")
    commit_all(repo, "data")
    server = RcloneS3(tmp_path / "s3", tmp_path)
    try:
        server.start().make_bucket("team")
        env = server.env("team")
        setup_remote(repo, env, "--local")
        store = server.root / "team" / "cache"
        push = subprocess.Popen(
            [str(BIN / "dvc"), "push"],
            cwd=repo,
            env=tool_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 120
            while push.poll() is None and time.monotonic() < deadline:
                if store.exists() and len(object_files(store)) >= 50:
                    break
                time.sleep(0.02)
            at_kill = len(object_files(store)) if store.exists() else 0
            assert push.poll() is None, "push finished before the server could be killed"
            server.stop(signal.SIGKILL)
            time.sleep(6.0)
            server.start()
            first, _ = push.communicate(timeout=300)
        finally:
            if push.poll() is None:
                push.kill()
                push.wait(timeout=30)
        assert at_kill < 401, at_kill
        out = dvc(repo, "push")
        assert "in sync" in dvc(repo, "status", "--cloud"), (first[-2000:], out)
        assert len(object_files(store)) == 401  # 400 files + the folder's .dir listing
        assert_objects_intact(store)
        fresh = tmp_path / "fresh"
        git(tmp_path, "clone", "-q", str(repo), str(fresh))
        setup_remote(fresh, env, "--local")
        dvc(fresh, "pull")
        assert tree_digest(fresh, ["data"]) == tree_digest(repo, ["data"])
        assert status_clean(fresh)
    finally:
        server.stop()
