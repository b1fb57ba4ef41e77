"""DVC's experiment queue driven from Python: queue named experiments, run the workers, wait.

Inputs: the named experiments of ``stages.tools.experiments`` (each queued run is an experiment
plus optional extra ``-S`` overrides, under a run name of its own), a data root, and the DVC
repository in the current directory (a git repo with a commit: queued experiments run in a copy
of the last commit plus the changes to tracked files). Outputs: queued / finished DVC
experiments; ``dvc exp show --json`` read back. Shared by ``stages.tools.ablations`` (seed 002's
tables), ``stages.tools.repeat`` (one recipe over several training seeds) and
``stages.tools.scoreboard`` (every seed system). No run command of its own.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.common import paths
from stages.common.config import PARAMS_FILE, ConfigError, read_params
from stages.common.utils import StageError
from stages.tools import experiments as X

log = logging.getLogger("stages.tools.queue")
PENDING = ("queued", "running")
_RANK = {"running": 0, "queued": 0, "failed": 1}  # which status of a name parse_status keeps
LOG_TAIL = 25  # lines of `dvc queue logs` shown per failed experiment
_PROGRESS = re.compile(r"^(?P<desc>.*?)\s*\d{1,3}%\|")  # a tqdm frame: "intake:  96%|███▌| ..."


@dataclass(frozen=True)
class Run:
    """One queued run: experiment ``experiment`` (its overrides) plus ``extra`` overrides,
    recorded by DVC under ``name``."""

    name: str
    experiment: str
    extra: tuple[str, ...] = ()


def log_tail(text: str, lines: int) -> list[str]:
    """The last ``lines`` lines of a captured log, each progress bar kept as its last frame only.

    tqdm redraws a bar with carriage returns, which a captured log turns into one line per
    frame: a failed run's tail would show a bar twenty times and hide the error above it.
    """
    out: list[str] = []
    for line in text.strip().splitlines():
        frame = _PROGRESS.match(line)
        prev = _PROGRESS.match(out[-1]) if out and frame else None
        if prev and prev["desc"] == frame["desc"]:
            out[-1] = line
        else:
            out.append(line)
    return out[-lines:]


def _env() -> dict[str, str]:
    """PATH with this interpreter's bin first: DVC's stage commands call plain ``python``."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _dvc(args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    """Run ``dvc <args>``; StageError with DVC's own message when it fails.

    Output goes through a temporary file, not a pipe: ``dvc queue start`` leaves a worker
    behind that inherits the descriptors and would hold a pipe open until the queue is empty.
    """
    argv = [sys.executable, "-m", "dvc", *args]
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=_env(), check=False)
        out.seek(0)
        text = out.read()
    if check and proc.returncode != 0:
        tail = "\n".join(log_tail(text, 15))
        raise StageError(f"`dvc {' '.join(args)}` failed (exit {proc.returncode}):\n{tail}")
    return subprocess.CompletedProcess(argv, proc.returncode, text, "")


def exp_show(all_commits: bool = False) -> list:
    """``dvc exp show --json``: experiments of HEAD's commit (``-A``: of every commit)."""
    return json.loads(
        _dvc(["exp", "show", "--json", *(["-A"] if all_commits else [])]).stdout or "[]"
    )


# ----------------------------------------------------------------------------- dvc exp show


def iter_experiments(show: list) -> Iterator[tuple[str, str, dict]]:
    """(name, state, data) per experiment of ``dvc exp show --json`` (DVC 3.x), newest first.

    Layout: a list of baselines ``{rev, name, data, error, experiments}``; each experiment is
    ``{name, executor: {state, ...} | null, revs: [{rev, name, data, error}]}``; ``data`` holds
    ``params[file]["data"]`` and ``metrics[file]["data"]``. A failed or queued experiment shows the
    baseline's metrics, so callers must look at the state. Executor null = finished (from refs).
    """
    for baseline in show or []:
        for exp in (baseline or {}).get("experiments") or []:
            executor = exp.get("executor") or {}
            for rev in exp.get("revs") or []:
                name = rev.get("name") or exp.get("name") or rev.get("rev", "")[:7]
                state = "failed" if rev.get("error") else executor.get("state") or "success"
                data = dict(rev.get("data") or {})
                data.setdefault("rev", rev.get("rev"))
                yield name, state, data


