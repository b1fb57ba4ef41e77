"""Serving latency: p50/p95 per image of prediction and of Grad-CAM, one image at a time, CPU.

Input:  real Kermany JPEGs (``../shared/data/kermany224/train``, 224x224; synthetic images if the
        folder is absent) and the default TO-BE classifier at 150 px: ``--classifier PATH`` if
        given (its sidecar must say 150 px), else the real builder's untrained TO-BE network
        (``stages.classifier.models.build_model``, sigmoid head; latency does not depend on the
        weights), saved with its sidecar in a temp dir. ``--detector models/detector.pt`` adds the
        detector's latency (informational, no target).
Measures, through ``stages.serve.inference.Predictor`` (the page's and the predict command's code):
        predict = decode the file + resize (training preprocessing) + model + probabilities and
        decision; gradcam = Grad-CAM of the decided class mapped back to the image size.
        Targets: predict p50 <= 20 ms, Grad-CAM p50 <= 100 ms.
Output: a table with measured vs target; JSON with ``--out``.
Run:    .venv/bin/python bench/serve_latency.py [--repeats 200] [--threads N] [--out r.json]
        [--detector models/detector.pt] [--classifier models/classifier.keras] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import KERMANY_TRAIN, load1, machine, print_table, save
from PIL import Image

from stages.classifier.config import TrainClassifierConfig
from stages.classifier.models import build_model
from stages.classifier.predict import ClassifierInfo, load_info, save_info
from stages.common.config import parse
from stages.serve.inference import Predictor, set_threads

SIZE = 150
TARGETS_MS = {"predict": 20.0, "gradcam": 100.0}


def default_classifier(folder: Path) -> Path:
    """The real TO-BE builder at 150 px (untrained), saved with its sidecar like the stage does."""
    cfg = parse(TrainClassifierConfig, {"arch": "to_be"}, "bench")
    model = build_model(cfg, SIZE)
    path = folder / "classifier.keras"
    model.save(path)
    info = ClassifierInfo(("NORMAL", "PNEUMONIA"), {}, "sigmoid", 1, "binary", SIZE, "to_be")
    save_info(path, info)
    return path


def images(folder: Path, n: int) -> list[Path]:
    """n real Kermany files (both classes), or synthetic 224 px JPEGs when the folder is absent."""
    found = sorted(KERMANY_TRAIN.glob("NORMAL/*.jpeg"))[: n // 2]
    found += sorted(KERMANY_TRAIN.glob("PNEUMONIA/*.jpeg"))[: n - len(found)]
    if found:
        return found
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        path = folder / f"synthetic{i}.jpeg"
        Image.fromarray(rng.integers(0, 255, (224, 224), dtype=np.uint8)).save(path)
        out.append(path)
    return out


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95))}


def measure(predictor: Predictor, files: list[Path], repeats: int, warmup: int) -> dict:
    """Per image: wall time of predict_file without Grad-CAM, and the Grad-CAM step alone."""
    for path in files[:warmup]:
        predictor.predict_file(path, gradcam=True)
    predict_ms, gradcam_ms = [], []
    for i in range(repeats):
        path = files[i % len(files)]
        t0 = time.perf_counter()
        predictor.predict_file(path, gradcam=False)
        predict_ms.append((time.perf_counter() - t0) * 1000)
        gradcam_ms.append(predictor.predict_file(path, gradcam=True).timings_ms["gradcam"])
    return {"predict": percentiles(predict_ms), "gradcam": percentiles(gradcam_ms)}


def measure_detector(path: Path, files: list[Path], repeats: int) -> dict:
    """Wall time of predict_file with the detector alone (decode + resize + RetinaNet)."""
    predictor = Predictor(None, path)
    predictor.predict_file(files[0])
    ms = []
    for i in range(repeats):
        t0 = time.perf_counter()
        predictor.predict_file(files[i % len(files)])
        ms.append((time.perf_counter() - t0) * 1000)
    return percentiles(ms)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", type=Path, help="a trained 150 px model (default: build)")
    parser.add_argument("--detector", type=Path, help="also time this detector (no target)")
    parser.add_argument("--detector-repeats", type=int, default=20)
    parser.add_argument("--images", type=int, default=40, help="distinct files cycled through")
    parser.add_argument("--repeats", type=int, default=200, help="timed images")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads, 0 = all cores")
    parser.add_argument("--out", type=Path, help="JSON results file")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 images, 3 warm-up")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.images, args.detector_repeats = 20, 3, 10, 3
    set_threads(args.threads)
    results: dict[str, Any] = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        classifier = args.classifier or default_classifier(Path(tmp))
        info = load_info(classifier)
        if info.image_size != SIZE:
            print(f"note: {classifier} is {info.image_size} px, the target is stated for {SIZE}")
        predictor = Predictor(classifier, None, Path(tmp) / "no-metrics.json")
        files = images(Path(tmp), args.images)
        results["setup"] = {
            "classifier": str(args.classifier or f"untrained to_be {SIZE} px (real builder)"),
            "arch": info.arch,
            "image_size": info.image_size,
            "images": f"{len(files)} files of {files[0].parent.parent}, cycled",
            "repeats": args.repeats,
            "threads": args.threads,
            "load1_before": load1(),
        }
        results["latency"] = measure(predictor, files, args.repeats, args.warmup)
        if args.detector is not None:
            lat = measure_detector(args.detector, files, args.detector_repeats)
            results["latency"]["detect"] = lat
            results["setup"]["detector"] = str(args.detector)
    results["setup"]["load1_after"] = load1()
    rows = []
    for name, lat in results["latency"].items():
        target = TARGETS_MS.get(name)
        verdict = "-" if target is None else ("met" if lat["p50_ms"] <= target else "MISSED")
        rows.append({"measure": name, **lat, "target_p50_ms": target, "verdict": verdict})
    print_table(
        rows,
        ["measure", "p50_ms", "p95_ms", "target_p50_ms", "verdict"],
        f"per-image latency, {results['setup']['classifier']}, {results['setup']['images']}, "
        f"threads {args.threads or 'all'}",
    )
    print(f"load average before/after: {results['setup']['load1_before']} / {load1()}")
    results["rows"] = rows
    save(args.out, results)
    return results


if __name__ == "__main__":
    main()
