"""The segmenter's params schemas: ``train_segmenter``, ``augment.segmentation`` and
``evaluate.segmentation``, importable without torch.

Inputs: those sections of params.yaml. Outputs: frozen ``TrainSegmenterConfig``,
``SegmentationAugmentConfig`` (policy: ``SegmentationPolicy``) and ``EvalSegmentationConfig``.
No run command (``python -m stages.train --task segmentation`` trains).

Design decisions (relied on by ``stages.segmenter.model`` and ``stages.segmenter.predict``):
- One output channel, the lung logit; Dice + binary cross-entropy on it (MONAI's DiceCELoss).
- The model standardises every image itself (per-image mean 0, sd 1) before the network, so a
  film exposed brighter or with more contrast (another hospital) looks the same to it; callers
  always pass (N, 1, S, S) floats in [0, 1] at the cache size.
- ``unet`` is MONAI's UNet (strided convolutions, ``res_units`` residual units per level,
  instance norm: batch-size independent); ``basic_unet`` is MONAI's BasicUNet (two 3x3 convs per
  level, max-pool down, transposed-conv up; five levels, wider and slower per step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from stages.common.cache import AugmentConfig
from stages.common.config import check

Arch = Literal["unet", "basic_unet"]


@dataclass(frozen=True)
class TrainSegmenterConfig:
    # model
    arch: Arch = "unet"
    # feature maps per level, full resolution first; each level halves the size (unet: any
    # length >= 2; basic_unet: exactly 5, its last up-block takes the first again)
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    res_units: int = 2  # unet: residual units per level (0 = one plain conv per level)
    norm: Literal["instance", "batch"] = "instance"  # instance | batch
    dropout: float = 0.0  # dropout rate inside the U-Net
    # loss: dice_weight x soft Dice + bce_weight x binary cross-entropy
    dice_weight: float = 1.0
    bce_weight: float = 1.0  # loss = dice_weight x soft Dice + bce_weight x BCE
    # optimisation
    epochs: int = 7
    batch_size: int = 8  # films per step
    lr: float = 0.003  # AdamW peak learning rate (after the warm-up)
    weight_decay: float = 0.0001  # AdamW weight decay
    warmup_iters: int = 20  # linear warm-up steps
    lr_schedule: Literal["cosine", "constant"] = "cosine"  # cosine | constant
    grad_clip: float = 5.0  # max gradient L2 norm; 0 = off
    augmentation: bool = True  # the paired policy of augment.segmentation (policy.json)
    # bf16 autocast of the training forward pass (weights, optimiser and inference stay fp32).
    # auto = bf16 where the hardware has bf16 matrix units (CPU AMX / AVX512-BF16, CUDA bf16),
    # fp32 elsewhere: emulated bf16 is slower than fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # run
    seed: int = 1  # training seed (weights, shuffling, augmentation draws)
    threads: int = 0  # 0 = all usable cores

    def __post_init__(self) -> None:
        check(0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}")
        check(len(self.channels) >= 2, "channels: at least 2 levels")
        check(all(c >= 2 for c in self.channels), "channels: every level needs >= 2 feature maps")
        check(
            self.arch != "basic_unet" or len(self.channels) == 5,
            "channels: basic_unet has exactly 5 levels",
        )
        check(0 <= self.res_units <= 4, "res_units must be in 0..4")
        check(0 <= self.dropout < 1, "dropout must be in [0, 1)")
        check(self.dice_weight >= 0 and self.bce_weight >= 0, "loss weights must be >= 0")
        check(self.dice_weight + self.bce_weight > 0, "dice_weight + bce_weight must be > 0")
        check(self.epochs >= 1, "epochs must be >= 1")
        check(self.batch_size >= 1, "batch_size must be >= 1")
        check(self.lr > 0, "lr must be > 0")
        check(self.weight_decay >= 0, "weight_decay must be >= 0")
        check(self.warmup_iters >= 0, "warmup_iters must be >= 0")
        check(self.grad_clip >= 0, "grad_clip must be >= 0 (0 = off)")
        check(self.threads >= 0, "threads must be >= 0 (0 = all usable cores)")

    @property
    def depth_factor(self) -> int:
        """The cache image size must be a multiple of this (each level halves it)."""
        return 2 ** (len(self.channels) - 1)


@dataclass(frozen=True)
class EvalSegmentationConfig:
    threshold: float = 0.5  # lung where the predicted probability >= threshold
    keep_regions: int = 2  # keep the k largest connected lung regions (0 = keep all)
    bootstrap: int = 1000  # percentile bootstrap resamples of the per-image means (0 = none)
    ci: float = 0.95  # coverage of the bootstrap intervals
    n_report_images: int = 6  # best and worst k test images drawn
    batch_size: int = 16  # films per prediction batch
    seed: int = 0  # seed of the bootstrap
    threads: int = 0  # 0 = all usable cores

    def __post_init__(self) -> None:
        check(0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}")
        check(0 < self.threshold < 1, "threshold must be in (0, 1)")
        check(self.keep_regions >= 0, "keep_regions must be >= 0 (0 = keep all)")
        check(self.bootstrap >= 0, "bootstrap must be >= 0")
        check(0 < self.ci < 1, "ci must be in (0, 1)")
        check(self.n_report_images >= 0, "n_report_images must be >= 0")
        check(self.batch_size >= 1, "batch_size must be >= 1")
        check(self.threads >= 0, "threads must be >= 0 (0 = all usable cores)")


@dataclass(frozen=True)
class SegmentationPolicy:
    """Paired augmentation, drawn per image; geometry moves image and mask together, the rest
    changes the image only. Uniform draws in [-x, x] unless said otherwise.

    hflip: probability of a mirror. rotation: degrees. scale: (lo, hi) zoom factor. shift:
    fraction of the size. aspect: width alone scaled by exp(U(-x, x)) (films of other shapes
    squeezed to a square). brightness: additive, fraction of full range. contrast: factor 1 +- x
    around the image mean. gamma: exponent exp(U(-x, x)). opacity: probability of white patches
    drawn inside the lungs (consolidation, effusion: the mask keeps the whole lung). blur:
    Gaussian sigma U(0, x) px in half the images. noise: Gaussian noise sd U(0, x) of full range.
    """

    hflip: float = 0.5  # probability of a horizontal flip (image and mask)
    rotation: float = 10.0  # degrees, uniform in [-x, x]
    scale: tuple[float, float] = (0.8, 1.15)  # zoom range (below 1 shows a zero border, like pad)
    shift: float = 0.08  # fraction of the size, uniform in [-x, x]
    aspect: float = 0.15  # width alone scaled by exp(U(-x, x)) (films of other shapes)
    brightness: float = 0.1  # additive, fraction of full range
    contrast: float = 0.3  # factor 1 +- x around the mean
    gamma: float = 0.4  # exponent exp(U(-x, x))
    # probability of white patches inside the lungs (consolidation; mask unchanged)
    opacity: float = 0.3
    blur: float = 1.5  # Gaussian sigma U(0, x) px, in half the images
    noise: float = 0.03  # Gaussian noise sd U(0, x), fraction of full range

    def __post_init__(self) -> None:
        check(0 <= self.hflip <= 1, f"hflip is a probability in [0, 1], got {self.hflip}")
        check(0 <= self.rotation <= 45, f"rotation must be in [0, 45] degrees, got {self.rotation}")
        lo, hi = self.scale
        check(
            0.5 <= lo <= hi <= 2,
            f"scale must be [lo, hi] with 0.5 <= lo <= hi <= 2, got {self.scale}",
        )
        check(0 <= self.shift <= 0.3, f"shift must be in [0, 0.3], got {self.shift}")
        check(0 <= self.aspect <= 0.5, f"aspect must be in [0, 0.5], got {self.aspect}")
        check(0 <= self.brightness <= 0.5, f"brightness must be in [0, 0.5], got {self.brightness}")
        check(0 <= self.contrast < 1, f"contrast must be in [0, 1), got {self.contrast}")
        check(0 <= self.gamma <= 1, f"gamma must be in [0, 1], got {self.gamma}")
        check(0 <= self.opacity <= 1, f"opacity is a probability in [0, 1], got {self.opacity}")
        check(0 <= self.blur <= 5, f"blur must be in [0, 5] px, got {self.blur}")
        check(0 <= self.noise <= 0.2, f"noise must be in [0, 0.2], got {self.noise}")


@dataclass(frozen=True)
class SegmentationAugmentConfig(AugmentConfig):
    image_size: int = 256
    resize: Literal["stretch", "pad"] = "pad"
    policy: SegmentationPolicy = field(default_factory=SegmentationPolicy)


AUGMENT_CONFIG = SegmentationAugmentConfig  # the augment.<task> section (loaded by task)
EVALUATE_CONFIG = EvalSegmentationConfig  # the evaluate.<task> section
TRAIN_CONFIG = TrainSegmenterConfig  # the train_segmenter section

__all__ = [
    "AUGMENT_CONFIG",
    "EVALUATE_CONFIG",
    "Arch",
    "EvalSegmentationConfig",
    "SegmentationAugmentConfig",
    "SegmentationPolicy",
    "TrainSegmenterConfig",
]
