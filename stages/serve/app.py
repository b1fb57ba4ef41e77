"""The web page: upload an X-ray, get the class probabilities, the decision at the evaluate
threshold, a Grad-CAM overlay and the detector's boxes (Gradio Blocks, loopback only).

Inputs: the models and metrics ``stages.serve.inference.Predictor`` loads (either may be
absent), test-split examples from ``data/split/classification/test.csv`` and
``data/split/detection/test.json`` when present. Output: an HTTP server (default
127.0.0.1:7860) with the page and one API endpoint ``/predict`` (file -> status text, class
probabilities, Grad-CAM image, boxes image, JSON), used by the tests through gradio_client.
Run: ``python -m stages.serve [--host 127.0.0.1] [--port 7860] [--max-upload-mb 50]``
Gradio never phones home here: analytics off (GRADIO_ANALYTICS_ENABLED=False), no share link,
no server-side rendering, the theme's fonts are served locally.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402

from stages.common import paths
from stages.common.imageio import ImageRejected  # noqa: E402
from stages.common.utils import read_json, run_cli  # noqa: E402
from stages.serve import provenance  # noqa: E402
from stages.serve.inference import (  # noqa: E402
    CLASSIFIER_METRICS,
    CLASSIFIER_PATH,
    DETECTOR_PATH,
    MIN_SCORE,
    Predictor,
    rejection_message,
    set_threads,
)

log = logging.getLogger("stages.serve")
DISCLAIMER = (
    "**Research tool, not a diagnostic device.** The models were trained on public research data "
    "sets; their output must not be used to diagnose or treat anyone."
)
CLASS_SPLIT = paths.CLASSIFICATION.split / "test.csv"
DETECTION_SPLIT = paths.DETECTION.split / "test.json"


def split_examples(per_class: int = 2, n_detection: int = 2) -> list[list[str]]:
    """[[image path, truth text]] from the test splits (files present on disk only)."""
    out: list[list[str]] = []
    if CLASS_SPLIT.is_file():
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


def _status_markdown(pred: Any) -> str:
    parts = []
    c = pred.classification
    if c is not None:
        pos = "+".join(c["positive_class"])
        sign = "≥" if c["positive"] else "<"
        parts.append(
            f"## {c['decision']}\nP({pos}) = **{c['p_positive']:.3f}** {sign} threshold "
            f"{c['threshold']:.3f} ({c['threshold_source']}). Grad-CAM shows "
            f"{c['gradcam_class']}."
        )
    if pred.detection is not None:
        boxes = pred.detection["boxes"]
        found = ", ".join(f"{b['label']} {b['score']:.2f}" for b in boxes) or "none"
        parts.append(f"**Detector** (score ≥ {pred.detection['min_score']}): {found}")
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


def build_app(predictor: Predictor, about: str, examples: list[list[str]]) -> gr.Blocks:
    """The page; ``about`` = provenance markdown shown under the title."""
    with gr.Blocks(title="Chest X-ray models", analytics_enabled=False) as demo:
        gr.Markdown("# Chest X-ray: pneumonia classifier and findings detector")
        gr.Markdown(DISCLAIMER, elem_id="disclaimer")
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


def create(
    classifier: Path = CLASSIFIER_PATH,
    detector: Path = DETECTOR_PATH,
    metrics: Path = CLASSIFIER_METRICS,
    min_score: float = MIN_SCORE,
) -> tuple[gr.Blocks, Predictor]:
    """Load the models and build the page (what ``main`` and the tests start)."""
    predictor = Predictor(classifier, detector, metrics, min_score)
    about = provenance.collect([Path(classifier), Path(detector)]).markdown()
    return build_app(predictor, about, split_examples()), predictor


def launch(demo: gr.Blocks, host: str, port: int, max_upload_mb: float, block: bool = True):
    """Serve ``demo``; ``block=False`` returns at once (tests), ``demo.close()`` stops it."""
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
        allowed_paths=[str(paths.RAW)],  # the test-split example images
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="bind address (loopback default)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-upload-mb", type=float, default=50.0, help="larger refused")
    parser.add_argument("--classifier", type=Path, default=CLASSIFIER_PATH)
    parser.add_argument("--detector", type=Path, default=DETECTOR_PATH)
    parser.add_argument("--metrics", type=Path, default=CLASSIFIER_METRICS)
    parser.add_argument("--min-score", type=float, default=MIN_SCORE, help="boxes shown")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads, 0 = all cores")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    demo, predictor = create(args.classifier, args.detector, args.metrics, args.min_score)
    for text in predictor.missing.values():
        log.warning("%s", text)
    launch(demo, args.host, args.port, args.max_upload_mb)


def cli() -> None:
    """Console-script entry point (cxr-serve)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
