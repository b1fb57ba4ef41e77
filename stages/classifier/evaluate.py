"""evaluate@classification: score the classifier on the TEST split, threshold from VALIDATION.

Inputs:  data/augment/classification/{meta.json, val/, test/} (``stages.common.cache``), one or
         more .keras models (+ sidecars; several = an ensemble of their mean probability),
         params ``evaluate.classification``
Outputs: metrics/classifier.json (headline: accuracy, roc_auc, specificity, recall, precision,
         f1, pr_auc, CI bounds, threshold, per test set accuracy/roc_auc), and
         reports/classifier/: evaluation.json (everything, including the decision rule that
         serving applies), plots/{roc,pr,confusion}.csv (DVC Vega plots), samples.png and
         gradcam.png (DVC image plots), model_card.md, predictions.csv (one row per test image:
         what ``python -m stages.review`` pairs two revisions on) and val_predictions.csv (the
         same for the validation images: what ``python -m stages.mix`` fits a threshold on)
Run:     python -m stages.evaluate --task classification [--model a.keras --model b.keras]

The threshold (and the temperature, with ``calibration: temperature``) are fitted on VALIDATION
only; test-time augmentation (``tta: hflip``) averages each image with its mirror image.

Binary metrics are always "positive class(es) vs the rest" on the summed probability of the
positive classes, so a 3- or 4-class model gets sensitivity/specificity too; with more than two
classes, argmax accuracy and one-vs-rest AUCs are reported as well.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from stages.classifier import metrics as M
from stages.classifier.config import EvalClassificationConfig
from stages.common import paths
from stages.common.cache import CacheSplit, load_meta, open_split
from stages.common.config import to_dict
from stages.common.paths import SPLITS
from stages.common.utils import StageError, atomic_dir, read_json, seed_everything, write_json

log = logging.getLogger("stages.evaluate")


# --------------------------------------------------------------------------- inputs


def positive_indices(classes: list[str], positives: tuple[str, ...]) -> list[int]:
    missing = [c for c in positives if c not in classes]
    if missing or len(positives) == len(classes):
        raise StageError(
            f"evaluate.classification.positive_class {list(positives)}: must name some but not all "
            f"of the model's classes {classes} (unknown: {missing}); set it in params.yaml"
        )
    return [classes.index(c) for c in positives]


def select_rows(split: CacheSplit, info, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, class indices in the MODEL's class order, row numbers) of the rows the model has
    a class for.

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
    rows = np.flatnonzero(keep)
    if keep.all():
        return split.images, y, rows
    log.info("%s: %d of %d rows are not model classes; dropped", name, (~keep).sum(), len(y))
    return np.asarray(split.images[rows]), y[keep], rows


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
    test_sets: np.ndarray | None = None,
) -> dict:
    """The whole evaluation document; the threshold comes from the validation arrays alone.

    ``test_sets`` (one name per test row, e.g. the source each image came from): with more than
    one name, each set is also scored on its own at the same threshold (``test_sets`` block).
    """
    bv, pv = binary_view(classes, cfg.positives, y_val, proba_val)
    bt, pt = binary_view(classes, cfg.positives, y_test, proba_test)
    for name, b in (("val", bv), ("test", bt)):
        if b.min() == b.max():
            raise StageError(
                f"{name} split has only {'positive' if b[0] else 'negative'} cases for "
                f"{list(cfg.positives)}: AUC and thresholds need both; use a larger split"
            )
    threshold = M.select_threshold(
        bv, pv, cfg.threshold, cfg.target_sensitivity, cfg.target_specificity
    )
    test = _binary_block(bt, pt, threshold)
    doc: dict = {k: test[k] for k in ("accuracy", "roc_auc", "precision", "recall")}
    doc.update(specificity=test["specificity"], f1=test["f1"], pr_auc=test["pr_auc"])
    doc.update(threshold=threshold, threshold_method=cfg.threshold)
    if cfg.threshold in ("sensitivity", "specificity"):
        doc[f"target_{cfg.threshold}"] = getattr(cfg, f"target_{cfg.threshold}")
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
    names = sorted(set(test_sets.tolist())) if test_sets is not None else []
    if len(names) > 1:
        doc["test_sets"] = {}
        for name in names:
            sel = test_sets == name
            block = {"n_test": int(sel.sum())}
            if bt[sel].min() == bt[sel].max():  # one class only: no AUC, accuracy still means
                block.update(M.binary_metrics(bt[sel], pt[sel], threshold))
                block.update(roc_auc=None, pr_auc=None)
            else:
                block.update(_binary_block(bt[sel], pt[sel], threshold))
            doc["test_sets"][name] = block
    if len(classes) > 2:
        mc = M.multiclass_metrics(y_test, proba_test, classes)
        doc.update(multiclass_accuracy=mc["accuracy"], macro_roc_auc=mc["macro_roc_auc"])
        doc["multiclass"] = mc
        doc["val"]["multiclass"] = M.multiclass_metrics(y_val, proba_val, classes)
    return doc


# --------------------------------------------------------------------------- run


def source_keys(paths: pd.Series) -> np.ndarray:
    """The source key of each image (the folder below ``images/`` the download stage wrote it
    to: the source name, suffixed when a name repeats), e.g. ``kermany_2``."""
    return (
        paths.astype(str).str.extract(r"(?:^|/)images/([^/]+)/", expand=False).fillna("").to_numpy()
    )


HEADLINE = ("accuracy", "roc_auc", "specificity")  # sensitivity: evaluation.json's recall


def headline(doc: dict) -> dict:
    """The few figures `dvc exp show` compares (metrics/classifier.json): the test split at the
    validation threshold. Names unique across the tasks' metric files, so DVC gives each its
    own short column. Everything else (CIs, the threshold, the validation block, figures at
    0.5, confusion matrix, multi-class tables) is in reports/classifier/evaluation.json; with
    several test sets each adds its accuracy and ROC-AUC. Keys carry no dots (DVC flattens
    nested keys with them)."""
    out = {key: doc[key] for key in HEADLINE}
    if doc.get("cam_in_lungs"):  # where it looks: the share of Grad-CAM mass in the lungs
        out["cam_in_lungs"] = doc["cam_in_lungs"]["all"]
    if "multiclass_accuracy" in doc:
        out["multiclass_accuracy"] = doc["multiclass_accuracy"]
    for name, block in doc.get("test_sets", {}).items():
        key = re.sub(r"\W+", "_", name)
        out[f"test_{key}_accuracy"] = block["accuracy"]
        out[f"test_{key}_roc_auc"] = block["roc_auc"]
    return out


def load_models(
    model_paths: list[Path], meta: dict | None = None, cache_dir: Path | None = None
) -> tuple[list, object]:
    """The models and their common sidecar info. Several models must agree on classes, input
    size, resize and intensity (they are averaged as one ensemble: the check ``predict`` and
    the page make); with the cache's ``meta``, the models must also take its images as they
    are (same size, resize and intensity), checked before any model is loaded."""
    from stages.classifier import predict  # TensorFlow import: only when a model is needed

    if not model_paths:
        raise StageError("no classifier model given")
    infos = []
    for path in model_paths:
        if not Path(path).is_file():
            raise StageError(f"{path} not found: run train-classifier first (dvc repro)")
        infos.append(predict.load_info(path))
    predict.check_one_cache(model_paths, infos)
    if meta is not None:
        predict.check_fits_cache(model_paths[0], infos[0], meta, cache_dir or Path("cache"))
    models = [predict.load_classifier(path) for path in model_paths]
    return models, infos[0]


def _write_plot_data(
    out: Path, bt: np.ndarray, pt: np.ndarray, actual: list[str], predicted: list[str]
) -> None:
    """DVC plot data: roc.csv (fpr, tpr, threshold), pr.csv (recall, precision, threshold),
    confusion.csv (actual, predicted: one row per test image, for the confusion template)."""
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(M.roc_points(bt, pt)).to_csv(out / "roc.csv", index=False)
    pd.DataFrame(M.pr_points(bt, pt)).to_csv(out / "pr.csv", index=False)
    pd.DataFrame({"actual": actual, "predicted": predicted}).to_csv(
        out / "confusion.csv", index=False
    )


def predictions_table(
    index: pd.DataFrame,
    sources: np.ndarray,
    classes: list[str],
    y: np.ndarray,
    bt: np.ndarray,
    pt: np.ndarray,
    threshold: float,
) -> pd.DataFrame:
    """predictions.csv: per test image its key (cache index path and sha256), source, true
    class, positive-vs-rest label, probability of the positive class(es) and the prediction at
    the validation threshold (1 = positive)."""
    n = len(index)
    return pd.DataFrame(
        {
            "path": index["path"].astype(str).to_numpy() if "path" in index else [""] * n,
            "sha256": index["sha256"].astype(str).to_numpy() if "sha256" in index else [""] * n,
            "source": sources,
            "label": [classes[v] for v in y],
            "positive": bt.astype(int),
            "p_positive": pt,
            "predicted": (pt >= threshold).astype(int),
        }
    )


def run(
    cfg: EvalClassificationConfig,
    cache_dir: Path,
    model_paths: list[Path],
    metrics_path: Path,
    report_dir: Path,
    training_path: Path | None = None,
    lungs_meter: Path | None = None,
) -> dict:
    """Evaluate the model (or the mean of several: an ensemble) on the cache's val/test splits;
    write the headline metrics and the report folder. Returns the full evaluation document.
    ``lungs_meter``: the test films' lungs (``stages.lungs``), for cam_in_lungs (the stage
    passes the pipeline's; without lungs there or in the cache, cam_in_lungs is left out)."""
    from stages.classifier import meter, predict, report  # TensorFlow / matplotlib: only here

    seed_everything(cfg.seed)
    cache_dir, metrics_path, report_dir = Path(cache_dir), Path(metrics_path), Path(report_dir)
    model_paths = [Path(p) for p in model_paths]
    meta = load_meta(cache_dir)
    splits = {s: open_split(cache_dir, s) for s in ("val", "test")}
    for name, split in splits.items():
        if len(split) == 0:
            raise StageError(f"{cache_dir}/{name} is empty: the split stage gave it no images")
    models, info = load_models(model_paths, meta, cache_dir)
    classes = list(info.classes)
    images, y, proba, rows = {}, {}, {}, {}
    for s, sp in splits.items():
        images[s], y[s], rows[s] = select_rows(sp, info, s)
        log.info(
            "predicting %d %s images with %d model(s), tta %s", len(y[s]), s, len(models), cfg.tta
        )
        proba[s] = predict.ensemble_proba(models, images[s], cfg.batch_size, cfg.tta)
        if proba[s].shape != (len(images[s]), len(classes)):
            raise StageError(
                f"model gave probabilities of shape {proba[s].shape}, expected "
                f"({len(images[s])}, {len(classes)}): re-train the classifier on this cache"
            )
    temperature = 1.0
    if cfg.calibration == "temperature":  # fitted on validation only, like the threshold
        temperature = M.fit_temperature(y["val"], proba["val"])
        proba = {s: M.apply_temperature(p, temperature) for s, p in proba.items()}
    test_index = splits["test"].index.iloc[rows["test"]]
    test_sets = source_keys(test_index["path"])
    doc = compute_metrics(cfg, classes, y["val"], proba["val"], y["test"], proba["test"], test_sets)
    doc["decision"] = {
        "classes": classes,
        "positive_class": list(cfg.positives),
        "threshold": doc["threshold"],
        "threshold_method": cfg.threshold,
        "temperature": temperature,
        "tta": cfg.tta,
        "models": [p.as_posix() for p in model_paths],
    }

    bt, pt = binary_view(classes, cfg.positives, y["test"], proba["test"])
    if len(classes) == 2:  # binary: the confusion at the chosen threshold, in class names
        names = doc["confusion_labels"]
        actual, predicted = [names[v] for v in bt], [names[int(v)] for v in pt >= doc["threshold"]]
    else:  # multi-class: argmax, which the positive-vs-rest matrix in the json complements
        actual = [classes[v] for v in y["test"]]
        predicted = [classes[v] for v in proba["test"].argmax(axis=1)]

    # Where it looks: Grad-CAM mass inside the segmenter's lungs, over the test images.
    masks = meter.lung_masks(splits["test"], rows["test"], lungs_meter)
    share = cams = kinds = None
    if masks is not None:
        pos = positive_indices(classes, cfg.positives)
        log.info("cam_in_lungs: Grad-CAM of %d test images", len(masks))
        share, cams = meter.measure(models, images["test"], masks, proba["test"], pos)
        kinds = meter.outcomes(bt, pt >= doc["threshold"])
        doc["cam_in_lungs"] = meter.summary(share, kinds, masks)
    else:
        log.warning("cam_in_lungs: no lung masks for the test films (run the lungs stage)")

    training_path = Path(training_path or paths.CLASSIFICATION.training)
    model_info = {
        "model": info.to_json(),
        "models": doc["decision"]["models"],
        "training": read_json(training_path) if training_path.is_file() else None,
    }
    # The whole folder is built aside and swapped in: a failure leaves the old report untouched.
    with atomic_dir(report_dir) as tmp:
        _write_plot_data(tmp / paths.PLOTS_NAME, bt, pt, actual, predicted)
        report.write_figures(tmp, doc, models[0], images["test"], proba["test"], bt, pt, cfg)
        card = report.model_card(doc, meta, _split_tables(cache_dir), model_info, to_dict(cfg))
        (tmp / "model_card.md").write_text(card)
        write_json(tmp / paths.EVALUATION_NAME, doc)
        table = predictions_table(
            test_index, test_sets, classes, y["test"], bt, pt, doc["threshold"]
        )
        if share is not None:
            table["cam_in_lungs"] = share
            meter.plot(tmp / "cam_lungs.png", images["test"], cams, masks, share, kinds, pt)
        # 9 significant digits round-trip float32: saturated probabilities keep their order
        table.to_csv(tmp / paths.CLASSIFICATION.predictions.name, index=False, float_format="%.9g")
        val_index = splits["val"].index.iloc[rows["val"]]
        bv, pv = binary_view(classes, cfg.positives, y["val"], proba["val"])
        val_table = predictions_table(
            val_index, source_keys(val_index["path"]), classes, y["val"], bv, pv, doc["threshold"]
        )
        val_table.to_csv(
            tmp / paths.CLASSIFICATION.val_predictions.name, index=False, float_format="%.9g"
        )
    write_json(metrics_path, headline(doc))
    log.info(
        "test: accuracy %.4f roc_auc %.4f specificity %.4f (threshold %.4f from val, %s)",
        doc["accuracy"],
        doc["roc_auc"],
        doc["specificity"],
        doc["threshold"],
        doc["threshold_method"],
    )
    return doc


def _split_tables(cache_dir: Path) -> dict[str, pd.DataFrame]:
    """The index of every split present in the cache (for counts in the model card)."""
    out = {}
    for s in SPLITS:
        if (Path(cache_dir) / s).is_dir():
            out[s] = open_split(cache_dir, s).index
    return out
