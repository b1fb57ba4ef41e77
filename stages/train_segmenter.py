"""train-segmenter: a MONAI U-Net on the segmentation augment cache, best epoch by val Dice.

Inputs:  data/augment/segmentation/{meta.json, policy.json, train/, val/}; params
         ``train_segmenter`` (``stages.segmenter.config.TrainSegmenterConfig``)
Outputs: models/segmenter.pt (the best epoch by validation Dice, with its config and the cache
         geometry), the training summary json (``--metrics``; validation figures),
         reports/live/segmenter/ (dvclive, with the whole summary as training.json) and
         models/segmenter_ckpt/ (resume checkpoints while a run is unfinished; ``persist: true``
         in dvc.yaml so an interrupted ``dvc repro`` continues where it stopped)
Run:     python -m stages.train_segmenter [--params params.yaml]

The core is ``stages.segmenter.train.train``; torch and MONAI are imported only once the params
have parsed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stages.common import paths
from stages.common.config import load_section
from stages.common.utils import run_cli
from stages.segmenter.config import TrainSegmenterConfig

P = paths.SEGMENTATION


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file")
    parser.add_argument("--cache", type=Path, default=P.augment, help="augment cache dir")
    parser.add_argument("--model", type=Path, default=paths.SEGMENTER_MODEL, help="model file")
    parser.add_argument(
        "--metrics", type=Path, default=P.train_metrics, help="training summary json (val figures)"
    )
    parser.add_argument("--live", type=Path, default=P.live_dir, help="dvclive directory")
    parser.add_argument(
        "--checkpoint-dir", type=Path, default=paths.SEGMENTER_CHECKPOINTS, help="resume folder"
    )
    args = parser.parse_args(argv)
    cfg = load_section(TrainSegmenterConfig, "train_segmenter", args.params)
    from stages.segmenter.train import train

    return train(cfg, args.cache, args.model, args.metrics, args.live, args.checkpoint_dir)


if __name__ == "__main__":
    run_cli(main)
