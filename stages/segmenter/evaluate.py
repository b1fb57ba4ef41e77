"""evaluate@segmentation: score the trained segmenter on the held-out test split.

Inputs:  data/augment/segmentation/ (meta.json, test/images.npy, test/masks.npy,
         test/index.csv), models/segmenter.pt, the training summary (for the model card),
         params ``evaluate.segmentation``.
Outputs: metrics/segmenter.json (headline: exactly ``n_test``, ``dice``, ``iou``, ``hd95``, and
         per test source ``test_<source>_dice`` / ``_iou`` / ``_hd95`` when there are several),
         reports/segmenter/: evaluation.json (everything: bootstrap CIs, medians, per source,
         threshold, units), per_image.csv (image key, source, dice, iou, hd95), cases_best.png,
         cases_worst.png, model_card.md (``stages.segmenter.report``).
Run:     python -m stages.evaluate --task segmentation   (the dispatcher calls ``run`` below)

The prediction is ``stages.segmenter.predict.cache_masks`` (threshold, the largest regions
kept), the decision the predicted-mask API serves. Figures are per test image at the cache size
(``stages.segmenter.metrics``: HD95 in pixels of the cache image), then averaged; intervals are
percentile bootstraps over the images. A test source is the folder below ``images/`` the
download stage wrote the image to (the source name, suffixed when a name repeats).
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from stages.common import paths
from stages.common.utils import (
    StageError,
    atomic_dir,
    read_json,
    seed_everything,
    set_torch_threads,
    write_json,
)
from stages.segmenter import report
from stages.segmenter.config import EvalSegmentationConfig
from stages.segmenter.data import SegmentationSplit
from stages.segmenter.metrics import bootstrap_mean_ci, per_image
from stages.segmenter.model import load_segmenter, predict_proba
from stages.segmenter.predict import cache_masks

log = logging.getLogger("stages.evaluate")
METRICS = ("dice", "iou", "hd95")
PER_IMAGE_FILE = paths.SEGMENTATION.predictions.name  # per_image.csv


def image_keys(paths_: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(key, source) per image: the path below ``images/`` and its first folder."""
    rel = paths_.astype(str).str.extract(r"(?:^|/)images/(.+)$", expand=False)
    rel = rel.fillna(paths_.astype(str))
    return rel.to_numpy(), rel.str.split("/").str[0].to_numpy()


def summarise(per: dict[str, np.ndarray], cfg: EvalSegmentationConfig, seed: int) -> dict:
    """Means, bootstrap CIs, medians of the per-image figures of one set of images."""
    out: dict = {"n_test": int(per["dice"].size)}
    for k in METRICS:
        out[k] = float(per[k].mean())
    for k in METRICS:
        ci = bootstrap_mean_ci(per[k], cfg.bootstrap, cfg.ci, seed)
        out[f"{k}_ci"] = list(ci) if ci else None
    for k in METRICS:
        out[f"{k}_median"] = float(np.median(per[k]))
    out["dice_min"] = float(per["dice"].min())
    out["hd95_max"] = float(per["hd95"].max())
    out["n_dice_below_0_9"] = int((per["dice"] < 0.9).sum())
    return out


def build_evaluation(
    per: dict[str, np.ndarray], sources: np.ndarray, cfg: EvalSegmentationConfig, meta: dict
) -> dict:
    """The whole evaluation document (test split; per source when there are several)."""
    doc = {"split": "test", **summarise(per, cfg, cfg.seed)}
    doc.update(
        ci=cfg.ci,
        bootstrap=cfg.bootstrap,
        threshold=cfg.threshold,
        keep_regions=cfg.keep_regions,
        image_size=int(meta["image_size"]),
        resize=meta.get("resize"),
        hd95_unit=f"pixels of the {int(meta['image_size'])} px cache image",
        sources=sorted(set(sources.tolist())),
    )
    if len(doc["sources"]) > 1:
        doc["test_sets"] = {}
        for name in doc["sources"]:
            sel = sources == name
            doc["test_sets"][name] = summarise({k: v[sel] for k, v in per.items()}, cfg, cfg.seed)
    return doc


