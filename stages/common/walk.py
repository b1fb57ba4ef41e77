"""Listing folder trees safely: every file once, every refused entry named with its reason.

Inputs: a folder (and, for a data source, the source root that links must stay inside). Outputs:
``FolderWalk.walk`` yields the files below a folder (sorted, depth first) and a ``Skipped`` for
each entry that cannot be examined or is refused: an unreadable folder (``unreadable``), a
broken symbolic link (``broken_link``), a link loop (``link_loop``: the OS's ELOOP, or a link to a
folder the walk is inside of), a second way into a folder listed already (``already_listed``), a
link whose target lies outside the root (``outside_root``), a pipe, socket or device
(``unreadable``). Library module, no CLI; used by ``stages.serve.predict`` (inputs given on the
command line) and ``stages.sources.base`` (the download stage's folder sources); tested by
tests/test_predict_hardening.py and tests/test_sources_walk.py.

One ``FolderWalk`` remembers the folders it listed, so several walks through it (one per class
folder of a source) never list a folder twice; a link into a folder that is read at its own place
is not followed, so files keep their real path. Only entries that are links are checked against
the root (everything else below a folder inside the root is inside).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

_Key = tuple[int, int]  # (st_dev, st_ino): a folder's identity, whatever path leads to it


@dataclass(frozen=True)
class Skipped:
    """An entry that cannot be examined or is refused: listed with its reason, never dropped."""

    path: Path
    reason: str  # unreadable | broken_link | link_loop | already_listed | outside_root
    error: str

    def line(self) -> dict[str, str]:
        return {"file": str(self.path), "error": self.error, "reason": self.reason}

    @classmethod
    def from_stat_error(cls, path: Path, exc: OSError) -> Skipped:
        """What a failed ``stat`` (which follows links) of ``path`` means."""
        if path.is_symlink():
            if exc.errno == errno.ELOOP:
                return cls(path, "link_loop", f"{path}: symbolic link loop ({exc.strerror})")
            return cls(path, "broken_link", f"{path}: broken symbolic link ({exc.strerror})")
        return cls(path, "unreadable", f"{path}: cannot read ({exc.strerror or exc})")

    @classmethod
    def not_regular(cls, path: Path) -> Skipped:
        """A FIFO, socket or device: reading it could block or never end."""
        return cls(path, "unreadable", f"{path}: not a regular file (a pipe, socket or device)")


def _key(st: os.stat_result) -> _Key:
    return st.st_dev, st.st_ino


def _inside(root: str, real: str) -> bool:
    return os.path.commonpath([root, real]) == root


class FolderWalk:
    """Walks sharing one memory of the folders listed; links may not leave ``root`` (if given).

    A link to a folder that is read at its own place anyway (inside the folder being walked, or
    inside a folder ``claim``ed for a walk of its own) is not followed: its files keep their real
    path, whatever the order of the names. Other links inside ``root`` are followed once.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = os.path.realpath(root) if root is not None else None
        self._listed: set[_Key] = set()
        self._claimed: list[str] = []

    def claim(self, folders: Iterable[Path]) -> None:
        """Folders that are walked on their own (e.g. the class folders of a source): a link
        into one of them from elsewhere is refused, so its files keep their own folder."""
        self._claimed += [os.path.realpath(f) for f in folders]

    def check(self, path: Path, is_link: bool | None = None) -> os.stat_result | Skipped:
        """``path``'s stat (links followed), or why it is refused."""
        try:
            st = path.stat()
        except OSError as exc:
            return Skipped.from_stat_error(path, exc)
        if is_link is None:
            is_link = path.is_symlink()
        if is_link and self.root is not None:
            real = os.path.realpath(path)
            if not _inside(self.root, real):
                why = f"symbolic link to {real}, outside the source folder {self.root}"
                return Skipped(path, "outside_root", f"{path}: {why}")
        return st

    def subdirs(
        self, folder: Path, skip: Callable[[str], bool] = lambda name: False
    ) -> tuple[list[Path], list[Skipped]]:
        """(folders, refused) directly below ``folder``, sorted; names ``skip`` accepts are left
        out silently. A link back to ``folder`` or one of its parents is refused (a loop)."""
        entries = self._list(folder)
        if isinstance(entries, Skipped):
            return [], [entries]
        ancestors = _ancestors(folder)
        dirs, refused = [], []
        for path, is_link in entries:
            if skip(path.name):
                continue
            got = self.check(path, is_link)
            if isinstance(got, Skipped):
                refused.append(got)
            elif stat.S_ISDIR(got.st_mode):
                if _key(got) in ancestors:
                    refused.append(_loop(path))
                else:
                    dirs.append(path)
        return dirs, refused

    def walk(
        self,
        folder: Path,
        keep: Callable[[Path], bool] = lambda path: True,
        prune: Callable[[Path], bool] = lambda path: False,
        recursive: bool = True,
    ) -> Iterator[Path | Skipped]:
        """Files below ``folder`` that ``keep`` accepts, and the entries refused on the way.

        ``prune(sub_folder)`` True leaves a sub-folder out (the caller notes it). A file ``keep``
        accepts that is not a regular file comes back as a ``Skipped``.
        """
        got = self.check(folder, is_link=True)  # reached through a link higher up: checked too
        if isinstance(got, Skipped):
            yield got
            return
        if _key(got) in self._listed:
            yield _listed(folder)
            return
        self._listed.add(_key(got))
        covered = [*self._claimed, os.path.realpath(folder)]
        yield from self._walk(folder, _ancestors(folder), covered, keep, prune, recursive)

    def _list(self, folder: Path) -> list[tuple[Path, bool]] | Skipped:
        try:
            with os.scandir(folder) as it:
                names = sorted((entry.name, entry.is_symlink()) for entry in it)
        except OSError as exc:
            return Skipped(folder, "unreadable", f"{folder}: cannot list folder ({exc.strerror})")
        return [(folder / name, is_link) for name, is_link in names]

    def _walk(self, folder, ancestors, covered, keep, prune, recursive):
        entries = self._list(folder)
        if isinstance(entries, Skipped):
            yield entries
            return
        for path, is_link in entries:
            got = self.check(path, is_link)
            if isinstance(got, Skipped):
                yield got
            elif stat.S_ISDIR(got.st_mode):
                if not recursive or prune(path):
                    continue
                key, real = _key(got), os.path.realpath(path) if is_link else None
                if key in ancestors:
                    yield _loop(path)
                elif key in self._listed or (real and any(_inside(c, real) for c in covered)):
                    yield _listed(path)
                else:
                    self._listed.add(key)
                    inner = [*covered, real] if real else covered
                    yield from self._walk(path, ancestors | {key}, inner, keep, prune, recursive)
            elif keep(path):
                yield path if stat.S_ISREG(got.st_mode) else Skipped.not_regular(path)


def _ancestors(folder: Path) -> set[_Key]:
    """The identities of ``folder`` and its real parents: a link to one of them is a loop."""
    real = Path(os.path.realpath(folder))
    out = set()
    for parent in (real, *real.parents):
        with contextlib.suppress(OSError):  # an unreadable parent cannot be walked into either
            out.add(_key(parent.stat()))
    return out


def _loop(path: Path) -> Skipped:
    return Skipped(path, "link_loop", f"{path}: links to a folder it is inside of (a loop)")


def _listed(path: Path) -> Skipped:
    return Skipped(path, "already_listed", f"{path}: links to a folder listed already")
