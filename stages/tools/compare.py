"""The experiment table a person can read: `dvc exp show --json` reduced to what defines each row
and how it scored.

Inputs:  `dvc exp show --json` of the repository in the current directory (``--all-commits`` and
         ``--rev`` passed through), or a saved copy (``--show-json FILE``).
Outputs: a table on stdout, one row per commit and experiment: its name and state, the test
         figures of each task whose figures differ between the rows (all tasks when none does:
         classifier accuracy, ROC-AUC, specificity, cam_in_lungs; detector mAP, mAP@0.5, FROC;
         segmenter Dice, IoU, HD95), then the params that differ between the rows (each named
         by the shortest unique tail of its key). A column that does not fit ``--width`` is
         left out and named below the table, never cut. ``--md`` / ``--csv`` print markdown or
         CSV instead (every column).
Run:     python -m stages.compare [--all-commits] [--rev REV] [--width 120] [--md | --csv]
         (``make compare``). Plain ``dvc exp show --only-changed`` shows the same figures
         first, and every other column DVC knows after them.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.common import paths
from stages.common.utils import StageError, run_cli
from stages.tools import queue as Q

# The test figures of each task's headline metrics file, as the columns call them.
FIGURES: dict[str, tuple[tuple[str, str], ...]] = {
    "classification": (
        ("accuracy", "acc"),
        ("roc_auc", "auc"),
        ("specificity", "spec"),
        ("cam_in_lungs", "cam"),
    ),
    "detection": (("map", "mAP"), ("map_50", "mAP50"), ("froc", "FROC")),
    "segmentation": (("dice", "Dice"), ("iou", "IoU"), ("hd95", "HD95")),
}
PRECISION = 3
MISSING = "-"


@dataclass
class Row:
    name: str
    state: str
    params: dict[str, Any]
    metrics: dict[str, dict[str, Any]]  # task -> figures
    baseline: bool = False


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    n_fixed: int  # the leading columns that always stay (experiment, state, figures)
    left_out: list[str] = field(default_factory=list)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _row(name: str, state: str, data: dict, baseline: bool = False) -> Row:
    params: dict[str, Any] = {}
    for doc in (data.get("params") or {}).values():
        params.update(_flatten((doc or {}).get("data") or {}))
    metrics = {}
    for task in paths.TASKS:
        file = paths.task_paths(task).metrics.as_posix()
        doc = Q.get_in(data, "metrics", file, "data")
        if isinstance(doc, dict):
            metrics[task] = doc
    return Row(name, state, params, metrics, baseline)


def rows(show: list) -> list[Row]:
    """Every commit of `dvc exp show --json` (the workspace first) and its experiments."""
    out: list[Row] = []
    for baseline in show or []:
        rev = str(baseline.get("rev", ""))
        name = baseline.get("name") or (rev[:7] if len(rev) == 40 else rev)
        state = "failed" if baseline.get("error") else ""
        out.append(_row(name, state, baseline.get("data") or {}, baseline=True))
        for exp in baseline.get("experiments") or []:
            executor = exp.get("executor") or {}
            for r in exp.get("revs") or []:
                exp_name = r.get("name") or exp.get("name") or str(r.get("rev", ""))[:7]
                exp_state = "failed" if r.get("error") else executor.get("state") or ""
                out.append(_row(exp_name, exp_state, r.get("data") or {}))
    return out


def _fmt(value: Any, figure: bool = False) -> str:
    """A figure to PRECISION decimals; a param as written (1e-05 stays 1e-05)."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and figure:
        return f"{value:.{PRECISION}f}" if math.isfinite(value) else str(value)
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _differs(values: Sequence[Any]) -> bool:
    return len({json.dumps(v, sort_keys=True, default=str) for v in values}) > 1


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Each dotted key -> its shortest tail that no other key shares (``lr`` stays ``lr``)."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if not any(o != key and (o == tail or o.endswith("." + tail)) for o in keys):
                out[key] = tail
                break
        else:
            out[key] = key
    return out


