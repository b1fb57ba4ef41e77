"""Detection evaluation: COCO mAP cross-checked with pycocotools, metrics/report outputs, run()."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import stages  # noqa: F401  (torch before anything else)
from stages.common.cache import write_meta, write_split
from stages.common.config import ConfigError, parse
from stages.common.paths import DETECTION
from stages.common.utils import StageError
from stages.detector.config import EvalDetectionConfig, TrainDetectorConfig
from stages.detector.evaluate import build_metrics, coco_map, run
from stages.detector.evaluate import headline as headline_of
from stages.detector.froc import evaluate_froc
from stages.detector.model import build_detector, save_detector
from stages.detector.report import image_scores, select_cases, write_report
from tests.plot_defs import undeclared_report_images

CLASSES = ["Nodule", "Mass", "Effusion"]
REQUIRED = {"map", "map_50", "froc_avg_recall", "ap_50_per_class"}


def fixed_set(seed: int = 3, n_images: int = 8) -> tuple[list[dict], list[tuple]]:
    """GT of classes 1-2 (class 3 never has GT), jittered hits, misses, wrong classes, normals."""
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    for i in range(n_images):
        k = i % 3  # 0, 1 or 2 GT boxes; every third image is normal
        xy = rng.uniform(0, 150, (k, 2))
        gt_boxes = np.hstack([xy, xy + rng.uniform(8, 60, (k, 2))]).astype(np.float32)
        gt_labels = rng.integers(1, 3, k)
        gts.append((gt_boxes, gt_labels))
        jitter = gt_boxes + rng.normal(0, 4, gt_boxes.shape)
        noise_xy = rng.uniform(0, 150, (2, 2))
        noise = np.hstack([noise_xy, noise_xy + rng.uniform(8, 60, (2, 2))])
        boxes = np.vstack([jitter, noise, jitter[:1]]).astype(np.float32)  # + a duplicate
        labels = np.concatenate([gt_labels, rng.integers(1, 4, 2), gt_labels[:1]])
        scores = rng.uniform(0.05, 1.0, len(boxes)).astype(np.float32)
        preds.append({"boxes": boxes, "scores": scores, "labels": labels.astype(np.int64)})
    return preds, gts


def cocoeval_stats(preds, gts, cat_ids, iou_thrs=None) -> np.ndarray:
    """pycocotools COCOeval run directly (xywh boxes), returning its 12 summary stats."""
    images, anns, dets = [], [], []
    for i, ((gb, gl), p) in enumerate(zip(gts, preds, strict=True)):
        images.append({"id": i, "width": 256, "height": 256})
        for b, c in zip(gb, gl, strict=True):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            anns.append(
                {"id": len(anns) + 1, "image_id": i, "category_id": int(c), "iscrowd": 0}
                | {"bbox": [float(b[0]), float(b[1]), w, h], "area": w * h}
            )
        for b, s, c in zip(p["boxes"], p["scores"], p["labels"], strict=True):
            xywh = [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]
            dets.append({"image_id": i, "category_id": int(c), "bbox": xywh, "score": float(s)})
    gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": c, "name": str(c)} for c in cat_ids],
    }
    gt.createIndex()
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.params.catIds = list(cat_ids)
    if iou_thrs is not None:
        ev.params.iouThrs = np.asarray(iou_thrs)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats


def test_torchmetrics_map_agrees_with_pycocotools(capsys):
    preds, gts = fixed_set()
    ours = coco_map(preds, gts, [1, 2, 3])
    stats = cocoeval_stats(preds, gts, [1, 2, 3])
    capsys.readouterr()  # COCOeval prints its summary
    assert 0.05 < ours["map"] < 0.95  # a non-trivial case, so agreement means something
    assert ours["map"] == pytest.approx(stats[0], abs=1e-6)
    assert ours["map_50"] == pytest.approx(stats[1], abs=1e-6)
    for c in (1, 2):  # per class AP@0.5: COCOeval restricted to that category
        assert ours["ap_50_per_class"][c] == pytest.approx(
            cocoeval_stats(preds, gts, [c], [0.5])[1], abs=1e-6
        )
    assert ours["ap_50_per_class"][3] is None  # predicted, but no GT anywhere: undefined


def test_build_metrics_names_and_nulls():
    preds, gts = fixed_set()
    names = {1: "Nodule", 2: "Mass", 3: "Effusion"}
    froc = evaluate_froc(preds, gts, [1, 2, 3], (0.05, 0.1, 0.2))
    m = build_metrics(coco_map(preds, gts, [1, 2, 3]), froc, names, len(gts), 7, 40, 0.5)
    assert set(m) >= REQUIRED
    assert list(m["ap_50_per_class"]) == CLASSES and m["ap_50_per_class"]["Effusion"] is None
    assert list(m["froc_recall_at"]) == ["0.05", "0.1", "0.2"]
    assert m["froc_per_class"]["Effusion"]["avg_recall"] is None
    defined = [m["ap_50_per_class"][n] for n in ("Nodule", "Mass")]
    assert m["mean_ap_50_over_classes"] == pytest.approx(np.mean(defined))
    assert m["froc_avg_recall"] == pytest.approx(np.mean(list(m["froc_recall_at"].values())))


def test_case_ranking():
    box = np.array([[10, 10, 40, 40]], dtype=np.float32)
    none = np.zeros((0, 4), dtype=np.float32)
    gts = [(box, np.array([1])), (none, np.array([], int)), (box, np.array([1])), (none, [])]
    hit = {"boxes": box, "scores": np.array([0.9]), "labels": np.array([1])}
    empty = {"boxes": none, "scores": np.zeros(0), "labels": np.zeros(0, int)}
    low = {"boxes": box, "scores": np.array([0.1]), "labels": np.array([1])}  # below threshold
    fp = {"boxes": box + 100, "scores": np.array([0.8]), "labels": np.array([1])}
    scores = image_scores([hit, empty, low, fp], gts, score_thresh=0.3, iou=0.5)
    assert [s["f1"] for s in scores] == [1.0, 1.0, 0.0, 0.0]
    assert (scores[2]["fn"], scores[3]["fp"]) == (1, 1)
    best, worst = select_cases(scores, 2)
    assert best == [0, 1]  # perfect with a finding beats a correct empty normal
    assert worst == [2, 3] and not set(best) & set(worst)


def test_config_is_validated(params):
    cfg = parse(EvalDetectionConfig, params["evaluate"]["detection"], "evaluate.detection")
    assert cfg.fps_per_image == (0.05, 0.1, 0.2) and cfg.iou == 0.5
    with pytest.raises(ConfigError, match="unknown key"):
        parse(EvalDetectionConfig, {"ious": 0.5}, "evaluate.detection")
    with pytest.raises(ConfigError, match="increasing"):
        parse(EvalDetectionConfig, {"fps_per_image": [0.2, 0.1]}, "evaluate.detection")


# --------------------------------------------------------------------------- run() end to end


def make_cache(root: Path, size: int = 64, n: int = 6, with_boxes: bool = True) -> Path:
    rng = np.random.default_rng(0)
    anns = []
    for i in range(n):
        for j in range(i % 3 if with_boxes else 0):
            x, y = (float(v) for v in rng.uniform(0, size - 20, 2))
            anns.append(
                {"id": len(anns) + 1, "image_id": i, "category_id": 1 + j, "iscrowd": 0}
                | {"bbox": [x, y, 16.0, 16.0], "area": 256.0}
            )
    coco = {
        "images": [
            {"id": i, "file_name": f"x{i}.png", "width": size, "height": size} for i in range(n)
        ],
        "annotations": anns,
        "categories": [{"id": i + 1, "name": c} for i, c in enumerate(CLASSES)],
    }
    index = pd.DataFrame({"path": [f"x{i}.png" for i in range(n)], "source": "synthetic"})
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    cache = root / "cache"
    write_split(cache, "test", images, index, size, coco)
    meta = {"task": "detection", "image_size": size, "resize": "pad", "classes": CLASSES}
    write_meta(cache, meta | {"counts": {"test": n}})
    return cache


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """An untrained ResNet-18 RetinaNet at 64 px; score_thresh 0 so it does emit boxes."""
    cfg = TrainDetectorConfig(min_size=64, score_thresh=0.0, detections_per_img=20)
    path = tmp_path_factory.mktemp("model") / "detector.pt"
    save_detector(path, build_detector(cfg, len(CLASSES)), cfg, CLASSES)
    return path


def test_run_end_to_end(tmp_path, model_file):
    cache = make_cache(tmp_path)
    cfg = EvalDetectionConfig(batch_size=4, n_report_images=2)
    out = tmp_path / "out"
    report_dir, plots_dir = out / "reports/detector", out / "reports/detector/plots"
    metrics = run(cfg, cache, [model_file], out / "metrics/detector.json", report_dir)

    assert json.loads((report_dir / "evaluation.json").read_text()) == metrics
    headline = json.loads((out / "metrics/detector.json").read_text())
    # metrics/detector.json: the three figures `dvc exp show` compares; the rest in the report
    assert headline == headline_of(metrics)
    assert headline == {
        "map": metrics["map"],
        "map_50": metrics["map_50"],
        "froc": metrics["froc_avg_recall"],
    }
    assert set(metrics) >= REQUIRED and set(metrics["ap_50_per_class"]) == set(CLASSES)
    assert metrics["n_test_images"] == 6 and metrics["n_gt_boxes"] == 6
    assert metrics["n_pred_boxes"] > 0
    with (plots_dir / "froc.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    xs = [float(r["fps_per_image"]) for r in rows]
    ys = [float(r["sensitivity"]) for r in rows]
    assert xs[0] == 0 and xs[-1] == cfg.froc_max_fp and xs == sorted(xs) and ys == sorted(ys)
    with (plots_dir / "ap_per_class.csv").open() as fh:
        assert [r["class"] for r in csv.DictReader(fh)] == ["Nodule", "Mass"]  # Effusion: no GT
    for name in ("cases_best.png", "cases_worst.png"):
        assert (report_dir / name).stat().st_size > 1000, name
    # FROC and AP per class are Vega plots of the csv files only (no PNG copy); every image the
    # report writes or its card names is a declared plot of dvc.yaml.
    assert not {"froc.png", "ap_per_class.png"} & {p.name for p in report_dir.iterdir()}
    assert undeclared_report_images(report_dir, DETECTION.report_dir) == []
    cases = sorted(p.name for p in (report_dir / "cases").iterdir())
    assert cases == ["best_01.png", "best_02.png", "cases.csv", "worst_01.png", "worst_02.png"]
    with (report_dir / "cases/cases.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["file"] for r in rows] == [
        "best_01.png",
        "best_02.png",
        "worst_01.png",
        "worst_02.png",
    ]
    assert all(r["image"] == f"x{r['image_id']}.png" for r in rows)  # the split index's path
    card = (report_dir / "model_card.md").read_text()
    assert "synthetic" in card and "| Nodule |" in card


def test_case_files_are_named_by_rank_not_by_image(tmp_path):
    """The same file names whichever test images are the best and worst: a new run rewrites the
    tracked files instead of deleting some and adding others; cases.csv says which image each
    one shows."""
    preds, gts = fixed_set(n_images=9)
    images = np.random.default_rng(0).integers(0, 256, (9, 64, 64), dtype=np.uint8)
    names = {1: "Nodule", 2: "Mass", 3: "Effusion"}
    metrics = build_metrics(
        coco_map(preds, gts, [1, 2, 3]), evaluate_froc(preds, gts, [1, 2, 3], (0.1,)), names,
        len(gts), 7, 40, 0.5,
    )  # fmt: skip
    written, orders = {}, {"a": list(range(9)), "b": [8, 3, 5, 0, 7, 1, 6, 2, 4]}
    for name, order in orders.items():
        out = tmp_path / name
        write_report(
            out, images=images[order], preds=[preds[i] for i in order],
            gts=[gts[i] for i in order], names=names, metrics=metrics, score_thresh=0.3, iou=0.5,
            n_cases=3, meta={}, model_config={}, image_names=[f"img{i}.png" for i in order],
        )  # fmt: skip
        with (out / "cases/cases.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        written[name] = (sorted(p.name for p in (out / "cases").iterdir()), rows)
    (files_a, rows_a), (files_b, rows_b) = written["a"], written["b"]
    assert files_a == files_b
    assert all(re.fullmatch(r"(best|worst)_\d{2}\.png|cases\.csv", f) for f in files_a)
    assert [r["image_id"] for r in rows_a] != [r["image_id"] for r in rows_b]  # other images
    for name, rows in (("a", rows_a), ("b", rows_b)):  # cases.csv names the image shown
        assert all(r["image"] == f"img{orders[name][int(r['image_id'])]}.png" for r in rows)


def test_run_rejects_bad_inputs(tmp_path, model_file):
    cfg = EvalDetectionConfig(n_report_images=1)
    paths = (tmp_path / "m.json", tmp_path / "report")
    normals = make_cache(tmp_path / "normals", with_boxes=False)
    with pytest.raises(StageError, match="no ground-truth boxes"):
        run(cfg, normals, [model_file], *paths)
    other = tmp_path / "other.pt"
    tcfg = TrainDetectorConfig(min_size=64)
    save_detector(other, build_detector(tcfg, 2), tcfg, ["Nodule", "Mass"])
    with pytest.raises(StageError, match="trained on classes"):
        run(cfg, make_cache(tmp_path / "ok"), [other], *paths)
    with pytest.raises(StageError, match="ensembles of detectors"):
        run(cfg, make_cache(tmp_path / "ok2"), [model_file, model_file], *paths)
    assert not any(p.exists() for p in paths)  # a failed run leaves nothing behind


def test_the_iou_param_reaches_the_froc_and_the_report(tmp_path, model_file, monkeypatch):
    """evaluate.detection.iou decides what counts as a hit in the FROC (and the report): every
    prediction here overlaps its box with IoU ~0.62, so recall is full at iou 0.5 and zero at
    0.7. A hard-coded IoU anywhere on that path fails this."""
    from stages.common.cache import open_split
    from stages.detector import evaluate as ev

    cache = make_cache(tmp_path)
    split = open_split(cache, "test")

    def shifted(model, images, batch_size):  # each true box moved by 3 px: IoU (13*16)/(2*256-208)
        out = []
        for i in range(len(images)):
            boxes, cats = split.boxes(i)
            moved = boxes + np.array([3.0, 0.0, 3.0, 0.0], dtype=np.float32)
            out.append({"boxes": moved, "scores": np.full(len(cats), 0.9, np.float32),
                        "labels": cats.astype(np.int64)})  # fmt: skip
        return out

    monkeypatch.setattr(ev, "predict_all", shifted)
    recall = {}
    for iou in (0.5, 0.7):
        cfg = EvalDetectionConfig(iou=iou, n_report_images=1)
        out = tmp_path / f"iou{iou}"
        full = run(cfg, cache, [model_file], out / "m.json", out / "r")
        recall[iou] = full["froc_avg_recall"]
        assert full["iou"] == iou
    assert recall[0.5] == pytest.approx(1.0) and recall[0.7] == pytest.approx(0.0)
