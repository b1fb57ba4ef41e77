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


def test_importing_tensorflow_loads_torch_first():
    """The import-order guard (stages/__init__.py): TensorFlow can never come before torch."""
    probe = (
        "import sys, stages; import tensorflow; "
        "order = [m for m in sys.modules if m in ('torch', 'tensorflow')]; print(order)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "['torch', 'tensorflow']"


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
