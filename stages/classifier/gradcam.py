"""Grad-CAM heatmaps for the Keras 3 classifier (Selvaraju et al. 2017), with TF GradientTape.

Input: a loaded classifier (``stages.classifier.predict``: input (S, S, 1) in [0, 255], probabilities out, possibly
with a keras.applications base model nested inside) and one uint8 (S, S) image.
Output: a float32 (S, S) heatmap in [0, 1]; ``overlay`` blends it onto the image as RGB uint8.
Used by ``stages.classifier.report``; no run command of its own.

The target is the last feature map before the classifier part: walking the layers backwards
(descending into nested models), the first 4-D, spatially > 1x1 output of a convolution,
activation or merge (Add/Concatenate...) layer. Pooling, dropout and normalisation layers that
follow it are skipped: they only blur or rescale the same map (VGG16 -> block5_conv3, a ResNet or
EfficientNet -> its final activation, the seed CNNs -> their last Conv2D). When the target sits
inside a nested model, its output is not reachable from the outer model's inputs, so the outer
graph is re-traced with ``keras.models.clone_model`` (layers shared, not copied) calling the
nested model as a two-output sub-model that also returns the activation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import matplotlib
import numpy as np
import tensorflow as tf

L = keras.layers
_FEATURE_TYPES = (
    L.Conv2D,
    L.SeparableConv2D,
    L.DepthwiseConv2D,
    L.Conv2DTranspose,
    L.Activation,
    L.ReLU,
    L.LeakyReLU,
    L.ELU,
    L.PReLU,
    L.Add,
    L.Multiply,
    L.Concatenate,
    L.Average,
    L.Maximum,
)


def _is_4d(layer: Any) -> bool:
    try:
        shape = layer.output.shape
    except (AttributeError, ValueError):  # a layer with no single symbolic output
        return False
    return len(shape) == 4 and all(d is None or d > 1 for d in shape[1:3])


def find_target_layer(model: keras.Model) -> list[keras.layers.Layer]:
    """Path to the target: [nested model, ..., layer] (rule in the module docstring).

    Falls back to the last 4-D layer of any kind when no conv/activation/merge layer has one.
    """
    for accept in (lambda lyr: isinstance(lyr, _FEATURE_TYPES), _is_4d):
        path = _search(model, accept)
        if path:
            return path
    raise ValueError(f"model {model.name!r} has no layer with a 4-D (N, H, W, C) output")


def _search(model: keras.Model, accept: Any) -> list[keras.layers.Layer]:
    for layer in reversed(model.layers):
        if isinstance(layer, keras.Model):
            inner = _search(layer, accept)
            if inner:
                return [layer, *inner]
        elif accept(layer) and _is_4d(layer):
            return [layer]
    return []


def _with_activation(model: keras.Model, path: list[keras.layers.Layer]) -> keras.Model:
    """A model with the same inputs and weights returning [activation of path[-1], outputs]."""
    if len(path) == 1:
        return keras.Model(model.inputs, [path[0].output, *model.outputs])
    nested, rest = path[0], path[1:]
    inner = _with_activation(nested, rest)
    captured: list[Any] = []

    def call_function(layer: Any, *args: Any, **kwargs: Any) -> Any:
        if layer is nested:
            activation, out = inner(*args, **kwargs)
            captured.append(activation)
            return out
        return layer(*args, **kwargs)

    traced = keras.models.clone_model(
        model, clone_function=lambda layer: layer, call_function=call_function
    )
    if len(captured) != 1:
        raise ValueError(f"nested model {nested.name!r} is called {len(captured)} times")
    return keras.Model(traced.inputs, [captured[0], *traced.outputs])


def _class_scores(probs: tf.Tensor, class_indices: tf.Tensor) -> tf.Tensor:
    """Each row's score of its own class (N,)."""
    if probs.shape[-1] == 1:  # one sigmoid unit = P(class 1); class 0 is its complement
        p = probs[:, 0]
        return tf.where(class_indices == 1, p, 1.0 - p)
    return tf.gather(probs, class_indices, axis=1, batch_dims=1)


class GradCam:
    """Builds the activation model once; ``__call__(image, class_index)`` gives the heatmap."""

    def __init__(self, model: keras.Model) -> None:
        self.path = find_target_layer(model)
        self.layer_name = "/".join(layer.name for layer in self.path)
        self._model = _with_activation(model, self.path)

    def __call__(self, image: np.ndarray, class_index: int) -> np.ndarray:
        """The heatmap min-max scaled to [0, 1] (for pictures)."""
        cam = self.raw(image, class_index)
        # Min-max scaling: a map that is positive everywhere would otherwise saturate.
        low, span = float(cam.min()), float(cam.max() - cam.min())
        cam = (cam - low) / span if span > 0 else np.zeros_like(cam)
        return np.clip(cam, 0.0, 1.0).astype(np.float32)

    def raw(self, image: np.ndarray, class_index: int) -> np.ndarray:
        """The heatmap as Grad-CAM defines it (ReLU of the weighted feature maps, resized to
        the image), not scaled: where its mass lies is what ``metrics.cam_in_lungs`` measures."""
        img = np.asarray(image)
        if img.ndim != 2:
            raise ValueError(f"grad_cam expects one (S, S) image, got shape {img.shape}")
        return self.raw_batch(img[None], [class_index])[0]

    def raw_batch(
        self, images: np.ndarray, class_indices: Sequence[int], batch_size: int = 32
    ) -> np.ndarray:
        """``raw`` of each (S, S) image of ``images`` for its own class, ``batch_size`` at a
        time: inference mode keeps the images independent, so the gradient of the summed
        scores is each image's own gradient."""
        images = np.asarray(images)
        if images.ndim != 3 or len(images) != len(class_indices):
            raise ValueError(f"raw_batch: (N, S, S) images and N classes, got {images.shape}")
        out = np.empty(images.shape, dtype=np.float32)
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            x = tf.convert_to_tensor(chunk[..., None].astype(np.float32))
            idx = tf.constant(list(class_indices[start : start + batch_size]), dtype=tf.int32)
            with tf.GradientTape() as tape:
                tape.watch(x)  # records the graph even when the base model's weights are frozen
                activation, probs = self._model([x], training=False)
                score = tf.reduce_sum(_class_scores(probs, idx))
            grads = tape.gradient(score, activation)
            if grads is None:
                raise ValueError(f"no gradient from the output to layer {self.layer_name!r}")
            weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # GAP of gradients
            cam = tf.nn.relu(tf.reduce_sum(weights * activation, axis=-1))[..., None]
            cam = tf.image.resize(cam, images.shape[1:], method="bilinear")[..., 0].numpy()
            out[start : start + len(chunk)] = np.maximum(cam, 0.0)  # bilinear undershoots 0
        return out


def grad_cam(model: keras.Model, image: np.ndarray, class_index: int) -> np.ndarray:
    """Grad-CAM of ``class_index`` for one uint8 (S, S) image -> float32 (S, S) in [0, 1].

    For many images build ``GradCam(model)`` once and call it per image.
    """
    return GradCam(model)(image, class_index)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blend a jet-coloured heatmap onto a grayscale uint8 image -> RGB uint8 (S, S, 3)."""
    gray = np.repeat(np.asarray(image, dtype=np.float32)[:, :, None] / 255.0, 3, axis=2)
    heat = matplotlib.colormaps["jet"](np.clip(cam, 0.0, 1.0))[:, :, :3]
    return np.round(255.0 * ((1.0 - alpha) * gray + alpha * heat)).astype(np.uint8)


__all__ = ["GradCam", "find_target_layer", "grad_cam", "overlay"]
