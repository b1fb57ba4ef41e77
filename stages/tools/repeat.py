"""One recipe over several training seeds: the spread of its figures, and their ensemble.

Inputs:  a named experiment of ``stages.tools.experiments``, training seeds, a data root, the DVC
         repository in the current directory (on a commit: runs go through the experiment queue,
         ``stages.tools.queue``).
Outputs: DVC experiments ``<name>[-<tag>]-seed<N>`` (each with its own model and metrics);
         ``reports/repeats/<name>[-<tag>].md``: every seed's test figures and their mean +- sd
         (MedMNIST+ style: sample sd over seeds), with the hold-out beside them (validation
         accuracy / AUC and the largest epoch-to-epoch fall of validation accuracy); with
         ``--ensemble`` the seeds' models averaged as one model, scored by the evaluate stage on
         the recipe's data: the workspace takes the first seed's params.yaml, dvc.lock and
         classification cache, the models are copied to
         ``models/ensemble/``, and ``metrics/classifier.json`` / ``reports/classifier/`` then
         hold the ensemble's figures (``dvc status`` shows evaluate@classification changed:
         ``dvc repro`` would score the single model again).
Run:     python -m stages.repeat NAME [--seeds 1 2 3] [--data-root ../shared/data] [--ensemble]
         [--set KEY=VALUE ... --tag TAG] [--workers 1] [--timeout 86400] [--report-only]
         ``--set`` changes the recipe for every seed (a variant, compared over the same seeds);
         ``--tag`` names the variant, so its runs and report never mix with the recipe's own.
"""

from __future__ import annotations

import logging
import re
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path

from stages.common import paths
from stages.common.cache import PARTS
from stages.common.utils import (
    POSITIVE_INT,
    SECONDS,
    SEED,
    ArgumentParser,
    StageError,
    run_cli,
    write_bytes_atomic,
    write_text_atomic,
)
from stages.tools import experiments as X
from stages.tools import queue as Q
from stages.tools import weights as W

log = logging.getLogger("stages.tools.repeat")
FIGURES = ("accuracy", "roc_auc", "specificity", "cam_in_lungs", "n_test")
FINISHED = FIGURES[:3]  # a finished run has these (cam_in_lungs needs a model Grad-CAM reads)
# Hold-out (validation) figures of the training run, beside the test ones: the gap between the
# two is the distribution shift; the largest epoch-to-epoch fall says whether training was stable.
HOLDOUT = {"val_accuracy": "val acc", "val_auc": "val AUC", "val_accuracy_max_drop": "max val drop"}
ENSEMBLE_DIR = paths.MODELS / "ensemble"


def seed_key(name: str) -> str:
    """The params key of the training seed of experiment ``name``'s model."""
    return (
        "train_detector.seed"
        if X.get(name).target.endswith("@detection")
        else ("train_classifier.seed")
    )


def variant(name: str, tag: str | None) -> str:
    """The name of recipe ``name`` changed by ``--set`` overrides and labelled ``tag``."""
    return f"{name}-{tag}" if tag else name


def runs(
    name: str, seeds: Sequence[int], extra: Sequence[str] = (), tag: str | None = None
) -> list[Q.Run]:
    """One queued run per seed: the recipe, then ``extra`` overrides, then the seed."""
    key = seed_key(name)
    if extra and not tag:
        raise StageError("--set changes the recipe: name the variant with --tag")
    if tag is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.]*", tag):
        raise StageError(f"--tag {tag!r}: use letters, digits, '_' and '.' (it names DVC runs)")
    for o in extra:
        if Q.override_key(o) == key:
            raise StageError(f"--set {o!r}: the seed is set by --seeds")
    return [Q.Run(f"{variant(name, tag)}-seed{s}", name, (*extra, f"{key}={s}")) for s in seeds]


