"""Detector training speed on this CPU: s/step and extrapolated s/epoch of full ChestX-Det10.

Input:  nothing real. Per (backbone, image size) config a small synthetic detection augment cache
        (10 ChestX-Det10 classes, 0-3 boxes per image) is written with ``stages.common.cache``'s writer;
        the real data path (``stages.detector.data``: DetectionCacheDataset + DetectionTransform
        + make_loader), model (``stages.detector.model.build_detector``, weights none) and
        training step (``stages.detector.engine.train_one_epoch``: loss sum, backward, gradient
        clipping, AdamW, per-iteration LR schedule) run on it, batch 2, all cores.
        Preset ``seed004`` (default) = the documented full ChestX-Det10 run (README,
        seed004-retinanet-r101): FPN 256 channels, v1 heads (no GroupNorm), 9 anchors per
        location; preset ``params`` = params.yaml's train_detector section (batch forced to 2).
Output: a table of s/step (mean of ``--steps`` steps after 1 warm-up step), images/s and the
        extrapolated s/epoch and h/epoch for the 3,001 ChestX-Det10 train images (1,501 steps of
        2; training only, validation not included), peak RSS per config; JSON with ``--out``.
        Each config runs in a fresh subprocess (clean memory, own peak RSS).
Run:    .venv/bin/python bench/detector_epoch.py [--steps 3] [--out r.json]
        .venv/bin/python bench/detector_epoch.py --quick      (resnet18 at 128 px, 1 step)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import (
    CHESTXDET10_CLASSES,
    load1,
    machine,
    peak_rss_mb,
    print_table,
    save,
    write_detection_cache,
)

from stages.common.config import load_section, to_dict
from stages.detector.config import TrainDetectorConfig

TRAIN_IMAGES = 3001  # ChestX-Det10 train.json records
BATCH = 2  # seed 004
SHORT = {"resnet18": "r18", "resnet34": "r34", "resnet50": "r50", "resnet101": "r101"}
SEED004 = {
    "fpn_channels": 256,
    "head_norm": "none",
    "anchor_sizes": (
        (32, 40, 50),
        (64, 80, 101),
        (128, 161, 203),
        (256, 322, 406),
        (512, 645, 812),
    ),
}


def preset_config(preset: str, backbone: str, size: int, threads: int = 0) -> TrainDetectorConfig:
    base = load_section(TrainDetectorConfig, "train_detector", "params.yaml")
    extra = SEED004 if preset == "seed004" else {}
    return dataclasses.replace(
        base,
        **extra,
        backbone=backbone,
        weights_backbone="none",
        batch_size=BATCH,
        min_size=size,
        max_size=size,
        num_workers=0,
        threads=threads,
    )


def measure(cfg: TrainDetectorConfig, steps: int) -> dict[str, Any]:
    """One config in this process: warm-up step, then ``steps`` timed training steps."""
    import torch

    from stages.common.utils import seed_everything, set_torch_threads
    from stages.detector import engine as E
    from stages.detector.augment import DetectionPolicy, DetectionTransform
    from stages.detector.data import DetectionCacheDataset, make_loader
    from stages.detector.model import build_detector

    info = E.DistInfo()
    set_torch_threads(E.threads_per_process(cfg.threads, info))
    seed_everything(cfg.seed)
    size = int(cfg.min_size or 0)
    with tempfile.TemporaryDirectory(prefix="bench-det-") as tmp:
        cache = Path(tmp)
        write_detection_cache(cache, {"train": BATCH * (steps + 1)}, size)
        transform = DetectionTransform(DetectionPolicy(), train=True)
        ds = DetectionCacheDataset(cache, "train", CHESTXDET10_CLASSES, transform)
        loader, _ = make_loader(ds, cfg.batch_size, True, 0, cfg.seed)
        model = build_detector(cfg, len(CHESTXDET10_CLASSES))
        optimizer = E.build_optimizer(cfg, model)
        scheduler = E.build_scheduler(cfg, optimizer, 10 * len(loader))
        params = sum(p.numel() for p in model.parameters())
        load = load1()
        # Warm-up: first-call allocations and kernel selection are not steady state.
        E.train_one_epoch(model, optimizer, scheduler, loader, 0, cfg.grad_clip, info, 1)
        stats = E.train_one_epoch(
            model, optimizer, scheduler, loader, 1, cfg.grad_clip, info, steps
        )
    per_step = stats["seconds"] / stats["steps"]
    epoch_steps = math.ceil(TRAIN_IMAGES / BATCH)
    return {
        "backbone": SHORT[cfg.backbone],
        "size": size,
        "params_m": round(params / 1e6, 1),
        "timed_steps": stats["steps"],
        "s_per_step": round(per_step, 3),
        "images_per_s": round(BATCH / per_step, 2),
        "s_per_epoch": round(per_step * epoch_steps),
        "h_per_epoch": round(per_step * epoch_steps / 3600, 2),
        "loss_finite": bool(math.isfinite(stats["loss"])),
        "threads": torch.get_num_threads(),
        "load_1min_before": load,
        **peak_rss_mb(),
    }


def child(args: argparse.Namespace) -> None:
    cfg = preset_config(args.preset, args.backbone, args.size, args.threads)
    row = measure(cfg, args.steps)
    print("RESULT " + json.dumps(row), flush=True)


def run_config(backbone: str, size: int, steps: int, preset: str, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", "--backbone", backbone, "--size", str(size)]
    cmd += ["--steps", str(steps), "--preset", preset, "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    tail = "\n".join(proc.stderr.splitlines()[-5:])
    print(f"{backbone} {size}px failed (exit {proc.returncode}):\n{tail}", file=sys.stderr)
    return {"backbone": SHORT[backbone], "size": size, "error": f"exit {proc.returncode}"}


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="resnet18,resnet50,resnet101")
    parser.add_argument("--sizes", default="256,512,1024")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per config")
    parser.add_argument("--preset", choices=("seed004", "params"), default="seed004")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    parser.add_argument("--quick", action="store_true", help="resnet18 at 128 px, 1 timed step")
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backbone", default="resnet18", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=256, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return None
    backbones, sizes, steps = (
        args.backbones.split(","),
        [int(s) for s in args.sizes.split(",")],
        args.steps,
    )
    if args.quick:
        backbones, sizes, steps = ["resnet18"], [128], 1
    cfg = preset_config(args.preset, backbones[0], sizes[0])
    shown = {k: v for k, v in to_dict(cfg).items() if k not in ("backbone", "min_size", "max_size")}
    results: dict[str, Any] = {"machine": machine(), "preset": args.preset, "config": shown}
    rows = []
    for backbone in backbones:
        for size in sizes:
            rows.append(run_config(backbone, size, steps, args.preset, args.threads))
            print(f"  {SHORT[backbone]} {size}px: {rows[-1].get('s_per_step')} s/step", flush=True)
    results["rows"] = rows
    results["epoch"] = (
        f"{TRAIN_IMAGES} images, batch {BATCH} = {math.ceil(TRAIN_IMAGES / BATCH)} steps"
    )
    cols = ["backbone", "size", "params_m", "s_per_step", "images_per_s", "s_per_epoch"]
    cols += ["h_per_epoch", "threads", "ru_maxrss_mb", "load_1min_before"]
    print_table(
        rows,
        cols,
        f"RetinaNet training on CPU ({args.preset} preset, batch {BATCH}); "
        f"epoch = {results['epoch']}",
    )
    save(args.out, results)
    return results


if __name__ == "__main__":
    main()
