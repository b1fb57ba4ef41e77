"""FROC (ChestX-Det10 metric) on hand-made cases whose values are worked out in the comments."""

from __future__ import annotations

import numpy as np
import pytest

import stages  # noqa: F401  (torch before anything else)
from stages.detector.froc import (
    evaluate_froc,
    froc_curve,
    iou_matrix,
    match_image,
    mean_curve,
)

RATES = (0.05, 0.1, 0.2)
BOX = [10.0, 10.0, 30.0, 30.0]
FAR = [60.0, 60.0, 80.0, 80.0]  # no overlap with BOX


def gt(boxes=(), labels=()):
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64)


def pred(boxes=(), scores=(), labels=()):
    return {
        "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        "scores": np.asarray(scores, dtype=np.float32),
        "labels": np.asarray(labels, dtype=np.int64),
    }


def recalls(result, cls=None):
    table = result.recall_at if cls is None else result.per_class[cls]["recall_at"]
    return [table[r] for r in RATES]


def test_perfect_predictions():
    gts = [gt([BOX], [1]), gt([BOX, FAR], [1, 1]), gt(), gt([FAR], [1])]
    preds = [pred(g[0], np.linspace(0.9, 0.5, len(g[0])), g[1]) for g in gts]
    res = evaluate_froc(preds, gts, [1], RATES)
    assert recalls(res) == [1.0, 1.0, 1.0]
    assert res.avg_recall == 1.0
    assert res.per_class[1]["n_tp"] == 4 and res.per_class[1]["n_fp"] == 0


def test_all_miss_and_no_predictions():
    gts = [gt([BOX], [1]), gt([BOX], [1])]
    misses = [pred([FAR], [0.9], [1]), pred([FAR, FAR], [0.8, 0.7], [1, 1])]
    res = evaluate_froc(misses, gts, [1], RATES)
    assert recalls(res) == [0.0, 0.0, 0.0] and res.avg_recall == 0.0
    assert res.per_class[1]["n_fp"] == 3
    empty = evaluate_froc([pred(), pred()], gts, [1], RATES)
    assert empty.avg_recall == 0.0 and empty.per_class[1]["n_fp"] == 0


def test_one_fp_per_image_all_gt_hit_first():
    # 10 images, one GT each, hit at score 0.9; one FP per image below. FP/image climbs in
    # steps of 0.1 only after every GT is found, so sensitivity is 1 at every rate.
    gts = [gt([BOX], [1]) for _ in range(10)]
    preds = [pred([BOX, FAR], [0.9, 0.5 - 0.01 * i], [1, 1]) for i in range(10)]
    res = evaluate_froc(preds, gts, [1], RATES)
    assert recalls(res) == [1.0, 1.0, 1.0]
    curve = res.curves[1]
    # (0, 0), all ten TPs at one tied score, then ten FP steps of 0.1.
    np.testing.assert_allclose(curve.fps_per_image, [0.0, 0.0] + [0.1 * k for k in range(1, 11)])
    np.testing.assert_allclose(curve.sensitivity, [0.0] + [1.0] * 11)


def test_fps_interleaved_with_hits():
    # 10 images, one GT each. Ranking: TP, TP, FP, TP, FP, 7 TPs, 8 FPs.
    # rate 0.05 -> 0.5 FP allowed -> 0 FPs -> 2/10; 0.1 -> 1 FP -> 3/10; 0.2 -> 2 FPs -> 10/10.
    tp_scores = [0.99, 0.98, 0.96] + [0.60 - 0.01 * i for i in range(7)]
    fp_scores = [0.97, 0.95] + [0.30 - 0.01 * i for i in range(8)]
    gts = [gt([BOX], [1]) for _ in range(10)]
    preds = [pred([BOX, FAR], [tp_scores[i], fp_scores[i]], [1, 1]) for i in range(10)]
    res = evaluate_froc(preds, gts, [1], RATES)
    np.testing.assert_allclose(recalls(res), [0.2, 0.3, 1.0])
    assert res.avg_recall == pytest.approx(0.5)


def test_duplicates_of_one_hit_are_false_positives():
    # Greedy by score: the 0.9 box (IoU 0.6) takes the GT, the better-placed 0.8 box is a duplicate.
    dup = [10.0, 10.0, 30.0, 30.0]
    first = [10.0, 10.0, 30.0, 22.0]  # IoU with BOX: (20 * 12) / (20 * 20) = 0.6
    assert iou_matrix([first], [BOX])[0, 0] == pytest.approx(0.6)
    flags = match_image(
        np.array([dup, first]), np.array([0.8, 0.9]), np.array([1, 1]), *gt([BOX], [1])
    )
    assert flags.tolist() == [False, True]
    res = evaluate_froc([pred([dup, first], [0.8, 0.9], [1, 1])], [gt([BOX], [1])], [1], RATES)
    assert res.per_class[1]["n_tp"] == 1 and res.per_class[1]["n_fp"] == 1
    assert recalls(res) == [1.0, 1.0, 1.0]  # the hit ranks above its duplicate


