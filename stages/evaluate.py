"""evaluate@<task>: score the trained model on the held-out TEST split of its task.

Inputs:  data/augment/<task>/ (val + test caches), models/classifier.keras | models/detector.pt
Outputs: metrics/classifier.json | metrics/detector.json, reports/<classifier|detector>/ (plots,
         figures, model card)
Run:     python -m stages.evaluate --task classification   (or --task detection)

The two halves live in stages.classifier.evaluate and stages.detector.evaluate; each reads only
its own params section (evaluate.classification / evaluate.detection), so the chains stay
independent in DVC.
"""

from __future__ import annotations

from pathlib import Path

from stages.config import load_section
from stages.utils import run_cli, task_arg_parser

PATHS = {
    "classification": {
        "cache_dir": Path("data/augment/classification"),
        "model_path": Path("models/classifier.keras"),
        "metrics_path": Path("metrics/classifier.json"),
        "plots_dir": Path("reports/classifier/plots"),
        "report_dir": Path("reports/classifier"),
    },
    "detection": {
        "cache_dir": Path("data/augment/detection"),
        "model_path": Path("models/detector.pt"),
        "metrics_path": Path("metrics/detector.json"),
        "plots_dir": Path("reports/detector/plots"),
        "report_dir": Path("reports/detector"),
    },
}


def evaluate(task: str, params_path: str | Path = "params.yaml") -> dict:
    if task == "classification":
        from stages.classifier import evaluate as half

        cfg = load_section(half.EvalClassificationConfig, "evaluate.classification", params_path)
    else:
        from stages.detector import evaluate as half

        cfg = load_section(half.EvalDetectionConfig, "evaluate.detection", params_path)
    return half.run(cfg, **PATHS[task])


def main(argv: list[str] | None = None) -> None:
    args = task_arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    evaluate(args.task, args.params)


if __name__ == "__main__":
    run_cli(main)
