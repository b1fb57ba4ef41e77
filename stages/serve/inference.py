"""One ``Predictor`` for the page, the predict command and the bench: file -> probabilities,
decision, Grad-CAM, boxes.

Inputs: ``models/classifier.keras`` (+ ``.meta.json`` sidecar), ``models/detector.pt`` and the
threshold evaluate chose (``metrics/classifier.json`` keys ``threshold``, ``positive_class``);
either model may be absent. Images: any file ``stages.common.imageio`` decodes (PNG, JPEG, DICOM...).
Output: ``Prediction`` objects (``to_json()`` = one JSON line of ``python -m stages.predict``).

Preprocessing is the training code itself: ``stages.common.imageio`` decodes to uint8 grey and
``stages.common.cache.resize_gray`` brings the image to the model size with the same resize mode the
augment stage used for the cache (stored in the sidecar / checkpoint). Boxes and heatmaps are
mapped back to ORIGINAL image pixels. No run command (see ``stages.serve.predict``, ``stages.serve``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stages.classifier.gradcam import GradCam, overlay
from stages.classifier.predict import load_classifier, load_info, predict_proba, set_tf_threads
from stages.common import paths
from stages.common.cache import Affine, resize_gray
from stages.common.imageio import MAX_PIXELS, ImageRejected, decode_gray_bytes, load_gray
from stages.common.utils import StageError, read_json
from stages.detector.model import detector_from_checkpoint, predict, read_checkpoint
from stages.serve.render import boxes_to_original, cam_to_original, draw_boxes

CLASSIFIER_PATH = paths.CLASSIFIER_MODEL
DETECTOR_PATH = paths.DETECTOR_MODEL
CLASSIFIER_METRICS = paths.CLASSIFICATION.evaluation  # the decision rule evaluate chose
DETECTION_CACHE_META = paths.DETECTION.augment / "meta.json"
MIN_SCORE = 0.3  # boxes shown: evaluate.detection.score_thresh's default (its report boxes)
# What to tell a user for each imageio rejection reason.
REASON_TEXT = {
    "empty_file": "the file is empty (0 bytes)",
    "not_an_image": "not a PNG, JPEG or DICOM image",
    "corrupt": "the image file is corrupt and cannot be decoded",
    "truncated": "the image file is truncated (incomplete download or copy?)",
    "too_large": "the image is too large (over {mp} megapixels): refused as a possible "
    "decompression bomb",
    "no_pixel_data": "the DICOM file has no pixel data (a report or structured document?)",
    "unsupported": "this image encoding is not supported here",
}


def set_threads(n: int) -> None:
    """CPU threads of torch and TensorFlow (0 = all cores). Call before the first model runs.

    On a shared machine 1 thread can be far faster: with another CPU-bound job on 2 cores the
    detector took 2.9 s per image with 2 torch threads and 0.1 s with 1 (bench/README.md).
    """
    from stages.common.utils import set_torch_threads

    set_torch_threads(n)
    set_tf_threads(n)


def rejection_message(exc: ImageRejected, max_pixels: int = MAX_PIXELS) -> str:
    """One plain sentence for a refused file (its technical detail in brackets)."""
    text = REASON_TEXT.get(exc.reason, exc.reason).format(mp=max_pixels // 1_000_000)
    return f"{Path(exc.name).name}: {text}" + (f" [{exc.detail}]" if exc.detail else "")


@dataclass(frozen=True)
class DecisionRule:
    """Positive classes vs the rest on their summed probability, as the evaluate stage scores."""

    positives: tuple[str, ...]
    threshold: float
    source: str  # where the threshold came from, shown to the user
    note: str = ""  # non-empty when a fallback was used


def decision_rule(classes: tuple[str, ...], metrics_path: Path) -> DecisionRule:
    """The evaluate stage's threshold when its metrics fit these classes, else 0.5 with a note."""
    if len(classes) == 2:
        default: tuple[str, ...] = (classes[1],)
    else:
        default = tuple(c for c in classes if c != "NORMAL") or classes[1:]
    why = f"{metrics_path} not found"
    if metrics_path.is_file():
        doc = read_json(metrics_path).get("decision", {})
        positives = doc.get("positive_class", default)
        positives = (positives,) if isinstance(positives, str) else tuple(positives)
        if "threshold" not in doc:
            why = f"{metrics_path} has no threshold"
        elif list(doc.get("classes", classes)) != list(classes):
            why = f"{metrics_path} is for classes {doc.get('classes')}, the model has {classes}"
        elif not positives or not set(positives) < set(classes):
            why = f"{metrics_path} positive_class {list(positives)} does not fit {classes}"
        else:
            method = doc.get("threshold_method", "?")
            return DecisionRule(positives, float(doc["threshold"]), f"{metrics_path} ({method})")
    note = f"no evaluate threshold ({why}): using 0.5; run `dvc repro evaluate@classification`"
    return DecisionRule(default, 0.5, "default 0.5", note)


