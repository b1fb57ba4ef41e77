"""RetinaNet (torchvision) with a ResNet-FPN backbone: build, save, load and predict.

Inputs: a ``TrainDetectorConfig`` and the number of classes K (category ids 1..K); for
``weights_backbone`` a local torchvision ResNet state dict or torch.hub's cache (never downloaded).
Outputs: ``models/detector.pt`` = {"state_dict", "config" (plain dict), "classes", "num_classes",
"format", ...extra}, loadable with ``torch.load(weights_only=True)``.
No run command: used by ``python -m stages.train --task detection`` and the detection evaluation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import (
    RetinaNetClassificationHead,
    RetinaNetHead,
    _sum,
)
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d, sigmoid_focal_loss
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from stages.common.config import ConfigError, parse, to_dict
from stages.common.utils import StageError, atomic_file
from stages.detector.config import TrainDetectorConfig

log = logging.getLogger("stages.detector")
FORMAT = "cxr-retinanet/1"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_RESNETS = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights),
    "resnet34": (torchvision.models.resnet34, torchvision.models.ResNet34_Weights),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights),
    "resnet101": (torchvision.models.resnet101, torchvision.models.ResNet101_Weights),
}


class GrayTransform(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform that accepts (1, H, W) images: repeated to RGB, then normalised."""

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        return super().normalize(image)


