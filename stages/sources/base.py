"""Shared vocabulary of the source loaders: the record a loader yields and small path helpers.

A loader turns one resolved local folder (or file) into a list of ``Record`` objects: where the
pixels come from, where the image goes under ``data/raw/<task>/images/<source>/``, its label,
patient and (detection) boxes. Loaders only read annotations and list files; the pixels are
decoded later by ``stages.sources.intake`` (segmentation: with its mask, checked by
``stages.sources.masks``). Anything a loader leaves out on purpose (an image
named in the annotations but missing on disk, a class not selected) is noted in ``Notes`` so the
download report can list it: nothing vanishes silently.
Inputs/Outputs: none (types and helpers).
Run: no CLI; tested through tests/test_sources.py.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stages.common.utils import StageError
from stages.common.walk import FolderWalk, Skipped

# Folders that archives and desktops add next to the data; never data themselves.
JUNK_DIRS = frozenset({"__MACOSX", ".git", ".ipynb_checkpoints", "@eaDir"})


@dataclass(frozen=True)
class Box:
    """One annotated box in source pixel coordinates (x1, y1, x2, y2)."""

    category: str
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass
class Record:
    """One image as a loader found it; ``src`` (a file) or ``pixels`` (an array) holds the data."""

    rel: str  # output path below images/<source>/, suffix is replaced by .png
    label: str
    patient_id: str
    source_split: str = ""
    subtype: str = ""
    src: Path | None = None
    pixels: np.ndarray | None = None
    boxes: tuple[Box, ...] = ()
    where: str = ""  # human-readable origin for messages, e.g. "train.json record #12"
    mask: Path | None = None  # segmentation: the lung mask file of this image


@dataclass
class Context:
    """Per-source settings a loader needs besides its root folder."""

    key: str  # folder below images/ (the source name, suffixed when a name repeats)
    patient_prefix: str  # namespace of patient ids, e.g. "kermany" -> "kermany:person63"
    work_dir: Path  # where archives found inside a source may be extracted
    notes: Notes
    param: str = "data.<task>.path"  # the params key a user edits to point at this source
    # one per source: each folder listed once, links leaving the source folder refused (the
    # download stage gives it the source's root; a bare Context only guards against loops)
    walk: FolderWalk = field(default_factory=FolderWalk)

    def patient(self, pid: str) -> str:
        return f"{self.patient_prefix}:{pid}"


@dataclass
class Notes:
    """What a loader deliberately left out, for report.json."""

    missing_images: list[dict[str, str]] = field(default_factory=list)
    not_selected: Counter = field(default_factory=Counter)  # category -> images not taken
    unparsed_names: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # junk folders, unannotated files
    limited_out: int = 0
    categories: set[str] = field(default_factory=set)  # detection: every class in the annotations
    refused: list[dict[str, str]] = field(default_factory=list)  # links, unreadable folders

    def refuse(self, skipped: Skipped) -> None:
        """An entry a folder walk refused (a looping, broken or outside link, an unreadable
        folder): listed once in the report with its reason."""
        entry = {"path": skipped.path.as_posix(), "reason": skipped.reason, "detail": skipped.error}
        if entry not in self.refused:  # layout probing may list a folder more than once
            self.refused.append(entry)

    def missing_image(self, policy: str, name: str, where: str, base: Path) -> None:
        """An image the annotations name is not below ``base``: stop (``missing_images:
        error``) or list it in the report (``skip``)."""
        if policy == "error":
            raise StageError(
                f"{where}: image {name} not found below {base}; add the image, or set "
                "missing_images: skip on this source to leave such records out"
            )
        self.missing_images.append({"file": name, "record": where})

    def as_dict(self) -> dict:
        return {
            "missing_images": {"count": len(self.missing_images), "files": self.missing_images},
            "not_selected": dict(sorted(self.not_selected.items())),
            "unparsed_names": {"count": len(self.unparsed_names), "files": self.unparsed_names},
            "ignored": {"count": len(self.ignored), "paths": self.ignored},
            "refused": {
                "count": len(self.refused),
                "by_reason": dict(sorted(Counter(r["reason"] for r in self.refused).items())),
                "files": self.refused,
            },
            "left_out_by_limit": self.limited_out,
        }


def norm_key(name: str) -> str:
    """Canonical class key: 'Viral Pneumonia', 'viral-pneumonia' -> 'VIRAL_PNEUMONIA'."""
    return re.sub(r"[\s\-]+", "_", name.strip()).upper()


def _hidden_or_junk(name: str) -> bool:
    return name in JUNK_DIRS or name.startswith(".")


def iter_dirs(root: Path, ctx: Context | None = None) -> Iterator[Path]:
    """Sub-directories of ``root`` in sorted order, without junk or hidden folders.

    With ``ctx``, links that loop, are broken or leave the source folder are not taken and are
    noted in the report (``ctx.notes.refused``).
    """
    if not root.is_dir():
        return
    walk = ctx.walk if ctx is not None else FolderWalk()
    dirs, refused = walk.subdirs(root, skip=_hidden_or_junk)
    if ctx is not None:
        for skipped in refused:
            ctx.notes.refuse(skipped)
    yield from dirs


def iter_files(root: Path, ctx: Context | None = None, recursive: bool = True) -> Iterator[Path]:
    """Every regular file below ``root`` in sorted order, skipping junk folders.

    Non-image files are yielded too: the intake rejects them with a reason, so a stray file in a
    class folder shows up in the report instead of disappearing. Every folder is listed once
    (``ctx.walk``); what the walk refuses (a link loop, a broken link or one leaving the source
    folder, an unreadable folder, a pipe) and the junk folders are noted in ``ctx.notes``.
    """
    walk = ctx.walk if ctx is not None else FolderWalk()

    def prune(folder: Path) -> bool:
        if folder.name not in JUNK_DIRS:
            return False
        if ctx is not None:
            ctx.notes.ignored.append(folder.as_posix())
        return True

    for entry in walk.walk(root, prune=prune, recursive=recursive):
        if isinstance(entry, Skipped):
            if ctx is not None:
                ctx.notes.refuse(entry)
        else:
            yield entry


def child_ci(parent: Path, name: str) -> Path | None:
    """The sub-directory of ``parent`` whose normalised name equals ``name`` (case-insensitive)."""
    want = norm_key(name)
    for child in iter_dirs(parent):
        if norm_key(child.name) == want:
            return child
    return None


def find_shallowest(root: Path, is_match, max_depth: int = 4) -> Path | None:
    """Breadth-first search for the shallowest directory satisfying ``is_match``.

    Archives often wrap the data in one or two folders (Kaggle's ``chest_xray/chest_xray/``
    even holds a second copy); taking the shallowest match counts every image once.
    """
    level = [root]
    for _ in range(max_depth + 1):
        for d in level:
            if is_match(d):
                return d
        level = [c for d in level for c in iter_dirs(d)]
        if not level:
            break
    return None


def apply_limit(records: list[Record], limit: int | None, notes: Notes) -> list[Record]:
    """Keep ``limit`` records chosen by a hash of their path: deterministic and spread over classes."""
    if limit is None or len(records) <= limit:
        return records
    ranked = sorted(records, key=lambda r: hashlib.sha1(r.rel.encode()).hexdigest())
    keep = {id(r) for r in ranked[:limit]}
    notes.limited_out += len(records) - limit
    return [r for r in records if id(r) in keep]


def map_label(category: str, classes: dict[str, str], parents: Iterable[str] = ()) -> str | None:
    """Output label of a source category, or None when the mapping does not select it.

    ``parents`` are coarser categories tried next (Kermany: BACTERIA falls back to PNEUMONIA).
    """
    for key in (category, *parents):
        if key in classes:
            return classes[key]
    return None
