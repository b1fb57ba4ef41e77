"""evaluate@classification end to end on a tiny cache + Keras model, and Grad-CAM."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import stages  # noqa: F401  (torch before TensorFlow)
from stages.classifier import metrics as M
from stages.classifier.evaluate import (
    EvalClassificationConfig,
    compute_metrics,
    run,
)
from stages.common.cache import write_meta, write_split
from stages.common.config import load_section, parse
from stages.common.paths import CLASSIFICATION
from stages.common.utils import StageError
from tests.plot_defs import undeclared_report_images

keras = pytest.importorskip("keras")
from stages.classifier.gradcam import GradCam, find_target_layer, grad_cam, overlay  # noqa: E402

S = 48
CLASSES = ("NORMAL", "PNEUMONIA")
TOP_KEYS = ("accuracy", "roc_auc", "precision", "recall", "specificity", "f1")


def _images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noise; PNEUMONIA images get a bright blob at a random place (learnable in a few steps)."""
    imgs = rng.normal(70, 20, (len(labels), S, S))
    yy, xx = np.mgrid[:S, :S]
    for i, lab in enumerate(labels):
        if lab:
            cy, cx = rng.integers(12, S - 12, 2)
            imgs[i] += 22 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 6.0**2))
    return np.clip(imgs, 0, 255).astype(np.uint8)


