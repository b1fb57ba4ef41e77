"""train-<model>: fit the task's model on its augment cache's fit/ folder (train + val), keep the
best epoch by validation.

Inputs:  data/augment/<task>/fit/ (meta.json, policy.json, train/, val/: ``stages.common.cache``);
         params ``train_<model>`` (``stages.<package>.config.TRAIN_CONFIG``)
Outputs: the task's model (models/classifier.keras + its models/classifier.meta.json sidecar,
         models/detector.pt, models/segmenter.pt) and reports/live/<model>/ (dvclive's
         per-epoch curves, and training.json: VALIDATION figures at the best epoch, never test),
         both DVC-tracked, so the run cache restores the stage. The tasks that resume (detector,
         segmenter) keep checkpoints in models/<model>_ckpt/ while a run is unfinished: not a
         DVC out (git-ignored), so DVC leaves it alone and an interrupted `dvc repro` continues.
Run:     python -m stages.train --task classification|detection|segmentation [--params ...]
         torchrun --nproc_per_node N -m stages.train --task detection   (DistributedDataParallel)

The cores are ``stages.classifier.train.train`` and ``stages.detector.train.train``; only the
task's own package is imported, and its framework only once the params have parsed, so
``--help`` and a params error answer at once.
"""

from __future__ import annotations

from pathlib import Path

from stages.common import paths
from stages.common.config import load_section
from stages.common.utils import run_cli, task_arg_parser, task_module


def main(argv: list[str] | None = None) -> dict:
    parser = task_arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, help="augment cache (default: the task's)")
    parser.add_argument("--model", type=Path, help="model file to write (default: the task's)")
    parser.add_argument("--live-dir", type=Path, help="dvclive folder (default: the task's)")
    parser.add_argument("--summary", type=Path, help="training summary JSON (default: the task's)")
    parser.add_argument("--checkpoint-dir", type=Path, help="resume folder (tasks that resume)")
    args = parser.parse_args(argv)
    p = paths.task_paths(args.task)
    cfg = load_section(
        task_module(args.task, "config").TRAIN_CONFIG, f"train_{p.name}", args.params
    )
    kwargs = {
        "cache_dir": args.cache_dir or p.augment,
        "model_path": args.model or p.model,
        "live_dir": args.live_dir or p.live_dir,
        "summary_path": args.summary or p.training,
    }
    if p.checkpoints is not None:
        kwargs["checkpoint_dir"] = args.checkpoint_dir or p.checkpoints
    elif args.checkpoint_dir:
        parser.error(f"--checkpoint-dir: the {args.task} training does not resume")
    return task_module(args.task, "train").train(cfg, **kwargs)


if __name__ == "__main__":
    run_cli(main)
