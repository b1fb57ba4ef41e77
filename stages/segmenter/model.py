"""The lung segmenter network (MONAI UNet or BasicUNet): build, save, load, probabilities.

Inputs: a ``TrainSegmenterConfig``. Outputs: ``models/segmenter.pt`` = {"format", "state_dict",
"config" (plain dict), "image_size", "resize", "intensity", ...extra}, loadable with
``torch.load(weights_only=True)``. No run command: used by ``python -m stages.train --task segmentation``,
the segmentation evaluation and ``stages.segmenter.predict``.

MONAI is imported inside ``build_network`` only: importing it costs seconds (it loads all of
its sub-packages), and only building a network needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.common.config import ConfigError, parse, to_dict
from stages.common.utils import StageError, atomic_file
from stages.segmenter.config import TrainSegmenterConfig

FORMAT = "cxr-segmenter/1"


def build_network(cfg: TrainSegmenterConfig) -> nn.Module:
    """The MONAI network of ``cfg.arch``: 1 input channel (grey), 1 output (the lung logit)."""
    from monai.networks.nets import BasicUNet, UNet  # noqa: PLC0415  (slow import, see above)

    norm = cfg.norm
    if cfg.arch == "basic_unet":
        return BasicUNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            features=(*cfg.channels, cfg.channels[0]),
            norm=(norm, {"affine": True}) if norm == "instance" else norm,
            dropout=cfg.dropout,
        )
    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=cfg.channels,
        strides=(2,) * (len(cfg.channels) - 1),
        num_res_units=cfg.res_units,
        norm=norm,
        dropout=cfg.dropout,
    )


class Segmenter(nn.Module):
    """Per-image standardisation (mean 0, sd 1) then the network: (N, 1, S, S) in [0, 1] ->
    lung logits (N, 1, S, S)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        sd = x.std(dim=(1, 2, 3), keepdim=True)
        return self.net((x - mean) / (sd + 1e-3))


def build_segmenter(cfg: TrainSegmenterConfig) -> Segmenter:
    return Segmenter(build_network(cfg))


def save_segmenter(
    path: str | Path, model: nn.Module, cfg: TrainSegmenterConfig, extra: dict[str, Any]
) -> None:
    """Write the model file atomically; plain types only (weights_only loadable). ``extra``
    must name the cache geometry the model was trained on: image_size, resize, intensity."""
    missing = {"image_size", "resize", "intensity"} - set(extra)
    if missing:
        raise ValueError(f"save_segmenter: extra lacks {sorted(missing)}")
    payload = {
        **extra,
        "format": FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": to_dict(cfg),
    }
    with atomic_file(path) as tmp:  # an interrupted write never leaves a broken model file
        torch.save(payload, tmp)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The saved dict (state_dict, config and the extra keys: image_size, resize, ...)."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path} not found: run the train-segmenter stage first")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise StageError(f"{path} is not a segmenter saved by stages.segmenter.model")
    return ckpt


def segmenter_from_checkpoint(
    ckpt: dict[str, Any], path: str | Path = "<checkpoint>"
) -> tuple[Segmenter, TrainSegmenterConfig]:
    try:
        cfg = parse(TrainSegmenterConfig, ckpt["config"], f"{path}:config")
    except ConfigError as exc:
        raise StageError(f"{path}: stored config does not fit this code version: {exc}") from exc
    model = build_segmenter(cfg)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), cfg


def load_segmenter(path: str | Path) -> tuple[Segmenter, TrainSegmenterConfig, dict[str, Any]]:
    """(model in eval mode on CPU, its config, the checkpoint's other keys)."""
    ckpt = read_checkpoint(path)
    model, cfg = segmenter_from_checkpoint(ckpt, path)
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "config")}
    return model, cfg, meta


@torch.inference_mode()
def predict_proba(model: nn.Module, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Lung probabilities float32 (N, S, S) of uint8 (N, S, S) images at the model's size."""
    was_training = model.training
    model.eval()
    out = np.empty(images.shape, dtype=np.float32)
    try:
        for start in range(0, len(images), batch_size):
            batch = np.asarray(images[start : start + batch_size], dtype=np.float32) / 255.0
            logits = model(torch.from_numpy(batch)[:, None])
            out[start : start + len(batch)] = torch.sigmoid(logits)[:, 0].numpy()
    finally:
        model.train(was_training)
    return out


__all__ = [
    "FORMAT",
    "Segmenter",
    "build_network",
    "build_segmenter",
    "load_segmenter",
    "predict_proba",
    "read_checkpoint",
    "save_segmenter",
    "segmenter_from_checkpoint",
]
