"""train-segmenter pieces: paired augmentation, precision and schedule helpers, training with
its outputs and resume, and the predicted-mask API on films of other sizes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stages.common import cache
from stages.common.config import ConfigError, parse
from stages.common.torchutil import native_bf16, resolve_precision
from stages.common.utils import StageError
from stages.segmenter import engine as E
from stages.segmenter import predict as P
from stages.segmenter.augment import PairedAugment
from stages.segmenter.config import SegmentationPolicy, TrainSegmenterConfig
from stages.segmenter.train import train
from tests.segmenter_helpers import film, lungs

STILL = SegmentationPolicy(hflip=0.5, brightness=0, contrast=0, gamma=0, opacity=0, blur=0, noise=0)
TINY = TrainSegmenterConfig(
    channels=(8, 16, 32),
    res_units=1,
    epochs=3,
    batch_size=4,
    lr=0.01,
    warmup_iters=2,
    threads=1,
    seed=0,
)


def make_cache(root: Path, counts: dict[str, int], size: int = 32) -> Path:
    """A segmentation cache of lung-like films, lungs moved a little from image to image."""
    rng = np.random.default_rng(0)
    for split, n in counts.items():
        masks = [lungs(size, size, shift=rng.uniform(-0.06, 0.06)) for _ in range(n)]
        images = [film(m, seed=i) for i, m in enumerate(masks)]
        index = pd.DataFrame(
            {"path": [f"images/s/{split}{i}.png" for i in range(n)], "label": "lungs"}
        )
        cache.write_split(
            root, split, images, index, size, masks=[m.astype(np.uint8) for m in masks]
        )
    cache.write_meta(
        root,
        {
            "task": "segmentation",
            "image_size": size,
            "resize": "pad",
            "intensity": "none",
            "classes": ["lungs"],
            "counts": counts,
        },
    )
    cache.write_policy(root, dataclasses.asdict(STILL))
    return root


@pytest.fixture
def tiny(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # dvclive writes relative files
    return make_cache(tmp_path / "cache", {"train": 16, "val": 6, "test": 4})


def _train(cfg: TrainSegmenterConfig, cache_dir: Path, out: Path) -> dict:
    return train(cfg, cache_dir, out / "seg.pt", out / "live", out / "ckpt", out / "m.json")


# ----------------------------------------------------------------------------- augmentation
def test_geometry_moves_image_and_mask_together():
    masks = torch.from_numpy(np.stack([lungs(48, 48, s) for s in (0, 0.05, -0.05, 0)]))[:, None]
    masks = masks.float()
    images = masks.clone()  # white lungs: the image shows where the mask must be
    aug = PairedAugment(STILL, torch.Generator().manual_seed(0))
    out_img, out_mask = aug(images, masks)
    assert out_mask.shape == masks.shape and set(out_mask.unique().tolist()) <= {0.0, 1.0}
    agree = ((out_img >= 0.5) == (out_mask >= 0.5)).float().mean()
    assert agree > 0.99 and not torch.equal(out_mask, masks)  # moved, and moved together


def test_photometric_part_leaves_masks_alone_and_opacity_stays_in_the_lungs():
    masks = torch.from_numpy(np.stack([lungs(48, 48)] * 4))[:, None].float()
    images = torch.full_like(masks, 0.3)
    full = PairedAugment(SegmentationPolicy(), torch.Generator().manual_seed(3))
    geometry_only = PairedAugment(
        dataclasses.replace(
            SegmentationPolicy(), brightness=0, contrast=0, gamma=0, opacity=0, blur=0, noise=0
        ),
        torch.Generator().manual_seed(3),
    )
    assert torch.equal(full(images, masks)[1], geometry_only(images, masks)[1])
    only_opacity = SegmentationPolicy(
        hflip=0,
        rotation=0,
        scale=(1, 1),
        shift=0,
        aspect=0,
        brightness=0,
        contrast=0,
        gamma=0,
        opacity=1.0,
        blur=0,
        noise=0,
    )
    out, _ = PairedAugment(only_opacity, torch.Generator().manual_seed(1))(images, masks)
    grown = torch.nn.functional.max_pool2d(masks, 7, stride=1, padding=3)
    assert torch.allclose(out[grown == 0], images[grown == 0])
    assert (out[masks == 1] > 0.31).any()  # white patches inside the lungs


def test_policy_and_config_checks():
    with pytest.raises(ConfigError, match="scale must be"):
        parse(SegmentationPolicy, {"scale": [1.2, 0.9]}, "p")
    with pytest.raises(ConfigError, match="basic_unet has exactly 5 levels"):
        parse(TrainSegmenterConfig, {"arch": "basic_unet", "channels": [8, 16]}, "t")
    assert TrainSegmenterConfig().depth_factor == 16


# ----------------------------------------------------------------------------- helpers
def test_precision_follows_the_cpu_flags():
    assert native_bf16("cpu", "flags\t: fpu sse2 avx512f amx_bf16 amx_tile\n")
    assert native_bf16("cpu", "flags\t: fpu avx512f avx512_bf16\n")
    assert not native_bf16("cpu", "flags\t: fpu sse2 avx2 avx512f\n")
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("auto", "cpu") in ("bf16", "fp32")


def test_schedule_warms_up_then_decays_to_zero():
    cfg = dataclasses.replace(TINY, warmup_iters=10)
    assert E.lr_factor(cfg, 0, 100) == pytest.approx(0.01)
    assert E.lr_factor(cfg, 10, 100) == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.1)))
    assert E.lr_factor(cfg, 100, 100) == pytest.approx(0.0)
    flat = dataclasses.replace(cfg, lr_schedule="constant")
    assert E.lr_factor(flat, 50, 100) == 1.0


# ----------------------------------------------------------------------------- training
def test_training_writes_its_outputs_and_learns(tiny, tmp_path):
    out = tmp_path / "run"
    summary = _train(TINY, tiny, out)
    assert summary["epochs_run"] == 3 and summary["n_train"] == 16 and summary["n_val"] == 6
    written = json.loads((out / "m.json").read_text())  # the summary, where it was asked for
    assert written == json.loads(json.dumps(summary))
    assert {"val_dice", "best_epoch", "epochs_run", "train_loss", "seconds"} <= set(written)
    assert written["val_dice"] == max(summary["val_dice_per_epoch"]) > 0.5
    assert written["arch"] == "unet"
    assert not (out / "ckpt").exists()  # a finished run leaves no checkpoint
    ckpt = torch.load(out / "seg.pt", weights_only=True)
    assert (ckpt["image_size"], ckpt["resize"], ckpt["intensity"]) == (32, "pad", "none")
    assert ckpt["best_epoch"] == summary["best_epoch"]


def test_an_interrupted_run_resumes_where_it_stopped(tiny, tmp_path, monkeypatch):
    whole = _train(TINY, tiny, tmp_path / "whole")
    calls = {"n": 0}
    real = E.validation_dice

    def fail_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed during epoch 2's validation
        return real(*args, **kwargs)

    monkeypatch.setattr(E, "validation_dice", fail_second)
    with pytest.raises(KeyboardInterrupt):
        _train(TINY, tiny, tmp_path / "cut")
    assert (tmp_path / "cut/ckpt/last.pt").is_file() and not (tmp_path / "cut/seg.pt").exists()
    monkeypatch.setattr(E, "validation_dice", real)
    trained = []
    one_epoch = E.train_one_epoch
    monkeypatch.setattr(
        E, "train_one_epoch", lambda *a, **k: trained.append(a[7]) or one_epoch(*a, **k)
    )
    resumed = _train(TINY, tiny, tmp_path / "cut")
    assert trained == [1, 2] and resumed["epochs_run"] == 3  # epoch 1 came from last.pt
    np.testing.assert_allclose(
        resumed["val_dice_per_epoch"], whole["val_dice_per_epoch"], atol=1e-6
    )


def test_image_size_must_fit_the_levels(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_cache(tmp_path / "c", {"train": 2, "val": 1}, size=30)
    with pytest.raises(StageError, match="not a multiple of 4"):
        _train(TINY, root, tmp_path / "o")


# ----------------------------------------------------------------------------- predict API
def test_masks_map_back_to_the_film_exactly_enough():
    for shape, mode in (((90, 70), "pad"), ((50, 120), "pad"), ((90, 70), "stretch")):
        truth = lungs(*shape)
        small = cache.prepare_mask(truth.astype(np.uint8) * 255, 64, mode).astype(np.float32)
        back = P.to_film(small, shape, mode) >= 0.5
        iou = (back & truth).sum() / (back | truth).sum()
        assert back.shape == shape and iou > 0.9, (shape, mode, iou)


def test_lung_box_has_its_margin_and_a_fallback():
    mask = np.zeros((100, 80), bool)
    mask[20:60, 10:50] = True
    assert P.lung_box(mask, 0.1) == ((6, 16, 54, 64), True)
    assert P.lung_box(mask, 1.0) == ((0, 0, 80, 100), True)  # clipped to the film
    assert P.lung_box(np.zeros((30, 40), bool)) == ((0, 0, 40, 30), False)
    two = np.zeros((20, 20), bool)
    two[2:5, 2:5] = two[10:18, 10:18] = two[0, 19] = True
    assert P.keep_largest(two, 2).sum() == 9 + 64 and P.keep_largest(two, 0).sum() == 74


def test_predict_api_returns_masks_at_each_films_size(tiny, tmp_path):
    out = tmp_path / "run"
    _train(TINY, tiny, out)
    films = [film(lungs(90, 70), seed=5), film(lungs(40, 64), seed=6)]
    result = P.segment_lungs(films, out / "seg.pt", margin=0.05)
    assert [r.mask.shape for r in result] == [(90, 70), (40, 64)]
    for r, f in zip(result, films, strict=True):
        assert r.mask.dtype == bool and r.found
        x0, y0, x1, y1 = r.box
        assert 0 <= x0 < x1 <= f.shape[1] and 0 <= y0 < y1 <= f.shape[0]
        assert r.mask[:y0].sum() == r.mask[y1:].sum() == 0
    assert P.load(out / "seg.pt") is P.load(out / "seg.pt")  # loaded once
    with pytest.raises(ValueError, match="expected uint8"):
        P.load(out / "seg.pt").segment([np.zeros((10, 10, 3), np.uint8)])


def test_predict_module_imports_without_torch_or_tensorflow():
    code = (
        "import sys, stages.segmenter.predict; "
        "print(sorted(m for m in ('torch', 'tensorflow', 'monai') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
