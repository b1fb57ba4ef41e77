"""Split stage: grouped stratified ratios, no leaks, determinism, official mode, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from stages import download, split
from stages.common.config import ConfigError, parse
from stages.common.paths import SPLITS
from stages.common.utils import StageError
from stages.sources.config import ClassificationData, DetectionData
from stages.sources.intake import MANIFEST_COLUMNS
from stages.split import SplitConfig


def fake_manifest(path: Path, n_patients: int = 300, seed: int = 0) -> pd.DataFrame:
    """Patients with 1-6 images, 30 % NORMAL, plus exact duplicates across patients."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = "NORMAL" if rng.random() < 0.3 else "PNEUMONIA"
        for k in range(int(rng.integers(1, 7))):
            rows.append(
                {
                    "path": f"data/raw/classification/images/x/p{p:04d}_{k}.png",
                    "label": label,
                    "subtype": "",
                    "patient_id": f"x:p{p}",
                    "source": "x",
                    "source_split": "",
                    "width": 8,
                    "height": 8,
                    "sha256": f"h{p}_{k}",
                }
            )
    df = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    for a, b in [(3, 50), (50, 90), (7, 8)]:  # chain: p3 ~ p50 ~ p90 share images
        if b >= n_patients:
            continue
        df.loc[df["patient_id"] == f"x:p{b}", "sha256"] = df.loc[
            df["patient_id"] == f"x:p{a}", "sha256"
        ].iloc[0]
    path.mkdir(parents=True, exist_ok=True)
    df.to_csv(path / "manifest.csv", index=False)
    return df


def run(cfg: SplitConfig, tmp_path: Path, name: str = "out", task: str = "classification"):
    return split.run(cfg, task, tmp_path / "raw", tmp_path / name, tmp_path / f"{name}.json")


def read_splits(out: Path) -> pd.DataFrame:
    return pd.concat(
        [pd.read_csv(out / f"{s}.csv", dtype=str, keep_default_na=False) for s in SPLITS]
    )


def test_random_ratios_groups_and_no_leaks(tmp_path):
    df = fake_manifest(tmp_path / "raw")
    m = run(SplitConfig(), tmp_path)
    out = read_splits(tmp_path / "out")
    assert len(out) == len(df) == m["total"]
    assert out.groupby("patient_id")["split"].nunique().max() == 1
    assert out.groupby("sha256")["split"].nunique().max() == 1
    chained = out[out["patient_id"].isin(["x:p3", "x:p50", "x:p90"])]
    assert chained["split"].nunique() == 1  # duplicates merge their patients transitively
    assert m["patients_shared_across_splits"] == 0
    assert m["duplicate_hashes_shared_across_splits"] == 0
    for label in ("NORMAL", "PNEUMONIA"):
        total = (df["label"] == label).sum()
        for s, ratio in zip(SPLITS, (0.8, 0.1, 0.1), strict=True):
            got = m["counts"][s][label]
            assert abs(got - ratio * total) <= 6, (s, label, got, ratio * total)
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["counts"] == m["counts"]


def test_random_is_deterministic_and_seeded(tmp_path):
    fake_manifest(tmp_path / "raw")
    run(SplitConfig(seed=1), tmp_path, "a")
    run(SplitConfig(seed=1), tmp_path, "b")
    run(SplitConfig(seed=2), tmp_path, "c")
    for s in SPLITS:
        a = (tmp_path / "a" / f"{s}.csv").read_bytes()
        assert a == (tmp_path / "b" / f"{s}.csv").read_bytes()
    assert (tmp_path / "a/test.csv").read_bytes() != (tmp_path / "c/test.csv").read_bytes()
    header = (tmp_path / "a/train.csv").read_text().splitlines()[0]
    assert header == ",".join((*MANIFEST_COLUMNS, "split"))


def test_assign_groups_respects_zero_ratio():
    labels = pd.Series(["a", "b"] * 20)
    groups = np.arange(40)
    idx = split.assign_groups(labels, groups, (0.5, 0.0, 0.5), seed=0)
    assert set(idx) == {0, 2} and abs((idx == 0).sum() - 20) <= 1


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = ((np.arange(256).reshape(16, 16) + value * 37) % 256).astype(np.uint8)
    Image.fromarray(arr).save(path)


def _kermany(root: Path, n_train: int = 60, n_test: int = 8, n_val: int = 2) -> None:
    v = 0
    for split_name, n in (("train", n_train), ("test", n_test), ("val", n_val)):
        for i in range(n):
            v += 1
            pid = 1000 * ("train", "test", "val").index(split_name) + i // 2
            if i % 3:
                _png(root / f"{split_name}/PNEUMONIA/person{pid}_bacteria_{v}.png", v)
            else:
                _png(root / f"{split_name}/NORMAL/IM-{pid:04d}-{v:04d}.png", v)