def _index(labels: np.ndarray, split: str, offset: int) -> pd.DataFrame:
    n = len(labels)
    names = np.array(CLASSES)[labels]
    return pd.DataFrame(
        {
            "path": [f"data/raw/classification/images/x/{offset + i}.png" for i in range(n)],
            "label": names,
            "subtype": "",
            "patient_id": [f"synthetic:{offset + i}" for i in range(n)],
            "source": "synthetic",
            "source_split": "",
            "width": S,
            "height": S,
            "sha256": "0" * 64,
            "split": split,
            "label_index": labels,
        }
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A 3-split cache and a to_be model trained for a few steps, saved with its sidecar."""
    from stages.classifier.config import TrainClassifierConfig
    from stages.classifier.models import build_model
    from stages.classifier.predict import ClassifierInfo, save_info
    from stages.common.utils import seed_everything

    root = tmp_path_factory.mktemp("evalcls")
    cache = root / "cache"
    rng = np.random.default_rng(0)
    counts, data, offset = {"train": 96, "val": 40, "test": 40}, {}, 0
    for split, n in counts.items():
        labels = (rng.random(n) < 0.6).astype(np.int64)
        labels[:2] = [0, 1]  # both classes in every split
        data[split] = (_images(labels, rng), labels)
        write_split(cache, split, data[split][0], _index(labels, split, offset), S)
        offset += n
    write_meta(
        cache,
        {
            "task": "classification",
            "image_size": S,
            "resize": "stretch",
            "classes": list(CLASSES),
            "counts": counts,
        },
    )
    seed_everything(0)
    model = build_model(TrainClassifierConfig(arch="to_be"), S)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="binary_crossentropy")
    x, y = data["train"]
    model.fit(
        x[..., None].astype("float32"),
        y[:, None].astype("float32"),
        epochs=4,
        batch_size=16,
        verbose=0,
    )
    model_path = root / "models" / "classifier.keras"
    model_path.parent.mkdir()
    model.save(model_path)
    save_info(model_path, ClassifierInfo(CLASSES, {}, "sigmoid", 1, "binary", S, "to_be"))
    return {"root": root, "cache": cache, "model_path": model_path, "model": model, "data": data}


def _run(setup: dict, name: str, cache: Path | None = None, **overrides) -> tuple[dict, dict]:
    out = setup["root"] / name
    cfg = dataclasses.replace(
        EvalClassificationConfig(bootstrap=200, n_samples_grid=6, n_gradcam=4), **overrides
    )
    paths = {
        "metrics_path": out / "metrics" / "classifier.json",
        "report_dir": out / "reports" / "classifier",
    }
    doc = run(cfg, cache or setup["cache"], [setup["model_path"]], **paths)
    paths["plots_dir"] = paths["report_dir"] / "plots"
    return doc, paths


def test_params_section_parses(repo_root):
    cfg = load_section(
        EvalClassificationConfig, "evaluate.classification", repo_root / "params.yaml"
    )
    assert cfg.positives == ("PNEUMONIA",)
    multi = parse(EvalClassificationConfig, {"positive_class": ["BACTERIA", "VIRUS"]})
    assert multi.positives == ("BACTERIA", "VIRUS")


def test_run_writes_exact_metrics_and_every_file(setup):
    from stages.classifier.predict import predict_proba

    doc, paths = _run(setup, "main")
    headline = json.loads(paths["metrics_path"].read_text())
    written = json.loads((paths["report_dir"] / "evaluation.json").read_text())
    assert written == json.loads(json.dumps(doc))
    # metrics/classifier.json: the three test figures `dvc exp show` compares, equal to the full
    # document's; every other figure stays in the report (no column of its own)
    assert headline == {
        "accuracy": written["accuracy"],
        "roc_auc": written["roc_auc"],
        "specificity": written["specificity"],
    }
    assert written["decision"]["threshold"] == written["threshold"]
    assert written["decision"]["positive_class"] == ["PNEUMONIA"]
    for key in TOP_KEYS + ("pr_auc", "threshold"):
        assert type(written[key]) is float, key
    assert written["split"] == "test" and written["val"]["split"] == "val"
    assert written["n_test"] == 40 and written["threshold_method"] == "youden"
    assert set(written["at_0_5"]) == set(TOP_KEYS) - {"roc_auc"} | {"confusion_matrix"}
    lo, hi = written["roc_auc_ci"]
    assert lo <= written["roc_auc"] <= hi
    # The numbers are those of the model's own probabilities, threshold chosen on val.
    proba = {s: predict_proba(setup["model"], setup["data"][s][0]) for s in ("val", "test")}
    t = M.youden_threshold(setup["data"]["val"][1], proba["val"][:, 1])
    assert written["threshold"] == pytest.approx(t, abs=1e-6)
    y_test = setup["data"]["test"][1]
    assert written["roc_auc"] == pytest.approx(M.roc_auc(y_test, proba["test"][:, 1]), abs=1e-6)
    assert written["roc_auc"] > 0.7  # the blob task is learnable: predictions are not noise
    # val_predictions.csv: the validation probabilities the threshold was fitted on, per image
    val = pd.read_csv(paths["report_dir"] / "val_predictions.csv")
    assert len(val) == written["n_val"] == len(setup["data"]["val"][1])
    assert val["positive"].tolist() == setup["data"]["val"][1].tolist()
    assert val["p_positive"].to_numpy() == pytest.approx(proba["val"][:, 1], abs=1e-6)
    assert M.youden_threshold(val["positive"], val["p_positive"]) == pytest.approx(t, abs=1e-6)
    assert (val["predicted"] == (val["p_positive"] >= written["threshold"])).all()
    for name in ("roc.csv", "pr.csv", "confusion.csv"):
        assert (paths["plots_dir"] / name).stat().st_size > 0, name
    for name in ("samples.png", "gradcam.png", "model_card.md"):
        assert (paths["report_dir"] / name).stat().st_size > 0, name
    # The curves are Vega plots of the csv files only (no PNG copy); every image the report
    # writes or its card names is a declared plot of dvc.yaml.
    assert not {"roc.png", "pr.png", "confusion.png"} & set(os.listdir(paths["report_dir"]))
    assert undeclared_report_images(paths["report_dir"], CLASSIFICATION.report_dir) == []
    roc = pd.read_csv(paths["plots_dir"] / "roc.csv")
    assert list(roc.columns) == ["fpr", "tpr", "threshold"]
    assert list(pd.read_csv(paths["plots_dir"] / "pr.csv").columns)[:2] == ["recall", "precision"]
    confusion = pd.read_csv(paths["plots_dir"] / "confusion.csv")
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == 40
    card = (paths["report_dir"] / "model_card.md").read_text()
    assert "Not a medical device" in card and "synthetic default data" in card
    assert f"{written['accuracy']:.4f}" in card and "Validation" in card
    (tn, fp), (fn, tp) = written["confusion_matrix"]
    neg, pos = written["confusion_labels"]
    assert f"| actual \\ predicted | {neg} | {pos} |" in card
    assert f"| {neg} | {tn} | {fp} |" in card and f"| {pos} | {fn} | {tp} |" in card
    assert f"{written['roc_auc']:.4f}" in card and f"{written['pr_auc']:.4f}" in card


def test_threshold_never_sees_test_labels(setup, tmp_path):
    """Permuting the test labels changes test metrics but never the threshold."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(setup["cache"], cache)
    idx = pd.read_csv(cache / "test" / "index.csv", keep_default_na=False, dtype={"sha256": str})
    perm = np.random.default_rng(3).permutation(len(idx))
    idx[["label", "label_index"]] = idx[["label", "label_index"]].to_numpy()[perm]
    idx.to_csv(cache / "test" / "index.csv", index=False)
    base, _ = _run(setup, "a")
    permuted, _ = _run(setup, "b", cache=cache)
    assert permuted["threshold"] == base["threshold"]
    assert permuted["val"] == base["val"]
    assert permuted["roc_auc"] != base["roc_auc"]


def test_run_multiclass_drops_unknown_classes(tmp_path):
    """3-class softmax model, a cache with a 4th label it never saw: rows dropped, not failed."""
    from stages.classifier.predict import ClassifierInfo, save_info

    labels_all = ("BACTERIA", "COVID", "NORMAL", "VIRUS")
    rng = np.random.default_rng(2)
    for offset, split in enumerate(("val", "test")):
        lab = np.arange(24) % 4
        idx = _index(lab % 2, split, 100 * offset).assign(
            label=np.array(labels_all)[lab], label_index=lab
        )
        write_split(tmp_path / "cache", split, _images(lab % 2, rng), idx, S)
    write_meta(tmp_path / "cache", {"task": "classification", "image_size": S, "resize": "stretch",
                                    "classes": list(labels_all), "counts": {"val": 24, "test": 24}})  # fmt: skip
    keras.utils.set_random_seed(1)
    inp = keras.Input((S, S, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu")(keras.layers.Rescaling(1 / 255)(inp))
    out = keras.layers.Dense(3, activation="softmax", name="head")(
        keras.layers.GlobalAveragePooling2D()(x)
    )
    model_path = tmp_path / "classifier.keras"
    keras.Model(inp, out).save(model_path)
    classes = ("BACTERIA", "NORMAL", "VIRUS")
    save_info(model_path, ClassifierInfo(classes, {}, "softmax", 3, "onehot", S, "tiny"))
    cfg = EvalClassificationConfig(positive_class=("BACTERIA", "VIRUS"), bootstrap=20,
                                   n_samples_grid=4, n_gradcam=3)  # fmt: skip
    out_dir = tmp_path / "out"
    doc = run(cfg, tmp_path / "cache", [model_path], out_dir / "m.json", out_dir)
    assert doc["n_test"] == 18 and doc["classes"] == list(classes)  # 6 COVID rows dropped
    assert type(doc["macro_roc_auc"]) is float and len(doc["multiclass"]["confusion_matrix"]) == 3
    confusion = pd.read_csv(out_dir / "plots" / "confusion.csv")
    assert set(confusion["actual"]) == set(classes)
    assert (out_dir / "gradcam.png").is_file() and (out_dir / "model_card.md").is_file()
    card = (out_dir / "model_card.md").read_text()
    assert (
        "Per class (argmax):" in card
        and "| actual \\ predicted | BACTERIA | NORMAL | VIRUS |" in card
    )


def test_missing_model_is_a_clear_stage_error(setup, tmp_path):
    cfg = EvalClassificationConfig()
    with pytest.raises(StageError, match="train-classifier"):
        run(cfg, setup["cache"], [tmp_path / "none.keras"], tmp_path / "m.json", tmp_path / "r")
    assert not (tmp_path / "m.json").exists()


def test_compute_metrics_multiclass_and_sensitivity_rule():
    rng = np.random.default_rng(1)
    classes = ["BACTERIA", "NORMAL", "VIRUS"]

    def fake(n):
        y = rng.integers(0, 3, n)
        logits = rng.normal(size=(n, 3)) + 2.0 * np.eye(3)[y]
        return y, np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

    (yv, pv), (yt, pt) = fake(150), fake(120)
    cfg = EvalClassificationConfig(
        positive_class=("BACTERIA", "VIRUS"),
        threshold="sensitivity",
        target_sensitivity=0.9,
        bootstrap=50,
    )
    doc = compute_metrics(cfg, classes, yv, pv, yt, pt)
    assert doc["val"]["recall"] >= 0.9 and doc["target_sensitivity"] == 0.9
    assert doc["confusion_labels"] == ["NORMAL", "BACTERIA+VIRUS"]
    assert type(doc["macro_roc_auc"]) is float and type(doc["multiclass_accuracy"]) is float
    assert set(doc["multiclass"]["per_class_roc_auc"]) == set(classes)
    bt = (yt != 1).astype(int)
    assert doc["roc_auc"] == pytest.approx(M.roc_auc(bt, pt[:, [0, 2]].sum(1)))
    with pytest.raises(StageError, match="positive_class"):
        compute_metrics(EvalClassificationConfig(), classes, yv, pv, yt, pt)


def test_gradcam_cases_mix_tp_fp_fn_most_confident_first():
    from stages.classifier.report import gradcam_cases

    bt = np.array([1, 1, 0, 0, 1, 0, 1])
    pt = np.array([0.9, 0.6, 0.7, 0.2, 0.1, 0.55, 0.3])
    # TP rows 0 (0.9), 1 (0.6); FP rows 2 (0.7), 5 (0.55); FN rows 4 (0.1), 6 (0.3); TN row 3.
    cases = gradcam_cases(bt, pt, 0.5, 7)
    assert cases == [(0, "TP"), (2, "FP"), (4, "FN"), (1, "TP"), (5, "FP"), (6, "FN"), (3, "TN")]
    assert gradcam_cases(bt, pt, 0.5, 2) == cases[:2]


# --------------------------------------------------------------------------- Grad-CAM


def _check_cam(cam: np.ndarray) -> None:
    assert cam.shape == (S, S) and cam.dtype == np.float32
    assert cam.min() >= 0.0 and cam.max() <= 1.0
    assert cam.std() > 1e-3  # not constant


def test_grad_cam_on_trained_cnn(setup):
    model = setup["model"]
    images, labels = setup["data"]["test"]
    i = int(np.flatnonzero(labels == 1)[0])
    _check_cam(grad_cam(model, images[i], 1))
    rgb = overlay(images[i], grad_cam(model, images[i], 1))
    assert rgb.shape == (S, S, 3) and rgb.dtype == np.uint8
    assert find_target_layer(model)[-1].name == GradCam(model).layer_name


def test_grad_cam_batches_equal_one_image_at_a_time(setup):
    """The meter computes Grad-CAM in batches: each image's map is its own, for its own class
    (sigmoid model here, and the 2-unit softmax of the nested model)."""
    images = setup["data"]["test"][0][:5]
    for model in (setup["model"], _nested_model()):
        gc = GradCam(model)
        classes = [1, 0, 1, 1, 0]
        one = np.stack([gc.raw(img, c) for img, c in zip(images, classes, strict=True)])
        batched = gc.raw_batch(images, classes, batch_size=2)
        np.testing.assert_allclose(batched, one, rtol=1e-4, atol=1e-6)
        assert not np.allclose(batched[0], batched[1])  # not one map for all
    with pytest.raises(ValueError, match="N classes"):
        gc.raw_batch(images, [1])


def _nested_model() -> keras.Model:
    base_in = keras.Input((S, S, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(base_in)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c2")(h)
    base = keras.Model(base_in, keras.layers.MaxPooling2D()(h), name="base")
    base.trainable = False  # frozen like a pretrained base: the tape must still see it
    inp = keras.Input((S, S, 1))
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    x = keras.layers.Concatenate()([x, x, x])
    x = keras.layers.GlobalAveragePooling2D()(base(x))
    return keras.Model(inp, keras.layers.Dense(2, activation="softmax")(x))


def test_grad_cam_on_nested_base_model(setup):
    from stages.classifier.config import TrainClassifierConfig
    from stages.classifier.models import build_model

    keras.utils.set_random_seed(0)
    img = setup["data"]["test"][0][1]
    for model, path in (
        (_nested_model(), ["base", "c2"]),
        (build_model(TrainClassifierConfig(arch="vgg16"), S), ["vgg16", "block5_conv3"]),
    ):
        gc = GradCam(model)
        assert [layer.name for layer in gc.path] == path
        # The re-traced model shares the weights: same predictions as the original.
        x = img[None, :, :, None].astype("float32")
        np.testing.assert_allclose(gc._model([x])[1].numpy(), model(x).numpy(), atol=1e-5)
        cams = [gc(img, c) for c in (0, 1)]
        # One class's evidence is the other's counter-evidence: ReLU keeps at least one.
        assert any(c.std() > 1e-3 for c in cams)
        for cam in cams:
            assert cam.shape == (S, S) and 0.0 <= cam.min() <= cam.max() <= 1.0


# --------------------------------------------------------------------------- ensembles, TTA, calibration


def test_ensemble_scores_the_mean_probability_of_its_models(setup, tmp_path):
    """Two models: evaluate's probabilities are their mean (AUC computed on it), and a model of
    another cache (other classes) is refused before anything is written."""
    import shutil

    from stages.classifier.predict import ClassifierInfo, ensemble_proba, predict_proba, save_info

    other = tmp_path / "other.keras"
    keras.utils.set_random_seed(7)
    inp = keras.Input((S, S, 1))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inp))
    keras.Model(inp, keras.layers.Dense(1, activation="sigmoid", name="head")(x)).save(other)
    save_info(other, ClassifierInfo(CLASSES, {}, "sigmoid", 1, "binary", S, "tiny"))
    cfg = EvalClassificationConfig(bootstrap=0, n_samples_grid=2, n_gradcam=2)
    doc = run(
        cfg, setup["cache"], [setup["model_path"], other], tmp_path / "m.json", tmp_path / "r"
    )
    images, y = setup["data"]["test"]
    other_model = keras.saving.load_model(other)
    mean = (predict_proba(setup["model"], images) + predict_proba(other_model, images)) / 2
    assert doc["roc_auc"] == pytest.approx(M.roc_auc(y, mean[:, 1]), abs=1e-6)
    # ROC-AUC is blind to a scaled mean: the probabilities themselves, the threshold chosen on
    # them (validation) and the accuracy at it are the mean's too
    members = [setup["model"], other_model]
    np.testing.assert_allclose(ensemble_proba(members, images), mean, atol=1e-6)
    val_images, y_val = setup["data"]["val"]
    mean_val = (predict_proba(members[0], val_images) + predict_proba(members[1], val_images)) / 2
    assert doc["threshold"] == pytest.approx(M.youden_threshold(y_val, mean_val[:, 1]), abs=1e-6)
    assert doc["accuracy"] == pytest.approx(np.mean((mean[:, 1] >= doc["threshold"]) == y))
    np.testing.assert_allclose(
        ensemble_proba([setup["model"]], images), predict_proba(setup["model"], images)
    )
    assert doc["decision"]["models"] == [setup["model_path"].as_posix(), other.as_posix()]
    wrong = tmp_path / "wrong.keras"
    shutil.copy(other, wrong)
    save_info(wrong, ClassifierInfo(("A", "B"), {}, "sigmoid", 1, "binary", S, "tiny"))
    with pytest.raises(StageError, match="ensemble needs models of one cache"):
        run(
            cfg, setup["cache"], [setup["model_path"], wrong], tmp_path / "m2.json", tmp_path / "r2"
        )
    assert not (tmp_path / "m2.json").exists()


def test_tta_averages_each_image_with_its_mirror(setup):
    from stages.classifier.predict import ensemble_proba, predict_proba

    images = setup["data"]["test"][0][:8]
    plain = predict_proba(setup["model"], images)
    mirror = predict_proba(setup["model"], images[:, :, ::-1].copy())
    tta = ensemble_proba([setup["model"]], images, tta="hflip")
    np.testing.assert_allclose(tta, (plain + mirror) / 2, atol=1e-6)
    assert not np.allclose(plain, mirror)  # the blob images are not symmetric: TTA matters


def test_temperature_is_fitted_on_validation_and_keeps_ranks():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    x = (2 * y - 1) * 1.0 + rng.normal(size=400)  # N(+-1, 1): the true log-odds are 2x
    p_true = 1 / (1 + np.exp(-2.0 * x))
    over = 1 / (1 + np.exp(-4.0 * x))  # the same ranking, twice over-confident
    proba = np.stack([1 - over, over], axis=1)
    t = M.fit_temperature(y, proba)
    assert t == pytest.approx(2.0, rel=0.15)
    calibrated = M.apply_temperature(proba, t)[:, 1]
    np.testing.assert_allclose(calibrated, p_true, atol=0.05)
    assert M.roc_auc(y, calibrated) == pytest.approx(M.roc_auc(y, over))
    assert M.expected_calibration_error(y, calibrated) < M.expected_calibration_error(y, over)


def test_calibrated_run_records_the_temperature(setup):
    doc, _ = _run(setup, "cal", calibration="temperature", tta="hflip")
    assert doc["decision"]["temperature"] > 0 and doc["decision"]["tta"] == "hflip"
    plain, _ = _run(setup, "plain")
    assert plain["decision"]["temperature"] == 1.0


def test_confidence_intervals_come_from_the_test_split():
    """The bootstrap resamples TEST: its interval brackets the test AUC, and moves with it when
    only the test scores change (a CI computed on validation would not)."""
    rng = np.random.default_rng(5)
    classes = ["NORMAL", "PNEUMONIA"]

    def scores(n, strength):
        y = rng.integers(0, 2, n)
        p = 1 / (1 + np.exp(-(strength * (2 * y - 1) + rng.normal(size=n))))
        return y, np.stack([1 - p, p], axis=1)

    yv, pv = scores(300, 3.0)  # validation: near perfect
    yt, pt = scores(300, 0.6)  # test: much weaker
    cfg = EvalClassificationConfig(bootstrap=300)
    doc = compute_metrics(cfg, classes, yv, pv, yt, pt)
    lo, hi = doc["roc_auc_ci"]
    assert lo <= doc["roc_auc"] <= hi and hi < doc["val"]["roc_auc"]
    alo, ahi = doc["accuracy_ci"]
    assert alo <= doc["accuracy"] <= ahi


def test_each_test_set_is_scored_on_its_own():
    rng = np.random.default_rng(6)
    classes = ["NORMAL", "PNEUMONIA"]
    y = rng.integers(0, 2, 200)
    p = np.clip(0.5 + 0.35 * (2 * y - 1) + rng.normal(scale=0.2, size=200), 0, 1)
    proba = np.stack([1 - p, p], axis=1)
    sets = np.where(np.arange(200) < 120, "kermany", "kermany_2")
    doc = compute_metrics(EvalClassificationConfig(bootstrap=0), classes, y, proba, y, proba, sets)
    assert set(doc["test_sets"]) == {"kermany", "kermany_2"}
    second = doc["test_sets"]["kermany_2"]
    assert second["n_test"] == 80
    sel = sets == "kermany_2"
    assert second["roc_auc"] == pytest.approx(M.roc_auc(y[sel], p[sel]))
    assert second["accuracy"] == pytest.approx(np.mean((p[sel] >= doc["threshold"]) == y[sel]))


def _tiny(path: Path, size: int, intensity: str = "none") -> Path:
    """A one-layer sigmoid model of ``size`` px with its sidecar (``intensity`` recorded)."""
    from stages.classifier.predict import ClassifierInfo, save_info

    keras.utils.set_random_seed(3)
    inp = keras.Input((size, size, 1))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inp))
    keras.Model(inp, keras.layers.Dense(1, activation="sigmoid", name="head")(x)).save(path)
    info = ClassifierInfo(CLASSES, {}, "sigmoid", 1, "binary", size, "tiny", intensity=intensity)
    save_info(path, info)
    return path


@pytest.mark.parametrize(
    ("size", "intensity", "ensemble", "words"),
    [
        (64, "none", False, ["64 px", f"{S} px"]),
        (S, "equalize", False, ["intensity equalize", "intensity none"]),
        (S, "equalize", True, ["intensity", "one cache"]),
    ],
    ids=["other-size", "other-intensity", "ensemble-member-other-intensity"],
)
def test_a_model_of_another_cache_is_refused_in_one_line(setup, tmp_path, size, intensity,
                                                         ensemble, words):  # fmt: skip
    """evaluate refuses a model (or an ensemble member) whose input size or intensity mode is
    not the cache's, naming both, before anything is predicted or written."""
    model = _tiny(tmp_path / "other.keras", size, intensity)
    models = [setup["model_path"], model] if ensemble else [model]
    cfg = EvalClassificationConfig(bootstrap=0, n_samples_grid=2, n_gradcam=2)
    with pytest.raises(StageError) as info:
        run(cfg, setup["cache"], models, tmp_path / "m.json", tmp_path / "r")
    message = str(info.value)
    assert len(message.splitlines()) == 1
    for word in words:
        assert word in message, message
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "r").exists()
