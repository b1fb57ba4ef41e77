"""Small helpers shared by every stage: seeding, atomic writes, logging, CLI plumbing.

Inputs/outputs: none of their own (helpers). ``run_cli`` is how every command runs its ``main``:
an expected error is one ``error:`` line and exit 2; SIGINT (Ctrl-C) and SIGTERM unwind the
command like an error, so the atomic writers remove their temp files and folders, and end it
with one ``interrupted:`` line and exit 130 / 143 (128 + the signal). A ``kill -9`` cannot be
caught: the temp files it leaves carry the writer's pid, and the next writer of the same output
removes them (``remove_stale_temps``). No run command.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

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
    """Delete ``.<name>.<pid>.*.tmp`` siblings of ``path`` whose writer process is gone.

    Gone: no process has that pid, or the process that has it now started after the temp was
    last changed (the pid was reused, e.g. by a container that restarted with the same pids).
    """
    parent = path.parent
    if not parent.is_dir():
        return
    for tmp in parent.glob(f".{glob.escape(path.name)}.*{TEMP_SUFFIX}*"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        try:
            # ctime, not mtime: a writer may copy old mtimes onto its temp (copy2), but nothing
            # moves the inode change time back, so it is never before the temp was made
            written = tmp.lstat().st_ctime
        except OSError:  # removed meanwhile by its writer
            continue
        if pid.isdigit() and _writer_gone(int(pid), written):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def _writer_gone(pid: int, written: float) -> bool:
    if not _alive(pid):
        return True
    started = process_start_time(pid)
    # the writer of a temp started before it; 2 s: /proc's boot time is whole seconds
    return started is not None and started > written + 2.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (epoch seconds), from /proc; None where that is unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    # field 22 (starttime, clock ticks after boot); the name (field 2) may hold spaces
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError, OSError):
        return None


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
    tmp: Path | None = None
    try:
        with signals_deferred():  # a stop signal between mkstemp and here would leak it
            fd, name = tempfile.mkstemp(
                dir=path.parent, prefix=_temp_prefix(path), suffix=TEMP_SUFFIX + suffix
            )
            os.close(fd)
            tmp = Path(name)
        yield tmp
        with signals_deferred():
            os.chmod(tmp, output_mode())
            os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` atomically (see atomic_file)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_png_atomic(fig: Any, path: str | Path, dpi: int) -> None:
    """Save a matplotlib figure as a PNG atomically and close it, also when the write fails."""
    import matplotlib.pyplot as plt  # noqa: PLC0415  (only the writers of figures need it)

    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (see write_text_atomic)."""
    write_text_atomic(
        path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    )


