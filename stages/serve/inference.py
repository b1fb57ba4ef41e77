"""One ``Predictor`` for the page, the predict command and the bench: file -> probabilities,
decision, Grad-CAM, boxes.

Inputs: one or more classifiers (``models/classifier.keras`` + ``.meta.json`` sidecar each; by
default the models the evaluation's decision block names when they all exist, else
``models/classifier.keras``), ``models/detector.pt`` and the decision the evaluate stage chose
(``reports/classifier/evaluation.json``, block ``decision``: classes, positive_class, threshold,
threshold_method, temperature, tta, models); either model may be absent. Images: PNG, JPEG,
BMP, TIFF or DICOM, told apart by their bytes (``stages.common.imageio``).
Output: ``Prediction`` objects (``to_json()`` = one JSON line of ``python -m stages.predict``,
including where each model came from and the data it was trained and tested on).

The decision is the evaluation's, applied whole: the mean probability of the ensemble
(``stages.classifier.predict.ensemble_proba``, with its test-time augmentation), then its
temperature (``stages.classifier.metrics.apply_temperature``), then the positive classes' summed
probability against its threshold, exactly as evaluate scored the test split. Grad-CAM explains
the first model of an ensemble, on the image as given (no mirror).
Preprocessing is the training code itself: ``stages.common.cache.prepare_gray`` with the resize
and intensity modes stored in the sidecar / checkpoint. Boxes and heatmaps are mapped back to
ORIGINAL image pixels. Model files are checked before use: a ``.keras`` must be a Keras zip
archive (loaded in Keras' safe mode), the detector is read with ``torch.load(weights_only=True)``;
anything else is a ``StageError`` naming the file (exit 2 in the commands), never a traceback.
TensorFlow and torch are imported only when a model is loaded. No run command (see
``stages.serve.predict``, ``stages.serve``).
"""

from __future__ import annotations

import hashlib
import math
import pickle
import threading
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stages.common import cache, paths
from stages.common.cache import INTENSITY_MODES, prepare_gray
from stages.common.imageio import MAX_PIXELS, ImageRejected, decode_gray_bytes, load_gray
from stages.common.utils import StageError, float_in, read_json
from stages.serve import provenance
from stages.serve.render import boxes_to_original, cam_to_original, draw_boxes, draw_outline

CLASSIFIER_PATH = paths.CLASSIFIER_MODEL
DETECTOR_PATH = paths.DETECTOR_MODEL
EVALUATION_PATH = paths.CLASSIFICATION.evaluation  # the decision rule evaluate chose
CLASSIFIER_METRICS = EVALUATION_PATH  # the name this constant had before evaluation.json
DETECTION_CACHE_META = cache.fit_path(paths.DETECTION.augment) / cache.META_FILE
DEFAULT = "default"  # Predictor(classifier=DEFAULT): the decision's models, else CLASSIFIER_PATH
MIN_SCORE = 0.3  # boxes shown: evaluate.detection.score_thresh's default (its report boxes)
SCORE = float_in(0.0, 1.0)  # the --min-score flag of the page and the predict command
BATCH = 64
# The smallest image served, in pixels on the short side (the page, its API and the predict
# command): a few pixels blown up to the model's size carry no finding, yet would get an answer.
# 28: the smallest X-rays a recipe here trains on (PneumoniaMNIST's 28 x 28 files).
MIN_SIDE = 28
RESIZE_MODES = ("stretch", "pad")
TTA_MODES = ("none", "hflip")
# What to tell a user for each imageio rejection reason.
REASON_TEXT = {
    "empty_file": "the file is empty (0 bytes)",
    "not_an_image": "not a PNG, JPEG or DICOM image",
    "corrupt": "the image file is corrupt and cannot be decoded",
    "truncated": "the image file is truncated (incomplete download or copy?)",
    "too_large": "the image is too large (over {mp} megapixels): refused as a possible "
    "decompression bomb",
    "too_small": "the image is too small (under {side} pixels on its short side) to be an X-ray "
    "the models can read",
    "no_pixel_data": "the DICOM file has no pixel data (a report or structured document?)",
    "unsupported": "this image encoding is not supported here",
}
# What a broken model file can make Keras / torch raise while reading it.
_LOAD_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    IndexError,
    OSError,
    EOFError,
    RuntimeError,
    NotImplementedError,
    ImportError,
    zipfile.BadZipFile,
    pickle.UnpicklingError,
    RecursionError,
)


