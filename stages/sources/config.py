"""Schema of the ``data.<task>`` params sections read by the download stage.

One source is given by ``source`` / ``path`` (+ optional extras), several by the ``sources`` list
(each entry ``{name, path, ...extras}``), which then replaces ``source`` / ``path``. The allowed
source names differ per task; an unknown name or key stops the run naming the allowed values.

Extras of a source entry:
- ``classes`` (classification): mapping source category -> output label; categories not listed
  are not taken (counted in the report). Fixed categories: kermany/synthetic NORMAL, PNEUMONIA,
  BACTERIA, VIRUS (BACTERIA/VIRUS fall back to PNEUMONIA); pneumoniamnist NORMAL, PNEUMONIA;
  covid_radiography COVID, NORMAL, VIRAL_PNEUMONIA, LUNG_OPACITY; folder: its sub-folder names.
- ``classes`` (detection): fixed list of finding names; a box of another class is an error.
- ``patient_regex`` (folder only): regex on the file name; group ``patient`` (or group 1, or the
  whole match) is the patient id. Without it every file is its own patient.
- ``missing_images`` (detection): ``error`` (default) or ``skip`` images named in the
  annotations but absent on disk.
- ``limit``: keep at most this many images of the source (deterministic subset, quick runs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from stages.config import check, load_section
from stages.sources.base import norm_key
from stages.sources.synthetic import SyntheticClassificationConfig, SyntheticDetectionConfig

ClassificationName = Literal[
    "synthetic", "kermany", "pneumoniamnist", "covid_radiography", "folder"
]
DetectionName = Literal["synthetic", "chestxdet10", "nih_bbox"]

KERMANY_CATEGORIES = ("NORMAL", "PNEUMONIA", "BACTERIA", "VIRUS")
CATEGORIES: dict[str, tuple[str, ...]] = {
    "synthetic": KERMANY_CATEGORIES,
    "kermany": KERMANY_CATEGORIES,
    "pneumoniamnist": ("NORMAL", "PNEUMONIA"),
    "covid_radiography": ("COVID", "NORMAL", "VIRAL_PNEUMONIA", "LUNG_OPACITY"),
}
# Output labels when ``classes`` is not given. COVID-19 Radiography's folders map onto the
# Kermany vocabulary where they mean the same thing (Normal -> NORMAL, Viral Pneumonia -> VIRUS).
DEFAULT_CLASSES: dict[str, dict[str, str]] = {
    "synthetic": {"NORMAL": "NORMAL", "PNEUMONIA": "PNEUMONIA"},
    "kermany": {"NORMAL": "NORMAL", "PNEUMONIA": "PNEUMONIA"},
    "pneumoniamnist": {"NORMAL": "NORMAL", "PNEUMONIA": "PNEUMONIA"},
    "covid_radiography": {
        "COVID": "COVID",
        "NORMAL": "NORMAL",
        "VIRAL_PNEUMONIA": "VIRUS",
        "LUNG_OPACITY": "LUNG_OPACITY",
    },
}


def _check_limit(limit: int | None) -> None:
    check(limit is None or limit >= 1, f"limit: must be >= 1 or null, got {limit}")


def _check_path(name: str, path: str | None) -> None:
    check(
        name != "synthetic" or path is None,
        "path: the synthetic source generates its data (settings under 'synthetic'); use null",
    )


@dataclass(frozen=True)
class ClassificationSource:
    name: ClassificationName
    path: str | None = None
    classes: dict[str, str] | None = None
    patient_regex: str | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        _check_limit(self.limit)
        _check_path(self.name, self.path)
        if self.classes is not None:
            check(len(self.classes) > 0, "classes: must not be empty (omit it for the default)")
            allowed = CATEGORIES.get(self.name)
            for key, label in self.classes.items():
                check(bool(str(label).strip()), f"classes.{key}: label must be a non-empty string")
                check(
                    allowed is None or norm_key(key) in allowed,
                    f"classes: {key!r} is not a category of {self.name}; allowed: {', '.join(allowed or ())}",
                )
        if self.patient_regex is not None:
            check(self.name == "folder", "patient_regex: only the 'folder' source takes it")
            try:
                re.compile(self.patient_regex)
            except re.error as exc:
                raise ValueError(f"patient_regex: invalid regular expression ({exc})") from None

    def class_map(self) -> dict[str, str] | None:
        """Normalised category -> label (None: folder with every sub-folder as its own label)."""
        if self.classes is None:
            return DEFAULT_CLASSES.get(self.name)
        return {norm_key(k) if self.name != "folder" else k: v for k, v in self.classes.items()}


@dataclass(frozen=True)
class DetectionSource:
    name: DetectionName
    path: str | None = None
    classes: tuple[str, ...] | None = None
    missing_images: Literal["error", "skip"] = "error"
    limit: int | None = None

    def __post_init__(self) -> None:
        _check_limit(self.limit)
        _check_path(self.name, self.path)
        if self.classes is not None:
            check(len(self.classes) > 0, "classes: must not be empty (omit it to take all found)")
            check(len(set(self.classes)) == len(self.classes), "classes: names must be unique")


@dataclass(frozen=True)
class ClassificationData:
    source: ClassificationName = "synthetic"
    path: str | None = None
    classes: dict[str, str] | None = None
    patient_regex: str | None = None
    limit: int | None = None
    sources: tuple[ClassificationSource, ...] = ()
    synthetic: SyntheticClassificationConfig = field(default_factory=SyntheticClassificationConfig)

    def __post_init__(self) -> None:
        extras = [k for k in ("classes", "patient_regex", "limit") if getattr(self, k) is not None]
        check(
            not (self.sources and extras),
            f"{', '.join(extras)}: with a 'sources' list put these keys inside its entries",
        )
        if not self.sources:  # validates the extras against the single source
            self.effective_sources()

    def effective_sources(self) -> tuple[ClassificationSource, ...]:
        if self.sources:
            return self.sources
        return (
            ClassificationSource(
                self.source, self.path, self.classes, self.patient_regex, self.limit
            ),
        )


@dataclass(frozen=True)
class DetectionData:
    source: DetectionName = "synthetic"
    path: str | None = None
    classes: tuple[str, ...] | None = None
    missing_images: Literal["error", "skip"] = "error"
    limit: int | None = None
    sources: tuple[DetectionSource, ...] = ()
    synthetic: SyntheticDetectionConfig = field(default_factory=SyntheticDetectionConfig)

    def __post_init__(self) -> None:
        extras = [k for k in ("classes", "limit") if getattr(self, k) is not None]
        if self.missing_images != "error":
            extras.append("missing_images")
        check(
            not (self.sources and extras),
            f"{', '.join(extras)}: with a 'sources' list put these keys inside its entries",
        )
        if not self.sources:
            self.effective_sources()

    def effective_sources(self) -> tuple[DetectionSource, ...]:
        if self.sources:
            return self.sources
        return (
            DetectionSource(self.source, self.path, self.classes, self.missing_images, self.limit),
        )


DataConfig = ClassificationData | DetectionData
SCHEMAS: dict[str, type] = {"classification": ClassificationData, "detection": DetectionData}


def load_data_config(task: str, params_path: str = "params.yaml") -> DataConfig:
    """Parse ``data.<task>`` of the params file (ConfigError on any unknown key or value)."""
    return load_section(SCHEMAS[task], f"data.{task}", params_path)
