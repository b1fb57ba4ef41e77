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
- ``bad_masks`` (segmentation): ``error`` (default: the stage stops with one line naming the file)
  or ``skip`` an image without its mask, a mask without its image, and a mask that fails the
  rules of ``stages.sources.masks`` (size, binary, empty, lung-shaped); skipped pairs are listed
  in the download report.
- ``limit``: keep at most this many images of the source (deterministic subset, quick runs).
- ``split: test``: every image of this source is a test image (an external test set, e.g. a
  second hospital or Kermany's official test folder), whatever folders it has; with
  ``split.<task>.mode: official`` the test split is exactly these images. Leakage is checked
  across sources: a train/val image whose pixels equal a test image, or whose patient id (in the
  same data set: ids are namespaced by source name; ``folder`` entries each their own) is a test
  patient, is dropped (counted).
- ``md5`` / ``sha256``: checksum of the file at ``path`` (a URL's download or a local archive);
  a cached download that fails it is fetched again.

``data.root`` (one for every task, default ``data/inputs``): the folder holding the local data
sets. Local ``path``s are relative to it (absolute ones must lie inside it), and dvc.yaml
declares it as a dependency of every ``download@<task>``, so adding, removing or changing an
image there makes the stages stale (each re-reads its own sources; an unchanged output stops the
re-run there). URLs are not under it: a download is keyed by its URL. A root holding what the
pipeline writes (``data/raw``, ``data/downloads``, ...) is refused: the stage would depend on its
own output. The schemas below carry it as ``root``, filled in from ``data.root``.

Inputs/Outputs: none (schema only; read by ``stages.download`` via ``load_data_config``). Run: no
command; tested by ``.venv/bin/python -m pytest tests/test_sources.py -q``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Literal

from stages.common import paths
from stages.common.config import ConfigError, check, get_section, optional, parse, read_params
from stages.sources.base import norm_key
from stages.sources.synthetic import (
    SyntheticClassificationConfig,
    SyntheticDetectionConfig,
    SyntheticSegmentationConfig,
)

ClassificationName = Literal[
    "synthetic", "kermany", "pneumoniamnist", "covid_radiography", "folder"
]
DetectionName = Literal["synthetic", "chestxdet10", "nih_bbox"]
SegmentationName = Literal["synthetic", "lung_masks"]

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


def _check_digest(name: str, value: str | None, length: int) -> None:
    check(
        value is None or re.fullmatch(f"[0-9a-fA-F]{{{length}}}", value) is not None,
        f"{name}: expected {length} hex digits, got {value!r}",
    )


@dataclass(frozen=True, kw_only=True)
class SourceExtras:
    """Keys every source entry may carry (see the module docstring)."""

    split: Literal["test"] | None = optional(None)
    md5: str | None = optional(None)
    sha256: str | None = optional(None)

    def _check_extras(self) -> None:
        _check_digest("md5", self.md5, 32)
        _check_digest("sha256", self.sha256, 64)


@dataclass(frozen=True)
class ClassificationSource(SourceExtras):
    name: ClassificationName
    path: str | None = optional(None)
    classes: dict[str, str] | None = optional(None)
    patient_regex: str | None = optional(None)
    limit: int | None = optional(None)
    # Store every image of this source resized to N x N (stretch) first, e.g. 28 to score a
    # PneumoniaMNIST model on other films. MedMNIST cropped each original to its central square
    # first; a copy already stretched to a square (kermany224) no longer shows where that was.
    render_size: int | None = optional(None)

    def __post_init__(self) -> None:
        self._check_extras()
        check(
            self.render_size is None or 8 <= self.render_size <= 4096,
            f"render_size: must be null or in [8, 4096], got {self.render_size}",
        )
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
class DetectionSource(SourceExtras):
    name: DetectionName
    path: str | None = optional(None)
    classes: tuple[str, ...] | None = optional(None)
    missing_images: Literal["error", "skip"] = optional("error")
    limit: int | None = optional(None)

    def __post_init__(self) -> None:
        self._check_extras()
        _check_limit(self.limit)
        _check_path(self.name, self.path)
        if self.classes is not None:
            check(len(self.classes) > 0, "classes: must not be empty (omit it to take all found)")
            check(len(set(self.classes)) == len(self.classes), "classes: names must be unique")


@dataclass(frozen=True)
class SegmentationSource(SourceExtras):
    name: SegmentationName
    path: str | None = optional(None)
    bad_masks: Literal["error", "skip"] = optional("error")
    limit: int | None = optional(None)

    def __post_init__(self) -> None:
        self._check_extras()
        _check_limit(self.limit)
        _check_path(self.name, self.path)


DEFAULT_ROOT = paths.INPUTS.as_posix() + "/<task>"  # one folder per task: chains stay apart
DEFAULT_ROOT = paths.INPUTS.as_posix()
ROOT_KEY = "data.root"
# what the pipeline writes: a data root holding one of these would depend on the stage's outputs
_WRITTEN = (paths.DOWNLOADS, paths.RAW, paths.SPLIT, paths.AUGMENT, paths.MODELS, paths.METRICS)


def _check_root(root: str) -> None:
    check(bool(str(root).strip()), f"root: must name a folder (default {DEFAULT_ROOT})")
    if os.path.isabs(root):
        return
    norm = os.path.normpath(root)
    for written in (w.as_posix() for w in _WRITTEN):
        common = "." if norm == "." else os.path.commonpath([norm, written])
        check(
            common not in (norm, written),
            f"root: {root!r} overlaps {written}, which the pipeline writes (the download stage "
            f"would depend on its own outputs); use a folder of its own (default {DEFAULT_ROOT})",
        )


@dataclass(frozen=True)
class ClassificationData:
    root: str = DEFAULT_ROOT  # data.root (filled in by data_section)
    # synthetic | kermany | pneumoniamnist | covid_radiography | folder
    source: ClassificationName = "synthetic"
    # folder or archive (.zip/.tar.gz) under data.root, or an http(s) URL; null = source default
    # (pneumoniamnist: MedMNIST's own file, zenodo record 10519652)
    path: str | None = None
    # {category: label}: the categories taken and their output labels (others skipped, counted)
    classes: dict[str, str] | None = optional(None)
    patient_regex: str | None = optional(None)  # folder only: patient id from the file name
    limit: int | None = optional(None)  # at most this many images of the source (quick runs)
    md5: str | None = optional(None)  # checksum of the file at path (a download or an archive)
    sha256: str | None = optional(None)  # checksum of the file at path
    # several sources merged into one manifest, used instead of source/path when not empty:
    # [{name, path, classes, patient_regex, limit, md5, sha256, split: test, render_size}, ...]
    # (split: test = an external test set; see the module docstring)
    sources: tuple[ClassificationSource, ...] = ()
    synthetic: SyntheticClassificationConfig = field(default_factory=SyntheticClassificationConfig)

    def __post_init__(self) -> None:
        _check_root(self.root)
        extras = [
            k
            for k in ("classes", "patient_regex", "limit", "md5", "sha256")
            if getattr(self, k) is not None
        ]
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
                name=self.source,
                path=self.path,
                classes=self.classes,
                patient_regex=self.patient_regex,
                limit=self.limit,
                md5=self.md5,
                sha256=self.sha256,
            ),
        )


