"""Synthetic chest X-ray phantoms: the default data source of every task.

Inputs: a frozen config (params `data.<task>.synthetic`). Outputs, in the real sets' own formats so
real and synthetic data go through one loader:
- classification: `<out>/chest_xray/{train,test}/{NORMAL,PNEUMONIA}/*.jpeg` (Kermany 2018 layout and
  file names: `person{pid}_{bacteria|virus}_{k}.jpeg`, `IM-{pid:04d}-{k:04d}.jpeg`);
- detection: `<out>/{train,test}.json` (ChestX-Det10 records plus `patient_id`) and
  `<out>/images/<id>.png`; boxes are [x1, y1, x2, y2] pixels, x2/y2 exclusive, tight;
- segmentation: `<out>/lung_masks/[train/|test/]{images,masks}/PHANTOM_{pid:04d}_{k}.png` (the
  lung_masks layout: 0/255 masks of both lungs, the phantom's soft lung maps thresholded at 0.5;
  the split folders only when `test_fraction` > 0).
Every image is drawn from its own child seed (config seed, task, patient, image), so the same
config gives byte-identical files whatever the generation order. No CLI: the download stage's
`synthetic` source calls `generate_classification` / `generate_detection`.
Run: no CLI; tested by tests/test_synthetic.py.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

from stages.common.config import check
from stages.common.utils import atomic_dir, usable_cores, write_json
from stages.sources import phantom

LesionKind = Literal["Consolidation", "Nodule", "Mass", "Effusion", "Atelectasis", "Pneumothorax"]
CLASSIFICATION, DETECTION, SEGMENTATION = 1, 2, 3  # task codes mixed into the child seeds


def _check_common(n_patients: int, ipp: tuple[int, int], size: int, test_fraction: float) -> None:
    check(n_patients >= 1, "n_patients must be >= 1")
    check(1 <= ipp[0] <= ipp[1], "images_per_patient must be [lo, hi] with 1 <= lo <= hi")
    check(32 <= size <= 2048, "image_size must be in [32, 2048]")
    check(0.0 <= test_fraction < 1.0, "test_fraction must be in [0, 1)")


@dataclass(frozen=True)
class SyntheticClassificationConfig:
    n_patients: int = 400  # patients drawn
    images_per_patient: tuple[int, int] = (1, 4)  # inclusive range
    image_size: int = 192  # px, square films
    pneumonia_fraction: float = 0.6  # fraction of patients with pneumonia
    subtle_fraction: float = 0.3  # fraction of pneumonia images whose opacities are faint
    label_noise: float = 0.0  # fraction of images whose label (folder) is flipped
    test_fraction: float = 0.15  # patients written to test/ (Kermany has train/test)
    seed: int = 7  # seed of the generator (same seed, same files)

    def __post_init__(self) -> None:
        _check_common(self.n_patients, self.images_per_patient, self.image_size, self.test_fraction)
        for name in ("pneumonia_fraction", "subtle_fraction"):
            check(0.0 <= getattr(self, name) <= 1.0, f"{name} must be in [0, 1]")
        check(0.0 <= self.label_noise <= 0.5, "label_noise must be in [0, 0.5]")
        check(0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}")


@dataclass(frozen=True)
class SyntheticDetectionConfig:
    n_patients: int = (  # patients drawn
        300  # ~600 images: a 60-image test split, so one image moves a class AP little
    )
    images_per_patient: tuple[int, int] = (1, 3)  # films per patient, min and max
    image_size: int = 192  # px, square films
    normal_fraction: float = 0.2  # images with no lesion (negatives)
    max_lesions: int = 3  # at most this many lesions per film
    # also Atelectasis, Pneumothorax
    classes: tuple[LesionKind, ...] = ("Consolidation", "Nodule", "Mass", "Effusion")
    lesion_contrast: float = 1.5  # multiplies every lesion's density (difficulty knob)
    label_noise: float = 0.0  # fraction of boxes given a wrong class
    test_fraction: float = 0.15  # share of patients the source itself marks as its test split
    seed: int = 11  # seed of the generator (same seed, same files)

    def __post_init__(self) -> None:
        _check_common(self.n_patients, self.images_per_patient, self.image_size, self.test_fraction)
        check(self.image_size >= 64, "image_size must be >= 64 (smaller nodules vanish)")
        check(0.0 <= self.normal_fraction <= 1.0, "normal_fraction must be in [0, 1]")
        check(0.0 < self.lesion_contrast <= 3.0, "lesion_contrast must be in (0, 3]")
        check(1 <= self.max_lesions <= 6, "max_lesions must be in [1, 6]")
        check(len(self.classes) >= 1, "classes must name at least one lesion kind")
        check(len(set(self.classes)) == len(self.classes), "classes must not repeat")
        check(0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}")
        check(0.0 <= self.label_noise <= 0.5, "label_noise must be in [0, 0.5]")
        check(self.label_noise == 0.0 or len(self.classes) >= 2, "label_noise needs >= 2 classes")


@dataclass(frozen=True)
class SyntheticSegmentationConfig:
    n_patients: int = 80  # patients drawn (the default chain adds well under a minute)
    images_per_patient: tuple[int, int] = (1, 2)  # films per patient, min and max
    image_size: int = 256  # px, square films
    # images with pneumonia-like opacities inside the lungs (the mask stays the whole lungs)
    opacity_fraction: float = 0.3
    # share of patients written to a test/ folder (the real lung_masks set has none: 0 = one
    # flat folder, split by patient like the real set)
    test_fraction: float = 0.0
    seed: int = 13  # seed of the generator (same seed, same files)

    def __post_init__(self) -> None:
        _check_common(self.n_patients, self.images_per_patient, self.image_size, self.test_fraction)
        check(0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}")
        check(0.0 <= self.opacity_fraction <= 1.0, "opacity_fraction must be in [0, 1]")


# ------------------------------------------------------------------ rendering (one image)


def pose_grid(rng: np.random.Generator, size: int):
    """Small random rotation/scale/shift; lungs always stay inside the frame."""
    shift = (rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05))
    return phantom.canonical_grid(size, rng.uniform(-0.07, 0.07), rng.uniform(0.88, 1.04), shift)


def pneumonia_opacity(
    a: phantom.Anatomy, body: phantom.Body, rng: np.random.Generator, subtype: str, subtle: bool
):
    """Soft patchy opacities inside the lungs: lobar/focal (bacteria) or diffuse (virus)."""
    x, y = body.x, body.y
    amp = rng.uniform(0.08, 0.15) if subtle else rng.uniform(0.22, 0.38)
    tex = phantom.smooth_field(rng, x.shape[0], 16 if subtype == "bacteria" else 28)
    sides = [int(rng.choice([-1, 1]))]
    if rng.random() < (0.25 if subtype == "bacteria" else 0.8):
        sides.append(-sides[0])
    m = np.zeros_like(x)
    for side in sides:
        lung = body.lungs[0 if side < 0 else 1]
        if subtype == "bacteria":  # a lobe: several large overlapping blobs in one zone
            centre = phantom.lung_point(a, rng, side, (0.3, 0.9), 0.05)
            m += phantom.patch(x, y, rng, centre, (3, 7), (0.14, 0.26), 0.1) * lung
        else:  # interstitial: perihilar and basal haze with reticular texture
            hx = side * (a.lung_med + rng.uniform(0.2, 0.4) * a.lung_w)
            hy = rng.uniform(-0.05, 0.25)
            haze = phantom.blob(x, y, hx, hy, rng.uniform(0.25, 0.35), rng.uniform(0.35, 0.5))
            m += haze * lung
    retic = np.clip(np.float32(0.65) + np.float32(0.4) * tex, 0.0, 1.0)
    return np.float32(amp) * m * retic


def render_classification(
    patient_key: tuple[int, ...],
    image_key: tuple[int, ...],
    size: int,
    subtype: str | None,
    subtle: bool = False,
    draw_findings: bool = True,
) -> np.ndarray:
    """One (S, S) uint8 image. ``subtype`` None = normal, else 'bacteria' or 'virus'.

    ``draw_findings=False`` renders the identical phantom without its opacities (for tests).
    """
    anatomy = phantom.sample_anatomy(np.random.default_rng(patient_key))
    rng = np.random.default_rng(image_key)
    x, y = pose_grid(rng, size)
    body = phantom.render_body(anatomy, x, y, rng)
    dens = body.density
    if subtype is not None:
        opacity = pneumonia_opacity(anatomy, body, rng, subtype, subtle)
        if draw_findings:
            dens = dens + opacity
    return phantom.expose(dens, rng)


def render_segmentation(
    patient_key: tuple[int, ...], image_key: tuple[int, ...], size: int, subtype: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """One (S, S) uint8 film and its (S, S) bool lung mask (both lungs; the soft lung maps of
    ``phantom.render_body`` at 0.5). ``subtype`` 'bacteria' | 'virus' adds opacities inside the
    lungs, None draws clear lungs."""
    anatomy = phantom.sample_anatomy(np.random.default_rng(patient_key))
    rng = np.random.default_rng(image_key)
    x, y = pose_grid(rng, size)
    body = phantom.render_body(anatomy, x, y, rng)
    dens = body.density
    if subtype is not None:
        dens = dens + pneumonia_opacity(anatomy, body, rng, subtype, subtle=False)
    mask = (body.lungs[0] + body.lungs[1]) >= 0.5
    return phantom.expose(dens, rng), mask


def _intersection(a: list[int], b: list[int]) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def render_detection(
    patient_key: tuple[int, ...],
    image_key: tuple[int, ...],
    size: int,
    kinds: tuple[str, ...],
    draw_findings: bool = True,
    contrast: float = 1.0,
) -> tuple[np.ndarray, list[list[int]]]:
    """One (S, S) uint8 image with one lesion per entry of ``kinds`` and their tight boxes.

    Boxes are returned even with ``draw_findings=False`` (same phantom, lesions left out).
    """
    anatomy = phantom.sample_anatomy(np.random.default_rng(patient_key))
    rng = np.random.default_rng(image_key)
    x, y = pose_grid(rng, size)
    body = phantom.render_body(anatomy, x, y, rng)
    dens, boxes = body.density, []
    used_sides: set[int] = set()
    for kind in kinds:
        best = None
        for _ in range(20):  # keep boxes apart so each one shows a single finding
            side = int(rng.choice([-1, 1]))
            if kind == "Effusion" and side in used_sides and len(used_sides) < 2:
                side = -side
            m = phantom.lesion(kind, anatomy, body, rng, side)
            box = phantom.support_box(m)
            if box is None:  # cannot happen for drawn kinds; guard keeps the JSON consistent
                raise RuntimeError(f"synthetic {kind} lesion rendered empty")
            overlap = max((_intersection(box, b) for b in boxes), default=0)
            if best is None or overlap < best[0]:
                best = (overlap, m, side, box)
            if overlap == 0:
                break
        _, m, side, box = best
        boxes.append(box)
        if kind == "Effusion":
            used_sides.add(side)
        if draw_findings:
            dens = dens + np.float32(contrast) * m
    return phantom.expose(dens, rng), boxes


# ------------------------------------------------------------------ dataset plans


def _patients(rng: np.random.Generator, n: int, ipp: tuple[int, int]):
    """Distinct patient ids (Kermany-like numbers) and an image count per patient."""
    pids = 1 + rng.choice(max(4 * n, 1000), size=n, replace=False)
    counts = rng.integers(ipp[0], ipp[1] + 1, size=n)
    return pids, counts


def _pick(rng: np.random.Generator, n: int, fraction: float) -> np.ndarray:
    """Boolean mask with exactly round(fraction * n) True entries at random places."""
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[: int(round(fraction * n))]] = True
    return mask


def _write_jpeg(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path, format="JPEG", quality=95)


def _classification_job(job: tuple) -> None:
    *args, path = job
    _write_jpeg(render_classification(*args), path)


def _detection_job(job: tuple) -> list[list[int]]:
    *args, path = job
    arr, boxes = render_detection(*args)
    Image.fromarray(arr).save(path, format="PNG")
    return boxes


def _segmentation_job(job: tuple) -> None:
    *args, image_path, mask_path = job
    arr, mask = render_segmentation(*args)
    Image.fromarray(arr).save(image_path, format="PNG")
    Image.fromarray(mask.astype(np.uint8) * np.uint8(255)).save(mask_path, format="PNG")


def _run_jobs(fn: Callable[[tuple], Any], jobs: Sequence[tuple], desc: str) -> Iterator[Any]:
    """``fn`` over ``jobs`` in order, on every core (rendering is ~6 ms of numpy per image).

    Each image has its own seed, so the files do not depend on which process drew them. Spawned
    workers: forking a process that has torch's thread pool running (tests) can deadlock.
    """
    workers = min(usable_cores(), 8)
    bar = {"desc": desc, "unit": "img", "total": len(jobs)}
    if workers < 2 or len(jobs) < 100:  # a pool's start-up (~1 s) would cost more than it saves
        yield from tqdm(map(fn, jobs), **bar)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        yield from tqdm(pool.map(fn, jobs, chunksize=16), **bar)


def generate_classification(cfg: SyntheticClassificationConfig, out_dir: Path) -> Path:
    """Write the Kermany-layout set under ``out_dir/chest_xray`` and return that folder."""
    rng = np.random.default_rng([cfg.seed, CLASSIFICATION])
    n = cfg.n_patients
    pids, counts = _patients(rng, n, cfg.images_per_patient)
    sick = _pick(rng, n, cfg.pneumonia_fraction)
    virus = rng.random(n) < 1.0 / 3.0
    test = np.zeros(n, dtype=bool)
    for group in (sick, ~sick):  # test patients stratified by label
        idx = np.flatnonzero(group)
        test[idx[_pick(rng, idx.size, cfg.test_fraction)]] = True
    images = [(p, k) for p in range(n) for k in range(int(counts[p]))]
    sick_imgs = np.array([sick[p] for p, _ in images], dtype=bool)
    subtle = np.zeros(len(images), dtype=bool)
    subtle[np.flatnonzero(sick_imgs)[_pick(rng, int(sick_imgs.sum()), cfg.subtle_fraction)]] = True
    flipped = _pick(rng, len(images), cfg.label_noise)

    root = Path(out_dir) / "chest_xray"
    with atomic_dir(root) as tmp:
        for split in ("train", "test"):
            for label in ("NORMAL", "PNEUMONIA"):
                (tmp / split / label).mkdir(parents=True)
        counter = 0
        jobs = []
        for i, (p, k) in enumerate(images):
            subtype = ("virus" if virus[p] else "bacteria") if sick[p] else None
            if subtype is None:
                name = f"IM-{pids[p]:04d}-{k + 1:04d}.jpeg"
            else:
                counter += 1
                name = f"person{pids[p]}_{subtype}_{counter}.jpeg"
            label = "PNEUMONIA" if sick[p] != flipped[i] else "NORMAL"
            jobs.append(
                (
                    (cfg.seed, CLASSIFICATION, p),
                    (cfg.seed, CLASSIFICATION, p, k),
                    cfg.image_size,
                    subtype,
                    bool(subtle[i]),
                    True,
                    tmp / ("test" if test[p] else "train") / label / name,
                )
            )
        for _ in _run_jobs(_classification_job, jobs, "synthetic classification"):
            pass
    return root


def generate_detection(cfg: SyntheticDetectionConfig, out_dir: Path) -> Path:
    """Write ChestX-Det10-layout `train.json`, `test.json` and `images/` under ``out_dir``."""
    rng = np.random.default_rng([cfg.seed, DETECTION])
    n = cfg.n_patients
    pids, counts = _patients(rng, n, cfg.images_per_patient)
    test = _pick(rng, n, cfg.test_fraction)
    images = [(p, k) for p in range(n) for k in range(int(counts[p]))]
    normal = _pick(rng, len(images), cfg.normal_fraction)
    kinds: list[tuple[str, ...]] = []
    for i in range(len(images)):
        m = 0 if normal[i] else int(rng.integers(1, cfg.max_lesions + 1))
        kinds.append(tuple(rng.choice(cfg.classes, m, replace=m > len(cfg.classes)).tolist()))
    # Label noise: exactly round(label_noise * boxes) boxes get another class in the JSON only.
    syms = [list(k) for k in kinds]
    flat = [(i, j) for i, k in enumerate(kinds) for j in range(len(k))]
    for f in np.flatnonzero(_pick(rng, len(flat), cfg.label_noise)):
        i, j = flat[f]
        syms[i][j] = str(rng.choice([c for c in cfg.classes if c != kinds[i][j]]))

    out_dir = Path(out_dir)
    records: dict[str, list[dict]] = {"train": [], "test": []}
    with atomic_dir(out_dir / "images") as tmp:
        jobs = [
            (
                (cfg.seed, DETECTION, p),
                (cfg.seed, DETECTION, p, k),
                cfg.image_size,
                kinds[i],
                True,
                cfg.lesion_contrast,
                tmp / f"{i + 1:05d}.png",
            )
            for i, (p, k) in enumerate(images)
        ]
        drawn = _run_jobs(_detection_job, jobs, "synthetic detection")
        for i, ((p, _), boxes) in enumerate(zip(images, drawn, strict=True)):
            records["test" if test[p] else "train"].append(
                {
                    "file_name": f"{i + 1:05d}.png",
                    "syms": syms[i],
                    "boxes": boxes,
                    "patient_id": str(pids[p]),
                }
            )
    for split, recs in records.items():
        write_json(out_dir / f"{split}.json", recs)
    return out_dir


def generate_segmentation(cfg: SyntheticSegmentationConfig, out_dir: Path) -> Path:
    """Write the lung_masks-layout set under ``out_dir/lung_masks`` and return that folder."""
    rng = np.random.default_rng([cfg.seed, SEGMENTATION])
    n = cfg.n_patients
    pids, counts = _patients(rng, n, cfg.images_per_patient)
    test = _pick(rng, n, cfg.test_fraction)
    images = [(p, k) for p in range(n) for k in range(int(counts[p]))]
    sick = _pick(rng, len(images), cfg.opacity_fraction)
    virus = rng.random(len(images)) < 0.5
    root = Path(out_dir) / "lung_masks"
    with atomic_dir(root) as tmp:
        folders = {False: tmp, True: tmp}
        if cfg.test_fraction > 0:
            folders = {False: tmp / "train", True: tmp / "test"}
        for folder in folders.values():
            (folder / "images").mkdir(parents=True, exist_ok=True)
            (folder / "masks").mkdir(parents=True, exist_ok=True)
        jobs = []
        for i, (p, k) in enumerate(images):
            subtype = ("virus" if virus[i] else "bacteria") if sick[i] else None
            name = f"PHANTOM_{pids[p]:04d}_{k}.png"
            folder = folders[bool(test[p])]
            jobs.append(
                (
                    (cfg.seed, SEGMENTATION, p),
                    (cfg.seed, SEGMENTATION, p, k),
                    cfg.image_size,
                    subtype,
                    folder / "images" / name,
                    folder / "masks" / name,
                )
            )
        for _ in _run_jobs(_segmentation_job, jobs, "synthetic segmentation"):
            pass
    return root


__all__ = [
    "SyntheticClassificationConfig",
    "SyntheticDetectionConfig",
    "SyntheticSegmentationConfig",
    "generate_classification",
    "generate_detection",
    "generate_segmentation",
    "pose_grid",
    "render_classification",
    "render_detection",
    "render_segmentation",
]
