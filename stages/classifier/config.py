"""The ``train_classifier`` params schema and the head/loss rules, importable without TensorFlow.

Input: the ``train_classifier`` section of params.yaml (parsed by ``stages.common.config``).
Output: a frozen ``TrainClassifierConfig``; ``head_encoding`` tells how labels are encoded for
a head/loss pair, or refuses a pair that cannot learn. No run command of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from stages.common.cache import AugmentConfig
from stages.common.config import check
from stages.common.lungs import LungsConfig

Arch = Literal[
    "as_is",
    "to_be",
    "cnn5",
    "seed001",
    "vgg16",
    "resnet_small",
    "resnet50v2",
    "densenet121",
    "efficientnetb0",
    "efficientnet_lite0",
    "efficientnet_lite2",
]
Encoding = Literal["binary", "onehot"]
# keras.applications bases (grayscale repeated to RGB inside the model); the rest are our own.
APPLICATION_ARCHS = (
    "vgg16",
    "resnet50v2",
    "densenet121",
    "efficientnetb0",
    "efficientnet_lite0",
    "efficientnet_lite2",
)
# Default rate of every dropout slot, in model order; ``dropout`` overrides them one by one.
# 0.0 = no Dropout layer. to_be's middle slot is empty so that seed 002's "0.4/0.25/0.5" row
# (the AS-IS rates) can be applied to the TO-BE network.
DROPOUT_SLOTS: dict[str, tuple[float, ...]] = {
    "as_is": (0.4, 0.25, 0.5),
    "to_be": (0.4, 0.0, 0.5),
    "cnn5": (0.2, 0.5, 0.5),  # block 4, hidden Dense 512, hidden Dense 128
    "seed001": (0.2, 0.2, 0.7, 0.5, 0.3),  # blocks 4-5, hidden Dense 512/128/64
    "vgg16": (0.0,),  # before the head (seed 003 has none)
    "resnet_small": (0.3,),
    "resnet50v2": (0.3,),
    "densenet121": (0.3,),
    "efficientnetb0": (0.3,),
    "efficientnet_lite0": (0.2,),  # the Lite models' own rates
    "efficientnet_lite2": (0.3,),
}


@dataclass(frozen=True)
class HeadConfig:
    """The output layer: ``units`` Dense units with ``activation`` (probabilities out)."""

    activation: Literal["softmax", "sigmoid"] = "sigmoid"  # sigmoid | softmax
    units: int = 1  # 1 (binary, sigmoid only) or one per class

    def __post_init__(self) -> None:
        check(self.units >= 1, f"head.units must be >= 1, got {self.units}")


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """Stop when ``monitor`` has not improved for ``patience`` epochs (null = never stop early).

    The best epoch by ``monitor`` is restored at the end either way.
    """

    # val_loss | val_accuracy | val_auc (the best epoch is restored)
    monitor: Literal["val_loss", "val_accuracy", "val_auc"] = "val_loss"
    patience: int | None = 4  # null = never stop early
    mode: Literal["auto", "min", "max"] = "auto"  # auto (min for val_loss, else max) | min | max

    def __post_init__(self) -> None:
        check(self.patience is None or self.patience >= 0, "early_stopping.patience must be >= 0")
        natural = "min" if self.monitor == "val_loss" else "max"
        check(
            self.mode in ("auto", natural),
            f"early_stopping.mode {self.mode!r} with monitor {self.monitor!r} would keep the "
            f"worst epoch; use 'auto' or {natural!r}",
        )

    @property
    def resolved_mode(self) -> Literal["min", "max"]:
        return "min" if self.monitor == "val_loss" else "max"


@dataclass(frozen=True)
class TrainClassifierConfig:
    # Architecture: as_is | to_be (seed 002) | cnn5 (seed 000) | seed001 | vgg16 (seed 003) |
    # resnet_small (our compact ResNet, from scratch) | resnet50v2 | densenet121 | efficientnetb0 |
    # efficientnet_lite0 | efficientnet_lite2 (our Keras ports; ImageNet weights: python -m
    # stages.weights <arch>)
    arch: Arch = "to_be"
    # none | imagenet | path to a weights file of the keras.applications base alone
    # (include_top=False), e.g. the notop .h5 downloaded elsewhere. Only for APPLICATION_ARCHS.
    weights: str = "none"
    # Pretrained bases only: null = whole base trainable, 0 = frozen, N = last N blocks trainable.
    trainable_blocks: int | None = None
    head: HeadConfig = field(default_factory=HeadConfig)
    # binary_crossentropy | categorical_crossentropy (of the head's probabilities: softmax + binary
    # and sigmoid + categorical are scored as named, not on the logits as Keras 3 would)
    loss: Literal["binary_crossentropy", "categorical_crossentropy"] = "binary_crossentropy"
    label_smoothing: float = 0.0  # label smoothing of the targets, in [0, 0.5)
    optimizer: Literal["adam", "rmsprop", "sgd"] = "adam"  # adam | rmsprop | sgd
    learning_rate: float = 1e-3  # of the optimizer (the peak of a schedule)
    momentum: float = 0.9  # sgd only (Nesterov)
    weight_decay: float = 0.0  # decoupled weight decay; 0 = off
    # constant | cosine | plateau (halve on early_stopping.monitor stalls)
    lr_schedule: Literal["constant", "cosine", "plateau"] = "constant"
    epochs: int = 15  # at most (early stopping may end sooner)
    batch_size: int = 32  # per replica; the global batch is this x the strategy's replicas
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    class_weight: Literal["none", "balanced"] = "balanced"  # none | balanced
    augmentation: bool = True  # on-the-fly, policy from augment.classification (policy.json)
    # null = the architecture's own rates (DROPOUT_SLOTS); else one rate per slot.
    dropout: tuple[float, ...] | None = None
    # Class names in output order (null = meta.json's classes); rows of other classes are dropped.
    classes: tuple[str, ...] | None = None
    # Merge/rename before selecting: "LABEL" or "LABEL/subtype" -> class name (the more specific
    # key wins), e.g. {PNEUMONIA/bacteria: BACTERIA, PNEUMONIA/virus: VIRUS}.
    class_map: dict[str, str] = field(default_factory=dict)
    # default | mirrored | multi_worker (TF_CONFIG)
    strategy: Literal["default", "mirrored", "multi_worker"] = "default"
    # Weight EMA: 0 = off, else the momentum (e.g. 0.99) of an exponential moving average of the
    # weights; validation, the best-epoch choice and the saved model use the averaged weights.
    ema: float = 0.0
    # mixup (Zhang et al. 2018): 0 = off, else alpha of the Beta(alpha, alpha) mixing weight of
    # pairs of training images and their targets (and class weights) within a batch.
    mixup: float = 0.0
    # "precise BN": before each validation, BatchNorm statistics re-estimated over this many
    # training batches with the current weights (0 = off; no effect on BN-free archs like to_be)
    bn_recalibration: int = 50
    # Fixed Gaussian low-pass of the input, sigma in px (0 = off), inside the model so serving
    # filters alike: fine texture (train's normal films are sharper) stops being a class cue.
    input_blur: float = 0.0
    seed: int = 42  # training seed (weights, shuffling, augmentation draws)
    threads: int = 0  # 0 = all usable cores

    def __post_init__(self) -> None:
        check(0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}")
        check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.threads >= 0, f"threads must be >= 0 (0 = all usable cores), got {self.threads}")
        check(0 <= self.label_smoothing < 0.5, "label_smoothing must be in [0, 0.5)")
        check(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(
            self.ema == 0 or 0.5 <= self.ema < 1,
            f"ema must be 0 (off) or in [0.5, 1), got {self.ema}",
        )
        check(0 <= self.mixup <= 2, f"mixup must be in [0, 2] (0 = off), got {self.mixup}")
        check(self.bn_recalibration >= 0, "bn_recalibration must be >= 0 (0 = off)")
        check(
            0 <= self.input_blur <= 8,
            f"input_blur is a sigma in px: 0 (off) to 8, got {self.input_blur}",
        )
        slots = DROPOUT_SLOTS[self.arch]
        if self.dropout is not None:
            check(
                len(self.dropout) == len(slots),
                f"dropout: {self.arch} has {len(slots)} dropout slot(s) (defaults "
                f"{list(slots)}), got {len(self.dropout)} rate(s)",
            )
            check(all(0 <= r < 1 for r in self.dropout), "dropout rates must be in [0, 1)")
        if self.arch not in APPLICATION_ARCHS:
            check(
                self.weights == "none",
                f"weights {self.weights!r}: {self.arch} is trained from scratch; weights apply "
                f"to {', '.join(APPLICATION_ARCHS)}",
            )
            check(
                self.trainable_blocks is None,
                f"trainable_blocks applies to {', '.join(APPLICATION_ARCHS)}, not {self.arch}",
            )
        check(
            self.trainable_blocks is None or self.trainable_blocks >= 0,
            "trainable_blocks must be null (all) or >= 0",
        )
        check(
            not (self.weights == "none" and self.trainable_blocks is not None),
            "trainable_blocks freezes part of the base, but weights is 'none': a frozen random "
            "base cannot learn features. Use trainable_blocks: null, or pretrained weights",
        )
        if self.classes is not None:
            check(len(set(self.classes)) == len(self.classes), f"classes repeat: {self.classes}")
            check(len(self.classes) >= 2, f"classes: need at least 2, got {list(self.classes)}")
        check(
            not self.class_map or self.classes is not None,
            "class_map needs an explicit classes list (the output order of the merged classes)",
        )
        n = len(self.classes) if self.classes is not None else None
        head_encoding(self.head.activation, self.head.units, self.loss, n)

    @property
    def dropout_rates(self) -> tuple[float, ...]:
        return self.dropout if self.dropout is not None else DROPOUT_SLOTS[self.arch]


def head_encoding(activation: str, units: int, loss: str, n_classes: int | None) -> Encoding:
    """Label encoding for a head/loss pair: "binary" (0/1 per row) or "onehot" (N columns).

    Raises ValueError explaining why a combination cannot learn. ``n_classes`` None checks
    only the rules that do not depend on the data.
    """
    if units == 1:
        if activation == "softmax":
            raise ValueError(
                "head: softmax over 1 unit always outputs 1.0, so the model cannot learn. "
                "Use sigmoid with 1 unit (binary) or softmax with one unit per class"
            )
        if loss == "categorical_crossentropy":
            raise ValueError(
                "head/loss: categorical cross-entropy over 1 unit normalises the single "
                "prediction to 1, so the loss is always 0 and nothing is learned. Use "
                "binary_crossentropy with 1 sigmoid unit, or one unit per class"
            )
        if n_classes is not None and n_classes != 2:
            raise ValueError(
                f"head: 1 unit encodes exactly 2 classes (P(second class)), but there are "
                f"{n_classes}; set head.units to {n_classes}"
            )
        return "binary"
    if n_classes is not None and units != n_classes:
        raise ValueError(
            f"head: {units} units for {n_classes} classes; use one unit per class "
            f"(head.units: {n_classes}), or 1 sigmoid unit for 2 classes"
        )
    if activation == "softmax" and loss == "binary_crossentropy" and units > 2:
        raise ValueError(
            f"head/loss: binary cross-entropy scores each of the {units} softmax outputs as an "
            "independent yes/no, but softmax classes are mutually exclusive; use "
            "categorical_crossentropy (or sigmoid units for one-vs-rest)"
        )
    return "onehot"


@dataclass(frozen=True)
class EvalClassificationConfig:
    """``evaluate.classification``; see params.yaml for the meaning of each key."""

    # chosen on VAL only: youden (max sens+spec-1) | sensitivity (highest val score reaching
    # target_sensitivity) | specificity (lowest val score keeping target_specificity); set midway to
    # the next val score
    threshold: Literal["youden", "sensitivity", "specificity"] = "youden"
    target_sensitivity: float = 0.95  # used when threshold: sensitivity
    target_specificity: float = 0.95  # used when threshold: specificity
    # a class name, or a list (e.g. [BACTERIA, VIRUS, COVID]) = positive vs rest
    positive_class: str | tuple[str, ...] = "PNEUMONIA"
    # stratified percentile bootstrap resamples for accuracy/ROC-AUC CIs (0 = none)
    bootstrap: int = 1000
    ci: float = 0.95  # coverage of the bootstrap intervals
    seed: int = 0  # seed of the bootstrap
    n_samples_grid: int = 16  # test images in reports/classifier/samples.png
    n_gradcam: int = 8  # Grad-CAM cases (TP/FP/FN mix) in reports/classifier/gradcam.png
    batch_size: int = 64  # images per prediction batch
    # Test-time augmentation: mean probability of each image and its mirror image (val and test
    # alike, so the threshold is chosen on what is scored). Serving applies the same.
    tta: Literal["none", "hflip"] = "none"
    # temperature: one scalar T fitted on validation (NLL), probabilities softmax(log p / T).
    calibration: Literal["none", "temperature"] = "none"

    def __post_init__(self) -> None:
        check(0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}")
        check(0.0 < self.target_sensitivity <= 1.0, "target_sensitivity: must be in (0, 1]")
        check(0.0 < self.target_specificity <= 1.0, "target_specificity: must be in (0, 1]")
        check(self.bootstrap >= 0, "bootstrap: resamples must be >= 0 (0 = no intervals)")
        check(0.0 < self.ci < 1.0, "ci: must be in (0, 1), e.g. 0.95")
        check(self.n_samples_grid >= 0 and self.n_gradcam >= 0, "n_samples_grid/n_gradcam: >= 0")
        check(self.batch_size >= 1, "batch_size: must be >= 1")
        check(len(self.positives) >= 1, "positive_class: give a class name or a list of names")

    @property
    def positives(self) -> tuple[str, ...]:
        pc = self.positive_class
        return (pc,) if isinstance(pc, str) else tuple(pc)


@dataclass(frozen=True)
class ClassificationPolicy:
    """Ranges of the random transforms; every draw is uniform in [-x, x] (zoom: 1 +- x).

    rotation: degrees. zoom: relative scale (0.2 -> 0.8..1.2, > 1 zooms out). shear: shear
    factor x += s*y (tan of the angle, as keras RandomShear; ImageDataGenerator's shear_range
    was in degrees, so seed 002's "0.2" was almost no shear). shift: fraction of width/height.
    brightness: additive, fraction of 255. contrast: factor 1 +- x around each image's mean.
    Photometric, for robustness to other machines' exposure and processing (0 = off): gamma:
    exponent exp(U(-g, g)) on the [0, 1] intensities; blur: a 3x3 Gaussian blend of weight
    U(0, x); noise: Gaussian noise of sd U(0, x) x 255; erase: with probability 0.5 one square of
    U(0.1, x) of the area filled with the image mean (random erasing, against shortcut marks).
    aspect: horizontal scale exp(U(-x, x)) on top of zoom (the width alone stretched or squeezed):
    against an aspect-ratio shortcut, e.g. Kermany's 224 px copy squeezed every film to a square,
    and its pneumonia films were wider originals than its normal ones.
    """

    rotation: float = 10.0  # degrees
    zoom: float = 0.2  # scale 1 +- zoom
    shear: float = 0.2  # shear factor (tan); ImageDataGenerator's shear_range was degrees
    shift: float = 0.1  # fraction of width / height
    # Flipping a chest X-ray puts the heart on the wrong side (dextrocardia look-alike); the seeds
    # flipped anyway and pneumonia cues are roughly symmetric, so it stays on by default.
    hflip: bool = True
    brightness: float = 0.1  # additive, fraction of 255
    contrast: float = 0.1  # factor 1 +- contrast around the image mean
    # "nearest" repeats the border instead of adding black corners a model could learn to use.
    fill_mode: Literal["nearest", "constant"] = "nearest"
    # photometric, for other machines' exposure (0 = off): gamma exponent exp(U(-x, x))
    gamma: float = 0.0
    blur: float = 0.0  # 3x3 Gaussian blend weight U(0, x)
    noise: float = 0.0  # Gaussian noise sd U(0, x) x 255
    erase: float = 0.0  # random erasing: one square of U(0.1, x) of the area in half the images
    # width alone scaled by exp(U(-x, x)), against an aspect-ratio shortcut
    # (reports/generalization.md 2h)
    aspect: float = 0.0

    def __post_init__(self) -> None:
        check(
            0 <= self.rotation <= 180, f"rotation must be in [0, 180] degrees, got {self.rotation}"
        )
        check(0 <= self.gamma <= 1, f"gamma must be in [0, 1], got {self.gamma}")
        check(0 <= self.blur <= 1, f"blur must be in [0, 1], got {self.blur}")
        check(0 <= self.noise <= 0.2, f"noise must be in [0, 0.2], got {self.noise}")
        check(
            self.erase == 0 or 0.1 < self.erase <= 0.5,
            f"erase must be 0 or in (0.1, 0.5], got {self.erase}",
        )
        check(0 <= self.zoom < 1, f"zoom must be in [0, 1), got {self.zoom}")
        check(0 <= self.aspect <= 0.5, f"aspect must be in [0, 0.5], got {self.aspect}")
        check(0 <= self.shear <= 1, f"shear must be in [0, 1], got {self.shear}")
        check(0 <= self.shift <= 0.5, f"shift must be in [0, 0.5], got {self.shift}")
        check(0 <= self.brightness <= 1, f"brightness must be in [0, 1], got {self.brightness}")
        check(0 <= self.contrast < 1, f"contrast must be in [0, 1), got {self.contrast}")

    @property
    def geometric(self) -> bool:
        return any((self.rotation, self.zoom, self.shear, self.shift, self.aspect))

    @property
    def active(self) -> bool:
        """False when every transform is off (the augmenter returns its input)."""
        photometric = (
            self.brightness,
            self.contrast,
            self.gamma,
            self.blur,
            self.noise,
            self.erase,
        )
        return self.geometric or self.hflip or any(photometric)


@dataclass(frozen=True)
class ClassificationAugmentConfig(AugmentConfig, LungsConfig):
    """``augment.classification``: the cache geometry, the lungs (``stages.common.lungs``: none |
    crop | mask, applied before resizing) and the training augmentation policy."""

    image_size: int = 128  # px of the square cache images the classifier sees
    # stretch (the seeds' target_size) | pad (keep the aspect ratio)
    resize: Literal["stretch", "pad"] = "stretch"
    policy: ClassificationPolicy = field(default_factory=ClassificationPolicy)

    def __post_init__(self) -> None:
        AugmentConfig.__post_init__(self)
        LungsConfig.__post_init__(self)


AUGMENT_CONFIG = (
    ClassificationAugmentConfig  # the augment.<task> section (stages.augment loads it by task)
)
EVALUATE_CONFIG = EvalClassificationConfig  # the evaluate.<task> section
TRAIN_CONFIG = TrainClassifierConfig  # the train_classifier section

__all__ = [
    "APPLICATION_ARCHS",
    "EvalClassificationConfig",
    "DROPOUT_SLOTS",
    "EarlyStoppingConfig",
    "HeadConfig",
    "TrainClassifierConfig",
    "head_encoding",
]
