"""Peak RSS of a detector training epoch over 40 vs 400 cached images: does memory grow with N?

Input:  two synthetic detection augment caches written with ``stages.common.cache``'s writer, identical
        except for the number of train images (``--small`` 40 and ``--large`` 400; val 8 each),
        128 px by default. Each is trained for one epoch by the real stage function
        (``stages.detector.train.train``: params.yaml's train_detector section with backbone
        resnet18, weights none, epochs 1, DataLoader in-process) in a fresh subprocess.
Output: per run the peak RSS (``resource.getrusage`` ru_maxrss and /proc VmHWM), the RSS after
        the imports (baseline) and the growth above it; the ratio large/small of the peaks and
        the growth in MB next to what holding the images would cost (uint8 and float32), which
        says how sensitive the check is; JSON with ``--out``. It should stay ~1: the data path
        reads rows from images.npy instead of loading the split.
Run:    .venv/bin/python bench/detector_memory.py [--out r.json]
        .venv/bin/python bench/detector_memory.py --image-size 512 --min-size 128  (more sensitive:
            400 images are 100 MB uint8, yet the model still trains at 128 px)
        .venv/bin/python bench/detector_memory.py --quick     (8 vs 24 images)
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

from _common import load1, machine, peak_rss_mb, print_table, save, stopwatch, write_detection_cache

from stages.common.config import load_section
from stages.detector.config import TrainDetectorConfig

VAL_IMAGES = 8


def child(args: argparse.Namespace) -> None:
    """Train one epoch over ``args.cache`` in this (fresh) process; print the memory figures."""
    from stages.detector.train import train

    baseline = peak_rss_mb()
    base = load_section(TrainDetectorConfig, "train_detector", "params.yaml")
    cfg = dataclasses.replace(
        base,
        backbone="resnet18",
        weights_backbone="none",
        epochs=1,
        min_size=args.min_size,
        max_size=args.min_size,
        num_workers=0,
        threads=args.threads,
    )
    out = Path(args.work)
    with stopwatch() as t:
        metrics = train(
            cfg, Path(args.cache), out / "m.pt", out / "live", out / "ckpt", out / "metrics.json"
        )
    row = {
        "baseline_rss_mb": baseline.get("vmrss_mb", baseline["ru_maxrss_mb"]),
        **peak_rss_mb(),
        "epoch_seconds": round(t["seconds"], 1),
        "n_train": metrics["n_train"],
        "batch_size": cfg.batch_size,
    }
    print("RESULT " + json.dumps(row), flush=True)


def run_one(n: int, size: int, min_size: int | None, threads: int, tmp: Path) -> dict[str, Any]:
    cache, work = tmp / f"cache{n}", tmp / f"work{n}"
    write_detection_cache(cache, {"train": n, "val": VAL_IMAGES}, size, seed=n)
    cmd = [sys.executable, __file__, "--child", "--cache", str(cache), "--work", str(work)]
    cmd += ["--threads", str(threads)]
    if min_size is not None:
        cmd += ["--min-size", str(min_size)]
    load = load1()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            row = json.loads(line.removeprefix("RESULT "))
            row["growth_mb"] = round(row["ru_maxrss_mb"] - row["baseline_rss_mb"], 1)
            return {"n": n, **row, "load_1min_before": load}
    tail = "\n".join(proc.stderr.splitlines()[-8:])
    raise RuntimeError(f"training on {n} images failed (exit {proc.returncode}):\n{tail}")


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=40)
    parser.add_argument("--large", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=128, help="cache image size")
    parser.add_argument("--min-size", type=int, default=None, help="training size (null: cache)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    parser.add_argument("--quick", action="store_true", help="8 vs 24 images")
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return None
    small, large = (8, 24) if args.quick else (args.small, args.large)
    size = args.image_size
    results: dict[str, Any] = {"machine": machine(), "image_size": size, "min_size": args.min_size}
    with tempfile.TemporaryDirectory(prefix="bench-detmem-") as tmp:
        rows = [run_one(n, size, args.min_size, args.threads, Path(tmp)) for n in (small, large)]
    extra = large - small
    results["rows"] = rows
    results["ratio_peak_rss_large_vs_small"] = round(
        rows[1]["ru_maxrss_mb"] / rows[0]["ru_maxrss_mb"], 3
    )
    results["peak_difference_mb"] = round(rows[1]["ru_maxrss_mb"] - rows[0]["ru_maxrss_mb"], 1)
    # What a path that held the extra images in memory would add to the peak.
    results["extra_images_uint8_mb"] = round(extra * size * size / 2**20, 1)
    results["extra_images_float32_mb"] = round(4 * extra * size * size / 2**20, 1)
    cols = ["n", "n_train", "epoch_seconds", "baseline_rss_mb", "ru_maxrss_mb", "vmhwm_mb"]
    cols += ["growth_mb", "load_1min_before"]
    train_px = args.min_size or size
    print_table(rows, cols, f"detector epoch peak RSS, cache {size} px, training {train_px} px")
    print(
        f"peak RSS {large} / {small} images: {results['ratio_peak_rss_large_vs_small']}x "
        f"({results['peak_difference_mb']:+} MB); holding the {extra} extra images would add "
        f"{results['extra_images_uint8_mb']} MB (uint8) / "
        f"{results['extra_images_float32_mb']} MB (float32)"
    )
    save(args.out, results)
    return results


if __name__ == "__main__":
    main()
