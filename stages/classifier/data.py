"""tf.data input for the classifier, streaming from the augment cache's memory-mapped images.

Input: a cache split (``stages.common.cache.open_split``): uint8 (N, S, S) memmap + index.csv.
Output: batched ``(images float32 (B, S, S, 1) in [0, 255], targets[, sample weights])``.
Used by ``stages.train`` (train-classifier); no run command of its own.

Pipeline: range(N) -> shuffle (seeded, new order each epoch) -> batch -> repeat -> parallel map
that sorts the batch's row numbers and gathers them from the memmap in one read ->
augmentation (stages.classifier.augment, on whole batches, keyed by the global batch number so
every epoch draws new transforms) -> prefetch. Only row numbers are shuffled, so process memory
does not grow with the dataset: the images stay in the memmap (the OS page cache), never in a
tensor. Labels and weights are tiny (N,) arrays held as constants.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from stages.classifier.augment import ClassificationPolicy, augment_dataset
from stages.classifier.config import Encoding
from stages.common.cache import open_split


@dataclass(frozen=True)
class ClassSplit:
    """The rows of one cache split that belong to the selected classes."""

    images: np.ndarray  # the whole split's memmap (N_all, S, S) uint8
    rows: np.ndarray  # int64 (N,), sorted row numbers into ``images``
    labels: np.ndarray  # int64 (N,), index into the selected classes

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])


def class_indices(
    index: pd.DataFrame, classes: tuple[str, ...], class_map: dict[str, str] | None = None
) -> np.ndarray:
    """Class index of every index.csv row (-1 = not a selected class: drop the row).

    ``class_map`` keys are "LABEL/subtype" or "LABEL"; the more specific key wins.
    """
    class_map = dict(class_map or {})
    labels = index["label"].astype(str).to_numpy()
    subtypes = index["subtype"].astype(str).to_numpy() if "subtype" in index else [""] * len(labels)
    position = {name: i for i, name in enumerate(classes)}
    out = np.full(len(labels), -1, dtype=np.int64)
    for i, (label, subtype) in enumerate(zip(labels, subtypes, strict=True)):
        name = class_map.get(f"{label}/{subtype}", class_map.get(label, label))
        out[i] = position.get(name, -1)
    return out


def load_class_split(
    cache_dir: Path, split: str, classes: tuple[str, ...], class_map: dict[str, str] | None = None
) -> ClassSplit:
    cache = open_split(cache_dir, split)
    idx = class_indices(cache.index, classes, class_map)
    rows = np.flatnonzero(idx >= 0).astype(np.int64)
    return ClassSplit(images=cache.images, rows=rows, labels=idx[rows])


def encode_targets(labels: np.ndarray, encoding: Encoding, n_classes: int) -> np.ndarray:
    """float32 targets: (N, 1) 0/1 for a 1-unit head, (N, C) one-hot otherwise."""
    if encoding == "binary":
        return labels.astype(np.float32).reshape(-1, 1)
    return np.eye(n_classes, dtype=np.float32)[labels]


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """n / (C * count_c) per class (sklearn's "balanced"); absent classes get weight 0."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.zeros(n_classes)
    present = counts > 0
    weights[present] = len(labels) / (present.sum() * counts[present])
    return weights.astype(np.float32)


def _gather_fn(images: np.ndarray):
    def take(rows: np.ndarray) -> np.ndarray:
        # Rows arrive sorted, so the memmap is read front to back in one fancy-index copy.
        return np.ascontiguousarray(images[rows])

    return take


def make_dataset(
    split: ClassSplit,
    targets: np.ndarray,
    batch_size: int,
    *,
    training: bool,
    seed: int = 0,
    class_weights: np.ndarray | None = None,
    policy: ClassificationPolicy | None = None,
    mixup: float = 0.0,
) -> tuple[tf.data.Dataset, int]:
    """(dataset, steps per epoch). Training: shuffled, repeated forever, augmented if
    ``policy``, last partial batch dropped (BatchNorm dislikes tiny batches); evaluation:
    one pass in order, every row."""
    n, size = len(split), split.image_size
    take = _gather_fn(split.images)
    rows_t = tf.constant(split.rows, tf.int64)
    targets_t = tf.constant(targets, tf.float32)
    weights_t = None
    if class_weights is not None:
        weights_t = tf.constant(class_weights[split.labels], tf.float32)

    def gather(pos: tf.Tensor):
        pos = tf.sort(pos)
        batch = tf.numpy_function(take, [tf.gather(rows_t, pos)], tf.uint8, stateful=False)
        x = tf.cast(tf.ensure_shape(batch, [None, size, size]), tf.float32)[..., None]
        y = tf.gather(targets_t, pos)
        if weights_t is None:
            return x, y
        return x, y, tf.gather(weights_t, pos)

    ds = tf.data.Dataset.range(n)
    drop = training and n >= batch_size
    steps = n // batch_size if drop else -(-n // batch_size)
    if training:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop)
    if training:
        ds = ds.repeat()
    ds = ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if training and policy is not None:
        ds = augment_dataset(ds, policy, seed)
    if training and mixup > 0:
        ds = mix_dataset(ds, mixup, seed)
    options = tf.data.Options()
    # Sharding by data works for any source (ours is a range, not files): multi_worker.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options), steps


def mix_batch(batch: tuple, alpha: float, key: tf.Tensor) -> tuple:
    """mixup of one batch ``(x, y[, w])``: each row mixed with a shuffled partner by a weight
    lam ~ Beta(alpha, alpha) (drawn statelessly from ``key``); targets and weights alike."""
    x = batch[0]
    n = tf.shape(x)[0]
    fold = tf.random.experimental.stateless_fold_in
    g1 = tf.random.stateless_gamma([n], fold(key, 0), alpha)
    g2 = tf.random.stateless_gamma([n], fold(key, 1), alpha)
    lam = g1 / (g1 + g2)
    order = tf.argsort(tf.random.stateless_uniform([n], fold(key, 2)))

    def mix(t: tf.Tensor) -> tf.Tensor:
        shape = tf.concat([[n], tf.ones([tf.rank(t) - 1], tf.int32)], 0)
        weight = tf.reshape(lam, shape)
        return t * weight + tf.gather(t, order) * (1.0 - weight)

    return tuple(mix(t) for t in batch)


def mix_dataset(ds: tf.data.Dataset, alpha: float, seed: int) -> tf.data.Dataset:
    """Map a batched training dataset through ``mix_batch`` (new pairs every epoch, same sequence
    for the same seed)."""
    keys = tf.data.Dataset.random(seed + 1, rerandomize_each_iteration=True)

    def fn(batch, k):
        return mix_batch(batch, alpha, tf.stack([tf.constant(seed, tf.int64), k]))

    return tf.data.Dataset.zip(ds, keys).map(
        fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )


__all__ = [
    "ClassSplit",
    "mix_batch",
    "mix_dataset",
    "balanced_class_weights",
    "class_indices",
    "encode_targets",
    "load_class_split",
    "make_dataset",
]
