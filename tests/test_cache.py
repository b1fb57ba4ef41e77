"""Tests for stages/cache.py: resize geometry, boxes following pixels, writer/reader roundtrip."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from stages.common.cache import (
    Affine,
    CocoIndex,
    boxes_for,
    load_meta,
    load_policy,
    open_split,
    prepare_gray,
    resize_gray,
    standardize,
    transform_boxes,
    write_meta,
    write_policy,
    write_split,
)
from stages.common.utils import StageError


def _bright_bbox(img: np.ndarray, thr: int = 128) -> tuple[int, int, int, int]:
    """xyxy (exclusive max) of pixels above ``thr``."""
    ys, xs = np.nonzero(img > thr)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_stretch_geometry():
    img = np.full((100, 200), 7, dtype=np.uint8)
    out, aff = resize_gray(img, 64, "stretch")
    assert out.shape == (64, 64) and out.dtype == np.uint8
    assert aff == Affine(64 / 200, 64 / 100, 0.0, 0.0)
    assert np.all(out == 7)  # no padding in stretch mode


@pytest.mark.parametrize(("h", "w"), [(100, 200), (300, 120), (50, 50)])
def test_pad_geometry_keeps_aspect_and_centres(h, w):
    img = np.full((h, w), 200, dtype=np.uint8)
    out, aff = resize_gray(img, 64, "pad")
    assert out.shape == (64, 64)
    content = _bright_bbox(out, 100)
    cw, ch = content[2] - content[0], content[3] - content[1]
    assert max(cw, ch) == 64  # long side fills the square
    assert abs(cw / ch - w / h) < 0.05 * (w / h) + 2 / 64
    # Padding is centred and zero, and the affine maps the image corners onto the content box.
    assert abs(content[0] - (64 - content[2])) <= 1 and abs(content[1] - (64 - content[3])) <= 1
    corners = transform_boxes(np.array([[0, 0, w, h]]), aff, 64)[0]
    np.testing.assert_allclose(corners, content, atol=0.5)
    assert out[:, : content[0]].sum() == 0 and out[: content[1], :].sum() == 0


def test_standardize_sets_mean_and_sd_and_undoes_exposure():
    """The same film brighter and with more contrast (another machine) standardises to the same
    grey levels, to within rounding; a flat image becomes flat mid-grey."""
    rng = np.random.default_rng(0)
    film = np.clip(rng.normal(110, 25, (60, 80)), 0, 255).astype(np.uint8)
    out = standardize(film)
    assert out.dtype == np.uint8 and out.shape == film.shape
    assert abs(out.mean() - 128) < 1 and abs(out.std() - 48) < 1
    exposed = np.clip(film.astype(np.float64) * 1.3 + 12, 0, 255).astype(np.uint8)
    assert abs(exposed.mean() - film.mean()) > 40  # a real shift before ...
    assert np.abs(standardize(exposed).astype(int) - out.astype(int)).max() <= 2  # ... none after
    np.testing.assert_array_equal(standardize(np.full((5, 7), 200, np.uint8)), 128)


def test_prepare_gray_applies_each_intensity_mode_before_resizing():
    rng = np.random.default_rng(1)
    img = np.clip(rng.normal(90, 30, (40, 50)), 0, 255).astype(np.uint8)
    none, _ = prepare_gray(img, 32, "stretch", "none")
    std, _ = prepare_gray(img, 32, "stretch", "standardize")
    np.testing.assert_array_equal(none, resize_gray(img, 32, "stretch")[0])
    np.testing.assert_array_equal(std, resize_gray(standardize(img), 32, "stretch")[0])
    assert abs(std.mean() - 128) < 3 and abs(none.mean() - 90) < 3
    with pytest.raises(ValueError, match="standardize"):
        prepare_gray(img, 32, "stretch", "clahe")  # type: ignore[arg-type]


def test_resize_rejects_bad_input():
    with pytest.raises(ValueError):
        resize_gray(np.zeros((4, 4, 3), np.uint8), 8, "pad")
    with pytest.raises(ValueError):
        resize_gray(np.zeros((4, 4), np.float32), 8, "pad")
    with pytest.raises(ValueError):
        resize_gray(np.zeros((4, 4), np.uint8), 8, "crop")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["stretch", "pad"])
@pytest.mark.parametrize(("h", "w"), [(400, 300), (240, 520), (1024, 900)])
def test_boxes_follow_the_pixels(mode, h, w):
    rng = np.random.default_rng(0)
    box = np.array([[61.0, 87.0, 183.0, 211.0]])  # xyxy, exclusive max
    img = rng.integers(0, 60, size=(h, w), dtype=np.uint8)
    img[87:211, 61:183] = 255
    out, aff = resize_gray(img, 128, mode)
    new = transform_boxes(box, aff, 128)[0]
    got = _bright_bbox(out, 160)
    # The transformed box encloses the white region tightly (resampling blurs edges by ~1 px).
    np.testing.assert_allclose(new, got, atol=1.5)


def test_transform_boxes_clips():
    boxes = np.array([[-10, -5, 50, 50], [90, 90, 400, 300]], dtype=np.float32)
    out = transform_boxes(boxes, Affine(0.5, 0.5, 4, 0), 64)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0, 0, 29, 25], [49, 45, 64, 64]])


def _index(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "path": [f"data/raw/x/{i:03d}.png" for i in range(n)],
            "label": ["NORMAL", "PNEUMONIA"] * (n // 2) + ["NORMAL"] * (n % 2),
            "subtype": [""] * n,
            "patient_id": [f"src:{i:03d}" for i in range(n)],
            "label_index": [i % 2 for i in range(n)],
        }
    )


def test_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, size=(5, 16, 16), dtype=np.uint8)
    idx = _index(5)
    write_split(tmp_path, "train", (im for im in imgs), idx, 16)  # a generator streams
    write_split(tmp_path, "val", imgs[:0], idx.iloc[:0], 16)  # empty split is allowed
    meta = {
        "task": "classification",
        "image_size": 16,
        "resize": "stretch",
        "classes": ["NORMAL", "PNEUMONIA"],
        "counts": {"train": 5, "val": 0},
    }
    write_meta(tmp_path, meta)
    write_policy(tmp_path, {"rotation": 10.0})
    assert load_meta(tmp_path) == meta and load_policy(tmp_path) == {"rotation": 10.0}

    sp = open_split(tmp_path, "train")
    assert isinstance(sp.images, np.memmap) and sp.images.dtype == np.uint8
    assert len(sp) == 5 and sp.coco is None and sp.meta == meta
    np.testing.assert_array_equal(sp.images, imgs)
    # Strings stay strings: "" subtype is not NaN, zero-padded ids keep their zeros.
    assert list(sp.index["subtype"]) == [""] * 5
    assert list(sp.index["patient_id"]) == list(idx["patient_id"])
    assert list(sp.index["label_index"]) == list(idx["label_index"])
    assert len(open_split(tmp_path, "val")) == 0


def test_writer_rejects_mismatches(tmp_path):
    imgs = np.zeros((3, 8, 8), np.uint8)
    with pytest.raises(ValueError, match="2 images for 3"):
        write_split(tmp_path, "train", imgs[:2], _index(3), 8)
    with pytest.raises(ValueError, match="more images"):
        write_split(tmp_path, "val", imgs, _index(2), 8)
    with pytest.raises(ValueError, match="expected uint8"):
        write_split(tmp_path, "test", np.zeros((3, 8, 9), np.uint8), _index(3), 8)
    with pytest.raises(ValueError, match="unknown split"):
        write_split(tmp_path, "holdout", imgs, _index(3), 8)


def test_training_inputs_live_in_fit_and_test_apart(tmp_path):
    """train-<model> depends on fit/ alone (dvc.yaml): meta, policy, train and val are there,
    the test split is not, so a new test set cannot make training stale."""
    for split in ("train", "val", "test"):
        write_split(tmp_path, split, np.zeros((1, 8, 8), np.uint8), _index(1), 8)
    write_meta(tmp_path, {"task": "classification"})
    write_policy(tmp_path, {})
    fit = {p.relative_to(tmp_path).as_posix() for p in (tmp_path / "fit").rglob("*")}
    assert {"fit/meta.json", "fit/policy.json", "fit/train", "fit/val"} <= fit
    assert not any(p.startswith("fit/test") for p in fit)
    assert (tmp_path / "test" / "images.npy").is_file()


def test_reader_errors(tmp_path):
    with pytest.raises(StageError, match="augment"):
        open_split(tmp_path, "train")
    write_meta(tmp_path, {"task": "classification"})
    with pytest.raises(StageError, match="augment"):
        open_split(tmp_path, "train")


def test_coco_roundtrip_and_boxes_for(tmp_path):
    coco = {
        "images": [{"id": i, "file_name": f"f{i}.png", "width": 8, "height": 8} for i in range(3)],
        "annotations": [
            {
                "id": 1,
                "image_id": 0,
                "category_id": 2,
                "bbox": [1, 2, 3, 4],
                "area": 12,
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 2,
                "category_id": 1,
                "bbox": [0, 0, 8, 8],
                "area": 64,
                "iscrowd": 0,
            },
            {
                "id": 3,
                "image_id": 0,
                "category_id": 1,
                "bbox": [4, 4, 2, 1],
                "area": 2,
                "iscrowd": 0,
            },
        ],
        "categories": [{"id": 1, "name": "Nodule"}, {"id": 2, "name": "Mass"}],
    }
    write_split(tmp_path, "train", np.zeros((3, 8, 8), np.uint8), _index(3), 8, coco=coco)
    write_meta(tmp_path, {"task": "detection"})
    sp = open_split(tmp_path, "train")
    assert sp.coco == json.loads(json.dumps(coco))
    boxes, cats = boxes_for(sp.coco, 0)
    assert boxes.dtype == np.float32 and cats.dtype == np.int64
    np.testing.assert_array_equal(boxes, [[1, 2, 4, 6], [4, 4, 6, 5]])
    np.testing.assert_array_equal(cats, [2, 1])
    b1, c1 = boxes_for(sp.coco, 1)
    assert b1.shape == (0, 4) and c1.shape == (0,)
    np.testing.assert_array_equal(sp.boxes(2)[0], [[0, 0, 8, 8]])
    idx = CocoIndex(coco)
    assert idx.categories == {1: "Nodule", 2: "Mass"}
    # Returned arrays are copies: mutating them must not corrupt the index.
    b, _ = boxes_for(idx, 0)
    b[:] = -1
    assert boxes_for(idx, 0)[0].min() >= 1
