"""The ChestX-Det10 challenge metric: FROC sensitivity at fixed false positives per image.

Pure NumPy, no I/O; used by ``stages.detector.evaluate`` (no run command of its own). Follows
``eval.py`` of Deepwise-AILab/ChestX-Det10-Dataset, re-written from its definitions:

- Per class. Each prediction is compared with the ground-truth (GT) boxes of ITS class in ITS
  image and assigned to the one it overlaps most. It is a true positive (TP) when that IoU is
  >= ``iou_thresh`` and that GT box is not hit yet; otherwise a false positive (FP): misses,
  wrong-class boxes, boxes on normal images, and duplicates of a hit (as in eval.py, a box whose
  best GT is already hit is an FP even if a second GT overlaps it enough). Predictions are taken
  greedily by descending score (ties: image order, then the order given).
- The operating points of the curve are score thresholds: after all predictions with score >= t
  are accepted, sensitivity = TP / #GT and FP/image = FP / #images, where #images counts every
  test image, normal ones included. Tied scores enter together (a threshold cannot split them),
  and the curve starts at (0, 0) (nothing accepted).
- Sensitivity at a rate r = the highest sensitivity among operating points with FP/image <= r;
  beyond the last point it stays at the final sensitivity. The curve is a staircase (a TP moves
  up, an FP moves right by 1/#images), so eval.py's linear interpolation between its points gives
  the same value, except in its degenerate cases: when rate * #images is a whole number or
  rate >= the last FP/image, scipy's interp1d on the repeated x of a vertical step returns the
  bottom of the step (dropping the TPs ranked after that FP), and below the first FP it may
  extrapolate to nonsense (-inf). Checked on random cases: ours equals eval.py elsewhere, and is
  never lower.
- IoU is continuous (COCO / torchvision convention: area = (x2 - x1) * (y2 - y1)); eval.py adds
  +1 pixel to widths for integer pixel boxes, a negligible difference at 1024 px.
- Overall = MEAN OVER CLASSES of the per-class sensitivities at each rate (eval.py divides the
  sum over classes by the number of classes), and the average recall is the mean over the rates.
  Classes with no GT box in the test set have undefined sensitivity (eval.py would divide by
  zero): they are reported as None and left out of the mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# Tolerance when comparing an FP count with rate * n_images (0.1 * 30 is not exactly 3.0).
_EPS = 1e-9


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every xyxy box in ``a`` (N, 4) with every box in ``b`` (M, 4): (N, M)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0.0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0.0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match_image(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    gt_boxes: np.ndarray,
    gt_labels: np.ndarray,
    iou_thresh: float = 0.5,
) -> np.ndarray:
    """TP flags (bool, input order) of one image's predictions, by the rule in the module doc.

    Matching only depends on the order of predictions inside their own image, so matching each
    image separately in score order equals eval.py's pass over all images pooled by score.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    gt_labels = np.asarray(gt_labels).reshape(-1)
    is_tp = np.zeros(len(boxes), dtype=bool)
    if len(boxes) == 0 or len(gt_boxes) == 0:
        return is_tp
    ious = iou_matrix(boxes, gt_boxes)
    ious[labels[:, None] != gt_labels[None, :]] = -1.0  # other classes never match
    hit = np.zeros(len(gt_boxes), dtype=bool)
    for i in np.argsort(-scores, kind="stable"):
        j = int(np.argmax(ious[i]))
        if ious[i, j] >= iou_thresh and not hit[j]:
            hit[j] = True
            is_tp[i] = True
    return is_tp


@dataclass(frozen=True)
class FrocCurve:
    """One class's operating points; ``fp`` and ``tp`` are cumulative counts, (0, 0) first."""

    fp: np.ndarray
    tp: np.ndarray
    n_gt: int
    n_images: int

    @property
    def fps_per_image(self) -> np.ndarray:
        return self.fp / self.n_images

    @property
    def sensitivity(self) -> np.ndarray:
        if self.n_gt == 0:
            return np.full(len(self.tp), np.nan)
        return self.tp / self.n_gt

    def sensitivity_at(self, rates: Sequence[float] | np.ndarray) -> np.ndarray:
        """Highest sensitivity with FP/image <= rate, for each rate (NaN if the class has no GT)."""
        rates = np.asarray(rates, dtype=np.float64).reshape(-1)
        if self.n_gt == 0:
            return np.full(len(rates), np.nan)
        # tp is non-decreasing along the curve, so the best point is the last one within budget.
        last = np.searchsorted(self.fp, rates * self.n_images + _EPS, side="right") - 1
        return self.tp[last] / self.n_gt


