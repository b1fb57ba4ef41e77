"""The seed scoreboard: every seed system run through the pipeline on the real data, beside the
figure its document published, with the wall time of each run.

Inputs:  the seed systems of ``stages.tools.experiments`` (``SCOREBOARD``: 000 cnn5, 001, 002
         AS-IS and TO-BE, 003 VGG16 binary / 3-class / 4-class), each with the epoch budget of
         ``SCOREBOARD_EPOCHS`` (sized so the whole board runs in about two hours on a 2-core
         CPU), a data root, and the DVC repository in the current directory (on a commit; runs go
         through the experiment queue, one worker: ``stages.tools.queue``).
Outputs: DVC experiments ``board-<name>``; ``reports/seeds_wall_times.json`` (seconds per run and
         the machine each was measured on; ``--report-only`` leaves it as it is);
         ``reports/seeds.md``: per system its test split
         (Kermany's official test, public half (312), for the binary Kermany systems; a
         patient-grouped hold-out for the multi-class ones), ours (accuracy at the validation
         threshold, ROC-AUC, specificity) beside the published figure, epochs, and wall time.
Run:     python -m stages.scoreboard [--data-root ../shared/data] [--names ...] [--replace]
         python -m stages.scoreboard --report-only      (rewrite reports/seeds.md from the runs)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from stages.common import paths
from stages.common.utils import (
    SECONDS,
    ArgumentParser,
    StageError,
    read_json,
    run_cli,
    usable_cores,
    write_json,
    write_text_atomic,
)
from stages.tools import experiments as X
from stages.tools import queue as Q

log = logging.getLogger("stages.tools.scoreboard")
PREFIX = "board-"
# Epochs per system on the scoreboard (the seeds trained 10-100 epochs; early stopping and the
# CPU budget decide here). VGG16 from scratch costs ~7 min per epoch on 2 cores at 150 px.
SCOREBOARD_EPOCHS = {
    "seed000-cnn5": 12,
    "seed001-cnn": 10,
    "seed002-as-is": 12,
    "seed002-to-be": 15,
    "seed003-vgg16-binary": 3,
    "seed003-vgg16-3class": 3,
    "seed003-vgg16-4class": 3,
}
SCOREBOARD = tuple(SCOREBOARD_EPOCHS)


def runs(names: Sequence[str]) -> list[Q.Run]:
    return [
        Q.Run(f"{PREFIX}{n}", n, (f"train_classifier.epochs={SCOREBOARD_EPOCHS[n]}",))
        for n in names
    ]


def collect(show: list, run_names: Sequence[str]) -> dict[str, dict]:
    """{run: figures + finish timestamp} of the newest successful run of each name."""
    keys = ("accuracy", "roc_auc", "specificity")
    found = Q.collect_metrics(show, run_names, keys, paths.CLASSIFICATION.metrics.as_posix())
    for figures in found.values():
        full = Q.rev_json(figures.pop("rev", None), paths.CLASSIFICATION.evaluation) or {}
        figures["n_test"] = Q.number(full.get("n_test"))
    return found


def wall_times(results: dict[str, dict], order: Sequence[str], start: float | None) -> dict:
    """Seconds per run: with one queue worker, the gap between successive completions (the first
    run from ``start``, when known)."""
    from datetime import datetime

    stamps = []
    for name in order:
        ts = (results.get(name) or {}).get("timestamp")
        stamps.append(datetime.fromisoformat(ts).timestamp() if ts else None)
    out = {}
    prev = start
    for name, ts in zip(order, stamps, strict=True):
        if ts is not None and prev is not None and ts > prev:
            out[name] = ts - prev
        prev = ts if ts is not None else prev
    return out


def machine(cpuinfo: str | None = None) -> str:
    """The CPU the wall times were measured on, e.g. ``Intel(R) Xeon(R) Processor, 2 cores``."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8")
        except OSError:  # not Linux: the platform's own name
            import platform

            cpuinfo = f"model name : {platform.processor() or platform.machine()}"
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
         if line.startswith("model name")),
        "unknown CPU",
    )  # fmt: skip
    return f"{model}, {usable_cores()} cores"


def _published(exp: X.Experiment) -> str:
    pub = exp.published
    parts = []
    for label, value in (("test acc", pub.test_accuracy), ("val acc", pub.val_accuracy),
                         ("ROC-AUC", pub.roc_auc)):  # fmt: skip
        if value is not None:
            parts.append(f"{label} {value:g}")
    return "; ".join(parts) or "—"


def measured_now(results: dict[str, dict], order: Sequence[str], start: float | None) -> dict:
    """Wall times of the runs that finished in this call (after ``start``): runs of an earlier
    call keep the time and machine they were measured with."""
    from datetime import datetime

    if start is None:
        return {}
    stamp = {r: (results.get(r) or {}).get("timestamp") for r in order}
    new = [r for r in order if stamp[r] and datetime.fromisoformat(stamp[r]).timestamp() > start]
    return wall_times(results, new, start)


