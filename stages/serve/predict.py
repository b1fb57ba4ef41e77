"""predict: run the pipeline's models on image files -> one JSON line per image.

Inputs:  image files and/or folders (searched recursively for .png/.jpg/.jpeg/.bmp/.tif/.dcm...;
         a file named explicitly is always tried), ``models/classifier.keras`` (+ sidecar),
         ``models/detector.pt`` and the threshold in ``metrics/classifier.json`` (either model
         may be absent; at least one is needed).
Outputs: JSON lines (stdout or ``--out``, written atomically): {"file", "width", "height",
         "classification": {probabilities, p_positive, threshold, decision, ...},
         "detection": {"boxes": [{label, score, box_xyxy (original pixels)}]}, "timings_ms"};
         a refused file gives {"file", "error", "reason"}. ``--gradcam-dir``: Grad-CAM overlays
         as PNG (path in "gradcam_png"). Exit code 0 when every image was predicted, 1 when
         some were refused, 2 for a usage error (no model, no input).
Run:     python -m stages.predict <files|folders> [--out preds.jsonl] [--gradcam-dir DIR]
         [--classifier PATH] [--detector PATH] [--metrics PATH] [--min-score 0.3] [--threads N]
The preprocessing is the training code (stages.common.imageio + stages.common.cache.resize_gray), shared with
the web page through ``stages.serve.inference.Predictor``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from stages.common.imageio import ImageRejected, is_candidate
from stages.common.utils import StageError, atomic_file, run_cli
from stages.serve.inference import (
    CLASSIFIER_METRICS,
    CLASSIFIER_PATH,
    DETECTOR_PATH,
    MIN_SCORE,
    Predictor,
    rejection_message,
    set_threads,
)
from stages.serve.render import save_png


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders expanded (recursively, sorted) to their image files."""
    out: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and is_candidate(p))
            out.extend(found)
        elif item.exists():
            out.append(item)
        else:
            raise StageError(f"{item}: no such file or folder")
    return out


def _unique_png(folder: Path, stem: str, used: set[str]) -> Path:
    name, n = f"{stem}.gradcam.png", 1
    while name in used:  # same file name in two folders
        n += 1
        name = f"{stem}-{n}.gradcam.png"
    used.add(name)
    return folder / name


def predict_lines(
    predictor: Predictor, files: list[Path], gradcam_dir: Path | None = None
) -> Iterator[dict[str, Any]]:
    """One JSON-ready dict per file, in order; refused files give {"file", "error", "reason"}."""
    used: set[str] = set()
    for path in tqdm(files, desc="predict", unit="image", disable=len(files) < 20):
        try:
            gray = predictor.decode_file(path)
        except ImageRejected as exc:
            yield {"file": str(path), "error": rejection_message(exc), "reason": exc.reason}
            continue
        except OSError as exc:  # unreadable (permissions, a vanished file)
            yield {"file": str(path), "error": f"cannot read: {exc}", "reason": "unreadable"}
            continue
        pred = predictor.predict_gray(gray, str(path), gradcam=gradcam_dir is not None)
        line = pred.to_json()
        if gradcam_dir is not None and pred.gradcam is not None:
            png = _unique_png(gradcam_dir, path.stem, used)
            save_png(predictor.gradcam_overlay(gray, pred), png)
            line["classification"]["gradcam_png"] = str(png)
        yield line


def run(
    predictor: Predictor,
    inputs: Iterable[str | Path],
    out: IO[str],
    gradcam_dir: Path | None = None,
) -> dict[str, int]:
    """Predict every input into ``out`` (JSON lines); returns {"images", "ok", "errors"}."""
    predictor.require_model()
    files = expand_inputs(inputs)
    if not files:
        raise StageError("no image files found in the given inputs")
    ok = errors = 0
    for line in predict_lines(predictor, files, gradcam_dir):
        errors += "error" in line
        ok += "error" not in line
        out.write(json.dumps(line) + "\n")
        out.flush()
    return {"images": len(files), "ok": ok, "errors": errors}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="image files and/or folders")
    parser.add_argument("--out", type=Path, help="JSON lines file (default: stdout)")
    parser.add_argument("--gradcam-dir", type=Path, help="write Grad-CAM overlay PNGs here")
    parser.add_argument("--classifier", type=Path, default=CLASSIFIER_PATH)
    parser.add_argument("--detector", type=Path, default=DETECTOR_PATH)
    parser.add_argument("--metrics", type=Path, default=CLASSIFIER_METRICS, help="threshold")
    parser.add_argument("--min-score", type=float, default=MIN_SCORE, help="boxes shown")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads, 0 = all cores")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    predictor = Predictor(args.classifier, args.detector, args.metrics, args.min_score)
    for note in predictor.notes + list(predictor.missing.values()):
        print(f"note: {note}", file=sys.stderr)
    if args.out is None:
        summary = run(predictor, args.inputs, sys.stdout, args.gradcam_dir)
    else:
        with atomic_file(args.out) as tmp, tmp.open("w") as fh:
            summary = run(predictor, args.inputs, fh, args.gradcam_dir)
    print(
        f"{summary['ok']}/{summary['images']} images predicted, {summary['errors']} refused",
        file=sys.stderr,
    )
    return 0 if summary["errors"] == 0 else 1


def cli() -> None:
    """Console-script entry point (cxr-predict)."""
    codes: list[int] = []
    run_cli(lambda: codes.append(main()))
    raise SystemExit(codes[0] if codes else 0)


if __name__ == "__main__":
    cli()