def test_wrong_class_box_is_not_a_hit():
    res = evaluate_froc([pred([BOX], [0.9], [2])], [gt([BOX], [1])], [1, 2], RATES)
    assert recalls(res, 1) == [0.0, 0.0, 0.0]
    assert recalls(res, 2) == [None, None, None]  # class 2 has no GT: undefined, left out
    assert res.per_class[2]["n_fp"] == 1 and res.per_class[2]["avg_recall"] is None
    assert res.avg_recall == 0.0  # mean over class 1 only


def test_iou_exactly_at_threshold_counts():
    half = [10.0, 10.0, 30.0, 20.0]  # half of BOX: IoU 200/400 = 0.5 exactly
    below = [10.0, 10.0, 30.0, 19.9]
    assert iou_matrix([half], [BOX])[0, 0] == 0.5
    assert match_image(np.array([half]), np.array([0.5]), np.array([1]), *gt([BOX], [1]))[0]
    assert not match_image(np.array([below]), np.array([0.5]), np.array([1]), *gt([BOX], [1]))[0]
    assert not match_image(np.array([half]), np.array([0.5]), np.array([1]), *gt([BOX], [1]), 0.51)[
        0
    ]


def test_normal_images_count_in_fp_rate():
    # 10 images: image 0 has a GT hit at 0.5; normal images 1 and 2 hold FPs at 0.9 and 0.8.
    # FP/image counts all 10 images: 0.05 -> 0 FPs allowed -> 0; 0.1 -> 1 FP -> 0; 0.2 -> 1.
    gts = [gt([BOX], [1])] + [gt() for _ in range(9)]
    preds = [pred([BOX], [0.5], [1]), pred([BOX], [0.9], [1]), pred([FAR], [0.8], [1])]
    preds += [pred() for _ in range(7)]
    res = evaluate_froc(preds, gts, [1], RATES)
    assert recalls(res) == [0.0, 0.0, 1.0]
    assert res.curves[1].n_images == 10
    assert res.curves[1].fps_per_image[-1] == pytest.approx(0.2)


def test_overall_is_mean_over_classes_not_pooled():
    # class 1: 1 GT, hit. class 2: 3 GT, 1 hit. Mean over classes (1 + 1/3) / 2; pooled would be 2/4.
    gts = [gt([BOX, FAR], [1, 2]), gt([BOX, FAR], [2, 2])]
    preds = [pred([BOX, FAR], [0.9, 0.8], [1, 2]), pred()]
    res = evaluate_froc(preds, gts, [1, 2, 3], RATES)
    assert recalls(res, 1) == [1.0] * 3
    np.testing.assert_allclose(recalls(res, 2), [1 / 3] * 3)
    np.testing.assert_allclose(recalls(res), [2 / 3] * 3)
    assert res.per_class[3]["n_gt"] == 0 and res.per_class[3]["avg_recall"] is None


def test_tied_scores_enter_together():
    # An FP and a TP share score 0.7 on 10 images: no threshold takes the TP without the FP.
    gts = [gt([BOX], [1])] + [gt() for _ in range(9)]
    preds = [pred([BOX, FAR], [0.7, 0.7], [1, 1])] + [pred() for _ in range(9)]
    res = evaluate_froc(preds, gts, [1], RATES)
    assert recalls(res) == [0.0, 1.0, 1.0]
    curve = froc_curve(np.array([0.7, 0.7]), np.array([False, True]), n_gt=1, n_images=10)
    assert curve.fp.tolist() == [0, 1] and curve.tp.tolist() == [0, 1]


def test_mean_curve_for_plotting():
    gts = [gt([BOX, FAR], [1, 2]), gt([BOX], [2])]
    preds = [pred([FAR, BOX, FAR], [0.9, 0.8, 0.7], [1, 1, 2]), pred([FAR], [0.6], [2])]
    res = evaluate_froc(preds, gts, [1, 2, 3], RATES)
    xs, ys = mean_curve(list(res.curves.values()), max_fp=2.0)
    # class 1: FP then TP -> (0,0) (0.5,1); class 2: TP then FP -> (0,0.5) (0.5,0.5).
    np.testing.assert_allclose(xs, [0.0, 0.5, 2.0])
    np.testing.assert_allclose(ys, [0.25, 0.75, 0.75])
    assert mean_curve([res.curves[3]], 1.0)[0].size == 0


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="prediction sets"):
        evaluate_froc([pred()], [gt(), gt()], [1])
    with pytest.raises(ValueError, match="no images"):
        evaluate_froc([], [], [1])