def table(found: list[Row]) -> Table:
    """Columns: experiment, state (when any row has one), the figures of the tasks that differ
    (all tasks with figures when none does), the params that differ."""
    # Queued and failed runs show their baseline's metrics in dvc exp show: never report those.
    for r in found:
        if r.state in ("queued", "running", "failed"):
            r.metrics = {}
    tasks = [t for t in paths.TASKS if any(t in r.metrics for r in found)]
    scored = {t: [r.metrics[t] for r in found if t in r.metrics] for t in tasks}
    varying = [
        t for t in tasks if any(_differs([m.get(k) for m in scored[t]]) for k, _ in FIGURES[t])
    ]
    shown_tasks = varying or tasks
    keys = sorted({k for r in found for k in r.params})
    changed = [k for k in keys if _differs([r.params.get(k) for r in found])]
    names = short_names(changed)
    header = ["experiment"]
    header += ["state"] if any(r.state for r in found) else []
    for t in shown_tasks:
        header += [label for _, label in FIGURES[t]]
    n_fixed = len(header)
    header += [names[k] for k in changed]
    body = []
    for r in found:
        line = [("" if r.baseline else "  ") + r.name]
        line += [r.state] if "state" in header else []
        for t in shown_tasks:
            line += [_fmt(r.metrics.get(t, {}).get(k), figure=True) for k, _ in FIGURES[t]]
        line += [_fmt(r.params.get(k)) for k in changed]
        body.append(line)
    return Table(header, body, n_fixed)


def fit(t: Table, width: int) -> Table:
    """Drop params columns from the right until the text table fits ``width`` (the experiment,
    its state and the figures always stay); the dropped ones are named under the table."""
    header, rows_, left = list(t.header), [list(r) for r in t.rows], []
    while len(header) > t.n_fixed and _width(header, rows_) > width:
        left.insert(0, header.pop())
        for r in rows_:
            r.pop()
    return Table(header, rows_, t.n_fixed, left)


def _widths(header: list[str], rows_: list[list[str]]) -> list[int]:
    return [max(len(str(c)) for c in col) for col in zip(header, *rows_, strict=True)]


def _width(header: list[str], rows_: list[list[str]]) -> int:
    return sum(_widths(header, rows_)) + 2 * (len(header) - 1)


def render_text(t: Table) -> str:
    widths = _widths(t.header, t.rows)
    lines = ["  ".join(h.ljust(w) for h, w in zip(t.header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r in t.rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if t.left_out:
        lines.append(f"(also changed, wider than the terminal: {', '.join(t.left_out)})")
    return "\n".join(lines) + "\n"


def render_md(t: Table) -> str:
    lines = ["| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
    lines += ["| " + " | ".join(c.strip().replace("|", "\\|") for c in r) + " |" for r in t.rows]
    return "\n".join(lines) + "\n"


def render_csv(t: Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(t.header)
    writer.writerows([[c.strip() for c in r] for r in t.rows])
    return buf.getvalue()


def exp_show(all_commits: bool, revs: Sequence[str]) -> list:
    args = ["exp", "show", "--json", *(["-A"] if all_commits else [])]
    for rev in revs:
        args += ["--rev", rev]
    proc = Q._dvc(args)
    try:
        return json.loads(proc.stdout or "[]")
    except json.JSONDecodeError as exc:
        raise StageError(f"dvc exp show --json gave no JSON ({exc}): {proc.stdout[:200]}") from exc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-A", "--all-commits", action="store_true", help="every commit's exps")
    parser.add_argument("--rev", action="append", default=[], help="a commit to show (repeat)")
    parser.add_argument("--show-json", type=Path, help="a saved `dvc exp show --json` output")
    default = shutil.get_terminal_size((int(os.environ.get("COLUMNS", 120)), 24)).columns
    parser.add_argument("--width", type=int, default=default, help="text width (default: terminal)")
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--md", action="store_true", help="markdown, every column")
    fmt.add_argument("--csv", action="store_true", help="CSV, every column")
    args = parser.parse_args(argv)
    if args.width < 40:
        parser.error(f"--width must be at least 40, got {args.width}")
    if args.show_json:
        show = json.loads(args.show_json.read_text())
    else:
        show = exp_show(args.all_commits, args.rev)
    t = table(rows(show))
    if args.md:
        text = render_md(t)
    elif args.csv:
        text = render_csv(t)
    else:
        text = render_text(fit(t, args.width))
    sys.stdout.write(text)


if __name__ == "__main__":
    run_cli(main)
