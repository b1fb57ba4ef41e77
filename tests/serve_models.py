"""Tiny models for the serve/predict tests (not a test module): built once per session.

``tiny_models(base)`` writes under ``base``, laid out like a workspace (``base`` is a
provenance root): a to_be classifier (softmax, 2 classes, 48 px, trained for two short epochs
by the real ``stages.classifier.train.train`` on a cache whose meta says ``resize: pad``) at
``models/classifier.keras`` with its sidecar, an evaluate-style
``reports/classifier/evaluation.json`` (decision block: threshold THRESHOLD, temperature 1, no
TTA, that model) and headline ``metrics/classifier.json``, an untrained RetinaNet (real
builder, 64 px, ``score_thresh`` 0 so it always returns boxes) at ``models/detector.pt`` saved
by ``save_detector`` with image_size/resize/intensity like train-detector does, and the data
records provenance reads: the classification split csv files (source ``kermany``) and the
detection cache index (source ``synthetic``).
``constant_classifier`` / ``mirror_classifier`` build Keras models whose probability is known
in closed form (the decision and TTA tests); ``evaluation_file`` writes a decision block.
Also ``bad_inputs(folder)``: one file per kind of bad or odd upload.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

import stages  # noqa: F401  (torch before TensorFlow)
from stages.classifier.augment import ClassificationPolicy
from stages.common import paths
from stages.common.cache import split_path, write_meta, write_policy, write_split
from stages.common.config import parse, to_dict
from stages.common.utils import write_json
from stages.detector.config import TrainDetectorConfig
from stages.detector.model import build_detector, save_detector
from stages.serve.inference import MIN_SIDE

S = 48
CLASSES = ("NORMAL", "PNEUMONIA")
DET_CLASSES = ["Mass", "Nodule"]
THRESHOLD = 0.42


def _disc_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Class k = noise + a bright centred disc when k = 1: learnable in a few steps."""
    yy, xx = np.mgrid[:S, :S]
    disc = ((yy - S / 2) ** 2 + (xx - S / 2) ** 2) < (S / 4) ** 2
    k = np.arange(n) % 2
    images = rng.integers(0, 90, (n, S, S)) + disc[None] * (80 * k)[:, None, None]
    return images.clip(0, 255).astype(np.uint8), k


def _cache(root: Path) -> Path:
    rng = np.random.default_rng(0)
    counts = {"train": 48, "val": 16}
    for split, n in counts.items():
        images, k = _disc_images(n, rng)
        index = pd.DataFrame(
            {
                "path": [f"img/{split}_{i}.png" for i in range(n)],
                "label": [CLASSES[j] for j in k],
                "subtype": "",
                "patient_id": [f"p{i}" for i in range(n)],
                "split": split,
                "label_index": k,
            }
        )
        write_split(root, split, images, index, S)
    meta = {"task": "classification", "image_size": S, "resize": "pad"}
    write_meta(root, {**meta, "classes": list(CLASSES), "counts": counts})
    write_policy(root, to_dict(ClassificationPolicy()))
    return root


def _train_classifier(base: Path) -> Path:
    from stages.classifier.config import TrainClassifierConfig
    from stages.classifier.train import train

    cfg = parse(
        TrainClassifierConfig,
        {
            "arch": "to_be",
            "epochs": 2,
            "batch_size": 8,
            "head": {"activation": "softmax", "units": 2},
            "loss": "categorical_crossentropy",
            "early_stopping": {"patience": None},
            "threads": 0,  # all the cores this process may use (one per pinned test worker)
        },
        "train_classifier",
    )
    model = base / "models" / "classifier.keras"
    cwd = Path.cwd()
    os.chdir(base)  # dvclive probes the cwd's git/DVC repo: keep it away from the project's
    try:
        train(cfg, _cache(base / "cache"), model, base / "live", base / "train.json")
    finally:
        os.chdir(cwd)
    return model


def save_tiny_detector(
    path: Path, image_size: int = 64, resize: str = "pad", intensity: str = "none"
) -> Path:
    """An untrained RetinaNet (score_thresh 0: it always answers) with the given stored modes."""
    cfg = parse(
        TrainDetectorConfig,
        {"fpn_channels": 64, "min_size": image_size, "max_size": image_size, "score_thresh": 0.0},
        "train_detector",
    )
    cfg = parse(TrainDetectorConfig, {**to_dict(cfg), "detections_per_img": 10}, "td")
    model = build_detector(cfg, len(DET_CLASSES))
    extra = {"image_size": image_size, "resize": resize, "intensity": intensity}
    save_detector(path, model, cfg, DET_CLASSES, extra)
    return path


