"""Tests for the on-the-fly augmenters (stages/aug_*.py) and the augment stage (stages/augment.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stages.common.config import ConfigError, parse
from stages.detector.augment import DetectionPolicy, DetectionTransform, hflip, scale_jitter
from stages.sources import intake

# ----------------------------------------------------------------------------- detection


def _bright_bbox(img: np.ndarray, thr: float = 0.5) -> list[float]:
    ys, xs = np.nonzero(img > thr)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def _rect_image(h: int = 96, w: int = 128, box=(20, 30, 60, 70)) -> tuple[torch.Tensor, dict]:
    img = torch.full((1, h, w), 0.1)
    x1, y1, x2, y2 = box
    img[:, y1:y2, x1:x2] = 1.0
    target = {
        "boxes": torch.tensor([box], dtype=torch.float32),
        "labels": torch.tensor([3], dtype=torch.int64),
        "image_id": torch.tensor([7]),
    }
    return img, target


def test_detection_hflip_moves_boxes_with_pixels():
    img, target = _rect_image()
    out, boxes = hflip(img, target["boxes"])
    np.testing.assert_allclose(boxes[0].numpy(), _bright_bbox(out[0].numpy()))
    np.testing.assert_allclose(boxes[0].numpy(), [128 - 60, 30, 128 - 20, 70])


@pytest.mark.parametrize("scale", [0.63, 0.8, 1.0, 1.2, 1.77])
@pytest.mark.parametrize(("u", "v"), [(0.0, 0.0), (0.5, 0.9), (0.99, 0.3)])
def test_detection_scale_jitter_moves_boxes_with_pixels(scale, u, v):
    img, target = _rect_image()
    out, boxes = scale_jitter(img, target["boxes"], scale, u, v)
    assert out.shape == img.shape
    clipped = boxes[0].numpy().clip(0, [128, 96, 128, 96])  # clipping is the caller's job
    np.testing.assert_allclose(clipped, _bright_bbox(out[0].numpy(), 0.55), atol=1.5)


def test_detection_transform_train_keeps_size_and_follows_pixels():
    policy = DetectionPolicy(hflip=0.5, scale_jitter=(0.7, 1.4), brightness=0.0, contrast=0.0)
    gen = torch.Generator().manual_seed(0)
    t = DetectionTransform(policy, train=True, generator=gen)
    moved = 0
    for _ in range(20):
        img, target = _rect_image()
        out, tgt = t(img, target)
        assert out.shape == img.shape and out.dtype == torch.float32
        assert tgt["labels"].tolist() == [3] and tgt["image_id"].tolist() == [7]
        np.testing.assert_allclose(
            tgt["boxes"][0].numpy(), _bright_bbox(out[0].numpy(), 0.55), atol=1.5
        )
        moved += not torch.equal(tgt["boxes"], target["boxes"])
    assert moved >= 15


def test_detection_box_cropped_out_disappears_with_label():
    img = torch.zeros((1, 100, 100))
    target = {
        "boxes": torch.tensor([[0, 0, 8, 8], [40, 40, 60, 60]], dtype=torch.float32),
        "labels": torch.tensor([1, 2]),
        "iscrowd": torch.tensor([0, 0]),
        "area": torch.tensor([64.0, 400.0]),
    }
    # Scale 1.5 with the crop window at the bottom-right: the top-left box leaves the image.
    policy = DetectionPolicy(hflip=0.0, scale_jitter=(1.5, 1.5), brightness=0.0, contrast=0.0)

    t = DetectionTransform(policy, train=True)
    t._rand = lambda: 0.999  # type: ignore[method-assign]  (crop window at the far corner)
    out, tgt = t(img, target)
    assert tgt["labels"].tolist() == [2] and tgt["iscrowd"].tolist() == [0]
    assert tgt["boxes"].shape == (1, 4)
    np.testing.assert_allclose(tgt["boxes"][0].numpy(), [10, 10, 40, 40], atol=1)
    np.testing.assert_allclose(tgt["area"].numpy(), [900.0], atol=60)


def test_detection_eval_is_identity_and_train_is_deterministic():
    img, target = _rect_image()
    img = img + torch.rand(img.shape, generator=torch.Generator().manual_seed(1)) * 0.1
    out, tgt = DetectionTransform(DetectionPolicy(), train=False)(img, target)
    assert out is img and tgt is target
    runs = []
    for _ in range(2):
        t = DetectionTransform(DetectionPolicy(), True, torch.Generator().manual_seed(5))
        runs.append([t(img.clone(), dict(target)) for _ in range(4)])
    for (a, ta), (b, tb) in zip(*runs, strict=True):
        assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])
    torch.manual_seed(3)
    g1 = DetectionTransform(DetectionPolicy(), True)(img, target)[0]
    torch.manual_seed(3)
    assert torch.equal(g1, DetectionTransform(DetectionPolicy(), True)(img, target)[0])


def test_detection_photometric_stays_in_range():
    img = torch.rand((1, 32, 32), generator=torch.Generator().manual_seed(0))
    policy = DetectionPolicy(hflip=0.0, scale_jitter=(1.0, 1.0), brightness=0.5, contrast=0.5)
    t = DetectionTransform(policy, True, torch.Generator().manual_seed(0))
    outs = [
        t(img, {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64)})[0]
        for _ in range(8)
    ]
    assert all(o.min() >= 0.0 and o.max() <= 1.0 for o in outs)
    assert any(not torch.allclose(o, img) for o in outs)


def test_detection_policy_validation():
    assert parse(DetectionPolicy, {"scale_jitter": [0.9, 1.1]}).scale_jitter == (0.9, 1.1)
    with pytest.raises(ConfigError, match="scale_jitter"):
        parse(DetectionPolicy, {"scale_jitter": [1.2, 0.8]})
    with pytest.raises(ConfigError, match="hflip"):
        parse(DetectionPolicy, {"hflip": 1.5})
    with pytest.raises(ConfigError, match="rotate"):
        parse(DetectionPolicy, {"rotate": 5})


# ----------------------------------------------------------------------------- classification


@pytest.fixture(scope="module")
def tf():
    import tensorflow

    return tensorflow


def _batch(n: int = 8, size: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (n, size, size, 1)).astype(np.float32)


def _cls_policy(**kw):
    from stages.classifier.augment import ClassificationPolicy

    zero = dict(
        rotation=0.0, zoom=0.0, shear=0.0, shift=0.0, hflip=False, brightness=0.0, contrast=0.0
    )
    return ClassificationPolicy(**{**zero, **kw})


def test_classification_zero_policy_is_identity(tf):
    from stages.classifier.augment import build_augmenter

    x = _batch()
    out = build_augmenter(_cls_policy(), seed=1)(x)
    np.testing.assert_array_equal(out.numpy(), x)


def test_classification_default_policy_shape_range_determinism(tf):
    from stages.classifier.augment import ClassificationPolicy, build_augmenter

    x = _batch()
    aug = build_augmenter(ClassificationPolicy(), seed=3)
    a, b = aug(x, 0), aug(x, 1)
    assert a.shape == x.shape and a.dtype == tf.float32
    assert float(tf.reduce_min(a)) >= 0.0 and float(tf.reduce_max(a)) <= 255.0
    assert not np.allclose(a.numpy(), x) and not np.allclose(a.numpy(), b.numpy())
    np.testing.assert_array_equal(
        a.numpy(), build_augmenter(ClassificationPolicy(), 3)(x, 0).numpy()
    )
    assert not np.allclose(a.numpy(), build_augmenter(ClassificationPolicy(), 4)(x, 0).numpy())
    # Without a step, a seeded generator supplies one: same sequence for the same seed.
    s1, s2 = build_augmenter(ClassificationPolicy(), 9), build_augmenter(ClassificationPolicy(), 9)
    for _ in range(2):
        np.testing.assert_array_equal(s1(x).numpy(), s2(x).numpy())


def test_classification_hflip_only_flips_exactly(tf):
    from stages.classifier.augment import build_augmenter

    x = _batch(n=32)
    out = build_augmenter(_cls_policy(hflip=True), seed=0)(x, 0).numpy()
    flipped = [np.array_equal(o, xi[:, ::-1]) for o, xi in zip(out, x, strict=True)]
    same = [np.array_equal(o, xi) for o, xi in zip(out, x, strict=True)]
    assert all(f or s for f, s in zip(flipped, same, strict=True))
    assert 4 <= sum(flipped) <= 28


def test_classification_geometry_keeps_centre_and_bounds_shift(tf):
    from stages.classifier.augment import build_augmenter

    size = 65  # odd: the centre is a pixel
    x = np.zeros((16, size, size, 1), np.float32)
    x[:, 30:35, 30:35] = 255.0  # blob centred at pixel 32
    rot = build_augmenter(_cls_policy(rotation=40.0, zoom=0.3, shear=0.3, hflip=True), 0)(x, 0)
    for img in rot.numpy()[..., 0]:
        ys, xs = np.nonzero(img > 127)
        assert abs(xs.mean() - 32) < 1.0 and abs(ys.mean() - 32) < 1.0
    shifted = build_augmenter(_cls_policy(shift=0.2), 0)(x, 0).numpy()[..., 0]
    offsets = []
    for img in shifted:
        ys, xs = np.nonzero(img > 127)
        offsets.append((xs.mean() - 32, ys.mean() - 32))
    offsets = np.abs(np.array(offsets))
    assert offsets.max() <= 0.2 * size + 1 and offsets.max() > 2


def test_classification_nearest_fill_has_no_black_corners(tf):
    from stages.classifier.augment import build_augmenter

    x = np.full((4, 40, 40, 1), 100.0, np.float32)
    out = build_augmenter(_cls_policy(rotation=30.0, zoom=0.3, shift=0.2), 0)(x, 0).numpy()
    np.testing.assert_allclose(out, 100.0, atol=1e-3)
    const = build_augmenter(_cls_policy(rotation=30.0, zoom=0.3, fill_mode="constant"), 0)(x, 0)
    assert float(tf.reduce_min(const)) == 0.0


def test_classification_photometric(tf):
    from stages.classifier.augment import build_augmenter

    x = _batch(n=16)
    out = build_augmenter(_cls_policy(brightness=0.1), 0)(x, 0).numpy()
    delta = out - x
    inside = (out > 0) & (out < 255)  # clipping aside, one constant shift per image
    for d, m in zip(delta, inside, strict=True):
        assert np.ptp(d[m]) < 1e-3 and abs(d[m][0]) <= 25.5 + 1e-3


def test_classification_in_tf_data_parallel_is_deterministic(tf):
    from stages.classifier.augment import ClassificationPolicy, augment_dataset

    x, y = _batch(n=24), np.arange(24, dtype=np.int64)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)

    def epoch(d):
        return [(a.numpy(), b.numpy()) for a, b in d]

    runs = [epoch(augment_dataset(ds, ClassificationPolicy(), 5, n)) for n in (1, 4)]
    assert len(runs[0]) == 3 and runs[0][0][0].shape == (8, 48, 48, 1)
    for (a1, b1), (a2, b2) in zip(*runs, strict=True):
        np.testing.assert_array_equal(a1, a2)
        np.testing.assert_array_equal(b1, b2)
    assert not np.allclose(runs[0][0][0], x[:8])
    images_only = tf.data.Dataset.from_tensor_slices(x).batch(8)
    first = next(iter(augment_dataset(images_only, ClassificationPolicy(), 5)))
    np.testing.assert_array_equal(first.numpy(), runs[0][0][0])
    # A second pass over the same dataset (next epoch) draws anew; a rebuilt one repeats.
    aug = augment_dataset(ds, ClassificationPolicy(), 5)
    e1, e2 = epoch(aug), epoch(aug)
    np.testing.assert_array_equal(e1[0][0], runs[0][0][0])
    assert not np.allclose(e1[0][0], e2[0][0])


@pytest.mark.parametrize("fill_mode", ["nearest", "constant"])
def test_classification_warp_matches_tf_kernel(tf, fill_mode):
    from stages.classifier.augment import ClassificationPolicy, _affine, _warp

    x = tf.constant(_batch(n=6, size=37))
    policy = ClassificationPolicy(rotation=30.0, zoom=0.3, shear=0.3, shift=0.2)
    transforms = _affine(policy, tf.constant([1, 2], tf.int64), 6, 37, 37)
    ref = tf.raw_ops.ImageProjectiveTransformV3(
        images=x,
        transforms=transforms,
        output_shape=[37, 37],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode=fill_mode.upper(),
    )
    got = _warp(x, transforms, fill_mode == "constant")
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-2)


def test_classification_policy_validation():
    from stages.classifier.augment import ClassificationPolicy

    assert parse(ClassificationPolicy, {"zoom": 0.3}).zoom == 0.3
    with pytest.raises(ConfigError, match="zoom"):
        parse(ClassificationPolicy, {"zoom": 1.5})
    with pytest.raises(ConfigError, match="fill_mode"):
        parse(ClassificationPolicy, {"fill_mode": "wrap"})
    with pytest.raises(ConfigError, match="vflip"):
        parse(ClassificationPolicy, {"vflip": True})


# ----------------------------------------------------------------------------- the stage

MANIFEST_COLUMNS = list(intake.MANIFEST_COLUMNS)
CATEGORIES = [{"id": 1, "name": "Nodule"}, {"id": 2, "name": "Mass"}]


def _write_split_inputs(root, task: str, sizes: dict[str, int]) -> dict:
    """Tiny split stage output under root/data/split/<task>, images under root/data/raw/<task>.

    Paths are relative (the stage runs from the repo root): the test chdirs into ``root``.
    Detection images are 80x120 (non-square, exercises pad) with a white box per annotation.
    """
    import pandas as pd

    from stages.common.imageio import save_gray_png

    rng = np.random.default_rng(0)
    labels = (
        ["NORMAL", "PNEUMONIA", "COVID"] if task == "classification" else ["abnormal", "normal"]
    )
    split_dir = root / "data" / "split" / task
    split_dir.mkdir(parents=True)
    truth = {}
    for split, n in sizes.items():
        rows, coco = [], {"images": [], "annotations": [], "categories": CATEGORIES}
        for i in range(n):
            h, w = (
                (80, 120)
                if task == "detection"
                else (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
            )
            img = rng.integers(0, 90, size=(h, w), dtype=np.uint8)
            label = labels[i % 2] if (split != "train" or task == "detection") else labels[i % 3]
            boxes = []
            if task == "detection" and label == "abnormal":
                x, y = int(rng.integers(0, 70)), int(rng.integers(0, 40))
                boxes = (
                    [[x, y, 30 + i % 7, 24], [x + 5, y + 3, 6, 5]]
                    if i % 4 == 0
                    else [[x, y, 30, 24 + i % 5]]
                )
                img[y : y + boxes[0][3], x : x + boxes[0][2]] = 255
            path = f"data/raw/{task}/images/{split}_{i:02d}.png"
            save_gray_png(img, root / path)
            rows.append(
                [path, label, "", f"syn:{split}{i // 2}", "synthetic", "", w, h, f"sha{split}{i}"]
            )
            coco["images"].append({"id": 500 + i, "file_name": path, "width": w, "height": h})
            for j, b in enumerate(boxes):
                coco["annotations"].append(
                    {
                        "id": 10 * i + j,
                        "image_id": 500 + i,
                        "category_id": 1 + j % 2,
                        "bbox": b,
                        "area": b[2] * b[3],
                        "iscrowd": 0,
                    }
                )
            truth[(split, i)] = (img, boxes)
        df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS).assign(split=split)
        df.to_csv(split_dir / f"{split}.csv", index=False)
        if task == "detection":
            (split_dir / f"{split}.json").write_text(json.dumps(coco))
    return truth


def _cfg(task: str, **kw):
    from stages.common.utils import task_module

    base = {"image_size": 64, "preview_count": 4}
    return parse(task_module(task, "config").AUGMENT_CONFIG, {**base, **kw}, f"augment.{task}")


def _run(root, task: str, **kw) -> dict:
    from stages.augment import run

    return run(
        task,
        _cfg(task, **kw),
        root / "data/split" / task,
        root / "data/augment" / task,
        root / "reports/augment" / f"{task}_preview.png",
    )


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _check_preview(path, rows: int) -> None:
    from PIL import Image

    assert path.is_file()
    img = np.asarray(Image.open(path).convert("L"))
    assert img.shape[0] > 100 * rows and img.shape[1] > 400 and img.std() > 20


def test_stage_classification(in_tmp):
    from stages.common.cache import load_policy, open_split, resize_gray
    from stages.common.imageio import load_gray

    _write_split_inputs(in_tmp, "classification", {"train": 7, "val": 2, "test": 2})
    summary = _run(in_tmp, "classification", resize="stretch")
    cache_dir = in_tmp / "data/augment/classification"
    assert summary["counts"] == {"train": 7, "val": 2, "test": 2}
    train = open_split(cache_dir, "train")
    assert train.meta["classes"] == ["COVID", "NORMAL", "PNEUMONIA"]
    # meta.json is a training input: train/val counts only (a new test set must not retrain)
    assert train.meta["counts"] == {"train": 7, "val": 2} and train.meta["image_size"] == 64
    assert train.meta["intensity"] == "none"
    assert (
        train.images.shape == (7, 64, 64) and train.images.dtype == np.uint8 and train.coco is None
    )
    for i, row in train.index.iterrows():  # same order as the index, resized as documented
        assert train.meta["classes"][row["label_index"]] == row["label"]
        np.testing.assert_array_equal(
            train.images[i], resize_gray(load_gray(row["path"]), 64, "stretch")[0]
        )
    assert load_policy(cache_dir)["rotation"] == 10.0
    assert list(open_split(cache_dir, "val").index["label"]) == ["NORMAL", "PNEUMONIA"]
    _check_preview(in_tmp / "reports/augment/classification_preview.png", 4)
    assert not [p for p in (in_tmp / "data/augment").iterdir() if p.name.startswith(".")]


def test_stage_classification_standardize_is_in_the_cache_and_its_meta(in_tmp):
    """intensity: standardize - each cached image is prepare_gray's, recorded in meta.json
    (training copies it into the model sidecar; serving repeats it)."""
    from stages.common.cache import open_split, prepare_gray
    from stages.common.imageio import load_gray

    _write_split_inputs(in_tmp, "classification", {"train": 4, "val": 2, "test": 2})
    _run(in_tmp, "classification", resize="stretch", intensity="standardize")
    train = open_split(in_tmp / "data/augment/classification", "train")
    assert train.meta["intensity"] == "standardize"
    for i, row in train.index.iterrows():
        want = prepare_gray(load_gray(row["path"]), 64, "stretch", "standardize")[0]
        np.testing.assert_array_equal(train.images[i], want)
        assert abs(float(train.images[i].mean()) - 128) < 6  # standardised, not raw


@pytest.mark.parametrize("task", ["classification", "detection"])
def test_preview_title_lies_inside_the_figure(in_tmp, monkeypatch, task):
    """A long policy (many keys, long values) is wrapped, not cut off: the saved figure's title
    (size line and the whole policy) is inside the picture, every key of the policy in it."""
    import matplotlib.figure

    saved = []
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(fig, *args, **kwargs):  # measures the title as saved (the stage then closes it)
        real_savefig(fig, *args, **kwargs)
        fig.set_dpi(kwargs.get("dpi", fig.dpi))
        fig.canvas.draw()
        (title,) = [t for t in fig.texts if "policy" in t.get_text()]
        box = title.get_window_extent(fig.canvas.get_renderer())
        saved.append((title.get_text(), box, fig.bbox.frozen()))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    long = {"rotation": 12.3456789, "brightness": 0.0987654321, "contrast": 0.123456789}
    if task == "detection":
        long = {"brightness": 0.0987654321, "contrast": 0.123456789, "hflip": 0.4567891234,
                "scale_jitter": [0.812345678901, 1.234567890123]}  # fmt: skip
    _write_split_inputs(in_tmp, task, {"train": 4, "val": 2, "test": 2})
    _run(in_tmp, task, resize="pad" if task == "detection" else "stretch", policy=long)
    ((title, box, frame),) = saved
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1, (box, frame)
    assert frame.y0 <= box.y0 and box.y1 <= frame.y1, (box, frame)
    assert all(f"{k}={v}" in title.replace(",\n", ", ") for k, v in long.items()), title
    if task == "classification":  # twelve keys: wider than the figure unless wrapped
        assert title.count("\n") >= 2


def test_wrap_to_width_keeps_every_part_and_cuts_only_what_cannot_fit():
    from stages.augment import wrap_to_width

    lines = wrap_to_width(["aa", "bbb", "cc", "d" * 12], ", ", 8, len)
    assert lines == ["aa, bbb,", "cc,", "dddddddd", "dddd"]
    assert all(len(line) <= 8 for line in lines)
    assert wrap_to_width([], ", ", 8, len) == []


def test_stage_detection_boxes_in_cache_pixels(in_tmp):
    from stages.common.cache import boxes_for, open_split

    truth = _write_split_inputs(in_tmp, "detection", {"train": 8, "val": 2, "test": 2})
    summary = _run(in_tmp, "detection", resize="pad")
    assert summary["dropped_boxes"] == 0
    cache_dir = in_tmp / "data/augment/detection"
    train = open_split(cache_dir, "train")
    assert train.meta["classes"] == ["Nodule", "Mass"]
    assert train.coco["categories"] == CATEGORIES
    assert [im["id"] for im in train.coco["images"]] == list(range(8))
    assert [im["file_name"] for im in train.coco["images"]] == list(train.index["path"])
    for i in range(8):
        img, boxes = truth[("train", i)]
        got, cats = boxes_for(train.coco, i)
        assert len(got) == len(boxes) and train.index["label_index"][i] == int(bool(boxes))
        # Pad geometry: 120x80 -> content 64x43 (exact per-axis scales), centred: 10 px on top.
        sx, sy, top = 64 / 120, 43 / 80, 10
        for b, g in zip(boxes, got, strict=True):
            expect = [b[0] * sx, b[1] * sy + top, (b[0] + b[2]) * sx, (b[1] + b[3]) * sy + top]
            np.testing.assert_allclose(g, expect, atol=1e-3)
        if boxes:  # the white rectangle in the cache image sits inside its box
            ys, xs = np.nonzero(train.images[i] > 200)
            np.testing.assert_allclose(
                [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], got[0], atol=1.5
            )
        assert train.images[i][:top].max() == 0  # padding band is black
    _check_preview(in_tmp / "reports/augment/detection_preview.png", 4)


def test_stage_is_deterministic(in_tmp):
    from stages.common.cache import split_path

    _write_split_inputs(in_tmp, "detection", {"train": 5, "val": 1, "test": 1})
    blobs = []
    for _ in range(2):
        _run(in_tmp, "detection", preview_count=0)
        d = in_tmp / "data/augment/detection"
        blobs.append(
            [
                (split_path(d, s) / f).read_bytes()
                for s in ("train", "val", "test")
                for f in ("images.npy", "index.csv", "annotations.json")
            ]
        )
    assert blobs[0] == blobs[1]


def test_stage_empty_train_is_a_clear_error(in_tmp):
    from stages.common.utils import StageError

    _write_split_inputs(in_tmp, "classification", {"train": 0, "val": 2, "test": 2})
    with pytest.raises(StageError, match="train.csv has no rows"):
        _run(in_tmp, "classification")
    assert not (in_tmp / "data/augment/classification").exists()


def test_stage_missing_split_and_missing_image(in_tmp):
    from stages.common.utils import StageError

    with pytest.raises(StageError, match="run the split stage"):
        _run(in_tmp, "classification")
    _write_split_inputs(in_tmp, "classification", {"train": 3, "val": 1, "test": 1})
    (in_tmp / "data/raw/classification/images/train_01.png").unlink()
    with pytest.raises(StageError, match="train_01.png"):
        _run(in_tmp, "classification")
    assert not (in_tmp / "data/augment/classification").exists()  # nothing half-written


def test_stage_config_errors(in_tmp, params):
    import yaml

    from stages.augment import main

    params["augment"]["detection"]["policy"] = {"hflip": 0.5, "rotation": 10}
    (in_tmp / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"augment\.detection\.policy.*'rotation'"):
        main(["--task", "detection"])
    params["augment"]["detection"]["policy"] = {}
    params["augment"]["detection"]["resize"] = "crop"
    (in_tmp / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match="'stretch' | 'pad'"):
        main(["--task", "detection"])
    assert not (in_tmp / "data/augment").exists()


def test_stage_cli_with_repo_params(in_tmp, params):
    import yaml

    from stages.augment import main

    _write_split_inputs(in_tmp, "detection", {"train": 3, "val": 1, "test": 1})
    params["augment"]["detection"]["preview_count"] = 2
    (in_tmp / "params.yaml").write_text(yaml.safe_dump(params))
    summary = main(["--task", "detection"])
    assert summary["counts"] == {"train": 3, "val": 1, "test": 1}
    assert (in_tmp / "data/augment/detection/fit/train/images.npy").is_file()
    assert (in_tmp / "reports/augment/detection_preview.png").is_file()


def test_photometric_transforms_are_seeded_bounded_and_off_by_default():
    import tensorflow as tf

    from stages.classifier.augment import build_augmenter
    from stages.classifier.config import ClassificationPolicy

    rng = np.random.default_rng(0)
    x = tf.constant(rng.integers(40, 200, (6, 32, 32, 1)).astype(np.float32))
    off = ClassificationPolicy(rotation=0, zoom=0, shear=0, shift=0, hflip=False, brightness=0,
                               contrast=0)  # fmt: skip
    assert not off.active
    np.testing.assert_array_equal(build_augmenter(off, 1)(x, 3).numpy(), x.numpy())
    for knob in ({"gamma": 0.5}, {"blur": 1.0}, {"noise": 0.05}, {"erase": 0.4}):
        policy = parse(ClassificationPolicy, {**{k: 0 for k in ("rotation", "zoom", "shear",
                       "shift", "brightness", "contrast")}, "hflip": False, **knob})  # fmt: skip
        a = build_augmenter(policy, 1)(x, 3).numpy()
        b = build_augmenter(policy, 1)(x, 3).numpy()
        c = build_augmenter(policy, 1)(x, 4).numpy()
        np.testing.assert_array_equal(a, b)  # a pure function of (seed, step)
        assert not np.array_equal(a, c) and not np.array_equal(a, x.numpy()), knob
        assert a.min() >= 0 and a.max() <= 255 and a.shape == x.shape
        if "erase" in knob:  # erased pixels hold the image mean; the rest is untouched
            changed = a != x.numpy()
            assert changed.any() and (changed.sum(axis=(1, 2, 3)) == 0).any()  # half the images
    with pytest.raises(ConfigError, match="erase"):
        parse(ClassificationPolicy, {"erase": 0.05})


def test_blur_spans_sharp_to_fully_smoothed():
    # ours-kermany-best relies on blur 1.0 hiding train's sharpness gap between classes: each
    # image's sharpness must land anywhere between its own and that of a full 3x3 Gaussian.
    import tensorflow as tf
    from scipy.ndimage import convolve

    from stages.classifier.augment import build_augmenter
    from stages.classifier.config import ClassificationPolicy

    def sharpness(a):  # mean |horizontal difference| per image, away from the padded border
        return np.abs(np.diff(a[:, 2:-2, 2:-2, 0], axis=2)).mean(axis=(1, 2))

    rng = np.random.default_rng(1)
    x = rng.integers(30, 220, (8, 40, 40, 1)).astype(np.float32)
    k = np.array([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0
    full = np.stack([convolve(im[..., 0], k, mode="constant")[..., None] for im in x])
    policy = parse(ClassificationPolicy, {**{k: 0 for k in ("rotation", "zoom", "shear", "shift",
                   "brightness", "contrast")}, "hflip": False, "blur": 1.0})  # fmt: skip
    s = np.stack([sharpness(build_augmenter(policy, 2)(tf.constant(x), step).numpy())
                  for step in range(6)])  # fmt: skip
    lo, hi = sharpness(full), sharpness(x)
    assert (lo < 0.7 * hi).all()  # the full Gaussian takes at least 30 % off on this texture
    assert (s >= lo - 1e-3).all() and (s <= hi + 1e-3).all()
    assert s.min() < lo.max() + 0.3 * (hi - lo).max() and s.max() > hi.min() - 0.3 * (hi - lo).max()
    assert len(np.unique(np.round(s, 3))) > 20  # a fresh weight per image and step


def test_aspect_scales_the_width_alone_both_ways():
    # aspect exists against an aspect-ratio shortcut (Kermany's 224 px copy squeezed wider
    # films more): each image's width must scale by exp(U(-x, x)) while its height stays put.
    import tensorflow as tf

    from stages.classifier.augment import build_augmenter
    from stages.classifier.config import ClassificationPolicy

    x = np.zeros((16, 64, 64, 1), np.float32)
    x[:, 17:47, 22:42] = 255.0  # a 20 px wide, 30 px high bright box, centred
    keys = ("rotation", "zoom", "shear", "shift", "brightness", "contrast")
    policy = parse(ClassificationPolicy, {**dict.fromkeys(keys, 0), "hflip": False, "aspect": 0.4})
    assert policy.geometric and policy.active
    a = build_augmenter(policy, 1)(tf.constant(x), 3).numpy()[..., 0]
    np.testing.assert_array_equal(a, build_augmenter(policy, 1)(tf.constant(x), 3).numpy()[..., 0])
    widths = (a[:, 32] > 127.5).sum(axis=1)  # the middle row
    heights = (a[:, :, 32] > 127.5).sum(axis=1)  # the middle column
    np.testing.assert_array_equal(heights, 30)
    assert widths.min() >= 20 * np.exp(-0.4) - 1 and widths.max() <= 20 * np.exp(0.4) + 1
    assert widths.min() < 18 and widths.max() > 22  # squeezed and stretched within one batch
    off = parse(ClassificationPolicy, {**dict.fromkeys(keys, 0), "hflip": False, "aspect": 0.0})
    assert not off.active
    with pytest.raises(ConfigError, match="aspect must be in"):
        parse(ClassificationPolicy, {"aspect": 0.6})


def test_stage_classes_come_from_train_only(in_tmp):
    """A label seen only in val or test is no model class (the model could never learn it):
    its rows get label_index -1, which training and evaluation leave out."""
    import pandas as pd

    from stages.common.cache import open_split

    _write_split_inputs(in_tmp, "classification", {"train": 2, "val": 3, "test": 3})
    split_dir = in_tmp / "data/split/classification"
    for split, label in (("val", "COVID"), ("test", "LUNG_OPACITY")):
        df = pd.read_csv(split_dir / f"{split}.csv", dtype=str, keep_default_na=False)
        df.loc[0, "label"] = label
        df.to_csv(split_dir / f"{split}.csv", index=False)
    _run(in_tmp, "classification", preview_count=0)
    cache_dir = in_tmp / "data/augment/classification"
    train = open_split(cache_dir, "train")
    assert train.meta["classes"] == ["NORMAL", "PNEUMONIA"]
    for split, label in (("val", "COVID"), ("test", "LUNG_OPACITY")):
        index = open_split(cache_dir, split).index
        assert index.loc[index["label"] == label, "label_index"].tolist() == [-1]
        assert (index.loc[index["label"] != label, "label_index"] >= 0).all()
