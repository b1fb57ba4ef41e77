"""Small helpers shared by every stage: seeding, atomic writes, logging, CLI plumbing."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from stages.config import ConfigError

log = logging.getLogger("stages")
TASKS = ("classification", "detection")


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


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` atomically (temp file + rename) so a crash never leaves half a file.

    An existing file keeps its permissions; a new one gets the usual umask-based mode.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)  # mkstemp makes 0600; outputs are shared like any file
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    stage never leaves half-written outputs behind.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; a team's shared cache needs normal modes
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old")
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