@dataclass(frozen=True)
class DetectionData:
    root: str = DEFAULT_ROOT  # data.root (filled in by data_section)
    source: DetectionName = "synthetic"  # synthetic | chestxdet10 | nih_bbox
    path: str | None = None  # folder or archive under data.root, or an http(s) URL
    # fixed category list (order = category ids); a box of another class stops the run
    # (null = the sorted union of the classes found)
    classes: tuple[str, ...] | None = optional(None)
    # error | skip images named in the annotations but absent on disk (listed in report.json);
    # ../shared/data's chestxdet10 and nih14_bbox hold only a few of their images: use skip
    missing_images: Literal["error", "skip"] = optional("error")
    limit: int | None = optional(None)  # at most this many images of the source (quick runs)
    md5: str | None = optional(None)  # checksum of the file at path (a download or an archive)
    sha256: str | None = optional(None)  # checksum of the file at path
    # several sources merged into one manifest: [{name, path, classes, missing_images, limit,
    # md5, sha256, split: test}, ...], used instead of source/path when not empty
    sources: tuple[DetectionSource, ...] = ()
    synthetic: SyntheticDetectionConfig = field(default_factory=SyntheticDetectionConfig)

    def __post_init__(self) -> None:
        _check_root(self.root)
        extras = [k for k in ("classes", "limit", "md5", "sha256") if getattr(self, k) is not None]
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
            DetectionSource(
                name=self.source,
                path=self.path,
                classes=self.classes,
                missing_images=self.missing_images,
                limit=self.limit,
                md5=self.md5,
                sha256=self.sha256,
            ),
        )