def rev_json(rev: str | None, path: str | Path) -> dict | None:
    """A JSON output as committed at ``rev`` (an experiment's commit: `dvc exp show --json`
    names it): git-tracked (a report) or DVC-tracked (the training summary, read from the local
    DVC cache); None when absent there."""
    if not rev:
        return None
    proc = subprocess.run(
        ["git", "show", f"{rev}:{Path(path).as_posix()}"], capture_output=True, text=True
    )
    text = proc.stdout if proc.returncode == 0 else _dvc_text(rev, path)
    try:
        doc = json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def _dvc_text(rev: str, path: str | Path) -> str | None:
    """A DVC-tracked file's text at ``rev`` from the local cache, or None."""
    from dvc.exceptions import DvcException
    from dvc.fs import DVCFileSystem

    try:
        return DVCFileSystem(repo=".", rev=rev).read_text(Path(path).as_posix())
    except (DvcException, OSError, KeyError, UnicodeDecodeError):
        return None


def collect_metrics(
    show: list, run_names: Sequence[str], keys: Sequence[str], metrics_file: str
) -> dict[str, dict]:
    """{run: {key: number or None, "timestamp": ...}} of ``metrics_file`` of the newest
    successful run of each name in ``dvc exp show --json``; unfinished names are left out."""
    out: dict[str, dict] = {}
    for name, state, data in iter_experiments(show):
        if name in run_names and name not in out and state == "success":
            doc = get_in(data, "metrics", metrics_file, "data") or {}
            out[name] = {k: number(doc.get(k)) for k in keys} | {
                "timestamp": data.get("timestamp"),
                "rev": data.get("rev"),
            }
    return out


def get_in(node: Any, *keys: str) -> Any:
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok else None


def override_key(override: str) -> str:
    """The params key of a ``-S`` override: ``+a.b=1`` / ``~a.b`` / ``a.b=1`` -> ``a.b``."""
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(
    base: Sequence[str], extra: Sequence[str], params: dict | None = None
) -> list[str]:
    """``base`` with ``extra`` applied: an extra for a key already there replaces it in place
    (DVC keeps only the last -S of a key), new keys are appended. A plain ``key=value`` extra
    becomes ``++key=value`` when it replaces a ``++`` base override or, with ``params``, when
    params.yaml does not list the key (DVC's plain form only changes listed keys; the schemas
    then judge the key)."""
    merged = {override_key(o): o for o in base}
    for o in extra:
        if "=" not in o:
            raise StageError(f"--set {o!r}: expected key=value")
        key = override_key(o)
        if not o.startswith(("+", "~")) and (
            merged.get(key, "").startswith("++")
            or (params is not None and not X.listed(key, params))
        ):
            o = f"++{o}"
        merged[key] = o
    return list(merged.values())


def queue_argv(run: Run, data_root: str) -> list[str]:
    """``dvc exp run --queue -n <name> -S ... <target>`` arguments (without ``dvc``)."""
    argv = ["exp", "run", "--queue", "-n", run.name]
    params = read_params(PARAMS_FILE)
    base = X.overrides_for(run.experiment, data_root, params)
    for override in merge_overrides(base, run.extra, params):
        argv += ["-S", override]
    return [*argv, X.get(run.experiment).target]


def check_params(runs: Sequence[Run], data_root: str, params_file: str | Path = PARAMS_FILE):
    """Each run's params (the committed file + its overrides, applied as ``dvc exp run -S``
    applies them) parsed as check-params parses them (every section, by its stage's schema): a
    value a stage would refuse stops here, before anything is queued, not inside the queued run."""
    from stages.check_params import resolve

    params = read_params(params_file)
    for r in runs:
        overrides = merge_overrides(
            X.overrides_for(r.experiment, data_root, params), r.extra, params
        )
        try:
            applied = X.apply_overrides(params, overrides)
        except ValueError as exc:  # DVC / Hydra refuse an override (unknown key, syntax)
            given = " ".join(f"--set {o}" for o in r.extra) or "its recipe"
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise StageError(f"{r.name}: DVC cannot apply {given} ({first})") from None
        try:
            resolve(applied)
        except ConfigError as exc:
            raise StageError(f"{r.name}: {exc}; nothing was queued") from None