def set_threads(n: int) -> None:
    """CPU threads of torch and TensorFlow (0 = all usable cores). Call before the first model runs.

    On a shared machine 1 thread can be far faster: with another CPU-bound job on 2 cores the
    detector took 2.9 s per image with 2 torch threads and 0.1 s with 1 (bench/README.md).
    """
    if n <= 0:
        return  # the frameworks' defaults: nothing to import yet
    from stages.classifier.predict import set_tf_threads
    from stages.common.utils import set_torch_threads

    set_torch_threads(n)
    set_tf_threads(n)


def rejection_message(exc: ImageRejected, max_pixels: int = MAX_PIXELS) -> str:
    """One plain sentence for a refused file (its technical detail in brackets)."""
    text = REASON_TEXT.get(exc.reason, exc.reason).format(mp=max_pixels // 1_000_000, side=MIN_SIDE)
    return f"{Path(exc.name).name}: {text}" + (f" [{exc.detail}]" if exc.detail else "")


def check_min_side(gray: np.ndarray, name: str) -> np.ndarray:
    """``gray`` when both its sides are at least ``MIN_SIDE``, else ``ImageRejected``."""
    h, w = gray.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ImageRejected("too_small", name, f"{w}x{h} pixels, short side < {MIN_SIDE}")
    return gray


def _one_line(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"


# ------------------------------------------------------------------------------ the decision
@dataclass(frozen=True)
class DecisionRule:
    """The evaluation's decision: positive classes vs the rest on their summed probability,
    after the ensemble mean (with TTA) and the temperature, as the evaluate stage scores."""

    positives: tuple[str, ...]
    threshold: float
    source: str  # where the threshold came from, shown to the user
    note: str = ""  # non-empty when a fallback was used
    temperature: float = 1.0
    tta: str = "none"
    models: tuple[str, ...] = ()  # the models the evaluation averaged


def read_decision(path: Path) -> dict[str, Any] | None:
    """The ``decision`` block of an evaluation.json; None when the file is absent; a
    ``StageError`` when it is not readable JSON."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        doc = read_json(path)
    except (OSError, ValueError) as exc:
        raise StageError(f"{path} is not a readable evaluation file ({_one_line(exc)})") from None
    if not isinstance(doc, dict):
        raise StageError(f"{path} is not an evaluation file (a JSON object expected)")
    block = doc.get("decision")
    return block if isinstance(block, dict) else {}


def default_classifiers(evaluation: Path = EVALUATION_PATH) -> list[Path]:
    """The decision block's ``models`` when present and all exist, else the pipeline's model."""
    decision = read_decision(evaluation) or {}
    models = [Path(m) for m in decision.get("models") or []]
    if models and all(m.is_file() for m in models):
        return models
    return [CLASSIFIER_PATH]


def decision_rule(classes: tuple[str, ...], metrics_path: Path) -> DecisionRule:
    """The evaluation's decision when it fits these classes, else 0.5 with a note.

    A decision whose temperature or TTA mode cannot be applied is a ``StageError`` (a broken
    evaluation file), not a silent fallback.
    """
    if len(classes) == 2:
        default: tuple[str, ...] = (classes[1],)
    else:
        default = tuple(c for c in classes if c != "NORMAL") or classes[1:]
    metrics_path = Path(metrics_path)
    doc = read_decision(metrics_path)
    why = f"{metrics_path} not found"
    if doc is not None:
        positives = doc.get("positive_class", default)
        positives = (positives,) if isinstance(positives, str) else tuple(positives)
        if not doc:
            why = f"{metrics_path} has no decision block (written by an older evaluate?)"
        elif "threshold" not in doc:
            why = f"{metrics_path} has no threshold"
        elif list(doc.get("classes", classes)) != list(classes):
            why = f"{metrics_path} is for classes {doc.get('classes')}, the model has {classes}"
        elif not positives or not set(positives) < set(classes):
            why = f"{metrics_path} positive_class {list(positives)} does not fit {classes}"
        else:
            temperature, tta = doc.get("temperature", 1.0), doc.get("tta", "none")
            ok_t = isinstance(temperature, int | float) and math.isfinite(temperature)
            if not ok_t or temperature <= 0:
                raise StageError(f"{metrics_path}: decision temperature {temperature!r} is not > 0")
            if tta not in TTA_MODES:
                raise StageError(f"{metrics_path}: decision tta {tta!r} is not one of {TTA_MODES}")
            method = doc.get("threshold_method", "?")
            return DecisionRule(
                positives,
                float(doc["threshold"]),
                f"{metrics_path} ({method})",
                temperature=float(temperature),
                tta=str(tta),
                models=tuple(str(m) for m in doc.get("models") or ()),
            )
    note = f"no evaluate threshold ({why}): using 0.5; run `dvc repro evaluate@classification`"
    return DecisionRule(default, 0.5, "default 0.5", note)


# ---------------------------------------------------------------------------- model loading
def load_classifier_checked(path: Path) -> tuple[Any, Any]:
    """(Keras model, ClassifierInfo) of one ``.keras`` file, or a one-line ``StageError``.

    Only a Keras zip archive with its ``config.json`` is handed to Keras, in safe mode (no
    Python lambdas); a pickle, an HDF5 file or a damaged archive is refused by name.
    """
    path = Path(path)
    info = _load_sidecar(path)
    if not zipfile.is_zipfile(path):
        raise StageError(
            f"{path} is not a valid classifier model: not a .keras archive (a zip); pickles "
            "and other formats are refused"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except (zipfile.BadZipFile, OSError) as exc:
        raise StageError(f"{path} is not a valid classifier model ({_one_line(exc)})") from None
    if "config.json" not in names:
        raise StageError(f"{path} is not a valid classifier model: no config.json in the archive")
    import keras

    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except _LOAD_ERRORS as exc:
        raise StageError(f"{path} is not a valid classifier model ({_one_line(exc)})") from None
    units = max(info.head_units, 2)
    try:
        in_shape, out_units = tuple(model.input_shape), int(model.output_shape[-1])
    except (AttributeError, TypeError, ValueError, IndexError) as exc:
        raise StageError(f"{path} is not a classifier model ({_one_line(exc)})") from None
    if len(in_shape) != 4 or in_shape[-1] not in (1, None) or max(out_units, 2) != units:
        raise StageError(
            f"{path} does not fit its sidecar: input {in_shape}, {out_units} outputs; the "
            f"sidecar says (S, S, 1) grey images and {info.head_units} head units"
        )
    return model, info


def _load_sidecar(path: Path) -> Any:
    from stages.classifier.predict import load_info, sidecar_path

    try:
        info = load_info(path)
    except StageError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StageError(
            f"{sidecar_path(path)} is not a valid sidecar ({_one_line(exc)})"
        ) from None
    if info.resize not in RESIZE_MODES or info.intensity not in INTENSITY_MODES:
        raise StageError(
            f"{sidecar_path(path)}: resize {info.resize!r} / intensity {info.intensity!r} not "
            f"one of {RESIZE_MODES} / {INTENSITY_MODES}"
        )
    return info


def load_lungs_checked(info: Any, segmenter_path: Path) -> Any:
    """The segmenter a lung-aware classifier was trained with (its sidecar's md5), loaded, or a
    StageError naming what to fetch: another segmenter would show the model other lungs."""
    from stages.segmenter.predict import LungSegmenter

    path = Path(segmenter_path)
    if not path.is_file():
        raise StageError(
            f"the classifier was trained on lungs {info.lungs} and needs its segmenter, but "
            f"{path} is absent: `dvc pull {path}` (or `dvc repro train-segmenter`)"
        )
    if info.lungs_segmenter:
        h = hashlib.md5()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != info.lungs_segmenter:
            raise StageError(
                f"{path} is not the segmenter the classifier was trained with (md5 "
                f"{h.hexdigest()[:12]}, the model's sidecar says {info.lungs_segmenter[:12]}): "
                "check out the segmenter of the classifier's commit (`dvc checkout`, or serve "
                "both from the registry)"
            )
    return LungSegmenter(path)


def load_detector_checked(path: Path) -> tuple[Any, Any, list[str], dict[str, Any]]:
    """(model, config, classes, checkpoint) of a detector file, or a one-line ``StageError``.

    The file is read with ``torch.load(weights_only=True)``: a pickle carrying code is refused.
    """
    from stages.detector.model import detector_from_checkpoint, read_checkpoint

    path = Path(path)
    try:
        ckpt = read_checkpoint(path)
        model, cfg, classes = detector_from_checkpoint(ckpt, path)
    except StageError as exc:
        raise StageError(" ".join(str(exc).split())) from None
    except _LOAD_ERRORS as exc:
        raise StageError(
            f"{path} is not a valid detector checkpoint ({_one_line(exc)}); only files saved "
            "by train-detector are loaded (weights only: pickled code is refused)"
        ) from None
    return model, cfg, classes, ckpt


# --------------------------------------------------------------------------------- results
@dataclass
class Prediction:
    """Everything known about one image; ``gradcam`` / ``overlays`` stay out of the JSON."""

    file: str
    width: int
    height: int
    classification: dict[str, Any] | None = None
    detection: dict[str, Any] | None = None
    gradcam: np.ndarray | None = None  # float32 (H, W) in [0, 1]
    lungs: np.ndarray | None = None  # bool (H, W): the segmenter's lungs (a lung-aware model)
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


def _as_paths(classifier: Any, evaluation: Path) -> list[Path]:
    if classifier is None:
        return []
    if isinstance(classifier, str) and classifier == DEFAULT:
        return default_classifiers(evaluation)
    if isinstance(classifier, str | Path):
        return [Path(classifier)]
    return [Path(p) for p in classifier]


class Predictor:
    """Loads whichever models exist; ``predict_file`` / ``predict_bytes`` run them on one image.

    ``classifier``: ``DEFAULT``, one path, several paths (an ensemble, averaged as evaluate
    does) or None. Thread-safe (one lock around the models): the page may call it from several
    workers. ``provenance_root``: the repository whose git/DVC/data records say where the
    models came from (None: not looked up). ``registry``: {role: ``ServedModel``} of the models
    fetched from the model registry (``stages.serve.registry``): the paths given are theirs,
    and their records (name, version, stage, commit) go into the provenance.
    """

    def __init__(
        self,
        classifier: str | Path | Sequence[str | Path] | None = DEFAULT,
        detector_path: Path | None = DETECTOR_PATH,
        metrics_path: Path = EVALUATION_PATH,
        min_score: float = MIN_SCORE,
        max_pixels: int = MAX_PIXELS,
        provenance_root: Path | None = Path("."),
        registry: dict[str, Any] | None = None,
        segmenter_path: Path | None = None,
    ) -> None:
        self.max_pixels, self.min_score = max_pixels, min_score
        self.served: dict[str, Any] = dict(registry or {})
        self.notes: list[str] = []
        self.missing: dict[str, str] = {}
        self._lock = threading.Lock()
        self.classifiers: list[Any] = []
        self.info = self.rule = self._gradcam = None
        self.detector = self.det_classes = None
        self.classifier_paths = _as_paths(classifier, Path(metrics_path))
        self.detector_path = detector_path
        self._load_classifiers(Path(metrics_path))
        self.lungs = None
        if self.info is not None and self.info.lungs != "none":
            self.lungs = load_lungs_checked(self.info, segmenter_path or paths.SEGMENTER_MODEL)
        if detector_path is not None and Path(detector_path).is_file():
            self.detector, cfg, self.det_classes, ckpt = load_detector_checked(detector_path)
            self.det_size = int(ckpt.get("image_size") or cfg.min_size)
            self.det_resize = self._detector_mode(ckpt, "resize", RESIZE_MODES)
            self.det_intensity = self._detector_mode(ckpt, "intensity", INTENSITY_MODES)
        elif detector_path is not None:
            self.missing["detector"] = (
                f"{detector_path} not found: run `dvc pull {detector_path}` (or "
                "`dvc repro train-detector` to train it)"
            )
        self.provenance: provenance.Provenance | None = None
        self.model_records: dict[str, Any] = {}
        if provenance_root is not None:
            self.provenance = provenance.collect(
                [p for p in self.classifier_paths if self.classifiers],
                Path(detector_path) if self.detector is not None else None,
                root=Path(provenance_root),
                evaluated=[Path(m) for m in (self.rule.models if self.rule else ())],
                registry=self.served,
            )
            self.model_records = {
                "classifier": [m.to_json() for m in self.provenance.of("classifier")],
                "detector": [m.to_json() for m in self.provenance.of("detector")],
            }

    # -------------------------------------------------------------------------- loading
    @property
    def classifier(self) -> Any:
        """The first classifier (the one Grad-CAM explains), or None."""
        return self.classifiers[0] if self.classifiers else None

    def _load_classifiers(self, metrics_path: Path) -> None:
        paths_ = self.classifier_paths
        absent = [p for p in paths_ if not p.is_file()]
        if absent and len(paths_) == 1:
            self.missing["classifier"] = (
                f"{absent[0]} not found: run `dvc pull {absent[0]}` (or "
                "`dvc repro train-classifier` to train it)"
            )
            return
        if absent:
            raise StageError(f"classifier ensemble member {absent[0]} not found")
        infos = []
        for path in paths_:
            model, info = load_classifier_checked(path)
            self.classifiers.append(model)
            infos.append(info)
        if not infos:
            return
        from stages.classifier.predict import check_one_cache

        check_one_cache(paths_, infos)
        first = infos[0]
        self.info = first
        self.rule = decision_rule(first.classes, metrics_path)
        if self.rule.note:
            self.notes.append(self.rule.note)
        served = sorted(str(p.resolve()) for p in paths_)
        # a registry version's decision names its models by their paths in that version
        base = self.served["classifier"].root if "classifier" in self.served else Path(".")
        chosen_for = sorted(str((base / m).resolve()) for m in self.rule.models)
        if chosen_for and chosen_for != served:
            self.notes.append(
                f"the threshold in {metrics_path} was chosen for {list(self.rule.models)}, "
                f"served here: {[p.as_posix() for p in paths_]}"
            )

    def _detector_mode(self, ckpt: dict[str, Any], key: str, allowed: tuple[str, ...]) -> str:
        value = ckpt.get(key)
        if not value:
            # Checkpoints older than the field: the cache it was trained on, if it matches.
            if DETECTION_CACHE_META.is_file():
                meta = read_json(DETECTION_CACHE_META)
                if int(meta.get("image_size", -1)) == self.det_size and meta.get(key):
                    value = meta[key]
            if not value:
                value = "pad" if key == "resize" else "none"
                self.notes.append(f"detector checkpoint has no {key} mode: assuming {value!r}")
        if value not in allowed:
            raise StageError(f"{self.detector_path}: {key} {value!r} is not one of {allowed}")
        return str(value)

    @property
    def ready(self) -> bool:
        return self.classifier is not None or self.detector is not None

    def require_model(self) -> None:
        """StageError naming the dvc command when neither model is there."""
        if not self.ready:
            raise StageError("no model to serve: " + "; ".join(self.missing.values()))

    # ------------------------------------------------------------------------------ decoding
    def decode_file(self, path: str | Path) -> np.ndarray:
        return check_min_side(load_gray(path, self.max_pixels), str(path))

    def decode_bytes(self, data: bytes, name: str) -> np.ndarray:
        return check_min_side(decode_gray_bytes(data, name, self.max_pixels), name)

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
                pred.classification, x, affine, lungs = self._classify(gray)
                pred.timings_ms["classify"] = (time.perf_counter() - t0) * 1000
                pred.lungs = lungs.mask if lungs is not None else None
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

    def gradcam_model(self) -> Any:
        if self._gradcam is None:  # built on first use: the predict command may not need it
            from stages.classifier.gradcam import GradCam

            self._gradcam = GradCam(self.classifier)
        return self._gradcam

    def preprocess_classifier(self, gray: np.ndarray) -> tuple[np.ndarray, Any]:
        """The classifier's input (S, S) uint8 and the affine from the film: the augment
        cache's code, after the lungs' preprocessing when the model was trained with it."""
        x, affine, _ = self.preprocess_with_lungs(gray)
        return x, affine

    def preprocess_with_lungs(self, gray: np.ndarray) -> tuple[np.ndarray, Any, Any]:
        """(input, affine from the film, the segmenter's ``Lungs`` or None): what augment does
        (``stages.common.lungs.apply`` before ``prepare_gray``), so serve = train."""
        info = self.info
        if self.lungs is None:
            x, affine = prepare_gray(gray, info.image_size, info.resize, info.intensity)
            return x, affine, None
        from stages.common.cache import Affine
        from stages.common.lungs import apply, grow

        found = self.lungs.segment([gray], margin=0.0)[0]
        film, _ = apply(gray, found.mask, found.box, info.lungs, info.lungs_margin)
        x, affine = prepare_gray(film, info.image_size, info.resize, info.intensity)
        if info.lungs == "crop" and found.found:  # the crop's offset, so maps land on the film
            x0, y0, _, _ = grow(found.box, info.lungs_margin, gray.shape)
            affine = Affine(
                affine.sx, affine.sy, affine.tx - affine.sx * x0, affine.ty - affine.sy * y0
            )
        return x, affine, found

    def preprocess_detector(self, gray: np.ndarray) -> tuple[np.ndarray, Any]:
        """The detector's input (S, S) uint8 and the affine, with the checkpoint's modes."""
        return prepare_gray(gray, self.det_size, self.det_resize, self.det_intensity)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, C) served probabilities of preprocessed (N, S, S) images: the ensemble's mean
        (with the decision's TTA), then its temperature - what evaluate scored."""
        from stages.classifier.predict import ensemble_proba

        proba = ensemble_proba(self.classifiers, images, BATCH, self.rule.tta)
        if self.rule.temperature != 1.0:
            from stages.classifier.metrics import apply_temperature

            proba = apply_temperature(proba, self.rule.temperature).astype(np.float32)
        return proba

    def _classify(self, gray: np.ndarray) -> tuple[dict[str, Any], np.ndarray, Any, Any]:
        """(result, the model's input, its affine from the film, the lungs found or None)."""
        rule = self.rule
        x, affine, lungs = self.preprocess_with_lungs(gray)
        proba = self.probabilities(x[None])[0]
        classes = list(self.info.classes)
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
            "temperature": rule.temperature,
            "tta": rule.tta,
            "n_models": len(self.classifiers),
            "positive": bool(positive),
            "decision": "+".join(classes[i] for i in group),
            "top_class": classes[int(np.argmax(proba))],
            "gradcam_class": cam_class,
        }
        if lungs is not None:  # a lung-aware model: what it was shown
            result["lungs"] = {
                "mode": self.info.lungs,
                "found": bool(lungs.found),
                "box_xyxy": [int(v) for v in lungs.box],
                "lung_share": round(float(lungs.mask.mean()), 4),
            }
        if self.model_records:
            result["models"] = self.model_records["classifier"]
        return result, x, affine, lungs

    def run_detector(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The detector on one preprocessed (S, S) image: boxes in model-input pixels."""
        from stages.detector.model import predict

        return predict(self.detector, [x])[0]

    def _detect(self, gray: np.ndarray) -> dict[str, Any]:
        x, affine = self.preprocess_detector(gray)
        det = self.run_detector(x)
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
        result = {"boxes": out, "min_score": self.min_score, "classes": list(self.det_classes)}
        if self.model_records:
            result["models"] = self.model_records["detector"]
        return result

    # ------------------------------------------------------------------------------ pictures
    def gradcam_overlay(self, gray: np.ndarray, pred: Prediction) -> np.ndarray | None:
        """The Grad-CAM over the film; with a lung-aware model, the lungs it was given outlined."""
        if pred.gradcam is None:
            return None
        from stages.classifier.gradcam import overlay

        picture = overlay(gray, pred.gradcam)
        return draw_outline(picture, pred.lungs) if pred.lungs is not None else picture

    def boxes_image(self, gray: np.ndarray, pred: Prediction) -> np.ndarray | None:
        if pred.detection is None:
            return None
        return draw_boxes(gray, pred.detection["boxes"], pred.detection["classes"])


__all__ = [
    "DEFAULT",
    "DecisionRule",
    "ImageRejected",
    "Prediction",
    "Predictor",
    "decision_rule",
    "default_classifiers",
    "load_classifier_checked",
    "load_detector_checked",
    "read_decision",
    "rejection_message",
    "set_threads",
]
