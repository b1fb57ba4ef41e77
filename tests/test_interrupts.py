"""Stopping a command: SIGTERM / Ctrl-C / kill -9 never leave the atomic writers' temp files.

Every command runs its ``main`` through ``stages.common.utils.run_cli``. Here a tiny stand-in
command (an ``atomic_dir`` and an ``atomic_file`` open, then waiting) is started as a real
process and signalled: SIGTERM and SIGINT end it with one ``interrupted:`` line, exit 143 / 130,
and no temp file or folder left. ``kill -9`` cannot be caught: its temp files stay until the
next writer of the same output removes them, also when their pid now belongs to a newer process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.common import utils as U
from tests.imports import REPO

WORKLOAD = """
import os, sys, time
from pathlib import Path
import stages
from stages.common.utils import atomic_dir, atomic_file, run_cli

out = Path(sys.argv[1])


def main():
    with atomic_dir(out / "live") as folder, atomic_file(out / "model.bin") as part:
        (folder / "step.tsv").write_text("1\\n")
        part.write_bytes(b"weights")
        (out / "ready").write_text(str(os.getpid()))
        while True:
            time.sleep(0.05)


run_cli(main)
"""


def _start(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKLOAD, str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (out / "ready").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"workload did not start: {proc.communicate()}")
        time.sleep(0.05)
    return proc


def _temps(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stop_signal_removes_temps_and_says_one_line(tmp_path, sig, code):
    proc = _start(tmp_path)
    assert len(_temps(tmp_path)) == 2  # the folder and the file being written
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.strip().splitlines() == [err.strip()], err  # one line, no traceback
    assert err.startswith(f"interrupted: {signal.Signals(sig).name}")
    assert _temps(tmp_path) == []
    assert not (tmp_path / "live").exists() and not (tmp_path / "model.bin").exists()


def test_after_kill_9_the_next_writer_removes_the_temps(tmp_path):
    proc = _start(tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    left = _temps(tmp_path)
    assert len(left) == 2 and all(f".{proc.pid}." in name for name in left)
    with U.atomic_dir(tmp_path / "live") as folder:
        (folder / "step.tsv").write_text("2\n")
    U.write_bytes_atomic(tmp_path / "model.bin", b"new")
    assert _temps(tmp_path) == []
    assert (tmp_path / "model.bin").read_bytes() == b"new"


def test_a_temp_whose_pid_was_reused_is_removed(tmp_path, monkeypatch):
    """A temp named after a live pid whose process started after the temp was made is stale:
    its writer was another process (a container restarted with the same pids)."""
    theirs = tmp_path / f".model.bin.{os.getpid()}.abc123.tmp"
    theirs.write_bytes(b"half")
    # as if this process (the pid's owner now) started after that temp was made
    later = time.time() + 3600
    monkeypatch.setattr(U, "process_start_time", lambda pid: later, raising=False)
    U.write_bytes_atomic(tmp_path / "model.bin", b"x")
    assert not theirs.exists()
    # a temp of a live writer that started before it is kept
    mine = tmp_path / f".model.bin.{os.getpid()}.def456.tmp"
    mine.write_bytes(b"half")
    monkeypatch.setattr(U, "process_start_time", lambda pid: time.time() - 60)
    U.write_bytes_atomic(tmp_path / "model.bin", b"y")
    assert mine.exists() and (tmp_path / "model.bin").read_bytes() == b"y"
    monkeypatch.undo()
    if Path("/proc/self/stat").is_file():  # where start times are read: this one is sane
        started = U.process_start_time(os.getpid())
        assert started is not None and time.time() - 86400 * 365 < started <= time.time() + 1


def test_a_stop_signal_waits_for_the_rename():
    """The swap of an atomic writer is never cut in two: the signal is raised after it."""
    before = signal.getsignal(signal.SIGTERM)
    with U._stop_signals_raise():
        with pytest.raises(U.Interrupted) as info, U.signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler has run by now, and waited
            done = True
        assert done and info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are given back


def test_atomic_parts_swaps_each_part_and_keeps_the_rest(tmp_path):
    """A folder of two DVC outputs: both parts are replaced on success, DVC's .gitignore beside
    them stays; on an error or a missing part nothing changes and no temp is left."""
    final = tmp_path / "cache"
    with U.atomic_parts(final, ("fit", "test")) as tmp:
        for part in ("fit", "test"):
            (tmp / part).mkdir()
            (tmp / part / "v").write_text("1")
    (final / ".gitignore").write_text("/fit\n/test\n")
    assert sorted(p.name for p in final.iterdir()) == [".gitignore", "fit", "test"]
    with pytest.raises(RuntimeError), U.atomic_parts(final, ("fit", "test")) as tmp:
        (tmp / "fit").mkdir()
        (tmp / "fit" / "v").write_text("2")
        raise RuntimeError("stopped half-way")
    with (
        pytest.raises(U.StageError, match="made no test"),
        U.atomic_parts(final, ("fit", "test")) as tmp,
    ):
        (tmp / "fit").mkdir()
    assert (final / "fit" / "v").read_text() == "1"
    assert sorted(p.name for p in final.iterdir()) == [".gitignore", "fit", "test"]
    with U.atomic_parts(final, ("fit", "test")) as tmp:
        for part in ("fit", "test"):
            (tmp / part).mkdir()
            (tmp / part / "v").write_text("3")
    assert [(final / p / "v").read_text() for p in ("fit", "test")] == ["3", "3"]
    assert sorted(p.name for p in final.iterdir()) == [".gitignore", "fit", "test"]
    with pytest.raises(RuntimeError), U.atomic_parts(tmp_path / "new", ("fit",)):
        raise RuntimeError("nothing written")
    assert not (tmp_path / "new").exists()  # not even an empty folder
