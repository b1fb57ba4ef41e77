"""On-the-fly box-aware detection augmentation, in torch, for the detector DataLoader.

Input/output: ``(image float32 (1, H, W) in [0, 1], {"boxes": (K, 4) xyxy float32, "labels": (K,)
int64, ...})`` -> the same structure and image size, boxes moved with the pixels, clipped, and
degenerate boxes (under 1 px wide or high) dropped with their labels. The policy comes from
``augment.detection.policy`` in params.yaml. No run command of its own.

Randomness comes from the ``torch.Generator`` passed in, else the global torch RNG (seeded by
``stages.common.utils.seed_everything``), so runs are repeatable.
"""

from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as TF

from stages.detector.config import DetectionPolicy

MIN_BOX_SIZE = 1.0  # px; thinner boxes are dropped (torchvision references do the same)
PER_BOX_KEYS = ("labels", "iscrowd")


Target = dict[str, torch.Tensor]


class DetectionTransform:
    """Callable ``(image, target) -> (image, target)``; ``train=False`` is the identity."""

    def __init__(
        self, policy: DetectionPolicy, train: bool, generator: torch.Generator | None = None
    ) -> None:
        self.policy = policy
        self.train = train
        self.generator = generator

    def _rand(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        if not self.train:
            return image, target
        p = self.policy
        boxes = target["boxes"].to(torch.float32).reshape(-1, 4).clone()
        if p.hflip and self._rand() < p.hflip:
            image, boxes = hflip(image, boxes)
        lo, hi = p.scale_jitter
        if (lo, hi) != (1.0, 1.0):
            scale = lo + (hi - lo) * self._rand()
            image, boxes = scale_jitter(image, boxes, scale, self._rand(), self._rand())
        if p.contrast:
            factor = 1.0 + p.contrast * (2 * self._rand() - 1)
            image = (image - image.mean()) * factor + image.mean()
        if p.brightness:
            image = image + p.brightness * (2 * self._rand() - 1)
        if p.contrast or p.brightness:
            image = image.clamp(0.0, 1.0)
        return image, _keep_valid(boxes, image.shape[-2:], target)


def hflip(image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror left-right: x -> W - x for the (continuous, pixel-edge) box coordinates."""
    w = image.shape[-1]
    out = boxes.clone()
    out[:, 0], out[:, 2] = w - boxes[:, 2], w - boxes[:, 0]
    return TF.horizontal_flip(image), out


def scale_jitter(
    image: torch.Tensor, boxes: torch.Tensor, scale: float, u: float, v: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale by ``scale``, then crop (scale > 1) or zero-pad (scale < 1) back to (H, W).

    ``u``, ``v`` in [0, 1) place the crop window / the pasted image along x and y.
    """
    h, w = image.shape[-2:]
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = TF.resize(image, [nh, nw], antialias=True)
    out_boxes = boxes * torch.tensor([nw / w, nh / h, nw / w, nh / h])
    canvas = torch.zeros_like(image)
    # Offset of the resized image inside the canvas: <= 0 crops, >= 0 pads.
    ox = -int(u * (nw - w + 1)) if nw > w else int(u * (w - nw + 1))
    oy = -int(v * (nh - h + 1)) if nh > h else int(v * (h - nh + 1))
    src_x, src_y = max(0, -ox), max(0, -oy)
    dst_x, dst_y = max(0, ox), max(0, oy)
    cw, ch = min(w - dst_x, nw - src_x), min(h - dst_y, nh - src_y)
    canvas[..., dst_y : dst_y + ch, dst_x : dst_x + cw] = resized[
        ..., src_y : src_y + ch, src_x : src_x + cw
    ]
    out_boxes = out_boxes + torch.tensor([ox, oy, ox, oy], dtype=torch.float32)
    return canvas, out_boxes


def _keep_valid(boxes: torch.Tensor, size: torch.Size, target: Target) -> Target:
    """Clip to the image, drop boxes under MIN_BOX_SIZE with their labels/iscrowd, and
    recompute "area" when the target has one; other entries (image_id, ...) pass through."""
    h, w = size
    boxes = boxes.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    wh = boxes[:, 2:] - boxes[:, :2]
    keep = (wh >= MIN_BOX_SIZE).all(dim=1)
    out = dict(target)
    out["boxes"] = boxes[keep]
    for name in PER_BOX_KEYS:
        if name in out:
            out[name] = out[name][keep]
    if "area" in out:
        out["area"] = (wh[:, 0] * wh[:, 1])[keep]
    return out


__all__ = ["DetectionPolicy", "DetectionTransform", "hflip", "scale_jitter"]


def preview_cells(
    policy: DetectionPolicy, seed: int, split, rows: list[int], copies: int
) -> list[list[tuple]]:
    """The augment stage's preview: per row [(image (S, S) in [0, 255], boxes, ids)] for the
    cache image and ``copies`` augmented copies, boxes moved with the pixels."""
    import numpy as np

    gen = torch.Generator().manual_seed(seed)
    transform = DetectionTransform(policy, train=True, generator=gen)
    out = []
    for i in rows:
        boxes, cats = split.boxes(i)
        cells = [(split.images[i], boxes, cats)]
        img = torch.from_numpy(np.asarray(split.images[i], dtype=np.float32) / 255.0)[None]
        for _ in range(copies):
            target = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(cats)}
            a, t = transform(img, target)
            cells.append((a[0].numpy() * 255.0, t["boxes"].numpy(), t["labels"].numpy()))
        out.append(cells)
    return out
