"""Shared helpers of the benchmarks: machine facts, the Kermany cache, tables and JSON output.

Input: the real Kermany folder (``../shared/data/kermany224``) for the classifier benchmarks.
Output: an augment cache built by the real download -> split -> augment stages (into ``--cache``
or a temporary directory), printed tables, JSON result files.
No run command of its own; imported by the scripts in bench/.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import stages  # noqa: F401  (torch before TensorFlow: the other order segfaults)
from stages.common import cache
from stages.common.config import parse
from stages.common.utils import read_json, write_json

KERMANY = Path("../shared/data/kermany224")
KERMANY_TRAIN = KERMANY / "train"
# Seed 002's generator: shear 0.2, zoom 0.2, horizontal flip (nothing else).
SEED002_POLICY = {
    "rotation": 0.0,
    "zoom": 0.2,
    "shear": 0.2,
    "shift": 0.0,
    "hflip": True,
    "brightness": 0.0,
    "contrast": 0.0,
}


def seed002_policy() -> Any:
    """Seed 002's policy as a ClassificationPolicy (imported here: it pulls in TensorFlow,
    which the detector benchmarks do not need)."""
    from stages.classifier.augment import ClassificationPolicy

    return parse(ClassificationPolicy, SEED002_POLICY, "seed 002 policy")


def machine() -> dict[str, Any]:
    """Date, CPU count and the current load average (recorded next to every figure)."""
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


def load1() -> float:
    return round(os.getloadavg()[0], 2)


@contextlib.contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """``with stopwatch() as t: ...`` then ``t["seconds"]``."""
    out: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - start


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str = "") -> None:
    """Plain fixed-width table (floats with 3 significant decimals)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "-" if v is None else str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for b in body:
        print("  ".join(v.ljust(w) for v, w in zip(b, widths, strict=True)))


def save(out: Path | None, results: dict[str, Any]) -> None:
    if out is not None:
        write_json(out, results)
        print(f"\nresults written to {out}")


def _cache_ok(cache_dir: Path, image_size: int) -> bool:
    meta = cache.fit_path(cache_dir) / cache.META_FILE
    if (
        not meta.is_file()
        or not (cache.split_path(cache_dir, "train") / cache.IMAGES_FILE).is_file()
    ):
        return False
    return int(read_json(meta)["image_size"]) == image_size


def build_kermany_cache(
    out_dir: Path, work_dir: Path, image_size: int, limit: int | None = None
) -> dict[str, float]:
    """download (kermany, the shared folder) -> split random -> augment, the real stage code.

    Returns the seconds of each stage. ``limit`` keeps that many images (quick runs).
    """
    from stages import augment, download, split
    from stages.classifier.config import ClassificationAugmentConfig
    from stages.sources.config import ClassificationData

    data_cfg = parse(
        ClassificationData,
        {"source": "kermany", "root": str(KERMANY.parent), "path": KERMANY.name, "limit": limit},
        "bench",
    )
    raw, split_dir = work_dir / "raw", work_dir / "split"
    seconds: dict[str, float] = {}
    with stopwatch() as t:
        download.run(data_cfg, "classification", raw, work_dir / "downloads")
    seconds["download"] = t["seconds"]
    with stopwatch() as t:
        split.run(split.SplitConfig(), "classification", raw, split_dir, work_dir / "split.json")
    seconds["split"] = t["seconds"]
    aug_cfg = ClassificationAugmentConfig(
        image_size=image_size, resize="stretch", preview_count=0, policy=seed002_policy()
    )
    with stopwatch() as t:
        augment.run("classification", aug_cfg, split_dir, out_dir, work_dir / "preview.png")
    seconds["augment"] = t["seconds"]
    return seconds


@contextlib.contextmanager
def kermany_cache(
    cache: Path | None, image_size: int, limit: int | None = None
) -> Iterator[tuple[Path, dict[str, float]]]:
    """(cache dir, stage seconds). An existing ``cache`` at ``image_size`` is reused (seconds
    empty); a missing one is built there and kept; None (or a ``limit``, so that a partial
    cache is never kept for a later full run) builds in a temp dir, removed after."""
    if cache is not None and _cache_ok(cache, image_size):
        print(f"reusing the augment cache {cache}")
        yield cache, {}
        return
    with tempfile.TemporaryDirectory(prefix="bench-kermany-") as tmp:
        out = cache if cache is not None and limit is None else Path(tmp) / "augment"
        print(f"building the augment cache {out} from {KERMANY} (download, split, augment)")
        seconds = build_kermany_cache(out, Path(tmp), image_size, limit)
        # The PNGs written by download are needed only while augment reads them.
        shutil.rmtree(Path(tmp) / "raw", ignore_errors=True)
        yield out, seconds