def missing_inputs(name: str, data_root: str) -> list[str]:
    """Local data folders experiment ``name`` reads below ``data_root`` that do not exist."""
    params = dict(X.get(name).params_for(data_root))
    found: list[str] = []
    if params.get("data.root") != X.ROOT:
        return found
    for task in paths.TASKS:
        entries = [params.get(f"data.{task}.path")]
        entries += [e.get("path") for e in params.get(f"data.{task}.sources", ())]
        for rel in entries:
            if rel and "://" not in rel and not (Path(data_root) / rel).exists():
                found.append(f"{data_root}/{rel}")
    return found


def has_commit() -> bool:
    head = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], capture_output=True)
    return head.returncode == 0


def params_changed() -> bool:
    """True when the workspace params.yaml differs from HEAD's. A queued run takes the workspace
    params and applies its overrides on top, so a key the recipe does not set would silently
    come from whatever the workspace holds (``--ensemble`` leaves the first seed's params there)."""
    diff = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", PARAMS_FILE])
    return diff.returncode != 0


def queue(runs: Sequence[Run], data_root: str, replace: bool = False) -> list[str]:
    """Queue each run once; returns the names queued.

    Already queued/running/successful names are kept (so an interrupted batch resumes), failed
    ones are removed and queued again; ``replace`` removes and re-queues them all. The data root
    is made absolute because queued experiments run in a temporary copy of the repository.
    """
    for r in runs:
        X.get(r.experiment)  # unknown names fail before anything is queued
    check_params(runs, str(Path(data_root).resolve()))
    if not has_commit():
        raise StageError("no git commit yet: commit the project first (queued runs use a commit)")
    if params_changed():
        raise StageError(
            f"{PARAMS_FILE} differs from the last commit (an --ensemble run leaves the first "
            "seed's params there): a recipe runs on the committed params plus its own overrides. "
            f"Restore it (git checkout HEAD -- {PARAMS_FILE} dvc.lock) or commit it, then run again"
        )
    root = str(Path(data_root).resolve())
    missing = sorted({p for r in runs for p in missing_inputs(r.experiment, root)})
    if missing:
        raise StageError(f"data not found: {', '.join(missing)}; pass --data-root <folder>")
    states = {}
    for name, state, _ in iter_experiments(exp_show()):
        states.setdefault(name, state)
    drop = [r.name for r in runs if r.name in states and (replace or states[r.name] == "failed")]
    if drop:
        log.info("removing %s", ", ".join(drop))
        _dvc(["exp", "remove", *drop])
    queued = []
    for r in runs:
        if r.name in states and r.name not in drop:
            log.info("%s: already %s, not queued again (use --replace)", r.name, states[r.name])
            continue
        _dvc(queue_argv(r, root))
        queued.append(r.name)
        log.info("queued %s", r.name)
    return queued


# ----------------------------------------------------------------------------- run


def parse_status(text: str) -> tuple[dict[str, str], tuple[int, int] | None]:
    """``dvc queue status`` text -> ({name: status lower-case}, (active, idle) workers)."""
    tasks: dict[str, str] = {}
    workers = None
    for line in text.splitlines():
        parts = line.split()
        if line.startswith("Worker status:"):
            nums = [int(p) for p in line.replace(",", " ").split() if p.isdigit()]
            workers = (nums[0], nums[1]) if len(nums) >= 2 else None
        elif len(parts) >= 3 and parts[0] != "Task":
            # a re-queued name can also have its earlier run listed: pending, then failed, win
            name, status = parts[1], parts[-1].lower()
            if _RANK.get(status, 2) < _RANK.get(tasks.get(name, ""), 3):
                tasks[name] = status
    return tasks, workers


