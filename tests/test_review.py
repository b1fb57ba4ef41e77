"""The review report (``python -m stages.review A B``): its paired statistics against known
cases, the revision resolver, the per-image prediction files evaluate writes, and the report
itself on a hand-built two-commit repository and on the session's tiny DVC pipeline with one
`dvc exp run`.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from stages.common import paths
from stages.common.utils import StageError
from stages.tools import review as R
from tests.conftest import REPO
from tests.dvc_helpers import BIN, dvc, git, tool_env
from tests.dvc_helpers import experiment_repo as shared_experiment

# --------------------------------------------------------------------------- statistics


def _scores(n: int, seed: int, shift: float):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    return y, np.clip(shift * y + rng.normal(0.3, 0.2, n), 0, 1)


def test_identical_predictions_give_a_zero_difference_and_a_narrow_interval_around_it():
    y, p = _scores(300, 0, 0.3)
    pred = (p >= 0.45).astype(int)
    a = R.ClsPreds(np.array([f"k{i}" for i in range(300)]), y, p, pred)
    b = R.ClsPreds(a.keys[::-1].copy(), y[::-1].copy(), p[::-1].copy(), pred[::-1].copy())
    ivs, paired = R.classifier_intervals(a, b, 500, 0, 0.95)  # B lists the images reversed
    assert paired
    assert [iv.metric for iv in ivs] == ["accuracy", "sensitivity", "specificity", "ROC-AUC"]
    for iv in ivs:
        assert iv.diff == 0 and iv.lo <= 0 <= iv.hi and iv.hi - iv.lo < 1e-9, iv
        assert iv.identical
    assert R.verdict(ivs, 0.95, 300) == "identical predictions on all 300 test images"


def test_a_better_model_gets_an_interval_entirely_above_zero():
    rng = np.random.default_rng(1)
    n = 400
    y = (rng.random(n) < 0.5).astype(int)
    p_a = np.clip(0.15 * y + rng.normal(0.42, 0.2, n), 0, 1)
    p_b = np.clip(0.5 * y + rng.normal(0.25, 0.15, n), 0, 1)
    keys = np.array([f"img{i}" for i in range(n)])
    a = R.ClsPreds(keys, y, p_a, (p_a >= 0.5).astype(int))
    b = R.ClsPreds(keys, y, p_b, (p_b >= 0.5).astype(int))
    ivs = {iv.metric: iv for iv in R.classifier_intervals(a, b, 1000, 0, 0.95)[0]}
    for name in ("accuracy", "ROC-AUC"):
        assert ivs[name].lo > 0 and ivs[name].direction == "better", ivs[name]
    assert ivs["ROC-AUC"].method == "DeLong" and ivs["ROC-AUC"].p < 0.001
    line = R.verdict(list(ivs.values()))
    assert line.startswith("B better on accuracy (+") and "DeLong p < 0.001" in line


def test_worse_and_indistinguishable_read_as_such():
    worse = R.Interval("accuracy", 0.9, 0.85, -0.05, -0.08, -0.02, "paired bootstrap")
    same = R.Interval("specificity", 0.8, 0.81, 0.01, -0.02, 0.04, "paired bootstrap")
    same2 = R.Interval("sensitivity", 0.8, 0.8, 0.0, -0.03, 0.03, "paired bootstrap")
    line = R.verdict([worse, same, same2])
    assert line == (
        "B worse on accuracy (-0.050, 95 % CI -0.080 to -0.020); "
        "specificity and sensitivity not distinguishable"
    )


def test_delong_matches_a_hand_computed_example():
    # A: positives 0.9 0.8 0.4, negatives 0.7 0.3 0.2 -> placements V10 = 1 1 2/3, V01 = 2/3 1 1
    # B: positives 0.6 0.35 0.5, negatives 0.4 0.55 0.1 -> V10 = 1 1/3 2/3, V01 = 2/3 1/3 1
    # AUC_A = 8/9, AUC_B = 2/3; S10 = [[1/27, 0], [0, 1/9]] = S01;
    # Var(B - A) = (1/27 + 1/9) / 3 + (1/27 + 1/9) / 3 = 8/81; z = (-2/9) / sqrt(8/81) = -1/sqrt 2
    y = np.array([1, 1, 1, 0, 0, 0])
    a = np.array([0.9, 0.8, 0.4, 0.7, 0.3, 0.2])
    b = np.array([0.6, 0.35, 0.5, 0.4, 0.55, 0.1])
    iv = R.delong(y, a, b)
    assert iv.a == pytest.approx(8 / 9) and iv.b == pytest.approx(2 / 3)
    assert iv.diff == pytest.approx(-2 / 9)
    assert iv.se**2 == pytest.approx(8 / 81)
    assert iv.p == pytest.approx(2 * norm.cdf(-1 / np.sqrt(2)))  # 0.4795
    assert iv.lo == pytest.approx(-2 / 9 - 1.959964 * np.sqrt(8 / 81), abs=1e-5)


def test_delong_variance_equals_the_paired_bootstrap_variance_on_a_large_sample():
    rng = np.random.default_rng(7)
    n = 2000
    y = (rng.random(n) < 0.4).astype(int)
    latent = rng.normal(0, 1, n)  # shared by both models: the two ROC curves are correlated
    p_a = np.round(1 * y + latent + rng.normal(0, 0.8, n), 2)  # rounded: ties counted half
    p_b = 1.3 * y + latent + rng.normal(0, 0.8, n)
    iv = R.delong(y, p_a, p_b)
    sa, sb = R.auc_stat(y, p_a), R.auc_stat(y, p_b)
    d = np.concatenate([sb(w) - sa(w) for w in R.weight_chunks(n, 2000, 0, 500)])
    assert d.var() == pytest.approx(iv.se**2, rel=0.12)
    assert d.mean() == pytest.approx(iv.diff, abs=0.3 * iv.se)


def test_weighted_auc_is_the_auc_of_the_resampled_images():
    y, p = _scores(200, 3, 0.2)
    p = np.round(p, 1)  # many ties
    stat = R.auc_stat(y, p)
    assert stat(np.ones((1, 200)))[0] == pytest.approx(roc_auc_score(y, p))
    w = np.random.default_rng(0).integers(0, 3, size=200)
    rows = np.repeat(np.arange(200), w)
    assert stat(w[None, :].astype(float))[0] == pytest.approx(roc_auc_score(y[rows], p[rows]))


def _detections(seed: int, n: int = 50) -> list[dict]:
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        k = int(rng.integers(0, 4))
        xy = rng.uniform(0, 150, (k, 2))
        gt = np.hstack([xy, xy + rng.uniform(10, 40, (k, 2))])
        gl = rng.integers(1, 4, k)
        boxes, scores, classes = [], [], []
        for box, c in zip(gt, gl, strict=True):
            if rng.random() < 0.8:
                boxes.append(box + rng.normal(0, 4, 4))
                scores.append(float(rng.uniform(0.3, 1)))
                classes.append(int(c) if rng.random() < 0.9 else int(rng.integers(1, 4)))
        for _ in range(int(rng.integers(0, 5))):
            xy = rng.uniform(0, 150, 2)
            boxes.append(np.r_[xy, xy + rng.uniform(10, 40, 2)])
            scores.append(float(rng.uniform(0, 0.8)))
            classes.append(int(rng.integers(1, 4)))
        images.append(
            {
                "key": f"images/{i}.png",
                "sha256": f"{i:064x}",
                "gt_boxes": gt.tolist(),
                "gt_classes": gl.tolist(),
                "boxes": np.asarray(boxes).reshape(-1, 4).tolist(),
                "scores": scores,
                "classes": classes,
            }
        )
    return images


def test_map_equals_torchmetrics_and_a_resample_equals_the_duplicated_images():
    import torch
    from torchmetrics.detection import MeanAveragePrecision

    images = _detections(3)
    matched = R.match_detections(images)
    ours = R.map_stat(matched)(np.ones((1, len(images))))[0]

    def tensors(im, gt):
        boxes = im["gt_boxes"] if gt else im["boxes"]
        out = {
            "boxes": torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4).float(),
            "labels": torch.tensor(im["gt_classes" if gt else "classes"], dtype=torch.int64),
        }
        if not gt:
            out["scores"] = torch.tensor(im["scores"], dtype=torch.float32)
        return out

    coco = MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", backend="pycocotools", iou_thresholds=[0.5]
    )
    coco.update([tensors(im, False) for im in images], [tensors(im, True) for im in images])
    assert ours == pytest.approx(float(coco.compute()["map"]), abs=1e-4)

    w = np.ones((1, len(images)))
    w[0, 5], w[0, 7], w[0, 11] = 3, 0, 2
    dup = [im for i, im in enumerate(images) for _ in range(int(w[0, i]))]
    again = R.map_stat(R.match_detections(dup))(np.ones((1, len(dup))))[0]
    assert R.map_stat(matched)(w)[0] == pytest.approx(again)


def test_detector_interval_pairs_images_by_key_and_unpairs_different_test_sets():
    a = _detections(4)
    iv, paired = R.detector_interval(a, a[::-1], 300, 0, 0.95)
    assert paired and iv.identical and iv.diff == 0 and iv.hi - iv.lo == 0
    worse = [dict(im, scores=list(np.random.default_rng(0).random(len(im["scores"])))) for im in a]
    iv, paired = R.detector_interval(a, worse, 300, 0, 0.95)
    assert paired and iv.hi < 0 and iv.method == "paired bootstrap"
    iv, paired = R.detector_interval(a, a[:40], 300, 0, 0.95)
    assert not paired and iv.method == "bootstrap (unpaired)" and iv.lo <= 0 <= iv.hi


def test_unpaired_classifier_intervals_when_the_test_images_differ():
    y, p = _scores(200, 5, 0.3)
    keys = np.array([f"k{i}" for i in range(200)])
    a = R.ClsPreds(keys, y, p, (p >= 0.45).astype(int))
    b = R.ClsPreds(keys[:150], y[:150], p[:150], (p[:150] >= 0.45).astype(int))
    ivs, paired = R.classifier_intervals(a, b, 300, 0, 0.95)
    assert not paired
    assert ivs[0].method == "bootstrap (unpaired)" and ivs[-1].method == "DeLong (unpaired)"
    assert all(iv.lo <= 0 <= iv.hi for iv in ivs)


def test_segmenter_dice_is_paired_by_image():
    rng = np.random.default_rng(2)
    dice = rng.uniform(0.8, 0.95, 60)
    a = pd.DataFrame({"image": [f"s/{i}.png" for i in range(60)], "dice": dice})
    b = a.assign(dice=np.minimum(dice + rng.uniform(0.01, 0.03, 60), 1)).iloc[::-1]
    iv, paired = R.segmenter_interval(a, b, 500, 0, 0.95)
    assert paired and iv.lo > 0 and iv.metric == "Dice"


# --------------------------------------------------------------------------- prediction files


def test_evaluate_writes_one_prediction_row_per_test_image(tmp_path):
    from stages.classifier.evaluate import predictions_table
    from stages.detector.evaluate import write_predictions

    index = pd.DataFrame({"path": ["a/images/x/1.png", "a/images/x/2.png"], "sha256": ["s1", "s2"]})
    table = predictions_table(
        index,
        np.array(["x", "x"]),
        ["NORMAL", "PNEUMONIA"],
        np.array([0, 1]),
        np.array([0, 1]),
        np.array([0.2, 0.7]),
        0.5,
    )
    text = table.to_csv(index=False)
    read = R.read_cls_predictions(text)
    assert list(table.columns) == [
        "path", "sha256", "source", "label", "positive", "p_positive", "predicted"
    ]  # fmt: skip
    assert read.keys.tolist() == ["a/images/x/1.png#s1", "a/images/x/2.png#s2"]
    assert read.pred.tolist() == [0, 1] and table["label"].tolist() == ["NORMAL", "PNEUMONIA"]

    gts = [(np.array([[1, 2, 30, 40]], np.float32), np.array([2])), (np.zeros((0, 4)), [])]
    preds = [
        {"boxes": np.array([[1, 2, 31, 41]]), "scores": np.array([0.9]), "labels": np.array([2])},
        {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int)},
    ]
    out = tmp_path / "predictions.json"
    write_predictions(out, index.assign(source="x"), gts, preds, {1: "Mass", 2: "Nodule"})
    names, images = R.read_det_predictions(out.read_text())
    assert names == {"1": "Mass", "2": "Nodule"} and len(images) == 2
    assert images[0]["gt_classes"] == [2] and images[0]["scores"] == [0.9]
    assert images[1]["boxes"] == [] and images[0]["key"] == "a/images/x/1.png"


def test_classifier_evaluate_writes_the_predictions_its_metrics_come_from(tmp_path):
    import keras

    from stages.classifier.evaluate import EvalClassificationConfig, run
    from stages.classifier.predict import ClassifierInfo, save_info
    from stages.common.cache import write_meta, write_split
    from tests.test_classifier_evaluate import CLASSES, S, _images, _index

    rng = np.random.default_rng(0)
    for offset, split in enumerate(("val", "test")):
        labels = np.arange(30) % 2
        write_split(tmp_path / "cache", split, _images(labels, rng), _index(labels, split, 100 * offset), S)  # fmt: skip
    write_meta(tmp_path / "cache", {"task": "classification", "image_size": S, "resize": "stretch",
                                    "classes": list(CLASSES), "counts": {"val": 30, "test": 30}})  # fmt: skip
    keras.utils.set_random_seed(1)
    inp = keras.Input((S, S, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu")(keras.layers.Rescaling(1 / 255)(inp))
    out = keras.layers.Dense(2, activation="softmax", name="head")(
        keras.layers.GlobalAveragePooling2D()(x)
    )
    model = tmp_path / "classifier.keras"
    keras.Model(inp, out).save(model)
    save_info(model, ClassifierInfo(CLASSES, {}, "softmax", 2, "onehot", S, "tiny"))
    cfg = EvalClassificationConfig(bootstrap=0, n_samples_grid=2, n_gradcam=1)
    report = tmp_path / "report"
    doc = run(cfg, tmp_path / "cache", [model], tmp_path / "m.json", report)
    written = report / paths.CLASSIFICATION.predictions.name
    table = pd.read_csv(written)
    assert len(table) == doc["n_test"] == 30
    assert table["path"].str.startswith("data/raw/classification/images/x/1").all()
    preds = R.read_cls_predictions(written.read_text())
    assert (preds.pred == (preds.p >= doc["threshold"])).all()
    assert preds.y.tolist() == (np.arange(30) % 2).tolist()
    assert np.mean(preds.pred == preds.y) == pytest.approx(doc["accuracy"])
    assert R.auc_stat(preds.y, preds.p)(np.ones((1, 30)))[0] == pytest.approx(doc["roc_auc"])


def test_detector_evaluate_writes_the_predictions_its_map_comes_from(tmp_path, monkeypatch):
    from stages.common.cache import open_split
    from stages.detector import evaluate
    from stages.detector.config import EvalDetectionConfig, TrainDetectorConfig
    from stages.detector.model import build_detector, save_detector
    from tests.test_detector_evaluate import CLASSES, make_cache

    cfg = TrainDetectorConfig(min_size=64, score_thresh=0.0, detections_per_img=20)
    model = tmp_path / "detector.pt"
    save_detector(model, build_detector(cfg, len(CLASSES)), cfg, CLASSES)
    cache = make_cache(tmp_path)
    test = open_split(cache, "test")
    rng = np.random.default_rng(0)

    def fake_predict(model, images, batch_size):  # hits, misplaced boxes and false alarms
        out = []
        for i in range(len(images)):
            gb, gl = test.boxes(i)
            k = len(gb) + 2
            boxes = np.vstack([gb + rng.normal(0, 3, gb.shape), rng.uniform(0, 40, (2, 2)).repeat(2, 1) + [0, 0, 16, 16]])  # fmt: skip
            labels = np.r_[gl, rng.integers(1, 4, 2)]
            out.append({"boxes": boxes.astype(np.float32), "scores": rng.random(k).astype(np.float32), "labels": labels})  # fmt: skip
        return out

    monkeypatch.setattr(evaluate, "predict_all", fake_predict)
    report = tmp_path / "report"
    cfg = EvalDetectionConfig(batch_size=4, n_report_images=1)
    metrics = evaluate.run(cfg, cache, [model], tmp_path / "m.json", report)
    assert 0.1 < metrics["map_50"] < 1
    names, images = R.read_det_predictions((report / paths.DETECTION.predictions.name).read_text())
    assert names == {"1": "Nodule", "2": "Mass", "3": "Effusion"}
    assert len(images) == metrics["n_test_images"] == 6
    assert sum(len(im["gt_boxes"]) for im in images) == metrics["n_gt_boxes"]
    assert sum(len(im["scores"]) for im in images) == metrics["n_pred_boxes"]
    ours = R.map_stat(R.match_detections(images))(np.ones((1, 6)))[0]
    assert ours == pytest.approx(metrics["map_50"], abs=1e-3)


def test_the_predictions_paths_are_in_the_evaluate_report_folders():
    for task in paths.TASKS:
        tp = paths.task_paths(task)
        assert tp.predictions.parent == tp.report_dir
    assert paths.CLASSIFICATION.predictions.name == "predictions.csv"
    assert paths.DETECTION.predictions.name == "predictions.json"


# --------------------------------------------------------------------------- revisions


def _commit(repo: Path, files: dict[str, str | bytes], message: str) -> str:
    for rel, content in files.items():
        path = repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.unlink(missing_ok=True)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD").strip()


def _git_repo(root: Path) -> Path:
    root.mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.name", "test")
    git(root, "config", "user.email", "test@example.invalid")
    return root


def test_resolver_knows_commits_branches_tags_and_experiments(tmp_path):
    repo = _git_repo(tmp_path / "r")
    first = _commit(repo, {"a.txt": "1"}, "one")
    git(repo, "tag", "v1")
    git(repo, "branch", "feature")
    second = _commit(repo, {"a.txt": "2"}, "two")
    # what `dvc exp run` leaves: a commit under refs/exps/<baseline[:2]>/<baseline[2:]>/<name>
    git(repo, "update-ref", f"refs/exps/{second[:2]}/{second[2:]}/lr-up", first)
    assert R.resolve_rev(first[:8], repo) == R.Rev(first[:8], first, "commit")
    assert R.resolve_rev("feature", repo).sha == first
    assert R.resolve_rev("v1", repo).sha == first
    assert R.resolve_rev("HEAD", repo).sha == second
    exp = R.resolve_rev("lr-up", repo)
    assert (exp.kind, exp.sha, exp.baseline) == ("experiment", first, second)
    assert "experiment `lr-up`" in exp.describe()
    with pytest.raises(StageError) as err:
        R.resolve_rev("no-such-thing", repo)
    assert "\n" not in str(err.value) and "unknown revision" in str(err.value)


def review_cli(repo: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m stages.review ARGS` in ``repo`` (the tools' environment plus ``env``)."""
    return subprocess.run(
        [str(BIN / "python"), "-m", "stages.review", *args],
        cwd=repo,
        env={**tool_env(), **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_command_fails_with_one_line(tmp_path):
    repo = _git_repo(tmp_path / "r")
    _commit(repo, {"a.txt": "1"}, "one")

    for args, words in (
        (("HEAD", "nope"), "nope: unknown revision"),
        (("HEAD", "HEAD"), "run `dvc repro` / `dvc exp run` first"),
    ):
        proc = review_cli(repo, *args, PYTHONPATH=str(REPO))
        assert proc.returncode == 2, proc.stderr
        lines = [x for x in proc.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
        assert not (repo / "reports").exists()  # nothing written


def test_help_loads_no_framework():
    from tests.test_cli import HEAVY, PROBE

    probe = PROBE.format(mod="stages.review", heavy=HEAVY)
    proc = subprocess.run(
        [str(BIN / "python"), "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "usage:" in proc.stdout and result == {"code": 0, "heavy": []}, proc.stdout


# --------------------------------------------------------------------------- the report


def _png(color: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (24, 16), color).save(buf, format="PNG")
    return buf.getvalue()


def _revision_files(better: bool, resolved: bool, predictions: bool) -> dict:
    """A classifier, a detector and a segmenter evaluated at one hand-made revision."""
    rng = np.random.default_rng(0)
    n = 120
    y = (np.arange(n) % 5 < 2).astype(int)
    p = np.clip((0.45 if better else 0.15) * y + rng.normal(0.35, 0.15, n), 0, 1)
    cls = pd.DataFrame(
        {
            "path": [f"data/raw/classification/images/s/{i}.png" for i in range(n)],
            "sha256": [f"{i:064x}" for i in range(n)],
            "source": "s",
            "label": np.where(y == 1, "PNEUMONIA", "NORMAL"),
            "positive": y,
            "p_positive": p,
            "predicted": (p >= 0.5).astype(int),
        }
    )
    cls_dir = paths.CLASSIFICATION.report_dir
    det_dir = paths.DETECTION.report_dir
    lr = 0.01 if better else 0.001
    files = {
        "params.yaml": yaml.safe_dump({"train_classifier": {"learning_rate": lr}}),
        "dvc.lock": yaml.safe_dump(
            {
                "schema": "2.0",
                "stages": {
                    "download@classification": {
                        "outs": [{"path": "data/raw/classification", "md5": "a1b2c3d4e5f6.dir"}]
                    },
                    "train-classifier": {
                        "outs": [
                            {"path": "models/classifier.keras", "md5": "ff" if better else "ee"}
                        ]
                    },
                },
            }
        ),
        "reports/split/classification.json": json.dumps(
            {
                "counts": {"test": {"NORMAL": 72, "PNEUMONIA": 48, "total": 120}},
                "patients": {"test": 100},
                "patients_shared_across_splits": 0,
            }
        ),
        str(paths.CLASSIFICATION.metrics): json.dumps({"accuracy": 0.8 if better else 0.7}),
        str(cls_dir / "evaluation.json"): json.dumps(
            {
                "threshold": 0.5,
                "confusion_matrix": [[60, 12], [20, 28]],
                "confusion_labels": ["NORMAL", "PNEUMONIA"],
                "roc_auc": 0.8,
            }
        ),  # fmt: skip
        str(cls_dir / "plots" / "roc.csv"): "fpr,tpr,threshold\n0,0,1\n0.2,0.7,0.5\n1,1,0\n",
        str(cls_dir / "plots" / "pr.csv"): "recall,precision,threshold\n0,1,1\n1,0.4,0\n",
        str(cls_dir / "gradcam.png"): _png(200 if better else 60),
        "reports/live/classifier/plots/metrics/train/loss.tsv": "step\tloss\n0\t0.7\n1\t0.5\n",
        "reports/live/classifier/plots/metrics/val/loss.tsv": "step\tloss\n0\t0.8\n1\t0.6\n",
        "reports/live/classifier/training.json": json.dumps({"best_epoch": 1, "val_auc": 0.8}),
        str(paths.DETECTION.metrics): json.dumps({"map_50": 0.5}),
        str(det_dir / "evaluation.json"): json.dumps(
            {"ap_50_per_class": {"Mass": 0.5}, "froc_recall_at": {"0.1": 0.4}}
        ),
        str(det_dir / "plots" / "froc.csv"): "fps_per_image,sensitivity\n0,0.1\n0.1,0.4\n1,0.7\n",
        str(det_dir / "predictions.json"): json.dumps(
            {"classes": {"1": "Mass"}, "images": _detections(9, 30)}
        ),
        "metrics/segmenter.json": json.dumps({"dice": 0.9}),
    }
    if resolved:
        files[str(paths.PARAMS_REPORT / paths.RESOLVED_PARAMS_NAME)] = json.dumps(
            {"train_classifier": {"learning_rate": lr, "epochs": 15}}
        )
    if predictions:
        files[str(paths.CLASSIFICATION.predictions)] = cls.to_csv(index=False)
        files["reports/segmenter/per_image.csv"] = "image,source,dice\na.png,s,0.9\nb.png,s,0.8\n"
    return files


@pytest.fixture(scope="module")
def handmade(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    repo = _git_repo(tmp_path_factory.mktemp("handmade") / "repo")
    old = _commit(repo, _revision_files(False, resolved=False, predictions=False), "old")
    base = _commit(repo, _revision_files(False, resolved=True, predictions=True), "base")
    git(repo, "checkout", "-q", "-b", "feature/better")
    files = _revision_files(True, resolved=True, predictions=True)
    files["reports/segmenter/per_image.csv"] = None  # the segmenter without per-image figures
    _commit(repo, files, "better")
    return repo, {"old": old, "base": base}


def _images_of(md_path: Path) -> list[Path]:
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md_path.read_text())
    return [md_path.parent / ref for ref in refs]


def test_report_of_two_commits_holds_every_section(handmade, tmp_path):
    repo, revs = handmade
    md = R.review(revs["base"][:10], "feature/better", tmp_path / "out", 300, 0, 0.95, repo)
    assert md == tmp_path / "out" / f"{revs['base'][:10]}_vs_feature_better.md"
    text = md.read_text()
    for heading in ("## Summary", "## Params", "## Data", "## Metrics", "## Figures"):
        assert heading in text
    assert text.index("## Summary") < text.index("## Params") < text.index("## Metrics")
    assert "| `train_classifier.learning_rate` | 0.0010 | 0.0100 |" in text
    assert "| `data/raw/classification` | `a1b2c3d4e5` | `a1b2c3d4e5` | identical |" in text
    assert "| images: test | PNEUMONIA | 48 | 48 | 0 |" in text
    summary = text.split("## Params")[0]
    assert "**Classifier**: B better on accuracy (+" in summary and "ROC-AUC (+" in summary
    assert "**Detector**: identical predictions on all 30 test images" in summary
    assert "**Segmenter**: no `reports/segmenter/per_image.csv` at B" in summary
    images = _images_of(md)
    names = {p.name for p in images}
    assert {
        "classifier_roc_pr.png",
        "classifier_confusion.png",
        "classifier_gradcam_A.png",
        "classifier_gradcam_B.png",
        "training_classifier.png",
        "detector_froc.png",
    } <= names
    assert all(p.is_file() and p.read_bytes()[:4] == b"\x89PNG" for p in images)
    page = md.with_suffix(".html").read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*https?:""", page, re.I)
    assert page.count('src="data:image/png;base64,') == len(images)
    assert "<script" not in page and "@import" not in page and "<link" not in page


def test_an_older_revision_without_resolved_params_or_predictions_still_reports(handmade, tmp_path):
    repo, revs = handmade
    md = R.review(revs["old"], "feature/better", tmp_path, 300, 0, 0.95, repo)
    text = md.read_text()
    assert "raw `params.yaml` diff" in text and "+  learning_rate: 0.01" in text
    assert "no `reports/classifier/predictions.csv` at A" in text
    assert (md.parent / md.stem / "classifier_roc_pr.png").is_file()  # from the plots csvs


def test_ci_script_prints_the_markdown_path_only(handmade):
    repo, revs = handmade
    git(repo, "update-ref", "refs/remotes/origin/main", revs["base"])  # what a CI clone holds
    env = {**tool_env(), "PYTHONPATH": str(REPO), "PYTHON": str(BIN / "python")}
    env.pop("REVIEW_BASE", None)
    proc = subprocess.run(
        [str(REPO / ".ci" / "review")],
        cwd=repo,
        env={**env, "GITHUB_BASE_REF": "main"},  # GitHub Actions names the PR's base branch
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [str(repo / paths.REVIEW / "origin_main_vs_HEAD.md")]
    assert "**Classifier**: B better on" in Path(proc.stdout.strip()).read_text()


# --------------------------------------------------------------------------- end to end
# The session's tiny DVC build (shared with the remote and reproducibility tests, all slow)
# takes minutes on its own; the two tests below add one short training and the review.


@pytest.fixture(scope="module")
def experiment_repo(tmp_path_factory) -> Path:
    """A copy of the session's tiny pipeline (committed) with its experiment `asis` on top."""
    repo = tmp_path_factory.mktemp("review-e2e") / "repo"
    shutil.copytree(shared_experiment(tmp_path_factory).path, repo, symlinks=True)
    return repo


@pytest.mark.slow
def test_review_of_head_against_an_experiment(experiment_repo):
    repo = experiment_repo
    for path in (paths.CLASSIFICATION.predictions, paths.DETECTION.predictions):
        assert git(repo, "show", f"HEAD:{path.as_posix()}")  # evaluate wrote and git tracks it
    proc = review_cli(repo, "HEAD", "asis", "--resamples", "300")
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = repo / proc.stdout.strip()
    assert md == repo / paths.REVIEW / "HEAD_vs_asis.md"
    text = md.read_text()
    for heading in ("## Summary", "## Params", "## Data", "## Metrics", "## Figures"):
        assert heading in text
    assert text.count("### Classifier") == 2 and text.count("### Detector") == 2  # metrics, figs
    assert "experiment `asis`" in text
    assert "`train_classifier.arch`" in text
    assert "**Classifier**: " in text and "Paired on the same" in text
    assert "**Detector**: identical predictions" in text  # the experiment left it alone
    assert "| `data/augment/detection/fit` |" in text and "| identical |" in text
    images = _images_of(md)
    assert {"classifier_roc_pr.png", "detector_froc.png", "training_detector.png"} <= {
        p.name for p in images
    }
    assert all(p.is_file() for p in images)
    page = md.with_suffix(".html").read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*https?:""", page, re.I)
    assert proc.stdout.strip() == md.relative_to(repo).as_posix()  # stdout: the path only
    assert "detector: bootstrap" in proc.stderr  # progress goes to stderr


@pytest.mark.slow
def test_a_queued_experiment_that_has_not_run_gets_one_line(experiment_repo):
    repo = experiment_repo
    dvc(repo, "exp", "run", "--queue", "-n", "waiting", "-S", "train_classifier.seed=3")
    with pytest.raises(StageError) as err:
        R.resolve_rev("waiting", repo)
    assert "queued experiment that has not run yet" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_a_fresh_clone_without_the_dvc_cache_reviews_and_says_what_is_missing(
    tmp_path, tmp_path_factory
):
    """A teammate's clone before `dvc pull`: the training curves (DVC-tracked) are not in its
    cache, and DVC cannot even list their folder; the review still runs, and says so."""
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(shared_experiment(tmp_path_factory).path), str(clone))
    assert not (clone / ".dvc" / "cache").exists()
    proc = review_cli(clone, "HEAD", "HEAD", "--resamples", "100")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (clone / proc.stdout.strip()).read_text()
    assert "## Metrics" in text
    assert (
        "Training curves of A and B: `reports/live/classifier/` is not in the local DVC cache"
        in text
    )
