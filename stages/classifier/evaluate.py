"""evaluate@classification: score the classifier on the TEST split, threshold from VALIDATION.

Inputs:  data/augment/classification/{meta.json, val/, test/} (contract 3),
         models/classifier.keras (+ its sidecar), params ``evaluate.classification``
Outputs: metrics/classifier.json (top-level accuracy, roc_auc, precision, recall, specificity, f1
         on test at the validation-chosen threshold), reports/classifier/plots/{roc,pr,confusion}.csv
         (DVC plots), reports/classifier/{roc,pr,confusion,samples,gradcam}.png, model_card.md
Run:     python -m stages.evaluate --task classification

Binary metrics are always "positive class(es) vs the rest" on the summed probability of the
positive classes, so a 3- or 4-class model gets sensitivity/specificity too; with more than two
classes, argmax accuracy and one-vs-rest AUCs are reported as well.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from stages.cache import CacheSplit, load_meta, open_split
from stages.classifier import metrics as M
from stages.config import check, to_dict
from stages.utils import StageError, read_json, seed_everything, write_json

log = logging.getLogger("stages.evaluate")
PLOT_FILES = ("roc.csv", "pr.csv", "confusion.csv")
REPORT_FILES = ("roc.png", "pr.png", "confusion.png", "samples.png", "gradcam.png", "model_card.md")


@dataclass(frozen=True)
class EvalClassificationConfig:
    """``evaluate.classification``; see params.yaml for the meaning of each key."""

    threshold: Literal["youden", "sensitivity"] = "youden"
    target_sensitivity: float = 0.95
    positive_class: str | tuple[str, ...] = "PNEUMONIA"
    bootstrap: int = 1000
    ci: float = 0.95
    seed: int = 0
    n_samples_grid: int = 16
    n_gradcam: int = 8
    batch_size: int = 64

    def __post_init__(self) -> None:
        check(0.0 < self.target_sensitivity <= 1.0, "target_sensitivity: must be in (0, 1]")
        check(self.bootstrap >= 0, "bootstrap: resamples must be >= 0 (0 = no intervals)")
        check(0.0 < self.ci < 1.0, "ci: must be in (0, 1), e.g. 0.95")
        check(self.n_samples_grid >= 0 and self.n_gradcam >= 0, "n_samples_grid/n_gradcam: >= 0")
        check(self.batch_size >= 1, "batch_size: must be >= 1")
        check(len(self.positives) >= 1, "positive_class: give a class name or a list of names")

    @property
    def positives(self) -> tuple[str, ...]:
        pc = self.positive_class
        return (pc,) if isinstance(pc, str) else tuple(pc)


# --------------------------------------------------------------------------- inputs


def positive_indices(classes: list[str], positives: tuple[str, ...]) -> list[int]:
    missing = [c for c in positives if c not in classes]
    if missing or len(positives) == len(classes):
        raise StageError(
            f"evaluate.classification.positive_class {list(positives)}: must name some but not all "
            f"of the model's classes {classes} (unknown: {missing}); set it in params.yaml"
        )
    return [classes.index(c) for c in positives]


def select_rows(split: CacheSplit, info, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, class indices in the MODEL's class order) of the rows the model has a class for.

    Rows of other classes are dropped, as training dropped them (train_classifier.classes /
    class_map); the same mapping code is used (``predict.labels_for``).
    """
    from stages.classifier import predict

    y = predict.labels_for(split.index, info)
    keep = y >= 0
    if not keep.any():
        raise StageError(
            f"{name} split has no image of the model's classes {list(info.classes)} (labels "
            f"{sorted(set(split.index['label']))}): re-run train-classifier on this cache"
        )
    if keep.all():
        return split.images, y
    log.info("%s: %d of %d rows are not model classes; dropped", name, (~keep).sum(), len(y))
    return np.asarray(split.images[np.flatnonzero(keep)]), y[keep]


# --------------------------------------------------------------------------- metrics