def replace_marked(text: str, begin: str, end: str, block: str, where: str, fix: str) -> str:
    """``text`` with the part between the marker lines ``begin`` and ``end`` replaced by ``block``.

    Generated parts of hand-written docs live between such markers; ``fix`` is the command that
    writes them.
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
    tmp: Path | None = None
    try:
        with signals_deferred():
            tmp = Path(
                tempfile.mkdtemp(dir=final.parent, prefix=_temp_prefix(final), suffix=TEMP_SUFFIX)
            )
            tmp.chmod(output_mode(directory=True))  # mkdtemp makes 0700
        yield tmp
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    # The swap runs whole: a stop signal waits for it (never a missing ``final``).
    with signals_deferred():
        _swap_in(tmp, final)


def _swap_in(src: Path, final: Path) -> None:
    """Put the folder ``src`` at ``final`` by renames, an existing ``final`` moved aside first
    and then removed (callers defer stop signals around it)."""
    if final.exists():
        old = final.with_name(f"{_temp_prefix(final)}old{TEMP_SUFFIX}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        src.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        src.rename(final)


@contextlib.contextmanager
def atomic_parts(final: str | Path, parts: Sequence[str]) -> Iterator[Path]:
    """``atomic_dir`` for a folder whose sub-folders ``parts`` are separate DVC outputs (a
    stage's consumers depend on one part each: DVC's experiments cannot restore a consumer of a
    path inside a directory output while that output is missing from the cache).

    Yields a temporary folder inside ``final``; on success each part replaces ``final/<part>``
    in one rename, and anything else in ``final`` (DVC's .gitignore) is left alone. On any error
    nothing of ``final`` changes; a part the writer did not make is an error.
    """
    final = Path(final)
    created = not final.exists()
    staging = final / f".parts{TEMP_SUFFIX}"  # git- and dvc-ignored, like every temp
    remove_stale_temps(staging)
    try:
        with atomic_dir(staging) as tmp:
            yield tmp
            missing = [p for p in parts if not (tmp / p).is_dir()]
            if missing:
                raise StageError(f"{final}: the writer made no {', '.join(missing)}")
    except BaseException:
        if created:  # leave no empty folder behind either
            shutil.rmtree(final, ignore_errors=True)
        raise
    # atomic_dir has renamed the finished parts to ``staging``: swap each into place.
    with signals_deferred():
        for part in parts:
            _swap_in(staging / part, final / part)
        shutil.rmtree(staging, ignore_errors=True)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's one-line usage errors: ``error: <what>`` and exit 2, like a
    ``StageError`` under ``run_cli``; the usage is left to ``--help``. Sub-commands inherit it."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def task_arg_parser(description: str) -> argparse.ArgumentParser:
    parser = ArgumentParser(description=description)
    parser.add_argument("--task", choices=TASKS, required=True, help="which chain to run")
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: params.yaml)"
    )
    return parser


def _bounded(
    kind: type, lo: float | None, hi: float | None, lo_open: bool, hi_open: bool = False
) -> Callable:
    name = "an integer" if kind is int else "a number"
    parts = [f"{'>' if lo_open else '>='} {_num(lo)}"] if lo is not None else []
    parts += [f"{'<' if hi_open else '<='} {_num(hi)}"] if hi is not None else []
    wanted = f"{name} {' and '.join(parts)}".strip()

    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        bad = not math.isfinite(value) or (
            lo is not None and (value <= lo if lo_open else value < lo)
        )
        if bad or (hi is not None and (value >= hi if hi_open else value > hi)):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text}")
        return value

    convert.__name__ = wanted  # what argparse names in its own messages
    return convert


def _num(value: float) -> str:
    return str(value) if float(value).is_integer() else f"{value:g}"


def int_in(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An argparse ``type=``: an integer in [lo, hi] (None: unbounded on that side)."""
    return _bounded(int, lo, hi, lo_open=False)


def float_in(
    lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False
) -> Callable[[str], float]:
    """An argparse ``type=``: a finite number in [lo, hi] (open at an end with ``lo_open`` /
    ``hi_open``)."""
    return _bounded(float, lo, hi, lo_open, hi_open)


# Common flags' ranges (one home for each): threads 0 = all usable cores; seeds as numpy takes them.
THREADS = int_in(0, 1024)
SEED = int_in(0, 2**32 - 1)
POSITIVE_INT = int_in(1)
SECONDS = float_in(0, lo_open=True)


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
    """Run a stage's main; turn expected errors into one clear line and exit code 2, and a stop
    signal (SIGINT, SIGTERM) into one ``interrupted:`` line and exit 128 + the signal, after
    the atomic writers removed their temp files (the exception unwinds through them)."""
    setup_logging()
    with _stop_signals_raise():
        try:
            fn()
        except (ConfigError, StageError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt as exc:
            signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
            name = signal.Signals(signum).name
            print(f"interrupted: {name}; stopped, unfinished outputs removed", file=sys.stderr)
            raise SystemExit(128 + signum) from None


class Interrupted(KeyboardInterrupt):
    """A stop signal under ``run_cli``: unwinds like Ctrl-C, so every ``finally`` runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_deferred = threading.local()  # depth of signals_deferred sections, signal waiting


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """A section a stop signal must not cut in two (an atomic writer's rename): the signal
    is raised when the section ends."""
    depth = getattr(_deferred, "depth", 0)
    _deferred.depth = depth + 1
    try:
        yield
    finally:
        _deferred.depth = depth
    pending = getattr(_deferred, "pending", None)
    if depth == 0 and pending is not None:
        _deferred.pending = None
        raise Interrupted(pending)


@contextlib.contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """SIGINT / SIGTERM raise ``Interrupted`` in this process while the block runs (handlers
    restored after). A second signal exits at once (cleanup stuck?); in a forked child (a data
    loader worker) the signals keep their usual effect."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    owner, received = os.getpid(), []

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != owner:
            if signum == signal.SIGINT:
                signal.default_int_handler(signum, frame)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if received:
            os._exit(128 + signum)
        received.append(signum)
        if getattr(_deferred, "depth", 0):
            _deferred.pending = signum
            return
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class StageError(RuntimeError):
    """A stage cannot go on (bad data, missing input); the message says what to do."""


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (``taskset``, a container's cpuset,
    a pinned test worker), which ``os.cpu_count()`` ignores. What ``threads: 0`` means."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no affinity call on this OS
        return os.cpu_count() or 1


def set_torch_threads(n: int) -> None:
    import torch

    n = n or usable_cores()
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # may only be set once per process
        torch.set_num_interop_threads(max(1, min(2, n)))
