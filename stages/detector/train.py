"""The detector's training core: ``train(cfg, ...)`` fits RetinaNet (torchvision) on the
detection augment cache, validates every epoch and keeps the best epoch by validation mAP@0.5.

Inputs: the cache's meta.json, policy.json, train/, val/ (``stages.common.cache``) and a
``TrainDetectorConfig``. Outputs: the model file (``stages.detector.model.save_detector``), the
VALIDATION metrics json, dvclive logs and resumable checkpoints (``last.pt`` every epoch,
``best.pt``) in the checkpoint folder, removed when the run finishes. Runs in one process or
under torchrun (DistributedDataParallel; gloo on CPU, nccl on GPU; rank 0 validates, logs and
writes every file). Called by ``python -m stages.train --task detection`` and by the tests; no
run command of its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.common import paths
from stages.common.cache import fit_path, load_meta, load_policy
from stages.common.config import ConfigError, parse, to_dict
from stages.common.utils import StageError, seed_everything, set_torch_threads, write_json
from stages.detector import engine as E
from stages.detector.augment import DetectionPolicy, DetectionTransform
from stages.detector.config import TrainDetectorConfig
from stages.detector.data import DetectionCacheDataset, make_loader
from stages.detector.model import build_detector, save_detector, unwrap

log = logging.getLogger("stages.train_detector")
# Keys that change how a run executes, not what it learns: they never block a resume.
_RUNTIME_KEYS = ("threads", "num_workers")


def resolve_sizes(cfg: TrainDetectorConfig, image_size: int) -> TrainDetectorConfig:
    """min_size/max_size null -> the cache image size (the saved config holds the numbers)."""
    min_size = cfg.min_size or image_size
    return dataclasses.replace(cfg, min_size=min_size, max_size=cfg.max_size or min_size)


def data_fingerprint(cache_dir: Path) -> str:
    """Hash of what defines the training data (meta, policy, train/val index and boxes)."""
    h = hashlib.sha256()
    for rel in (
        "meta.json",
        "policy.json",
        "train/index.csv",
        "train/annotations.json",
        "val/index.csv",
        "val/annotations.json",
    ):
        path = fit_path(cache_dir) / rel
        h.update(rel.encode())
        h.update(path.read_bytes() if path.is_file() else b"<absent>")
    return h.hexdigest()


def _policy(cache_dir: Path) -> DetectionPolicy:
    try:
        return parse(DetectionPolicy, load_policy(cache_dir), f"{cache_dir}/policy.json")
    except ConfigError as exc:
        raise StageError(f"{exc}; re-run the augment stage") from exc


def train(
    cfg: TrainDetectorConfig,
    cache_dir: Path,
    model_path: Path,
    live_dir: Path,
    checkpoint_dir: Path,
    summary_path: Path | None = None,
) -> dict[str, Any]:
    """Train, validate every epoch, keep the best epoch; resume from ``checkpoint_dir/last.pt``.

    Returns the metrics dict on rank 0 (``{}`` on the other ranks).
    """
    info = E.setup_distributed()
    try:
        return _train(
            cfg,
            Path(cache_dir),
            Path(model_path),
            Path(live_dir),
            Path(checkpoint_dir),
            Path(summary_path or Path(live_dir) / paths.TRAINING_NAME),
            info,
        )
    finally:
        E.cleanup_distributed(info)


def _train(
    cfg: TrainDetectorConfig,
    cache_dir: Path,
    model_path: Path,
    live_dir: Path,
    ckpt_dir: Path,
    summary_path: Path,
    info: E.DistInfo,
) -> dict[str, Any]:
    wall = time.perf_counter()
    set_torch_threads(E.threads_per_process(cfg.threads, info))
    meta = load_meta(cache_dir)
    classes = [str(c) for c in meta["classes"]]
    cfg = resolve_sizes(cfg, int(meta["image_size"]))
    # the saved config and the resume key hold what ran (auto -> bf16 | fp32 on this hardware)
    cfg = dataclasses.replace(cfg, precision=E.resolve_precision(cfg.precision, info.device))
    seed_everything(cfg.seed)
    train_ds = DetectionCacheDataset(
        cache_dir, "train", classes, DetectionTransform(_policy(cache_dir), train=True)
    )
    if len(train_ds) == 0:
        raise StageError(f"{cache_dir}/train is empty: no images to train the detector on")
    val_ds = DetectionCacheDataset(cache_dir, "val", classes)
    model = build_detector(cfg, len(classes)).to(info.device)
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(model)
    torch.manual_seed(cfg.seed + info.rank)  # per-rank augmentation draws
    train_loader, train_sampler = make_loader(
        train_ds, cfg.batch_size, True, cfg.num_workers, cfg.seed, info.rank, info.world_size
    )
    val_loader, _ = make_loader(val_ds, cfg.batch_size, False, cfg.num_workers, cfg.seed)
    optimizer = E.build_optimizer(cfg, model)
    scheduler = E.build_scheduler(cfg, optimizer, cfg.epochs * len(train_loader))

    run_key = {
        "config": {k: v for k, v in to_dict(cfg).items() if k not in _RUNTIME_KEYS},
        "classes": classes,
        "data": data_fingerprint(cache_dir),
        "world_size": info.world_size,
    }
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": -1, "map_50": -1.0}
    start_epoch = 0
    state = E.load_checkpoint(last_path)
    if state is not None and state.get("run_key") == run_key:
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        E.set_rng_state(state["rng"][min(info.rank, len(state["rng"]) - 1)])
        history, best, start_epoch = list(state["history"]), dict(state["best"]), state["epoch"] + 1
        log.info("resuming from %s at epoch %d/%d", last_path, start_epoch + 1, cfg.epochs)
    elif state is not None:
        log.info("%s is from another config or data: starting afresh", last_path)

    live = _open_live(live_dir, history) if info.is_main else None
    for epoch in range(start_epoch, cfg.epochs):
        train_sampler.set_epoch(epoch)
        stats = E.train_one_epoch(
            model,
            optimizer,
            scheduler,
            train_loader,
            epoch,
            cfg.grad_clip,
            info,
            precision=cfg.precision,
        )
        rngs = _gather_rng(info)
        if info.is_main:
            t0 = time.perf_counter()
            val = E.evaluate_map(unwrap(model), val_loader, info.device) if len(val_ds) else {}
            row = {
                "epoch": epoch,
                **stats,
                "lr": optimizer.param_groups[0]["lr"],
                "val_seconds": time.perf_counter() - t0,
                **{f"val_{k}": v for k, v in val.items()},
            }
            history.append(row)
            # Without a validation split every epoch counts as the best (so the last one wins).
            score = val.get("map_50", float("inf"))
            if not val or best["epoch"] < 0 or score > best["map_50"]:
                best = {"epoch": epoch, "map_50": score if val else None}
                E.save_checkpoint(best_path, {"model": unwrap(model).state_dict(), "epoch": epoch})
            E.save_checkpoint(
                last_path,
                {
                    "run_key": run_key,
                    "epoch": epoch,
                    "model": unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rngs,
                    "history": history,
                    "best": best,
                },
            )
            _log_epoch(live, row)
            log.info(
                "epoch %d/%d: loss %.4f, val mAP@0.5 %s",
                epoch + 1,
                cfg.epochs,
                row["loss"],
                f"{val['map_50']:.4f}" if val else "n/a",
            )
        E.barrier(info)

    metrics: dict[str, Any] = {}
    if info.is_main:
        if live is not None:
            live.end()
        best_state = E.load_checkpoint(best_path)
        if best_state is None:
            raise StageError(f"{best_path} is missing: delete {ckpt_dir} and train again")
        unwrap(model).load_state_dict(best_state["model"])
        metrics = _metrics(
            history, best, len(train_ds), len(val_ds), info, time.perf_counter() - wall
        )
        metrics["precision"] = cfg.precision
        extra = {
            "best_epoch": best["epoch"] + 1,
            "val_map_50": best["map_50"],
            "image_size": int(meta["image_size"]),
            # the cache's resize (stages.common.cache.resize_gray): predict repeats it, boxes map back
            "resize": str(meta.get("resize", "pad")),
            "intensity": str(meta.get("intensity", "none")),
        }
        save_detector(model_path, model, cfg, classes, extra)
        write_json(summary_path, metrics)
        _finish_checkpoints(ckpt_dir)
    E.barrier(info)
    return metrics


def _finish_checkpoints(ckpt_dir: Path) -> None:
    """After a finished run the weights live in the model file: the resume checkpoints (and a
    damaged one moved aside) go, with their folder (never a DVC output: nothing to keep)."""
    shutil.rmtree(ckpt_dir, ignore_errors=True)


def _gather_rng(info: E.DistInfo) -> list[dict[str, Any]]:
    """Every rank's RNG state (rank order), so a resumed DDP run continues each stream."""
    state = E.rng_state()
    if not info.distributed:
        return [state]
    out: list[Any] = [None] * info.world_size
    torch.distributed.all_gather_object(out, state)
    return out


