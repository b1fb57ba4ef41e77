"""DDP: 2 CPU processes (gloo) agree on the weights after a step; torchrun runs the stage CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

import stages  # noqa: F401
from stages.common import cache
from stages.detector import engine as E
from stages.detector.config import TrainDetectorConfig
from stages.detector.data import DetectionCacheDataset, make_loader
from stages.detector.model import build_detector

REPO = Path(__file__).resolve().parents[1]
CFG = TrainDetectorConfig(
    min_size=64,
    fpn_channels=64,
    anchor_sizes=((8,), (16,), (32,), (64,), (128,)),
    aspect_ratios=(1.0,),
    batch_size=2,
    lr=1e-3,
    warmup_iters=0,
    threads=1,
    seed=0,
    epochs=1,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tiny_cache(root: Path, n: int = 4, size: int = 64) -> Path:
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(n):
        img = rng.integers(0, 60, (size, size), dtype=np.uint8)
        x, y = (int(v) for v in rng.integers(0, size - 16, 2))
        img[y : y + 16, x : x + 16] = 220
        images.append(img)
        anns.append(
            {
                "id": i + 1,
                "image_id": i,
                "category_id": 1,
                "bbox": [x, y, 16, 16],
                "area": 256,
                "iscrowd": 0,
            }
        )
    coco = {
        "images": [
            {"id": i, "file_name": f"{i}.png", "width": size, "height": size} for i in range(n)
        ],
        "annotations": anns,
        "categories": [{"id": 1, "name": "Box"}],
    }
    index = pd.DataFrame({"path": [f"{i}.png" for i in range(n)], "label": "abnormal"})
    for split in ("train", "val"):
        cache.write_split(root, split, images, index, size, coco)
    cache.write_meta(
        root,
        {
            "task": "detection",
            "image_size": size,
            "resize": "pad",
            "classes": ["Box"],
            "counts": {"train": n, "val": n},
        },
    )
    cache.write_policy(
        root, {"hflip": 0.5, "scale_jitter": [1.0, 1.0], "brightness": 0.0, "contrast": 0.0}
    )
    return root


def _one_step_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    info = E.setup_distributed()
    try:
        torch.manual_seed(100 + rank)  # different initial weights: DDP must broadcast rank 0's
        model = build_detector(CFG, 1)
        torch.save(model.state_dict(), Path(out) / f"init{rank}.pt")
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ds = DetectionCacheDataset(Path(root), "train", ["Box"])
        loader, sampler = make_loader(ds, CFG.batch_size, True, 0, CFG.seed, rank, world)
        sampler.set_epoch(0)
        opt = E.build_optimizer(CFG, ddp)
        sched = E.build_scheduler(CFG, opt, 1)
        stats = E.train_one_epoch(ddp, opt, sched, loader, 0, CFG.grad_clip, info, max_steps=1)
        assert stats["steps"] == 1
        torch.save(model.state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        E.cleanup_distributed(info)


def test_two_ranks_agree_on_weights_after_one_step(tmp_path):
    root = _tiny_cache(tmp_path / "cache")
    mp.spawn(
        _one_step_worker, args=(2, _free_port(), str(root), str(tmp_path)), nprocs=2, join=True
    )
    init0, init1 = (torch.load(tmp_path / f"init{r}.pt", weights_only=True) for r in (0, 1))
    after0, after1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    key = "head.classification_head.cls_logits.weight"
    assert not torch.equal(init0[key], init1[key])  # the ranks really started apart
    assert not torch.equal(after0[key], init0[key])  # and a step happened
    # Parameters agree exactly. BatchNorm running statistics are per-rank between steps: DDP
    # re-broadcasts rank 0's at every forward, and rank 0 writes the checkpoints.
    names = [n for n, _ in build_detector(CFG, 1).named_parameters()]
    assert len(names) > 100
    for name in names:
        assert torch.equal(after0[name], after1[name]), name


@pytest.mark.slow
def test_torchrun_runs_the_stage(tmp_path):
    root = _tiny_cache(tmp_path / "cache", n=6)
    params = {
        "train_detector": {
            "min_size": 64,
            "fpn_channels": 64,
            "epochs": 1,
            "batch_size": 2,
            "threads": 1,
        }
    }
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "stages.train",
        "--task",
        "detection",
        "--params",
        "params.yaml",
        "--cache-dir",
        str(root),
        "--model",
        "detector.pt",
        "--summary",
        "metrics.json",
        "--live-dir",
        "live",
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "metrics.json").read_text())  # --summary: the whole summary
    assert summary["world_size"] == 2 and summary["epochs_run"] == 1
    assert (tmp_path / "live" / "metrics.json").is_file()  # dvclive's own, beside its curves
    assert (tmp_path / "detector.pt").is_file() and not (tmp_path / "ckpt").exists()
