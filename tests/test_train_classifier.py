"""train-classifier end to end on a tiny synthetic cache (48 px): outputs, strategies, failures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

import stages  # noqa: F401  (torch before TensorFlow)
from stages.classifier.augment import ClassificationPolicy
from stages.classifier.config import TrainClassifierConfig
from stages.classifier.data import class_indices, load_class_split, make_dataset
from stages.classifier.predict import labels_for, load_classifier, load_info, predict_proba
from stages.classifier.train import train
from stages.common.cache import open_split, write_meta, write_policy, write_split
from stages.common.config import parse, to_dict
from stages.common.utils import StageError, read_json
from stages.train import main

S = 48
HEADLINE_KEYS = {
    "train_accuracy",
    "val_accuracy",
    "val_loss",
    "val_auc",
    "best_epoch",
    "epochs_run",
    "val_accuracy_max_drop",
}
SUMMARY_KEYS = HEADLINE_KEYS | {"train_loss", "seconds", "images_per_second", "params_count"}


@pytest.fixture(autouse=True)
def _outside_the_repo(tmp_path, monkeypatch):
    # dvclive probes the git/DVC repository of the cwd; keep it away from the project's.
    monkeypatch.chdir(tmp_path)


def make_cache(root, classes=("NORMAL", "PNEUMONIA"), counts=None, seed=0):
    """Class k = noise plus a centred disc of brightness 60*k: learnable in a few steps."""
    counts = counts or {"train": 48, "val": 16}
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:S, :S]
    disc = ((yy - S / 2) ** 2 + (xx - S / 2) ** 2) < (S / 4) ** 2
    for split, n in counts.items():
        k = np.arange(n) % len(classes)
        images = rng.integers(0, 90, (n, S, S)) + disc[None] * (60 * k)[:, None, None]
        index = pd.DataFrame(
            {
                "path": [f"img/{split}_{i}.png" for i in range(n)],
                "label": [classes[j] for j in k],
                "subtype": ["bacteria" if j and i % 2 else "" for i, j in enumerate(k)],
                "patient_id": [f"p{i}" for i in range(n)],
                "split": split,
                "label_index": k,
            }
        )
        write_split(root, split, images.clip(0, 255).astype(np.uint8), index, S)
    meta = {"task": "classification", "image_size": S, "resize": "stretch"}
    write_meta(root, {**meta, "classes": list(classes), "counts": counts})
    write_policy(root, to_dict(ClassificationPolicy()))
    return root


def cfg_dict(**over) -> dict:
    base = {"arch": "to_be", "epochs": 2, "batch_size": 8, "early_stopping": {"patience": 1}}
    return {**base, **over}


def paths(tmp_path):
    return {
        "model_path": tmp_path / "models" / "classifier.keras",
        "summary_path": tmp_path / "live" / "training.json",
        "live_dir": tmp_path / "live",
    }


def test_cli_writes_model_metrics_and_live(tmp_path):
    cache = make_cache(tmp_path / "cache")
    out = paths(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train_classifier": cfg_dict(epochs=3)}))
    main(
        [
            "--task",
            "classification",
            "--params",
            str(params),
            "--cache-dir",
            str(cache),
            "--model",
            str(out["model_path"]),
            "--summary",
            str(out["summary_path"]),
            "--live-dir",
            str(out["live_dir"]),
        ]
    )
    metrics = read_json(out["summary_path"])  # the training summary: validation figures
    assert set(metrics) >= SUMMARY_KEYS
    accs = metrics["val_accuracy_per_epoch"]
    drops = [a - b for a, b in zip(accs, accs[1:], strict=False)]
    assert metrics["val_accuracy_max_drop"] == pytest.approx(max(drops, default=0.0), abs=1e-4)
    assert 1 <= metrics["best_epoch"] <= metrics["epochs_run"] <= 3
    for split in ("train", "val"):
        for name in ("loss", "accuracy", "auc"):
            tsv = out["live_dir"] / "plots" / "metrics" / split / f"{name}.tsv"
            assert len(tsv.read_text().splitlines()) == metrics["epochs_run"] + 1  # + header
    assert not list(tmp_path.glob("**/*.tmp*")), "temporary files left behind"

    # The saved model is the best epoch's: it reproduces the logged val accuracy exactly.
    model = load_classifier(out["model_path"])
    info = load_info(out["model_path"])
    assert info.classes == ("NORMAL", "PNEUMONIA") and info.encoding == "binary"
    val = open_split(cache, "val")
    proba = predict_proba(model, val.images, batch_size=5)
    assert proba.shape == (16, 2) and np.allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    accuracy = float(np.mean(proba.argmax(axis=1) == labels_for(val.index, info)))
    assert accuracy == pytest.approx(metrics["val_accuracy"], abs=1e-6)


def test_mirrored_strategy_trains_one_epoch(tmp_path):
    cache = make_cache(tmp_path / "cache")
    cfg = parse(TrainClassifierConfig, cfg_dict(epochs=1, strategy="mirrored"))
    metrics = train(cfg, cache, **paths(tmp_path))
    assert metrics["epochs_run"] == 1 and np.isfinite(metrics["val_loss"])
    assert paths(tmp_path)["model_path"].is_file()


def test_nan_loss_stops_with_stage_error(tmp_path):
    cache = make_cache(tmp_path / "cache")
    cfg = parse(TrainClassifierConfig, cfg_dict(learning_rate=1e30, augmentation=False))
    out = paths(tmp_path)
    with pytest.raises(StageError, match="diverged"):
        train(cfg, cache, **out)
    assert not out["model_path"].exists() and not out["summary_path"].exists()
    assert not out["live_dir"].exists()


def test_head_that_cannot_fit_the_data_is_refused_before_training(tmp_path):
    cache = make_cache(tmp_path / "cache", classes=("COVID", "NORMAL", "PNEUMONIA"))
    cfg = parse(TrainClassifierConfig, cfg_dict())  # 1 sigmoid unit, 3 classes in the cache
    with pytest.raises(StageError, match="1 unit encodes exactly 2 classes"):
        train(cfg, cache, **paths(tmp_path))
    assert not paths(tmp_path)["live_dir"].exists()


def test_class_selection_and_merge(tmp_path):
    cache = make_cache(tmp_path / "cache", classes=("COVID", "NORMAL", "PNEUMONIA"))
    index = open_split(cache, "train").index
    two = class_indices(index, ("NORMAL", "PNEUMONIA"))
    assert set(two[index["label"] == "COVID"]) == {-1}
    assert set(two[index["label"] == "PNEUMONIA"]) == {1}
    merged = class_indices(
        index,
        ("NORMAL", "BACTERIA", "OTHER"),
        {"PNEUMONIA/bacteria": "BACTERIA", "PNEUMONIA": "OTHER", "COVID": "OTHER"},
    )
    pneumonia = index["label"] == "PNEUMONIA"
    bacteria = pneumonia & (index["subtype"] == "bacteria")
    assert set(merged[bacteria]) == {1} and set(merged[pneumonia & ~bacteria]) == {2}
    assert set(merged[index["label"] == "COVID"]) == {2} and (merged >= 0).all()
    split = load_class_split(cache, "train", ("NORMAL", "PNEUMONIA"))
    assert len(split) == 32 and np.all(np.diff(split.rows) > 0)


def test_dataset_epochs_reshuffle_and_cover_every_row(tmp_path):
    cache = make_cache(tmp_path / "cache", counts={"train": 40, "val": 8})
    split = load_class_split(cache, "train", ("NORMAL", "PNEUMONIA"))
    marks = np.arange(40, dtype=np.float32).reshape(-1, 1)  # targets = row ids, to trace rows
    ds, steps = make_dataset(split, marks, 8, training=True, seed=3)
    assert steps == 5
    batches = [y.numpy().ravel() for _, y in ds.take(2 * steps)]
    first, second = np.concatenate(batches[:steps]), np.concatenate(batches[steps:])
    assert sorted(first) == sorted(second) == list(range(40))
    assert not np.array_equal(first, second)  # a new order each epoch
    x, y = next(iter(ds))
    assert x.shape == (8, S, S, 1) and x.dtype.name == "float32"
    rows = y.numpy().astype(int).ravel()
    np.testing.assert_array_equal(x.numpy()[..., 0], split.images[rows].astype(np.float32))
    val_ds, val_steps = make_dataset(split, marks, 16, training=False)
    assert val_steps == 3 and sum(int(b[0].shape[0]) for b in val_ds) == 40


def test_ema_model_is_the_one_validated_and_differs_from_plain(tmp_path):
    """With weight EMA the saved model is the averaged one: it reproduces the logged (EMA)
    validation loss, and it is not the model the same run trains without EMA."""
    cache = make_cache(tmp_path / "cache")
    runs = {}
    for ema in (0.0, 0.9):
        out = {k: tmp_path / f"ema{ema}" / v.name for k, v in paths(tmp_path).items()}
        cfg = parse(TrainClassifierConfig, cfg_dict(epochs=2, ema=ema, augmentation=False))
        metrics = train(cfg, cache, **out)
        model = load_classifier(out["model_path"])
        val = open_split(cache, "val")
        p = predict_proba(model, val.images)[:, 1].astype(np.float64)
        y = labels_for(val.index, load_info(out["model_path"])).astype(np.float64)
        bce = -np.mean(y * np.log(np.clip(p, 1e-7, 1)) + (1 - y) * np.log(np.clip(1 - p, 1e-7, 1)))
        assert bce == pytest.approx(metrics["val_loss"], rel=1e-3, abs=1e-4)
        runs[ema] = [w.copy() for w in model.get_weights()]
    assert any(not np.allclose(a, b) for a, b in zip(runs[0.0], runs[0.9], strict=True))


def test_mixup_mixes_images_targets_and_weights_alike():
    import tensorflow as tf

    from stages.classifier.data import mix_batch

    # targets and weights are linear in the images (y = x / 30, w = 1 + x / 10), so a row
    # mixed alike in all three keeps both relations; one left unmixed breaks them
    x = tf.constant(np.arange(4, dtype=np.float32).reshape(4, 1, 1, 1) * 10)
    y = tf.constant([[0.0], [1 / 3], [2 / 3], [1.0]])
    w = tf.constant([1.0, 2.0, 3.0, 4.0])
    key = tf.constant([7, 3], tf.int64)
    mx, my, mw = (t.numpy() for t in mix_batch((x, y, w), 0.4, key))
    again = mix_batch((x, y, w), 0.4, key)[0].numpy()
    np.testing.assert_array_equal(mx, again)  # stateless: same key, same mix
    # every row is lam*row + (1-lam)*partner
    images = mx.reshape(-1)
    assert not np.allclose(images, x.numpy().reshape(-1))
    assert np.all((images >= 0) & (images <= 30))
    np.testing.assert_allclose(my[:, 0], images / 30, atol=1e-5)
    np.testing.assert_allclose(mw, 1 + images / 10, atol=1e-5)


def test_balanced_class_weights_make_every_class_weigh_the_same():
    """sklearn's "balanced": a rare class weighs more, each class's rows weigh n / C in total,
    an absent class weighs 0; the dataset hands each row its class's weight."""

    from stages.classifier.data import ClassSplit, balanced_class_weights

    labels = np.array([0] * 6 + [1] * 2)
    weights = balanced_class_weights(labels, 3)
    np.testing.assert_allclose(weights, [8 / (2 * 6), 8 / (2 * 2), 0.0], rtol=1e-6)
    assert weights[1] > weights[0]  # the minority class weighs more
    totals = np.bincount(labels, weights=weights[labels], minlength=3)
    np.testing.assert_allclose(totals[:2], [4.0, 4.0], rtol=1e-6)
    split = ClassSplit(np.zeros((8, 4, 4), np.uint8), np.arange(8), labels)
    ds, _ = make_dataset(split, labels[:, None].astype(np.float32), 8, training=False,
                         class_weights=weights)  # fmt: skip
    _, y, w = next(iter(ds))
    np.testing.assert_allclose(w.numpy(), weights[y.numpy()[:, 0].astype(int)])