class FocalClassificationHead(RetinaNetClassificationHead):
    """torchvision's head with the focal loss alpha/gamma taken from params (fixed upstream)."""

    def __init__(self, *args: Any, alpha: float, gamma: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.alpha = alpha
        self.gamma = gamma

    def compute_loss(self, targets, head_outputs, matched_idxs):  # noqa: ANN001, ANN201
        # Same as torchvision's compute_loss except for the focal parameters.
        losses = []
        cls_logits = head_outputs["cls_logits"]
        for tgt, logits, matched in zip(targets, cls_logits, matched_idxs, strict=True):
            foreground = matched >= 0
            num_foreground = foreground.sum()
            gt_classes = torch.zeros_like(logits)
            gt_classes[foreground, tgt["labels"][matched[foreground]]] = 1.0
            valid = matched != self.BETWEEN_THRESHOLDS
            loss = sigmoid_focal_loss(
                logits[valid],
                gt_classes[valid],
                alpha=self.alpha,
                gamma=self.gamma,
                reduction="sum",
            )
            losses.append(loss / max(1, num_foreground))
        return _sum(losses) / len(targets)


class Fp32LastLevelP6P7(LastLevelP6P7):
    """torchvision's P6/P7 block, run in fp32 under bf16 autocast: on a 1 x 1 map (inputs under
    128 px) oneDNN's bf16 weight gradient of the stride-2 P7 conv came out non-finite
    (tests/test_train_detector.py); these two maps cost nothing. Same parameters as upstream."""

    def forward(self, p, c, names):  # noqa: ANN001, ANN201
        with torch.autocast(p[0].device.type, enabled=False):
            return super().forward([t.float() for t in p], [t.float() for t in c], names)


def imagenet_weights_path(backbone: str) -> Path:
    """Where torch.hub keeps the torchvision ImageNet checkpoint of ``backbone`` (TORCH_HOME aware)."""
    url = _RESNETS[backbone][1].IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _backbone_state_dict(cfg: TrainDetectorConfig) -> dict[str, torch.Tensor] | None:
    """The ResNet state dict named by ``weights_backbone``; fails fast (no network) when absent."""
    choice = cfg.weights_backbone
    if choice == "none":
        return None
    if choice == "imagenet":
        path = imagenet_weights_path(cfg.backbone)
        if not path.is_file():
            url = _RESNETS[cfg.backbone][1].IMAGENET1K_V1.url
            raise StageError(
                f"ImageNet weights for {cfg.backbone} are not in torch.hub's cache ({path}) and this "
                f"machine downloads nothing: fetch {url} elsewhere and copy it to {path}, or set "
                "train_detector.weights_backbone to a local state-dict path (or none)"
            )
    else:
        path = Path(choice)
        if not path.is_file():
            raise StageError(
                f"train_detector.weights_backbone: {path} is not a file (use none, imagenet or a "
                f"path to a torchvision {cfg.backbone} state dict)"
            )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError) as exc:
        raise StageError(f"{path}: cannot read a state dict ({exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise StageError(f"{path}: expected a ResNet state dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _build_resnet(cfg: TrainDetectorConfig, load_weights: bool) -> nn.Module:
    pretrained = cfg.weights_backbone != "none"
    # Frozen BN keeps ImageNet statistics at batch 2-4; from scratch BN must learn them, or
    # GroupNorm(32) normalises per image (no running statistics, batch-size independent).
    if pretrained:
        norm: Any = FrozenBatchNorm2d
    elif cfg.backbone_norm == "groupnorm":
        norm = partial(nn.GroupNorm, 32)
    else:
        norm = nn.BatchNorm2d
    resnet = _RESNETS[cfg.backbone][0](weights=None, norm_layer=norm)
    state = _backbone_state_dict(cfg) if load_weights else None
    if state is not None:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        try:
            result = resnet.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise StageError(
                f"weights_backbone {cfg.weights_backbone} does not fit {cfg.backbone}: {exc}"
            ) from exc
        missing = [k for k in result.missing_keys if not k.startswith("fc.")]
        if missing or result.unexpected_keys:
            raise StageError(
                f"weights_backbone {cfg.weights_backbone} is not a {cfg.backbone} state dict: "
                f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
            )
    return resnet


def trainable_layers(cfg: TrainDetectorConfig) -> int:
    """Backbone stages left trainable: all 5 from scratch (frozen random layers make no sense)."""
    return cfg.trainable_backbone_layers if cfg.weights_backbone != "none" else 5


def fpn_backbone(resnet: nn.Module, trainable: int, channels: int) -> BackboneWithFPN:
    """torchvision's _resnet_fpn_extractor with a configurable FPN width: C3-C5 -> P3-P5,
    P6/P7 from P5 (LastLevelP6P7(c, c), which fits every ResNet depth)."""
    train_prefixes = ("layer4", "layer3", "layer2", "layer1", "conv1")[:trainable]
    if trainable == 5:
        train_prefixes += ("bn1",)
    for name, param in resnet.named_parameters():
        if not name.startswith(train_prefixes):
            param.requires_grad_(False)
    c5 = resnet.inplanes  # 512 (basic blocks) or 2048 (bottlenecks)
    return BackboneWithFPN(
        resnet,
        {"layer2": "0", "layer3": "1", "layer4": "2"},
        [c5 // 4, c5 // 2, c5],
        channels,
        extra_blocks=Fp32LastLevelP6P7(channels, channels),
    )


def build_detector(
    cfg: TrainDetectorConfig, num_classes: int, load_weights: bool = True
) -> RetinaNet:
    """RetinaNet for category ids 1..``num_classes`` (K + 1 outputs, 0 = background, unused).

    Like torchvision's retinanet_resnet50_fpn (FPN P3-P7, 4-conv heads) with the FPN width,
    head norm, box loss and focal parameters from ``cfg``. ``load_weights=False`` skips
    reading ``weights_backbone`` (used when a trained state dict is loaded right after).
    """
    if num_classes < 1:
        raise StageError("the detector needs at least one class (category ids 1..K)")
    if cfg.min_size is None:
        raise ValueError("build_detector: resolve min_size to the cache image size first")
    resnet = _build_resnet(cfg, load_weights)
    backbone = fpn_backbone(resnet, trainable_layers(cfg), cfg.fpn_channels)
    anchors = AnchorGenerator(
        tuple(tuple(level) for level in cfg.anchor_sizes),
        (tuple(cfg.aspect_ratios),) * len(cfg.anchor_sizes),
    )
    n_anchors = anchors.num_anchors_per_location()[0]
    norm = partial(nn.GroupNorm, 32) if cfg.head_norm == "groupnorm" else None
    head = RetinaNetHead(backbone.out_channels, n_anchors, num_classes + 1, norm_layer=norm)
    head.classification_head = FocalClassificationHead(
        backbone.out_channels,
        n_anchors,
        num_classes + 1,
        norm_layer=norm,
        alpha=cfg.focal_alpha,
        gamma=cfg.focal_gamma,
    )
    head.regression_head._loss_type = cfg.box_loss
    model = RetinaNet(
        backbone,
        num_classes + 1,
        anchor_generator=anchors,
        head=head,
        score_thresh=cfg.score_thresh,
        nms_thresh=cfg.nms_thresh,
        detections_per_img=cfg.detections_per_img,
        fg_iou_thresh=cfg.fg_iou_thresh,
        bg_iou_thresh=cfg.bg_iou_thresh,
    )
    max_size = cfg.max_size or cfg.min_size
    model.transform = GrayTransform(cfg.min_size, max_size, _IMAGENET_MEAN, _IMAGENET_STD)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_detector(
    path: str | Path,
    model: nn.Module,
    cfg: TrainDetectorConfig,
    classes: Sequence[str],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the model file atomically (temp file + rename); plain types only (weights_only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        **(extra or {}),
        "format": FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "config": to_dict(cfg),
        "classes": list(classes),
        "num_classes": len(classes),
    }
    atomic_torch_save(payload, path)


def atomic_torch_save(payload: dict[str, Any], path: str | Path) -> None:
    """torch.save to a temp file and rename: an interrupted write never leaves a broken file."""
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)


def load_detector(path: str | Path) -> tuple[RetinaNet, TrainDetectorConfig, list[str]]:
    """(model in eval mode on CPU, its TrainDetectorConfig, class names in id order 1..K)."""
    return detector_from_checkpoint(read_checkpoint(path), path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The saved dict (state_dict, config, classes and the extra keys, e.g. image_size, resize)."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path} not found: run the train-detector stage first")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise StageError(f"{path} is not a detector saved by stages.detector.save_detector")
    return ckpt


def detector_from_checkpoint(
    ckpt: dict[str, Any], path: str | Path = "<checkpoint>"
) -> tuple[RetinaNet, TrainDetectorConfig, list[str]]:
    """``load_detector`` on a dict from ``read_checkpoint`` (callers that need its extra keys)."""
    try:
        cfg = parse(TrainDetectorConfig, ckpt["config"], f"{path}:config")
    except ConfigError as exc:
        raise StageError(f"{path}: stored config does not fit this code version: {exc}") from exc
    classes = [str(c) for c in ckpt["classes"]]
    model = build_detector(cfg, len(classes), load_weights=False)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), cfg, classes


def _as_tensor(img: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (H, W) -> float (1, H, W) in [0, 1]; float input is taken as already in [0, 1]."""
    t = (
        img if isinstance(img, torch.Tensor) else torch.from_numpy(np.array(img))
    )  # copy: memmaps are read-only
    if t.ndim == 3 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 2:
        raise ValueError(f"predict expects grayscale (H, W) images, got shape {tuple(t.shape)}")
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    return t[None]


@torch.no_grad()
def predict(
    model: nn.Module,
    images: np.ndarray | Sequence[np.ndarray | torch.Tensor],
    batch_size: int = 8,
) -> list[dict[str, np.ndarray]]:
    """Detections per image: {"boxes" float32 (K, 4) xyxy in input pixels, "scores" float32 (K,),
    "labels" int64 (K,) category ids 1..K}. ``images``: uint8 (N, H, W) array or a list of them."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[dict[str, np.ndarray]] = []
    try:
        for start in range(0, len(images), batch_size):
            batch = [_as_tensor(img).to(device) for img in images[start : start + batch_size]]
            for det in model(batch):
                # Output 0 is the never-trained background column: an untrained or barely trained
                # model can still score it above score_thresh, and it names no class.
                keep = (det["labels"] >= 1).cpu().numpy()
                out.append(
                    {
                        "boxes": det["boxes"].cpu().numpy().astype(np.float32).reshape(-1, 4)[keep],
                        "scores": det["scores"].cpu().numpy().astype(np.float32)[keep],
                        "labels": det["labels"].cpu().numpy().astype(np.int64)[keep],
                    }
                )
    finally:
        model.train(was_training)
    return out


__all__ = [
    "FocalClassificationHead",
    "GrayTransform",
    "build_detector",
    "detector_from_checkpoint",
    "fpn_backbone",
    "imagenet_weights_path",
    "load_detector",
    "predict",
    "read_checkpoint",
    "save_detector",
    "trainable_layers",
]
