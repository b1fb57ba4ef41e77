"""Segmentation data: mask rules, download of pairs, bad masks, leakage across sources, the
cache's masks and the augment preview."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stages import augment, download, split
from stages.common import cache
from stages.common.config import parse
from stages.common.imageio import load_gray
from stages.common.utils import StageError
from stages.segmenter.config import SegmentationAugmentConfig
from stages.sources import masks as M
from stages.sources.config import SegmentationData
from tests.segmenter_helpers import film, lungs, pair, save


def run_download(tmp_path: Path, **data) -> dict:
    cfg = parse(SegmentationData, {"root": str(tmp_path), **data}, "data.segmentation")
    return download.run(cfg, "segmentation", tmp_path / "raw", tmp_path / "dl")


# ----------------------------------------------------------------------------- mask rules
def test_mask_rules_accept_real_shapes_and_interpolated_edges():
    m = lungs(96, 80)
    out = M.check_mask(m.astype(np.uint8) * 255, (96, 80))
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 255}
    assert np.array_equal(out > 0, m)
    # a resized 0/255 mask: grey values on every edge pixel, none elsewhere
    soft = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((40, 48), Image.BILINEAR))
    assert ((soft > 0) & (soft < 255)).any()
    assert M.check_mask(soft, (48, 40)).any()
    # a 0/1 label map is read as 0/255
    assert np.array_equal(M.check_mask(m.astype(np.uint8), (96, 80)) > 0, m)
    # one stray speck beside the two lungs is tolerated (the two largest regions dominate)
    specked = m.copy()
    specked[2:4, 2:4] = True
    assert M.check_mask(specked.astype(np.uint8) * 255, (96, 80))[2, 2] == 255


@pytest.mark.parametrize(
    ("make", "reason", "words"),
    [
        (lambda m: m.astype(np.uint8)[:-4] * 255, "mask_size_mismatch", "80x92 px but its image"),
        (lambda m: (m * 100 + 60).astype(np.uint8), "mask_not_binary", "grey"),
        (lambda m: np.zeros_like(m, np.uint8), "mask_empty", "no lung"),
        (
            lambda m: np.pad(np.full((2, 2), 255, np.uint8), ((0, 94), (0, 78))),
            "mask_not_lung_shaped",
            "cover 0.1 %",
        ),
        (lambda m: (~m).astype(np.uint8) * 255, "mask_not_lung_shaped", "border"),
        (
            lambda m: (np.indices(m.shape).sum(0) % 7 == 0).astype(np.uint8) * 255,
            "mask_not_lung_shaped",
            "scattered",
        ),
    ],
    ids=["size", "soft", "empty", "speck", "inverted", "scattered"],
)
def test_mask_rules_reject_with_a_reason(make, reason, words):
    with pytest.raises(M.MaskRejected, match=words) as exc:
        M.check_mask(make(lungs(96, 80)), (96, 80))
    assert exc.value.reason == reason


def test_real_masks_pass_the_rules(shared_data):
    files = sorted((shared_data / "lung_masks/masks").glob("*.png"))[::50]
    for path in files:
        values = load_gray(path)
        assert M.read_mask(path, values.shape).any(), path


# ----------------------------------------------------------------------------- download
def test_download_writes_masks_beside_images(tmp_path):
    src = tmp_path / "lm"
    expected = {
        name: pair(src, name, h=40 + i, w=36, seed=i) for i, name in enumerate(["a b_1_0", "c_2_0"])
    }
    report = run_download(tmp_path, source="lung_masks", path="lm")
    manifest = pd.read_csv(tmp_path / "raw/manifest.csv", dtype=str, keep_default_na=False)
    assert list(manifest.columns)[-1] == "mask_path" and len(manifest) == 2
    assert report["labels"] == {"lungs": 2} and report["rejected"]["count"] == 0
    for row in manifest.itertuples():
        name = Path(row.path).stem
        assert row.mask_path == row.path.replace("/images/", "/masks/")
        mask = np.asarray(Image.open(row.mask_path))
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
        assert np.array_equal(mask > 0, expected[name])
        assert (int(row.width), int(row.height)) == mask.shape[::-1]


BAD = {
    "missing mask": (lambda r: (r / "masks/p_2_0.png").unlink(), "images/p_2_0.png: no mask"),
    "missing image": (lambda r: (r / "images/p_2_0.png").unlink(), "masks/p_2_0.png: no image"),
    "size mismatch": (
        lambda r: save(r / "masks/p_2_0.png", lungs(30, 40).astype(np.uint8) * 255),
        "masks/p_2_0.png: mask size mismatch",
    ),
    "non-binary": (
        lambda r: save(r / "masks/p_2_0.png", film(lungs(48, 40))),
        "masks/p_2_0.png: mask not binary",
    ),
    "empty": (
        lambda r: save(r / "masks/p_2_0.png", np.zeros((48, 40), np.uint8)),
        "masks/p_2_0.png: mask empty",
    ),
    "not lung-shaped": (
        lambda r: save(r / "masks/p_2_0.png", (~lungs(48, 40)).astype(np.uint8) * 255),
        "masks/p_2_0.png: mask not lung shaped",
    ),
    "unreadable": (
        lambda r: (r / "masks/p_2_0.png").write_bytes(b"not a png"),
        "masks/p_2_0.png: mask unreadable",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_mask_stops_with_one_line_and_writes_nothing(tmp_path, case):
    src = tmp_path / "lm"
    for i in range(3):
        pair(src, f"p_{i}_0", seed=i)
    old = tmp_path / "raw"
    old.mkdir()
    (old / "manifest.csv").write_text("previous output\n")
    damage, words = BAD[case]
    damage(src)
    with pytest.raises(StageError) as exc:
        run_download(tmp_path, source="lung_masks", path="lm")
    message = str(exc.value)
    assert "\n" not in message and words in message and "bad_masks: skip" in message
    assert (old / "manifest.csv").read_text() == "previous output\n"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dl", "lm", "raw"]
    # with bad_masks: skip the pair is left out and listed, the rest is written
    report = run_download(tmp_path, source="lung_masks", path="lm", bad_masks="skip")
    assert report["total_images"] == 2
    listed = report["rejected"]["files"] + report["sources"][0]["ignored"]["paths"]
    assert any("p_2_0" in str(f) for f in listed)


# ----------------------------------------------------------------------------- leakage
def _split(tmp_path: Path, mode: str) -> dict:
    cfg = split.SplitConfig(mode=mode, ratios=(0.8, 0.1, 0.1), seed=0)
    return split.run(cfg, "segmentation", tmp_path / "raw", tmp_path / "split", tmp_path / "m.json")


def test_leaks_between_a_train_source_and_a_test_source_are_dropped(tmp_path):
    hosp, ext = tmp_path / "hosp", tmp_path / "ext"
    for i in range(20):
        pair(hosp, f"H_{i:03d}_0", seed=i)
    for j in range(4):
        pair(ext, f"E_{j:03d}_0", seed=100 + j)
    pair(hosp, "E_001_1", seed=500)  # a train film of patient E_001, who is in the test entry
    pair(hosp, "X_900_0", seed=102)  # the pixels of the test film E_002_0 under another name
    sources = [
        {"name": "lung_masks", "path": "hosp"},
        {"name": "lung_masks", "path": "ext", "split": "test"},
    ]
    run_download(tmp_path, sources=sources)
    m = _split(tmp_path, "official")
    test = pd.read_csv(tmp_path / "split/test.csv", dtype=str, keep_default_na=False)
    assert sorted(Path(p).stem for p in test["path"]) == [f"E_{j:03d}_0" for j in range(4)]
    assert "mask_path" in test.columns
    assert m["dropped_overlapping_test"] == 2
    assert m["dropped_overlapping_test_by"]["same_patient"] == 1
    assert m["dropped_overlapping_test_by"]["same_pixels"] == 1
    kept = pd.concat(pd.read_csv(tmp_path / f"split/{s}.csv") for s in ("train", "val"))
    assert not {"E_001_1", "X_900_0"} & {Path(p).stem for p in kept["path"]}
    assert all(Path(p).exists() for p in kept["mask_path"])


def test_random_split_groups_patients(tmp_path):
    src = tmp_path / "lm"
    for i in range(30):
        for k in range(2):
            pair(src, f"P_{i:03d}_{k}", seed=10 * i + k)
    run_download(tmp_path, source="lung_masks", path="lm")
    m = _split(tmp_path, "random")
    assert m["patients_shared_across_splits"] == 0
    assert {s: m["counts"][s]["total"] for s in ("train", "val", "test")} == {
        "train": 48,
        "val": 6,
        "test": 6,
    }


# ----------------------------------------------------------------------------- cache
def test_cache_holds_masks_moved_with_their_images(tmp_path):
    src = tmp_path / "lm"
    for i in range(12):
        pair(src, f"P_{i:03d}_0", h=60 + 4 * i, w=50, seed=i, shift=0.02 * (i % 3))
    run_download(tmp_path, source="lung_masks", path="lm")
    _split(tmp_path, "random")
    cfg = SegmentationAugmentConfig(image_size=32, resize="pad", preview_count=2)
    preview = tmp_path / "preview.png"
    summary = augment.run("segmentation", cfg, tmp_path / "split", tmp_path / "cache", preview)
    assert sum(summary["counts"].values()) == 12
    meta = json.loads((tmp_path / "cache/fit/meta.json").read_text())
    assert meta["classes"] == ["lungs"] and meta["image_size"] == 32
    for name in ("train", "val", "test"):
        sp = cache.open_split(tmp_path / "cache", name)
        assert sp.masks.shape == sp.images.shape and sp.masks.dtype == np.uint8
        assert set(np.unique(sp.masks)) <= {0, 1}
        for img, mask in zip(sp.images, sp.masks, strict=True):
            # the films' lungs are dark: the cache mask sits on the dark pixels
            assert img[mask == 1].mean() < img[(mask == 0) & (img > 0)].mean() - 50
    assert preview.is_file() and Image.open(preview).size[0] > 100


def test_cache_mask_resize_is_the_image_resize():
    m = lungs(90, 60)
    moved = cache.prepare_mask(m.astype(np.uint8) * 255, 30, "pad")
    direct = cache.resize_gray(m.astype(np.uint8) * 255, 30, "pad")[0] >= 128
    assert np.array_equal(moved, direct) and moved[:, :5].sum() == 0  # pad border is background


def test_synthetic_phantoms_come_with_valid_lung_masks(tmp_path):
    from stages.sources.base import Context, Notes
    from stages.sources.config import SegmentationSource
    from stages.sources.segmentation import lung_masks
    from stages.sources.synthetic import SyntheticSegmentationConfig, generate_segmentation

    cfg = SyntheticSegmentationConfig(n_patients=8, image_size=64, test_fraction=0.25, seed=3)
    root = generate_segmentation(cfg, tmp_path / "a")
    again = generate_segmentation(cfg, tmp_path / "b")
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    assert files == sorted(p.relative_to(again).as_posix() for p in again.rglob("*.png"))
    assert all((root / f).read_bytes() == (again / f).read_bytes() for f in files)  # seeded
    ctx = Context(key="synthetic", patient_prefix="synthetic", work_dir=tmp_path, notes=Notes())
    recs = lung_masks.load(root, SegmentationSource("synthetic"), ctx)
    assert len(recs) == len(files) // 2 and not ctx.notes.unparsed_names
    by_split = {s: {r.patient_id for r in recs if r.source_split == s} for s in ("train", "test")}
    assert len(by_split["test"]) == 2 and not by_split["test"] & by_split["train"]
    for r in recs:
        image = load_gray(r.src)
        mask = M.read_mask(r.mask, image.shape) > 0  # passes every rule
        assert image[mask].mean() < image[~mask & (image > 40)].mean()  # lungs are dark
