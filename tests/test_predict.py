"""Predictor and ``python -m stages.predict``: real images, training preprocessing, boxes back
in original pixels, Grad-CAM, the evaluation's whole decision (threshold, temperature, TTA,
ensemble), JSON lines and bad files.

Models: tiny ones built once per session (tests/serve_models.py), never the workspace's; the
decision tests use Keras models whose probability is known in closed form.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import stages  # noqa: F401  (torch before TensorFlow)
from stages.classifier.predict import load_info, predict_proba, sidecar_path
from stages.common.cache import prepare_gray, resize_affine, transform_boxes
from stages.common.utils import StageError, read_json, write_json
from stages.serve.inference import DEFAULT, Predictor, decision_rule
from stages.serve.predict import expand_inputs, main
from stages.serve.render import boxes_to_original, cam_to_original
from tests.serve_models import (
    CLASSES,
    THRESHOLD,
    bad_inputs,
    constant_classifier,
    evaluation_file,
    left_half_classifier,
    left_half_probability,
    save_tiny_detector,
    tiny_models,
    xray_like,
)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    return tiny_models(tmp_path_factory.getbasetemp() / "serve_models")


@pytest.fixture(scope="module")
def predictor(models) -> Predictor:
    return Predictor(models["classifier"], models["detector"], models["evaluation"], 0.0)


@pytest.fixture(scope="session")
def const_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("const_models")


def _const(folder: Path, p: float, **kw) -> Path:
    """One constant classifier per (p, options), built once per session."""
    tag = "_".join(f"{k}{v}" for k, v in sorted(kw.items()))
    path = folder / f"p{p}_{tag}.keras"
    return path if path.is_file() else constant_classifier(path, p, **kw)


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
    argv += ["--evaluation", str(models["evaluation"]), "--min-score", "0"]
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
        assert (Path(c["gradcam_png"]).stat().st_mode & 0o777) == 0o644  # the atomic writer's
        for box in line["detection"]["boxes"]:
            x0, y0, x1, y1 = box["box_xyxy"]
            assert 0 <= x0 < x1 <= line["width"] and 0 <= y0 < y1 <= line["height"]
    assert (out.stat().st_mode & 0o777) == 0o644


# ------------------------------------------------------------------------------ preprocessing
def test_same_preprocessing_as_the_cache(predictor, models):
    """The classifier sees exactly prepare_gray(image, S, sidecar resize, intensity)."""
    info = load_info(models["classifier"])
    assert info.resize == "pad"  # written by train_classifier from the cache meta
    gray = xray_like(130, 70)
    pred = predictor.predict_gray(gray, "x")
    x, _ = prepare_gray(gray, info.image_size, "pad", info.intensity)
    expected = predict_proba(predictor.classifier, x[None])[0]
    got = [pred.classification["probabilities"][k] for k in info.classes]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("resize", "intensity"), [("pad", "equalize"), ("stretch", "none"), ("stretch", "standardize")]
)
def test_classifier_applies_its_sidecar_modes(tmp_path, resize, intensity):
    """A classifier reading its left half: the served probability is the one of
    prepare_gray(image, S, resize, intensity) - computed by hand, not by the model."""
    path = left_half_classifier(tmp_path / "left.keras", 32, resize, intensity)
    predictor = Predictor(path, None, tmp_path / "no-evaluation.json", provenance_root=None)
    gray = xray_like(90, 40, seed=5)
    gray[:, :10] = 250  # bright left edge: pad / stretch / equalize all move the probability
    got = predictor.predict_gray(gray, "x").classification["p_positive"]
    want = left_half_probability(prepare_gray(gray, 32, resize, intensity)[0])
    assert got == pytest.approx(want, abs=1e-5)
    other = left_half_probability(
        prepare_gray(gray, 32, "stretch" if resize == "pad" else "pad", "none")[0]
    )
    assert abs(got - other) > 1e-3  # the test would see another mode


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


def _spy_detector(predictor: Predictor, monkeypatch, boxes: list[list[float]]) -> list:
    """Replace the network by a fake answering ``boxes`` (model pixels); returns its inputs."""
    seen: list[np.ndarray] = []

    def fake(x):
        seen.append(np.array(x))
        n = len(boxes)
        return {
            "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "scores": np.full(n, 0.9, np.float32),
            "labels": np.ones(n, np.int64),
        }

    monkeypatch.setattr(predictor, "run_detector", fake)
    return seen


def test_detector_uses_the_checkpoints_pad_mode(models, monkeypatch):
    """A non-square image: the detector input is prepare_gray(..., "pad") and a box found in the
    model's pixels lands where the pad geometry says, in original pixels."""
    predictor = Predictor(None, models["detector"], provenance_root=None, min_score=0.5)
    assert (predictor.det_size, predictor.det_resize) == (64, "pad")
    h, w = 120, 60  # pad at 64: scale 64/120, content 32 x 64 placed at x 16..48
    gray = xray_like(h, w, seed=2)
    seen = _spy_detector(predictor, monkeypatch, [[24, 16, 40, 48], [16, 0, 48, 64]])
    det = predictor.predict_gray(gray, "x").detection
    np.testing.assert_array_equal(seen[0], prepare_gray(gray, 64, "pad", "none")[0])
    stretched = prepare_gray(gray, 64, "stretch", "none")[0]
    assert not np.array_equal(seen[0], stretched)
    got = [b["box_xyxy"] for b in det["boxes"]]
    assert got == [[15.0, 30.0, 45.0, 90.0], [0.0, 0.0, 60.0, 120.0]]


