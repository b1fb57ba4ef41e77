"""Training/validation loop pieces after torchvision's detection references, DDP-aware.

Inputs: a RetinaNet, DataLoaders from ``stages.detector.data`` and the ``TrainDetectorConfig``.
Outputs: per-epoch loss parts, validation COCO mAP (torchmetrics), checkpoint files.
No run command: driven by ``python -m stages.train --task detection`` (also under ``torchrun``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import random
import time
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.detection import MeanAveragePrecision
from tqdm import tqdm

from stages.common.utils import StageError, usable_cores
from stages.detector.config import TrainDetectorConfig
from stages.detector.model import atomic_torch_save

log = logging.getLogger("stages.train_detector")
# What reading a damaged checkpoint can raise (a truncated zip: RuntimeError from
# PytorchStreamReader; random bytes: UnpicklingError; a pickle with code: UnpicklingError).
_CORRUPT = (
    RuntimeError,
    EOFError,
    OSError,
    ValueError,
    KeyError,
    AttributeError,
    TypeError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
)

# --------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed() -> DistInfo:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set): gloo on CPU,
    nccl on GPU. A plain ``python -m`` run is world size 1 (cuda:0 if there is a GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return DistInfo(device="cuda" if cuda else "cpu")
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    return DistInfo(rank, world, local, local_world, f"cuda:{local}" if cuda else "cpu")


def barrier(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.barrier()


def cleanup_distributed(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def threads_per_process(threads: int, info: DistInfo) -> int:
    """``threads: 0`` = all usable cores, shared between the processes of this machine."""
    if threads:
        return threads
    return max(1, usable_cores() // info.local_world_size)


# --------------------------------------------------------------------------- optimisation


def build_optimizer(
    cfg: TrainDetectorConfig, model: nn.Module, fused: bool = True
) -> torch.optim.Optimizer:
    """SGD or AdamW; norm weights and biases get no weight decay (torchvision references).

    ``fused``: one kernel for all parameters (``False``: torch's per-parameter loop, kept for
    bench/detector_step.py's baseline)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # the per-parameter loop took ~42 ms of a default step on 2 cores, fused ~12 (hand-timed,
    # bench/README.md 3b; bench/detector_step.py measures whole steps)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)


def lr_factor(cfg: TrainDetectorConfig, it: int, total_iters: int) -> float:
    """Linear warm-up from 0.001 x lr over ``warmup_iters``, times the cosine/multistep schedule."""
    warm = 1.0
    if cfg.warmup_iters and it < cfg.warmup_iters:
        alpha = it / cfg.warmup_iters
        warm = 0.001 * (1 - alpha) + alpha
    total = max(1, total_iters)
    if cfg.lr_schedule == "cosine":
        sched = 0.5 * (1.0 + math.cos(math.pi * min(it, total) / total))
    else:
        sched = cfg.lr_gamma ** sum(it >= m * total for m in cfg.lr_milestones)
    return warm * sched


def build_scheduler(
    cfg: TrainDetectorConfig, optimizer: torch.optim.Optimizer, total_iters: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per iteration."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it, total_iters))


# --------------------------------------------------------------------------- precision


def native_bf16(device: str, cpuinfo: str | None = None) -> bool:
    """True where bf16 matrix maths runs in hardware: a CUDA GPU with bf16, or a CPU with AMX
    or AVX512-BF16 (oneDNN then runs bf16 convolutions faster than fp32; elsewhere it emulates
    them, slower than fp32). ``cpuinfo``: the text of /proc/cpuinfo (read when None)."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: no way to ask, stay on fp32
            return False
    return bool({"amx_bf16", "avx512_bf16"} & set(cpuinfo.split()))


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> ``bf16`` on hardware with native bf16 (``native_bf16``), else ``fp32``."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(precision: str, device: str) -> Any:
    """The training forward's autocast context (a resolved ``precision``: fp32 turns it off)."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=precision == "bf16")


# --------------------------------------------------------------------------- loops


def _to(targets: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    return [
        {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
        for t in targets
    ]


def _reduce_mean(values: dict[str, torch.Tensor], info: DistInfo) -> dict[str, float]:
    """Loss parts averaged over ranks (all ranks then take the same non-finite decision)."""
    names = list(values)
    stacked = torch.stack([values[n].detach().float() for n in names])
    if info.distributed:
        dist.all_reduce(stacked)
        stacked /= info.world_size
    return {n: float(v) for n, v in zip(names, stacked.cpu(), strict=True)}


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: DataLoader,
    epoch: int,
    grad_clip: float,
    info: DistInfo,
    max_steps: int | None = None,
    precision: str = "fp32",
) -> dict[str, float]:
    """One pass: sum of the loss dict, stop on a non-finite loss, clip, step the LR per iter.

    ``precision`` (resolved, see ``resolve_precision``): ``bf16`` runs the forward pass and the
    loss under autocast; gradients land on the fp32 weights, so no loss scaling is needed.
    """
    model.train()
    sums: dict[str, float] = defaultdict(float)
    steps = images_seen = 0
    params = [p for p in model.parameters() if p.requires_grad]
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", unit="step", disable=not info.is_main)
    for images, targets in bar:
        images = [im.to(info.device) for im in images]
        with autocast(precision, info.device):
            loss_dict = model(images, _to(targets, info.device))
        loss = sum(v.float() for v in loss_dict.values())
        parts = _reduce_mean(loss_dict, info)
        total = sum(parts.values())
        if not math.isfinite(total):
            detail = ", ".join(f"{k}={v:.4g}" for k, v in parts.items())
            raise StageError(
                f"non-finite training loss at epoch {epoch + 1}, iteration {steps + 1} "
                f"({detail}); lower train_detector.lr, raise warmup_iters or set grad_clip"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        scheduler.step()
        for k, v in parts.items():
            sums[k] += v
        sums["loss"] += total
        steps += 1
        images_seen += len(images) * info.world_size
        bar.set_postfix(loss=f"{total:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if max_steps is not None and steps >= max_steps:
            break
    seconds = time.perf_counter() - start
    out = {k: v / max(1, steps) for k, v in sums.items()}
    out.update(steps=steps, images=images_seen, seconds=seconds)
    return out


@torch.no_grad()
def evaluate_map(model: nn.Module, loader: DataLoader, device: str) -> dict[str, float]:
    """COCO mAP@[.5:.95] and mAP@0.5 with torchmetrics (on this process's loader only)."""
    model.eval()
    metric = MeanAveragePrecision(iou_type="bbox", sync_on_compute=False)
    for images, targets in tqdm(loader, desc="validate", unit="batch", leave=False):
        preds = model([im.to(device) for im in images])
        metric.update(
            [{k: v.cpu() for k, v in p.items()} for p in preds],
            [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets],
        )
    result = metric.compute()
    return {"map": float(result["map"]), "map_50": float(result["map_50"])}


# --------------------------------------------------------------------------- checkpoints


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors/plain types (weights_only loadable)."""
    np_state = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomic: an interrupted write never corrupts last.pt."""
    atomic_torch_save(payload, path)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path``; None when there is none, or when it cannot be read (a
    truncated or damaged file: moved aside to ``<name>.corrupt``, with one WARNING line, so the
    run starts afresh instead of failing on it in every later run)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise TypeError(f"holds a {type(state).__name__}, not a checkpoint dict")
    except _CORRUPT as exc:
        aside = path.with_name(path.name + ".corrupt")
        # every DDP rank reads the file: the first one to get here moves it
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, aside)
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        log.warning(
            "%s is unreadable (%s: %s): moved to %s, training starts afresh",
            path,
            type(exc).__name__,
            first,
            aside,
        )
        return None
    return state


__all__ = [
    "DistInfo",
    "autocast",
    "barrier",
    "build_optimizer",
    "build_scheduler",
    "cleanup_distributed",
    "evaluate_map",
    "load_checkpoint",
    "lr_factor",
    "native_bf16",
    "resolve_precision",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "setup_distributed",
    "threads_per_process",
    "train_one_epoch",
]