def headline(doc: dict) -> dict:
    """metrics/segmenter.json: the flat figures `dvc exp show` compares (keys without dots)."""
    out = {"n_test": doc["n_test"], **{k: doc[k] for k in METRICS}}
    for name, block in doc.get("test_sets", {}).items():
        key = re.sub(r"\W+", "_", name)
        out.update({f"test_{key}_{k}": block[k] for k in METRICS})
    return out


def write_per_image(path: Path, keys: np.ndarray, sources: np.ndarray, per: dict) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["image", "source", *METRICS])
        for i, (key, src) in enumerate(zip(keys, sources, strict=True)):
            writer.writerow([key, src, *(f"{per[k][i]:.6g}" for k in METRICS)])


def run(
    cfg: EvalSegmentationConfig,
    cache_dir: Path,
    model_paths: list[Path],
    metrics_path: Path,
    report_dir: Path,
    training_path: Path | None = None,
) -> dict:
    """Predict the test split, score it, write the headline metrics and the report; return the
    evaluation document."""
    if len(model_paths) != 1:
        raise StageError(
            f"evaluate@segmentation scores one model, got {len(model_paths)}: ensembles of "
            "segmenters are not supported"
        )
    model_path = Path(model_paths[0])
    seed_everything(cfg.seed)
    set_torch_threads(cfg.threads)
    test = SegmentationSplit(Path(cache_dir), "test")
    if len(test) == 0:
        raise StageError(f"{cache_dir}/test is empty: nothing to evaluate (check split ratios)")
    model, model_cfg, model_meta = load_segmenter(model_path)
    meta = test.cache.meta
    for key in ("image_size", "resize", "intensity"):
        if str(model_meta.get(key)) != str(meta.get(key, "none" if key == "intensity" else None)):
            raise StageError(
                f"{model_path} was trained on a cache with {key} {model_meta.get(key)} but "
                f"{cache_dir} has {meta.get(key)}: re-run train-segmenter on this cache"
            )
    log.info("evaluating %d test images", len(test))
    images = np.asarray(test.images)
    gt = np.asarray(test.masks).astype(bool)
    pred = np.zeros(gt.shape, dtype=bool)
    for start in range(0, len(images), 64):  # probabilities of 64 images at a time in memory
        probs = predict_proba(model, images[start : start + 64], cfg.batch_size)
        pred[start : start + 64] = cache_masks(probs, cfg.threshold, cfg.keep_regions)
    per = per_image(gt, pred)
    keys, sources = image_keys(test.index["path"])
    doc = build_evaluation(per, sources, cfg, meta)
    train = None
    if training_path is not None and Path(training_path).is_file():
        train = read_json(training_path)
    doc["model"] = {
        "file": model_path.as_posix(),
        "arch": model_cfg.arch,
        "channels": list(model_cfg.channels),
        "best_epoch": model_meta.get("best_epoch"),
        "val_dice": model_meta.get("val_dice"),
    }
    with atomic_dir(report_dir) as tmp:
        write_json(tmp / paths.EVALUATION_NAME, doc)
        write_per_image(tmp / PER_IMAGE_FILE, keys, sources, per)
        report.write_report(
            tmp,
            images=images,
            gt=gt,
            pred=pred,
            keys=keys,
            per=per,
            doc=doc,
            n_cases=cfg.n_report_images,
            meta=meta,
            model_config=model_cfg,
            train=train,
        )
    write_json(metrics_path, headline(doc))
    log.info(
        "test Dice %.4f, IoU %.4f, HD95 %.2f px (%d images)",
        doc["dice"],
        doc["iou"],
        doc["hd95"],
        doc["n_test"],
    )
    return doc


__all__ = ["build_evaluation", "headline", "image_keys", "run", "summarise"]