# ChestX-Det10's ten findings (category ids 1..10 in this order).
CHESTXDET10_CLASSES = (
    "Atelectasis",
    "Calcification",
    "Consolidation",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Fracture",
    "Mass",
    "Nodule",
    "Pneumothorax",
)


def _synthetic_image(rng: np.random.Generator, size: int, k: int) -> tuple[np.ndarray, list]:
    """Noisy grey image with ``k`` brighter rectangles; boxes COCO xywh in pixels."""
    img = rng.normal(90, 25, (size, size)).clip(0, 255).astype(np.uint8)
    boxes = []
    for _ in range(k):
        w, h = (rng.uniform(0.05, 0.3, 2) * size).astype(int) + 2
        x, y = rng.integers(0, size - w), rng.integers(0, size - h)
        img[y : y + h, x : x + w] = np.clip(img[y : y + h, x : x + w].astype(int) + 80, 0, 255)
        boxes.append([float(x), float(y), float(w), float(h)])
    return img, boxes


def write_detection_cache(
    out_dir: Path,
    counts: dict[str, int],
    size: int,
    classes: Sequence[str] = CHESTXDET10_CLASSES,
    policy: dict | None = None,
    seed: int = 0,
) -> None:
    """A detection augment cache (contract 3) of synthetic images, written with stages.common.cache's
    own writer: ``counts`` images per split, 0-3 boxes each (about 1 in 5 without boxes)."""
    import pandas as pd

    from stages.common import cache
    from stages.common.config import to_dict
    from stages.detector.augment import DetectionPolicy

    rng = np.random.default_rng(seed)
    categories = [{"id": i + 1, "name": c} for i, c in enumerate(classes)]
    for split, n in counts.items():
        images, anns, info = [], [], []
        for i in range(n):
            img, boxes = _synthetic_image(rng, size, int(rng.choice([0, 1, 1, 2, 3])))
            images.append(img)
            name = f"synthetic/{split}/{i:05d}.png"
            info.append({"id": i, "file_name": name, "width": size, "height": size})
            for box in boxes:
                cat = int(rng.integers(1, len(classes) + 1))
                area = box[2] * box[3]
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": i,
                        "category_id": cat,
                        "bbox": box,
                        "area": area,
                        "iscrowd": 0,
                    }
                )
        with_box = {a["image_id"] for a in anns}
        index = pd.DataFrame(
            {
                "path": [d["file_name"] for d in info],
                "label": ["abnormal" if i in with_box else "normal" for i in range(n)],
                "split": split,
                "label_index": [int(i in with_box) for i in range(n)],
            }
        )
        coco = {"images": info, "annotations": anns, "categories": categories}
        cache.write_split(out_dir, split, images, index, size, coco=coco)
    meta = {"task": "detection", "image_size": size, "resize": "pad", "classes": list(classes)}
    cache.write_meta(out_dir, {**meta, "counts": dict(counts)})
    cache.write_policy(out_dir, policy if policy is not None else to_dict(DetectionPolicy()))


def peak_rss_mb() -> dict[str, float]:
    """This process's peak resident set size: getrusage (KiB on Linux) and /proc VmHWM."""
    import resource

    out = {"ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                key = "vmhwm_mb" if line.startswith("VmHWM") else "vmrss_mb"
                out[key] = round(int(line.split()[1]) / 1024, 1)
    return out


__all__ = [
    "CHESTXDET10_CLASSES",
    "KERMANY",
    "KERMANY_TRAIN",
    "SEED002_POLICY",
    "build_kermany_cache",
    "kermany_cache",
    "load1",
    "machine",
    "peak_rss_mb",
    "print_table",
    "save",
    "seed002_policy",
    "stopwatch",
    "write_detection_cache",
]