def collect(show: list, run_names: Sequence[str]) -> dict[str, dict]:
    """{run name: {figure: value}} of the newest successful run of each name: the test figures
    of its metrics, n_test from its evaluation report and the hold-out from its training
    summary (both read at the run's commit)."""
    found = Q.collect_metrics(show, run_names, FIGURES, paths.CLASSIFICATION.metrics.as_posix())
    out = {}
    for name, figures in found.items():
        rev = figures.pop("rev", None)
        figures.pop("timestamp", None)
        full = Q.rev_json(rev, paths.CLASSIFICATION.evaluation) or {}
        train = Q.rev_json(rev, paths.CLASSIFICATION.training) or {}
        figures["n_test"] = Q.number(full.get("n_test"))
        out[name] = figures | {k: Q.number(train.get(k)) for k in HOLDOUT}
    return out


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def render(
    name: str,
    results: dict[str, dict],
    ensemble: dict | None,
    extra: Sequence[str] = (),
    tag: str | None = None,
    seeds: Sequence[int] = (),
) -> str:
    exp = X.get(name)
    # the command as run (a --set value may hold spaces: quoted)
    written_by = X.repeat_command(name, seeds, ensemble=bool(ensemble), sets=extra, tag=tag)
    changed = f", changed by `{' '.join(extra)}`" if extra else ""
    lines = [
        f"# `{variant(name, tag)}` over training seeds",
        "",
        f"{exp.title}{changed}. Written by `{written_by}` from",
        "`dvc exp show --json`;",
        "test = the recipe's test split at the threshold chosen on validation (for",
        "`ours-kermany-best`: Kermany's official test, public half (312)).",
        "",
        "Beside them, the hold-out: the validation split carved from train by patient, on which",
        "the epoch and the threshold were chosen (so optimistic), and the largest fall of",
        "validation accuracy between two epochs of the run.",
        "",
        "| run | " + " | ".join((*FIGURES, *HOLDOUT.values())) + " |",
        "|---" * (len(FIGURES) + len(HOLDOUT) + 1) + "|",
    ]
    for run, figs in results.items():
        cells = [_fmt(figs.get(k)) for k in (*FIGURES, *HOLDOUT)]
        lines.append(f"| `{run}` | " + " | ".join(cells) + " |")
    done = [f for f in results.values() if all(f.get(k) is not None for k in FINISHED)]
    if len(done) > 1:  # a mean +- sd of one run says nothing
        cells = []
        for k in (*FIGURES[:-1], None, *HOLDOUT):
            values = [f[k] for f in done if f.get(k) is not None] if k else []
            if values:
                m, sd = mean_sd(values)
                cells.append(f"{m:.3f} +- {sd:.3f}")
            else:
                cells.append("")
        lines.append(f"| mean +- sd ({len(done)} seeds) | " + " | ".join(cells).rstrip() + " |")
    if ensemble:
        cells = [_fmt(ensemble.get(k)) for k in FIGURES] + [""] * len(HOLDOUT)
        lines.append(
            f"| ensemble of {len(done)} (mean probability) | " + " | ".join(cells).rstrip() + " |"
        )
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if v is None:
        return "—"
    return str(int(v)) if float(v).is_integer() and v > 1 else f"{v:.4f}"


def experiment_revs(show: list) -> dict[str, str]:
    """{experiment name: its git commit} from ``dvc exp show --json`` (newest first wins)."""
    out: dict[str, str] = {}
    for baseline in show or []:
        for exp in (baseline or {}).get("experiments") or []:
            for rev in exp.get("revs") or []:
                name = rev.get("name") or exp.get("name")
                if name and rev.get("rev") and not rev.get("error"):
                    out.setdefault(name, rev["rev"])
    return out


