"""The web page: upload an X-ray, get the class probabilities, the decision of the evaluation
(threshold, temperature, TTA, ensemble), a Grad-CAM overlay and the detector's boxes (Gradio
Blocks, loopback only).

Inputs: the models and the evaluation ``stages.serve.inference.Predictor`` loads (either model
may be absent; ``--classifier`` repeated = an ensemble), test-split examples from
``data/split/classification/test.csv`` and ``data/split/detection/test.json`` when present: those
few images are copied into the server's temp folder and served from there, the only files of
the machine the page serves (never ``data/raw/``: its manifest names patients).
Output: an HTTP server (default 127.0.0.1:7860) with the page and one API endpoint ``/predict``
(file -> status text, class probabilities, Grad-CAM image, boxes image, JSON), used by the tests
through gradio_client. The page names each model's DVC experiment (or git commit) and the data
it was trained and tested on; models trained on synthetic phantoms get a prominent warning.
Run: ``python -m stages.serve [--host 127.0.0.1] [--port 7860] [--max-upload-mb 50]
[--classifier PATH ...] [--detector PATH] [--evaluation PATH] [--min-score 0.3] [--threads N]``

Temporary files: the server gets its own temp folder (``cxr-serve-*`` under the system temp
dir, set as ``GRADIO_TEMP_DIR`` before Gradio is imported): every upload and every picture the
page serves lives there, and the folder is removed when the server stops - normal exit, Ctrl-C
(SIGINT) or SIGTERM. Nothing of a user's X-rays stays behind in Gradio's shared default folder.
Gradio never phones home here: analytics off (GRADIO_ANALYTICS_ENABLED=False), no share link,
no server-side rendering, the theme's fonts are served locally. Gradio, TensorFlow and torch
are imported only after the arguments are parsed (``--help`` stays fast).
``--model classifier@prod`` (``@v1.2.0``, ``detector@...``, a file; repeatable) and
``--registry`` as in ``python -m stages.predict``: the page then names each registry model's
name, version, stage and commit above the provenance.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

from stages.common import paths  # noqa: E402
from stages.common.imageio import ImageRejected  # noqa: E402
from stages.common.utils import (  # noqa: E402
    THREADS,
    ArgumentParser,
    float_in,
    int_in,
    read_json,
    run_cli,
)
from stages.serve import registry  # noqa: E402
from stages.serve.inference import (  # noqa: E402
    DEFAULT,
    DETECTOR_PATH,
    EVALUATION_PATH,
    MIN_SCORE,
    SCORE,
    Predictor,
    rejection_message,
    set_threads,
)

if TYPE_CHECKING:
    import gradio as gr

log = logging.getLogger("stages.serve")
DISCLAIMER = (
    "**Research tool, not a diagnostic device.** The models were trained on public research data "
    "sets; their output must not be used to diagnose or treat anyone."
)
CLASS_SPLIT = paths.CLASSIFICATION.split / "test.csv"
DETECTION_SPLIT = paths.DETECTION.split / "test.json"
TEMP_PREFIX = "cxr-serve-"


def split_examples(per_class: int = 2, n_detection: int = 2) -> list[list[str]]:
    """[[image path, truth text]] from the test splits (files present on disk only)."""
    out: list[list[str]] = []
    if CLASS_SPLIT.is_file():
        import pandas as pd

        df = pd.read_csv(CLASS_SPLIT, dtype=str, keep_default_na=False)
        df = df[[Path(p).is_file() for p in df["path"]]]
        for label, rows in df.groupby("label", sort=True):
            for _, row in rows.head(per_class).iterrows():
                sub = f" ({row['subtype']})" if row.get("subtype") else ""
                out.append([row["path"], f"classification test split: {label}{sub}"])
    if DETECTION_SPLIT.is_file():
        coco = read_json(DETECTION_SPLIT)
        names = {c["id"]: c["name"] for c in coco["categories"]}
        found: dict[int, list[str]] = {}
        for ann in coco["annotations"]:
            found.setdefault(ann["image_id"], []).append(names[ann["category_id"]])
        shown = [
            im for im in coco["images"] if im["id"] in found and Path(im["file_name"]).is_file()
        ]
        for im in shown[:n_detection]:
            out.append([im["file_name"], "detection test split: " + ", ".join(found[im["id"]])])
    return out


def copy_examples(examples: list[list[str]], folder: Path) -> list[list[str]]:
    """The example rows, each image copied into ``folder`` (the server's own temp folder): the
    page serves these copies, so nothing else of the data folders needs to be reachable."""
    if not examples:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (path, truth) in enumerate(examples):
        copy = folder / f"{i:02d}-{Path(path).name}"  # two splits may hold the same file name
        shutil.copyfile(path, copy)
        out.append([str(copy), truth])
    return out


def _synthetic(block: dict[str, Any]) -> bool:
    return any(m.get("synthetic_data") for m in block.get("models") or [])


def _status_markdown(pred: Any) -> str:
    parts = []
    c = pred.classification
    if c is not None:
        pos = "+".join(c["positive_class"])
        sign = "≥" if c["positive"] else "<"
        extra = []
        if c.get("temperature", 1.0) != 1.0:
            extra.append(f"temperature {c['temperature']:.3f}")
        if c.get("tta", "none") != "none":
            extra.append(f"TTA {c['tta']}")
        if c.get("n_models", 1) > 1:
            extra.append(f"mean of {c['n_models']} models")
        how = f" [{', '.join(extra)}]" if extra else ""
        parts.append(
            f"## {c['decision']}\nP({pos}) = **{c['p_positive']:.3f}** {sign} threshold "
            f"{c['threshold']:.3f} ({c['threshold_source']}){how}. Grad-CAM shows "
            f"{c['gradcam_class']}."
        )
        if _synthetic(c):
            parts.append("⚠️ **The classifier was trained on synthetic phantoms, not X-rays.**")
    if pred.detection is not None:
        boxes = pred.detection["boxes"]
        found = ", ".join(f"{b['label']} {b['score']:.2f}" for b in boxes) or "none"
        parts.append(f"**Detector** (score ≥ {pred.detection['min_score']}): {found}")
        if _synthetic(pred.detection):
            parts.append(
                "⚠️ **The detector was trained on synthetic phantoms, not X-rays: its boxes on a "
                "real image mean nothing.**"
            )
    parts += [f"*Note: {n}*" for n in pred.notes]
    return "\n\n".join(parts)


def make_handler(predictor: Predictor):
    """The upload callback: (file path) -> (status, probabilities, Grad-CAM, boxes, JSON)."""

    def analyse(path: str | None) -> tuple[Any, ...]:
        if not path:
            return "Upload a PNG, JPEG or DICOM chest X-ray.", None, None, None, None
        if not predictor.ready:
            return "**No model:** " + "; ".join(predictor.missing.values()), None, None, None, None
        try:
            gray = predictor.decode_file(path)
            pred = predictor.predict_gray(gray, Path(path).name, gradcam=True)
        except ImageRejected as exc:
            return f"**Refused:** {rejection_message(exc)}", None, None, None, None
        except (OSError, ValueError, RuntimeError, MemoryError) as exc:  # never a stack trace
            log.exception("prediction failed for %s", path)
            msg = f"**Could not process this file:** {type(exc).__name__}: {exc}"
            return msg, None, None, None, None
        probs = pred.classification["probabilities"] if pred.classification else None
        return (
            _status_markdown(pred),
            probs,
            predictor.gradcam_overlay(gray, pred),
            predictor.boxes_image(gray, pred),
            pred.to_json(),
        )

    return analyse


def build_app(
    predictor: Predictor, about: str, examples: list[list[str]], warning: str = ""
) -> gr.Blocks:
    """The page; ``about`` = provenance markdown shown under the title, ``warning`` = the
    synthetic-data warning shown above everything else (empty: none)."""
    import gradio as gr

    with gr.Blocks(title="Chest X-ray models", analytics_enabled=False) as demo:
        gr.Markdown("# Chest X-ray: pneumonia classifier and findings detector")
        if warning:
            gr.Markdown(f"## {warning}", elem_id="synthetic-warning")
        gr.Markdown(DISCLAIMER, elem_id="disclaimer")
        if predictor.served:
            gr.Markdown(registry.registry_markdown(predictor.served), elem_id="registry")
        gr.Markdown(about, elem_id="provenance")
        for text in predictor.missing.values():
            gr.Markdown(f"*Model missing:* {text}")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="X-ray (PNG, JPEG or DICOM)", type="filepath")
                truth = gr.Textbox(label="Truth (test-split examples only)", interactive=False)
                if examples:
                    gr.Examples(examples, inputs=[upload, truth], label="Test-split examples")
            with gr.Column(scale=2):
                status = gr.Markdown("Upload a PNG, JPEG or DICOM chest X-ray.", elem_id="status")
                probs = gr.Label(label="Class probabilities", elem_id="probs")
                with gr.Row():
                    cam = gr.Image(label="Grad-CAM", format="png", elem_id="gradcam")
                    boxes = gr.Image(label="Detector boxes", format="png", elem_id="boxes")
                raw = gr.JSON(label="JSON (as python -m stages.predict writes it)")
        upload.change(
            make_handler(predictor),
            inputs=[upload],
            outputs=[status, probs, cam, boxes, raw],
            api_name="predict",
        )
    return demo


def page_texts(predictor: Predictor) -> tuple[str, str]:
    """(provenance markdown, synthetic-data warning) of the predictor's models."""
    prov = predictor.provenance
    if prov is None:
        return "", ""
    return prov.markdown(warning=False), prov.synthetic_warning()


def create(
    classifiers: str | Path | Sequence[Path] | None = DEFAULT,
    detector: Path | None = DETECTOR_PATH,
    metrics: Path = EVALUATION_PATH,
    min_score: float = MIN_SCORE,
    example_dir: Path | None = None,
    registry: dict[str, Any] | None = None,
    segmenter: Path | None = None,
) -> tuple[gr.Blocks, Predictor]:
    """Load the models and build the page (what ``main`` and the tests start). The test-split
    examples are copied into ``example_dir`` and shown from there (None: no examples);
    ``registry``: {role: ServedModel} of the models fetched from the model registry."""
    predictor = Predictor(
        classifiers, detector, metrics, min_score, registry=registry, segmenter_path=segmenter
    )
    about, warning = page_texts(predictor)
    examples = copy_examples(split_examples(), example_dir) if example_dir is not None else []
    return build_app(predictor, about, examples, warning), predictor


def launch(
    demo: gr.Blocks,
    host: str,
    port: int,
    max_upload_mb: float,
    block: bool = True,
    files: Sequence[Path] = (),
):
    """Serve ``demo``; ``block=False`` returns at once (tests), ``demo.close()`` stops it.
    ``files``: the only files of the machine served besides the uploads (the examples'
    copies, see ``copy_examples``)."""
    return demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        max_file_size=int(max_upload_mb * 1024 * 1024),  # Gradio's "MB" is MiB
        prevent_thread_lock=not block,
        ssr_mode=False,  # no Node server
        mcp_server=False,
        pwa=False,
        show_error=False,
        quiet=not block,
        allowed_paths=[str(Path(f).resolve()) for f in files],
    )


