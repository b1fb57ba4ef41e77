"""Seed 002's two ablation tables, re-run through DVC's experiment queue and reported beside theirs.

Inputs: the named experiments of ``stages.tools.experiments`` (default: the seven ``SEED002_ROWS``), a
data root, and the DVC repository in the current directory (a git repo with a commit: queued
experiments run in a copy of the last commit plus the changes to tracked files).
Outputs: queued DVC experiments; ``reports/ablations.md`` built from ``dvc exp show --json``.
Run (``make ablations`` chains the three):
    python -m stages.tools.ablations queue --data-root ../shared/data [--names ...] [--set k=v] [--replace]
    python -m stages.tools.ablations run --workers 1 [--timeout 86400]
    python -m stages.tools.ablations report --out reports/ablations.md [--show-json saved.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.common import paths
from stages.common.utils import StageError, run_cli, write_text_atomic
from stages.tools import experiments as X

log = logging.getLogger("stages.tools.ablations")
PENDING = ("queued", "running")
_RANK = {"running": 0, "queued": 0, "failed": 1}  # which status of a name parse_status keeps
LOG_TAIL = 25  # lines of `dvc queue logs` shown per failed experiment


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
        tail = "\n".join(text.strip().splitlines()[-15:])
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
                yield name, state, rev.get("data") or {}


def _get(node: Any, *keys: str) -> Any:
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok else None


@dataclass(frozen=True)
class Result:
    """Our figures for one experiment (None = absent); ``state`` as DVC reports it."""

    state: str
    train: float | None = None
    val: float | None = None
    test: float | None = None
    test_05: float | None = None
    roc_auc: float | None = None
    n_test: int | None = None
    params: dict | None = None


def collect(show: list, names: Sequence[str]) -> dict[str, Result]:
    """The newest successful run of each name (else its newest state); absent names left out."""
    out: dict[str, Result] = {}
    for name, state, data in iter_experiments(show):
        if name not in names or (name in out and out[name].state == "success"):
            continue
        if state != "success":
            out.setdefault(name, Result(state))
            continue
        metrics = data.get("metrics") or {}
        train = _get(metrics, paths.CLASSIFICATION.train_metrics.as_posix(), "data")
        test = _get(metrics, paths.CLASSIFICATION.metrics.as_posix(), "data")
        n_test = _number(_get(test, "n_test"))
        out[name] = Result(
            state,
            _number(_get(train, "train_accuracy")),
            _number(_get(train, "val_accuracy")),
            _number(_get(test, "accuracy")),
            _number(_get(test, "accuracy_at_0_5")),
            _number(_get(test, "roc_auc")),
            int(n_test) if n_test is not None else None,
            _get(data, "params", "params.yaml", "data"),
        )
    return out


# ----------------------------------------------------------------------------- queue


def merge_overrides(base: Sequence[str], extra: Sequence[str]) -> list[str]:
    """``base`` with ``extra`` applied: an extra for a key already there replaces it in place
    (DVC keeps only the last -S of a key), new keys are appended."""
    merged = {o.split("=", 1)[0].lstrip("+~"): o for o in base}
    for o in extra:
        if "=" not in o:
            raise StageError(f"--set {o!r}: expected key=value")
        merged[o.split("=", 1)[0].lstrip("+~")] = o
    return list(merged.values())


def queue_argv(name: str, data_root: str, extra: Sequence[str] = ()) -> list[str]:
    """``dvc exp run --queue -n <name> -S ... <target>`` arguments (without ``dvc``)."""
    argv = ["exp", "run", "--queue", "-n", name]
    for override in merge_overrides(X.overrides_for(name, data_root), extra):
        argv += ["-S", override]
    return [*argv, X.get(name).target]


def missing_inputs(name: str, data_root: str) -> list[str]:
    """Paths under ``data_root`` that experiment ``name`` reads but that do not exist."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str) and X.ROOT in value:
            path = value.replace(X.ROOT, data_root)
            if not Path(path).exists():
                found.append(path)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, tuple | list):
            for v in value:
                walk(v)

    walk(tuple(v for _, v in X.get(name).set_params))
    return found