def ensemble(run_names: Sequence[str]) -> dict:
    """Score the runs' models, averaged, as one model on the first run's data.

    The workspace takes the first run's params.yaml and dvc.lock and checks out the outputs the
    evaluation reads (its classification cache and the test films' lungs); each run's model and
    sidecar are read from the DVC cache at that run's commit (``dvc.api.open``) into
    ``models/ensemble/``. Only what the
    classification chain produced is needed, so experiments that never ran the detection chain
    work (``dvc exp apply`` would insist on every output of dvc.lock).
    """
    import dvc.api

    from stages import evaluate
    from stages.common.utils import read_json

    revs = experiment_revs(Q.exp_show(all_commits=True))
    missing = [r for r in run_names if r not in revs]
    if missing:
        raise StageError(f"no commit of {', '.join(missing)} in `dvc exp show`")
    first = revs[run_names[0]]
    subprocess.run(["git", "checkout", first, "--", "params.yaml", "dvc.lock"], check=True)
    # the cache's two outputs, and the test films' lungs (cam_in_lungs of the ensemble)
    c = paths.CLASSIFICATION
    outs = [*(c.augment / part for part in PARTS), c.lungs_meter]
    Q._dvc(["checkout", *(o.as_posix() for o in outs), "--force"])
    ENSEMBLE_DIR.mkdir(parents=True, exist_ok=True)
    models = []
    for run in run_names:
        target = ENSEMBLE_DIR / f"{run}.keras"
        for src, dst in ((paths.CLASSIFIER_MODEL, target),
                         (paths.CLASSIFIER_SIDECAR, target.with_suffix(".meta.json"))):  # fmt: skip
            with dvc.api.open(src.as_posix(), rev=revs[run], mode="rb") as fh:
                write_bytes_atomic(dst, fh.read())
        models.append(target)
    evaluate.evaluate("classification", "params.yaml", models)
    n_test = read_json(paths.CLASSIFICATION.evaluation).get("n_test")  # not a headline figure
    return {**read_json(paths.CLASSIFICATION.metrics), "n_test": n_test}


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a named experiment (python -m stages.experiments)")
    parser.add_argument(
        "--seeds", type=SEED, nargs="+", default=[1, 2, 3], help="training seeds, 0 to 2**32-1"
    )
    parser.add_argument("--data-root", default=X.DEFAULT_DATA_ROOT)
    parser.add_argument("--workers", type=POSITIVE_INT, default=1, help="parallel queue workers")
    parser.add_argument("--timeout", type=SECONDS, default=86400.0, help="seconds")
    parser.add_argument("--ensemble", action="store_true", help="score the seeds' mean as one")
    parser.add_argument("--replace", action="store_true", help="run every seed again")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="change the recipe"
    )
    parser.add_argument("--tag", help="the variant's name (required with --set)")
    args = parser.parse_args(argv)
    X.get(args.name)
    if len(set(args.seeds)) != len(args.seeds):
        raise StageError(f"--seeds repeat: {args.seeds}")
    batch = runs(args.name, args.seeds, args.set, args.tag)
    names = [r.name for r in batch]
    if not args.report_only:
        # every seed's params checked by the stages' schemas before anything is fetched or queued
        Q.check_params(batch, str(Path(args.data_root).resolve()))
        sets = [tuple(o.split("=", 1)) for o in args.set]
        for arch in X.pretrained([*X.get(args.name).set_params, *sets]):
            W.fetch(arch)  # before queuing: every seed's run reads the same file
        Q.queue(batch, args.data_root, args.replace)
        Q.run(names, args.workers, args.timeout)
    found = collect(Q.exp_show(all_commits=True), names)  # also runs of older commits
    results = {n: found[n] for n in names if n in found}  # in seed order, not finishing order
    missing = [n for n in names if n not in results]
    if missing:
        raise StageError(f"no finished run of {', '.join(missing)}: run without --report-only")
    ens = ensemble(names) if args.ensemble else None
    out = paths.REPORTS / "repeats" / f"{variant(args.name, args.tag)}.md"
    write_text_atomic(out, render(args.name, results, ens, args.set, args.tag, args.seeds))
    print(out.read_text(), end="")


if __name__ == "__main__":
    run_cli(main)
