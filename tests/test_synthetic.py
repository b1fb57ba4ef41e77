"""Tests of the synthetic phantom source (stages/sources/synthetic.py) on tiny configs."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.common.config import ConfigError, parse
from stages.sources import phantom
from stages.sources.synthetic import (
    SyntheticClassificationConfig,
    SyntheticDetectionConfig,
    generate_classification,
    generate_detection,
    pose_grid,
    render_classification,
    render_detection,
)

PNEUMONIA_RE = re.compile(r"^person(\d+)_(bacteria|virus)_(\d+)\.jpeg$")
NORMAL_RE = re.compile(r"^IM-(\d{4,})-(\d{4})\.jpeg$")
CLS = SyntheticClassificationConfig(n_patients=6, images_per_patient=(1, 3), image_size=64, seed=3)
DET = SyntheticDetectionConfig(n_patients=6, images_per_patient=(1, 3), image_size=96, seed=5)


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _patient_of(name: str) -> str:
    m = PNEUMONIA_RE.match(name) or NORMAL_RE.match(name)
    assert m, f"file name {name!r} does not follow the Kermany patterns"
    return m.group(1).lstrip("0")


def _cls_files(root: Path) -> list[tuple[str, str, str]]:
    """(split, label, file name) of every image under chest_xray/."""
    return [(p.parts[-3], p.parts[-2], p.name) for p in sorted(root.rglob("*.jpeg"))]


def test_config_parses_params_and_rejects_bad_values(params):
    section = params["data"]["classification"]["synthetic"]
    assert isinstance(parse(SyntheticClassificationConfig, section), SyntheticClassificationConfig)
    assert isinstance(
        parse(SyntheticDetectionConfig, params["data"]["detection"]["synthetic"]),
        SyntheticDetectionConfig,
    )
    with pytest.raises(ConfigError, match="pneumonia_fraction"):
        parse(SyntheticClassificationConfig, {"pneumonia_fraction": 1.5})
    with pytest.raises(ConfigError, match="images_per_patient"):
        parse(SyntheticClassificationConfig, {"images_per_patient": [3, 1]})
    with pytest.raises(ConfigError, match="classes"):
        parse(SyntheticDetectionConfig, {"classes": ["Nodule", "Fracture"]})


def test_classification_is_deterministic(tmp_path):
    a = _digest(generate_classification(CLS, tmp_path / "a"))
    b = _digest(generate_classification(CLS, tmp_path / "b"))
    c = _digest(generate_classification(replace(CLS, seed=4), tmp_path / "c"))
    assert a == b and len(a) >= 6
    assert a != c


def test_classification_layout_names_and_patients(tmp_path):
    cfg = replace(CLS, n_patients=20, test_fraction=0.25)
    root = generate_classification(cfg, tmp_path)
    assert root == tmp_path / "chest_xray"
    files = _cls_files(root)
    assert {(s, lab) for s, lab, _ in files} <= {
        (s, lab) for s in ("train", "test") for lab in ("NORMAL", "PNEUMONIA")
    }
    by_patient: dict[str, set[tuple[str, str]]] = defaultdict(set)
    subtypes = Counter()
    for split, label, name in files:
        regex = PNEUMONIA_RE if label == "PNEUMONIA" else NORMAL_RE
        m = regex.match(name)
        assert m, f"{label}/{name} does not follow Kermany naming"
        if label == "PNEUMONIA":
            subtypes[m.group(2)] += 1
        by_patient[_patient_of(name)].add((split, label))
    assert all(len(v) == 1 for v in by_patient.values()), "a patient spans folders"
    assert len(by_patient) == 20
    assert {s for s, _, _ in files} == {"train", "test"}
    with Image.open(root / files[0][0] / files[0][1] / files[0][2]) as im:
        assert im.mode == "L" and im.size == (64, 64) and im.format == "JPEG"


def test_label_noise_flips_exact_count(tmp_path):
    cfg = replace(CLS, n_patients=20, label_noise=0.2)
    files = _cls_files(generate_classification(cfg, tmp_path))
    flipped = sum(
        (label == "PNEUMONIA") != bool(PNEUMONIA_RE.match(name)) for _, label, name in files
    )
    assert flipped == round(0.2 * len(files))


def test_pneumonia_opacities_brighten_the_lungs():
    """Same phantom and pose with and without its opacities: only the lungs get brighter."""
    size = 96
    for i, subtype in enumerate(["bacteria", "virus", "bacteria", "virus"]):
        pkey, ikey = (1, 1, i), (1, 1, i, 0)
        sick = render_classification(pkey, ikey, size, subtype).astype(float)
        same_pose = render_classification(pkey, ikey, size, subtype, draw_findings=False)
        diff = sick - same_pose
        anatomy = phantom.sample_anatomy(np.random.default_rng(pkey))
        x, y = pose_grid(np.random.default_rng(ikey), size)
        depth = np.maximum(*(phantom.lung_geometry(anatomy, x, y, s)[0] for s in (-1, 1)))
        assert diff[depth > 0.02].mean() > 1.0, f"{subtype}: opacities barely change the lungs"
        # +-1 grey level is uint8 rounding of the smooth body; anything more is a drawn opacity
        assert not (np.abs(diff[depth < -0.04]) > 1).any(), "opacities drawn outside the lungs"
        subtle = render_classification(pkey, ikey, size, subtype, subtle=True).astype(float)
        assert 0 < (subtle - same_pose).mean() < diff.mean()


def test_detection_json_structure_and_boxes(tmp_path):
    cfg = replace(DET, n_patients=12, normal_fraction=0.3)
    out = generate_detection(cfg, tmp_path)
    seen = Counter()
    names = []
    for split in ("train", "test"):
        records = json.loads((out / f"{split}.json").read_text())
        assert isinstance(records, list)
        for rec in records:
            assert set(rec) == {"file_name", "syms", "boxes", "patient_id"}
            assert re.fullmatch(r"\d+\.png", rec["file_name"])
            assert len(rec["syms"]) == len(rec["boxes"]) <= cfg.max_lesions
            for sym, box in zip(rec["syms"], rec["boxes"], strict=True):
                assert sym in cfg.classes
                assert all(isinstance(v, int) for v in box)
                x1, y1, x2, y2 = box
                assert 0 <= x1 < x2 <= cfg.image_size and 0 <= y1 < y2 <= cfg.image_size
                seen[sym] += 1
            with Image.open(out / "images" / rec["file_name"]) as im:
                assert im.mode == "L" and im.size == (cfg.image_size, cfg.image_size)
            names.append(rec["file_name"])
    assert len(names) == len(set(names)) == len(list((out / "images").iterdir()))
    assert len(seen) >= 4, f"too few classes appear: {seen}"
    n_normal = sum(
        not r["boxes"]
        for s in ("train", "test")
        for r in json.loads((out / f"{s}.json").read_text())
    )
    assert n_normal == round(0.3 * len(names))


def test_detection_deterministic_and_patients_in_one_split(tmp_path):
    a = generate_detection(DET, tmp_path / "a")
    b = generate_detection(DET, tmp_path / "b")
    assert _digest(a) == _digest(b)
    c = generate_detection(replace(DET, seed=6), tmp_path / "c")
    assert _digest(a) != _digest(c)
    splits = {
        s: {r["patient_id"] for r in json.loads((a / f"{s}.json").read_text())}
        for s in ("train", "test")
    }
    assert not splits["train"] & splits["test"]


@pytest.mark.parametrize(
    "kind", ["Consolidation", "Nodule", "Mass", "Effusion", "Atelectasis", "Pneumothorax"]
)
def test_detection_boxes_are_tight(kind):
    """The lesion changes pixels only inside its box, and reaches (nearly) every box edge."""
    size = 128
    for i in range(3):
        key = (9, 2, i)
        with_l, boxes = render_detection(key, (*key, 0), size, (kind,))
        without, boxes2 = render_detection(key, (*key, 0), size, (kind,), draw_findings=False)
        assert boxes == boxes2
        ((x1, y1, x2, y2),) = boxes
        diff = np.abs(with_l.astype(int) - without.astype(int)) > 1  # beyond uint8 rounding
        inside = np.zeros_like(diff)
        inside[y1:y2, x1:x2] = True
        assert not (diff & ~inside).any(), "pixels changed outside the box"
        rows, cols = np.flatnonzero(diff.any(1)), np.flatnonzero(diff.any(0))
        assert rows.size, "lesion invisible"
        seen = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
        slack = max(2, (x2 - x1) // 8)
        assert abs(seen[0] - x1) <= slack and abs(seen[2] - x2) <= slack, (seen, boxes)
        slack = max(2, (y2 - y1) // 8)
        assert abs(seen[1] - y1) <= slack and abs(seen[3] - y2) <= slack, (seen, boxes)


def test_detection_label_noise_changes_exact_count(tmp_path):
    clean = generate_detection(replace(DET, n_patients=12), tmp_path / "clean")
    noisy = generate_detection(replace(DET, n_patients=12, label_noise=0.25), tmp_path / "noisy")
    changed = total = 0
    for split in ("train", "test"):
        a = json.loads((clean / f"{split}.json").read_text())
        b = json.loads((noisy / f"{split}.json").read_text())
        for ra, rb in zip(a, b, strict=True):
            assert ra["boxes"] == rb["boxes"]
            changed += sum(sa != sb for sa, sb in zip(ra["syms"], rb["syms"], strict=True))
            total += len(ra["syms"])
    assert changed == round(0.25 * total) > 0
    assert _digest(clean / "images") == _digest(noisy / "images")


def test_lesion_contrast_scales_lesions_not_boxes():
    key = (4, 2, 0)
    base, _ = render_detection(key, (*key, 0), 96, ("Mass",), draw_findings=False)
    weak, box_w = render_detection(key, (*key, 0), 96, ("Mass",), contrast=0.5)
    strong, box_s = render_detection(key, (*key, 0), 96, ("Mass",), contrast=2.0)
    assert box_w == box_s
    x1, y1, x2, y2 = box_w[0]
    gain = [np.abs(im.astype(int) - base)[y1:y2, x1:x2].mean() for im in (weak, strong)]
    assert 0 < gain[0] < gain[1]


def test_files_do_not_depend_on_the_process_pool(tmp_path, monkeypatch):
    """Enough images for the pool (>= 100): rendered on 2 spawned workers they are byte-identical
    to the one-process run, in order (detection boxes land in the right record)."""
    import stages.sources.synthetic as synthetic

    cls = replace(CLS, n_patients=60, images_per_patient=(2, 2), image_size=48)
    det = replace(DET, n_patients=60, images_per_patient=(2, 2), image_size=64)
    pools = []
    real_pool = synthetic.ProcessPoolExecutor
    monkeypatch.setattr(
        synthetic, "ProcessPoolExecutor", lambda *a, **k: pools.append(1) or real_pool(*a, **k)
    )
    monkeypatch.setattr(synthetic, "usable_cores", lambda: 2)
    pooled = (_digest(generate_classification(cls, tmp_path / "pc")),)
    pooled += (_digest(generate_detection(det, tmp_path / "pd")),)
    assert len(pools) == 2  # both generators went through the pool
    monkeypatch.setattr(synthetic, "usable_cores", lambda: 1)
    single = (_digest(generate_classification(cls, tmp_path / "sc")),)
    single += (_digest(generate_detection(det, tmp_path / "sd")),)
    assert len(pools) == 2 and len(single[0]) == 120
    assert pooled == single