def binary_view(
    classes: list[str], positives: tuple[str, ...], y: np.ndarray, proba: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(0/1 positive-vs-rest labels, summed probability of the positive classes)."""
    pos = positive_indices(classes, positives)
    return np.isin(y, pos).astype(np.int64), proba[:, pos].sum(axis=1)


def _binary_block(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    out = M.binary_metrics(y, p, threshold)
    out.update(roc_auc=M.roc_auc(y, p), pr_auc=M.pr_auc(y, p))
    return out


def _at_05(y: np.ndarray, p: np.ndarray) -> dict:
    """The threshold metrics at the conventional 0.5 (AUCs do not depend on a threshold)."""
    return {k: v for k, v in M.binary_metrics(y, p, 0.5).items() if k != "threshold"}


def compute_metrics(
    cfg: EvalClassificationConfig,
    classes: list[str],
    y_val: np.ndarray,
    proba_val: np.ndarray,
    y_test: np.ndarray,
    proba_test: np.ndarray,
) -> dict:
    """The whole metrics document; the threshold comes from the validation arrays alone."""
    bv, pv = binary_view(classes, cfg.positives, y_val, proba_val)
    bt, pt = binary_view(classes, cfg.positives, y_test, proba_test)
    for name, b in (("val", bv), ("test", bt)):
        if b.min() == b.max():
            raise StageError(
                f"{name} split has only {'positive' if b[0] else 'negative'} cases for "
                f"{list(cfg.positives)}: AUC and thresholds need both; use a larger split"
            )
    threshold = M.select_threshold(bv, pv, cfg.threshold, cfg.target_sensitivity)
    test = _binary_block(bt, pt, threshold)
    doc: dict = {k: test[k] for k in ("accuracy", "roc_auc", "precision", "recall")}
    doc.update(specificity=test["specificity"], f1=test["f1"], pr_auc=test["pr_auc"])
    doc.update(threshold=threshold, threshold_method=cfg.threshold)
    if cfg.threshold == "sensitivity":
        doc["target_sensitivity"] = cfg.target_sensitivity
    doc.update(accuracy_ci=None, roc_auc_ci=None, ci=cfg.ci, bootstrap=cfg.bootstrap)
    if cfg.bootstrap:
        kw = {"n_resamples": cfg.bootstrap, "ci": cfg.ci, "seed": cfg.seed}
        doc["accuracy_ci"] = list(M.bootstrap_ci(M.accuracy_at(threshold), bt, pt, **kw))
        doc["roc_auc_ci"] = list(M.bootstrap_ci(M.roc_auc, bt, pt, **kw))
    negatives = [c for c in classes if c not in cfg.positives]
    doc.update(
        confusion_matrix=test["confusion_matrix"],
        confusion_labels=["+".join(negatives), "+".join(cfg.positives)],
        at_0_5=_at_05(bt, pt),
        split="test",
        n_test=int(y_test.size),
        n_val=int(y_val.size),
        positive_class=list(cfg.positives),
        classes=list(classes),
    )
    # Labelled as validation: the threshold was fitted here, so these figures are optimistic.
    doc["val"] = {"split": "val", "n_val": int(y_val.size), **_binary_block(bv, pv, threshold)}
    doc["val"]["at_0_5"] = _at_05(bv, pv)
    if len(classes) > 2:
        mc = M.multiclass_metrics(y_test, proba_test, classes)
        doc.update(multiclass_accuracy=mc["accuracy"], macro_roc_auc=mc["macro_roc_auc"])
        doc["multiclass"] = mc
        doc["val"]["multiclass"] = M.multiclass_metrics(y_val, proba_val, classes)
    return doc


# --------------------------------------------------------------------------- run


def _load_model(model_path: Path):  # -> (keras.Model, predict.ClassifierInfo)
    from stages.classifier import predict  # TensorFlow import: only when a model is needed

    if not Path(model_path).is_file():
        raise StageError(f"{model_path} not found: run train-classifier first (dvc repro)")
    return predict.load_classifier(model_path), predict.load_info(model_path)


def _write_plot_data(
    out: Path, bt: np.ndarray, pt: np.ndarray, actual: list[str], predicted: list[str]
) -> None:
    """DVC plot data: roc.csv (fpr, tpr, threshold), pr.csv (recall, precision, threshold),
    confusion.csv (actual, predicted: one row per test image, for the confusion template)."""
    pd.DataFrame(M.roc_points(bt, pt)).to_csv(out / "roc.csv", index=False)
    pd.DataFrame(M.pr_points(bt, pt)).to_csv(out / "pr.csv", index=False)
    pd.DataFrame({"actual": actual, "predicted": predicted}).to_csv(
        out / "confusion.csv", index=False
    )


def run(
    cfg: EvalClassificationConfig,
    cache_dir: Path,
    model_path: Path,
    metrics_path: Path,
    plots_dir: Path,
    report_dir: Path,
    train_metrics_path: Path | None = None,
) -> dict:
    """Evaluate ``model_path`` on the cache's val/test splits and write every output."""
    from stages.classifier import report  # matplotlib: only imported when writing figures

    seed_everything(cfg.seed)
    cache_dir, model_path, metrics_path = Path(cache_dir), Path(model_path), Path(metrics_path)
    plots_dir, report_dir = Path(plots_dir), Path(report_dir)
    meta = load_meta(cache_dir)
    splits = {s: open_split(cache_dir, s) for s in ("val", "test")}
    for name, split in splits.items():
        if len(split) == 0:
            raise StageError(f"{cache_dir}/{name} is empty: the split stage gave it no images")
    model, info = _load_model(model_path)
    classes = list(info.classes)
    images, y, proba = {}, {}, {}
    for s, sp in splits.items():
        images[s], y[s] = select_rows(sp, info, s)
        log.info("predicting %d %s images", len(y[s]), s)
        proba[s] = _predict(model, images[s], cfg.batch_size, len(classes))
    doc = compute_metrics(cfg, classes, y["val"], proba["val"], y["test"], proba["test"])

    bt, pt = binary_view(classes, cfg.positives, y["test"], proba["test"])
    if len(classes) == 2:  # binary: the confusion at the chosen threshold, in class names
        names = doc["confusion_labels"]
        actual, predicted = [names[v] for v in bt], [names[int(v)] for v in pt >= doc["threshold"]]
    else:  # multi-class: argmax, which the positive-vs-rest matrix in the json complements
        actual = [classes[v] for v in y["test"]]
        predicted = [classes[v] for v in proba["test"].argmax(axis=1)]

    train_metrics_path = train_metrics_path or metrics_path.parent / "train_classifier.json"
    model_info = {
        "model": info.to_json(),
        "training": read_json(train_metrics_path) if train_metrics_path.is_file() else None,
    }
    # Build everything in a scratch folder first: a failure leaves the old outputs untouched.
    report_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=report_dir.parent, prefix=".evaluate.") as tmp:
        stage = Path(tmp)
        _write_plot_data(stage, bt, pt, actual, predicted)
        report.write_figures(stage, doc, model, images["test"], proba["test"], bt, pt, cfg)
        card = report.model_card(doc, meta, _split_tables(cache_dir), model_info, to_dict(cfg))
        (stage / "model_card.md").write_text(card)
        plots_dir.mkdir(parents=True, exist_ok=True)
        report_dir.mkdir(parents=True, exist_ok=True)
        for name in PLOT_FILES:
            shutil.move(stage / name, plots_dir / name)
        for name in REPORT_FILES:
            shutil.move(stage / name, report_dir / name)
    write_json(metrics_path, doc)
    log.info(
        "test: accuracy %.4f roc_auc %.4f (threshold %.4f from val, %s)",
        doc["accuracy"],
        doc["roc_auc"],
        doc["threshold"],
        doc["threshold_method"],
    )
    return doc


def _predict(model, images: np.ndarray, batch_size: int, n_classes: int) -> np.ndarray:
    from stages.classifier import predict

    proba = np.asarray(predict.predict_proba(model, images, batch_size), dtype=np.float64)
    if proba.shape != (len(images), n_classes):
        raise StageError(
            f"model gave probabilities of shape {proba.shape}, expected "
            f"({len(images)}, {n_classes}): re-train the classifier on this cache"
        )
    return proba


def _split_tables(cache_dir: Path) -> dict[str, pd.DataFrame]:
    """The index of every split present in the cache (for counts in the model card)."""
    out = {}
    for s in ("train", "val", "test"):
        if (Path(cache_dir) / s).is_dir():
            out[s] = open_split(cache_dir, s).index
    return out
