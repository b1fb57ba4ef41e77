"""Paired image/mask augmentation, in torch, applied to whole training batches.

Input/output: images float32 (B, 1, S, S) in [0, 1] and masks float32 (B, 1, S, S) of 0/1 ->
the same shapes. Geometry (mirror, rotation, zoom, shift, aspect) moves image and mask with one
sampling grid per image (image bilinear, mask bilinear then >= 0.5, zeros outside, like the
cache's ``pad`` border); the photometric part (white patches inside the lungs, contrast,
brightness, gamma, blur, noise) changes the image only. The policy comes from
``augment.segmentation.policy``; see ``stages.segmenter.config.SegmentationPolicy``. No run
command of its own.

Randomness comes from the ``torch.Generator`` passed in, else the global torch RNG (seeded by
``stages.common.utils.seed_everything`` and saved in the resume checkpoints).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from stages.segmenter.config import SegmentationPolicy


class PairedAugment:
    """Callable ``(images, masks) -> (images, masks)`` on batches (see the module docstring)."""

    def __init__(self, policy: SegmentationPolicy, generator: torch.Generator | None = None):
        self.policy = policy
        self.generator = generator

    def _u(self, n: int, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=self.generator)

    def __call__(
        self, images: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images, masks = self.geometry(images, masks)
        return self.photometric(images, masks), masks

    def affine(self, n: int) -> torch.Tensor:
        """(n, 2, 3) ``affine_grid`` matrices: output -> input, normalised coordinates."""
        p = self.policy
        flip = torch.where(self._u(n, 0, 1) < p.hflip, -1.0, 1.0)
        angle = self._u(n) * math.radians(p.rotation)
        lo, hi = p.scale
        zoom = torch.exp(self._u(n, math.log(lo), math.log(hi)))
        aspect = torch.exp(self._u(n) * p.aspect)
        shift = self._u(2 * n).reshape(n, 2) * (2 * p.shift)  # normalised units span 2
        cos, sin = torch.cos(angle), torch.sin(angle)
        # forward map input -> output: diag(zoom * aspect, zoom) @ rotation @ diag(flip, 1)
        fwd = torch.zeros(n, 2, 2)
        fwd[:, 0, 0] = zoom * aspect * cos * flip
        fwd[:, 0, 1] = -zoom * aspect * sin
        fwd[:, 1, 0] = zoom * sin * flip
        fwd[:, 1, 1] = zoom * cos
        inv = torch.linalg.inv(fwd)
        theta = torch.zeros(n, 2, 3)
        theta[:, :, :2] = inv
        theta[:, :, 2] = -(inv @ shift[:, :, None])[:, :, 0]
        return theta

    def geometry(
        self, images: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        theta = self.affine(images.shape[0]).to(images.dtype)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", align_corners=False)
        moved = F.grid_sample(masks, grid, mode="bilinear", align_corners=False)
        return images, (moved >= 0.5).to(masks.dtype)

    def photometric(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        p, n, size = self.policy, images.shape[0], images.shape[-1]
        x = images
        if p.opacity:
            x = self._opacity(x, masks)
        view = (n, 1, 1, 1)
        if p.contrast:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * (1 + p.contrast * self._u(n)).view(view) + mean
        if p.brightness:
            x = x + (p.brightness * self._u(n)).view(view)
        x = x.clamp(0.0, 1.0)
        if p.gamma:
            x = x ** torch.exp(p.gamma * self._u(n)).view(view)
        if p.blur:
            sigmas = self._u(n, 0, p.blur)
            chosen = self._u(n, 0, 1) < 0.5
            out = []
            for i in range(n):
                s = float(sigmas[i])
                if bool(chosen[i]) and s > 0.2:
                    k = 2 * math.ceil(3 * s) + 1
                    out.append(TF.gaussian_blur(x[i], [min(k, size | 1)] * 2, [s, s]))
                else:
                    out.append(x[i])
            x = torch.stack(out)
        if p.noise:
            sd = (p.noise * self._u(n, 0, 1)).view(view)
            x = x + sd * torch.randn(x.shape, generator=self.generator)
        return x.clamp(0.0, 1.0)

    def _opacity(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """White, smooth patches inside the lungs in a share ``opacity`` of the images (drawn at
        a quarter of the size, where smoothing is cheap, then enlarged)."""
        n, size = x.shape[0], x.shape[-1]
        amp = self._u(n, 0.15, 0.5) * (self._u(n, 0, 1) < self.policy.opacity)
        field = torch.rand((n, 1, 6, 6), generator=self.generator)
        chosen = torch.nonzero(amp).flatten()
        if chosen.numel() == 0:
            return x
        small = max(8, size // 4)
        field = F.interpolate(
            field[chosen], size=(small, small), mode="bicubic", align_corners=False
        )
        patches = ((field - 0.55) * 4).clamp(0.0, 1.0)
        lung = F.adaptive_avg_pool2d(masks[chosen], small)
        lung = F.avg_pool2d(lung, 3, stride=1, padding=1, count_include_pad=False)
        add = F.interpolate(patches * lung, size=x.shape[-2:], mode="bilinear", align_corners=False)
        add = add * (masks[chosen] > 0)  # never outside the lungs
        out = x.clone()
        out[chosen] = x[chosen] + amp[chosen].view(-1, 1, 1, 1) * add * (1 - x[chosen])
        return out


def preview_cells(
    policy: SegmentationPolicy, seed: int, split, rows: list[int], copies: int
) -> list[list[tuple]]:
    """The augment stage's preview: per row [(image (S, S) in [0, 255], no boxes, no ids,
    mask (S, S))] for the cache image and ``copies`` augmented copies."""
    gen = torch.Generator().manual_seed(seed)
    augment = PairedAugment(policy, generator=gen)
    no_boxes, no_ids = np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
    out = []
    for i in rows:
        img = np.asarray(split.images[i])
        mask = np.asarray(split.masks[i])
        cells = [(img, no_boxes, no_ids, mask)]
        x = torch.from_numpy(img.astype(np.float32) / 255.0)[None, None].repeat(copies, 1, 1, 1)
        m = torch.from_numpy(mask.astype(np.float32))[None, None].repeat(copies, 1, 1, 1)
        ax, am = augment(x, m)
        for c in range(copies):
            cells.append((ax[c, 0].numpy() * 255.0, no_boxes, no_ids, am[c, 0].numpy()))
        out.append(cells)
    return out


__all__ = ["PairedAugment", "preview_cells"]
