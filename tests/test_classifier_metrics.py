"""stages.classifier.metrics against scikit-learn: threshold rules, bootstrap, multi-class AUC."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from stages.classifier import metrics as M


@pytest.fixture(scope="module")
def preds() -> tuple[np.ndarray, np.ndarray]:
    """A fixed, imperfect binary prediction set with ties and an imbalanced prevalence."""
    rng = np.random.default_rng(123)
    y = (rng.random(300) < 0.65).astype(int)
    p = np.clip(0.5 + 0.25 * (2 * y - 1) + rng.normal(0, 0.25, y.size), 0, 1)
    p[:20] = np.round(p[:20], 1)  # ties
    return y, p


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.72])
def test_binary_metrics_equal_sklearn(preds, threshold):
    y, p = preds
    pred = (p >= threshold).astype(int)
    m = M.binary_metrics(y, p, threshold)
    tn, fp, fn, tp = confusion_matrix(y, pred).ravel()
    assert m["confusion_matrix"] == [[tn, fp], [fn, tp]]
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["recall"] == pytest.approx(recall_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["specificity"] == pytest.approx(recall_score(1 - y, 1 - pred))
    assert all(
        type(m[k]) is float for k in ("accuracy", "precision", "recall", "specificity", "f1")
    )


def test_ranking_metrics_equal_sklearn(preds):
    y, p = preds
    assert M.roc_auc(y, p) == pytest.approx(roc_auc_score(y, p))
    assert M.pr_auc(y, p) == pytest.approx(average_precision_score(y, p))
    with pytest.raises(ValueError, match="only class"):
        M.roc_auc(np.ones(5, int), np.linspace(0, 1, 5))


def test_no_predicted_positive_gives_zero_precision():
    m = M.binary_metrics(np.array([0, 1, 1]), np.array([0.1, 0.2, 0.3]), 0.9)
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["specificity"] == 1.0


def test_youden_threshold_hand_made():
    # Scores:     0.1  0.2  0.35 0.4  0.6  0.7  0.8  0.9
    # Labels:      0    0    1    0    1    1    0    1
    # J at p >= 0.6: sens 3/4 + spec 3/4 - 1 = 0.5; p >= 0.35: 4/4 + 2/4 - 1 = 0.5 (tie);
    # p >= 0.7 or 0.4: 0.25. The tie goes to the higher score 0.6; the threshold returned is
    # the midpoint of the gap below it, (0.6 + 0.4) / 2, which splits validation the same way.
    y = np.array([0, 0, 1, 0, 1, 1, 0, 1])
    p = np.array([0.1, 0.2, 0.35, 0.4, 0.6, 0.7, 0.8, 0.9])
    assert M.youden_threshold(y, p) == pytest.approx(0.5)
    # One more negative below 0.35 makes it strictly best (J 0.6 vs 0.55): (0.35 + 0.2) / 2.
    y2, p2 = np.append(y, 0), np.append(p, 0.05)
    assert M.youden_threshold(y2, p2) == pytest.approx(0.275)
    # Perfect separation: midway between the lowest positive and the highest negative.
    assert M.youden_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.3, 0.7, 0.9])) == 0.5


@pytest.mark.parametrize("target", [0.5, 0.8, 0.95, 1.0])
def test_sensitivity_threshold_reaches_target_with_max_specificity(preds, target):
    y, p = preds
    t = M.sensitivity_threshold(y, p, target)
    assert M.binary_metrics(y, p, t)["recall"] >= target
    # t lies just below the chosen score s (same split of the validation cases); the next
    # higher validation score as threshold misses the target, so no higher choice existed.
    above = np.unique(p[p >= t])  # t is s itself when s is the lowest score
    assert M.binary_metrics(y, p, above[0])["recall"] >= target
    if above.size > 1:
        assert M.binary_metrics(y, p, above[1])["recall"] < target
    assert M.select_threshold(y, p, "sensitivity", target) == t


def test_select_threshold_takes_validation_arrays_only():
    import inspect

    params = list(inspect.signature(M.select_threshold).parameters)
    assert params == ["y_val", "p_val", "method", "target_sensitivity", "target_specificity"]


@pytest.mark.parametrize("target", [0.5, 0.8, 0.95, 0.98, 1.0])
def test_specificity_threshold_keeps_target_with_max_sensitivity(preds, target):
    y, p = preds
    t = M.specificity_threshold(y, p, target)
    assert M.binary_metrics(y, p, t)["specificity"] >= target
    # the next lower validation score as threshold would let too many negatives through
    below = np.unique(p[p < t])
    if below.size:
        assert M.binary_metrics(y, p, below[-1])["specificity"] < target
    assert M.select_threshold(y, p, "specificity", target_specificity=target) == t


def test_bootstrap_ci_contains_estimate_and_is_seeded(preds):
    y, p = preds
    kw = {"n_resamples": 300, "ci": 0.95}
    for stat in (M.roc_auc, M.accuracy_at(0.5)):
        lo, hi = M.bootstrap_ci(stat, y, p, seed=1, **kw)
        assert lo < stat(y, p) < hi
        assert (lo, hi) == M.bootstrap_ci(stat, y, p, seed=1, **kw)
        assert (lo, hi) != M.bootstrap_ci(stat, y, p, seed=2, **kw)
    narrow = M.bootstrap_ci(M.roc_auc, y, p, seed=1, n_resamples=300, ci=0.5)
    wide = M.bootstrap_ci(M.roc_auc, y, p, seed=1, n_resamples=300, ci=0.95)
    assert wide[0] < narrow[0] < narrow[1] < wide[1]


def test_multiclass_macro_auc_equals_sklearn_ovr():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 4, 200)
    logits = rng.normal(size=(200, 4)) + 1.5 * np.eye(4)[y]
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    classes = ["COVID", "NORMAL", "BACTERIA", "VIRUS"]
    m = M.multiclass_metrics(y, proba, classes)
    assert m["macro_roc_auc"] == pytest.approx(roc_auc_score(y, proba, multi_class="ovr"))
    for k, c in enumerate(classes):
        assert m["per_class_roc_auc"][c] == pytest.approx(roc_auc_score(y == k, proba[:, k]))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, proba.argmax(1)))
    assert m["confusion_matrix"] == confusion_matrix(y, proba.argmax(1)).tolist()


def test_curve_points_are_json_safe(preds):
    y, p = preds
    roc, pr = M.roc_points(y, p), M.pr_points(y, p)
    assert all(np.isfinite(v).all() for v in (*roc.values(), *pr.values()))
    assert len(roc["fpr"]) == len(roc["threshold"]) and len(pr["recall"]) == len(pr["threshold"])
    assert roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0


def test_cam_in_lungs_on_constructed_maps():
    """The where-does-it-look meter: all mass inside the lungs -> 1, all outside -> 0, an even
    split -> 0.5, and a map with no mass -> NaN (not 0: it placed nothing anywhere)."""
    masks = np.zeros((4, 8, 8), dtype=bool)
    masks[:, :, :4] = True  # the left half is "lung"
    cams = np.zeros((4, 8, 8))
    cams[0, 2:6, 0:3] = 1.0  # all inside
    cams[1, 2:6, 5:8] = 3.0  # all outside
    cams[2] = 1.0  # uniform: half the area is lung
    share = M.cam_in_lungs(cams, masks)
    np.testing.assert_allclose(share[:3], [1.0, 0.0, 0.5])
    assert np.isnan(share[3])
    with pytest.raises(ValueError, match="non-negative"):
        M.cam_in_lungs(-cams, masks)
    with pytest.raises(ValueError, match="must be"):
        M.cam_in_lungs(cams[:, :4], masks)


def test_cam_summary_by_outcome_with_the_chance_level():
    """Means by outcome skip the NaN of a massless map; lung_area is the even map's score."""
    from stages.classifier import meter

    masks = np.zeros((4, 8, 8), dtype=bool)
    masks[:2, :, :4] = True  # half the frame
    masks[2:, :, :2] = True  # a quarter
    share = np.array([1.0, 0.0, 0.5, np.nan])
    out = meter.summary(share, np.array(["TP", "TP", "FN", "FN"]), masks)
    assert out["lung_area"] == pytest.approx(0.375)
    assert out["all"] == pytest.approx(0.5) and out["n_all"] == 3
    assert out["TP"] == pytest.approx(0.5) and out["FN"] == pytest.approx(0.5) and out["n_FN"] == 1
    assert out["FP"] is None and out["n_FP"] == 0
    assert "lung_area" not in meter.summary(share, np.array(["TP"] * 4))


def test_an_ensembles_map_is_its_members_at_equal_weight():
    """An ensemble's where-does-it-look: its members' maps each scaled to unit mass, then
    averaged, so a member with larger gradients does not outvote the others; its share in the
    lungs is the members' mean share. One model's map is left as it is (scale and all)."""
    from stages.classifier import meter

    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[:, :, :4] = True
    inside, outside = np.zeros((2, 8, 8)), np.zeros((2, 8, 8))
    inside[:, 2:6, 0:3] = 100.0  # large gradients, all in the lungs
    outside[:, 2:6, 5:8] = 0.01  # small ones, all outside
    outside[1] = 0.0  # the second member has no mass on the second image
    both = meter.mean_map([inside, outside])
    np.testing.assert_allclose(M.cam_in_lungs(both, masks), [0.5, 1.0])
    assert meter.mean_map([inside]) is inside
    np.testing.assert_allclose(meter.mean_map([inside, inside]).sum(axis=(1, 2)), [1.0, 1.0])