@dataclass
class Prediction:
    """Everything known about one image; ``gradcam`` / ``overlays`` stay out of the JSON."""

    file: str
    width: int
    height: int
    classification: dict[str, Any] | None = None
    detection: dict[str, Any] | None = None
    gradcam: np.ndarray | None = None  # float32 (H, W) in [0, 1]
    timings_ms: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file, "width": self.width, "height": self.height}
        if self.classification is not None:
            out["classification"] = self.classification
        if self.detection is not None:
            out["detection"] = self.detection
        if self.notes:
            out["notes"] = self.notes
        out["timings_ms"] = {k: round(v, 2) for k, v in self.timings_ms.items()}
        return out


class Predictor:
    """Loads whichever models exist; ``predict_file`` / ``predict_bytes`` run them on one image.

    Thread-safe (one lock around the models): the page may call it from several workers.
    """

    def __init__(
        self,
        classifier_path: Path | None = CLASSIFIER_PATH,
        detector_path: Path | None = DETECTOR_PATH,
        metrics_path: Path = CLASSIFIER_METRICS,
        min_score: float = MIN_SCORE,
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        self.max_pixels, self.min_score = max_pixels, min_score
        self.notes: list[str] = []
        self.missing: dict[str, str] = {}
        self._lock = threading.Lock()
        self.classifier = self.info = self.rule = self._gradcam = None
        self.detector = self.det_classes = None
        self.classifier_path, self.detector_path = classifier_path, detector_path
        if classifier_path is not None and Path(classifier_path).is_file():
            self.info = load_info(classifier_path)
            self.classifier = load_classifier(classifier_path)
            self.rule = decision_rule(self.info.classes, Path(metrics_path))
            if self.rule.note:
                self.notes.append(self.rule.note)
        elif classifier_path is not None:
            self.missing["classifier"] = (
                f"{classifier_path} not found: run `dvc pull {classifier_path}` (or "
                "`dvc repro train-classifier` to train it)"
            )
        if detector_path is not None and Path(detector_path).is_file():
            ckpt = read_checkpoint(detector_path)
            self.detector, cfg, self.det_classes = detector_from_checkpoint(ckpt, detector_path)
            self.det_size = int(ckpt.get("image_size") or cfg.min_size)
            self.det_resize = self._detector_resize(ckpt)
        elif detector_path is not None:
            self.missing["detector"] = (
                f"{detector_path} not found: run `dvc pull {detector_path}` (or "
                "`dvc repro train-detector` to train it)"
            )

    def _detector_resize(self, ckpt: dict[str, Any]) -> str:
        if ckpt.get("resize"):
            return str(ckpt["resize"])
        # Checkpoints older than the field: the cache it was trained on, if it matches.
        if DETECTION_CACHE_META.is_file():
            meta = read_json(DETECTION_CACHE_META)
            if int(meta.get("image_size", -1)) == self.det_size and meta.get("resize"):
                return str(meta["resize"])
        self.notes.append("detector checkpoint has no resize mode: assuming 'pad'")
        return "pad"

    @property
    def ready(self) -> bool:
        return self.classifier is not None or self.detector is not None

    def require_model(self) -> None:
        """StageError naming the dvc command when neither model is there."""
        if not self.ready:
            raise StageError("no model to serve: " + "; ".join(self.missing.values()))

    # ------------------------------------------------------------------------------ decoding
    def decode_file(self, path: str | Path) -> np.ndarray:
        return load_gray(path, self.max_pixels)

    def decode_bytes(self, data: bytes, name: str) -> np.ndarray:
        return decode_gray_bytes(data, name, self.max_pixels)

    def predict_file(self, path: str | Path, gradcam: bool = False) -> Prediction:
        """Decode + predict; raises ``ImageRejected`` for files that are not usable images."""
        t0 = time.perf_counter()
        gray = self.decode_file(path)
        decode_ms = (time.perf_counter() - t0) * 1000
        pred = self.predict_gray(gray, str(path), gradcam)
        pred.timings_ms = {"decode": decode_ms, **pred.timings_ms}
        return pred

    # ---------------------------------------------------------------------------- the models
    def predict_gray(self, gray: np.ndarray, name: str, gradcam: bool = False) -> Prediction:
        h, w = gray.shape
        pred = Prediction(file=name, width=w, height=h, notes=list(self.notes))
        with self._lock:
            if self.classifier is not None:
                t0 = time.perf_counter()
                pred.classification, x, affine = self._classify(gray)
                pred.timings_ms["classify"] = (time.perf_counter() - t0) * 1000
                if gradcam:
                    t0 = time.perf_counter()
                    index = self.info.classes.index(pred.classification["gradcam_class"])
                    cam = self.gradcam_model()(x, index)
                    pred.gradcam = cam_to_original(cam, affine, (h, w))
                    pred.timings_ms["gradcam"] = (time.perf_counter() - t0) * 1000
            if self.detector is not None:
                t0 = time.perf_counter()
                pred.detection = self._detect(gray)
                pred.timings_ms["detect"] = (time.perf_counter() - t0) * 1000
        return pred

    def gradcam_model(self) -> GradCam:
        if self._gradcam is None:  # built on first use: the predict command may not need it
            self._gradcam = GradCam(self.classifier)
        return self._gradcam

    def _classify(self, gray: np.ndarray) -> tuple[dict[str, Any], np.ndarray, Affine]:
        info, rule = self.info, self.rule
        x, affine = resize_gray(gray, info.image_size, info.resize)
        proba = predict_proba(self.classifier, x[None])[0]
        classes = list(info.classes)
        pos_idx = [classes.index(c) for c in rule.positives]
        neg_idx = [i for i in range(len(classes)) if i not in pos_idx]
        p_pos = float(np.clip(proba[pos_idx].sum(), 0.0, 1.0))
        positive = p_pos >= rule.threshold
        group = pos_idx if positive else neg_idx
        # Grad-CAM explains the decision: the most probable class on the decided side.
        cam_class = classes[max(group, key=lambda i: proba[i])]
        result = {
            "probabilities": {c: float(p) for c, p in zip(classes, proba, strict=True)},
            "positive_class": list(rule.positives),
            "p_positive": p_pos,
            "threshold": rule.threshold,
            "threshold_source": rule.source,
            "positive": bool(positive),
            "decision": "+".join(classes[i] for i in group),
            "top_class": classes[int(np.argmax(proba))],
            "gradcam_class": cam_class,
        }
        return result, x, affine

    def _detect(self, gray: np.ndarray) -> dict[str, Any]:
        x, affine = resize_gray(gray, self.det_size, self.det_resize)
        det = predict(self.detector, [x])[0]
        keep = det["scores"] >= self.min_score
        boxes = boxes_to_original(det["boxes"][keep], affine, gray.shape)
        out = []
        for box, score, label in zip(boxes, det["scores"][keep], det["labels"][keep], strict=True):
            if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
                continue  # a box entirely in the pad border
            out.append(
                {
                    "label": self.det_classes[int(label) - 1],
                    "score": float(score),
                    "box_xyxy": [round(float(v), 1) for v in box],
                }
            )
        return {"boxes": out, "min_score": self.min_score, "classes": list(self.det_classes)}

    # ------------------------------------------------------------------------------ pictures
    def gradcam_overlay(self, gray: np.ndarray, pred: Prediction) -> np.ndarray | None:
        return None if pred.gradcam is None else overlay(gray, pred.gradcam)

    def boxes_image(self, gray: np.ndarray, pred: Prediction) -> np.ndarray | None:
        if pred.detection is None:
            return None
        return draw_boxes(gray, pred.detection["boxes"], pred.detection["classes"])


__all__ = [
    "DecisionRule",
    "ImageRejected",
    "Prediction",
    "Predictor",
    "decision_rule",
    "rejection_message",
    "set_threads",
]