def evaluation_file(
    path: Path,
    threshold: float,
    models: list[Path] | None = None,
    temperature: float = 1.0,
    tta: str = "none",
) -> Path:
    """An evaluation.json as the evaluate stage writes it (the part serving reads)."""
    decision = {
        "classes": list(CLASSES),
        "positive_class": [CLASSES[-1]],
        "threshold": threshold,
        "threshold_method": "youden",
        "temperature": temperature,
        "tta": tta,
        "models": [Path(m).as_posix() for m in models or []],
    }
    write_json(path, {"threshold": threshold, "decision": decision})
    return path


def _write_data_records(base: Path) -> None:
    """What provenance reads about the data: split csv files (classification, source
    kermany) and the augment cache index (detection, source synthetic)."""
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        rows = pd.DataFrame({"path": [f"x{i}.png" for i in range(n)], "source": "kermany"})
        folder = base / paths.CLASSIFICATION.split
        folder.mkdir(parents=True, exist_ok=True)
        rows.to_csv(folder / f"{split}.csv", index=False)
        index = split_path(base / paths.DETECTION.augment, split)
        index.mkdir(parents=True, exist_ok=True)
        rows.assign(source="synthetic").to_csv(index / "index.csv", index=False)


_BUILT: dict[Path, dict[str, Path]] = {}


def tiny_models(base: Path) -> dict[str, Path]:
    """{"classifier", "detector", "evaluation", "metrics", "root"} under ``base`` (built on the
    first call)."""
    if base not in _BUILT:
        base.mkdir(parents=True, exist_ok=True)
        classifier = _train_classifier(base)
        evaluation = evaluation_file(
            base / paths.CLASSIFICATION.evaluation, THRESHOLD, [classifier]
        )
        metrics = base / paths.CLASSIFICATION.metrics
        write_json(metrics, {"threshold": THRESHOLD, "accuracy": 0.9, "roc_auc": 0.95})
        detector = save_tiny_detector(base / paths.DETECTOR_MODEL)
        write_json(base / paths.DETECTION.metrics, {"map_50": 0.631, "map": 0.3})
        _write_data_records(base)
        _BUILT[base] = {
            "classifier": classifier,
            "detector": detector,
            "evaluation": evaluation,
            "metrics": metrics,
            "root": base,
        }
    return _BUILT[base]


def _save_keras(
    model, path: Path, size: int, resize: str, intensity: str, arch: str, **lungs
) -> Path:
    """Save ``model`` with its sidecar; ``lungs``: ClassifierInfo's lungs fields (lungs,
    lungs_margin, lungs_segmenter) of a lung-aware model."""
    from stages.classifier.predict import ClassifierInfo, save_info

    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    info = ClassifierInfo(
        classes=CLASSES,
        class_map={},
        head_activation="sigmoid",
        head_units=1,
        encoding="binary",
        image_size=size,
        arch=arch,
        resize=resize,
        intensity=intensity,
        **lungs,
    )
    save_info(path, info)
    return path


def constant_classifier(
    path: Path, p: float, size: int = 32, resize: str = "pad", intensity: str = "none"
) -> Path:
    """A 1-unit sigmoid classifier whose P(PNEUMONIA) is ``p`` for every image: a conv layer
    with zero weights, then a dense head with zero kernel and bias logit(p)."""
    import keras

    inputs = keras.Input((size, size, 1), name="image")
    x = keras.layers.Conv2D(2, 3, kernel_initializer="zeros", bias_initializer="zeros")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    head = keras.layers.Dense(
        1,
        activation="sigmoid",
        name="head",
        kernel_initializer="zeros",
        bias_initializer=keras.initializers.Constant(float(np.log(p / (1.0 - p)))),
    )
    model = keras.Model(inputs, head(x))
    return _save_keras(model, path, size, resize, intensity, "constant")


LEFT_WEIGHT = 0.02  # per grey level of the mean of the image's left half