def has_commit() -> bool:
    head = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], capture_output=True)
    return head.returncode == 0


def queue(
    names: Sequence[str], data_root: str, extra: Sequence[str] = (), replace: bool = False
) -> list[str]:
    """Queue each experiment once; returns the names queued.

    Already queued/running/successful names are kept (so ``make ablations`` resumes), failed ones
    are removed and queued again; ``replace`` removes and re-queues them all. The data root is
    made absolute because queued experiments run in a temporary copy of the repository.
    """
    for name in names:
        X.get(name)  # unknown names fail before anything is queued
    if not has_commit():
        raise StageError("no git commit yet: commit the project first (queued runs use a commit)")
    root = str(Path(data_root).resolve())
    missing = sorted({p for n in names for p in missing_inputs(n, root)})
    if missing:
        raise StageError(f"data not found: {', '.join(missing)}; pass --data-root <folder>")
    states = {}
    for name, state, _ in iter_experiments(exp_show()):
        states.setdefault(name, state)
    drop = [n for n in names if n in states and (replace or states[n] == "failed")]
    if drop:
        log.info("removing %s", ", ".join(drop))
        _dvc(["exp", "remove", *drop])
    queued = []
    for name in names:
        if name in states and name not in drop:
            log.info("%s: already %s, not queued again (use --replace)", name, states[name])
            continue
        _dvc(queue_argv(name, root, extra))
        queued.append(name)
        log.info("queued %s", name)
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


def wait(names: Sequence[str], workers: int, timeout: float, poll: float) -> dict[str, str]:
    """Poll ``dvc queue status`` until none of ``names`` is queued or running."""
    deadline, idle_polls, restarted = time.monotonic() + timeout, 0, False
    while True:
        tasks, pool = parse_status(_dvc(["queue", "status"]).stdout)
        pending = [n for n in names if tasks.get(n) in PENDING]
        if not pending:
            return tasks
        idle_polls = idle_polls + 1 if pool == (0, 0) else 0
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
        time.sleep(poll)


def run(names: Sequence[str], workers: int, timeout: float, poll: float = 30.0) -> dict[str, str]:
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
            tail = out.stdout.strip().splitlines()[-LOG_TAIL:]
            logs.append(f"--- {name}: last lines of `dvc queue logs {name}`\n" + "\n".join(tail))
        raise StageError(
            f"{len(failed)} experiment(s) failed: {', '.join(failed)}\n" + "\n".join(logs)
        )
    for name in names:
        log.info("%s: %s", name, tasks.get(name, "not in the queue (not queued?)"))
    return tasks


# ----------------------------------------------------------------------------- report


def _cell(ours: float | None, seed: float | None) -> str:
    mine = f"**{ours:.4f}**" if ours is not None else "—"
    return f"{mine} / {seed:.4f}" if seed is not None else mine


def _row(exp: X.Experiment, res: Result | None) -> str:
    labels = " | ".join(exp.row or (exp.name,))
    if res is None or res.state != "success":
        state = res.state if res else "not run"
        return f"| {labels} | {state} | | | | | `{exp.name}` |"
    pub, f = exp.published, lambda v: f"{v:.4f}" if v is not None else "—"
    return (
        f"| {labels} | {_cell(res.train, pub.train_accuracy)} | {_cell(res.val, pub.val_accuracy)} "
        f"| {_cell(res.test, pub.test_accuracy)} | {f(res.test_05)} | {f(res.roc_auc)} "
        f"| `{exp.name}` |"
    )


