"""Human-facing outputs of evaluate@classification: the pictures and the model card.

Inputs: the metrics document built by ``stages.classifier.evaluate.compute_metrics``, the test
images (uint8 (N, S, S)), labels/probabilities, the loaded model (for Grad-CAM), cache indexes.
Outputs (into a given folder): samples.png (test predictions, green = correct at the chosen
threshold, red = wrong), gradcam.png (TP/FP/FN mix), both dvc.yaml image plots, and the text of
model_card.md. The ROC, PR and confusion matrix are Vega plots of plots/{roc,pr,confusion}.csv
(written by the caller); the card states their figures and the confusion counts as tables.
Called by ``stages.classifier.evaluate.run``; no run command of its own.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

log = logging.getLogger("stages.evaluate")
GOOD, BAD = "#1a7f37", "#cf222e"


def _save(fig: plt.Figure, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _grid(n: int, per_item: int = 1) -> tuple[plt.Figure, np.ndarray]:
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(
        rows, cols * per_item, figsize=(2.2 * cols * per_item, 2.5 * rows), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    return fig, axes


def plot_samples(path: Path, images: np.ndarray, idx: np.ndarray, bt, pt, doc: dict) -> None:
    neg, pos = doc["confusion_labels"]
    fig, axes = _grid(len(idx))
    for ax, i in zip(axes.ravel(), idx, strict=False):
        correct = (pt[i] >= doc["threshold"]) == bool(bt[i])
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
        ax.set_title(
            f"true {pos if bt[i] else neg}\nP({pos})={pt[i]:.3f}",
            fontsize=8,
            color=GOOD if correct else BAD,
        )
    fig.suptitle(f"random test images; green = correct at threshold {doc['threshold']:.3f}")
    _save(fig, path)


def gradcam_cases(bt: np.ndarray, pt: np.ndarray, threshold: float, n: int) -> list[tuple]:
    """Up to n (row, kind) pairs taken in turn from TP, FP, FN (most confident first), TN last."""
    pred, pos = pt >= threshold, bt == 1

    def ranked(mask: np.ndarray, sign: float) -> np.ndarray:  # most confident first
        rows = np.flatnonzero(mask)
        return rows[np.argsort(sign * pt[rows], kind="stable")]

    kinds = {
        "TP": ranked(pred & pos, -1),
        "FP": ranked(pred & ~pos, -1),
        "FN": ranked(~pred & pos, 1),
    }
    out: list[tuple] = []
    for k in range(max(len(v) for v in kinds.values())):
        out += [(int(rows[k]), kind) for kind, rows in kinds.items() if k < len(rows)]
    out += [(int(r), "TN") for r in ranked(~pred & ~pos, 1)]
    return out[:n]


def plot_gradcam(path: Path, model, images, proba, pt, pos: list[int], cases, doc) -> None:
    from stages.classifier.gradcam import GradCam, overlay  # TensorFlow: only when needed

    fig, axes = _grid(len(cases), per_item=2)
    try:
        cam_fn = GradCam(model)
    except ValueError as exc:  # a model without conv layers: say so in the figure
        log.warning("Grad-CAM unavailable: %s", exc)
        axes.ravel()[0].text(0, 0.5, f"Grad-CAM unavailable:\n{exc}", fontsize=8)
        return _save(fig, path)
    classes = doc["classes"]
    flat = axes.ravel()
    for k, (i, kind) in enumerate(cases):
        target = max(pos, key=lambda c, i=i: proba[i, c])  # the most likely positive class
        cam = cam_fn(np.asarray(images[i]), target)
        colour = GOOD if kind in ("TP", "TN") else BAD
        flat[2 * k].imshow(images[i], cmap="gray", vmin=0, vmax=255)
        flat[2 * k].set_title(f"{kind}  P={pt[i]:.3f}", fontsize=8, color=colour)
        flat[2 * k + 1].imshow(overlay(np.asarray(images[i]), cam))
        flat[2 * k + 1].set_title(f"Grad-CAM {classes[target]}", fontsize=8)
    fig.suptitle(f"Grad-CAM at {cam_fn.layer_name}")
    _save(fig, path)


def write_figures(out: Path, doc: dict, model, images, proba, bt, pt, cfg) -> None:
    """The pictures of the report into ``out``: samples.png and gradcam.png."""
    rng = np.random.default_rng(cfg.seed)
    idx = np.sort(rng.choice(len(images), size=min(cfg.n_samples_grid, len(images)), replace=False))
    plot_samples(out / "samples.png", images, idx, bt, pt, doc)
    pos = [doc["classes"].index(c) for c in doc["positive_class"]]
    cases = gradcam_cases(bt, pt, doc["threshold"], cfg.n_gradcam)
    plot_gradcam(out / "gradcam.png", model, images, proba, pt, pos, cases, doc)


# --------------------------------------------------------------------------- model card


def _fmt(v, ci=None) -> str:
    if v is None:
        return "n/a"
    s = f"{v:.4f}" if isinstance(v, float) else str(v)
    return f"{s} [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else s


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif not isinstance(v, list) or len(v) <= 6:
            text = json.dumps(v) if isinstance(v, list | bool) or v is None else v
            out[f"{prefix}{k}"] = f"{v:.4g}" if isinstance(v, float) else text
    return out


def _data_section(meta: dict, tables: dict[str, pd.DataFrame]) -> list[str]:
    classes = meta["classes"]
    lines = [
        "| split | " + " | ".join(classes) + " | images | patients |",
        "|---" * (len(classes) + 3) + "|",
    ]
    for s, idx in tables.items():
        counts = idx["label"].value_counts()
        cells = [str(int(counts.get(c, 0))) for c in classes]
        lines.append(
            f"| {s} | " + " | ".join(cells) + f" | {len(idx)} | {idx['patient_id'].nunique()} |"
        )
    allidx = pd.concat([t.assign(split=s) for s, t in tables.items()], ignore_index=True)
    shared = int((allidx.groupby("patient_id")["split"].nunique() > 1).sum())
    sources = ", ".join(f"{k} ({v})" for k, v in allidx["source"].value_counts().items())
    test = tables.get("test")
    official = test is not None and len(test) and (test["source_split"] == "test").all()
    method = (
        "the source's own official test split"
        if official
        else "a hold-out drawn from the source's training images (see split.classification)"
    )
    return [
        f"- Sources: {sources}. Images {meta['image_size']} px ({meta['resize']} resize), "
        f"grayscale; cache `data/augment/classification`.",
        f"- Test split: {method}. Patients in more than one split: {shared} "
        f"(0 means no patient leaks between train/val/test).",
        "",
        *lines,
    ]


def _metrics_table(block: dict, doc: dict) -> list[str]:
    at = block.get("at_0_5", {})
    rows = ["| metric | at chosen threshold | at 0.5 |", "|---|---|---|"]
    for k in ("accuracy", "precision", "recall", "specificity", "f1"):
        ci = doc.get("accuracy_ci") if k == "accuracy" and block is doc else None
        rows.append(f"| {k} | {_fmt(block[k], ci)} | {_fmt(at.get(k))} |")
    ci = doc.get("roc_auc_ci") if block is doc else None
    rows.append(f"| roc_auc | {_fmt(block['roc_auc'], ci)} | (threshold-free) |")
    rows.append(f"| pr_auc (average precision) | {_fmt(block['pr_auc'])} | (threshold-free) |")
    rows.append(
        f"| confusion [[TN, FP], [FN, TP]] | {block['confusion_matrix']} | "
        f"{at.get('confusion_matrix')} |"
    )
    if "multiclass" in block:
        mc = block["multiclass"]
        rows.append(f"| multi-class accuracy (argmax) | {_fmt(mc['accuracy'])} | |")
        rows.append(f"| macro one-vs-rest ROC-AUC | {_fmt(mc['macro_roc_auc'])} | |")
        for c, v in mc["per_class_roc_auc"].items():
            rows.append(f"| ROC-AUC {c} vs rest | {_fmt(v)} | |")
    return rows


def _confusion_table(cm: list[list[int]], labels: list[str], caption: str) -> list[str]:
    """A confusion matrix as markdown: rows actual, columns predicted."""
    return [
        caption,
        "",
        "| actual \\ predicted | " + " | ".join(labels) + " |",
        "|---" * (len(labels) + 1) + "|",
        *(
            f"| {a} | " + " | ".join(str(v) for v in row) + " |"
            for a, row in zip(labels, cm, strict=True)
        ),
    ]


def _confusion_tables(doc: dict) -> list[str]:
    out = _confusion_table(
        doc["confusion_matrix"],
        doc["confusion_labels"],
        f"Confusion matrix (test, threshold {doc['threshold']:.4f}):",
    )
    if "multiclass" in doc:
        mc = doc["multiclass"]
        out += ["", *_confusion_table(mc["confusion_matrix"], mc["classes"], "Per class (argmax):")]
    return [*out, ""]


def model_card(doc: dict, meta: dict, tables: dict, model_info: dict, eval_params: dict) -> str:
    pos, neg = " + ".join(doc["positive_class"]), doc["confusion_labels"][0]
    sources = set(pd.concat([t["source"] for t in tables.values()]).unique()) if tables else set()
    limits = [
        "- Intended use: research and teaching (reproducing and comparing published pneumonia "
        "classifiers on public data). Not a medical device; never use it for diagnosis or triage.",
        "- Distribution shift: figures hold for images like the test split only. Kermany's official "
        "test set was collected differently from its train set, and published models lose accuracy "
        "there; a validation/test split carved from train (as here unless the test split is the "
        "official one) over-estimates performance on new hospitals, devices and populations.",
    ]
    if sources & {"kermany", "pneumoniamnist"}:
        limits.append(
            "- Kermany/PneumoniaMNIST are paediatric X-rays: they do not represent adults."
        )
    if "synthetic" in sources:
        synthetic = "- **This run used the synthetic default data**: procedurally drawn phantoms, "
        limits.insert(1, synthetic + "not X-rays. Its numbers say the pipeline works, not more.")
    rule = (
        f"target sensitivity {doc['target_sensitivity']}"
        if "target_sensitivity" in doc
        else "Youden's J"
    )
    params = {
        k: v
        for part in ("model", "training")
        if model_info.get(part)
        for k, v in _flatten(model_info[part], f"{part}.").items()
    }
    ci_pct = round(100 * doc["ci"])
    lines = [
        f"# Model card: chest X-ray classifier ({', '.join(doc['classes'])})",
        "",
        "Generated by `python -m stages.evaluate --task classification` (DVC stage "
        "`evaluate@classification`). Figures in this folder: samples.png (random test images) "
        "and gradcam.png (Grad-CAM of TP/FP/FN cases). The ROC, precision-recall and confusion "
        "plots: `dvc plots show` (plots/roc.csv, plots/pr.csv, plots/confusion.csv); their "
        "figures are below. Numbers: evaluation.json here, headline `metrics/classifier.json`.",
        "",
        "## Intended use and limits",
        *limits,
        "",
        "## Data",
        *_data_section(meta, tables),
        "",
        "## Model",
        *(
            ["| parameter | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in params.items()]
            if params
            else ["No model sidecar or training metrics were found."]
        ),
        "",
        f"## Test results (split `test`, n = {doc['n_test']})",
        f"Positive class: {pos} vs {neg}. Threshold {doc['threshold']:.4f} chosen on the "
        f"VALIDATION split ({rule}); test labels were not used to choose it. "
        f"Brackets: {ci_pct} % stratified percentile bootstrap intervals ({doc['bootstrap']} "
        "resamples, threshold held fixed).",
        "",
        *_metrics_table(doc, doc),
        "",
        *_confusion_tables(doc),
        f"## Validation (n = {doc['val']['n_val']}; NOT an independent estimate)",
        "The threshold was chosen on this split, so these figures are optimistic. Shown to "
        "diagnose over-fitting only.",
        "",
        *_metrics_table(doc["val"], doc),
        "",
        "## Reproduce",
        "```",
        "dvc repro evaluate@classification      # this report from the tracked data and model",
        "dvc exp run -S train_classifier.arch=to_be   # an experiment; compare with dvc exp show",
        "```",
        f"Evaluation params (`evaluate.classification`): `{json.dumps(eval_params)}`",
        "",
    ]
    return "\n".join(lines)
