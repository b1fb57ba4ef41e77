"""Lung-aware classification: the preprocessing (stages.common.lungs), the lungs stage
(stages.lungs) and serving, which must show a model exactly what its cache held.

A tiny U-Net is trained once (a few seconds) on lung-like films, so the masks are real
segmenter output; the films here put the lungs off-centre so a crop is not the whole film.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from contextlib import chdir
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import stages  # noqa: F401  (torch before TensorFlow)
from stages import lungs as lungs_stage
from stages.augment import Lungs
from stages.classifier.config import ClassificationAugmentConfig
from stages.common import paths
from stages.common.cache import Affine
from stages.common.config import ConfigError, parse
from stages.common.lungs import LungsConfig, apply, grow
from stages.common.utils import StageError
from stages.serve.render import cam_to_original, draw_outline
from tests.segmenter_helpers import film, lungs, save
from tests.serve_models import evaluation_file, left_half_classifier
from tests.test_segmenter_train import TINY, make_cache

SIZE = 32  # the classifier's input


# ------------------------------------------------------------------------------- the function
def test_apply_none_crop_mask_and_no_lungs():
    mask = np.zeros((40, 60), bool)
    mask[10:20, 20:40] = True
    img = np.arange(40 * 60, dtype=np.uint8).reshape(40, 60) | 1  # no zero pixel
    box = (20, 10, 40, 20)
    same, m = apply(img, mask, box, "none", 0.1)
    assert same is img and m is mask
    crop, m = apply(img, mask, box, "crop", 0.1)  # 2 px of margin across, 1 down
    assert crop.shape == (12, 24) and np.array_equal(crop, img[9:21, 18:42]) and m.shape == (12, 24)
    assert grow(box, 0.1, (40, 60)) == (18, 9, 42, 21)
    assert grow((0, 0, 60, 40), 0.5, (40, 60)) == (0, 0, 60, 40)  # clipped to the film
    masked, m = apply(img, mask, box, "mask", 0.1)  # kept: within 2 px of the lungs
    assert masked.shape == img.shape and m is not None
    assert (masked[mask] == img[mask]).all() and masked[0, 0] == 0 and masked[30, 5] == 0
    assert masked[15, 18] == img[15, 18] and masked[15, 17] == 0
    empty = np.zeros_like(mask)
    for mode in ("crop", "mask"):  # no lung found: the whole film, untouched
        assert apply(img, empty, (0, 0, 60, 40), mode, 0.1)[0] is img
    with pytest.raises(ValueError, match="one \\(H, W\\)"):
        apply(img, mask[:, :10], box, "crop", 0.1)
    with pytest.raises(ValueError, match="inside the film"):
        apply(img, mask, (20, 10, 70, 20), "crop", 0.1)
    with pytest.raises(ValueError, match="unknown mode"):
        apply(img, mask, box, "blur", 0.1)
    with pytest.raises(ConfigError, match="lungs_margin"):
        parse(LungsConfig, {"lungs_margin": 0.9}, "augment.classification")
    with pytest.raises(ConfigError, match="lungs"):
        parse(LungsConfig, {"lungs": "blur"}, "augment.classification")


def test_outline_and_cam_of_a_cropped_film():
    mask = np.zeros((100, 80), bool)
    mask[20:60, 10:50] = True
    rgb = np.zeros((100, 80, 3), np.uint8)
    out = draw_outline(rgb, mask)
    green = (out == (0, 255, 0)).all(axis=-1)
    assert green[20, 30] and green[40, 10] and not green[40, 30] and not green[5, 5]
    assert not rgb.any()  # the input is left alone
    # a film cropped to x 10..50, y 20..60, then stretched to 32 px: the map is 1 inside the crop
    sx, sy = 32 / 40, 32 / 40
    affine = Affine(sx, sy, -sx * 10, -sy * 20)
    back = cam_to_original(np.ones((32, 32), np.float32), affine, (100, 80))
    assert back.shape == (100, 80)
    assert back[25:55, 15:45].min() > 0.99 and back[:15].max() == 0 and back[:, 55:].max() == 0
    # the map's left column lands on the crop's left edge
    left = np.zeros((32, 32), np.float32)
    left[:, :4] = 1.0
    back = cam_to_original(left, affine, (100, 80))
    assert back[40, 12] > 0.9 and back[40, 30] == 0


# ------------------------------------------------------------- the stage and serving, real U-Net
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(root, split dir, segmenter): films listed by a classification split, and a tiny trained
    segmenter; the lungs sit a little left of centre on taller-than-wide films."""
    from stages.segmenter.train import train

    root = tmp_path_factory.mktemp("lungs")
    with chdir(root):  # dvclive and the split's relative paths
        out = root / "seg"
        cfg = dataclasses.replace(TINY, epochs=20)
        train(cfg, make_cache(root / "cache", {"train": 16, "val": 4}), out / "seg.pt",
              out / "live", out / "ckpt", out / "m.json")  # fmt: skip
        rows = []
        for i, split in enumerate(("train", "train", "val", "test", "test")):
            h, w = 120 + 8 * i, 100
            m = lungs(h, w, shift=-0.04)
            path = save(root / f"films/f{i}.png", film(m, seed=i))
            rel = path.relative_to(root).as_posix()
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            rows.append({"path": rel, "sha256": sha, "label": "NORMAL", "split": split})
        split_dir = root / "split"
        split_dir.mkdir()
        table = pd.DataFrame(rows)
        for split in ("train", "val", "test"):
            table[table.split == split].to_csv(split_dir / f"{split}.csv", index=False)
    return root, split_dir, out / "seg.pt"


