"""train-classifier: fit the Keras classifier on the augment cache's train split, select on val.

Inputs:  data/augment/classification/fit/ (meta.json, policy.json, train/, val/); params
         ``train_classifier`` (``stages.classifier.config.TrainClassifierConfig``)
Outputs: models/classifier.keras + models/classifier.meta.json (class names, head, resize),
         reports/live/classifier/ (dvclive per-epoch train/val loss, accuracy, auc, and
         training.json: VALIDATION figures at the best epoch, never test)
Run:     python -m stages.train_classifier [--params params.yaml]

The core is ``stages.classifier.train.train(cfg)``; TensorFlow is imported only once the params
have parsed, so ``--help`` and a params error answer at once.
"""

from __future__ import annotations

from pathlib import Path

from stages.classifier.config import TrainClassifierConfig
from stages.common import paths
from stages.common.config import load_section
from stages.common.utils import ArgumentParser, run_cli

P = paths.CLASSIFICATION


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file")
    parser.add_argument("--cache-dir", type=Path, default=P.augment)
    parser.add_argument("--model", type=Path, default=paths.CLASSIFIER_MODEL)
    parser.add_argument("--live-dir", type=Path, default=P.live_dir)
    parser.add_argument(
        "--summary", type=Path, default=P.training, help="training summary (JSON) to write"
    )
    args = parser.parse_args(argv)
    cfg = load_section(TrainClassifierConfig, "train_classifier", args.params)
    from stages.classifier.train import train

    return train(cfg, args.cache_dir, args.model, args.live_dir, args.summary)


if __name__ == "__main__":
    run_cli(main)
