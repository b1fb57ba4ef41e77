"""A user's own ImageFolder layout: ``<root>/<class>/**/<image>`` (class = sub-folder name).

Input: the resolved folder. If its sub-folders are all named train/val/test (any casing), each is
read as an ImageFolder and its name kept as the source split (so ``mode: official`` works).
Output: records labelled by folder name, or by the ``classes`` mapping (folder -> label; folders
not listed are not taken). Patient id: each file is its own patient, unless ``patient_regex``
is given (group ``patient``, else group 1, else the whole match, searched in the file name).
Links: a link that loops, is broken or leads outside the source folder, a second way into a
folder listed already and an unreadable folder are not followed; each is listed with its reason
in the download report (``refused``). Run: no CLI; the download stage calls ``load``; tested by
tests/test_sources.py and tests/test_sources_walk.py.
"""

from __future__ import annotations

import re
from pathlib import Path

from stages.common.paths import SPLITS
from stages.common.utils import StageError
from stages.sources.base import Context, Record, iter_dirs, iter_files, norm_key


def patient_from_name(name: str, pattern: re.Pattern[str]) -> str | None:
    m = pattern.search(name)
    if m is None:
        return None
    if "patient" in pattern.groupindex:
        return m.group("patient")
    return m.group(1) if pattern.groups else m.group(0)


def _select(classes: dict[str, str] | None, folders: list[Path], where: Path) -> dict[str, str]:
    """Folder name -> label; a mapping key naming no folder is an error (typo guard)."""
    names = [f.name for f in folders]
    if classes is None:
        return {n: n for n in names}
    by_norm = {norm_key(n): n for n in names}
    out = {}
    for key, label in classes.items():
        name = key if key in names else by_norm.get(norm_key(key))
        if name is None:
            raise StageError(
                f"classes: no sub-folder {key!r} in {where} (found: {', '.join(names) or 'none'})"
            )
        out[name] = label
    return out


def load(root: Path, src, ctx: Context) -> list[Record]:
    if not root.is_dir():
        raise StageError(f"{root}: the folder source needs a directory of class sub-folders")
    pattern = re.compile(src.patient_regex) if src.patient_regex else None
    top = list(iter_dirs(root, ctx))
    if top and all(d.name.lower() in SPLITS for d in top):
        layout = [(d.name.lower(), d) for d in top]
    else:
        layout = [("", root)]
    class_dirs = {split_dir: list(iter_dirs(split_dir, ctx)) for _, split_dir in layout}
    # every class folder is read at its own place: a link into one from another is not followed
    ctx.walk.claim(d for folders in class_dirs.values() for d in folders)
    records: list[Record] = []
    for split, split_dir in layout:
        folders = class_dirs[split_dir]
        if not folders:
            raise StageError(f"{split_dir}: no class sub-folders (expected <class>/<image> files)")
        selected = _select(src.class_map(), folders, split_dir)
        # loose files beside the class folders have no class: listed, not taken
        ctx.notes.ignored.extend(p.as_posix() for p in sorted(split_dir.iterdir()) if p.is_file())
        for folder in folders:
            label = selected.get(folder.name)
            files = list(iter_files(folder, ctx))
            if label is None:
                ctx.notes.not_selected[folder.name] += len(files)
                continue
            for path in files:
                rel = path.relative_to(root).as_posix()
                patient = patient_from_name(path.name, pattern) if pattern else None
                if pattern and patient is None:
                    ctx.notes.unparsed_names.append(rel)
                records.append(
                    Record(
                        rel=rel,
                        label=label,
                        patient_id=ctx.patient(patient or Path(rel).with_suffix("").as_posix()),
                        source_split=split,
                        src=path,
                        where=rel,
                    )
                )
    return records
