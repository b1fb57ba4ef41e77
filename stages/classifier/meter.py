"""cam_in_lungs: where the classifier looks, measured against the segmenter's lungs.

Inputs:  the classifier (Keras), the test split of its cache (images, index) and the lungs of
         those films in the cache's frame: the cache's own masks when it was built with
         ``lungs`` crop | mask, else the test films' lungs that lungs@classification wrote
         (``data/lungs/classification/meter``: one 0/255 PNG per film at the film's size, moved
         into the cache's frame here exactly as the film was: ``stages.common.cache.prepare_mask``).
Outputs: per test image the share of its Grad-CAM mass (positive class, not min-max scaled)
         inside its lungs (``stages.classifier.metrics.cam_in_lungs``), the means over all
         images and by outcome (TP, TN, FP, FN) at the validation threshold, and a panel of the
         films with their map and lung outline (cam_lungs.png).
Used by ``stages.classifier.evaluate``; no run command of its own.

A shortcut shows here as mass outside the lungs: text marks, borders, the squeeze of a resized
film (reports/generalization.md found two by hand).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from stages.classifier import metrics as M
from stages.common import paths
from stages.common.cache import CacheSplit, prepare_mask
from stages.common.utils import StageError

log = logging.getLogger("stages.evaluate")
OUTCOMES = ("TP", "TN", "FP", "FN")


def lung_masks(split: CacheSplit, rows: np.ndarray, meter_dir: Path | None) -> np.ndarray | None:
    """bool (N, S, S): the lungs of the split's ``rows`` in the cache's frame, or None when
    neither the cache nor ``meter_dir`` has them (evaluation without a segmenter)."""
    if split.masks is not None:  # built with lungs crop | mask: the cache's own masks
        return np.asarray(split.masks[rows], dtype=bool)
    boxes = Path(meter_dir) / paths.LUNGS_BOXES_NAME if meter_dir else None
    if boxes is None or not boxes.is_file():
        return None
    by_path = pd.read_csv(boxes, dtype={"sha256": str}).set_index("path")["sha256"]
    size, resize = int(split.meta["image_size"]), str(split.meta.get("resize", "stretch"))
    out = np.zeros((len(rows), size, size), dtype=bool)
    for k, path in enumerate(split.index["path"].iloc[rows]):
        if path not in by_path.index:
            raise StageError(
                f"{path}: a test film without lungs in {meter_dir}: re-run the lungs stage "
                "(dvc repro)"
            )
        mask = np.asarray(
            Image.open(Path(meter_dir) / paths.LUNGS_MASKS_NAME / f"{by_path[path]}.png")
        )
        out[k] = prepare_mask(mask, size, resize).astype(bool)
    return out


def outcomes(bt: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """TP / TN / FP / FN of each image (positive-vs-rest truth, prediction at the threshold)."""
    bt, predicted = np.asarray(bt, bool), np.asarray(predicted, bool)
    return np.select(
        [bt & predicted, ~bt & ~predicted, ~bt & predicted], ["TP", "TN", "FP"], default="FN"
    )


def mean_map(maps: list[np.ndarray]) -> np.ndarray:
    """One (N, H, W) map from several models' maps: one model's as it is; an ensemble's as the
    mean of its members' maps, each scaled to unit mass per image first (so no member weighs
    more for its gradients' scale): its share in the lungs is then the members' mean share."""
    if len(maps) == 1:
        return maps[0]
    scaled = []
    for cams in maps:
        cams = np.asarray(cams, dtype=np.float64)
        mass = cams.sum(axis=(1, 2), keepdims=True)
        scaled.append(np.divide(cams, mass, out=np.zeros_like(cams), where=mass > 0))
    return np.mean(scaled, axis=0)


def measure(models, images: np.ndarray, masks: np.ndarray, proba: np.ndarray, pos: list[int]):
    """(per-image share of Grad-CAM mass inside the lungs, the maps) of ``models`` (one model,
    or an ensemble's members: ``mean_map``). The map is that of the most likely positive class
    of the scored probabilities, so every image is asked the same question: where is the
    pneumonia evidence?"""
    from stages.classifier.gradcam import GradCam  # TensorFlow: only when needed

    classes = [max(pos, key=lambda c, i=i: proba[i, c]) for i in range(len(images))]
    cams = mean_map([GradCam(m).raw_batch(np.asarray(images), classes) for m in models])
    return M.cam_in_lungs(cams, masks), cams


def summary(share: np.ndarray, kinds: np.ndarray, masks: np.ndarray | None = None) -> dict:
    """Mean share (NaN-free images only) over all and by outcome, with the counts; with
    ``masks``, ``lung_area``: the mean share of the frame the lungs cover, what a map spread
    evenly over the film would score (the chance level of ``all``)."""
    out: dict = {}
    if masks is not None:
        out["lung_area"] = float(np.asarray(masks, bool).mean(axis=(1, 2)).mean())
    for name, sel in [("all", np.ones(len(share), bool))] + [(k, kinds == k) for k in OUTCOMES]:
        vals = share[sel & np.isfinite(share)]
        out[name] = float(vals.mean()) if vals.size else None
        out[f"n_{name}"] = int(vals.size)
    return out


def plot(path: Path, images, cams, masks, share, kinds, pt, per_kind: int = 3) -> None:
    """cam_lungs.png: for each outcome, the films with the least mass in the lungs first (what
    a shortcut would look like), the map over the film and the lung outline in green."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stages.classifier.gradcam import overlay

    picks = []
    for kind in ("FP", "FN", "TP", "TN"):
        idx = np.flatnonzero((kinds == kind) & np.isfinite(share))
        picks += [(i, kind) for i in idx[np.argsort(share[idx], kind="stable")][:per_kind]]
    cols = 4
    rows = max(1, -(-len(picks) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, (i, kind) in zip(axes.ravel(), picks, strict=False):
        cam = cams[i]
        span = float(cam.max() - cam.min())
        scaled = (cam - cam.min()) / span if span > 0 else np.zeros_like(cam)
        ax.imshow(overlay(np.asarray(images[i]), scaled))
        if masks[i].any():
            ax.contour(masks[i], levels=[0.5], colors="lime", linewidths=0.8)
        ax.set_title(f"{kind} P={pt[i]:.2f} in lungs {share[i]:.2f}", fontsize=7)
    fig.suptitle("Grad-CAM (positive class) and the segmenter's lungs: least mass inside first")
    fig.tight_layout()
    from stages.common.utils import write_png_atomic

    write_png_atomic(fig, path, dpi=80)


__all__ = ["OUTCOMES", "lung_masks", "measure", "outcomes", "plot", "summary"]
