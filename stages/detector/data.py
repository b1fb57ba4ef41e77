"""Streaming torch Dataset over one detection cache split, plus its DataLoader.

Inputs: ``data/augment/detection/<split>/{images.npy, annotations.json}`` (``stages.common.cache``) and an
optional ``DetectionTransform`` (``stages.detector.augment``). Items: ``(image float32 (1, S, S) in [0, 1],
{"boxes" float32 (K, 4) xyxy cache pixels, "labels" int64 (K,) category ids 1..K, "image_id"})``;
images without boxes are kept as negatives (boxes of shape (0, 4)).
No run command: used by ``python -m stages.train --task detection``.

Memory: each item is read with ``os.pread`` from images.npy at its byte offset. A memory map
would leave every page it touched resident (and counted in RSS) for the whole epoch; reading
rows keeps peak RSS flat in the number of images. Only the boxes are held in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from stages.common import cache
from stages.common.cache import open_split
from stages.common.utils import StageError

Target = dict[str, Any]
Transform = Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]


class DetectionCacheDataset(Dataset):
    """One cache split; category ids are checked against ``1..len(classes)`` up front."""

    def __init__(
        self,
        cache_dir: Path,
        split: str,
        classes: Sequence[str],
        transform: Transform | None = None,
    ) -> None:
        sp = open_split(Path(cache_dir), split)
        if sp.coco is None:
            raise StageError(f"{cache_dir}/{split}: no annotations.json (not a detection cache)")
        images = sp.images
        if images.dtype != np.uint8 or images.ndim != 3 or not images.flags.c_contiguous:
            raise StageError(f"{cache_dir}/{split}/images.npy: expected C-ordered uint8 (N, S, S)")
        self.split = split
        self.transform = transform
        self._file = str(images.filename)
        self._offset = int(images.offset)
        self._shape = (int(images.shape[1]), int(images.shape[2]))
        self._n = int(images.shape[0])
        self._check_categories(sp.coco, classes, cache.split_path(cache_dir, split))
        self._targets = [sp.boxes(i) for i in range(self._n)]
        for i, (boxes, _) in enumerate(self._targets):
            if len(boxes) and not (boxes[:, 2:] > boxes[:, :2]).all():
                raise StageError(
                    f"{cache_dir}/{split}/annotations.json: image id {i} has a box with zero or "
                    "negative size; re-run the split/augment stages"
                )
        del images, sp  # only the path and offset are kept; see the module docstring
        self._fd: int | None = None
        self._pid = -1

    @staticmethod
    def _check_categories(coco: dict, classes: Sequence[str], where: Path) -> None:
        expected = {i + 1: name for i, name in enumerate(classes)}
        cats = {int(c["id"]): str(c["name"]) for c in coco.get("categories", [])}
        if cats != expected:
            raise StageError(
                f"{where}/annotations.json: categories {cats} differ from meta.json classes "
                f"{expected}; re-run the augment stage"
            )
        for ann in coco.get("annotations", []):
            if int(ann["category_id"]) not in expected:
                raise StageError(
                    f"{where}/annotations.json: annotation {ann.get('id')} of image "
                    f"{ann.get('image_id')} has unknown category_id {ann['category_id']}"
                )

    def __len__(self) -> int:
        return self._n

    def num_boxes(self, i: int) -> int:
        return len(self._targets[i][0])

    def read_image(self, i: int) -> np.ndarray:
        """Row ``i`` of images.npy as uint8 (S, S), read from disk (no memory map)."""
        if self._fd is None or self._pid != os.getpid():  # fresh descriptor per worker process
            self._fd, self._pid = os.open(self._file, os.O_RDONLY), os.getpid()
        h, w = self._shape
        buf = os.pread(self._fd, h * w, self._offset + i * h * w)
        if len(buf) != h * w:
            raise StageError(f"{self._file}: short read at image {i}; the cache is truncated")
        return np.frombuffer(buf, dtype=np.uint8).reshape(h, w)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Target]:
        if not 0 <= i < self._n:
            raise IndexError(i)
        image = torch.from_numpy(self.read_image(i).astype(np.float32) / 255.0)[None]
        boxes, labels = self._targets[i]
        target: Target = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels)}
        if self.transform is not None:
            image, target = self.transform(image, target)
        target["image_id"] = i
        return image, target

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fd"], state["_pid"] = None, -1  # descriptors do not survive pickling
        return state

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)


def collate(batch: list[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """Detection batches stay lists: images may differ in size and box counts always do."""
    images, targets = zip(*batch, strict=True) if batch else ((), ())
    return list(images), list(targets)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[DataLoader, DistributedSampler]:
    """DataLoader with a DistributedSampler (also at world size 1): call ``set_epoch`` each epoch
    for a reshuffle that depends only on (seed, epoch), so a resumed run sees the same order."""
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed, drop_last=False
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=num_workers > 0,
    )
    return loader, sampler


__all__ = ["DetectionCacheDataset", "collate", "make_loader"]