def froc_curve(scores: np.ndarray, is_tp: np.ndarray, n_gt: int, n_images: int) -> FrocCurve:
    """Operating points from pooled predictions (score, TP flag) of one class over all images.

    Predictions with equal scores form one point, so their order here does not matter.
    """
    if n_images <= 0:
        raise ValueError("froc_curve: n_images must be positive")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    is_tp = np.asarray(is_tp, dtype=bool).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], is_tp[order]
    tp = np.cumsum(t)
    fp = np.cumsum(~t)
    # Keep only the last prediction of each group of equal scores: one point per threshold.
    last_of_group = np.ones(len(s), dtype=bool)
    last_of_group[:-1] = s[1:] != s[:-1]
    fp = np.concatenate([[0], fp[last_of_group]]).astype(np.int64)
    tp = np.concatenate([[0], tp[last_of_group]]).astype(np.int64)
    return FrocCurve(fp=fp, tp=tp, n_gt=int(n_gt), n_images=int(n_images))


@dataclass(frozen=True)
class FrocResult:
    """Per-class curves and sensitivities; ``recall_at``/``avg_recall`` are means over classes."""

    rates: tuple[float, ...]
    curves: dict[int, FrocCurve]
    per_class: dict[int, dict] = field(default_factory=dict)
    recall_at: dict[float, float | None] = field(default_factory=dict)
    avg_recall: float | None = None
    iou_thresh: float = 0.5


def _none_if_nan(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def evaluate_froc(
    preds: Sequence[dict],
    gts: Sequence[tuple[np.ndarray, np.ndarray]],
    class_ids: Sequence[int],
    rates: Sequence[float] = (0.05, 0.1, 0.2),
    iou_thresh: float = 0.5,
) -> FrocResult:
    """FROC over a test set.

    preds: one dict per image with ``boxes`` (K, 4) xyxy, ``scores`` (K,), ``labels`` (K,) ids.
    gts:   one (boxes (G, 4) xyxy, labels (G,)) per image, same order and length as ``preds``.
    class_ids: the category ids to score (predictions of other ids count for no class).
    """
    if len(preds) != len(gts):
        raise ValueError(f"evaluate_froc: {len(preds)} prediction sets for {len(gts)} images")
    if not preds:
        raise ValueError("evaluate_froc: no images")
    rates = tuple(float(r) for r in rates)
    pooled: dict[int, tuple[list, list]] = {c: ([], []) for c in class_ids}
    n_gt = dict.fromkeys(class_ids, 0)
    for pred, (gt_boxes, gt_labels) in zip(preds, gts, strict=True):
        labels = np.asarray(pred["labels"]).reshape(-1)
        scores = np.asarray(pred["scores"], dtype=np.float64).reshape(-1)
        is_tp = match_image(pred["boxes"], scores, labels, gt_boxes, gt_labels, iou_thresh)
        gt_labels = np.asarray(gt_labels).reshape(-1)
        for c in class_ids:
            sel = labels == c
            pooled[c][0].append(scores[sel])
            pooled[c][1].append(is_tp[sel])
            n_gt[c] += int(np.sum(gt_labels == c))
    curves: dict[int, FrocCurve] = {}
    per_class: dict[int, dict] = {}
    for c in class_ids:
        curve = froc_curve(
            np.concatenate(pooled[c][0]), np.concatenate(pooled[c][1]), n_gt[c], len(preds)
        )
        curves[c] = curve
        sens = curve.sensitivity_at(rates)
        per_class[c] = {
            "recall_at": {r: _none_if_nan(v) for r, v in zip(rates, sens, strict=True)},
            "avg_recall": _none_if_nan(float(np.mean(sens))),
            "n_gt": n_gt[c],
            "n_tp": int(curve.tp[-1]),
            "n_fp": int(curve.fp[-1]),
        }
    scored = [c for c in class_ids if n_gt[c] > 0]
    if not scored:
        return FrocResult(rates, curves, per_class, dict.fromkeys(rates), None, iou_thresh)
    table = np.array([curves[c].sensitivity_at(rates) for c in scored])  # (classes, rates)
    mean = table.mean(axis=0)
    recall_at = {r: float(v) for r, v in zip(rates, mean, strict=True)}
    return FrocResult(rates, curves, per_class, recall_at, float(mean.mean()), iou_thresh)


def mean_curve(curves: Sequence[FrocCurve], max_fp: float) -> tuple[np.ndarray, np.ndarray]:
    """The class-mean FROC curve (x = FP/image, y = mean sensitivity) for plotting.

    Evaluated at every FP/image where some class's staircase steps, up to ``max_fp`` (and at
    ``max_fp`` itself), so it is exact there. Classes without GT are skipped; none -> empty.
    """
    curves = [c for c in curves if c.n_gt > 0]
    if not curves:
        return np.zeros(0), np.zeros(0)
    xs = np.unique(np.concatenate([c.fps_per_image for c in curves] + [np.array([0.0, max_fp])]))
    xs = xs[xs <= max_fp + _EPS]
    ys = np.mean([c.sensitivity_at(xs) for c in curves], axis=0)
    return xs, ys


__all__ = [
    "FrocCurve",
    "FrocResult",
    "evaluate_froc",
    "froc_curve",
    "iou_matrix",
    "match_image",
    "mean_curve",
]
