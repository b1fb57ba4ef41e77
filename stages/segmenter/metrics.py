"""Segmentation metrics on binary masks: Dice, IoU, HD95, and bootstrap intervals of means.

Inputs: ground-truth and predicted masks, bool (H, W) or (N, H, W). Outputs: per-image figures
and percentile-bootstrap intervals. No run command; used by the segmentation evaluation and the
validation of training, tested by tests/test_segmenter_metrics.py.

Definitions (A = ground truth, B = prediction):
- Dice = 2 |A n B| / (|A| + |B|); IoU = |A n B| / |A u B|; both 1 when A and B are empty.
- HD95: the surface of a mask is its pixels with a 4-neighbour outside it (pixels on the image
  border count as surface). For each surface pixel of A, the Euclidean distance to the nearest
  surface pixel of B, and the other way round; HD95 is the larger of the two 95th percentiles
  (numpy's linear interpolation), in pixels of the masks given (the evaluation gives masks at
  the cache size). This is MONAI's ``compute_hausdorff_distance(percentile=95)``, checked
  against it in the tests. Both masks empty: 0; one empty: the image diagonal (the worst
  possible, so means stay defined).
"""

from __future__ import annotations

import numpy as np


def _flat(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = np.asarray(gt, dtype=bool), np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape:
        raise ValueError(f"masks differ in shape: {gt.shape} vs {pred.shape}")
    if gt.ndim == 2:
        gt, pred = gt[None], pred[None]
    return gt.reshape(len(gt), -1), pred.reshape(len(pred), -1)


def dice_scores(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Dice per image (float64 (N,)) of bool masks (N, H, W) or (H, W)."""
    a, b = _flat(gt, pred)
    inter = (a & b).sum(axis=1)
    total = a.sum(axis=1) + b.sum(axis=1)
    return np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)


def iou_scores(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """IoU (Jaccard) per image (float64 (N,))."""
    a, b = _flat(gt, pred)
    inter = (a & b).sum(axis=1)
    union = (a | b).sum(axis=1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def surface(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the image border counts as outside)."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(gt: np.ndarray, pred: np.ndarray) -> float:
    """95th percentile Hausdorff distance of two bool (H, W) masks, in pixels (module docs)."""
    from scipy import ndimage

    gt, pred = np.asarray(gt, dtype=bool), np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape or gt.ndim != 2:
        raise ValueError(f"hd95 takes two (H, W) masks of one shape: {gt.shape} vs {pred.shape}")
    if not gt.any() and not pred.any():
        return 0.0
    if not gt.any() or not pred.any():
        return float(np.hypot(*gt.shape))
    sa, sb = surface(gt), surface(pred)
    to_b = ndimage.distance_transform_edt(~sb)[sa]
    to_a = ndimage.distance_transform_edt(~sa)[sb]
    return float(max(np.percentile(to_b, 95), np.percentile(to_a, 95)))


def per_image(gt: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """{"dice", "iou", "hd95"}: one value per image of bool (N, H, W) masks."""
    gt, pred = np.asarray(gt, dtype=bool), np.asarray(pred, dtype=bool)
    return {
        "dice": dice_scores(gt, pred),
        "iou": iou_scores(gt, pred),
        "hd95": np.array([hd95(g, p) for g, p in zip(gt, pred, strict=True)], dtype=np.float64),
    }


def bootstrap_mean_ci(
    values: np.ndarray, n_resamples: int, ci: float, seed: int
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of ``values`` (images resampled with
    replacement); None without resamples or values."""
    values = np.asarray(values, dtype=np.float64)
    if n_resamples <= 0 or values.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, 256):  # bounded memory for large test sets
        n = min(256, n_resamples - start)
        idx = rng.integers(0, values.size, size=(n, values.size))
        means[start : start + n] = values[idx].mean(axis=1)
    tail = (1.0 - ci) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


__all__ = ["bootstrap_mean_ci", "dice_scores", "hd95", "iou_scores", "per_image", "surface"]
