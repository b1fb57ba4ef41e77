"""The classifier's training core: ``train(cfg)`` fits the Keras model on the augment cache's
train split and keeps the best epoch on validation.

Inputs:  the cache's meta.json, policy.json, train/ and val/ (``stages.common.cache``); a
         ``TrainClassifierConfig``. Outputs: the .keras model + its sidecar
         (``stages.classifier.predict.ClassifierInfo``), the VALIDATION headline metrics json
         (never test), and in the dvclive folder the per-epoch logs and ``training.json`` (the
         whole summary: timings, counts, per-epoch validation accuracy). Called by ``python -m stages.train --task classification`` (the stage's
         command line) and by the tests; no run command of its own.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from dvclive import Live

from stages.classifier.augment import ClassificationPolicy
from stages.classifier.callbacks import DvcLiveCallback, EpochTimer, PreciseBatchNorm, open_live
from stages.classifier.config import TrainClassifierConfig, head_encoding
from stages.classifier.data import (
    balanced_class_weights,
    encode_targets,
    load_class_split,
    make_dataset,
)
from stages.classifier.models import build_model
from stages.classifier.predict import ClassifierInfo, save_info, set_tf_threads
from stages.common import paths
from stages.common.cache import load_meta, load_policy
from stages.common.config import parse
from stages.common.utils import StageError, atomic_dir, atomic_file, seed_everything, write_json

log = logging.getLogger("stages.train_classifier")


def make_strategy(name: str) -> tf.distribute.Strategy:
    """default: no distribution; mirrored: all local GPUs (CPU: one replica);
    multi_worker: the cluster described by the TF_CONFIG environment variable."""
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            log.warning("strategy multi_worker without TF_CONFIG: running as a single worker")
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def resolve_classes(cfg: TrainClassifierConfig, meta: dict) -> tuple[str, ...]:
    classes = cfg.classes if cfg.classes is not None else tuple(meta["classes"])
    if len(classes) < 2:
        raise StageError(f"need at least 2 classes to train, the cache has {list(classes)}")
    return classes


def _optimizer(cfg: TrainClassifierConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    lr: Any = cfg.learning_rate
    if cfg.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=cfg.epochs * steps_per_epoch)
    kw: dict[str, Any] = {"weight_decay": cfg.weight_decay or None}
    if cfg.ema:
        kw.update(use_ema=True, ema_momentum=cfg.ema)
    if cfg.optimizer == "adam":
        return keras.optimizers.Adam(lr, **kw)
    if cfg.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(lr, **kw)
    return keras.optimizers.SGD(lr, momentum=cfg.momentum, nesterov=True, **kw)


@keras.saving.register_keras_serializable(package="cxr")
class OnProbabilities(keras.losses.Loss):
    """Cross-entropy of the head's probabilities as they are.

    Keras 3 (TensorFlow backend) tags sigmoid and softmax outputs with their logits, and both
    cross-entropies use those logits whatever the activation was: categorical CE over sigmoid
    units becomes softmax CE of their logits, binary CE over softmax units becomes sigmoid CE of
    theirs, so the head the params name is not the one trained. Scoring a copy of the output
    (which carries no logits) restores what the names say, as Keras 2 computed it (seed 002's
    table compares exactly these pairs).
    """

    def __init__(self, kind: str, label_smoothing: float = 0.0, **kwargs) -> None:
        super().__init__(name=kwargs.pop("name", f"{kind}_on_probabilities"), **kwargs)
        self.kind, self.label_smoothing = kind, label_smoothing

    def call(self, y_true, y_pred):
        fn = getattr(keras.losses, self.kind)
        return fn(y_true, tf.identity(y_pred), label_smoothing=self.label_smoothing)

    def get_config(self) -> dict:
        return {**super().get_config(), "kind": self.kind, "label_smoothing": self.label_smoothing}


def make_loss(cfg: TrainClassifierConfig) -> keras.losses.Loss:
    """The training loss: the fused (logits) form where the activation is the loss's own
    (sigmoid + binary CE, softmax + categorical CE), the probabilities' otherwise."""
    ls = cfg.label_smoothing
    own = {"binary_crossentropy": "sigmoid", "categorical_crossentropy": "softmax"}[cfg.loss]
    if cfg.head.activation != own:
        return OnProbabilities(cfg.loss, ls)
    if cfg.loss == "binary_crossentropy":
        return keras.losses.BinaryCrossentropy(label_smoothing=ls)
    return keras.losses.CategoricalCrossentropy(label_smoothing=ls)