def test_precise_batchnorm_sets_statistics_of_the_current_weights():
    """Before validation, each BN layer's moving mean/variance become the mean over the given
    training batches of their batch statistics; momentum is restored afterwards."""
    import keras
    import tensorflow as tf

    from stages.classifier.callbacks import PreciseBatchNorm

    inp = keras.Input((4,))
    bn = keras.layers.BatchNormalization(momentum=0.9)
    model = keras.Model(inp, bn(inp))
    rng = np.random.default_rng(0)
    batches = [
        rng.normal(loc=3.0 * k, scale=1.0 + k, size=(16, 4)).astype(np.float32) for k in range(3)
    ]
    ds = tf.data.Dataset.from_tensor_slices(np.stack(batches)).map(lambda x: (x, x))
    cb = PreciseBatchNorm(ds, batches=3)
    cb.set_model(model)
    cb.on_test_begin()
    expected_mean = np.mean([b.mean(axis=0) for b in batches], axis=0)
    expected_var = np.mean([b.var(axis=0) for b in batches], axis=0)
    np.testing.assert_allclose(bn.moving_mean.numpy(), expected_mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.moving_variance.numpy(), expected_var, rtol=1e-3, atol=1e-3)
    assert bn.momentum == 0.9


@pytest.mark.parametrize(
    ("activation", "loss"),
    [
        ("sigmoid", "binary_crossentropy"),
        ("softmax", "categorical_crossentropy"),
        ("sigmoid", "categorical_crossentropy"),  # seed 002's table 1 pairs
        ("softmax", "binary_crossentropy"),
    ],
)
def test_the_loss_scores_the_head_the_params_name(activation, loss, tmp_path):
    """Keras 3 would score categorical CE over sigmoid units as softmax CE of their logits (and
    binary CE over softmax units as sigmoid CE): the training loss must be the cross-entropy of
    the probabilities the named head outputs, in the graph `fit` runs, and survive a save."""
    import keras

    from stages.classifier.train import make_loss

    x = np.array([[1.0, -2.0], [0.5, 0.3], [-1.0, 2.0], [0.0, 0.7]], "float32")
    y = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], "float32")
    inp = keras.Input((2,))
    out = keras.layers.Dense(2, activation=activation, kernel_initializer="identity")(inp)
    model = keras.Model(inp, out)
    cfg = parse(TrainClassifierConfig, {"head": {"activation": activation, "units": 2},
                                        "loss": loss}, "train_classifier")  # fmt: skip
    model.compile(loss=make_loss(cfg), jit_compile=False)
    p = model.predict(x, verbose=0).astype("float64")
    if loss == "categorical_crossentropy":
        q = p / p.sum(axis=1, keepdims=True)
        want = np.mean(-(y * np.log(q)).sum(axis=1))
    else:
        want = np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean(axis=1))
    assert model.evaluate(x, y, verbose=0) == pytest.approx(want, rel=1e-5)
    model.save(tmp_path / "m.keras")  # the compiled loss serialises (the stage saves the model)
