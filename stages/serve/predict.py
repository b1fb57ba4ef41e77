"""predict: run the pipeline's models on image files -> one JSON line per input.

Inputs:  image files and/or folders (searched recursively, symbolic links to folders followed
         once, for .png/.jpg/.jpeg/.bmp/.tif/.dcm...; a file named explicitly is always tried;
         the decoder is chosen from the file's bytes, never its name), one or more classifiers
         (``--classifier`` repeated = an ensemble, averaged as evaluate does; default: the
         models of the decision block of ``reports/classifier/evaluation.json`` when they all
         exist, else ``models/classifier.keras``), ``models/detector.pt`` and that decision
         (threshold, temperature, TTA). Either model may be absent; at least one is needed.
Outputs: JSON lines (stdout or ``--out``, written atomically): {"file", "width", "height",
         "classification": {probabilities, p_positive, threshold, temperature, tta, decision,
         models: [{model_file, experiment, commit, trained_on, tested_on, synthetic_data, ...}]},
         "detection": {"boxes": [{label, score, box_xyxy (original pixels)}], models}, "timings_ms"}.
         Every input gets a line: a refused image, an unreadable file or folder, a broken or
         looping symbolic link gives {"file", "error", "reason"}. ``--gradcam-dir``: Grad-CAM
         overlays as PNG (path in "gradcam_png"). Exit code 0 when every input was predicted,
         1 when some were refused, 2 for a usage or configuration error (one ``error:`` line:
         no model, no input, a model file that is not a valid model, ``--out`` a folder, an
         input or inside an input folder,
         ``--gradcam-dir`` a file, a broken evaluation file).
Run:     python -m stages.predict <files|folders> [--out preds.jsonl] [--gradcam-dir DIR]
         [--classifier PATH [--classifier PATH ...]] [--detector PATH] [--evaluation PATH]
         [--min-score 0.3] [--threads N]
The preprocessing is the training code (stages.common.imageio + stages.common.cache.prepare_gray),
shared with the web page through ``stages.serve.inference.Predictor``. TensorFlow and torch are
imported only after the arguments are parsed (``--help`` stays fast).
``--model classifier@prod`` (or ``@v1.2.0``, ``detector@...``, or a model file; repeatable)
serves exactly the models named, from the model registry (``stages.serve.registry``: the
version's files and decision rule, fetched into a cache); each JSON line names their name,
version, stage and commit ("models"[i]["registry"]). ``--registry URL`` reads another
repository's tags.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from stages.common.imageio import ImageRejected, is_candidate
from stages.common.utils import THREADS, ArgumentParser, StageError, atomic_file, run_cli
from stages.common.walk import FolderWalk, Skipped
from stages.serve import registry
from stages.serve.inference import (
    DEFAULT,
    DETECTOR_PATH,
    EVALUATION_PATH,
    MIN_SCORE,
    SCORE,
    Predictor,
    rejection_message,
    set_threads,
)


def expand_inputs(inputs: Iterable[str | Path | Skipped]) -> list[Path | Skipped]:
    """Files as given, folders expanded (recursively, sorted) to their image files.

    Nothing is dropped silently: an entry that cannot be examined (an unreadable sub-folder, a
    broken or self-referencing symbolic link) comes back as a ``Skipped``. An input that does
    not exist at all is a usage error (``StageError``).
    """
    out: list[Path | Skipped] = []
    for item in inputs:
        if isinstance(item, Skipped):
            out.append(item)
            continue
        item = Path(item)
        try:
            st = item.stat()
        except OSError as exc:
            if not item.is_symlink() and exc.errno == errno.ENOENT:
                raise StageError(f"{item}: no such file or folder") from None
            out.append(Skipped.from_stat_error(item, exc))
            continue
        if stat.S_ISDIR(st.st_mode):
            out.extend(FolderWalk().walk(item, keep=is_candidate))
        else:
            out.append(item if stat.S_ISREG(st.st_mode) else Skipped.not_regular(item))
    return out


def _unique_png(folder: Path, stem: str, used: set[str]) -> Path:
    name, n = f"{stem}.gradcam.png", 1
    while name in used:  # same file name in two folders
        n += 1
        name = f"{stem}-{n}.gradcam.png"
    used.add(name)
    return folder / name


def predict_lines(
    predictor: Predictor, files: list[Path | Skipped], gradcam_dir: Path | None = None
) -> Iterator[dict[str, Any]]:
    """One JSON-ready dict per input, in order; refused ones give {"file", "error", "reason"}."""
    from tqdm import tqdm

    from stages.serve.render import save_png

    used: set[str] = set()
    for path in tqdm(files, desc="predict", unit="image", disable=len(files) < 20):
        if isinstance(path, Skipped):
            yield path.line()
            continue
        try:
            gray = predictor.decode_file(path)
        except ImageRejected as exc:
            yield {"file": str(path), "error": rejection_message(exc), "reason": exc.reason}
            continue
        except OSError as exc:  # unreadable (permissions, a vanished file, a folder)
            error = f"{path}: cannot read ({exc.strerror or exc})"
            yield {"file": str(path), "error": error, "reason": "unreadable"}
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
    inputs: Iterable[str | Path | Skipped],
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


def check_outputs(
    out: Path | None, gradcam_dir: Path | None, inputs: Iterable[str | Path] = ()
) -> None:
    """Usage errors of ``--out`` / ``--gradcam-dir``, found before any model is loaded.

    ``--out`` may not be an input (it would be replaced by the JSON) nor lie inside an input
    folder (it would overwrite an image there, or be read as one by the next run)."""
    if out is not None:
        if out.is_dir():
            raise StageError(f"--out {out} is a folder; give a file name to write")
        _check_not_an_input(out, inputs)
        parent = out.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise StageError(f"--out {out}: {parent} is not a folder")
    if gradcam_dir is not None:
        if gradcam_dir.exists() and not gradcam_dir.is_dir():
            raise StageError(f"--gradcam-dir {gradcam_dir} is a file; give a folder")
        try:
            gradcam_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StageError(f"--gradcam-dir {gradcam_dir}: cannot create it ({exc})") from None
        if not os.access(gradcam_dir, os.W_OK | os.X_OK):
            raise StageError(f"--gradcam-dir {gradcam_dir}: not writable")


def _check_not_an_input(out: Path, inputs: Iterable[str | Path]) -> None:
    target = out.resolve()  # through symbolic links: a link to an input is that input
    for item in inputs:
        given = Path(item)
        try:
            real = given.resolve()
            same = target == real or (out.exists() and os.path.samefile(out, given))
        except (OSError, RuntimeError):  # a missing input or a link loop: expand_inputs says so
            continue
        if same:
            raise StageError(
                f"--out {out} is the input {item}: it would be overwritten; write the "
                "predictions to another file"
            )
        if real.is_dir() and target.is_relative_to(real):
            raise StageError(
                f"--out {out} is inside the input folder {item}: write the predictions "
                "outside it (it could overwrite an input, or be read as one next time)"
            )


def build_parser() -> argparse.ArgumentParser:
    # under python -m, argv[0] is the file: name the command a user types instead
    prog = "python -m stages.predict" if sys.argv[0].endswith(".py") else None
    parser = ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="image files and/or folders")
    parser.add_argument("--out", type=Path, help="JSON lines file (default: stdout)")
    parser.add_argument("--gradcam-dir", type=Path, help="write Grad-CAM overlay PNGs here")
    parser.add_argument(
        "--classifier",
        type=Path,
        action="append",
        help="a .keras classifier; repeat for an ensemble (mean probability, as evaluate). "
        f"Default: the decision's models in {EVALUATION_PATH} when they all exist, else "
        "the pipeline's model",
    )
    parser.add_argument("--detector", type=Path, help=f"default: {DETECTOR_PATH}")
    registry.add_model_arguments(parser)
    parser.add_argument(
        "--evaluation",
        "--metrics",
        dest="evaluation",
        type=Path,
        default=EVALUATION_PATH,
        help="evaluation.json whose decision block (threshold, temperature, TTA) is applied",
    )
    parser.add_argument("--min-score", type=SCORE, default=MIN_SCORE, help="boxes shown, 0-1")
    parser.add_argument(
        "--threads", type=THREADS, default=0, help="CPU threads, 0 = all usable cores"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_outputs(args.out, args.gradcam_dir, args.inputs)
    items = expand_inputs(args.inputs)  # a missing input fails before the models load
    if not items:
        raise StageError("no image files found in the given inputs")
    set_threads(args.threads)
    chosen = registry.select_models(args, DEFAULT, DETECTOR_PATH)
    predictor = Predictor(
        chosen.classifier,
        chosen.detector,
        chosen.evaluation,
        args.min_score,
        registry=chosen.registry,
        segmenter_path=chosen.segmenter,
    )
    for note in predictor.notes + list(predictor.missing.values()):
        print(f"note: {note}", file=sys.stderr)
    if predictor.provenance is not None and predictor.provenance.synthetic_sentence():
        print(f"note: {predictor.provenance.synthetic_sentence()}", file=sys.stderr)
    if args.out is None:
        summary = run(predictor, items, sys.stdout, args.gradcam_dir)
    else:
        with atomic_file(args.out) as tmp, tmp.open("w") as fh:
            summary = run(predictor, items, fh, args.gradcam_dir)
    print(
        f"{summary['ok']}/{summary['images']} inputs predicted, {summary['errors']} refused",
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
