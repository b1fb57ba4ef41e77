"""evaluate@<task>: score the trained model on the held-out TEST split of its task.

Inputs:  data/augment/<task>/ (val + test caches), models/classifier.keras | models/detector.pt |
         models/segmenter.pt, metrics/train_<model>.json (the training run, for the model card);
         params ``evaluate.<task>``
Outputs: metrics/<classifier|detector|segmenter>.json (the headline figures `dvc exp show`
         compares), reports/<classifier|detector|segmenter>/ (the full evaluation json, plots,
         figures, model card)
Run:     python -m stages.evaluate --task classification   (or --task detection|segmentation)
         python -m stages.evaluate --task classification --model a.keras --model b.keras
             scores the mean probability of several classifiers as one model (an ensemble)

The halves live in stages.classifier.evaluate, stages.detector.evaluate and
stages.segmenter.evaluate; each reads only its own params section (evaluate.<task>), so the
chains stay independent in DVC. Frameworks load only after the params have parsed.
"""

from __future__ import annotations

from pathlib import Path

from stages.common import paths
from stages.common.config import load_section
from stages.common.utils import run_cli, task_arg_parser, task_module


def evaluate(
    task: str, params_path: str | Path = "params.yaml", models: list[Path] | None = None
) -> dict:
    p = paths.task_paths(task)
    schema = task_module(task, "config").EVALUATE_CONFIG
    cfg = load_section(schema, f"evaluate.{task}", params_path)
    half = task_module(task, "evaluate")  # the other task's package is never imported
    # the classifier's cam_in_lungs reads the test films' lungs (lungs@classification)
    meter = {"lungs_meter": p.lungs_meter} if task == "classification" else {}
    return half.run(
        cfg,
        cache_dir=p.augment,
        model_paths=models or [p.model],
        metrics_path=p.metrics,
        report_dir=p.report_dir,
        training_path=p.training,
        **meter,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = task_arg_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        type=Path,
        action="append",
        dest="models",
        help="model file to score (repeat for an ensemble; default: the pipeline's model)",
    )
    args = parser.parse_args(argv)
    return evaluate(args.task, args.params, args.models)


if __name__ == "__main__":
    run_cli(main)