@contextlib.contextmanager
def server_temp_dir() -> Iterator[Path]:
    """A private ``GRADIO_TEMP_DIR`` (uploads, served pictures), removed when the block ends.

    Gradio reads the variable when it is imported (and when a page is built), so enter this
    before the first ``import gradio``; a warning says so when Gradio was imported already.
    """
    if "gradio" in sys.modules:
        log.warning("gradio was imported before its temp folder was set: uploads may land in it")
    folder = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if previous is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous


STOP_GRACE_S = 20.0  # a graceful stop longer than this is cut short (see stop_watchdog)


def stop_watchdog(temp: Path, grace_s: float = STOP_GRACE_S) -> threading.Timer:
    """Started when a stop signal arrives: if the graceful stop (Gradio closing its server,
    which waits for open client connections) is still running after ``grace_s``, remove the
    temp folder of uploads and exit with status 0. Seen once in a full test run under load:
    Ctrl-C left the server waiting for over 60 s."""

    def force() -> None:
        log.warning("server still stopping after %.0f s: removing %s and exiting", grace_s, temp)
        shutil.rmtree(temp, ignore_errors=True)
        logging.shutdown()
        os._exit(0)

    timer = threading.Timer(grace_s, force)
    timer.daemon = True
    timer.start()
    return timer


