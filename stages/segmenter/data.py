"""One split of the segmentation cache as batches of torch tensors.

Inputs: ``data/augment/segmentation/<split>/{images.npy, masks.npy, index.csv}``
(``stages.common.cache``). Outputs: ``(images float32 (B, 1, S, S) in [0, 1], masks float32
(B, 1, S, S) of 0/1)`` for given rows, and the row order of an epoch. No run command: used by
``python -m stages.train --task segmentation`` and the segmentation evaluation.

Rows are read from the memory maps batch by batch (sorted, so the pages are read in order);
nothing is held in memory beyond one batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stages.common.cache import CacheSplit, open_split
from stages.common.utils import StageError


class SegmentationSplit:
    """Images and masks of one cache split (memory maps) with a ``batch(rows)`` reader."""

    def __init__(self, cache_dir: Path, split: str) -> None:
        sp = open_split(Path(cache_dir), split)
        if sp.masks is None:
            raise StageError(
                f"{cache_dir}/{split}: no masks.npy (not a segmentation cache); run "
                "python -m stages.augment --task segmentation"
            )
        self.split = split
        self.cache: CacheSplit = sp
        self.images, self.masks, self.index = sp.images, sp.masks, sp.index

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def arrays(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images and masks of ``rows`` (in the order given)."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return (
            np.asarray(self.images[sorted_rows])[back],
            np.asarray(self.masks[sorted_rows])[back],
        )

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images, masks = self.arrays(rows)
        x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
        y = torch.from_numpy(masks.astype(np.float32))[:, None]
        return x, y


def epoch_rows(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool) -> list[np.ndarray]:
    """The batches of one epoch: a permutation that depends only on (seed, epoch), so a resumed
    run sees the same order; the last batch may be short."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


__all__ = ["SegmentationSplit", "epoch_rows"]
