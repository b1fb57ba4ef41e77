"""Training loop pieces of the segmenter: loss, optimiser, schedule, one epoch, validation Dice.

Inputs: a ``Segmenter``, the cache splits of ``stages.segmenter.data`` and the
``TrainSegmenterConfig``. Outputs: per-epoch loss and timing, validation Dice.
No run command: driven by ``python -m stages.train --task segmentation``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from stages.common.torchutil import autocast
from stages.common.utils import StageError
from stages.segmenter.config import TrainSegmenterConfig
from stages.segmenter.data import SegmentationSplit
from stages.segmenter.metrics import dice_scores
from stages.segmenter.model import predict_proba

Augment = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def build_loss(cfg: TrainSegmenterConfig) -> nn.Module:
    """MONAI's DiceCELoss on the one lung logit: soft Dice per image (sigmoid) + BCE."""
    from monai.losses import DiceCELoss  # noqa: PLC0415  (slow import: see stages.segmenter.model)

    return DiceCELoss(sigmoid=True, lambda_dice=cfg.dice_weight, lambda_ce=cfg.bce_weight)


def build_optimizer(cfg: TrainSegmenterConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW; norm weights and biases get no weight decay; one fused kernel for all parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)


def lr_factor(cfg: TrainSegmenterConfig, it: int, total_iters: int) -> float:
    """Linear warm-up from 0.01 x lr over ``warmup_iters``, times the cosine (to 0) or constant
    schedule over all iterations."""
    warm = 1.0
    if cfg.warmup_iters and it < cfg.warmup_iters:
        alpha = it / cfg.warmup_iters
        warm = 0.01 * (1 - alpha) + alpha
    if cfg.lr_schedule == "constant":
        return warm
    total = max(1, total_iters)
    return warm * 0.5 * (1.0 + math.cos(math.pi * min(it, total) / total))


def build_scheduler(
    cfg: TrainSegmenterConfig, optimizer: torch.optim.Optimizer, total_iters: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per iteration."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it, total_iters))


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    data: SegmentationSplit,
    batches: list[np.ndarray],
    augment: Augment | None,
    epoch: int,
    grad_clip: float,
    precision: str = "fp32",
    max_steps: int | None = None,
) -> dict[str, float]:
    """One pass over ``batches`` (row arrays): augment, forward (bf16 autocast when
    ``precision`` is bf16; gradients land on the fp32 weights), loss in fp32, clip, step, LR per
    iteration. A non-finite loss stops the run with one line."""
    model.train()
    total = 0.0
    steps = images = 0
    params = [p for p in model.parameters() if p.requires_grad]
    start = time.perf_counter()
    bar = tqdm(batches, desc=f"epoch {epoch + 1}", unit="step", mininterval=2.0)
    for rows in bar:
        x, y = data.batch(rows)
        if augment is not None:
            x, y = augment(x, y)
        with autocast(precision, "cpu"):
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise StageError(
                f"non-finite training loss at epoch {epoch + 1}, step {steps + 1}; lower "
                "train_segmenter.lr, raise warmup_iters or set grad_clip"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        scheduler.step()
        total += value
        steps += 1
        images += len(rows)
        bar.set_postfix(loss=f"{value:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if max_steps is not None and steps >= max_steps:
            break
    seconds = time.perf_counter() - start
    return {"loss": total / max(1, steps), "steps": steps, "images": images, "seconds": seconds}


def validation_dice(model: nn.Module, data: SegmentationSplit, batch_size: int = 16) -> float:
    """Mean per-image Dice of the probabilities thresholded at 0.5 (no post-processing)."""
    dices = []
    for start in range(0, len(data), batch_size):
        rows = np.arange(start, min(len(data), start + batch_size))
        images, masks = data.arrays(rows)
        pred = predict_proba(model, images, batch_size) >= 0.5
        dices.append(dice_scores(masks.astype(bool), pred))
    return float(np.mean(np.concatenate(dices))) if dices else float("nan")


__all__ = [
    "build_loss",
    "build_optimizer",
    "build_scheduler",
    "lr_factor",
    "train_one_epoch",
    "validation_dice",
]
