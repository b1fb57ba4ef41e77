"""The segmenter's training core: ``train(cfg, ...)`` fits a MONAI U-Net on the segmentation
augment cache, validates every epoch and keeps the best epoch by validation Dice.

Inputs: the cache's meta.json, policy.json, train/ and val/ (images.npy, masks.npy, index.csv;
``stages.common.cache``) and a ``TrainSegmenterConfig``. Outputs: the model file
(``stages.segmenter.model.save_segmenter``), the training summary json (VALIDATION figures),
dvclive logs (with the whole summary as training.json) and resumable checkpoints (``last.pt``
every epoch, ``best.pt``) in the checkpoint folder, removed when the run finishes. One process
on the CPU. Called by ``python -m stages.train --task segmentation`` and by the tests; no run
command of its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

from stages.common import paths
from stages.common.cache import fit_path, load_meta, load_policy
from stages.common.config import ConfigError, parse, to_dict
from stages.common.torchutil import (
    atomic_torch_save,
    load_torch_file,
    resolve_precision,
    rng_state,
    set_rng_state,
)
from stages.common.utils import StageError, seed_everything, set_torch_threads, write_json
from stages.segmenter import engine as E
from stages.segmenter.augment import PairedAugment
from stages.segmenter.config import SegmentationPolicy, TrainSegmenterConfig
from stages.segmenter.data import SegmentationSplit, epoch_rows
from stages.segmenter.model import build_segmenter, save_segmenter

log = logging.getLogger("stages.train_segmenter")
# Keys that change how a run executes, not what it learns: they never block a resume.
_RUNTIME_KEYS = ("threads",)


def data_fingerprint(cache_dir: Path) -> str:
    """Hash of what defines the training data (meta, policy, train/val index and masks)."""
    h = hashlib.sha256()
    for rel in (
        "meta.json",
        "policy.json",
        "train/index.csv",
        "train/masks.npy",
        "val/index.csv",
        "val/masks.npy",
    ):
        path = fit_path(cache_dir) / rel
        h.update(rel.encode())
        h.update(path.read_bytes() if path.is_file() else b"<absent>")
    return h.hexdigest()


def _policy(cache_dir: Path) -> SegmentationPolicy:
    try:
        return parse(SegmentationPolicy, load_policy(cache_dir), f"{cache_dir}/policy.json")
    except ConfigError as exc:
        raise StageError(f"{exc}; re-run the augment stage") from exc


def train(
    cfg: TrainSegmenterConfig,
    cache_dir: Path,
    model_path: Path,
    live_dir: Path,
    checkpoint_dir: Path,
    summary_path: Path | None = None,
) -> dict[str, Any]:
    """Train, validate every epoch, keep the best epoch; resume from ``checkpoint_dir/last.pt``
    when it was written for the same config and data. Writes the training summary to
    ``summary_path`` (default ``<live_dir>/training.json``) and returns it."""
    wall = time.perf_counter()
    cache_dir, ckpt_dir, live_dir = Path(cache_dir), Path(checkpoint_dir), Path(live_dir)
    summary_path = Path(summary_path or live_dir / paths.TRAINING_NAME)
    set_torch_threads(cfg.threads)
    meta = load_meta(cache_dir)
    size = int(meta["image_size"])
    if size % cfg.depth_factor:
        raise StageError(
            f"augment.segmentation.image_size {size} is not a multiple of {cfg.depth_factor}, "
            f"which the {len(cfg.channels)} levels of train_segmenter.channels need; change one"
        )
    # the saved config and the resume key hold what ran (auto -> bf16 | fp32 on this hardware)
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, "cpu"))
    seed_everything(cfg.seed)
    train_data = SegmentationSplit(cache_dir, "train")
    if len(train_data) == 0:
        raise StageError(f"{cache_dir}/train is empty: no images to train the segmenter on")
    val_data = SegmentationSplit(cache_dir, "val")
    augment = PairedAugment(_policy(cache_dir)) if cfg.augmentation else None
    model = build_segmenter(cfg)
    loss_fn = E.build_loss(cfg)
    optimizer = E.build_optimizer(cfg, model)
    steps = math.ceil(len(train_data) / cfg.batch_size)
    scheduler = E.build_scheduler(cfg, optimizer, cfg.epochs * steps)

    run_key = {
        "config": {k: v for k, v in to_dict(cfg).items() if k not in _RUNTIME_KEYS},
        "data": data_fingerprint(cache_dir),
    }
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": -1, "dice": None}
    start_epoch = 0
    state = load_torch_file(last_path)
    if state is not None and state.get("run_key") == run_key:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        history, best, start_epoch = list(state["history"]), dict(state["best"]), state["epoch"] + 1
        log.info("resuming from %s at epoch %d/%d", last_path, start_epoch + 1, cfg.epochs)
    elif state is not None:
        log.info("%s is from another config or data: starting afresh", last_path)

    log.info(
        "training %s %s on %d images (%d val) at %d px, %s, %d epochs of %d steps",
        cfg.arch,
        list(cfg.channels),
        len(train_data),
        len(val_data),
        size,
        cfg.precision,
        cfg.epochs,
        steps,
    )
    live = _open_live(live_dir, history)
    for epoch in range(start_epoch, cfg.epochs):
        batches = epoch_rows(len(train_data), cfg.batch_size, cfg.seed, epoch, shuffle=True)
        stats = E.train_one_epoch(
            model,
            optimizer,
            scheduler,
            loss_fn,
            train_data,
            batches,
            augment,
            epoch,
            cfg.grad_clip,
            cfg.precision,
        )
        t0 = time.perf_counter()
        val = E.validation_dice(model, val_data) if len(val_data) else None
        row = {
            "epoch": epoch,
            **stats,
            "lr": optimizer.param_groups[0]["lr"],
            "val_seconds": time.perf_counter() - t0,
            "val_dice": val,
        }
        history.append(row)
        # Without a validation split every epoch counts as the best (so the last one wins).
        if val is None or best["dice"] is None or val > best["dice"]:
            best = {"epoch": epoch, "dice": val}
            atomic_torch_save({"model": model.state_dict(), "epoch": epoch}, best_path)
        atomic_torch_save(
            {
                "run_key": run_key,
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "history": history,
                "best": best,
            },
            last_path,
        )
        _log_epoch(live, row)
        log.info(
            "epoch %d/%d: loss %.4f, val Dice %s (%.1f s)",
            epoch + 1,
            cfg.epochs,
            row["loss"],
            f"{val:.4f}" if val is not None else "n/a",
            row["seconds"] + row["val_seconds"],
        )
    live.end()
    best_state = load_torch_file(best_path)
    if best_state is None:
        raise StageError(f"{best_path} is missing: delete {ckpt_dir} and train again")
    model.load_state_dict(best_state["model"])
    summary = _summary(history, best, len(train_data), len(val_data), time.perf_counter() - wall)
    summary.update(
        precision=cfg.precision,
        arch=cfg.arch,
        channels=list(cfg.channels),
        parameters=sum(p.numel() for p in model.parameters()),
        image_size=size,
    )
    extra = {
        "best_epoch": best["epoch"] + 1,
        "val_dice": best["dice"],
        "image_size": size,
        # the cache's geometry and intensity (stages.common.cache.prepare_gray): predict repeats
        # them and maps the masks back to each film's size
        "resize": str(meta.get("resize", "pad")),
        "intensity": str(meta.get("intensity", "none")),
    }
    save_segmenter(model_path, model, cfg, extra)
    write_json(summary_path, summary)
    _finish_checkpoints(ckpt_dir)
    return summary


def _finish_checkpoints(ckpt_dir: Path) -> None:
    """After a finished run the weights live in the model file: the resume checkpoints (and a
    damaged one moved aside) go, with their folder (never a DVC output: nothing to keep)."""
    shutil.rmtree(ckpt_dir, ignore_errors=True)


def _open_live(live_dir: Path, history: list[dict[str, Any]]) -> Any:
    """A fresh dvclive run; on resume the finished epochs are replayed so the plots are whole."""
    from dvclive import Live  # noqa: PLC0415  (heavy import)

    live = Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None)
    for row in history:
        _log_epoch(live, row)
    return live


def _log_epoch(live: Any, row: dict[str, Any]) -> None:
    live.step = row["epoch"]
    live.log_metric("train/loss", row["loss"])
    live.log_metric("train/lr", row["lr"])
    if row.get("val_dice") is not None:
        live.log_metric("val/dice", row["val_dice"])
    live.next_step()


def _summary(
    history: list[dict[str, Any]],
    best: dict[str, Any],
    n_train: int,
    n_val: int,
    seconds_this_run: float,
) -> dict[str, Any]:
    last = history[-1]
    train_seconds = sum(r["seconds"] for r in history)
    steps = sum(r["steps"] for r in history)
    images = sum(r["images"] for r in history)
    epoch_seconds = [r["seconds"] + r["val_seconds"] for r in history]
    return {
        "note": "val_* are validation-split figures; the test split is scored by evaluate",
        "best_epoch": best["epoch"] + 1,
        "val_dice": best["dice"],
        "train_loss": last["loss"],
        "epochs_run": len(history),
        "seconds": sum(epoch_seconds),
        "seconds_this_run": seconds_this_run,
        "seconds_per_epoch": sum(epoch_seconds) / len(history),
        "seconds_per_step": train_seconds / max(1, steps),
        "images_per_second": images / max(train_seconds, 1e-9),
        "n_train": n_train,
        "n_val": n_val,
        "val_dice_per_epoch": [r["val_dice"] for r in history],
        "train_loss_per_epoch": [r["loss"] for r in history],
    }


__all__ = ["data_fingerprint", "train"]