def _run(world, mode: str, segmenter: Path | None = None) -> Path:
    root, split_dir, seg = world
    out = root / f"out-{mode}-{(segmenter or seg).stem}"
    with chdir(root):
        lungs_stage.run(LungsConfig(lungs=mode), split_dir, segmenter or seg, out)
    return out


def test_stage_none_is_constant_and_meter_always_written(world):
    out = _run(world, "none")
    pre = out / "preprocess"
    assert sorted(p.name for p in pre.iterdir()) == [paths.LUNGS_INFO_NAME]
    assert json.loads((pre / paths.LUNGS_INFO_NAME).read_text()) == {"lungs": "none"}
    meter = pd.read_csv(out / "meter" / paths.LUNGS_BOXES_NAME)
    assert len(meter) == 2 and meter["found"].all()  # the test films
    masks = sorted((out / "meter" / paths.LUNGS_MASKS_NAME).iterdir())
    assert [p.stem for p in masks] == sorted(meter["sha256"])


def test_stage_crop_lists_every_film_once_and_refuses_without_segmenter(world, tmp_path):
    out = _run(world, "crop")
    info = json.loads((out / "preprocess" / paths.LUNGS_INFO_NAME).read_text())
    seg = world[2]
    assert info["lungs"] == "crop" and info["films"] == 5 and info["found"] == 5
    assert info["segmenter"] == hashlib.md5(seg.read_bytes()).hexdigest()
    boxes = pd.read_csv(out / "preprocess" / paths.LUNGS_BOXES_NAME)
    assert len(boxes) == 5 and boxes["path"].is_unique
    # the drawn lungs span x 14..78 and y 18..78 % of each film: so does the box found
    assert (boxes.x0 >= 5).all() and (boxes.x1 <= 90).all() and (boxes.x1 - boxes.x0 >= 40).all()
    h = 120 + 8 * np.arange(5)
    assert (boxes.y0 >= 0.08 * h).all() and (boxes.y1 <= 0.9 * h).all()
    with pytest.raises(StageError, match="train-segmenter"):
        lungs_stage.run(LungsConfig(lungs="crop"), world[1], tmp_path / "absent.pt", tmp_path / "o")
    assert not (tmp_path / "o").exists()  # nothing half-written


@pytest.mark.parametrize("mode", ["crop", "mask"])
def test_serving_shows_the_model_what_its_cache_held(world, mode, tmp_path):
    """augment (the stage's masks, the params' margin) and the Predictor (the segmenter run
    again at serving) give the same input bytes, and the map and outline land on the film."""
    from stages.serve.inference import Predictor

    root, _, seg = world
    out = _run(world, mode)
    cfg = parse(
        ClassificationAugmentConfig,
        {"image_size": SIZE, "resize": "pad", "lungs": mode, "lungs_margin": 0.05},
        "augment.classification",
    )
    reader = Lungs(out / "preprocess", cfg)
    md5 = hashlib.md5(seg.read_bytes()).hexdigest()
    assert reader.segmenter == md5
    model = left_half_classifier(
        tmp_path / "m.keras", size=SIZE, lungs=mode, lungs_margin=0.05, lungs_segmenter=md5
    )
    evaluation = evaluation_file(tmp_path / "evaluation.json", 0.5, [model])
    predictor = Predictor(model, None, evaluation, provenance_root=None, segmenter_path=seg)
    from stages.common.imageio import load_gray

    for rel in pd.read_csv(out / "preprocess" / paths.LUNGS_BOXES_NAME)["path"]:
        with chdir(root):
            cached, cached_mask = reader.load(rel, cfg)
        gray = load_gray(root / rel)
        served, affine, found = predictor.preprocess_with_lungs(gray)
        assert np.array_equal(served, cached), rel
        assert found.found and cached_mask.any()
        if mode == "crop":  # the crop fills the input: the film's corner is not in it
            assert affine.tx < 0 or affine.ty < 0
            assert not np.array_equal(served, predictor.preprocess_classifier(gray * 0)[0])
    pred = predictor.predict_file(root / "films/f3.png", gradcam=True)
    gray = load_gray(root / "films/f3.png")
    assert pred.classification["lungs"]["mode"] == mode and pred.lungs.shape == gray.shape
    picture = predictor.gradcam_overlay(gray, pred)
    assert (picture == (0, 255, 0)).all(axis=-1).any()  # the lungs it was given, outlined


