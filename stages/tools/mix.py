"""mix: several finished classifier runs scored as one model (their mean probability).

evaluate@classification's ensemble rule applied to the runs' committed predictions alone.

Inputs:  two or more runs (a commit, branch, tag or DVC experiment name, resolved as
         ``stages.tools.review`` does), each with reports/classifier/{val_predictions.csv,
         predictions.csv, evaluation.json} as evaluate@classification commits them; read with
         ``git show``: no checkout, no model, no DVC cache. The runs may differ in anything
         (input size, lung crop, architecture, training seed) as long as they scored the same
         validation and test images (matched by path and sha256) under one threshold rule.
Outputs: reports/mixes/<name>.md: for each run and for the mix (the mean of the runs'
         probabilities of the positive class), validation accuracy / ROC-AUC and test accuracy /
         ROC-AUC / specificity / sensitivity, at a threshold fitted on each one's validation
         probabilities by the runs' rule; which one validation picks (ROC-AUC, as this
         project's recipes are chosen) and DeLong's interval of the mix's ROC-AUC minus the
         picked run's, on validation and on test; reports/mixes/<name>.png: the ROC curves.
Run:     python -m stages.mix RUN RUN [RUN ...] [--name NAME] [--out reports/mixes]

Validation decides; the test columns only say whether its choice would have been right. A mix
is not a servable model (each run's preprocessing may differ): register one of its runs, or
train the recipe it points to.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.classifier import metrics as M
from stages.common import paths
from stages.common.utils import (
    ArgumentParser,
    StageError,
    run_cli,
    write_bytes_atomic,
    write_text_atomic,
)
from stages.tools import review as R

log = logging.getLogger("stages.tools.mix")
CLS = paths.CLASSIFICATION
SPLITS = {"val": CLS.val_predictions, "test": CLS.predictions}
MAX_NAME = 100  # longer default names are shortened to the first run, a count and a hash


@dataclass(frozen=True)
class Run:
    """One finished run: its validation and test predictions and its threshold rule."""

    name: str
    rule: tuple[str, float | None]  # (threshold method, its target; None for youden)
    preds: dict[str, R.ClsPreds]  # "val" | "test"


@dataclass(frozen=True)
class Scored:
    """A run's or the mix's figures: threshold fitted on its own validation probabilities."""

    name: str
    threshold: float
    val: dict
    test: dict
    y: dict[str, np.ndarray]
    p: dict[str, np.ndarray]


def read_run(name: str, repo: Path = Path(".")) -> Run:
    """The run's committed predictions and rule; one-line errors for what is missing."""
    tree = R.Tree(R.resolve_rev(name, repo), name, repo)

    def text(path: Path) -> str:
        found = tree.text(path)
        if found is None:
            raise StageError(
                f"{name}: no {path.as_posix()} at {tree.rev.short} (run evaluate@classification "
                "with this version of the repository: `dvc exp run` or `dvc repro`)"
            )
        return found

    doc = json.loads(text(CLS.evaluation))
    if len(doc.get("classes") or []) < 2 or "threshold_method" not in doc:
        raise StageError(f"{name}: {CLS.evaluation} is not a classifier evaluation")
    method = doc["threshold_method"]
    target = doc.get(f"target_{method}") if method in ("sensitivity", "specificity") else None
    preds = {s: R.read_cls_predictions(text(p)) for s, p in SPLITS.items()}
    return Run(name, (method, target), preds)


def threshold_for(rule: tuple[str, float | None], y: np.ndarray, p: np.ndarray) -> float:
    method, target = rule
    kw = {f"target_{method}": target} if target is not None else {}
    return M.select_threshold(y, p, method, **kw)


def score(name: str, rule, y: dict[str, np.ndarray], p: dict[str, np.ndarray]) -> Scored:
    thr = threshold_for(rule, y["val"], p["val"])
    figs = {}
    for s in ("val", "test"):
        b = M.binary_metrics(y[s], p[s], thr)
        figs[s] = {
            "accuracy": b["accuracy"],
            "roc_auc": M.roc_auc(y[s], p[s]),
            "specificity": b["specificity"],
            "sensitivity": b["recall"],
        }
    return Scored(name, thr, figs["val"], figs["test"], y, p)


def mix(runs: Sequence[Run]) -> tuple[list[Scored], Scored]:
    """Each run scored alone, and the mean of their probabilities scored as one model."""
    if len(runs) < 2:
        raise StageError("give at least two runs to mix")
    rules = {r.rule for r in runs}
    if len(rules) > 1:
        raise StageError(
            "the runs choose their thresholds differently ("
            + "; ".join(f"{r.name}: {r.rule[0]} {r.rule[1] or ''}".rstrip() for r in runs)
            + "): mix runs of one evaluate.classification rule"
        )
    ref, keys, y, members, total = runs[0], {}, {}, [], {}
    for r in runs:  # every run in one image order (by key), checked against the first run's
        p = {}
        for split in ("val", "test"):
            cur = r.preds[split].take(np.argsort(r.preds[split].keys, kind="mergesort"))
            if split not in keys:
                keys[split], y[split] = cur.keys, cur.y
            elif not np.array_equal(cur.keys, keys[split]):
                raise StageError(
                    f"{r.name} and {ref.name} scored different {split} images: mix runs of one "
                    "split (the same data root and split params)"
                )
            elif not np.array_equal(cur.y, y[split]):
                bad = int((cur.y != y[split]).sum())
                raise StageError(
                    f"{r.name} and {ref.name} label {bad} {split} images differently (another "
                    "positive class?): mix runs of one task"
                )
            p[split] = cur.p
            total[split] = total.get(split, 0.0) + cur.p
        members.append(score(r.name, r.rule, y, p))
    mean = {s: total[s] / len(runs) for s in total}
    return members, score("mix", ref.rule, y, mean)