def test_detector_uses_the_checkpoints_intensity_mode(tmp_path, monkeypatch):
    path = save_tiny_detector(tmp_path / "eq.pt", 64, "stretch", "equalize")
    predictor = Predictor(None, path, provenance_root=None)
    gray = (xray_like(80, 100, seed=4) // 3).astype(np.uint8)  # dark: equalising changes it
    seen = _spy_detector(predictor, monkeypatch, [])
    predictor.predict_gray(gray, "x")
    np.testing.assert_array_equal(seen[0], prepare_gray(gray, 64, "stretch", "equalize")[0])
    assert not np.array_equal(seen[0], prepare_gray(gray, 64, "stretch", "none")[0])


# ------------------------------------------------------------------------------ the decision
@pytest.mark.parametrize(
    ("p", "threshold", "positive"),
    [(0.6, 0.7, False), (0.6, 0.55, True), (0.4, 0.3, True), (0.4, 0.45, False)],
)
def test_decision_follows_the_evaluation_threshold(const_dir, tmp_path, p, threshold, positive):
    """P(PNEUMONIA) is a known constant between 0.5 and the threshold: the decision must follow
    the threshold of evaluation.json, not 0.5."""
    model = _const(const_dir, p)
    evaluation = evaluation_file(tmp_path / "evaluation.json", threshold, [model])
    predictor = Predictor(model, None, evaluation, provenance_root=None)
    c = predictor.predict_gray(xray_like(), "x").classification
    assert c["p_positive"] == pytest.approx(p, abs=1e-5)
    assert c["threshold"] == threshold
    assert c["positive"] is positive
    assert c["decision"] == ("PNEUMONIA" if positive else "NORMAL")
    assert predictor.notes == []


def test_temperature_of_the_decision_is_applied(const_dir, tmp_path):
    """T = 2 on p = 0.6: softmax(log p / 2) = sqrt(.6) / (sqrt(.6) + sqrt(.4)) = 0.5505; a
    threshold of 0.58 lies between the calibrated and the raw probability."""
    model = _const(const_dir, 0.6)
    evaluation = evaluation_file(tmp_path / "e.json", 0.58, [model], temperature=2.0)
    c = Predictor(model, None, evaluation, provenance_root=None).predict_gray(xray_like(), "x")
    c = c.classification
    want = np.sqrt(0.6) / (np.sqrt(0.6) + np.sqrt(0.4))
    assert c["p_positive"] == pytest.approx(want, abs=1e-5)
    assert c["temperature"] == 2.0 and c["positive"] is False


def test_tta_hflip_of_the_decision_is_applied(tmp_path):
    model = left_half_classifier(tmp_path / "left.keras", 32, "stretch")
    gray = xray_like(64, 64, seed=1)
    gray[:, :20] = 240  # bright left side: its mirror image is darker on the left
    x = prepare_gray(gray, 32, "stretch")[0]
    want = (left_half_probability(x) + left_half_probability(x[:, ::-1])) / 2
    for tta, expected in (("hflip", want), ("none", left_half_probability(x))):
        evaluation = evaluation_file(tmp_path / f"{tta}.json", 0.5, [model], tta=tta)
        c = Predictor(model, None, evaluation, provenance_root=None).predict_gray(gray, "x")
        assert c.classification["p_positive"] == pytest.approx(expected, abs=1e-5), tta
        assert c.classification["tta"] == tta
    assert abs(want - left_half_probability(x)) > 0.01


def test_ensemble_averages_like_evaluate(const_dir, tmp_path, monkeypatch):
    a, b = _const(const_dir, 0.6), _const(const_dir, 0.2)
    evaluation = evaluation_file(tmp_path / "e.json", 0.35, [a, b])
    # default: the decision's models, when they all exist
    predictor = Predictor(DEFAULT, None, evaluation, provenance_root=None)
    assert predictor.classifier_paths == [a, b]
    c = predictor.predict_gray(xray_like(), "x").classification
    assert c["p_positive"] == pytest.approx(0.4, abs=1e-5) and c["positive"] is True
    # ... through the command: --classifier repeated
    img = tmp_path / "a.png"
    Image.fromarray(xray_like()).save(img)
    out = tmp_path / "p.jsonl"
    argv = [str(img), "--classifier", str(a), "--classifier", str(b), "--detector", "none.pt"]
    assert main([*argv, "--evaluation", str(evaluation), "--out", str(out)]) == 0
    line = json.loads(out.read_text())
    assert line["classification"]["p_positive"] == pytest.approx(0.4, abs=1e-5)
    # one model of the list missing: the pipeline's single model path instead
    monkeypatch.chdir(tmp_path)
    missing = evaluation_file(tmp_path / "m.json", 0.35, [a, tmp_path / "gone.keras"])
    assert Predictor(DEFAULT, None, missing, provenance_root=None).classifier_paths == [
        Path("models/classifier.keras")
    ]


def test_serving_other_models_than_the_evaluation_is_noted(const_dir, tmp_path):
    a, b = _const(const_dir, 0.6), _const(const_dir, 0.2)
    evaluation = evaluation_file(tmp_path / "e.json", 0.35, [a, b])
    predictor = Predictor(a, None, evaluation, provenance_root=None)
    assert any("was chosen for" in n for n in predictor.notes)


def test_ensemble_of_different_inputs_is_refused(const_dir, tmp_path):
    a, b = _const(const_dir, 0.6), _const(const_dir, 0.6, size=48)
    with pytest.raises(StageError, match="ensemble needs models of one cache"):
        Predictor([a, b], None, tmp_path / "none.json", provenance_root=None)


def test_decision_rule_reads_evaluate_or_falls_back(tmp_path):
    rule = decision_rule(CLASSES, tmp_path / "missing.json")
    assert (rule.threshold, rule.positives) == (0.5, ("PNEUMONIA",)) and "0.5" in rule.note
    other = tmp_path / "m.json"
    doc = {"threshold": 0.2, "positive_class": ["PNEUMONIA"], "classes": ["A", "B"]}
    write_json(other, {"decision": doc})
    assert decision_rule(CLASSES, other).threshold == 0.5  # evaluation of another model
    write_json(other, {"threshold": 0.2})  # the old flat metrics file: no decision block
    assert "no decision block" in decision_rule(CLASSES, other).note
    three = ("BACTERIA", "NORMAL", "VIRUS")
    write_json(other, {"decision": {"threshold": 0.3, "positive_class": ["BACTERIA", "VIRUS"]}})
    rule = decision_rule(three, other)
    assert (rule.threshold, rule.positives, rule.note) == (0.3, ("BACTERIA", "VIRUS"), "")
    assert (rule.temperature, rule.tta) == (1.0, "none")
    assert decision_rule(three, tmp_path / "missing.json").positives == ("BACTERIA", "VIRUS")
    write_json(other, {"decision": {"threshold": 0.3, "temperature": 0}})
    with pytest.raises(StageError, match="temperature"):
        decision_rule(CLASSES, other)
    write_json(other, {"decision": {"threshold": 0.3, "tta": "vflip"}})
    with pytest.raises(StageError, match="tta"):
        decision_rule(CLASSES, other)


def test_one_model_only_and_none(models, tmp_path):
    det_only = Predictor(tmp_path / "absent.keras", models["detector"], min_score=0.0)
    pred = det_only.predict_gray(xray_like(), "x", gradcam=True)
    assert pred.classification is None and pred.gradcam is None and pred.detection["boxes"]
    assert "dvc pull" in det_only.missing["classifier"]
    cls_only = Predictor(models["classifier"], tmp_path / "absent.pt", models["evaluation"])
    pred = cls_only.predict_gray(xray_like(), "x")
    assert pred.detection is None and pred.classification["threshold"] == THRESHOLD
    none = Predictor(tmp_path / "a.keras", tmp_path / "b.pt")
    with pytest.raises(StageError, match="dvc repro train-classifier"):
        none.require_model()


# ----------------------------------------------------------------------- provenance in JSON
def test_json_names_each_models_origin_and_data(models, tmp_path, monkeypatch, capsys):
    """Run from the tiny workspace: the classifier's data are kermany (split csv), the
    detector's synthetic (cache index) and flagged so, on every line and on stderr."""
    monkeypatch.chdir(models["root"])
    img = tmp_path / "a.png"
    Image.fromarray(xray_like()).save(img)
    out = tmp_path / "p.jsonl"
    assert main([str(img), "--out", str(out), "--min-score", "0"]) == 0  # the default paths
    line = json.loads(out.read_text())
    (cls,) = line["classification"]["models"]
    (det,) = line["detection"]["models"]
    assert cls["trained_on"] == {"kermany": 6} and cls["tested_on"] == {"kermany": 3}
    assert cls["synthetic_data"] is False and "split" in cls["data_from"]
    assert det["trained_on"] == {"synthetic": 6} and det["synthetic_data"] is True
    assert "synthetic phantoms" in det["data"]
    assert {"experiment", "commit", "dvc_lock", "model_file"} <= set(det)
    err = capsys.readouterr().err
    assert "SYNTHETIC DATA: the detector was trained and tested on synthetic phantoms" in err


def test_json_of_a_model_from_elsewhere_says_data_unknown(models, tmp_path):
    predictor = Predictor(None, models["detector"], provenance_root=tmp_path)
    (det,) = predictor.model_records["detector"]
    assert det["synthetic_data"] is False and det["trained_on"] == {}
    assert "not the pipeline's model" in det["data"]


# ----------------------------------------------------------------------------- the command
def test_cli_reports_bad_files_as_error_lines(models, tmp_path, capsys):
    cases = bad_inputs(tmp_path / "in")
    out = tmp_path / "preds.jsonl"
    argv = [str(tmp_path / "in"), str(cases["non_image"][0]), "--out", str(out)]
    argv += ["--classifier", str(models["classifier"]), "--detector", str(models["detector"])]
    assert main([*argv, "--evaluation", str(models["evaluation"])]) == 1  # some were refused
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


def test_images_under_the_minimum_side_are_refused(predictor):
    """The one floor (MIN_SIDE, short side) of the page, its API and the command: a 1 x 1 image
    gets no answer; an image of exactly MIN_SIDE pixels does."""
    import io

    from stages.common.imageio import ImageRejected
    from stages.serve.inference import MIN_SIDE, rejection_message

    def png(h: int, w: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(xray_like(h, w)).save(buf, format="PNG")
        return buf.getvalue()

    assert predictor.decode_bytes(png(MIN_SIDE, 200), "ok.png").shape == (MIN_SIDE, 200)
    for h, w in ((1, 1), (MIN_SIDE - 1, 300), (300, MIN_SIDE - 1)):
        with pytest.raises(ImageRejected) as info:
            predictor.decode_bytes(png(h, w), "small.png")
        assert info.value.reason == "too_small"
        assert f"under {MIN_SIDE} pixels" in rejection_message(info.value)
