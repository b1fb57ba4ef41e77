"""Small helpers shared by every stage: seeding, atomic writes, logging, CLI plumbing."""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from stages.common.config import ConfigError
from stages.common.paths import TASKS

log = logging.getLogger("stages")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and, when they are already imported, torch and TensorFlow/Keras.

    The one place seeds are set. Deterministic kernels are requested too: bit-identical CPU
    results matter more here than the few percent of speed they cost.
    Pinned: TF via ``enable_op_determinism`` (the API form of ``TF_DETERMINISTIC_OPS=1``; also
    fixes tf.data's parallel map order), torch via ``use_deterministic_algorithms`` (warn-only:
    an op without a deterministic kernel warns instead of failing). Not pinned here: thread
    counts (each stage's ``threads`` param) change float reduction order, so compare runs with
    equal counts; PYTHONHASHSEED only reaches child processes (tests/test_reproducibility.py).
    """
    random.seed(seed)
    np.random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    if "torch" in sys.modules:
        import torch

        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
    if "keras" in sys.modules or "tensorflow" in sys.modules:
        import keras

        keras.utils.set_random_seed(seed)
        import tensorflow as tf

        with contextlib.suppress(AttributeError, RuntimeError):
            tf.config.experimental.enable_op_determinism()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def output_mode(directory: bool = False) -> int:
    """The one permission rule of every output: 0666 (files) / 0777 (folders) under the umask,
    i.e. 0644 / 0755 with the usual umask 022. Temp files (mkstemp: 0600) are given it before
    the rename, so a team's shared cache and the files a command writes stay readable."""
    return (0o777 if directory else 0o666) & ~_umask()


def _temp_prefix(path: Path) -> str:
    # The pid in the name lets the next writer of ``path`` remove what a killed one left behind.
    return f".{path.name}.{os.getpid()}."


TEMP_SUFFIX = ".tmp"  # git- and dvc-ignored (.gitignore, .dvcignore)


def remove_stale_temps(path: Path) -> None:
    """Delete ``.<name>.<pid>.*.tmp`` siblings of ``path`` whose writer process is gone."""
    parent = path.parent
    if not parent.is_dir():
        return
    for tmp in parent.glob(f".{glob.escape(path.name)}.*{TEMP_SUFFIX}*"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it becomes ``path`` in one rename.

    The one atomic file writer of the project (text, JSON, PNG, models, checkpoints, predict
    output): a crash or an error never leaves half a file, the old file stays until the rename,
    and the result gets ``output_mode()``. Refuses a ``path`` that is an existing folder.
    ``suffix`` is appended to the temp name for writers that check it (Keras wants ``.keras``).
    """
    path = Path(path)
    if path.is_dir():
        raise StageError(f"{path} is a folder; give a file name to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, name = tempfile.mkstemp(
        dir=path.parent, prefix=_temp_prefix(path), suffix=TEMP_SUFFIX + suffix
    )
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, output_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` atomically (see atomic_file)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (see write_text_atomic)."""
    write_text_atomic(
        path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    )


def replace_marked(text: str, begin: str, end: str, block: str, where: str, fix: str) -> str:
    """``text`` with the part between the marker lines ``begin`` and ``end`` replaced by ``block``.

    Generated README sections live between such markers; ``fix`` is the command that writes them.
    """
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise StageError(
            f"{where} needs exactly one {begin} line followed by one {end} line around the "
            f"generated text; add them, then run {fix}"
        )
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{block}{end}{tail}"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return obj.as_posix()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | Path) -> Any:
    with Path(path).open() as fh:
        return json.load(fh)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``final`` in one rename.

    On any error the temporary directory is removed and ``final`` is left as it was, so a failed
    stage never leaves half-written outputs behind; one left by a killed process is removed by
    the next writer of ``final`` (see remove_stale_temps).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=_temp_prefix(final), suffix=TEMP_SUFFIX))
    tmp.chmod(output_mode(directory=True))  # mkdtemp makes 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f"{_temp_prefix(final)}old{TEMP_SUFFIX}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def task_arg_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--task", choices=TASKS, required=True, help="which chain to run")
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: params.yaml)"
    )
    return parser


# The task packages a task-dispatching stage (augment, evaluate) loads: one task's run never
# imports the other task's package, so each chain's dvc.yaml deps name only its own code.
TASK_PACKAGES = {
    "classification": "stages.classifier",
    "detection": "stages.detector",
    "segmentation": "stages.segmenter",
}


def task_module(task: str, name: str) -> types.ModuleType:
    """``stages.<classifier|detector|segmenter>.<name>`` for ``task``, imported on demand."""
    return importlib.import_module(f"{TASK_PACKAGES[task]}.{name}")


def run_cli(fn: Callable[[], Any]) -> None:
    """Run a stage's main; turn expected errors into one clear line and exit code 2."""
    setup_logging()
    try:
        fn()
    except (ConfigError, StageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


class StageError(RuntimeError):
    """A stage cannot go on (bad data, missing input); the message says what to do."""


def set_torch_threads(n: int) -> None:
    import torch

    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # may only be set once per process
        torch.set_num_interop_threads(max(1, min(2, n)))
