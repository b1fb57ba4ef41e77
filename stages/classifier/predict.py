"""Load the trained classifier and turn images into class probabilities, in the sidecar's class order.

Input: ``models/classifier.keras`` and its sidecar ``models/classifier.meta.json`` (classes in
output order, class_map, head, image size and resize mode); images as uint8 (N, S, S) arrays or memmaps.
Output: float32 (N, C) probabilities in the sidecar's class order, every head type alike.
Used by the evaluate stage and the reports; no run command of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
from tqdm import tqdm

from stages.classifier.data import class_indices
from stages.common.utils import StageError, read_json, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifierInfo:
    """What the .keras file cannot carry: the class names and how labels map to them."""

    classes: tuple[str, ...]
    class_map: dict[str, str]
    head_activation: str
    head_units: int
    encoding: str
    image_size: int
    arch: str
    # How images were brought to image_size (stages.common.cache.resize_gray): predict must match it.
    resize: str = "stretch"
    intensity: str = "none"  # stages.common.cache.prepare_gray's intensity normalisation
    # The lungs' preprocessing before resizing (stages.common.lungs): serving repeats it with the
    # segmenter whose md5 is recorded here (the one lungs@classification used).
    lungs: str = "none"
    lungs_margin: float = 0.05
    lungs_segmenter: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "classes": list(self.classes),
            "class_map": dict(self.class_map),
            "head": {"activation": self.head_activation, "units": self.head_units},
            "encoding": self.encoding,
            "image_size": self.image_size,
            "arch": self.arch,
            "resize": self.resize,
            "intensity": self.intensity,
            "lungs": self.lungs,
            "lungs_margin": self.lungs_margin,
            "lungs_segmenter": self.lungs_segmenter,
            # For readers of the file: probability columns follow "classes"; with 1 sigmoid
            # unit the model outputs P(classes[1]).
            "input": "float32 (S, S, 1) grey in [0, 255]; rescaling is inside the model",
        }


def set_tf_threads(threads: int) -> None:
    """Pin TensorFlow's thread pools (0 = TF's default: all cores). Only possible before TF
    has started; later calls keep its pools and log a warning."""
    if threads <= 0:
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    except RuntimeError:  # TF already initialised in this process (tests, notebooks)
        log.warning("threads=%d ignored: TensorFlow was already initialised", threads)


def sidecar_path(model_path: str | Path) -> Path:
    """models/classifier.keras -> models/classifier.meta.json."""
    return Path(model_path).with_suffix(".meta.json")


def save_info(model_path: str | Path, info: ClassifierInfo) -> None:
    write_json(sidecar_path(model_path), info.to_json())


def load_info(model_path: str | Path) -> ClassifierInfo:
    path = sidecar_path(model_path)
    if not path.is_file():
        raise StageError(f"{path} not found: it is written with the model by train-classifier")
    d = read_json(path)
    return ClassifierInfo(
        classes=tuple(d["classes"]),
        class_map=dict(d.get("class_map", {})),
        head_activation=d["head"]["activation"],
        head_units=int(d["head"]["units"]),
        encoding=d["encoding"],
        image_size=int(d["image_size"]),
        arch=d["arch"],
        resize=d.get("resize", "stretch"),  # sidecars older than the field: the cache default
        intensity=d.get("intensity", "none"),
        lungs=d.get("lungs", "none"),
        lungs_margin=float(d.get("lungs_margin", 0.05)),
        lungs_segmenter=d.get("lungs_segmenter", ""),
    )


def check_one_cache(model_paths: Sequence[Path], infos: Sequence[ClassifierInfo]) -> None:
    """StageError unless every model of an ensemble was trained on one cache: the same classes,
    image size, resize and intensity modes (the page, ``predict`` and evaluate average them)."""
    first = infos[0]
    ref = (first.classes, first.image_size, first.resize, first.intensity, first.lungs)
    for path, info in zip(model_paths[1:], infos[1:], strict=True):
        key = (info.classes, info.image_size, info.resize, info.intensity, info.lungs)
        if key != ref:
            raise StageError(
                f"{path} does not match {model_paths[0]} (classes / image size / resize / "
                f"intensity: {key} vs {ref}); an ensemble needs models of one cache"
            )


def check_fits_cache(model_path: Path, info: ClassifierInfo, meta: dict, cache_dir: Path) -> None:
    """StageError unless the model takes the cache's images as they are: its image size,
    resize and intensity modes are the cache's (``meta.json``)."""
    model = (info.image_size, info.resize, info.intensity, info.lungs)
    cache = (
        int(meta.get("image_size", -1)),
        str(meta.get("resize", "stretch")),
        str(meta.get("intensity", "none")),
        str(meta.get("lungs", "none")),
    )
    if model != cache:
        raise StageError(
            f"{model_path} was trained on {model[0]} px images (resize {model[1]}, intensity "
            f"{model[2]}, lungs {model[3]}), the cache {cache_dir} holds {cache[0]} px (resize "
            f"{cache[1]}, intensity {cache[2]}, lungs {cache[3]}): evaluate a model trained on "
            "this cache, or re-run train-classifier"
        )


