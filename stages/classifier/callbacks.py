"""Keras callbacks of the classifier stage: per-epoch dvclive logging.

Input: Keras epoch logs (loss, accuracy, auc and their val_ twins). Output: dvclive step files
under the Live directory (``plots/metrics/{train,val}/{loss,accuracy,auc}.tsv`` + metrics.json),
which ``dvc plots show`` draws. ``dvclive.keras`` is not used: it imports tensorflow.keras,
which Keras 3 does not provide. Used by ``stages.train`` (train-classifier); no run command of its own.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import keras
import numpy as np
from dvclive import Live
from scmrepo.exceptions import SCMError

log = logging.getLogger(__name__)

LOGGED = ("loss", "accuracy", "auc")


def open_live(live_dir: str) -> Live:
    """``Live(dir, save_dvc_exp=False, dvcyaml=None)``: plain files, no experiment commits.

    dvclive asks git for HEAD on start-up and crashes in a repository without commits (e.g. a
    ``dvc repro`` before the first commit); then we log to the same files without its
    DVC/git integration, which this stage does not use anyway.
    """
    try:
        return Live(dir=live_dir, save_dvc_exp=False, dvcyaml=None)
    except SCMError as exc:
        log.warning("dvclive without git integration (%s); files are written as usual", exc)
        return _FilesOnlyLive(dir=live_dir, save_dvc_exp=False, dvcyaml=None)


class _FilesOnlyLive(Live):
    def _init_dvc(self) -> None:  # skip the repository probing that failed
        return None


class DvcLiveCallback(keras.callbacks.Callback):
    """Logs train/<name> and val/<name> for LOGGED (and the learning rate) once per epoch."""

    def __init__(self, live: Live) -> None:
        super().__init__()
        self.live = live

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        for name in LOGGED:
            for prefix, key in (("train", name), ("val", f"val_{name}")):
                if key in logs:
                    self.live.log_metric(f"{prefix}/{name}", float(logs[key]))
        lr = _current_lr(self.model)
        if lr is not None:
            self.live.log_metric("learning_rate", lr)
        self.live.next_step()


class PreciseBatchNorm(keras.callbacks.Callback):
    """Re-estimate every BatchNormalization layer's moving statistics before each validation,
    as the exact mean over ``batches`` training batches with the epoch's final weights
    ("precise BN", Wu & Johnson 2021); the best epoch is then kept with those statistics.

    Why: with a from-scratch network at a high learning rate the weights move faster than the
    BN moving averages follow (momentum 0.9 averages the last ~10 steps of a network that has
    since changed), so in inference mode the activations are shifted and the sigmoid output's
    bias jumps: validation accuracy swung by 50 points between epochs while validation ROC-AUC
    stayed above 0.95 (resnet_small on Kermany). Statistics of the current weights remove that.
    """

    def __init__(self, dataset, batches: int) -> None:
        super().__init__()
        self.dataset = dataset
        self.batches = batches

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        bns = [layer for layer in self.model._flatten_layers() if _is_bn(layer)]
        if not bns:
            return
        saved = [bn.momentum for bn in bns]
        sums = [[np.zeros(v.shape, np.float64) for v in (bn.moving_mean, bn.moving_variance)]
                for bn in bns]  # fmt: skip
        seen = 0
        try:
            for bn in bns:
                bn.momentum = 0.0  # a training-mode call then leaves that batch's statistics
            for batch in self.dataset.take(self.batches):
                self.model(batch[0], training=True)
                for acc, bn in zip(sums, bns, strict=True):
                    acc[0] += bn.moving_mean.numpy()
                    acc[1] += bn.moving_variance.numpy()
                seen += 1
        finally:
            for bn, momentum in zip(bns, saved, strict=True):
                bn.momentum = momentum
        if seen:
            for acc, bn in zip(sums, bns, strict=True):
                bn.moving_mean.assign(acc[0] / seen)
                bn.moving_variance.assign(acc[1] / seen)


def _is_bn(layer: Any) -> bool:
    return isinstance(layer, keras.layers.BatchNormalization) and layer.trainable


class EpochTimer(keras.callbacks.Callback):
    """Wall seconds of each epoch (training + validation), for a throughput that leaves out the
    first epoch's graph tracing."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.seconds.append(time.perf_counter() - self._start)

    def steady_seconds_per_epoch(self) -> float:
        """Median epoch time, without the first epoch when there are others."""
        times = self.seconds[1:] or self.seconds
        return float(sorted(times)[len(times) // 2]) if times else float("nan")


def _current_lr(model: keras.Model) -> float | None:
    lr = getattr(getattr(model, "optimizer", None), "learning_rate", None)
    if lr is None:
        return None
    return float(lr.numpy() if hasattr(lr, "numpy") else lr)


__all__ = ["LOGGED", "DvcLiveCallback", "EpochTimer", "PreciseBatchNorm", "open_live"]