@dataclass(frozen=True)
class SegmentationData:
    root: str = DEFAULT_ROOT  # data.root (filled in by data_section)
    source: SegmentationName = "synthetic"  # synthetic | lung_masks
    path: str | None = None  # folder (images/ + masks/) or archive under data.root
    # error | skip: a bad mask (missing, another size, not binary, empty, no lungs) stops the
    # stage naming the file, or (skip) the pair is left out and listed in report.json
    bad_masks: Literal["error", "skip"] = optional("error")
    limit: int | None = optional(None)  # at most this many images of the source (quick runs)
    md5: str | None = optional(None)  # checksum of the file at path (a download or an archive)
    sha256: str | None = optional(None)  # checksum of the file at path
    # several sources merged into one manifest: [{name, path, bad_masks, limit, split: test}, ...]
    # (split: test = an external test set, e.g. lung_masks_external), used instead of source/path
    sources: tuple[SegmentationSource, ...] = ()
    synthetic: SyntheticSegmentationConfig = field(default_factory=SyntheticSegmentationConfig)

    def __post_init__(self) -> None:
        _check_root(self.root)
        extras = [k for k in ("limit", "md5", "sha256") if getattr(self, k) is not None]
        if self.bad_masks != "error":
            extras.append("bad_masks")
        check(
            not (self.sources and extras),
            f"{', '.join(extras)}: with a 'sources' list put these keys inside its entries",
        )
        if not self.sources:
            self.effective_sources()

    def effective_sources(self) -> tuple[SegmentationSource, ...]:
        if self.sources:
            return self.sources
        return (
            SegmentationSource(
                name=self.source,
                path=self.path,
                bad_masks=self.bad_masks,
                limit=self.limit,
                md5=self.md5,
                sha256=self.sha256,
            ),
        )


DataConfig = ClassificationData | DetectionData | SegmentationData
SCHEMAS: dict[str, type] = {
    "classification": ClassificationData,
    "detection": DetectionData,
    "segmentation": SegmentationData,
}


def data_section(params: dict, task: str) -> dict:
    """``data.<task>`` with ``root`` taken from ``data.root`` (the one data folder)."""
    section = get_section(params, f"data.{task}")
    if not isinstance(section, dict):
        raise ConfigError(f"data.{task}: expected a mapping, got {section!r}")
    if "root" in section:
        raise ConfigError(f"data.{task}.root: the data folder is {ROOT_KEY}, one for every task")
    data = get_section(params, "data")
    return {**section, "root": data.get("root", DEFAULT_ROOT)}


def load_data_config(task: str, params_path: str = "params.yaml") -> DataConfig:
    """Parse ``data.<task>`` (and ``data.root``) of the params file (ConfigError on any unknown
    key or value)."""
    return parse(SCHEMAS[task], data_section(read_params(params_path), task), f"data.{task}")
