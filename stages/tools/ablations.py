"""Seed 002's two ablation tables, re-run through DVC's experiment queue and reported beside theirs.

Inputs: the named experiments of ``stages.tools.experiments`` (default: the seven ``SEED002_ROWS``), a
data root, and the DVC repository in the current directory (``stages.tools.queue``).
Outputs: queued DVC experiments; ``reports/ablations.md`` built from ``dvc exp show --json``.
Run (``make ablations`` chains the three):
    python -m stages.ablations queue --data-root ../shared/data [--names ...] [--set k=v] [--replace]
    python -m stages.ablations run --workers 1 [--timeout 86400]
    python -m stages.ablations report --out reports/ablations.md [--show-json saved.json]
The rows in a table while they run: ``python -m stages.compare`` (``make compare``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stages.common import paths
from stages.common.utils import POSITIVE_INT, SECONDS, ArgumentParser, run_cli, write_text_atomic
from stages.tools import experiments as X
from stages.tools import queue as Q

log = logging.getLogger("stages.tools.ablations")


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
    rev: str | None = None  # the experiment's commit


def collect(show: list, names: Sequence[str]) -> dict[str, Result]:
    """The newest successful run of each name (else its newest state); absent names left out."""
    out: dict[str, Result] = {}
    for name, state, data in Q.iter_experiments(show):
        if name not in names or (name in out and out[name].state == "success"):
            continue
        if state != "success":
            out.setdefault(name, Result(state))
            continue
        metrics = data.get("metrics") or {}
        test = Q.get_in(metrics, paths.CLASSIFICATION.metrics.as_posix(), "data")
        # the training summary and the full evaluation are reports of the run's commit
        train = Q.rev_json(data.get("rev"), paths.CLASSIFICATION.training) or {}
        full = Q.rev_json(data.get("rev"), paths.CLASSIFICATION.evaluation) or {}
        n_test = Q.number(full.get("n_test"))
        out[name] = Result(
            state,
            Q.number(train.get("train_accuracy")),
            Q.number(train.get("val_accuracy")),
            Q.number(Q.get_in(test, "accuracy")),
            Q.number(Q.get_in(full, "at_0_5", "accuracy")),
            Q.number(Q.get_in(test, "roc_auc")),
            int(n_test) if n_test is not None else None,
            Q.get_in(data, "params", "params.yaml", "data"),
            data.get("rev"),
        )
    return out


# ----------------------------------------------------------------------------- queue


def queue(
    names: Sequence[str], data_root: str, extra: Sequence[str] = (), replace: bool = False
) -> list[str]:
    """Queue the rows (``extra`` overrides applied to every one); see ``stages.tools.queue``."""
    return Q.queue([Q.Run(n, n, tuple(extra)) for n in names], data_root, replace)


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
        f"| `{exp.name}`{f' ({res.rev[:7]})' if res.rev else ''} |"
    )


def data_sources(params: dict) -> str:
    """The classification data a run's params name: each source (a ``sources`` entry, or
    ``source``/``path``) with its folder below ``data.root``, and which one is the test set."""
    root = Q.get_in(params, "data", "root") or ""
    if root and os.path.isabs(root):  # queued runs got it absolute: show it as the repo sees it
        rel = os.path.relpath(root)  # (../shared/data), unless that climbs further than a sibling
        root = rel if not rel.startswith(os.path.join(os.pardir, os.pardir)) else root
    entries = Q.get_in(params, "data", "classification", "sources") or [
        {
            "name": Q.get_in(params, "data", "classification", "source") or "synthetic",
            "path": Q.get_in(params, "data", "classification", "path"),
        }
    ]
    parts = []
    for e in entries:
        where = f" from `{os.path.join(root, e['path'])}`" if e.get("path") else ""
        parts.append(f"`{e['name']}`{where}" + (" (test)" if e.get("split") == "test" else ""))
    return ", ".join(parts)


def _data_note(results: dict[str, Result]) -> list[str]:
    done = [r for r in results.values() if r.state == "success" and r.params]
    if not done:
        return ["- No finished experiment yet: run `make ablations`."]
    p = done[0].params
    path = data_sources(p)
    mode = Q.get_in(p, "split", "classification", "mode") or "random"
    n = sorted({r.n_test for r in done if r.n_test is not None})
    size = Q.get_in(p, "augment", "classification", "image_size")
    lines = [
        f"- Data: {path} at {size} px, "
        + f"{Q.get_in(p, 'train_classifier', 'epochs')} epochs; split mode `{mode}`.",
        f"- **test** = {'the source marked (test)' if '(test)' in path else 'our held-out test split'}"
        f" ({'/'.join(map(str, n)) or '?'} images), never seen in training or model selection. "
        "The seed's test was their own 20 % random split.",
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
        "`python -m stages.ablations report` from `dvc exp show --json`.",
        "",
        *_data_note({n: r for n, r in results.items() if n in names}),
        "- val = the validation split at the best epoch, which was selected on it (optimistic); "
        "train = Keras' running accuracy on augmented batches at that epoch "
        "(`reports/live/classifier/training.json` of each run).",
        "- test = accuracy at the threshold chosen on validation (`metrics/classifier.json`); "
        "test @0.5 = at 0.5, as the seed's `model.evaluate`; ROC-AUC on test (the seed gave none).",
        "- experiment = the `dvc exp` name and, in brackets, the commit that holds its results "
        "(`dvc exp apply` it, or `python -m stages.review HEAD <name>`).",
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
    show = json.loads(Path(show_json).read_text()) if show_json else Q.exp_show(all_commits)
    text = render(collect(show, names), names)
    write_text_atomic(out, text)
    log.info("wrote %s", out)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    q, r, p = (sub.add_parser(c) for c in ("queue", "run", "report"))
    for s in (q, r, p):
        s.add_argument("--names", nargs="+", default=list(X.SEED002_ROWS), help="experiments")
    q.add_argument("--data-root", default=X.DEFAULT_DATA_ROOT)
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra -S override for every row (replaces the row's own for that key)")  # fmt: skip
    q.add_argument("--replace", action="store_true", help="remove and re-queue existing ones")
    r.add_argument("--workers", type=POSITIVE_INT, default=1)
    r.add_argument("--timeout", type=SECONDS, default=86400.0, help="seconds")
    r.add_argument(
        "--poll",
        type=SECONDS,
        default=10.0,
        help="seconds between `dvc queue status` checks (a run starting or ending is seen within ~1 s)",
    )
    p.add_argument("--out", type=Path, default=paths.REPORTS / "ablations.md")
    p.add_argument("--show-json", type=Path, help="saved `dvc exp show --json` output")
    p.add_argument("--all-commits", action="store_true", help="also experiments of older commits")
    args = parser.parse_args(argv)
    if args.command == "queue":
        queue(args.names, args.data_root, args.set, args.replace)
    elif args.command == "run":
        Q.run(args.names, args.workers, args.timeout, args.poll)
    else:
        report(args.out, args.names, args.show_json, args.all_commits)


if __name__ == "__main__":
    run_cli(main)
