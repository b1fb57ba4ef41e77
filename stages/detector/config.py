"""The detector's params schemas: ``train_detector`` (shared by model, data and engine) and
``evaluate.detection``, importable without torch.

Inputs: those sections of params.yaml. Outputs: frozen ``TrainDetectorConfig`` /
``EvalDetectionConfig``.
No run command (``python -m stages.train --task detection`` trains).

Design decisions (documented once, relied on by ``stages.detector.model``):
- Labels are the COCO category ids 1..K of the cache; the model has K + 1 sigmoid outputs and
  output 0 (background) is never a target, so predictions need no id mapping.
- Images are 1-channel; the model's transform repeats them to 3 channels before the ImageNet
  mean/std normalisation, so callers always pass (1, H, W) floats in [0, 1].
- Heads use GroupNorm(32) by default (torchvision's v2 heads): batch-size independent, which
  matters at batch 2-4 from scratch; ``head_norm: none`` gives the original (v1) heads.
- The backbone uses BatchNorm when trained from scratch (``weights_backbone: none``, all layers
  trainable) and FrozenBatchNorm with pretrained weights (torchvision's convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from stages.common.cache import AugmentConfig
from stages.common.config import check

Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet101"]


@dataclass(frozen=True)
class TrainDetectorConfig:
    # model
    backbone: Backbone = "resnet18"
    weights_backbone: str = "none"  # none | imagenet | <path to a torchvision ResNet state dict>
    trainable_backbone_layers: int = 3  # 0-5; all 5 when weights_backbone is none
    fpn_channels: int = 64  # FPN/head width (torchvision: 256); 64 is ~25 % faster at 192 px
    # groupnorm (torchvision v2 heads) | none (v1)
    head_norm: Literal["groupnorm", "none"] = "groupnorm"
    # from scratch only (pretrained backbones keep their frozen BatchNorm statistics)
    backbone_norm: Literal["batchnorm", "groupnorm"] = "batchnorm"
    box_loss: Literal["l1", "smooth_l1", "giou"] = "l1"  # l1 | smooth_l1 | giou
    focal_alpha: float = 0.25  # focal loss alpha (weight of the positives)
    focal_gamma: float = 2.0  # focal loss gamma (down-weights easy anchors)
    anchor_sizes: tuple[tuple[int, ...], ...] = (  # px per level P3..P7
        (12, 16),
        (24, 32),
        (48, 64),
        (96, 128),
        (192, 256),
    )
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # anchor height/width ratios at every level
    fg_iou_thresh: float = 0.5  # IoU at or above which an anchor is a positive
    bg_iou_thresh: float = 0.4  # IoU below which an anchor is background
    min_size: int | None = None  # null = the cache image size
    max_size: int | None = None  # null = min_size (the cache images are square)
    score_thresh: float = 0.05  # detections below this score are dropped at inference
    nms_thresh: float = 0.5  # IoU of the per-class non-maximum suppression
    detections_per_img: int = 100  # at most this many boxes per image
    # optimisation
    epochs: int = 4  # passes over the training split
    batch_size: int = 4  # per process
    lr: float = 1e-3  # peak learning rate (after the warm-up)
    optimizer: Literal["sgd", "adamw"] = "adamw"  # adamw | sgd
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-4  # AdamW / SGD weight decay
    warmup_iters: int = 30  # linear warm-up steps
    lr_schedule: Literal["cosine", "multistep"] = "cosine"  # cosine | multistep
    lr_milestones: tuple[float, ...] = (0.67, 0.89)  # multistep: fractions of all iterations
    lr_gamma: float = 0.1  # multistep factor
    grad_clip: float = 10.0  # max gradient L2 norm; 0 = off
    # bf16 autocast of the training forward pass (weights, optimiser and inference stay fp32).
    # auto = bf16 where the hardware has bf16 matrix units (CPU AMX / AVX512-BF16, CUDA bf16),
    # fp32 elsewhere: emulated bf16 is slower than fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # run
    seed: int = 4  # training seed
    threads: int = 0  # 0 = all usable cores (split between DDP processes)
    num_workers: int = 0  # DataLoader worker processes

    def __post_init__(self) -> None:
        check(0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}")
        check(0 <= self.trainable_backbone_layers <= 5, "trainable_backbone_layers must be in 0..5")
        check(
            self.fpn_channels >= 64 and self.fpn_channels % 32 == 0,
            # GroupNorm(32) needs > 1 value per group even on a 1x1 P7 map (min_size < 128)
            "fpn_channels must be a multiple of 32 and >= 64",
        )
        check(
            self.focal_alpha == -1 or 0 <= self.focal_alpha <= 1,
            "focal_alpha must be in [0, 1] (or -1 = no class weighting)",
        )
        check(self.focal_gamma >= 0, "focal_gamma must be >= 0")
        check(len(self.anchor_sizes) == 5, "anchor_sizes needs one list per FPN level P3-P7 (5)")
        check(
            len({len(s) for s in self.anchor_sizes}) == 1 and all(self.anchor_sizes),
            "anchor_sizes: every level needs the same (non-zero) number of sizes",
        )
        check(all(s > 0 for lvl in self.anchor_sizes for s in lvl), "anchor_sizes must be > 0")
        check(bool(self.aspect_ratios) and min(self.aspect_ratios) > 0, "aspect_ratios must be > 0")
        check(0 < self.bg_iou_thresh <= self.fg_iou_thresh < 1, "need 0 < bg_iou <= fg_iou < 1")
        check(self.min_size is None or self.min_size >= 32, "min_size must be >= 32 or null")
        check(self.max_size is None or self.max_size >= 32, "max_size must be >= 32 or null")
        check(0 <= self.score_thresh < 1, "score_thresh must be in [0, 1)")
        check(0 < self.nms_thresh <= 1, "nms_thresh must be in (0, 1]")
        check(self.detections_per_img >= 1, "detections_per_img must be >= 1")
        check(self.epochs >= 1, "epochs must be >= 1")
        check(self.batch_size >= 1, "batch_size must be >= 1")
        check(self.lr > 0, "lr must be > 0")
        check(self.weight_decay >= 0, "weight_decay must be >= 0")
        check(self.warmup_iters >= 0, "warmup_iters must be >= 0")
        check(all(0 < m < 1 for m in self.lr_milestones), "lr_milestones are fractions in (0, 1)")
        check(0 < self.lr_gamma <= 1, "lr_gamma must be in (0, 1]")
        check(self.grad_clip >= 0, "grad_clip must be >= 0 (0 = off)")
        check(self.threads >= 0, "threads must be >= 0 (0 = all usable cores)")
        check(self.num_workers >= 0, "num_workers must be >= 0")
        check(bool(self.weights_backbone), "weights_backbone: none | imagenet | <path>")
        check(
            self.backbone_norm == "batchnorm" or self.weights_backbone == "none",
            "backbone_norm groupnorm is for weights_backbone none (pretrained ResNets carry "
            "BatchNorm statistics)",
        )


@dataclass(frozen=True)
class EvalDetectionConfig:
    iou: float = 0.5  # FROC hit / report match threshold
    fps_per_image: tuple[float, ...] = (0.05, 0.1, 0.2)  # ChestX-Det10 operating points
    froc_max_fp: float = 8.0  # x range of the FROC plot data
    score_thresh: float = 0.3  # boxes drawn in the report and used for per-image F1
    batch_size: int = 8  # images per prediction batch
    n_report_images: int = 6  # best and worst k test images drawn
    seed: int = 4  # seed of the report's choices
    threads: int = 0  # 0 = all usable cores

    def __post_init__(self) -> None:
        check(0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}")
        check(0 < self.iou <= 1, "iou must be in (0, 1]")
        check(bool(self.fps_per_image), "fps_per_image must not be empty")
        check(all(r > 0 for r in self.fps_per_image), "fps_per_image values must be > 0")
        check(
            list(self.fps_per_image) == sorted(set(self.fps_per_image)),
            "fps_per_image must be increasing without repeats",
        )
        check(self.froc_max_fp >= max(self.fps_per_image), "froc_max_fp must be >= fps_per_image")
        check(0 <= self.score_thresh < 1, "score_thresh must be in [0, 1)")
        check(self.batch_size >= 1, "batch_size must be >= 1")
        check(self.n_report_images >= 0, "n_report_images must be >= 0")
        check(self.threads >= 0, "threads must be >= 0 (0 = all usable cores)")


@dataclass(frozen=True)
class DetectionPolicy:
    """hflip: probability of a horizontal flip. scale_jitter: (lo, hi) range of the rescale
    factor; the rescaled image is randomly cropped or zero-padded back to its size.
    brightness: additive, fraction of full range. contrast: factor 1 +- x around the mean."""

    hflip: float = 0.5  # probability
    # rescale factor range, then crop / zero-pad back to size
    scale_jitter: tuple[float, float] = (0.8, 1.2)
    brightness: float = 0.1  # additive, fraction of 255, uniform in [-x, x]
    contrast: float = 0.1  # factor 1 +- x around the image mean

    def __post_init__(self) -> None:
        check(0 <= self.hflip <= 1, f"hflip is a probability in [0, 1], got {self.hflip}")
        lo, hi = self.scale_jitter
        check(
            0 < lo <= hi <= 4,
            f"scale_jitter must be [lo, hi] with 0 < lo <= hi <= 4, got {self.scale_jitter}",
        )
        check(0 <= self.brightness <= 1, f"brightness must be in [0, 1], got {self.brightness}")
        check(0 <= self.contrast < 1, f"contrast must be in [0, 1), got {self.contrast}")


@dataclass(frozen=True)
class DetectionAugmentConfig(AugmentConfig):
    image_size: int = 192  # px of the square cache images
    resize: Literal["stretch", "pad"] = "pad"  # pad (keep the aspect ratio, zero border) | stretch
    policy: DetectionPolicy = field(default_factory=DetectionPolicy)


AUGMENT_CONFIG = (
    DetectionAugmentConfig  # the augment.<task> section (stages.augment loads it by task)
)
EVALUATE_CONFIG = EvalDetectionConfig  # the evaluate.<task> section
TRAIN_CONFIG = TrainDetectorConfig  # the train_detector section

__all__ = ["Backbone", "EvalDetectionConfig", "TrainDetectorConfig"]
