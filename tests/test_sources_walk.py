"""Folder sources with links and unreadable folders: each image read once, every refused entry
listed in data/raw/<task>/report.json with its reason, no traceback (stages.common.walk)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import download
from stages.common.config import parse
from stages.common.walk import FolderWalk, Skipped
from stages.sources.config import ClassificationData


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = ((np.arange(256).reshape(16, 16) + value * 37) % 256).astype(np.uint8)
    Image.fromarray(arr).save(path)


def _run(root: Path, **data) -> dict:
    cfg = parse(ClassificationData, {"root": str(root), **data}, "data.classification")
    return download.run(cfg, "classification", root / "raw", root / "dl", workers=1)


def _refused(report: dict) -> dict[str, str]:
    (source,) = report["sources"]
    return {Path(f["path"]).name: f["reason"] for f in source["refused"]["files"]}


def test_links_that_loop_break_or_leave_the_source_are_refused_and_listed(tmp_path):
    src = tmp_path / "mine"
    for i in range(6):
        _png(src / f"NORMAL/n{i}.png", i)
    for i in range(4):
        _png(src / f"PNEUMONIA/p{i}.png", 50 + i)
    _png(tmp_path / "elsewhere/x.png", 99)  # inside the data root, outside the source folder
    (src / "NORMAL/loop").symlink_to(".", target_is_directory=True)  # ln -s . loop
    (src / "NORMAL/la").symlink_to("lb")  # la -> lb -> la
    (src / "NORMAL/lb").symlink_to("la")
    (src / "NORMAL/gone.png").symlink_to("nowhere.png")
    (src / "NORMAL/out").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (src / "NORMAL/out.png").symlink_to(tmp_path / "elsewhere/x.png")
    (src / "NORMAL/sub").mkdir()
    (src / "NORMAL/sub/up").symlink_to("../..", target_is_directory=True)  # the source root
    (src / "NORMAL/pneu").symlink_to("../PNEUMONIA", target_is_directory=True)  # another class
    (src / "top_loop").symlink_to(".", target_is_directory=True)  # a "class folder" looping
    (src / "top_gone").symlink_to("nothing")

    report = _run(tmp_path, source="folder", path="mine")

    assert report["total_images"] == 10
    assert report["labels"] == {"NORMAL": 6, "PNEUMONIA": 4}
    assert _refused(report) == {
        "loop": "link_loop",
        "la": "link_loop",
        "lb": "link_loop",
        "gone.png": "broken_link",
        "out": "outside_root",
        "out.png": "outside_root",
        "up": "link_loop",
        "pneu": "already_listed",
        "top_loop": "link_loop",
        "top_gone": "broken_link",
    }
    (source,) = report["sources"]
    assert source["refused"]["count"] == 10
    assert source["refused"]["by_reason"] == {
        "already_listed": 1,
        "broken_link": 2,
        "link_loop": 5,
        "outside_root": 2,
    }
    for entry in source["refused"]["files"]:
        assert entry["detail"].startswith(entry["path"]) and "\n" not in entry["detail"]


def test_a_link_inside_the_source_is_followed_once_and_real_folders_win(tmp_path):
    src = tmp_path / "mine"
    for i in range(3):
        _png(src / f"NORMAL/extra/n{i}.png", i)
    _png(src / "PNEUMONIA/p0.png", 50)
    for i in range(2):
        _png(src / f".store/s{i}.png", 80 + i)  # hidden: not a class folder, read via links
    (src / "NORMAL/again").symlink_to("extra", target_is_directory=True)  # sorts before extra
    (src / "PNEUMONIA/more").symlink_to("../NORMAL/extra", target_is_directory=True)
    (src / "NORMAL/stored").symlink_to("../.store", target_is_directory=True)
    (src / "PNEUMONIA/stored").symlink_to("../.store", target_is_directory=True)
    report = _run(tmp_path, source="folder", path="mine")
    assert report["labels"] == {"NORMAL": 5, "PNEUMONIA": 1}
    assert _refused(report) == {"again": "already_listed", "more": "already_listed"} | {
        "stored": "already_listed"  # the second link to .store (PNEUMONIA/stored)
    }
    paths = (tmp_path / "raw/manifest.csv").read_text()
    assert "/NORMAL/extra/n0.png" in paths and "/NORMAL/again/" not in paths
    assert "/NORMAL/stored/s0.png" in paths


def _deny_listing(monkeypatch, folder: Path) -> None:
    """Listing ``folder`` fails as chmod 000 makes it fail for a user (root reads anything)."""
    folder.chmod(0)
    real_scandir, real_listdir = os.scandir, os.listdir

    def denied(path) -> bool:
        return Path(os.fsdecode(path)) == folder

    def scandir(path="."):
        if denied(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    def listdir(path="."):
        if denied(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "listdir", listdir)


def test_an_unreadable_sub_folder_is_listed_and_skipped(tmp_path, monkeypatch):
    src = tmp_path / "mine"
    for i in range(3):
        _png(src / f"NORMAL/n{i}.png", i)
    _png(src / "PNEUMONIA/p0.png", 50)
    _png(src / "PNEUMONIA/locked/p1.png", 51)
    locked = src / "PNEUMONIA/locked"
    _deny_listing(monkeypatch, locked)
    try:
        report = _run(tmp_path, source="folder", path="mine")
    finally:
        locked.chmod(0o755)
    assert report["labels"] == {"NORMAL": 3, "PNEUMONIA": 1}
    (source,) = report["sources"]
    (entry,) = source["refused"]["files"]
    assert entry["path"] == locked.as_posix() and entry["reason"] == "unreadable"
    assert "Permission denied" in entry["detail"]


def test_predict_expands_folders_with_the_same_walk(tmp_path):
    from stages.serve import predict

    _png(tmp_path / "a/x.png", 1)
    (tmp_path / "a/back").symlink_to("..", target_is_directory=True)
    (tmp_path / "a/notes.txt").write_text("not an image")
    got = predict.expand_inputs([tmp_path / "a"])
    assert got == list(FolderWalk().walk(tmp_path / "a", keep=lambda p: p.suffix == ".png"))
    assert got[0] == Skipped(got[0].path, "link_loop", got[0].error)
    assert got[1:] == [tmp_path / "a/x.png"]


@pytest.mark.parametrize("recursive", [True, False])
def test_walk_lists_each_folder_once_across_walks(tmp_path, recursive):
    _png(tmp_path / "a/x.png", 1)
    walk = FolderWalk(tmp_path)
    assert list(walk.walk(tmp_path / "a", recursive=recursive)) == [tmp_path / "a/x.png"]
    (again,) = walk.walk(tmp_path / "a", recursive=recursive)
    assert isinstance(again, Skipped) and again.reason == "already_listed"


def test_an_unreadable_file_is_rejected_and_listed(tmp_path, monkeypatch):
    from stages.sources import intake

    src = tmp_path / "mine"
    for i in range(3):
        _png(src / f"NORMAL/n{i}.png", i)
    _png(src / "PNEUMONIA/p0.png", 50)
    locked = src / "NORMAL/n1.png"
    locked.chmod(0)
    real = intake.load_gray

    def load_gray(path, *args, **kw):  # root reads a chmod 000 file: fail as a user would
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kw)

    monkeypatch.setattr(intake, "load_gray", load_gray)
    try:
        report = _run(tmp_path, source="folder", path="mine")
    finally:
        locked.chmod(0o644)
    assert report["labels"] == {"NORMAL": 2, "PNEUMONIA": 1}
    (entry,) = report["rejected"]["files"]
    assert entry["path"] == str(locked) and entry["reason"] == "unreadable"


def test_a_layout_found_through_a_link_leaving_the_source_is_refused(tmp_path):
    """Kermany's layout search follows folders; the images it finds through a link to another
    place are still refused, named in the one-line error."""
    from stages.common.utils import StageError

    _png(tmp_path / "other/chest_xray/train/NORMAL/IM-0001-0001.png", 1)
    _png(tmp_path / "other/chest_xray/train/PNEUMONIA/person1_virus_1.png", 2)
    (tmp_path / "src").mkdir()
    (tmp_path / "src/x").symlink_to(tmp_path / "other/chest_xray", target_is_directory=True)
    with pytest.raises(StageError, match="no images to take") as info:
        _run(tmp_path, source="kermany", path="src")
    assert "outside_root" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("source", ["folder", "kermany"])
def test_a_link_from_one_split_into_another_is_not_followed(tmp_path, source):
    src = tmp_path / "mine"
    for k, split in enumerate(("train", "test")):
        for i in range(2):
            _png(src / f"{split}/NORMAL/IM-{k}00{i}-0001.png", 10 * k + i)
            _png(src / f"{split}/PNEUMONIA/person{k}0{i}_virus_1.png", 50 + 10 * k + i)
    # both ways, so whichever split a loader reads first, one link leads into the other
    (src / "test/NORMAL/more").symlink_to("../../train/NORMAL", target_is_directory=True)
    (src / "train/PNEUMONIA/more").symlink_to("../../test/PNEUMONIA", target_is_directory=True)
    report = _run(tmp_path, source=source, path="mine")
    m = (tmp_path / "raw/manifest.csv").read_text().splitlines()[1:]
    for split in ("train", "test"):
        rows = [row for row in m if f"/{split}/" in row]
        assert len(rows) == 4 and all(f",{split}," in row for row in rows), rows
    assert len(m) == 8 and not [row for row in m if "/more/" in row]
    (entry,) = report["sources"]
    assert [(Path(f["path"]).name, f["reason"]) for f in entry["refused"]["files"]] == [
        ("more", "already_listed")
    ] * 2