def test_serving_refuses_another_or_a_missing_segmenter(world, tmp_path):
    from stages.serve.inference import Predictor

    seg = world[2]
    model = left_half_classifier(
        tmp_path / "m.keras", size=SIZE, lungs="crop", lungs_segmenter="0" * 32
    )
    evaluation = evaluation_file(tmp_path / "evaluation.json", 0.5, [model])
    with pytest.raises(StageError, match="not the segmenter the classifier was trained with"):
        Predictor(model, None, evaluation, provenance_root=None, segmenter_path=seg)
    with pytest.raises(StageError, match="needs its segmenter"):
        Predictor(model, None, evaluation, provenance_root=None, segmenter_path=tmp_path / "x.pt")


# ------------------------------------------------------------------- training framings
def test_framings_add_cropped_copies_to_train_alone(world, tmp_path):
    """lungs none + lungs_framings: the lungs stage writes every film's box, and the cache's
    train split is the plain cache's train split followed by one crop of every film per margin
    (exactly ``apply``'s crop); val and test are the plain cache's, and no split keeps masks."""
    from stages.augment import run
    from stages.common.cache import open_split
    from stages.common.imageio import load_gray

    root, split_dir, seg = world
    out = tmp_path / "lungs"
    framed = LungsConfig(lungs="none", lungs_framings=(0.05, 0.2))
    with chdir(root):
        lungs_stage.run(framed, split_dir, seg, out)
    pre = out / "preprocess"
    info = json.loads((pre / paths.LUNGS_INFO_NAME).read_text())
    assert info["lungs"] == "none" and info["framings"] == [0.05, 0.2] and info["films"] == 5
    boxes = pd.read_csv(pre / paths.LUNGS_BOXES_NAME)
    base = {"image_size": SIZE, "resize": "stretch", "preview_count": 0}
    section = "augment.classification"
    plain_cfg = parse(ClassificationAugmentConfig, base, section)
    cfg = parse(ClassificationAugmentConfig, {**base, "lungs_framings": [0.05, 0.2]}, section)
    with chdir(root):
        run("classification", plain_cfg, split_dir, tmp_path / "plain", tmp_path / "p.png")
        run("classification", cfg, split_dir, tmp_path / "framed", tmp_path / "f.png", pre)
    plain = {s: open_split(tmp_path / "plain", s) for s in ("train", "val", "test")}
    got = {s: open_split(tmp_path / "framed", s) for s in ("train", "val", "test")}
    for s in ("val", "test"):
        assert np.array_equal(got[s].images, plain[s].images) and got[s].masks is None
    n = len(plain["train"])
    train = got["train"]
    assert len(train) == 3 * n and train.meta["counts"] == {"train": 3 * n, "val": 1}
    assert np.array_equal(train.images[:n], plain["train"].images) and train.masks is None
    framing = pd.to_numeric(train.index["framing"]).to_numpy()  # "" (the films as they are): NaN
    assert np.isnan(framing[:n]).all() and (framing[n:] == np.repeat([0.05, 0.2], n)).all()
    assert (train.index["path"].to_numpy() == np.tile(plain["train"].index["path"], 3)).all()
    reader = Lungs(pre, cfg)
    for i in range(n, 3 * n):
        path = train.index["path"][i]
        row = boxes.set_index("path").loc[path]
        with chdir(root):
            film_px = load_gray(path)
            expected = reader.load(path, cfg, framing[i])[0]
        x0, y0, x1, y1 = grow((row.x0, row.y0, row.x1, row.y1), framing[i], film_px.shape)
        assert (x1 - x0, y1 - y0) != (film_px.shape[1], film_px.shape[0])  # a real crop
        assert np.array_equal(train.images[i], expected)
    assert not np.array_equal(train.images[n], train.images[2 * n])  # margins differ


def test_framings_need_a_matching_lungs_stage_and_valid_margins(world, tmp_path):
    out = _run(world, "none")  # no framings: the constant line, no boxes
    section = "augment.classification"
    cfg = parse(ClassificationAugmentConfig, {"lungs_framings": [0.1]}, section)
    with pytest.raises(StageError, match=r"framings \[\], the params ask for none with \[0.1\]"):
        Lungs(out / "preprocess", cfg)
    for bad, message in (([0.6], "in \\[0, 0.5\\]"), ([0.1, 0.1], "must not repeat")):
        with pytest.raises(ConfigError, match=message):
            parse(ClassificationAugmentConfig, {"lungs_framings": bad}, section)
    with pytest.raises(ConfigError, match="not mask"):
        parse(ClassificationAugmentConfig, {"lungs": "mask", "lungs_framings": [0.1]}, section)