def test_official_keeps_test_folder_exactly(tmp_path):
    _kermany(tmp_path / "src/chest_xray")
    _png(tmp_path / "src/chest_xray/train/NORMAL/IM-1000-9999.png", 999)  # patient of test
    cfg = parse(ClassificationData, {"source": "kermany", "path": str(tmp_path / "src")}, "d")
    download.run(cfg, "classification", tmp_path / "raw", tmp_path / "dl")
    m = run(SplitConfig(mode="official"), tmp_path)
    test = pd.read_csv(tmp_path / "out/test.csv", dtype=str, keep_default_na=False)
    expected = sorted(
        p.with_suffix("").name for p in (tmp_path / "src/chest_xray/test").rglob("*.png")
    )
    assert sorted(Path(p).stem for p in test["path"]) == expected
    assert set(test["source_split"]) == {"test"}
    assert m["dropped_overlapping_test"] == 1
    assert m["val"].startswith("carved")  # 2 val images < 5 % of train: carved, val joins train
    train_val = pd.concat(
        pd.read_csv(tmp_path / f"out/{s}.csv", dtype=str, keep_default_na=False)
        for s in ("train", "val")
    )
    assert len(train_val) == 60 + 2 and (train_val["source_split"] == "val").sum() == 2
    assert m["counts"]["val"]["total"] > 0
    kept = run(SplitConfig(mode="official", min_val_fraction=0.01), tmp_path, "kept")
    assert kept["val"] == "source val kept" and kept["counts"]["val"]["total"] == 2


def test_official_without_test_source_is_clear_error(tmp_path):
    fake_manifest(tmp_path / "raw", n_patients=10)
    with pytest.raises(StageError, match="own test split.*use mode: random"):
        run(SplitConfig(mode="official"), tmp_path)
    assert not (tmp_path / "out").exists()


def test_empty_train_and_bad_params(tmp_path):
    with pytest.raises(StageError, match="manifest.csv not found"):
        run(SplitConfig(), tmp_path)
    df = fake_manifest(tmp_path / "raw", n_patients=3)
    df["source_split"] = "test"
    df.to_csv(tmp_path / "raw/manifest.csv", index=False)
    with pytest.raises(StageError, match="train split is empty"):
        run(SplitConfig(mode="official"), tmp_path)
    with pytest.raises(ConfigError, match="ratios: must sum to 1"):
        parse(SplitConfig, {"ratios": [0.8, 0.1, 0.2]}, "split.classification")
    with pytest.raises(ConfigError, match="'random' \\| 'official'"):
        parse(SplitConfig, {"mode": "kfold"}, "split.classification")


def test_detection_coco_subsets(tmp_path):
    root = tmp_path / "d"
    records = {
        s: [
            {
                "file_name": f"{s}{i}.png",
                "syms": ["Nodule"] * (i % 2),
                "boxes": [[1, 1, 6, 6]] * (i % 2),
            }
            for i in range(12)
        ]
        for s in ("train", "test")
    }
    for s, recs in records.items():
        (root).mkdir(exist_ok=True)
        (root / f"{s}.json").write_text(json.dumps(recs))
        for i, r in enumerate(recs):
            _png(root / "images" / r["file_name"], i + (100 if s == "test" else 0))
    cfg = parse(
        DetectionData,
        {"source": "chestxdet10", "path": str(root), "classes": ["Nodule", "Mass"]},
        "d",
    )
    download.run(cfg, "detection", tmp_path / "raw", tmp_path / "dl")
    m = run(SplitConfig(mode="official"), tmp_path, task="detection")
    total_boxes = 0
    for s in SPLITS:
        coco = json.loads((tmp_path / f"out/{s}.json").read_text())
        csv = pd.read_csv(tmp_path / f"out/{s}.csv", dtype=str, keep_default_na=False)
        assert [c["name"] for c in coco["categories"]] == ["Nodule", "Mass"]
        assert [im["file_name"] for im in coco["images"]] == list(csv["path"])
        assert [im["id"] for im in coco["images"]] == list(range(1, len(csv) + 1))
        assert m["boxes"][s]["Nodule"] == len(coco["annotations"])
        total_boxes += len(coco["annotations"])
    assert total_boxes == 12 and m["boxes"]["test"] == {"Nodule": 6, "Mass": 0}


def test_cli_writes_metrics(params, tmp_path, monkeypatch):
    fake_manifest(tmp_path / "data/raw/classification", n_patients=40)
    params["split"]["classification"]["seed"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    split.main(["--task", "classification", "--params", "params.yaml"])
    metrics = json.loads(Path("metrics/split_classification.json").read_text())
    assert metrics["seed"] == 3 and metrics["patients_shared_across_splits"] == 0
    assert all(Path(f"data/split/classification/{s}.csv").is_file() for s in SPLITS)