WATCH_EVERY = 1.0  # s between looks at the queue's folders


def queue_dirs() -> tuple[Path, ...]:
    """Where DVC's queue (celery on a filesystem broker) files a task as it starts (its inbox and
    processed folders) and as it ends (its result folder), asked of DVC's own queue app: their
    entries change exactly when a run starts or ends, and listing them costs microseconds, not a
    `dvc` process. Empty outside a DVC repository (then only the ``poll`` asks remain)."""
    from dvc.exceptions import NotDvcRepoError  # noqa: PLC0415  (slow import, needed here only)
    from dvc.repo import Repo  # noqa: PLC0415

    try:
        with Repo() as repo:
            conf = repo.experiments.celery_queue.celery.conf
    except NotDvcRepoError:
        return ()
    folders = conf.broker_transport_options
    result = conf.result_backend.removeprefix("file://")
    return tuple(Path(f) for f in (folders["data_folder_in"], folders["processed_folder"], result))


def queue_fingerprint(dirs: Sequence[Path]) -> tuple:
    """The entries of each of ``dirs`` (None for a folder not there yet)."""
    return tuple(frozenset(os.listdir(d)) if d.is_dir() else None for d in dirs)


def wait(names: Sequence[str], workers: int, timeout: float, poll: float) -> dict[str, str]:
    """Ask ``dvc queue status`` until none of ``names`` is queued or running: every ``poll``
    seconds, and at once when the queue's folders show a run starting or ending (looked at every
    ``WATCH_EVERY`` s), so a finished batch is seen within about a second."""
    deadline, idle_polls, restarted = time.monotonic() + timeout, 0, False
    dirs = queue_dirs() if poll > 0 else ()
    while True:
        tasks, pool = parse_status(_dvc(["queue", "status"]).stdout)
        pending = [n for n in names if tasks.get(n) in PENDING]
        if not pending:
            return tasks
        # DVC reports "0 active" while a task runs in its executor: only queued-but-never-
        # running tasks with no worker at all mean the workers are gone
        running = any(tasks.get(n) == "running" for n in pending)
        idle_polls = idle_polls + 1 if pool == (0, 0) and not running else 0
        if idle_polls >= 3:  # tasks wait but no worker is alive (killed, crashed)
            if restarted:
                raise StageError(f"no queue worker is running for {', '.join(pending)}")
            _dvc(["queue", "start", "-j", str(workers)])
            restarted, idle_polls = True, 0
        if time.monotonic() > deadline:
            raise StageError(
                f"still pending after {timeout:.0f} s: {', '.join(pending)}. The workers keep "
                "going: watch `dvc queue status`, stop them with `dvc queue kill <name>`"
            )
        log.info("waiting for %s", ", ".join(f"{n} ({tasks[n]})" for n in pending))
        seen, next_ask = queue_fingerprint(dirs), time.monotonic() + poll
        while time.monotonic() < next_ask and queue_fingerprint(dirs) == seen:
            time.sleep(min(WATCH_EVERY, max(0.0, next_ask - time.monotonic())))


def run(names: Sequence[str], workers: int, timeout: float, poll: float = 10.0) -> dict[str, str]:
    """Start ``workers`` queue workers, wait, and fail naming each failed experiment + log tail."""
    if workers < 1:
        raise StageError(f"--workers must be >= 1, got {workers}")
    _dvc(["queue", "start", "-j", str(workers)])
    tasks = wait(names, workers, timeout, poll)
    failed = [n for n in names if tasks.get(n) == "failed"]
    if failed:
        logs = []
        for name in failed:
            out = _dvc(["queue", "logs", name], check=False)
            tail = log_tail(out.stdout, LOG_TAIL)
            logs.append(f"--- {name}: last lines of `dvc queue logs {name}`\n" + "\n".join(tail))
        raise StageError(
            f"{len(failed)} experiment(s) failed: {', '.join(failed)}\n" + "\n".join(logs)
        )
    for name in names:
        log.info("%s: %s", name, tasks.get(name, "not in the queue (not queued?)"))
    return tasks