def left_half_classifier(
    path: Path, size: int = 32, resize: str = "pad", intensity: str = "none", **lungs
) -> Path:
    """P(PNEUMONIA) = sigmoid(LEFT_WEIGHT * mean(left half of the input) - 1), see
    ``left_half_probability``: a mirrored image gets another probability (what TTA averages),
    and every input pixel of the left half counts (what preprocessing tests compare)."""
    import keras

    inputs = keras.Input((size, size, 1), name="image")
    head = keras.layers.Dense(1, activation="sigmoid", name="head")
    model = keras.Model(inputs, head(keras.layers.Flatten()(inputs)))
    kernel = np.zeros((size, size), np.float32)
    kernel[:, : size // 2] = LEFT_WEIGHT / (size * (size // 2))
    head.set_weights([kernel.reshape(-1, 1), np.array([-1.0], np.float32)])
    return _save_keras(model, path, size, resize, intensity, "left_half", **lungs)


def left_half_probability(x: np.ndarray) -> float:
    """The left-half classifier's P(PNEUMONIA) of one preprocessed (S, S) image."""
    z = LEFT_WEIGHT * float(x[:, : x.shape[1] // 2].astype(np.float64).mean()) - 1.0
    return float(1.0 / (1.0 + np.exp(-z)))


def free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def keep_absl_stream() -> None:
    """Call before starting the server in a test.

    uvicorn's logging.config.dictConfig closes every existing logging handler; absl's (installed
    by TensorFlow) then closes its stream unless it is the current sys.stderr. Under pytest's
    capture it is an older captured stream pytest still reads, and the run dies with "I/O
    operation on closed file". Pointing it at the current sys.stderr keeps it open.
    """
    import sys

    from absl import logging as absl_logging

    absl_logging.get_absl_handler().python_handler.stream = sys.stderr


def xray_like(h: int = 120, w: int = 90, seed: int = 0) -> np.ndarray:
    """A non-square uint8 image with structure (so Grad-CAM has something to look at)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    disc = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (min(h, w) / 4) ** 2
    return (rng.integers(0, 90, (h, w)) + 90 * disc).clip(0, 255).astype(np.uint8)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with no pixel data at all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _dx_dataset(rows: int, cols: int):
    """A digital-X-ray DICOM header (file meta, UIDs, size) without pixel attributes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = rows, cols
    return ds


def _dicom_without_pixels(path: Path) -> None:
    _dx_dataset(64, 64).save_as(path, enforce_file_format=True)


def _dicom_16bit(path: Path, img: np.ndarray) -> None:
    """A 12-bit-in-16 MONOCHROME2 DICOM with pixel data (what a DX modality writes)."""
    ds = _dx_dataset(*img.shape)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (img.astype(np.uint16) * 16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def bad_inputs(folder: Path) -> dict[str, tuple[Path, str | None]]:
    """{kind: (file, reason)}; reason None = accepted (converted to 8-bit grey)."""
    folder.mkdir(parents=True, exist_ok=True)
    img = xray_like()
    good = folder / "good.png"
    Image.fromarray(img).save(good)
    out: dict[str, tuple[Path, str | None]] = {}
    (folder / "notes.txt").write_text("not an image at all\n")
    out["non_image"] = (folder / "notes.txt", "not_an_image")
    scrambled = bytearray(good.read_bytes())
    for i in range(80, len(scrambled) - 20):  # valid header and chunks, scrambled pixel data
        scrambled[i] ^= 0x5A
    (folder / "corrupt.png").write_bytes(bytes(scrambled))
    out["corrupt"] = (folder / "corrupt.png", "corrupt")
    jpeg = folder / "full.jpg"
    Image.fromarray(img).save(jpeg, quality=90)
    (folder / "truncated.jpg").write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    jpeg.unlink()
    out["truncated"] = (folder / "truncated.jpg", "truncated")
    (folder / "empty.png").write_bytes(b"")
    out["zero_byte"] = (folder / "empty.png", "empty_file")
    _dicom_without_pixels(folder / "no_pixels.dcm")
    out["dicom_no_pixels"] = (folder / "no_pixels.dcm", "no_pixel_data")
    (folder / "bomb.png").write_bytes(_png_header_only(12_000, 9_000))  # 108 MP
    out["bomb"] = (folder / "bomb.png", "too_large")
    Image.fromarray(np.full((1, 1), 200, np.uint8)).save(folder / "one_pixel.png")
    out["one_pixel"] = (folder / "one_pixel.png", "too_small")
    Image.fromarray(img[: MIN_SIDE - 1]).save(folder / "thin_strip.png")
    out["thin"] = (folder / "thin_strip.png", "too_small")
    Image.fromarray(img.astype(np.uint16) * 257).save(folder / "sixteen_bit.png")
    out["16bit"] = (folder / "sixteen_bit.png", None)
    rgba = np.dstack([img, img, img, np.full_like(img, 255)])
    Image.fromarray(rgba, mode="RGBA").save(folder / "rgba.png")
    out["rgba"] = (folder / "rgba.png", None)
    Image.fromarray(img).convert("CMYK").save(folder / "cmyk.jpg")
    out["cmyk"] = (folder / "cmyk.jpg", None)
    _dicom_16bit(folder / "xray.dcm", img)
    out["dicom"] = (folder / "xray.dcm", None)
    return out