def _compile(model: keras.Model, cfg: TrainClassifierConfig, encoding: str, n: int, steps: int):
    loss = make_loss(cfg)
    if encoding == "binary":
        metrics = [keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")]
    else:  # macro one-vs-rest AUC over the N columns
        metrics = [
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.AUC(name="auc", multi_label=True, num_labels=n),
        ]
    model.compile(optimizer=_optimizer(cfg, steps), loss=loss, metrics=metrics)


def _callbacks(cfg: TrainClassifierConfig, live: Live, train_ds) -> tuple[list, Any, EpochTimer]:
    es_cfg = cfg.early_stopping
    # patience null: never stop early, but still restore the best epoch at the end.
    patience = es_cfg.patience if es_cfg.patience is not None else cfg.epochs
    early = keras.callbacks.EarlyStopping(
        monitor=es_cfg.monitor,
        patience=patience,
        mode=es_cfg.resolved_mode,
        restore_best_weights=True,
    )
    timer = EpochTimer()
    # EMA: the averaged weights are swapped in for validation and at each epoch's end, before
    # early stopping keeps its copy of the best epoch, so the saved model is the averaged one.
    swap = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if cfg.ema else []
    precise = [PreciseBatchNorm(train_ds, cfg.bn_recalibration)] if cfg.bn_recalibration else []
    callbacks = [keras.callbacks.TerminateOnNaN(), *swap, *precise, early, DvcLiveCallback(live)]
    callbacks.append(timer)
    if cfg.lr_schedule == "plateau":
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor=es_cfg.monitor,
                mode=es_cfg.resolved_mode,
                factor=0.5,
                patience=max(1, patience // 2),
                min_lr=cfg.learning_rate * 1e-3,
            )
        )
    return callbacks, early, timer


def save_model_atomic(model: keras.Model, path: Path) -> None:
    """model.save through the project's atomic writer (Keras wants a .keras temp name)."""
    with atomic_file(path, suffix=".keras") as tmp:
        model.save(tmp)