class StopSignal:
    """The SIGINT/SIGTERM handler: KeyboardInterrupt (Gradio's wait loop stops the server,
    cleanup runs), with ``stop_watchdog`` armed on the first signal and disarmed by ``cancel``
    once the stop has finished (a process that goes on after ``main`` is not cut short)."""

    def __init__(self, temp: Path) -> None:
        self.temp = temp
        self.timer: threading.Timer | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        if self.timer is None:
            self.timer = stop_watchdog(self.temp)
        raise KeyboardInterrupt(f"signal {signum}")

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()


def build_parser() -> argparse.ArgumentParser:
    # under python -m, argv[0] is the file: name the command a user types instead
    prog = "python -m stages.serve" if sys.argv[0].endswith(".py") else None
    parser = ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="bind address (loopback default)")
    parser.add_argument("--port", type=int_in(1, 65535), default=7860)
    parser.add_argument(
        "--max-upload-mb", type=float_in(0, 4096, lo_open=True), default=50.0, help="larger refused"
    )
    parser.add_argument(
        "--classifier",
        type=Path,
        action="append",
        help="a .keras classifier; repeat for an ensemble. Default: the decision's models in "
        f"{EVALUATION_PATH} when they all exist, else the pipeline's model",
    )
    parser.add_argument("--detector", type=Path, help=f"default: {DETECTOR_PATH}")
    registry.add_model_arguments(parser)
    parser.add_argument(
        "--evaluation", "--metrics", dest="evaluation", type=Path, default=EVALUATION_PATH
    )
    parser.add_argument("--min-score", type=SCORE, default=MIN_SCORE, help="boxes shown, 0-1")
    parser.add_argument(
        "--threads", type=THREADS, default=0, help="CPU threads, 0 = all usable cores"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    stop: StopSignal | None = None
    try:
        with server_temp_dir() as temp:
            stop = StopSignal(temp)
            for sig in previous:
                signal.signal(sig, stop)
            log.info("uploads and pictures kept in %s (removed when the server stops)", temp)
            set_threads(args.threads)
            chosen = registry.select_models(args, DEFAULT, DETECTOR_PATH)
            examples = temp / "examples"
            demo, predictor = create(
                chosen.classifier,
                chosen.detector,
                chosen.evaluation,
                args.min_score,
                examples,
                registry=chosen.registry,
                segmenter=chosen.segmenter,
            )
            for text in predictor.missing.values():
                log.warning("%s", text)
            shown = sorted(examples.iterdir()) if examples.is_dir() else []
            launch(demo, args.host, args.port, args.max_upload_mb, files=shown)
            demo.close()
    except KeyboardInterrupt:
        log.info("interrupted: server stopped, temp folder removed")
    finally:
        if stop is not None:
            stop.cancel()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cli() -> None:
    """Console-script entry point (cxr-serve)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
