"""train-detector: streaming dataset, loss going down, non-finite stop, resume, outputs, overfit."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import stages  # noqa: F401
from stages.common import cache
from stages.common.config import ConfigError, parse
from stages.common.utils import StageError
from stages.detector import engine as E
from stages.detector.config import TrainDetectorConfig
from stages.detector.data import DetectionCacheDataset, make_loader
from stages.detector.model import build_detector, load_detector, predict
from stages.detector.train import train
from stages.train import main

CLASSES = ["Square", "Disk"]
TINY = TrainDetectorConfig(
    fpn_channels=64,
    anchor_sizes=((8,), (16,), (32,), (64,), (128,)),
    aspect_ratios=(1.0,),
    epochs=2,
    batch_size=4,
    lr=1e-3,
    warmup_iters=2,
    threads=1,
    seed=0,
)
POLICY = {"hflip": 0.5, "scale_jitter": [0.9, 1.1], "brightness": 0.05, "contrast": 0.05}


def draw(rng: np.random.Generator, size: int, n_objects: int) -> tuple[np.ndarray, list]:
    """Noise plus bright squares (class 1) and disks (class 2); tight boxes."""
    img = rng.normal(50, 12, (size, size)).clip(0, 255)
    yy, xx = np.mgrid[:size, :size]
    anns = []
    for _ in range(n_objects):
        s = int(rng.integers(size // 6, size // 4))
        x, y = (int(v) for v in rng.integers(0, size - s, 2))
        cls = int(rng.integers(1, 3))
        if cls == 1:
            img[y : y + s, x : x + s] = 220
        else:
            r = s / 2
            img[(xx + 0.5 - x - r) ** 2 + (yy + 0.5 - y - r) ** 2 <= r * r] = 160
        anns.append((cls, [x, y, s, s]))
    return img.astype(np.uint8), anns


def make_cache(root: Path, counts: dict[str, int], size: int = 64, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
    for split, n in counts.items():
        images, coco = [], {"images": [], "annotations": [], "categories": cats}
        for i in range(n):
            img, anns = draw(rng, size, 0 if i % 4 == 3 else 1)  # every 4th image: negative
            images.append(img)
            coco["images"].append(
                {"id": i, "file_name": f"{split}{i}.png", "width": size, "height": size}
            )
            for cls, box in anns:
                coco["annotations"].append(
                    {
                        "id": len(coco["annotations"]) + 1,
                        "image_id": i,
                        "category_id": cls,
                        "bbox": box,
                        "area": box[2] * box[3],
                        "iscrowd": 0,
                    }
                )
        index = pd.DataFrame({"path": [f"{split}{i}.png" for i in range(n)], "label": "x"})
        cache.write_split(root, split, images, index, size, coco)
    cache.write_meta(
        root,
        {
            "task": "detection",
            "image_size": size,
            "resize": "pad",
            "classes": CLASSES,
            "counts": counts,
        },
    )
    cache.write_policy(root, POLICY)
    return root


@pytest.fixture
def tiny(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # relative outputs and dvclive stay inside tmp_path
    torch.set_num_threads(1)
    return make_cache(tmp_path / "cache", {"train": 8, "val": 4, "test": 2})


def _run(cfg: TrainDetectorConfig, cache_dir: Path, out: Path) -> dict:
    return train(cfg, cache_dir, out / "detector.pt", out / "live", out / "ckpt")


def test_dataset_streams_rows_and_keeps_negatives(tiny):
    ds = DetectionCacheDataset(tiny, "train", CLASSES)
    images = np.load(tiny / "fit" / "train" / "images.npy")
    assert len(ds) == 8
    img, target = ds[3]
    assert img.shape == (1, 64, 64) and img.dtype == torch.float32
    np.testing.assert_allclose(img[0].numpy() * 255, images[3], atol=1e-3)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    _, target = ds[0]
    assert target["boxes"].shape == (1, 4) and int(target["labels"][0]) in (1, 2)
    assert target["image_id"] == 0
    loader, sampler = make_loader(ds, 3, train=True, num_workers=2, seed=0)
    sampler.set_epoch(0)
    seen = [t["image_id"] for _, targets in loader for t in targets]
    assert sorted(seen) == list(range(8))


def test_dataset_memory_stays_flat(tmp_path):
    """Reading every image must not keep them resident (a memory map would: ~26 MB here)."""
    root = make_cache(tmp_path / "c", {"train": 100, "val": 1}, size=512)
    ds = DetectionCacheDataset(root, "train", CLASSES)

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

    ds[0]
    before = rss()
    for i in range(len(ds)):
        ds[i]
    assert rss() - before < 8 * 2**20


def test_unknown_category_stops_with_the_record(tiny):
    path = tiny / "fit" / "train" / "annotations.json"
    coco = json.loads(path.read_text())
    coco["annotations"][0]["category_id"] = 7
    path.write_text(json.dumps(coco))
    with pytest.raises(StageError, match="unknown category_id 7"):
        DetectionCacheDataset(tiny, "train", CLASSES)


def test_few_steps_on_a_fixed_batch_lower_the_loss(tiny):
    torch.manual_seed(0)
    model = build_detector(dataclasses.replace(TINY, min_size=64), len(CLASSES)).train()
    ds = DetectionCacheDataset(tiny, "train", CLASSES)
    images, targets = zip(*[ds[i] for i in range(4)], strict=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = sum(model(list(images), list(targets)).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_non_finite_loss_stops_naming_iteration_and_parts(tiny):
    ds = DetectionCacheDataset(tiny, "train", CLASSES)
    loader, _ = make_loader(ds, 2, train=False, num_workers=0, seed=0)

    class Exploding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))
            self.calls = 0

        def forward(self, images, targets):
            self.calls += 1
            bad = float("nan") if self.calls == 2 else 1.0
            return {"classification": self.w * bad, "bbox_regression": self.w * 0.5}

    model = Exploding()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)
    with pytest.raises(
        StageError, match=r"iteration 2 \(classification=nan, bbox_regression=0\.\d+\)"
    ):
        E.train_one_epoch(model, opt, sched, loader, 0, 1.0, E.DistInfo())


def test_train_writes_model_metrics_and_live_logs(tiny, tmp_path):
    metrics = _run(TINY, tiny, tmp_path / "out")
    out = tmp_path / "out"
    saved = json.loads((out / "live" / "training.json").read_text())  # the summary's default home
    assert saved == json.loads(json.dumps(metrics))
    assert {"val_map_50", "val_map", "best_epoch", "epochs_run", "train_loss"} <= set(saved)
    assert saved["epochs_run"] == 2 and 1 <= saved["best_epoch"] <= 2
    assert 0 <= saved["val_map_50"] <= 1 and saved["seconds_per_epoch"] > 0
    assert len(saved["val_map_50_per_epoch"]) == 2
    model, cfg, classes = load_detector(out / "detector.pt")
    assert classes == CLASSES and cfg.min_size == 64 and cfg.max_size == 64
    preds = predict(model, np.load(tiny / "test" / "images.npy"))
    assert len(preds) == 2
    assert (out / "live" / "plots" / "metrics" / "val" / "map_50.tsv").is_file()
    # finished: the weights are in detector.pt, the resume checkpoints are gone
    assert not (out / "ckpt").exists()


def test_resume_continues_at_the_next_epoch(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = E.train_one_epoch
    epochs: list[int] = []

    def interrupted(model, optimizer, scheduler, loader, epoch, *args, **kwargs):
        if epoch == 1 and not epochs.count(-1):
            epochs.append(-1)
            raise KeyboardInterrupt  # the machine went down during epoch 2
        epochs.append(epoch)
        return real(model, optimizer, scheduler, loader, epoch, *args, **kwargs)

    monkeypatch.setattr(E, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(TINY, tiny, out)
    assert not (out / "detector.pt").exists()
    after_one = torch.load(out / "ckpt" / "last.pt", weights_only=True)
    assert after_one["epoch"] == 0
    metrics = _run(dataclasses.replace(TINY, num_workers=1), tiny, out)  # runtime key
    assert epochs == [0, -1, 1]
    assert metrics["epochs_run"] == 2 and len(metrics["val_map_50_per_epoch"]) == 2
    assert metrics["val_map_50_per_epoch"][0] == after_one["history"][0]["val_map_50"]
    lines = (out / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert len(lines) == 3  # header + both epochs, the first replayed from the checkpoint
    assert not (out / "ckpt").exists()  # finished: the weights live in detector.pt
    # A checkpoint left by another config is not resumed: that run starts afresh.
    (out / "ckpt").mkdir()
    torch.save(after_one, out / "ckpt" / "last.pt")
    _run(dataclasses.replace(TINY, lr=5e-4), tiny, out)
    assert epochs == [0, -1, 1, 0, 1]


def _damaged_checkpoint(path: Path, damage: str) -> bytes:
    torch.save({"epoch": 0, "model": {"w": torch.zeros(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else np.random.bytes(4096))
    return path.read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "random-bytes", "not-a-dict"])
def test_an_unreadable_checkpoint_is_moved_aside(tmp_path, damage):
    last = tmp_path / "last.pt"
    if damage == "not-a-dict":
        torch.save([1, 2, 3], last)
        damaged = last.read_bytes()
    else:
        damaged = _damaged_checkpoint(last, damage)
    assert E.load_checkpoint(last) is None
    assert not last.exists() and (tmp_path / "last.pt.corrupt").read_bytes() == damaged


def test_a_corrupt_checkpoint_is_moved_aside_and_training_starts_afresh(tiny, tmp_path, caplog):
    """The checkpoint folder persists between runs: a damaged last.pt (a full disk, a copy cut
    short) is moved to last.pt.corrupt with one WARNING naming it, and the run trains from
    epoch 1 instead of failing on it every time."""
    ckpt = tmp_path / "out" / "ckpt"
    ckpt.mkdir(parents=True)
    last = ckpt / "last.pt"
    _damaged_checkpoint(last, "truncated")
    with caplog.at_level("WARNING", logger="stages"):
        metrics = _run(TINY, tiny, tmp_path / "out")
    assert metrics["epochs_run"] == 2
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and str(last) in r.message]
    assert len(warnings) == 1, [r.message for r in caplog.records]
    assert f"moved to {last}.corrupt" in warnings[0].message
    assert "starts afresh" in warnings[0].message
    # finished: the checkpoints went with the run, the damaged file too
    assert not ckpt.exists()


def test_empty_training_split_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_cache(tmp_path / "cache", {"train": 0, "val": 2})
    with pytest.raises(StageError, match="train is empty"):
        _run(TINY, root, tmp_path / "out")


def test_cli_reads_its_params_section(tiny, tmp_path, params):
    params["train_detector"] = {
        **params["train_detector"],
        "epochs": 1,
        "fpn_channels": 64,
        "threads": 1,
    }
    (tmp_path / "p.yaml").write_text(json.dumps(params))  # JSON is YAML
    main(
        [
            "--task",
            "detection",
            "--params",
            "p.yaml",
            "--cache-dir",
            str(tiny),
            "--model",
            "m/detector.pt",
            "--summary",
            "m/metrics.json",
            "--live-dir",
            "live",
            "--checkpoint-dir",
            "ckpt",
        ]
    )
    assert json.loads((tmp_path / "m" / "metrics.json").read_text())["epochs_run"] == 1
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.slow
def test_overfits_a_handful_of_synthetic_images(tmp_path, monkeypatch):
    """Six synthetic phantoms (all four lesion kinds, one normal) are memorised: mAP@0.5 > 0.9."""
    from stages.sources.synthetic import render_detection

    monkeypatch.chdir(tmp_path)
    size, classes = 128, ["Consolidation", "Nodule", "Mass", "Effusion"]
    kinds = [
        ("Mass",),
        ("Nodule", "Consolidation"),
        ("Effusion",),
        (),
        ("Consolidation", "Mass"),
        ("Nodule",),
    ]
    images, coco = (
        [],
        {
            "images": [],
            "annotations": [],
            "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)],
        },
    )
    for i, k in enumerate(kinds):
        img, boxes = render_detection((5, 2, i), (5, 2, i, 0), size, k)
        images.append(img)
        coco["images"].append({"id": i, "file_name": f"{i}.png", "width": size, "height": size})
        for kind, (x1, y1, x2, y2) in zip(k, boxes, strict=True):
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": i,
                    "category_id": classes.index(kind) + 1,
                    "iscrowd": 0,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": 1,
                }
            )
    index = pd.DataFrame({"path": [f"{i}.png" for i in range(len(kinds))], "label": "x"})
    root = tmp_path / "cache"
    for split in ("train", "val"):  # validate on the training images: the bar is memorisation
        cache.write_split(root, split, images, index, size, coco)
    cache.write_meta(
        root,
        {
            "task": "detection",
            "image_size": size,
            "resize": "pad",
            "classes": classes,
            "counts": {},
        },
    )
    cache.write_policy(
        root, {"hflip": 0.0, "scale_jitter": [1.0, 1.0], "brightness": 0.0, "contrast": 0.0}
    )
    cfg = dataclasses.replace(
        TINY, epochs=40, batch_size=6, lr=2e-3, warmup_iters=5, aspect_ratios=(0.5, 1.0, 2.0)
    )
    metrics = _run(cfg, root, tmp_path / "out")
    assert metrics["val_map_50"] > 0.9, metrics["val_map_50_per_epoch"]


def test_native_bf16_reads_the_cpu_flags():
    assert E.native_bf16("cpu", "flags\t: fpu sse2 avx512f amx_bf16 amx_tile\n")
    assert E.native_bf16("cpu", "flags\t: fpu avx512f avx512_bf16\n")
    assert not E.native_bf16("cpu", "flags\t: fpu sse2 avx2 avx512f\n")
    assert not E.native_bf16("cpu", "")


def test_precision_auto_resolves_by_hardware(monkeypatch):
    monkeypatch.setattr(E, "native_bf16", lambda device: True)
    assert E.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(E, "native_bf16", lambda device: False)
    assert E.resolve_precision("auto", "cpu") == "fp32"
    assert E.resolve_precision("bf16", "cpu") == "bf16"  # explicit values are kept
    with pytest.raises(ConfigError, match="precision"):
        parse(TrainDetectorConfig, {"precision": "fp16"}, "train_detector")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_precision_reaches_the_convolutions_and_keeps_fp32_weights(tiny, precision):
    """bf16 runs the convolutions in bf16 under autocast, fp32 does not; either way the weights,
    the gradients' target and the summed loss stay fp32 and a few steps lower the loss."""
    torch.manual_seed(0)
    model = build_detector(dataclasses.replace(TINY, min_size=64), len(CLASSES)).train()
    seen: list[torch.dtype] = []
    model.backbone.body.conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    ds = DetectionCacheDataset(tiny, "train", CLASSES)
    loader, _ = make_loader(ds, 4, train=False, num_workers=0, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)
    losses = [
        E.train_one_epoch(model, opt, sched, loader, e, 10.0, E.DistInfo(), precision=precision)
        for e in range(4)
    ]
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert seen and set(seen) == {want}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1]["loss"] < 0.8 * losses[0]["loss"], [r["loss"] for r in losses]


def test_training_summary_and_checkpoint_record_the_precision_that_ran(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(E, "native_bf16", lambda device: False)
    metrics = _run(dataclasses.replace(TINY, epochs=1), tiny, tmp_path / "out")
    assert metrics["precision"] == "fp32"
    _, cfg, _ = load_detector(tmp_path / "out" / "detector.pt")
    assert cfg.precision == "fp32"  # auto resolved on this (patched) hardware


def test_backbone_norm_groupnorm_replaces_every_batchnorm():
    cfg = dataclasses.replace(TINY, min_size=64, backbone_norm="groupnorm")
    kinds = {type(m).__name__ for m in build_detector(cfg, len(CLASSES)).backbone.modules()}
    assert "GroupNorm" in kinds and "BatchNorm2d" not in kinds
    default = {
        type(m).__name__
        for m in build_detector(dataclasses.replace(TINY, min_size=64), 2).backbone.modules()
    }
    assert "BatchNorm2d" in default
    with pytest.raises(ConfigError, match="backbone_norm groupnorm is for weights_backbone none"):
        parse(
            TrainDetectorConfig,
            {"backbone_norm": "groupnorm", "weights_backbone": "imagenet"},
            "train_detector",
        )
