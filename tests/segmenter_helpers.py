"""Helpers of the segmenter tests: lung-like films and masks, lung_masks trees, params sections.

Not a test module: tests/test_segmenter_*.py and tests/test_sources.py import it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from stages.common.config import to_dict
from stages.common.split_config import SplitConfig
from stages.segmenter.config import (
    EvalSegmentationConfig,
    SegmentationAugmentConfig,
    TrainSegmenterConfig,
)
from stages.sources.config import SegmentationData


def lungs(h: int, w: int, shift: float = 0.0) -> np.ndarray:
    """bool (h, w): two upright ellipses, the shape of a pair of lungs."""
    yy, xx = np.mgrid[:h, :w]
    y = (yy + 0.5) / h
    x = (xx + 0.5) / w
    left = ((x - 0.32 - shift) / 0.14) ** 2 + ((y - 0.48) / 0.3) ** 2 <= 1
    right = ((x - 0.68 - shift) / 0.14) ** 2 + ((y - 0.48) / 0.3) ** 2 <= 1
    return left | right


def film(mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint8 film: bright body, dark lungs, noise."""
    rng = np.random.default_rng(seed)
    img = 170.0 - 110.0 * mask + rng.normal(0, 12, mask.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def pair(root: Path, name: str, h: int = 48, w: int = 40, seed: int = 0, shift: float = 0.0):
    """Write images/<name>.png and masks/<name>.png (0/255) of one lung-like film."""
    m = lungs(h, w, shift)
    save(root / "images" / f"{name}.png", film(m, seed))
    save(root / "masks" / f"{name}.png", m.astype(np.uint8) * 255)
    return m


def sections(
    n_patients: int = 16,
    image_size: int = 64,
    cache_size: int = 64,
    epochs: int = 2,
    channels: tuple[int, ...] = (8, 16, 32),
) -> dict:
    """The segmentation params sections (the schemas' defaults), shrunk for tests."""
    data = to_dict(SegmentationData())
    root = data.pop("root")  # params hold it once, as data.root
    data["synthetic"].update(n_patients=n_patients, image_size=image_size)
    augment = to_dict(
        dataclasses.replace(SegmentationAugmentConfig(), image_size=cache_size, preview_count=2)
    )
    train = to_dict(
        dataclasses.replace(
            TrainSegmenterConfig(),
            channels=channels,
            res_units=1,
            epochs=epochs,
            batch_size=8,
            warmup_iters=2,
            threads=0,  # all the cores this process may use (one per pinned test worker)
        )
    )
    evaluate = to_dict(
        dataclasses.replace(EvalSegmentationConfig(), bootstrap=50, n_report_images=2)
    )
    return {
        "data": {"root": root, "segmentation": data},
        "split": {"segmentation": to_dict(SplitConfig())},
        "augment": {"segmentation": augment},
        "train_segmenter": train,
        "evaluate": {"segmentation": evaluate},
    }


def merge(params: dict, extra: dict) -> dict:
    """``params`` with the sections of ``extra`` set (replacing those of the same name)."""
    out = dict(params)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "train_segmenter":
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out
