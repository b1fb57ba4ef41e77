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
    assert json.loads((tmp_path / "out.json").read_text()) == m


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


def download_cls(tmp_path: Path, data: dict) -> dict:
    """The download stage into ``tmp_path/raw`` (local paths below the data root ``tmp_path``)."""
    cfg = parse(ClassificationData, {"root": str(tmp_path), **data}, "data.classification")
    return download.run(cfg, "classification", tmp_path / "raw", tmp_path / "dl")


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
    download_cls(tmp_path, {"source": "kermany", "path": "src"})
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
    with pytest.raises(
        StageError, match="own test split.*sources entry with split: test.*use mode: random"
    ):
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
        {
            "root": str(tmp_path),
            "source": "chestxdet10",
            "path": "d",
            "classes": ["Nodule", "Mass"],
        },
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


def test_cli_writes_the_split_report(params, tmp_path, monkeypatch):
    fake_manifest(tmp_path / "data/raw/classification", n_patients=40)
    params["split"]["classification"]["seed"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    split.main(["--task", "classification", "--params", "params.yaml"])
    summary = json.loads(Path("reports/split/classification.json").read_text())
    assert summary["seed"] == 3 and summary["mode"] == "random"
    assert sum(summary["counts"][s]["total"] for s in SPLITS) == summary["total"]
    assert summary["patients_shared_across_splits"] == 0
    assert not Path("metrics").exists()  # the split figures are a report, not a DVC metric
    assert all(Path(f"data/split/classification/{s}.csv").is_file() for s in SPLITS)


# ------------------------------------------------------------------------- duplicate groups
def test_duplicate_groups_merges_patients_sharing_a_hash_transitively():
    df = pd.DataFrame(
        {
            "patient_id": ["a", "b", "c", "d", "a", "e", "f", "g", "g", "h"],
            "sha256": ["h1", "h1", "h2", "h3", "h2", "h4", "h5", "h5", "h6", "h6"],
        }
    )
    groups = split.duplicate_groups(df)
    # a~b share h1; a's second image equals c's (h2): a, b, c are one group. f~g (h5), g~h (h6):
    # a chain of two different patients per link is one group too. d and e stay alone.
    assert groups.tolist() == [0, 0, 0, 1, 0, 2, 3, 3, 3, 3]
    two = pd.DataFrame({"patient_id": ["p1", "p2"], "sha256": ["same", "same"]})
    assert split.duplicate_groups(two).tolist() == [0, 0]
    apart = pd.DataFrame({"patient_id": ["p1", "p2"], "sha256": ["x", "y"]})
    assert split.duplicate_groups(apart).tolist() == [0, 1]


def test_random_split_never_separates_patients_sharing_an_image():
    rows = []
    for p in range(120):
        for k in range(2):
            rows.append(
                {
                    "path": f"x/p{p:03d}_{k}.png",
                    "label": "NORMAL" if p % 3 == 0 else "PNEUMONIA",
                    "patient_id": f"x:p{p}",
                    "source_split": "",
                    "sha256": f"h{p}_{k}",
                }
            )
    df = pd.DataFrame(rows)
    # ten pairs of one-image patients sharing that image: each pair is a group of two images, as
    # large as every other patient, so the seed moves the pairs across the splits
    links = [(p, p + 60) for p in range(0, 30, 3)]
    linked = [f"x:p{q}" for pair in links for q in pair]
    df = df[~(df["patient_id"].isin(linked) & df["path"].str.endswith("_1.png"))].copy()
    for a, b in links:
        df.loc[df["patient_id"] == f"x:p{b}", "sha256"] = f"h{a}_0"
    splits_seen = set()
    for seed in range(6):
        out = df.assign(split=split.split_random(df, SplitConfig(seed=seed))[0])
        for a, b in links:
            both = out[out["patient_id"].isin([f"x:p{a}", f"x:p{b}"])]
            assert both["split"].nunique() == 1, (seed, a, b, both)
            splits_seen.add(both["split"].iloc[0])
        assert out.groupby("sha256")["split"].nunique().max() == 1
    assert len(splits_seen) > 1  # the pairs do move between splits with the seed


# ----------------------------------------------------------------- external test source
def _external_test_tree(root: Path) -> dict[str, list[str]]:
    """A Kermany train folder (patients 0-14) and a second Kermany folder of test images
    (patients 5000-5002), with three planted leaks into train; returns the planted names."""
    for i in range(30):
        pid = i // 2
        if i % 3:
            _png(root / f"hosp/train/PNEUMONIA/person{pid}_bacteria_{i}.png", i)
        else:
            _png(root / f"hosp/train/NORMAL/IM-{pid:04d}-{i:04d}.png", i)
    for j in range(6):
        pid = 5000 + j // 2
        _png(root / f"ext/NORMAL/IM-{pid:04d}-{j:04d}.png", 100 + j)
    # the pixels of the test image IM-5000-0000 under another patient id (person7000) ...
    _png(root / "hosp/train/PNEUMONIA/person7000_bacteria_900.png", 100)
    # ... and that patient's other image (different pixels): linked to the test patient
    _png(root / "hosp/train/PNEUMONIA/person7000_bacteria_901.png", 200)
    # a train image of patient IM-5001, who is in the test entry
    _png(root / "hosp/train/NORMAL/IM-5001-0950.png", 201)
    return {
        "same_pixels": ["person7000_bacteria_900"],
        "linked": ["person7000_bacteria_901"],
        "same_patient": ["IM-5001-0950"],
    }


def test_official_external_test_source_is_the_test_split_and_leaks_are_dropped(tmp_path):
    planted = _external_test_tree(tmp_path)
    sources = [
        {"name": "kermany", "path": "hosp"},
        {"name": "kermany", "path": "ext", "split": "test"},
    ]
    report = download_cls(tmp_path, {"sources": sources})
    assert [s["split"] for s in report["sources"]] == ["the source's own", "test"]
    m = run(SplitConfig(mode="official"), tmp_path)
    test = pd.read_csv(tmp_path / "out/test.csv", dtype=str, keep_default_na=False)
    ext_dir = tmp_path / "ext"
    ext = sorted(p.relative_to(ext_dir).with_suffix("").as_posix() for p in ext_dir.rglob("*.png"))
    assert sorted(p.split("/images/kermany_2/")[1][:-4] for p in test["path"]) == ext
    assert set(test["patient_id"]) == {"kermany:IM-5000", "kermany:IM-5001", "kermany:IM-5002"}
    train_val = read_splits(tmp_path / "out").query("split != 'test'")
    assert all("/images/kermany/" in p for p in train_val["path"])
    names = {Path(p).stem for p in train_val["path"]}
    for kind, stems in planted.items():
        assert not names & set(stems), f"{kind} leak kept in train/val: {stems}"
    assert len(train_val) == 30
    assert m["dropped_overlapping_test"] == 3
    assert m["dropped_overlapping_test_by"] == {"same_patient": 1, "same_pixels": 1, "linked": 1}
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["dropped_overlapping_test"] == 3 and report["counts"]["test"]["total"] == 6
    assert report["patients_shared_across_splits"] == 0
    assert report["duplicate_hashes_shared_across_splits"] == 0


def test_official_real_kermany_with_public_test_half(shared_data, tmp_path):
    cfg = parse(
        ClassificationData,
        {
            "root": str(shared_data),
            "sources": [
                {"name": "kermany", "path": "kermany224", "limit": 240},
                {"name": "kermany", "path": "kermany_test_public", "split": "test", "limit": 40},
            ],
        },
        "data.classification",
    )
    report = download.run(cfg, "classification", tmp_path / "raw", tmp_path / "dl")
    assert [s["written"] for s in report["sources"]] == [240, 40]
    assert report["sources"][1]["origin"] == {
        "kind": "folder",
        "path": str(shared_data / "kermany_test_public"),
    }
    m = run(SplitConfig(mode="official"), tmp_path)
    test = pd.read_csv(tmp_path / "out/test.csv", dtype=str, keep_default_na=False)
    assert len(test) == 40 and all("/images/kermany_2/" in p for p in test["path"])
    assert set(test["label"]) == {"NORMAL", "PNEUMONIA"}
    assert (
        m["counts"]["train"]["total"] + m["counts"]["val"]["total"]
        == 240 - m["dropped_overlapping_test"]
    )
    assert m["patients_shared_across_splits"] == 0 and m["counts"]["val"]["total"] > 0


def test_random_keeps_an_external_test_source_as_test_and_drops_its_leaks(tmp_path, caplog):
    planted = _external_test_tree(tmp_path)
    sources = [
        {"name": "kermany", "path": "hosp"},
        {"name": "kermany", "path": "ext", "split": "test"},
    ]
    download_cls(tmp_path, {"sources": sources})
    with caplog.at_level("INFO", logger="stages.split"):
        m = run(SplitConfig(mode="random"), tmp_path)
    out = read_splits(tmp_path / "out")
    ext = out[out["path"].str.contains("/images/kermany_2/")]
    assert len(ext) == 6 and set(ext["split"]) == {"test"}  # every external image stays test
    names = {Path(p).stem for p in out["path"]}
    for kind, stems in planted.items():
        assert not names & set(stems), f"{kind} leak kept: {stems}"
    assert m["dropped_overlapping_test"] == 3
    assert m["dropped_overlapping_test_by"] == {"same_patient": 1, "same_pixels": 1, "linked": 1}
    hosp = out[~out["path"].str.contains("/images/kermany_2/")]
    assert len(hosp) == 30 and set(hosp["split"]) == {"train", "val", "test"}  # split by ratios
    assert m["patients_shared_across_splits"] == 0
    assert m["duplicate_hashes_shared_across_splits"] == 0
    lines = [r.getMessage() for r in caplog.records if "split: test" in r.getMessage()]
    assert len(lines) == 1 and "6 images" in lines[0] and "3 other images" in lines[0]


def test_random_still_re_splits_a_source_s_own_test_folder(tmp_path):
    _kermany(tmp_path / "src/chest_xray", n_train=60, n_test=30)
    download_cls(tmp_path, {"source": "kermany", "path": "src"})
    m = run(SplitConfig(mode="random"), tmp_path)
    out = read_splits(tmp_path / "out")
    own_test = out[out["source_split"] == "test"]
    assert len(own_test) == 30 and set(own_test["split"]) != {"test"}
    assert "dropped_overlapping_test" not in m


@pytest.mark.parametrize("ratios", [(0.8, 0.1, 0.1), (0.6, 0.3, 0.1)])
def test_official_carves_val_by_the_train_val_ratios(tmp_path, ratios):
    """No usable source val: val is carved from the pool by train/val (test's share is the
    source's own test split, not a ratio)."""
    df = fake_manifest(tmp_path / "raw")
    df.loc[df["patient_id"].isin([f"x:p{p}" for p in range(200, 240)]), "source_split"] = "test"
    df.to_csv(tmp_path / "raw/manifest.csv", index=False)
    m = run(SplitConfig(mode="official", ratios=ratios), tmp_path)
    assert m["val"].startswith("carved")
    pool = m["counts"]["train"]["total"] + m["counts"]["val"]["total"]
    want = pool * ratios[1] / (ratios[0] + ratios[1])
    assert abs(m["counts"]["val"]["total"] - want) <= 8, (m["counts"], want)
