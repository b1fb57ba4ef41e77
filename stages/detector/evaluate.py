"""evaluate@detection: score the trained detector on the held-out test split.

Inputs:  data/augment/detection/ (meta.json, test/images.npy, test/annotations.json),
         models/detector.pt, params ``evaluate.detection``.
Outputs: metrics/detector.json, plot data reports/detector/plots/{froc,ap_per_class}.csv, the
         box report (stages.detector.report) and predictions.json (per test image: key, ground
         truth, detections; what ``python -m stages.review`` pairs two revisions on) in
         reports/detector/.
Run:     python -m stages.evaluate --task detection   (the dispatcher calls ``run`` below)

Metrics (``metrics/detector.json``):
- ``map``, ``map_50``: COCO mAP@[.5:.95] and mAP@0.5 from torchmetrics' MeanAveragePrecision
  (pycocotools backend, xyxy boxes, at most 100 detections per image as in COCO).
- ``ap_50_per_class``: {class name: AP@0.5}, every class of the cache listed; null when the class
  has no ground-truth box in the test split (torchmetrics reports -1: AP is undefined there).
  ``mean_ap_50_over_classes`` = mean of the non-null values (seed 004's "mean per-class AP").
- ``froc_recall_at`` {rate: sensitivity}, ``froc_avg_recall`` (their mean), ``froc_per_class``:
  the ChestX-Det10 metric of stages.detector.froc at IoU ``iou`` (mean over classes with GT).
- ``n_test_images``, ``n_gt_boxes``, ``n_pred_boxes``, ``iou``.
``iou`` sets the FROC and report matching; the COCO numbers keep their fixed IoU thresholds.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torchmetrics.detection import MeanAveragePrecision
from tqdm import tqdm

from stages.common import paths
from stages.common.cache import open_split
from stages.common.utils import (
    StageError,
    atomic_dir,
    seed_everything,
    set_torch_threads,
    write_json,
)
from stages.detector import report
from stages.detector.config import EvalDetectionConfig
from stages.detector.froc import FrocResult, evaluate_froc, mean_curve
from stages.detector.model import load_detector, predict

log = logging.getLogger("stages.evaluate")
Boxes = tuple[np.ndarray, np.ndarray]


def rate_key(rate: float) -> str:
    """JSON key of an FP rate: 0.05 -> "0.05"."""
    return f"{rate:g}"


def predict_all(model: torch.nn.Module, images: np.ndarray, batch_size: int) -> list[dict]:
    """Detections for every image, batch by batch from the memory map (flat memory)."""
    out: list[dict] = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="predict test", unit="batch", leave=False):
        batch = np.array(images[start : start + batch_size])  # writable copy of the memmap rows
        out.extend(predict(model, batch, batch_size))
    return out


def _to_tensors(boxes: np.ndarray, labels: np.ndarray) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)),
        "labels": torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1)),
    }


def coco_map(preds: list[dict], gts: list[Boxes], class_ids: list[int]) -> dict:
    """COCO mAP@[.5:.95], mAP@0.5 and per-class AP@0.5 (None = class without GT) via torchmetrics."""
    p = [
        {**_to_tensors(d["boxes"], d["labels"]), "scores": torch.as_tensor(d["scores"]).float()}
        for d in preds
    ]
    t = [_to_tensors(b, lab) for b, lab in gts]
    common = {"box_format": "xyxy", "iou_type": "bbox", "backend": "pycocotools"}
    full = MeanAveragePrecision(**common)
    full.update(p, t)
    res = full.compute()
    # map_per_class averages over IoU thresholds: a second pass at IoU 0.5 alone gives AP@0.5.
    at50 = MeanAveragePrecision(iou_thresholds=[0.5], class_metrics=True, **common)
    at50.update(p, t)
    res50 = at50.compute()
    found = dict(
        zip(
            res50["classes"].reshape(-1).tolist(),
            res50["map_per_class"].reshape(-1).tolist(),
            strict=True,
        )
    )
    per_class = {c: (found[c] if found.get(c, -1.0) >= 0 else None) for c in class_ids}
    return {"map": float(res["map"]), "map_50": float(res["map_50"]), "ap_50_per_class": per_class}


def build_metrics(
    coco: dict,
    froc: FrocResult,
    names: dict[int, str],
    n_images: int,
    n_gt: int,
    n_pred: int,
    iou: float,
) -> dict:
    """metrics/detector.json content; classes keyed by name, FP rates by ``rate_key``."""
    ap50 = {names[c]: v for c, v in coco["ap_50_per_class"].items()}
    defined = [v for v in ap50.values() if v is not None]
    per_class = {
        names[c]: {
            "recall_at": {rate_key(r): v for r, v in stats["recall_at"].items()},
            "avg_recall": stats["avg_recall"],
            "n_gt": stats["n_gt"],
            "n_tp": stats["n_tp"],
            "n_fp": stats["n_fp"],
        }
        for c, stats in froc.per_class.items()
    }
    return {
        "map": coco["map"],
        "map_50": coco["map_50"],
        "froc_avg_recall": froc.avg_recall,
        "ap_50_per_class": ap50,
        "froc_recall_at": {rate_key(r): v for r, v in froc.recall_at.items()},
        "froc_per_class": per_class,
        "mean_ap_50_over_classes": float(np.mean(defined)) if defined else None,
        "n_test_images": n_images,
        "n_gt_boxes": n_gt,
        "n_pred_boxes": n_pred,
        "iou": iou,
    }


def headline(full: dict) -> dict:
    """The few figures `dvc exp show` compares (metrics/detector.json): COCO mAP@[.5:.95],
    mAP@0.5 and the FROC average recall (ChestX-Det10's challenge metric). Per-class AP, the
    FROC points and the counts are in reports/detector/evaluation.json."""
    return {"map": full["map"], "map_50": full["map_50"], "froc": full["froc_avg_recall"]}


def write_plot_data(plots_dir: Path, xs: np.ndarray, ys: np.ndarray, ap50: dict) -> None:
    """froc.csv (fps_per_image, sensitivity) and ap_per_class.csv (class, ap_50; null classes left out)."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    with (plots_dir / "froc.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["fps_per_image", "sensitivity"])
        writer.writerows([f"{x:.6g}", f"{y:.6g}"] for x, y in zip(xs, ys, strict=True))
    with (plots_dir / "ap_per_class.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["class", "ap_50"])
        writer.writerows([n, f"{v:.6g}"] for n, v in ap50.items() if v is not None)


def write_predictions(
    path: Path, index, gts: list[Boxes], preds: list[dict], names: dict[int, str]
) -> None:
    """predictions.json: the class names, then one line per test image: its key (cache index
    path and sha256), source, ground-truth boxes and classes, predicted boxes, scores and classes
    (boxes xyxy in cache pixels, rounded to 0.1 px)."""

    def column(name: str) -> list[str]:
        return index[name].astype(str).tolist() if name in index else [""] * len(gts)

    lines = []
    for key, sha, src, (gb, gl), p in zip(
        column("path"), column("sha256"), column("source"), gts, preds, strict=True
    ):
        image = {
            "key": key,
            "sha256": sha,
            "source": src,
            "gt_boxes": np.round(np.asarray(gb, dtype=np.float64), 1).tolist(),
            "gt_classes": np.asarray(gl).astype(int).tolist(),
            "boxes": np.round(np.asarray(p["boxes"], dtype=np.float64), 1).tolist(),
            "scores": np.round(np.asarray(p["scores"], dtype=np.float64), 6).tolist(),
            "classes": np.asarray(p["labels"]).astype(int).tolist(),
        }
        lines.append(json.dumps(image, separators=(",", ":")))
    head = json.dumps({str(c): n for c, n in names.items()})
    # one image a line: small, and a diff of two revisions stays readable
    path.write_text('{"classes": ' + head + ',\n"images": [\n' + ",\n".join(lines) + "\n]}\n")


def run(
    cfg: EvalDetectionConfig,
    cache_dir: Path,
    model_paths: list[Path],
    metrics_path: Path,
    report_dir: Path,
    training_path: Path | None = None,
) -> dict:
    """Predict the test split, score it, write the headline metrics, plot data and the report
    (with the full evaluation json); return the full evaluation."""
    if len(model_paths) != 1:
        raise StageError(
            f"evaluate@detection scores one model, got {len(model_paths)}: ensembles of "
            "detectors are not supported (their boxes would need merging)"
        )
    model_path = Path(model_paths[0])
    seed_everything(cfg.seed)
    set_torch_threads(cfg.threads)
    split = open_split(Path(cache_dir), "test")
    if len(split) == 0:
        raise StageError(f"{cache_dir}/test is empty: nothing to evaluate (check split ratios)")
    if split.coco is None:
        raise StageError(f"{cache_dir}/test has no annotations.json: is this a detection cache?")
    names = {int(c["id"]): str(c["name"]) for c in split.coco["categories"]}
    class_ids = sorted(names)
    gts = [split.boxes(i) for i in range(len(split))]
    n_gt = sum(len(b) for b, _ in gts)
    if n_gt == 0:
        raise StageError(
            f"{cache_dir}/test has no ground-truth boxes: mAP and FROC are undefined "
            "(the test split holds only normal images; change split ratios or seed)"
        )
    model, model_cfg, classes = load_detector(Path(model_path))
    if list(classes) != [names[c] for c in class_ids]:
        raise StageError(
            f"{model_path} was trained on classes {classes} but the test cache has "
            f"{[names[c] for c in class_ids]}: re-run train-detector on this cache"
        )
    log.info("evaluating %d test images (%d boxes)", len(split), n_gt)
    preds = predict_all(model, split.images, cfg.batch_size)
    coco = coco_map(preds, gts, class_ids)
    froc = evaluate_froc(preds, gts, class_ids, cfg.fps_per_image, cfg.iou)
    n_pred = sum(len(p["scores"]) for p in preds)
    metrics = build_metrics(coco, froc, names, len(split), n_gt, n_pred, cfg.iou)
    xs, ys = mean_curve(list(froc.curves.values()), cfg.froc_max_fp)

    with atomic_dir(report_dir) as tmp:
        write_plot_data(tmp / paths.PLOTS_NAME, xs, ys, metrics["ap_50_per_class"])
        write_json(tmp / paths.EVALUATION_NAME, metrics)
        write_predictions(tmp / paths.DETECTION.predictions.name, split.index, gts, preds, names)
        report.write_report(
            tmp,
            images=split.images,
            preds=preds,
            gts=gts,
            names=names,
            metrics=metrics,
            score_thresh=cfg.score_thresh,
            iou=cfg.iou,
            n_cases=cfg.n_report_images,
            meta=split.meta,
            model_config=model_cfg,
            sources=sorted(set(split.index["source"])) if "source" in split.index else (),
            image_names=list(split.index["path"]) if "path" in split.index else (),
        )
    write_json(metrics_path, headline(metrics))
    log.info(
        "map %.4f, map_50 %.4f, froc_avg_recall %s",
        metrics["map"],
        metrics["map_50"],
        metrics["froc_avg_recall"],
    )
    return metrics


__all__ = ["build_metrics", "coco_map", "predict_all", "rate_key", "run"]