def train(
    cfg: TrainClassifierConfig,
    cache_dir: Path = paths.CLASSIFICATION.augment,
    model_path: Path = paths.CLASSIFIER_MODEL,
    live_dir: Path = paths.CLASSIFICATION.live_dir,
    summary_path: Path | None = None,
) -> dict:
    """Train, keep the best epoch by ``early_stopping.monitor``; write the model, the dvclive
    curves and the training summary (``summary_path``, default ``<live_dir>/training.json``)."""
    cache_dir, model_path = Path(cache_dir), Path(model_path)
    summary_path = Path(summary_path or Path(live_dir) / paths.TRAINING_NAME)
    set_tf_threads(cfg.threads)
    strategy = make_strategy(cfg.strategy)  # before other TF work (multi_worker needs that)
    seed_everything(cfg.seed)
    meta = load_meta(cache_dir)
    classes = resolve_classes(cfg, meta)
    n_classes = len(classes)
    try:
        encoding = head_encoding(cfg.head.activation, cfg.head.units, cfg.loss, n_classes)
    except ValueError as exc:
        raise StageError(f"train_classifier.{exc} (classes: {list(classes)})") from exc
    train_split = load_class_split(cache_dir, "train", classes, cfg.class_map)
    val_split = load_class_split(cache_dir, "val", classes, cfg.class_map)
    counts = np.bincount(train_split.labels, minlength=n_classes)
    missing = [c for c, k in zip(classes, counts, strict=True) if k == 0]
    if missing:
        raise StageError(f"classes {missing} have no train images in {cache_dir}/train")
    if len(val_split) == 0:
        raise StageError(f"{cache_dir}/val has no images of {list(classes)}: cannot select")
    policy = None
    if cfg.augmentation:
        policy = parse(ClassificationPolicy, load_policy(cache_dir), f"{cache_dir}/policy.json")
    weights = balanced_class_weights(train_split.labels, n_classes)
    global_batch = cfg.batch_size * strategy.num_replicas_in_sync
    train_ds, steps = make_dataset(
        train_split,
        encode_targets(train_split.labels, encoding, n_classes),
        global_batch,
        training=True,
        seed=cfg.seed,
        class_weights=weights if cfg.class_weight == "balanced" else None,
        policy=policy,
        mixup=cfg.mixup,
    )
    val_ds, _ = make_dataset(
        val_split,
        encode_targets(val_split.labels, encoding, n_classes),
        global_batch,
        training=False,
    )
    size = train_split.image_size
    with strategy.scope():
        model = build_model(cfg, size)
        _compile(model, cfg, encoding, n_classes, steps)
    log.info(
        "%s: %d params, %d train / %d val images of %s at %d px, %d steps/epoch, %s strategy",
        cfg.arch,
        model.count_params(),
        len(train_split),
        len(val_split),
        list(classes),
        size,
        steps,
        cfg.strategy,
    )

    with atomic_dir(live_dir) as tmp_live:
        with open_live(str(tmp_live)) as live:
            callbacks, early, timer = _callbacks(cfg, live, train_ds)
            start = time.perf_counter()
            history = model.fit(
                train_ds,
                validation_data=val_ds,
                epochs=cfg.epochs,
                steps_per_epoch=steps,
                callbacks=callbacks,
                shuffle=False,  # the dataset shuffles itself (seeded)
                verbose=2,
            ).history
            seconds = time.perf_counter() - start
        _check_finite(history, model)

    epochs_run = len(history["loss"])
    best = early.best_epoch if early.best_weights is not None else epochs_run - 1
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    # val_*: the validation split at the best epoch (never test: that is the evaluate stage);
    # train_*: Keras' running values over that epoch's augmented, class-weighted batches.
    metrics = {
        **{f"train_{k}": float(history[k][best]) for k in ("accuracy", "loss", "auc")},
        **{f"val_{k}": float(history[f"val_{k}"][best]) for k in ("accuracy", "loss", "auc")},
        "best_epoch": best + 1,
        "epochs_run": epochs_run,
        "seconds": round(seconds, 2),
        # Steady state: median epoch without the first one (graph tracing), validation included.
        "seconds_per_epoch": round(timer.steady_seconds_per_epoch(), 2),
        "images_per_second": round(steps * global_batch / timer.steady_seconds_per_epoch(), 1),
        "params_count": int(model.count_params()),
        "trainable_params": trainable,
        "n_train": len(train_split),
        "n_val": len(val_split),
        "train_class_counts": dict(zip(classes, counts.tolist(), strict=True)),
        "image_size": size,
        "classes": list(classes),
    }
    info = ClassifierInfo(
        classes=classes,
        class_map=dict(cfg.class_map),
        head_activation=cfg.head.activation,
        head_units=cfg.head.units,
        encoding=encoding,
        image_size=size,
        arch=cfg.arch,
        resize=str(meta.get("resize", "stretch")),
        intensity=str(meta.get("intensity", "none")),
        lungs=str(meta.get("lungs", "none")),
        lungs_margin=float(meta.get("lungs_margin", 0.05)),
        lungs_segmenter=str(meta.get("lungs_segmenter", "")),
    )
    accs = history["val_accuracy"]
    metrics["val_accuracy_per_epoch"] = [round(float(a), 4) for a in accs]
    # the stability figure: the largest fall of validation accuracy from one epoch to the next
    metrics["val_accuracy_max_drop"] = max(
        (a - b for a, b in zip(accs[:-1], accs[1:], strict=True)), default=0.0
    )
    save_info(model_path, info)
    save_model_atomic(model, model_path)
    write_json(summary_path, metrics)
    log.info(
        "best epoch %d/%d: val_accuracy %.4f, val_auc %.4f, %.1f s (%.0f images/s)",
        best + 1,
        epochs_run,
        metrics["val_accuracy"],
        metrics["val_auc"],
        seconds,
        metrics["images_per_second"],
    )
    return metrics


def _check_finite(history: dict, model: keras.Model) -> None:
    for epoch, loss in enumerate(history.get("loss", [])):
        if not math.isfinite(loss):
            raise StageError(
                f"training loss became {loss} in epoch {epoch + 1}: the run diverged. Lower "
                "train_classifier.learning_rate, or check the inputs (augment cache)"
            )
    for w in model.weights:
        if not np.all(np.isfinite(w.numpy())):
            raise StageError(f"weight {w.path} is not finite after training: the run diverged")
