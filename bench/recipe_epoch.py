"""Seconds per training epoch of a named classifier recipe (default ``ours-kermany-best``), fed three ways.

Input:  the real Kermany train folder ``../shared/data/kermany224/train`` and its augment cache at
        the recipe's image size (built by the real download -> split -> augment stages, or
        ``--cache``); the recipe's params are params.yaml with the recipe's overrides applied as
        ``dvc exp run -S`` applies them (``stages.tools.experiments.apply_overrides``), and its
        pretrained weights must be in ``~/.keras/models`` (``python -m stages.weights <arch>``).
        (a) ours: ``stages.classifier.data.make_dataset`` over the cache with the recipe's
            augmentation policy (random blur and erasing included), mixup and class weights;
        (b) the same feed without augmentation: what the input pipeline alone costs;
        (c) the floor: the cache's train images as one in-memory float32 array.
        Same model for all (``build_model`` with the recipe's ``train_classifier`` section),
        compiled by the stage's own ``_compile``, same initial weights.
Output: s/step, images/s and s/epoch of each; the ratios (a)/(c) and (b)/(c) (target for (a):
        within 10 % of the floor, i.e. augmentation hidden behind the model's compute); JSON
        with ``--out``.
Run:    .venv/bin/python bench/recipe_epoch.py [--recipe NAME] [--cache DIR] [--steps N] [--out r.json]
        .venv/bin/python bench/recipe_epoch.py --quick

Timing as in ``train_epoch.py``: a callback stamps the end of every training step, the first
``--warmup`` steps are dropped, "s/epoch" = (train images of the cache) / (measured images/s).
Two cores run both the tf.data threads and the model, so augmentation that TO-BE hid (0.95x of
the floor, train_epoch.py) may show with a cheaper forward pass (a frozen base).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml
from _common import kermany_cache, machine, print_table, save
from input_pipeline import CLASSES, warm_page_cache
from train_epoch import EPOCH_COLUMNS, epoch_parser, floor_timed, pipeline_timed

from stages.classifier.augment import ClassificationPolicy
from stages.classifier.config import TrainClassifierConfig
from stages.classifier.data import (
    balanced_class_weights,
    encode_targets,
    load_class_split,
)
from stages.classifier.models import build_model, resolve_weights
from stages.common.config import PARAMS_FILE, parse
from stages.common.utils import StageError
from stages.tools import experiments as X


def recipe(name: str) -> tuple[TrainClassifierConfig, ClassificationPolicy, int]:
    """(train_classifier config, augmentation policy, image size) of experiment ``name``."""
    exp = X.get(name)
    if not exp.target.endswith("@classification"):
        raise SystemExit(f"{name} is not a classifier recipe (target {exp.target})")
    from stages.check_params import resolve

    base = yaml.safe_load(PARAMS_FILE.read_text())
    params = resolve(X.apply_overrides(base, X.overrides_for(name, params=base)))
    aug = params["augment.classification"]  # every section with its defaults filled in
    cfg = parse(TrainClassifierConfig, params["train_classifier"], "train_classifier")
    try:  # before the cache is built: a missing weights file is a one-line message, not a traceback
        resolve_weights(cfg.arch, cfg.weights)
    except StageError as err:
        raise SystemExit(f"error: {err}") from None
    return cfg, parse(ClassificationPolicy, aug["policy"], "policy"), int(aug["image_size"])


def compiled(cfg: TrainClassifierConfig, size: int, steps: int) -> Any:
    """The recipe's model as the stage builds and compiles it, with a fixed initialisation."""
    import keras

    from stages.classifier.train import _compile

    keras.utils.set_random_seed(0)
    model = build_model(cfg, size)
    _compile(model, cfg, "binary", len(CLASSES), steps)
    return model


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg, policy, size = recipe(args.recipe)
    bs, warmup = cfg.batch_size, 2 if args.quick else args.warmup
    want = 3 if args.quick else args.steps
    results: dict[str, Any] = {
        "machine": machine(),
        "recipe": args.recipe,
        "arch": cfg.arch,
        "weights": cfg.weights,
        "trainable_blocks": cfg.trainable_blocks,
        "image_size": size,
        "batch_size": bs,
        "warmup_steps": warmup,
    }
    rows = []
    with kermany_cache(args.cache, size, 200 if args.quick else None) as (cache, built):
        results["cache_build_seconds"] = {k: round(v, 1) for k, v in built.items()}
        warm_page_cache(Path(cache))
        split = load_class_split(cache, "train", CLASSES)
        targets = encode_targets(split.labels, "binary", len(CLASSES))
        balanced = cfg.class_weight == "balanced"
        weights = balanced_class_weights(split.labels, len(CLASSES)) if balanced else None
        n_images = len(split)
        results["train_images"] = n_images
        for label, pol, mixup in (
            ("(a) ours: tf.data + the recipe's aug", policy, cfg.mixup),
            ("(b) ours, no aug", None, 0.0),
        ):
            model = compiled(cfg, size, n_images // bs)  # the steps of an epoch: whole batches
            res = pipeline_timed(
                model, split, targets, weights, pol, mixup, bs, warmup, want, n_images
            )
            rows.append({"feed": label} | res)
        model = compiled(cfg, size, n_images // bs)
        floor = floor_timed(model, split, targets, bs, warmup, want, n_images)
        rows.append({"feed": "(c) floor: in-memory fp32 array, no aug"} | floor)
    results["rows"] = rows
    for key, row in (("aug", rows[0]), ("noaug", rows[1])):
        results[f"ratio_{key}_vs_floor_s_per_epoch"] = round(
            row["s_per_epoch"] / floor["s_per_epoch"], 3
        )
    results["targets"] = {"aug_vs_floor": "<= 1.10x"}
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = epoch_parser(__doc__)
    parser.add_argument("--recipe", default="ours-kermany-best", help="a classifier experiment")
    args = parser.parse_args(argv)
    res = run(args)
    title = f"{args.recipe}: {res['arch']}, {res['image_size']} px, batch {res['batch_size']}"
    print_table(res["rows"], EPOCH_COLUMNS, title)
    print(
        f"ours with aug / floor: {res['ratio_aug_vs_floor_s_per_epoch']}x s/epoch (target <= 1.10x)\n"
        f"ours no aug / floor:   {res['ratio_noaug_vs_floor_s_per_epoch']}x s/epoch"
    )
    save(args.out, res)
    return res


if __name__ == "__main__":
    main()