def load_classifier(path: str | Path) -> keras.Model:
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path} not found: run the train-classifier stage first")
    return keras.saving.load_model(path, compile=False)


def labels_for(index: pd.DataFrame, info: ClassifierInfo) -> np.ndarray:
    """True class index (in the model's class order) of every index.csv row; -1 = not a class
    the model knows (evaluate should drop those rows, as training did)."""
    return class_indices(index, info.classes, info.class_map)


def _head(model: keras.Model) -> tuple[str, int]:
    try:
        layer = model.get_layer("head")
    except ValueError:
        layer = model.layers[-1]
    activation = layer.get_config().get("activation", "linear")
    return str(activation), int(model.output_shape[-1])


def predict_proba(model: keras.Model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """float32 (N, C) class probabilities, rows summing to 1, streamed over ``images``.

    1 sigmoid unit -> [1 - p, p]; N sigmoid units -> each row divided by its sum (one-vs-rest
    scores made comparable); softmax as is.
    """
    if images.ndim != 3:
        raise ValueError(f"predict_proba expects (N, S, S) images, got shape {images.shape}")
    activation, units = _head(model)
    n = images.shape[0]
    out = np.empty((n, max(units, 2)), dtype=np.float32)
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc="predict", unit="batch", disable=len(starts) < 20):
        x = np.asarray(images[start : start + batch_size], dtype=np.float32)[..., None]
        p = np.asarray(model.predict_on_batch(x), dtype=np.float32).reshape(len(x), units)
        out[start : start + len(x)] = to_probabilities(p, activation)
    return out


def ensemble_proba(
    models: list[keras.Model], images: np.ndarray, batch_size: int = 64, tta: str = "none"
) -> np.ndarray:
    """Mean (N, C) probability over ``models`` and, with ``tta="hflip"``, over each image and its
    mirror image. One model without TTA is exactly ``predict_proba``."""
    if tta not in ("none", "hflip"):
        raise ValueError(f"tta must be 'none' or 'hflip', got {tta!r}")
    views = [images] if tta == "none" else [images, _Mirrored(images)]
    total = None
    for model in models:
        for view in views:
            p = predict_proba(model, view, batch_size).astype(np.float64)
            total = p if total is None else total + p
    return (total / (len(models) * len(views))).astype(np.float32)


class _Mirrored:
    """Left-right mirrored view of an (N, S, S) array, read batch by batch (memmaps stay lazy)."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images
        self.shape, self.ndim = images.shape, images.ndim

    def __getitem__(self, key):
        return np.asarray(self.images[key])[..., ::-1]


def to_probabilities(outputs: np.ndarray, activation: str) -> np.ndarray:
    """Raw head outputs (N, units) -> (N, C) probabilities (see ``predict_proba``)."""
    outputs = np.asarray(outputs, dtype=np.float32)
    if outputs.shape[1] == 1:
        p = np.clip(outputs[:, 0], 0.0, 1.0)
        return np.stack([1.0 - p, p], axis=1)
    if activation != "softmax":
        total = outputs.sum(axis=1, keepdims=True)
        uniform = np.full_like(outputs, 1.0 / outputs.shape[1])
        return np.where(total > 0, outputs / np.maximum(total, 1e-12), uniform)
    return outputs


__all__ = [
    "ClassifierInfo",
    "check_fits_cache",
    "check_one_cache",
    "labels_for",
    "load_classifier",
    "load_info",
    "predict_proba",
    "save_info",
    "sidecar_path",
    "to_probabilities",
]