def file_safe(name: str) -> str:
    """review's file-safe name of each '+'-joined part, the '+' kept."""
    return "+".join(R.file_safe(part) for part in name.split("+"))


def default_name(names: Sequence[str]) -> str:
    name = "+".join(file_safe(n) for n in names)
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha1("\0".join(names).encode()).hexdigest()[:8]
    return f"{file_safe(names[0])[:60]}+{len(names) - 1}-more-{digest}"


def roc_figure(members: Sequence[Scored], mixed: Scored) -> bytes:
    """ROC on validation and on test: every run thin, the mix thick; dots: operating points."""
    plt = R._plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, split in zip(axes, ("val", "test"), strict=True):
        for k, s in enumerate([*members, mixed]):
            pts = M.roc_points(s.y[split], s.p[split])
            last = s is mixed
            color = "black" if last else plt.cm.tab10(k % 10)
            figs = getattr(s, split)
            ax.plot(
                pts["fpr"],
                pts["tpr"],
                color=color,
                linewidth=2.2 if last else 1.0,
                label=f"{s.name} (AUC {figs['roc_auc']:.3f})",
            )
            ax.plot([1 - figs["specificity"]], [figs["sensitivity"]], "o", color=color)
        ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=1)
        title = "validation (the threshold's)" if split == "val" else "test"
        ax.set(xlabel="false positive rate", ylabel="sensitivity", title=f"ROC, {title}")
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=7)
    return R.png(fig)


def _row(s: Scored) -> str:
    v, t = s.val, s.test
    cells = [v["accuracy"], v["roc_auc"], t["accuracy"], t["roc_auc"]]
    cells += [t["specificity"], t["sensitivity"], s.threshold]
    name = "**mix** (mean probability)" if s.name == "mix" else f"`{s.name}`"
    return f"| {name} | " + " | ".join(f"{c:.4f}" for c in cells) + " |"


def report(members: Sequence[Scored], mixed: Scored, rule, png_name: str) -> str:
    best = max(members, key=lambda s: s.val["roc_auc"])
    picked = mixed if mixed.val["roc_auc"] > best.val["roc_auc"] else best
    ivs = {s: R.delong(best.y[s], best.p[s], mixed.p[s]) for s in ("val", "test")}
    method, target = rule
    lines = [
        f"# A mix of {len(members)} runs",
        "",
        "Written by `python -m stages.mix " + " ".join(s.name for s in members) + "` from the "
        "runs' committed predictions. Each row's threshold is fitted on its own validation "
        f"probabilities ({method}" + (f" {target:g}" if target is not None else "") + "); "
        "the mix is the mean of the runs' probabilities of the positive class.",
        "",
        "| run | val accuracy | val ROC-AUC | test accuracy | test ROC-AUC | test specificity "
        "| test sensitivity | threshold |",
        "|---|---|---|---|---|---|---|---|",
        *[_row(s) for s in [*members, mixed]],
        "",
        f"- Validation picks **{'the mix' if picked is mixed else '`' + picked.name + '`'}** "
        f"(ROC-AUC {picked.val['roc_auc']:.4f}; the best single run is `{best.name}`, "
        f"{best.val['roc_auc']:.4f}).",
    ]
    for split, label in (("val", "validation"), ("test", "test")):
        iv = ivs[split]
        lines.append(
            f"- ROC-AUC, mix - `{best.name}`, {label} ({len(best.y[split])} images): "
            f"{iv.diff:+.4f}, 95 % interval [{iv.lo:+.4f}, {iv.hi:+.4f}] ({iv.method}, "
            f"{R.fmt_p(iv.p)}): {iv.direction}."
        )
    lines += ["", f"![ROC curves of the runs and the mix]({png_name})", ""]
    return "\n".join(lines)


def run_mix(names: Sequence[str], out: Path, name: str | None, repo: Path = Path(".")) -> Path:
    if len(set(names)) < len(names):
        raise StageError("a run is given twice: each run counts once in the mean")
    runs = [read_run(n, repo) for n in names]
    members, mixed = mix(runs)
    name = file_safe(name) if name else default_name(names)
    md, png = Path(out) / f"{name}.md", Path(out) / f"{name}.png"
    write_bytes_atomic(png, roc_figure(members, mixed))
    write_text_atomic(md, report(members, mixed, runs[0].rule, png.name))
    t = mixed.test
    log.info(
        "mix of %d: val ROC-AUC %.4f; test accuracy %.4f roc_auc %.4f specificity %.4f",
        len(runs),
        mixed.val["roc_auc"],
        t["accuracy"],
        t["roc_auc"],
        t["specificity"],
    )
    return md


def main(argv: list[str] | None = None) -> Path:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs", nargs="+", help="two or more commits, branches, tags or experiments"
    )
    parser.add_argument("--name", help="report name (default: the runs' names joined by '+')")
    parser.add_argument("--out", type=Path, default=paths.MIXES, help="report folder")
    parser.add_argument("--repo", type=Path, default=Path("."), help="git repository")
    args = parser.parse_args(argv)
    md = run_mix(args.runs, args.out, args.name, args.repo)
    print(md)
    return md


if __name__ == "__main__":
    run_cli(main)
