"""Every command line of the project answers ``--help`` at once, without loading a framework.

Heavy frameworks (TensorFlow, torch, torchvision, gradio) load only where a command uses them,
after its arguments and params have been parsed: a typo or ``--help`` costs a fraction of a
second, not the 8 s of importing them. Timings themselves are a benchmark's business; this
asserts the cause (nothing heavy imported) on any machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.imports import REPO

HEAVY = ("tensorflow", "keras", "torch", "torchvision", "gradio", "matplotlib")
COMMANDS = [
    "stages.download",
    "stages.split",
    "stages.augment",
    "stages.train",
    "stages.evaluate",
    "stages.experiments",
    "stages.ablations",
    "stages.docs",
    "stages.repeat",
    "stages.scoreboard",
    "stages.param_table",
    "stages.remote",
    "stages.shift",
    "stages.mix",
]
PROBE = """
import json, runpy, sys
sys.argv = [{mod!r}, "--help"]
try:
    runpy.run_module({mod!r}, run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
print(json.dumps({{"code": code, "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""


@pytest.mark.parametrize("module", COMMANDS)
def test_help_is_light(module):
    probe = PROBE.format(mod=module, heavy=HEAVY)
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] in (0, None), proc.stdout
    assert "usage:" in proc.stdout
    assert result["heavy"] == [], f"{module} --help imported {result['heavy']}"


def test_importing_tensorflow_loads_torch_first_where_triton_is_installed(tmp_path):
    """The import-order guard (stages/__init__.py): where triton can be imported (its LLVM is
    what clashes), TensorFlow can never come before torch. A stand-in triton package that only
    refuses to be imported makes it findable here, where `make setup` removed the real one."""
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("raise ImportError('stand-in triton')\n")
    # Asking for TensorFlow (what `import tensorflow` does first) must already have loaded torch;
    # only asking keeps the probe from paying for TensorFlow's own start-up.
    probe = (
        "import importlib.util, sys, stages; importlib.util.find_spec('tensorflow'); "
        "print([m for m in ('torch', 'tensorflow') if m in sys.modules])"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "['torch']"


def test_without_triton_a_tensorflow_process_does_not_load_torch():
    """Without triton either order is safe, so the guard stays out of the way: a TensorFlow-only
    stage does not pay for torch's start-up. (Asking for a TensorFlow root is what triggers the
    guard; `tf_keras` is one the guard watches and needs no TensorFlow start-up to ask for.)"""
    probe = (
        "import importlib.util, sys, stages; importlib.util.find_spec('tf_keras'); "
        "print(importlib.util.find_spec('triton') is None, 'torch' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "False"]  # no triton here, no torch loaded


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_threads_zero_means_the_cores_the_process_may_use():
    """`threads: 0` (every stage's default, and `--threads 0`) sizes torch's pool by the CPU
    affinity (`taskset`, a container's cpuset, a pinned test worker), not by the machine's core
    count: a process allowed one core runs one thread, never several fighting over it."""
    probe = (
        "import json, os, stages, torch; "
        "from stages.common.utils import set_torch_threads, usable_cores; "
        "from stages.detector.engine import DistInfo, threads_per_process; "
        "set_torch_threads(0); "
        "print(json.dumps([usable_cores(), torch.get_num_threads(), "
        "threads_per_process(0, DistInfo())]))"
    )
    one_core = min(os.sched_getaffinity(0))
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.sched_setaffinity(0, {one_core}),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [1, 1, 1]
    from stages.common.utils import usable_cores

    assert usable_cores() == len(os.sched_getaffinity(0))