def _data_note(results: dict[str, Result]) -> list[str]:
    done = [r for r in results.values() if r.state == "success" and r.params]
    if not done:
        return ["- No finished experiment yet: run `make ablations`."]
    p = done[0].params
    path = _get(p, "data", "classification", "path")
    if path and os.path.isabs(path):  # queued runs got it absolute: show it as the repo sees it
        path = os.path.relpath(path)
    mode = _get(p, "split", "classification", "mode")
    n = sorted({r.n_test for r in done if r.n_test is not None})
    lines = [
        f"- Data: `{_get(p, 'data', 'classification', 'source')}`"
        + (f" from `{path}`" if path else "")
        + f" at {_get(p, 'augment', 'classification', 'image_size')} px, "
        + f"{_get(p, 'train_classifier', 'epochs')} epochs; split mode `{mode}`.",
        f"- **test** = our held-out test split ({'/'.join(map(str, n)) or '?'} images), never "
        "seen in training or model selection. The seed's test was their own 20 % random split.",
    ]
    if "kermany224" in str(path) and mode == "random":
        lines.append(
            "- Only Kermany's train folder exists here (`kermany224/train`), so our test split is "
            "a patient-grouped hold-out of that folder, not Kermany's official test set."
        )
    return lines


def render(results: dict[str, Result], names: Sequence[str]) -> str:
    """The markdown report: seed 002's two tables, ours in bold beside the seed's figure."""
    exps = [X.get(n) for n in names]
    parts = [
        "# Seed 002 ablations: ours beside the published figures",
        "",
        "Each accuracy cell: **ours** / seed 002's figure. Written by "
        "`python -m stages.tools.ablations report` from `dvc exp show --json`.",
        "",
        *_data_note({n: r for n, r in results.items() if n in names}),
        "- val = the validation split at the best epoch, which was selected on it (optimistic); "
        "train = Keras' running accuracy on augmented batches at that epoch "
        "(`metrics/train_classifier.json`).",
        "- test = accuracy at the threshold chosen on validation (`metrics/classifier.json`); "
        "test @0.5 = at 0.5, as the seed's `model.evaluate`; ROC-AUC on test (the seed gave none).",
    ]
    tables = (
        ("loss", "Table 1: output activation, loss, optimizer", "activation | loss | optimizer"),
        (
            "regularisation",
            "Table 2: generator, dropout, optimizer",
            "generator | dropout | optimizer",
        ),
        ("", "Seed 002's systems", "system"),
    )
    for key, title, cols in tables:
        rows = [e for e in exps if e.table == key and (key or e.name in results)]
        if rows:
            width = cols.count("|") + 7
            head = f"| {cols} | train | val | test | test @0.5 | ROC-AUC | experiment |"
            parts += ["", f"## {title}", "", head, "|" + "---|" * width]
            parts += [_row(e, results.get(e.name)) for e in rows]
    return "\n".join(parts) + "\n"


def report(
    out: Path, names: Sequence[str], show_json: Path | None = None, all_commits: bool = False
) -> str:
    show = json.loads(Path(show_json).read_text()) if show_json else exp_show(all_commits)
    text = render(collect(show, names), names)
    write_text_atomic(out, text)
    log.info("wrote %s", out)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    q, r, p = (sub.add_parser(c) for c in ("queue", "run", "report"))
    for s in (q, r, p):
        s.add_argument("--names", nargs="+", default=list(X.SEED002_ROWS), help="experiments")
    q.add_argument("--data-root", default=X.DEFAULT_DATA_ROOT)
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra -S override for every row (replaces the row's own for that key)")  # fmt: skip
    q.add_argument("--replace", action="store_true", help="remove and re-queue existing ones")
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--timeout", type=float, default=86400.0, help="seconds")
    r.add_argument("--poll", type=float, default=30.0, help="seconds between status checks")
    p.add_argument("--out", type=Path, default=paths.REPORTS / "ablations.md")
    p.add_argument("--show-json", type=Path, help="saved `dvc exp show --json` output")
    p.add_argument("--all-commits", action="store_true", help="also experiments of older commits")
    args = parser.parse_args(argv)
    if args.command == "queue":
        queue(args.names, args.data_root, args.set, args.replace)
    elif args.command == "run":
        run(args.names, args.workers, args.timeout, args.poll)
    else:
        report(args.out, args.names, args.show_json, args.all_commits)


if __name__ == "__main__":
    run_cli(main)
