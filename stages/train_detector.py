"""train-detector: RetinaNet (torchvision) on the detection augment cache, best epoch on val.

Inputs:  data/augment/detection/fit/ (meta.json, policy.json, train/, val/); params
         ``train_detector`` (``stages.detector.config.TrainDetectorConfig``)
Outputs: models/detector.pt (the best epoch by validation mAP@0.5, with its config and classes),
         reports/live/detector/ (dvclive curves, and training.json: validation figures) and
         models/detector_ckpt/ (resume checkpoints while a run is unfinished; ``persist: true``
         in dvc.yaml so an interrupted ``dvc repro`` continues where it stopped)
Run:     python -m stages.train_detector [--params params.yaml]
         torchrun --nproc_per_node N -m stages.train_detector   (DistributedDataParallel)

The core is ``stages.detector.train.train``; torch is imported only once the params have parsed.
"""

from __future__ import annotations

from pathlib import Path

from stages.common import paths
from stages.common.config import load_section
from stages.common.utils import ArgumentParser, run_cli
from stages.detector.config import TrainDetectorConfig

P = paths.DETECTION


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file")
    parser.add_argument("--cache", type=Path, default=P.augment, help="augment cache dir")
    parser.add_argument("--model", type=Path, default=paths.DETECTOR_MODEL, help="model file")
    parser.add_argument(
        "--summary", type=Path, default=P.training, help="training summary (JSON) to write"
    )
    parser.add_argument("--live", type=Path, default=P.live_dir, help="dvclive directory")
    parser.add_argument(
        "--checkpoint-dir", type=Path, default=paths.DETECTOR_CHECKPOINTS, help="resume folder"
    )
    args = parser.parse_args(argv)
    cfg = load_section(TrainDetectorConfig, "train_detector", args.params)
    from stages.detector.train import train

    return train(cfg, args.cache, args.model, args.live, args.checkpoint_dir, args.summary)


if __name__ == "__main__":
    run_cli(main)