def _open_live(live_dir: Path, history: list[dict[str, Any]]) -> Any:
    """A fresh dvclive run; on resume the finished epochs are replayed so the plots are whole."""
    from dvclive import Live  # noqa: PLC0415  (heavy import, rank 0 only)

    live = Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None)
    for row in history:
        _log_epoch(live, row)
    return live


def _log_epoch(live: Any, row: dict[str, Any]) -> None:
    if live is None:
        return
    live.step = row["epoch"]
    for key in ("loss", "classification", "bbox_regression"):
        live.log_metric(f"train/{key}", row[key])
    live.log_metric("train/lr", row["lr"])
    for key in ("val_map_50", "val_map"):
        if key in row:
            live.log_metric(f"val/{key.removeprefix('val_')}", row[key])
    live.next_step()


def _metrics(
    history: list[dict[str, Any]],
    best: dict[str, Any],
    n_train: int,
    n_val: int,
    info: E.DistInfo,
    seconds_this_run: float,
) -> dict[str, Any]:
    last = history[-1]
    train_seconds = sum(r["seconds"] for r in history)
    steps = sum(r["steps"] for r in history)
    images = sum(r["images"] for r in history)
    epoch_seconds = [r["seconds"] + r["val_seconds"] for r in history]
    by_epoch = {r["epoch"]: r for r in history}
    best_row = by_epoch.get(best["epoch"], last)
    return {
        "note": "val_* are validation-split figures; the test split is scored by evaluate",
        "best_epoch": best["epoch"] + 1,
        "val_map_50": best["map_50"],
        "val_map": best_row.get("val_map"),
        "train_loss": last["loss"],
        "train_loss_classification": last["classification"],
        "train_loss_bbox_regression": last["bbox_regression"],
        "epochs_run": len(history),
        "seconds": sum(epoch_seconds),
        "seconds_this_run": seconds_this_run,
        "seconds_per_epoch": sum(epoch_seconds) / len(history),
        "seconds_per_step": train_seconds / max(1, steps),
        "images_per_second": images / max(train_seconds, 1e-9),
        "n_train": n_train,
        "n_val": n_val,
        "world_size": info.world_size,
        "val_map_50_per_epoch": [r.get("val_map_50") for r in history],
    }
