"""Start-up and shut-down of the serving commands.

- ``--help`` of ``python -m stages.predict``, ``python -m stages.serve``, ``cxr-predict`` and
  ``cxr-serve`` exits 0 without importing TensorFlow, torch or Gradio (checked in the child
  process's ``sys.modules``; the wall time is measured in bench/cli_startup.py, not here);
- the server keeps uploads in a temp folder of its own (GRADIO_TEMP_DIR) and removes it when it
  stops: the real server on a loopback port, an upload through gradio_client, then SIGTERM or
  Ctrl-C (SIGINT); a start that fails (a bad model file) leaves no folder either.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

import stages  # noqa: F401  (torch before TensorFlow)
from tests.serve_models import free_port, tiny_models, xray_like

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("tensorflow", "keras", "torch", "torchvision", "gradio")
# Runs a command's --help in this child process, then reports which heavy modules it imported.
WRAPPER = """
import json, runpy, sys
name, kind = sys.argv[1], sys.argv[2]
sys.argv = [name, "--help"]
code = 0
try:
    if kind == "module":
        runpy.run_module(name, run_name="__main__", alter_sys=True)
    else:
        from importlib.metadata import entry_points
        (ep,) = [e for e in entry_points(group="console_scripts") if e.name == name]
        ep.load()()
except SystemExit as exc:
    code = exc.code or 0
heavy = [m for m in @HEAVY@ if m in sys.modules]
print("IMPORTED=" + json.dumps(heavy), file=sys.stderr)
sys.exit(code)
""".replace("@HEAVY@", repr(HEAVY))


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("stages.predict", "module"),
        ("stages.serve", "module"),
        ("cxr-predict", "script"),
        ("cxr-serve", "script"),
    ],
)
def test_help_imports_no_framework(name, kind):
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, name, kind],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ")
    heavy_lines = [line for line in done.stderr.splitlines() if line.startswith("IMPORTED=")]
    assert heavy_lines, done.stderr
    assert json.loads(heavy_lines[-1].split("=", 1)[1]) == []


@pytest.mark.parametrize("script", ["cxr-predict", "cxr-serve"])
def test_installed_console_script_help(script):
    path = Path(sys.executable).parent / script
    if not path.is_file():
        pytest.skip(f"{path} is not installed (pip install -e .)")
    done = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith(f"usage: {script}")


# --------------------------------------------------------------------------- the temp folder
def test_server_temp_dir_is_private_and_removed(tmp_path, monkeypatch):
    from stages.serve.app import TEMP_PREFIX, server_temp_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("GRADIO_TEMP_DIR", "/somewhere/else")
    with server_temp_dir() as folder:
        assert folder.parent == tmp_path and folder.name.startswith(TEMP_PREFIX)
        assert os.environ["GRADIO_TEMP_DIR"] == str(folder)
        (folder / "upload.png").write_bytes(b"x")
    assert not folder.exists()
    assert os.environ["GRADIO_TEMP_DIR"] == "/somewhere/else"  # given back


def test_failed_start_leaves_no_temp_folder(tmp_path, monkeypatch, capsys):
    from stages.serve.app import TEMP_PREFIX, cli

    bad = tmp_path / "bad.keras"
    bad.write_bytes(pickle.dumps({"not": "a model"}))
    bad.with_suffix(".meta.json").write_text("{}")
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setattr(sys, "argv", ["cxr-serve", "--classifier", str(bad)])
    with pytest.raises(SystemExit) as info:
        cli()
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")]
    assert not list(temp.glob(f"{TEMP_PREFIX}*"))


def _wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"server did not answer in {timeout} s:\n{log.read_text()}")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_real_server_removes_its_uploads_when_stopped(tmp_path_factory, tmp_path, stop):
    gradio_client = pytest.importorskip("gradio_client")
    from stages.serve.app import TEMP_PREFIX

    models = tiny_models(tmp_path_factory.getbasetemp() / "serve_models")
    temp = tmp_path / "tmp"
    temp.mkdir()
    port = free_port()
    env = {**os.environ, "TMPDIR": str(temp)}
    env.pop("GRADIO_TEMP_DIR", None)
    log = tmp_path / "server.log"
    argv = [sys.executable, "-m", "stages.serve", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--classifier", str(tmp_path / "none.keras"), "--detector", str(models["detector"])]
    argv += ["--min-score", "0"]
    with log.open("w") as fh:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_for(url, proc, log)
        (folder,) = temp.glob(f"{TEMP_PREFIX}*")  # the server's own temp folder
        upload = tmp_path / "private_xray.png"
        Image.fromarray(xray_like()).save(upload)
        client = gradio_client.Client(url, verbose=False)
        try:
            status, *_ = client.predict(gradio_client.handle_file(str(upload)), api_name="/predict")
        finally:
            client.close()
        assert "**Detector**" in status
        stored = list(folder.rglob("private_xray.png"))
        assert stored, f"the upload is not in {folder}: {list(folder.rglob('*'))}"
        assert not (temp / "gradio").exists()  # nothing in Gradio's shared folder
        proc.send_signal(stop)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert not folder.exists(), log.read_text()
    assert not list(temp.glob(f"{TEMP_PREFIX}*"))
    assert "Traceback" not in log.read_text()


def test_a_stop_that_hangs_still_exits_and_removes_the_uploads(tmp_path):
    """The watchdog armed by the stop signal: a graceful stop still running after the grace
    period (here a main thread that never returns) removes the temp folder and exits 0."""
    folder = tmp_path / "uploads"
    folder.mkdir()
    (folder / "private_xray.png").write_bytes(b"x")
    code = (
        "import sys, time; from pathlib import Path; from stages.serve.app import stop_watchdog; "
        "stop_watchdog(Path(sys.argv[1]), 0.5); time.sleep(60); sys.exit(3)"
    )
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code, str(folder)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 40
    assert not folder.exists()
    assert "still stopping" in proc.stderr


def test_stop_signal_arms_the_watchdog_once_and_interrupts(tmp_path, monkeypatch):
    from stages.serve import app

    armed = []

    def fake_watchdog(temp):
        armed.append(temp)
        return threading.Timer(60, lambda: None)  # never started

    monkeypatch.setattr(app, "stop_watchdog", fake_watchdog)
    handler = app.StopSignal(tmp_path)
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt, match="signal 2"):
            handler(signal.SIGINT, None)
    assert armed == [tmp_path]


def test_a_finished_stop_disarms_the_watchdog(tmp_path):
    from stages.serve import app

    handler = app.StopSignal(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        handler(signal.SIGTERM, None)
    assert handler.timer is not None and handler.timer.is_alive()
    handler.cancel()
    handler.timer.join(timeout=5)
    assert not handler.timer.is_alive() and tmp_path.exists()
