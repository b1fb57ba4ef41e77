"""Input-pipeline throughput: our tf.data pipeline over the augment cache vs ImageDataGenerator.

Input:  the real Kermany train folder ``../shared/data/kermany224/train`` (5,216 JPEGs). Ours: the
        augment cache at 150 px, built by the real download -> split (random) -> augment stages
        (or reused with ``--cache``), streamed by ``stages.classifier.data.make_dataset`` with seed
        002's augmentation (shear 0.2, zoom 0.2, horizontal flip). Baseline: Keras' legacy
        ``ImageDataGenerator.flow_from_directory`` on the same folder, same augmentations, same
        150 px grayscale batches of 32 (single thread as seed 002 ran it, and with 2 threads).
Output: images/s of each, side by side, and the ratio ours / ImageDataGenerator (target >= 5x);
        JSON with ``--out``. Only batches are produced: no model.
Run:    .venv/bin/python bench/input_pipeline.py [--cache DIR] [--out r.json]
        .venv/bin/python bench/input_pipeline.py --quick        (seconds-long smoke run)

Where ImageDataGenerator comes from: Keras 3 dropped it from the public ``keras.preprocessing``
API; the class still ships as ``keras.src.legacy.preprocessing.image.ImageDataGenerator`` and is
re-exported by the tf.keras compatibility namespace (``tf.keras.preprocessing.image``). We import
it from there, as seed 002's ``tf.keras`` code would resolve it today.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import (
    KERMANY_TRAIN,
    kermany_cache,
    load1,
    machine,
    print_table,
    save,
    seed002_policy,
    stopwatch,
)

from stages.classifier.data import (
    balanced_class_weights,
    encode_targets,
    load_class_split,
    make_dataset,
)

CLASSES = ("NORMAL", "PNEUMONIA")


def image_data_generator() -> Any:
    """The legacy class, through the tf.keras namespace (see the module docstring)."""
    import tensorflow as tf

    return tf.keras.preprocessing.image.ImageDataGenerator


def idg_iterator(size: int, batch_size: int, seed: int = 0) -> Any:
    """Seed 002's generator (shear 0.2 degrees, zoom 0.2, hflip) on the real folder.

    rescale=1/255 is left out: our models rescale inside (one multiply, not measurable here).
    Grayscale, so the batches match ours (B, S, S, 1); seed 002 decoded RGB, which costs more.
    """
    gen = image_data_generator()(shear_range=0.2, zoom_range=0.2, horizontal_flip=True)
    return gen.flow_from_directory(
        str(KERMANY_TRAIN),
        target_size=(size, size),
        color_mode="grayscale",
        class_mode="binary",
        batch_size=batch_size,
        shuffle=True,
        seed=seed,
    )


def warm_page_cache(folder: Path) -> None:
    """Read every file once so both sides read from memory, not from a cold disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            Path(root, name).read_bytes()


def time_batches(next_batch: Any, warmup: int, batches: int, threads: int = 1) -> dict[str, Any]:
    """images/s over ``batches`` calls of ``next_batch()`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        next_batch()
    load = load1()
    with stopwatch() as t:
        if threads == 1:
            images = sum(int(next_batch()[0].shape[0]) for _ in range(batches))
        else:
            with ThreadPoolExecutor(threads) as pool:
                shapes = pool.map(lambda _: int(next_batch()[0].shape[0]), range(batches))
                images = sum(shapes)
    return {
        "images": images,
        "seconds": round(t["seconds"], 3),
        "images_per_s": round(images / t["seconds"], 1),
        "load_1min_before": load,
    }


def ours(cache_dir: Path, batch_size: int, warmup: int, batches: int | None, policy) -> dict:
    split = load_class_split(cache_dir, "train", CLASSES)
    targets = encode_targets(split.labels, "binary", len(CLASSES))
    weights = balanced_class_weights(split.labels, len(CLASSES))
    ds, steps = make_dataset(
        split,
        targets,
        batch_size,
        training=True,
        seed=0,
        class_weights=weights,
        policy=policy,
    )
    it = iter(ds)
    # Three epochs by default: the batches prefetched during warm-up then weigh < 2 %.
    row = time_batches(lambda: next(it), warmup, batches or 3 * steps)
    return {**row, "n_train": len(split), "image_size": split.image_size}


def idg(size: int, batch_size: int, warmup: int, batches: int | None, threads: int) -> dict:
    it = idg_iterator(size, batch_size)
    n = batches or len(it)
    return {**time_batches(lambda: next(it), warmup, n, threads), "n_train": it.samples}


def run(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    batches = 6 if quick else args.batches
    warmup = 2 if quick else 5
    results: dict[str, Any] = {"machine": machine(), "batch_size": args.batch_size}
    with kermany_cache(args.cache, args.image_size, 200 if quick else None) as (cache_dir, build):
        results["cache_build_seconds"] = {k: round(v, 1) for k, v in build.items()}
        warm_page_cache(KERMANY_TRAIN)
        warm_page_cache(cache_dir)
        rows = [
            {"pipeline": "ours: tf.data over the cache, seed-002 aug"}
            | ours(cache_dir, args.batch_size, warmup, batches, seed002_policy()),
            {"pipeline": "ours, no augmentation"}
            | ours(cache_dir, args.batch_size, warmup, batches, None),
        ]
    rows.append(
        {"pipeline": "ImageDataGenerator, 1 thread (seed 002)"}
        | idg(args.image_size, args.batch_size, warmup, batches, 1)
    )
    rows.append(
        {"pipeline": "ImageDataGenerator, 2 threads"}
        | idg(args.image_size, args.batch_size, warmup, batches, 2)
    )
    base = rows[2]["images_per_s"]
    for r in rows:
        r["vs_idg_1_thread"] = round(r["images_per_s"] / base, 2)
    results["rows"] = rows
    ours_aug = rows[0]["images_per_s"]
    results["ratio_ours_vs_idg"] = round(ours_aug / base, 2)
    results["ratio_ours_vs_idg_2_threads"] = round(ours_aug / rows[3]["images_per_s"], 2)
    results["target"] = ">= 5x"
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None, help="reuse/build the cache here")
    parser.add_argument("--image-size", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--batches", type=int, default=None, help="default: 3 epochs (ours), 1 epoch (IDG)"
    )
    parser.add_argument("--quick", action="store_true", help="a few batches, 200-image cache")
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON")
    args = parser.parse_args(argv)
    results = run(args)
    cols = ["pipeline", "images", "seconds", "images_per_s", "vs_idg_1_thread", "load_1min_before"]
    print_table(results["rows"], cols, f"input pipeline, {args.image_size} px, batch 32, no model")
    if results["cache_build_seconds"]:
        print(f"one-off cache build (s): {results['cache_build_seconds']}")
    print(
        f"ours / ImageDataGenerator: {results['ratio_ours_vs_idg']}x "
        f"(2-thread IDG: {results['ratio_ours_vs_idg_2_threads']}x); target >= 5x"
    )
    save(args.out, results)
    return results


if __name__ == "__main__":
    main()
