"""Seconds per training epoch of seed 002's TO-BE CNN at 150 px, fed three ways.

Input:  the real Kermany train folder ``../shared/data/kermany224/train`` and its augment cache at
        150 px (built by the real download -> split -> augment stages, or ``--cache``).
        (a) ours: ``stages.classifier.data.make_dataset`` over the cache with seed 002's
            augmentation (shear 0.2, zoom 0.2, hflip) and balanced class weights, as the stage;
        (b) the ImageDataGenerator way: legacy ``flow_from_directory`` on the folder, same
            augmentations, fed to ``model.fit`` (Keras' default: 1 loader thread + prefetch);
        (c) the floor: the cache's train images as one in-memory float32 array, no augmentation.
        Same model for all (``stages.classifier.models.build_model``, arch to_be, 1 channel,
        rescaling inside), compiled like the train-classifier stage (Adam 1e-3, binary CE,
        accuracy + AUC), batch 32, same initial weights.
Output: s/step, images/s and s/epoch of each and the ratios ours/IDG (target <= 0.5x) and
        ours/floor (target: within 10 %); JSON with ``--out``.
Run:    .venv/bin/python bench/train_epoch.py [--cache DIR] [--steps N] [--out r.json]
        .venv/bin/python bench/train_epoch.py --quick

Timing: a callback stamps the end of every training step; the first ``--warmup`` steps (graph
tracing, XLA compilation, the loader filling its buffers) are dropped. Without ``--steps`` each
feed runs one full pass over its own data; with ``--steps N`` only N timed steps run. Either way
"s/epoch" = (images in the Kermany train folder, 5,216) / (measured images/s): one epoch over the
folder, the same number of images for the three feeds. Validation is not included.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import kermany_cache, load1, machine, print_table, save, seed002_policy
from input_pipeline import CLASSES, idg_iterator, warm_page_cache

from stages.classifier.config import TrainClassifierConfig
from stages.classifier.data import (
    balanced_class_weights,
    encode_targets,
    load_class_split,
    make_dataset,
)
from stages.classifier.models import build_model
from stages.common.config import parse

FOLDER_IMAGES = 5216  # Kermany train: 1,341 NORMAL + 3,875 PNEUMONIA


def step_timer() -> Any:
    import keras

    class StepTimer(keras.callbacks.Callback):
        """perf_counter at the end of every training step."""

        def __init__(self) -> None:
            super().__init__()
            self.stamps: list[float] = []

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.stamps.append(time.perf_counter())

    return StepTimer()


def compiled_model(size: int, seed: int = 0) -> Any:
    """TO-BE as the stage builds and compiles it (train_classifier defaults), fixed init."""
    import keras

    keras.utils.set_random_seed(seed)
    model = build_model(parse(TrainClassifierConfig, {"arch": "to_be"}), size)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
    )
    return model


def fit_timed(model: Any, data: Any, warmup: int, batch: int, epoch_images: int, **fit_kw) -> dict:
    """Fit ``model`` one 'epoch' (its length set by ``fit_kw``); images/s over the steps after
    warm-up, and s/epoch for an epoch of ``epoch_images``."""
    timer = step_timer()
    load = load1()
    model.fit(data, epochs=1, verbose=0, callbacks=[timer], **fit_kw)
    stamps = timer.stamps
    if len(stamps) < warmup + 2:
        raise RuntimeError(f"only {len(stamps)} steps ran; need more than warmup={warmup}")
    timed = len(stamps) - warmup
    seconds = stamps[-1] - stamps[warmup - 1]
    per_step = seconds / timed
    ips = batch / per_step  # every step is a whole batch (callers make sure)
    return {
        "timed_steps": timed,
        "s_per_step": round(per_step, 4),
        "images_per_s": round(ips, 1),
        "s_per_epoch": round(epoch_images / ips, 1),
        "load_1min_before": load,
    }


EPOCH_COLUMNS = [
    "feed",
    "timed_steps",
    "s_per_step",
    "images_per_s",
    "s_per_epoch",
    "load_1min_before",
]


def epoch_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options of the epoch benchmarks (this one and recipe_epoch.py)."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None, help="reuse/build the cache here")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 1 pass)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    parser.add_argument("--quick", action="store_true", help="3 timed steps, 200-image cache")
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON")
    return parser


def pipeline_timed(
    model: Any, split: Any, targets: np.ndarray, weights: np.ndarray | None, policy: Any,
    mixup: float, bs: int, warmup: int, want: int | None, epoch_images: int,
) -> dict:  # fmt: skip
    """Our feed: ``make_dataset`` over the cache (``policy`` None: no augmentation), as the
    train-classifier stage builds it; ``want`` timed steps, or one pass when None."""
    ds, steps_epoch = make_dataset(
        split, targets, bs, training=True, seed=0, class_weights=weights, policy=policy, mixup=mixup
    )
    steps = warmup + (want or steps_epoch)
    return fit_timed(model, ds, warmup, bs, epoch_images, steps_per_epoch=steps, shuffle=False)


def floor_timed(
    model: Any,
    split: Any,
    targets: np.ndarray,
    bs: int,
    warmup: int,
    want: int | None,
    epoch_images: int,
) -> dict:
    """The floor: the split's images as one float32 array in memory, no augmentation. Whole
    batches only (a partial last batch would skew the per-step time)."""
    n = bs * min(len(split) // bs, warmup + (want or len(split) // bs))
    x = np.asarray(split.images[split.rows[:n]], dtype=np.float32)[..., None]
    return fit_timed(model, x, warmup, bs, epoch_images, y=targets[:n], batch_size=bs, shuffle=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    bs, warmup = args.batch_size, 2 if args.quick else args.warmup
    want = 3 if args.quick else args.steps
    results: dict[str, Any] = {"machine": machine(), "batch_size": bs, "warmup_steps": warmup}
    rows = []
    with kermany_cache(args.cache, args.image_size, 200 if args.quick else None) as (cache, b):
        results["cache_build_seconds"] = {k: round(v, 1) for k, v in b.items()}
        warm_page_cache(Path(cache))
        split = load_class_split(cache, "train", CLASSES)
        targets = encode_targets(split.labels, "binary", len(CLASSES))
        weights = balanced_class_weights(split.labels, len(CLASSES))
        size = split.image_size
        ours = pipeline_timed(
            compiled_model(size), split, targets, weights, seed002_policy(), 0.0,
            bs, warmup, want, FOLDER_IMAGES,
        )  # fmt: skip
        rows.append({"feed": "(a) ours: tf.data + seed-002 aug"} | ours)

        it = idg_iterator(size, bs)
        warm_page_cache(Path(it.directory))
        # One pass is len(it) batches (5,216 = 163 x 32); the iterator is not repeated.
        n_idg = min(len(it), warmup + want) if want else len(it)
        idg = fit_timed(
            compiled_model(size),
            it,
            warmup,
            bs,
            FOLDER_IMAGES,
            steps_per_epoch=n_idg,
            shuffle=False,
        )
        rows.append({"feed": "(b) ImageDataGenerator + same aug"} | idg)

        floor = floor_timed(compiled_model(size), split, targets, bs, warmup, want, FOLDER_IMAGES)
        rows.append({"feed": "(c) floor: in-memory fp32 array, no aug"} | floor)
    results["rows"] = rows
    results["ratio_ours_vs_idg_s_per_epoch"] = round(ours["s_per_epoch"] / idg["s_per_epoch"], 3)
    results["ratio_ours_vs_floor_s_per_epoch"] = round(
        ours["s_per_epoch"] / floor["s_per_epoch"], 3
    )
    results["ratio_idg_vs_floor_s_per_epoch"] = round(idg["s_per_epoch"] / floor["s_per_epoch"], 3)
    results["targets"] = {"ours_vs_idg": "<= 0.5x", "ours_vs_floor": "<= 1.10x"}
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = epoch_parser(__doc__)
    parser.add_argument("--image-size", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    res = run(args)
    title = f"TO-BE training, {args.image_size} px, batch {args.batch_size}"
    print_table(res["rows"], EPOCH_COLUMNS, title)
    print(
        f"ours / ImageDataGenerator: {res['ratio_ours_vs_idg_s_per_epoch']}x s/epoch "
        "(target <= 0.5x)\n"
        f"ours / floor:              {res['ratio_ours_vs_floor_s_per_epoch']}x s/epoch "
        "(target <= 1.10x)\n"
        f"ImageDataGenerator / floor: {res['ratio_idg_vs_floor_s_per_epoch']}x s/epoch"
    )
    save(args.out, res)
    return res


if __name__ == "__main__":
    main()