def merge_timing(kept: dict, measured: dict[str, float], where: str) -> dict:
    """The timing file after this call: ``kept`` (the file as read) with the runs measured now
    on ``where``. Every run keeps the machine its own time was measured on (``machines``), so
    a partial re-run (``--names``) on another CPU does not relabel the older times; ``machine``
    is the newest. A file from before ``machines`` existed labels all its runs ``machine``."""
    seconds = dict(kept.get("seconds", {}))
    machines = dict(kept.get("machines") or dict.fromkeys(seconds, kept.get("machine", "")))
    seconds.update(measured)
    machines.update(dict.fromkeys(measured, where))
    newest = where if measured else kept.get("machine", "")
    return {"machine": newest, "seconds": seconds, "machines": machines}


def _where_notes(walls: dict[str, float], runs: Sequence[str], where: str | dict[str, str]):
    """(note per run, text for the total line): nothing per run when one machine made them all."""
    if isinstance(where, str):
        return {}, where
    shown = [where.get(r, "") for r in runs if walls.get(r)]
    distinct = list(dict.fromkeys(shown))
    if len(distinct) <= 1:
        return {}, distinct[0] if distinct else ""
    mark = {m: f"[{chr(ord('a') + i)}]" for i, m in enumerate(distinct)}
    notes = {r: mark[where.get(r, "")] for r in runs if walls.get(r)}
    return notes, "; ".join(f"{mark[m]} {m or 'machine not recorded'}" for m in distinct)


def render(
    results: dict[str, dict],
    walls: dict[str, float],
    names: Sequence[str],
    where: str | dict[str, str] = "",
) -> str:
    """The report; ``where``: one machine for all wall times, or one per run (marked [a], [b]
    ... in the table when they differ)."""
    lines = [
        "# Seed scoreboard: every seed system through this pipeline, on the real data",
        "",
        "Written by `python -m stages.scoreboard` (one queue worker, 2-core CPU). Ours: test",
        "accuracy at the threshold chosen on validation, ROC-AUC and specificity on the test",
        "split. Binary Kermany systems: trained on `kermany224/train` (validation carved by",
        "patient), tested on Kermany's official test, public half (312). Multi-class systems:",
        "a patient-grouped 80/10/10 hold-out (COVID-19 Radiography has no official test split).",
        "The seeds' own figures came from their own splits (a random 20 % of the same images,",
        "or validation), so they are not measured on the same test images as ours.",
        "",
        "| system | experiment | test split | epochs | ours: accuracy | ROC-AUC | specificity "
        "| published (seed document) | wall time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    total = 0.0
    notes, where_text = _where_notes(walls, [f"{PREFIX}{n}" for n in names], where)
    for name in names:
        exp, run = X.get(name), f"{PREFIX}{name}"
        res = results.get(run)
        split = "official test, public half" if X.official_test(name) else "grouped hold-out"
        cell = {
            k: f"{res[k]:.3f}" if res and res.get(k) is not None else "—"
            for k in ("accuracy", "roc_auc", "specificity")
        }
        n = f" ({int(res['n_test'])})" if res and res.get("n_test") else ""
        wall = walls.get(run)
        total += wall or 0.0
        lines.append(
            f"| {exp.title} | `{name}` | {split}{n} | {SCOREBOARD_EPOCHS[name]} | "
            f"{cell['accuracy']} | {cell['roc_auc']} | {cell['specificity']} | {_published(exp)} | "
            f"{f'{wall / 60:.1f} min' if wall else '—'}{f' {notes[run]}' if run in notes else ''} |"
        )
    total_line = f"Total wall time: {total / 60:.0f} min"
    lines += ["", f"{total_line}{f' ({where_text})' if where_text else ''}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", nargs="+", default=list(SCOREBOARD), choices=SCOREBOARD)
    parser.add_argument("--data-root", default=X.DEFAULT_DATA_ROOT)
    parser.add_argument("--timeout", type=SECONDS, default=6 * 3600.0, help="seconds")
    parser.add_argument("--replace", action="store_true", help="run every system again")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report")
    args = parser.parse_args(argv)
    batch = runs(args.names)
    names = [r.name for r in batch]
    start = None
    if not args.report_only:
        if Q.queue(batch, args.data_root, args.replace):
            start = time.time()
        Q.run(names, 1, args.timeout)
    # every commit's runs: the board was run on an older commit than the one that reports it
    results = collect(Q.exp_show(all_commits=True), names)
    if not results:
        raise StageError("no finished scoreboard run: run without --report-only")
    timing = paths.REPORTS / "seeds_wall_times.json"  # measured once, kept for --report-only
    kept = read_json(timing) if timing.is_file() else {}
    measured = measured_now(results, names, start)
    where = ""
    if measured:  # the runs of this call: their machine and finishing day
        last = max(results[n]["timestamp"] for n in measured)
        where = f"{machine()}, {str(last)[:10]}"
    else:  # nothing ran now: times the file lacks come from the runs' gaps, machine unknown
        known = kept.get("seconds", {})
        gaps = wall_times(results, names, None)
        measured = {r: sec for r, sec in gaps.items() if r not in known}
    merged = merge_timing(kept, measured, where)
    if where:  # only a call that ran something writes the measurements
        write_json(timing, merged)
    out = paths.REPORTS / "seeds.md"
    write_text_atomic(out, render(results, merged["seconds"], args.names, merged["machines"]))
    print(out.read_text(), end="")


if __name__ == "__main__":
    run_cli(main)
