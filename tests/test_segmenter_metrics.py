"""Segmentation metrics on constructed masks: Dice, IoU, HD95 (checked against MONAI), the
bootstrap interval, and the evaluation's summary and headline."""

from __future__ import annotations

import numpy as np
import pytest

from stages.segmenter import metrics as SM
from stages.segmenter.config import EvalSegmentationConfig
from stages.segmenter.evaluate import build_evaluation, headline, image_keys


def square(size: int = 64, x0: int = 16, y0: int = 16, side: int = 24) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m[y0 : y0 + side, x0 : x0 + side] = True
    return m


def test_identical_masks_score_perfectly():
    m = square()
    assert SM.dice_scores(m, m)[0] == 1.0 and SM.iou_scores(m, m)[0] == 1.0
    assert SM.hd95(m, m) == 0.0


def test_disjoint_masks_score_zero():
    a, b = square(x0=0, y0=0, side=10), square(x0=40, y0=40, side=10)
    assert SM.dice_scores(a, b)[0] == 0.0 and SM.iou_scores(a, b)[0] == 0.0
    assert SM.hd95(a, b) > 40


@pytest.mark.parametrize("shift", [1, 3, 7])
def test_a_known_shift_gives_its_hd95(shift):
    """A square moved by d px: every surface distance is 0 or d, and a whole side (a quarter
    of the surface) is d away, so the 95th percentile is d; Dice and IoU follow the overlap."""
    a, b = square(), square(x0=16 + shift)
    assert SM.hd95(a, b) == pytest.approx(shift)
    overlap = 24 * (24 - shift)
    assert SM.dice_scores(a, b)[0] == pytest.approx(2 * overlap / (2 * 24 * 24))
    assert SM.iou_scores(a, b)[0] == pytest.approx(overlap / (2 * 24 * 24 - overlap))


def test_empty_masks():
    empty, m = np.zeros((32, 32), bool), square(32, 8, 8, 8)
    assert SM.dice_scores(empty, empty)[0] == 1.0 and SM.hd95(empty, empty) == 0.0
    assert SM.dice_scores(m, empty)[0] == 0.0
    assert SM.hd95(m, empty) == pytest.approx(np.hypot(32, 32))


def test_hd95_equals_monai():
    import torch
    from monai.metrics import compute_hausdorff_distance

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:80, :80]
    for _ in range(5):
        masks = []
        for _ in range(2):
            cx, cy, rx, ry = rng.uniform(25, 55, 2).tolist() + rng.uniform(8, 20, 2).tolist()
            blob = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
            blob[rng.integers(0, 80, 30), rng.integers(0, 80, 30)] ^= True  # ragged edges
            masks.append(blob)
        ours = SM.hd95(masks[0], masks[1])
        pred = torch.from_numpy(masks[1])[None, None].float()
        gt = torch.from_numpy(masks[0])[None, None].float()
        theirs = float(compute_hausdorff_distance(pred, gt, percentile=95))
        assert ours == pytest.approx(theirs, abs=1e-4)


def test_bootstrap_interval_brackets_the_mean():
    values = np.random.default_rng(1).uniform(0.8, 1.0, 200)
    low, high = SM.bootstrap_mean_ci(values, 500, 0.95, seed=0)
    assert low < values.mean() < high and high - low < 0.02
    assert SM.bootstrap_mean_ci(values, 0, 0.95, 0) is None
    assert SM.bootstrap_mean_ci(values, 500, 0.95, 0) == (low, high)  # seeded


def test_evaluation_document_and_headline_keys():
    per = {
        "dice": np.array([0.9, 0.8, 1.0, 0.7]),
        "iou": np.array([0.8, 0.7, 1.0, 0.5]),
        "hd95": np.array([2.0, 4.0, 0.0, 9.0]),
    }
    cfg = EvalSegmentationConfig(bootstrap=100)
    meta = {"image_size": 256, "resize": "pad"}
    one = build_evaluation(per, np.array(["lung_masks"] * 4), cfg, meta)
    assert headline(one) == pytest.approx({"n_test": 4, "dice": 0.85, "iou": 0.75, "hd95": 3.75})
    assert one["hd95_unit"] == "pixels of the 256 px cache image" and one["threshold"] == 0.5
    assert one["dice_ci"][0] <= 0.85 <= one["dice_ci"][1] and "test_sets" not in one
    two = build_evaluation(per, np.array(["lung_masks", "lung_masks_2"] * 2), cfg, meta)
    head = headline(two)
    assert set(head) == {
        "n_test",
        "dice",
        "iou",
        "hd95",
        *(f"test_{s}_{k}" for s in ("lung_masks", "lung_masks_2") for k in ("dice", "iou", "hd95")),
    }
    assert head["test_lung_masks_2_dice"] == pytest.approx(0.75)
    assert two["test_sets"]["lung_masks"]["n_test"] == 2


def test_image_keys_are_the_path_below_images():
    import pandas as pd

    keys, sources = image_keys(
        pd.Series(
            [
                "data/raw/segmentation/images/lung_masks/CHNCXR_0001_0.png",
                "data/raw/segmentation/images/lung_masks_2/covid case 1_0.png",
            ]
        )
    )
    assert list(keys) == ["lung_masks/CHNCXR_0001_0.png", "lung_masks_2/covid case 1_0.png"]
    assert list(sources) == ["lung_masks", "lung_masks_2"]
