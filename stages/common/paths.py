"""Where the pipeline reads and writes: the one home of every path in Python.

Inputs/outputs: none (constants and small path functions). Every stage's command-line defaults,
the served models' default locations and the tools take their paths from here; ``dvc.yaml``
declares the same paths as deps/outs (DVC needs them literally), and ``tests/test_layout.py``
fails when the two disagree. All paths are relative to the repository root, where DVC runs the
stages. No run command.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TASKS = ("classification", "detection", "segmentation")
# the model each task trains
MODEL_NAMES = {"classification": "classifier", "detection": "detector", "segmentation": "segmenter"}
SPLITS = ("train", "val", "test")

INPUTS = Path("data/inputs")  # data/inputs/<task>: the default data.<task>.root (empty folders)
DOWNLOADS = Path("data/downloads")  # fetched archives and their extractions (git-ignored)
RAW = Path("data/raw")
SPLIT = Path("data/split")
AUGMENT = Path("data/augment")
LUNGS = Path("data/lungs")  # data/lungs/<task>/{preprocess,meter}/ (stages.lungs)
LUNGS_INFO_NAME = "lungs.json"
LUNGS_BOXES_NAME = "boxes.csv"
LUNGS_MASKS_NAME = "masks"
MODELS = Path("models")
METRICS = Path("metrics")
REPORTS = Path("reports")
EVALUATION_NAME = "evaluation.json"  # inside reports/<model>/
PLOTS_NAME = "plots"  # reports/<model>/plots: the DVC plot data
TRAINING_NAME = "training.json"  # inside reports/live/<model>/
REVIEW = REPORTS / "review"  # python -m stages.review: <A>_vs_<B>.md / .html and their figures
MIXES = REPORTS / "mixes"  # python -m stages.mix: <name>.md and its ROC figure
PARAMS_REPORT = REPORTS / "params"  # check-params: the resolved params and the checked marker
RESOLVED_PARAMS_NAME = "resolved.json"
CHECKED_PARAMS_NAME = "checked.json"


@dataclass(frozen=True)
class TaskPaths:
    """The data chain of one task: download -> split -> augment -> evaluate."""

    task: str

    @property
    def raw(self) -> Path:
        return RAW / self.task

    @property
    def split(self) -> Path:
        return SPLIT / self.task

    @property
    def augment(self) -> Path:
        return AUGMENT / self.task

    @property
    def lungs(self) -> Path:
        """The segmenter's lungs of the task's films (lungs@<task>; classification only)."""
        return LUNGS / self.task

    @property
    def lungs_preprocess(self) -> Path:
        """What the cache's lung-aware preprocessing reads: constant with ``lungs: none``."""
        return self.lungs / "preprocess"

    @property
    def lungs_meter(self) -> Path:
        """The test films' lungs, always: what evaluate's cam_in_lungs measures against."""
        return self.lungs / "meter"

    @property
    def preview(self) -> Path:
        return REPORTS / "augment" / f"{self.task}_preview.png"

    @property
    def split_report(self) -> Path:
        """Counts per split and class, patients and leakage checks (git-tracked, not a metric)."""
        return REPORTS / "split" / f"{self.task}.json"

    @property
    def name(self) -> str:
        """The model's name: classifier | detector | segmenter."""
        return MODEL_NAMES[self.task]

    @property
    def metrics(self) -> Path:
        """Headline test metrics (what `dvc exp show` compares)."""
        return METRICS / f"{self.name}.json"

    @property
    def training(self) -> Path:
        """The training run's summary (validation figures at the best epoch, timings), in the
        dvclive folder: read by the model card and the tools, not a `dvc exp show` metric."""
        return self.live_dir / TRAINING_NAME

    @property
    def report_dir(self) -> Path:
        return REPORTS / self.name

    @property
    def plots_dir(self) -> Path:
        return self.report_dir / PLOTS_NAME

    @property
    def evaluation(self) -> Path:
        """Every figure of the evaluation, and (classification) the decision rule served."""
        return self.report_dir / EVALUATION_NAME

    @property
    def predictions(self) -> Path:
        """One row per test image (key, truth, the model's output; git-tracked, in the evaluate
        report folder): what a review pairs two revisions on. classifier: predictions.csv,
        detector: predictions.json, segmenter: per_image.csv (its Dice, IoU, HD95 per image)."""
        if self.task == "segmentation":
            return self.report_dir / "per_image.csv"
        suffix = "csv" if self.task == "classification" else "json"
        return self.report_dir / f"predictions.{suffix}"

    @property
    def val_predictions(self) -> Path:
        """classifier: the same table for the validation images, at the same threshold (what
        ``python -m stages.mix`` fits a mix's threshold on)."""
        return self.report_dir / "val_predictions.csv"

    @property
    def live_dir(self) -> Path:
        return REPORTS / "live" / self.name

    @property
    def model(self) -> Path:
        return MODELS / ("classifier.keras" if self.task == "classification" else f"{self.name}.pt")

    @property
    def checkpoints(self) -> Path | None:
        """Resume checkpoints of an unfinished training run (None: the task does not resume)."""
        return None if self.task == "classification" else MODELS / f"{self.name}_ckpt"


def task_paths(task: str) -> TaskPaths:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    return TaskPaths(task)


CLASSIFICATION = TaskPaths("classification")
DETECTION = TaskPaths("detection")
CLASSIFIER_MODEL = CLASSIFICATION.model
CLASSIFIER_SIDECAR = MODELS / "classifier.meta.json"  # classes, head, resize (written beside it)
DETECTOR_MODEL = DETECTION.model
DETECTOR_CHECKPOINTS = DETECTION.checkpoints  # resume checkpoints (not a DVC out)
SEGMENTATION = TaskPaths("segmentation")
SEGMENTER_MODEL = SEGMENTATION.model
SEGMENTER_CHECKPOINTS = SEGMENTATION.checkpoints  # resume checkpoints (not a DVC out)
MASKS_DIR = "masks"  # data/raw/segmentation/masks/<source>/...: the lung masks beside images/
DVC_LOCK = Path("dvc.lock")
