"""Predictor and ``python -m stages.predict``: real images, training preprocessing, boxes back
in original pixels, Grad-CAM, threshold from evaluate, JSON lines and bad files.

Models: tiny ones built once per session (tests/serve_models.py), never the workspace's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import stages  # noqa: F401  (torch before TensorFlow)
from stages.classifier.predict import load_info, predict_proba, sidecar_path
from stages.common.cache import resize_affine, resize_gray, transform_boxes
from stages.common.utils import StageError, read_json, write_json
from stages.serve.inference import Predictor, decision_rule
from stages.serve.predict import expand_inputs, main
from stages.serve.render import boxes_to_original, cam_to_original
from tests.serve_models import CLASSES, THRESHOLD, bad_inputs, tiny_models, xray_like


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    return tiny_models(tmp_path_factory.getbasetemp() / "serve_models")


@pytest.fixture(scope="module")
def predictor(models) -> Predictor:
    return Predictor(models["classifier"], models["detector"], models["metrics"], min_score=0.0)


def _check_prediction(pred, gray: np.ndarray, threshold: float) -> None:
    h, w = gray.shape
    c = pred.classification
    probs = np.array([c["probabilities"][k] for k in CLASSES])
    assert np.all((probs >= 0) & (probs <= 1))
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)  # softmax head
    assert c["p_positive"] == pytest.approx(c["probabilities"]["PNEUMONIA"])
    assert c["positive"] == (c["p_positive"] >= threshold)
    assert c["decision"] == ("PNEUMONIA" if c["positive"] else "NORMAL")
    assert pred.gradcam.shape == (h, w)
    assert pred.gradcam.min() >= 0.0 and pred.gradcam.max() <= 1.0
    assert pred.gradcam.std() > 0  # not constant
    boxes = np.array([b["box_xyxy"] for b in pred.detection["boxes"]]).reshape(-1, 4)
    assert len(boxes) > 0
    assert np.all(boxes >= 0) and np.all(boxes[:, [0, 2]] <= w) and np.all(boxes[:, [1, 3]] <= h)
    assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])


def test_real_kermany_images(predictor, shared_data):
    files = sorted((shared_data / "kermany224" / "train").glob("*/*.jpeg"))[:3]
    files += sorted((shared_data / "kermany224" / "train" / "PNEUMONIA").glob("*.jpeg"))[:2]
    assert files, "no Kermany images found"
    for path in files:
        pred = predictor.predict_file(path, gradcam=True)
        _check_prediction(pred, predictor.decode_file(path), THRESHOLD)
        assert pred.classification["threshold_source"].endswith("(youden)")


def test_real_pneumoniamnist_and_nih_through_the_cli(models, shared_data, tmp_path):
    npz = np.load(shared_data / "pneumoniamnist" / "pneumoniamnist_trainval.npz")
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):  # 28 px images: upscaled by the same resize as the cache
        Image.fromarray(npz["val_images"][i]).save(folder / f"mnist{i}.png")
    nih = sorted((shared_data / "nih14_bbox" / "images").glob("*.png"))[:1]
    out, cams = tmp_path / "preds.jsonl", tmp_path / "cams"
    argv = [str(folder), *map(str, nih), "--out", str(out), "--gradcam-dir", str(cams)]
    argv += ["--classifier", str(models["classifier"]), "--detector", str(models["detector"])]
    argv += ["--metrics", str(models["metrics"]), "--min-score", "0"]
    assert main(argv) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(line["file"]).name for line in lines] == [
        *(f"mnist{i}.png" for i in range(3)),
        *(p.name for p in nih),
    ]
    for line in lines:
        c = line["classification"]
        assert sum(c["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert c["threshold"] == THRESHOLD
        png = Image.open(c["gradcam_png"])
        assert png.size == (line["width"], line["height"]) and png.mode == "RGB"
        for box in line["detection"]["boxes"]:
            x0, y0, x1, y1 = box["box_xyxy"]
            assert 0 <= x0 < x1 <= line["width"] and 0 <= y0 < y1 <= line["height"]


def test_same_preprocessing_as_the_cache(predictor, models):
    """The classifier sees exactly resize_gray(image, S, sidecar resize) - the augment code."""
    info = load_info(models["classifier"])
    assert info.resize == "pad"  # written by train_classifier from the cache meta
    gray = xray_like(130, 70)
    pred = predictor.predict_gray(gray, "x")
    x, _ = resize_gray(gray, info.image_size, "pad")
    expected = predict_proba(predictor.classifier, x[None])[0]
    got = [pred.classification["probabilities"][k] for k in info.classes]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_old_sidecar_without_resize_defaults_to_stretch(models, tmp_path):
    doc = read_json(sidecar_path(models["classifier"]))
    doc.pop("resize")
    write_json(sidecar_path(tmp_path / "old.keras"), doc)
    assert load_info(tmp_path / "old.keras").resize == "stretch"


@pytest.mark.parametrize("mode", ["pad", "stretch"])
def test_boxes_and_cam_map_back_to_original_pixels(mode):
    h, w, size = 300, 180, 64
    affine = resize_affine(h, w, size, mode)
    boxes = np.array([[10, 20, 100, 250], [0, 0, 180, 300]], dtype=np.float32)
    there = transform_boxes(boxes, affine, size)
    np.testing.assert_allclose(boxes_to_original(there, affine, (h, w)), boxes, atol=0.01)
    cam = np.zeros((size, size), np.float32)
    cam[:, : size // 2] = 1.0
    back = cam_to_original(cam, affine, (h, w))
    assert back.shape == (h, w)
    assert back[:, : w // 4].mean() > 0.9 and back[:, -w // 4 :].mean() < 0.1  # left stays left


def test_decision_rule_reads_evaluate_or_falls_back(tmp_path):
    rule = decision_rule(CLASSES, tmp_path / "missing.json")
    assert (rule.threshold, rule.positives) == (0.5, ("PNEUMONIA",)) and "0.5" in rule.note
    other = tmp_path / "m.json"
    write_json(other, {"threshold": 0.2, "positive_class": ["PNEUMONIA"], "classes": ["A", "B"]})
    assert decision_rule(CLASSES, other).threshold == 0.5  # metrics of another model
    three = ("BACTERIA", "NORMAL", "VIRUS")
    write_json(other, {"threshold": 0.3, "positive_class": ["BACTERIA", "VIRUS"]})
    rule = decision_rule(three, other)
    assert (rule.threshold, rule.positives, rule.note) == (0.3, ("BACTERIA", "VIRUS"), "")
    assert decision_rule(three, tmp_path / "missing.json").positives == ("BACTERIA", "VIRUS")


def test_one_model_only_and_none(models, tmp_path):
    det_only = Predictor(tmp_path / "absent.keras", models["detector"], min_score=0.0)
    pred = det_only.predict_gray(xray_like(), "x", gradcam=True)
    assert pred.classification is None and pred.gradcam is None and pred.detection["boxes"]
    assert "dvc pull" in det_only.missing["classifier"]
    cls_only = Predictor(models["classifier"], tmp_path / "absent.pt", models["metrics"])
    pred = cls_only.predict_gray(xray_like(), "x")
    assert pred.detection is None and pred.classification["threshold"] == THRESHOLD
    none = Predictor(tmp_path / "a.keras", tmp_path / "b.pt")
    with pytest.raises(StageError, match="dvc repro train-classifier"):
        none.require_model()


def test_cli_reports_bad_files_as_error_lines(models, tmp_path, capsys):
    cases = bad_inputs(tmp_path / "in")
    out = tmp_path / "preds.jsonl"
    argv = [str(tmp_path / "in"), str(cases["non_image"][0]), "--out", str(out)]
    argv += ["--classifier", str(models["classifier"]), "--detector", str(models["detector"])]
    assert main([*argv, "--metrics", str(models["metrics"])]) == 1  # some files were refused
    lines = {Path(x["file"]).name: x for x in map(json.loads, out.read_text().splitlines())}
    for path, reason in cases.values():
        line = lines[path.name]
        if reason is None:
            assert "classification" in line and "error" not in line
        else:
            assert line["reason"] == reason and path.name in line["error"]
    assert "good.png" in lines and "error" not in lines["good.png"]
    assert "refused" in capsys.readouterr().err


def test_cli_without_models_or_inputs_is_a_usage_error(tmp_path):
    img = tmp_path / "a.png"
    Image.fromarray(xray_like()).save(img)
    with pytest.raises(StageError, match="dvc pull"):
        main([str(img), "--classifier", str(tmp_path / "x.keras"), "--detector", "none.pt"])
    with pytest.raises(StageError, match="no such file"):
        expand_inputs([tmp_path / "missing"])
