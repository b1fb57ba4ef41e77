"""The default detector's training step three ways: what bf16 autocast and the fused optimiser buy.

Input:  nothing real. A synthetic detection augment cache at params.yaml's detection image size
        (``augment.detection.image_size``; 4 classes, 0-3 boxes per image) written with
        ``stages.common.cache``'s writer; the real data path, model (params.yaml's
        ``train_detector``: ResNet-18 FPN-64, batch 4) and training step
        (``stages.detector.engine.train_one_epoch``).
        (a) baseline: fp32, torch's per-parameter AdamW loop (the stage before 2026-12-03);
        (b) fp32 with the fused AdamW (``build_optimizer``'s default);
        (c) bf16 autocast + fused AdamW (``precision: bf16``; where the CPU has no bf16 units,
            AMX or AVX512-BF16, it is emulated and slower: ``precision: auto`` then picks fp32).
Output: s/step (mean of ``--steps`` steps after 2 warm-up steps), images/s and the ratio to (a),
        each in a fresh subprocess; whether this CPU has native bf16; JSON with ``--out``.
Run:    .venv/bin/python bench/detector_step.py [--steps 20] [--out r.json]
        .venv/bin/python bench/detector_step.py --quick      (3 timed steps)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import load1, machine, print_table, save, write_detection_cache

from stages.common.config import get_section, load_section, read_params
from stages.detector.config import TrainDetectorConfig

CLASSES = ["Consolidation", "Effusion", "Mass", "Nodule"]
VARIANTS = {  # name: (precision, fused optimiser)
    "fp32, per-parameter AdamW (baseline)": ("fp32", False),
    "fp32, fused AdamW": ("fp32", True),
    "bf16 autocast, fused AdamW": ("bf16", True),
}


def measure(name: str, steps: int) -> dict[str, Any]:
    """One variant in this process: 2 warm-up steps, then ``steps`` timed steps."""
    import torch

    from stages.common.utils import seed_everything, set_torch_threads
    from stages.detector import engine as E
    from stages.detector.augment import DetectionPolicy, DetectionTransform
    from stages.detector.data import DetectionCacheDataset, make_loader
    from stages.detector.model import build_detector

    precision, fused = VARIANTS[name]
    cfg = load_section(TrainDetectorConfig, "train_detector", "params.yaml")
    size = int(get_section(read_params("params.yaml"), "augment.detection")["image_size"])
    cfg = dataclasses.replace(cfg, min_size=size, max_size=size, num_workers=0)
    info = E.DistInfo()
    set_torch_threads(E.threads_per_process(cfg.threads, info))
    seed_everything(cfg.seed)
    with tempfile.TemporaryDirectory(prefix="bench-detstep-") as tmp:
        cache = Path(tmp)
        write_detection_cache(cache, {"train": cfg.batch_size * (steps + 2)}, size, CLASSES)
        ds = DetectionCacheDataset(
            cache, "train", CLASSES, DetectionTransform(DetectionPolicy(), train=True)
        )
        loader, _ = make_loader(ds, cfg.batch_size, True, 0, cfg.seed)
        model = build_detector(cfg, len(CLASSES))
        optimizer = E.build_optimizer(cfg, model, fused=fused)
        scheduler = E.build_scheduler(cfg, optimizer, 10 * len(loader))
        run = dict(grad_clip=cfg.grad_clip, info=info, precision=precision)
        E.train_one_epoch(model, optimizer, scheduler, loader, 0, max_steps=2, **run)
        stats = E.train_one_epoch(model, optimizer, scheduler, loader, 1, max_steps=steps, **run)
    per_step = stats["seconds"] / stats["steps"]
    return {
        "variant": name,
        "size": size,
        "batch": cfg.batch_size,
        "timed_steps": stats["steps"],
        "s_per_step": round(per_step, 4),
        "images_per_s": round(cfg.batch_size / per_step, 2),
        "threads": torch.get_num_threads(),
        "native_bf16": E.native_bf16("cpu"),
        "load_1min_before": load1(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--quick", action="store_true", help="3 timed steps per variant")
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    steps = 3 if args.quick else args.steps
    if args.child:
        print("RESULT " + json.dumps(measure(args.child, steps)), flush=True)
        return None
    rows = []
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--child", name, "--steps", str(steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if not lines:
            tail = "\n".join(proc.stderr.splitlines()[-5:])
            print(f"{name} failed (exit {proc.returncode}):\n{tail}", file=sys.stderr)
            rows.append({"variant": name, "error": f"exit {proc.returncode}"})
            continue
        rows.append(json.loads(lines[-1].removeprefix("RESULT ")))
        print(f"  {name}: {rows[-1]['s_per_step']} s/step", flush=True)
    base = rows[0].get("s_per_step")
    for row in rows:
        if base and row.get("s_per_step"):
            row["vs_baseline"] = round(row["s_per_step"] / base, 3)
    results = {"machine": machine(), "rows": rows}
    cols = ["variant", "size", "batch", "s_per_step", "images_per_s", "vs_baseline"]
    cols += ["native_bf16", "threads", "load_1min_before"]
    print_table(rows, cols, "Default detector training step (params.yaml), 2 warm-up steps")
    save(args.out, results)
    return results


if __name__ == "__main__":
    main()
