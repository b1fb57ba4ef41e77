"""Bad arguments to the commands stop at once, in one ``error:`` line, before any work.

- Every numeric flag of a user-facing command refuses an out-of-range value (exit 2, one line,
  no framework loaded): one table, run in one child process.
- An unknown recipe name (``stages.repeat``, ``stages.experiments``): one line with the close
  matches, not a KeyError traceback.
- ``stages.repeat`` / ``stages.ablations``: a seed numpy cannot take, a ``--set`` value a stage's
  schema refuses, ``--workers 0``: refused before anything is fetched or queued (the queue
  functions are replaced by recorders that must stay unused).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stages.common.utils import StageError
from stages.tools import queue as Q
from stages.tools import repeat as R
from tests.imports import REPO

HEAVY = ("tensorflow", "keras", "torch", "torchvision", "gradio", "matplotlib")
# (command, arguments, the flag the one error line must name)
OUT_OF_RANGE = [
    ("stages.predict", ["x.png", "--min-score", "-1"], "--min-score"),
    ("stages.predict", ["x.png", "--min-score", "1.5"], "--min-score"),
    ("stages.predict", ["x.png", "--threads", "-5"], "--threads"),
    ("stages.serve", ["--port", "0"], "--port"),
    ("stages.serve", ["--port", "70000"], "--port"),
    ("stages.serve", ["--max-upload-mb", "0"], "--max-upload-mb"),
    ("stages.serve", ["--max-upload-mb", "nan"], "--max-upload-mb"),
    ("stages.serve", ["--min-score", "-0.1"], "--min-score"),
    ("stages.serve", ["--threads", "-5"], "--threads"),
    ("stages.repeat", ["seed002-to-be", "--seeds", "-1"], "--seeds"),
    ("stages.repeat", ["seed002-to-be", "--seeds", str(2**40)], "--seeds"),
    ("stages.repeat", ["seed002-to-be", "--workers", "0"], "--workers"),
    ("stages.repeat", ["seed002-to-be", "--timeout", "0"], "--timeout"),
    ("stages.repeat", ["seed002-to-be", "--timeout", "inf"], "--timeout"),
    ("stages.ablations", ["run", "--workers", "0"], "--workers"),
    ("stages.ablations", ["run", "--timeout", "-1"], "--timeout"),
    ("stages.ablations", ["run", "--poll", "0"], "--poll"),
    ("stages.scoreboard", ["--timeout", "-5"], "--timeout"),
    ("stages.review", ["HEAD", "HEAD~1", "--seed", "-1"], "--seed"),
    ("stages.review", ["HEAD", "HEAD~1", "--resamples", "5"], "--resamples"),
    ("stages.review", ["HEAD", "HEAD~1", "--ci", "1"], "--ci"),
]
PROBE = """
import contextlib, io, json, runpy, sys
cases = json.loads(sys.argv[1])
results = []
for module, args in cases:
    sys.argv = [module, *args]
    err = io.StringIO()
    code = "returned"
    with contextlib.redirect_stderr(err):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code
    results.append({"code": code, "err": err.getvalue()})
print(json.dumps({"results": results, "heavy": [m for m in sys.argv[2].split(",")
                                                 if m in sys.modules]}))
"""


def test_every_numeric_flag_refuses_out_of_range_values_in_one_line():
    cases = [[module, args] for module, args, _ in OUT_OF_RANGE]
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(cases), ",".join(HEAVY)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for (module, args, flag), got in zip(OUT_OF_RANGE, report["results"], strict=True):
        lines = got["err"].strip().splitlines()
        assert got["code"] == 2, (module, args, got)
        assert len(lines) == 1 and lines[0].startswith("error:"), (module, args, got["err"])
        assert flag in lines[0], (module, args, lines[0])
    assert report["heavy"] == [], f"a refused flag loaded {report['heavy']}"


@pytest.mark.parametrize("module", ["stages.repeat", "stages.experiments"])
def test_an_unknown_recipe_is_one_line_with_the_close_matches(module):
    proc = subprocess.run(
        [sys.executable, "-m", module, "ours-kermany-bst"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    # the closest match first (difflib may add other Kermany recipes after it)
    assert line.startswith(
        "error: unknown experiment 'ours-kermany-bst'; did you mean ours-kermany-best"
    ), line


@pytest.fixture
def no_queue(monkeypatch):
    """Every way out to DVC or the network recorded: a test asserts none was taken."""
    calls: list[str] = []

    def record(name):
        def fake(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called: something was queued or fetched")

        return fake

    monkeypatch.setattr(Q, "_dvc", record("dvc"))
    monkeypatch.setattr(Q, "queue", record("queue"))
    monkeypatch.setattr(Q, "run", record("run"))
    monkeypatch.setattr(R.W, "fetch", record("fetch"))
    monkeypatch.chdir(REPO)  # the committed params.yaml the runs start from
    return calls


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--seeds", "-1"], ["--seeds", "-1"]),
        (["--seeds", "1", str(2**40)], ["--seeds", str(2**40)]),
        (["--workers", "0"], ["--workers"]),
        (["--set", "train_classifier.epochs=-4", "--tag", "neg"], ["epochs", "-4"]),
        (["--set", "augment.classification.image_size=8", "--tag", "tiny"], ["image_size"]),
    ],
    ids=["negative-seed", "seed-over-2**32", "no-workers", "negative-epochs", "tiny-images"],
)
def test_repeat_refuses_before_anything_is_queued(no_queue, capsys, argv, words):
    with pytest.raises((SystemExit, StageError)) as info:
        R.main(["seed002-to-be", "--seeds", "1", "2", *argv])
    text = str(info.value) if isinstance(info.value, StageError) else capsys.readouterr().err
    if isinstance(info.value, SystemExit):
        assert info.value.code == 2 and len(text.strip().splitlines()) == 1, text
    for word in words:
        assert word in text, text
    assert no_queue == []


def test_ablations_refuse_a_bad_set_value_before_anything_is_queued(monkeypatch, tmp_path):
    from stages.tools import ablations as A

    calls = []

    def dvc(args, check=True):
        calls.append(list(args))
        raise AssertionError(f"dvc {args} called")

    monkeypatch.setattr(Q, "_dvc", dvc)
    monkeypatch.setattr(Q, "has_commit", lambda: True)
    monkeypatch.setattr(Q, "params_changed", lambda: False)
    monkeypatch.chdir(REPO)
    for folder in ("kermany224", "kermany_test_public"):  # the rows' data, found
        (tmp_path / folder).mkdir()
    argv = ["queue", "--names", "seed002-to-be", "--data-root", str(tmp_path)]
    with pytest.raises(StageError, match="seed002-to-be: train_classifier: epochs must be >= 1"):
        A.main([*argv, "--set", "train_classifier.epochs=-4"])
    assert calls == []
