"""Download stage: intake of good and bad files, boxes, outputs, merging, and the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from stages import download
from stages.common.config import ConfigError, parse
from stages.common.imageio import load_gray, pixel_sha256
from stages.common.utils import StageError, run_cli
from stages.sources.config import ClassificationData, DetectionData
from stages.sources.intake import MANIFEST_COLUMNS


def img(
    path: Path, size: int = 24, value: int = 0, mode: str = "L", fmt: str | None = None
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = ((np.arange(size * size).reshape(size, size) * 7 + value) % 256).astype(np.uint8)
    im = Image.fromarray(arr)
    if mode != "L":
        im = im.convert(mode)
    im.save(path, format=fmt)
    return path


def run_cls(tmp_path: Path, **data) -> dict:
    """The stage on ``data`` (its local paths below the data root ``tmp_path``)."""
    cfg = parse(ClassificationData, {"root": str(tmp_path), **data}, "data.classification")
    return download.run(cfg, "classification", tmp_path / "raw", tmp_path / "downloads", workers=2)


def run_det(tmp_path: Path, **data) -> dict:
    cfg = parse(DetectionData, {"root": str(tmp_path), **data}, "data.detection")
    return download.run(cfg, "detection", tmp_path / "raw", tmp_path / "downloads", workers=2)


def test_bad_files_are_skipped_and_listed(tmp_path):
    root = tmp_path / "kermany/chest_xray/train"
    img(root / "NORMAL/IM-0001-0001.jpeg", mode="RGB", fmt="JPEG")
    img(root / "PNEUMONIA/person1_virus_1.png", value=3)
    (root / "NORMAL/IM-0002-0001.jpeg").write_bytes(b"")
    (root / "NORMAL/notes.txt").write_text("not an image")
    noise = np.random.default_rng(0).integers(0, 255, (128, 128), dtype=np.uint8)
    big = tmp_path / "big.jpeg"
    Image.fromarray(noise).save(big, format="JPEG")
    (root / "PNEUMONIA/person2_bacteria_2.jpeg").write_bytes(big.read_bytes()[:2000])
    Image.fromarray(noise).save(big.with_suffix(".png"))
    broken = bytearray(big.with_suffix(".png").read_bytes())
    broken[200:260] = b"x" * 60  # damaged compressed data after a valid header
    (root / "PNEUMONIA/person3_bacteria_3.png").write_bytes(bytes(broken))
    report = run_cls(tmp_path, source="kermany", path=str(tmp_path / "kermany"))
    reasons = {Path(f["path"]).name: f["reason"] for f in report["rejected"]["files"]}
    assert reasons == {
        "IM-0002-0001.jpeg": "empty_file",
        "notes.txt": "not_an_image",
        "person2_bacteria_2.jpeg": "truncated",
        "person3_bacteria_3.png": "corrupt",
    }
    by_reason = {"corrupt": 1, "empty_file": 1, "not_an_image": 1, "truncated": 1}
    assert report["rejected"]["by_reason"] == by_reason
    on_disk = json.loads((tmp_path / "raw/report.json").read_text())
    assert on_disk["rejected"]["count"] == 4
    manifest = pd.read_csv(tmp_path / "raw/manifest.csv", dtype=str, keep_default_na=False)
    assert len(manifest) == 2 and report["total_images"] == 2


def test_manifest_contract_and_pixels(tmp_path):
    root = tmp_path / "k/train"
    img(root / "NORMAL/IM-0001-0001.jpeg", mode="RGB", fmt="JPEG")
    img(root / "NORMAL/IM-0001-0002.png", value=9)  # 8-bit gray PNG: copied as is
    img(root / "PNEUMONIA/person3_bacteria_7.png", mode="RGBA", value=5)
    run_cls(tmp_path, source="kermany", path=str(tmp_path / "k"))
    text = (tmp_path / "raw/manifest.csv").read_text()
    assert text.splitlines()[0] == ",".join(MANIFEST_COLUMNS)
    m = pd.read_csv(tmp_path / "raw/manifest.csv", dtype=str, keep_default_na=False)
    assert list(m["path"]) == sorted(m["path"])
    base = (tmp_path / "raw/images/kermany/train").as_posix()
    assert list(m["path"]) == [
        f"{base}/NORMAL/IM-0001-0001.png",
        f"{base}/NORMAL/IM-0001-0002.png",
        f"{base}/PNEUMONIA/person3_bacteria_7.png",
    ]
    for row in m.itertuples():
        with Image.open(row.path) as im:
            assert (im.format, im.mode) == ("PNG", "L")
            assert (str(im.width), str(im.height)) == (row.width, row.height)
        assert pixel_sha256(load_gray(row.path)) == row.sha256
    assert list(m["patient_id"]) == ["kermany:IM-0001", "kermany:IM-0001", "kermany:person3"]
    assert list(m["subtype"]) == ["", "", "bacteria"]
    assert set(m["source_split"]) == {"train"}
    src = tmp_path / "k/train/NORMAL/IM-0001-0002.png"
    assert Path(m["path"][1]).read_bytes() == src.read_bytes()


def test_merge_sources_keeps_duplicates_and_namespaces(tmp_path):
    img(tmp_path / "k/train/NORMAL/IM-0001-0001.png", value=1)
    img(tmp_path / "c/COVID/COVID-1.png", value=1)  # same pixels as the Kermany image
    img(tmp_path / "c/COVID/COVID-2.png", value=2)
    report = run_cls(
        tmp_path,
        sources=[
            {"name": "kermany", "path": str(tmp_path / "k")},
            {"name": "covid_radiography", "path": str(tmp_path / "c"), "limit": 1},
            {"name": "covid_radiography", "path": str(tmp_path / "c")},
        ],
    )
    m = pd.read_csv(tmp_path / "raw/manifest.csv", dtype=str, keep_default_na=False)
    assert len(m) == 4 and report["duplicates"]["hashes_with_copies"] >= 1
    assert set(m["source"]) == {"kermany", "covid_radiography"}
    folders = [p.split("/images/")[1].split("/")[0] for p in m["path"]]
    assert sorted(folders) == [
        "covid_radiography",
        "covid_radiography_2",
        "covid_radiography_2",
        "kermany",
    ]
    assert m["path"].str.contains("/images/kermany/").sum() == 1
    # patient ids are namespaced by data set: both covid entries share them, kermany's differ
    by_entry = m.groupby(m["path"].str.split("/images/").str[1].str.split("/").str[0])
    ids = by_entry["patient_id"].apply(set).to_dict()
    assert ids["kermany"] == {"kermany:IM-0001"}
    assert ids["covid_radiography_2"] == {"covid_radiography:COVID-1", "covid_radiography:COVID-2"}
    assert ids["covid_radiography"] < ids["covid_radiography_2"]
    assert report["sources"][1]["left_out_by_limit"] == 1
    assert [s["origin"] for s in report["sources"]] == [
        {"kind": "folder", "path": str(tmp_path / "k")},
        {"kind": "folder", "path": str(tmp_path / "c")},
        {"kind": "folder", "path": str(tmp_path / "c")},
    ]


def test_folder_entries_are_separate_patient_namespaces(tmp_path):
    # two unrelated hospitals in the generic layout: the same file name is not the same patient
    img(tmp_path / "a/NORMAL/p01_1.png", value=1)
    img(tmp_path / "b/NORMAL/p01_1.png", value=2)
    run_cls(
        tmp_path,
        sources=[
            {"name": "folder", "path": "a", "patient_regex": "^(p\\d+)_"},
            {"name": "folder", "path": "b", "patient_regex": "^(p\\d+)_", "split": "test"},
        ],
    )
    m = pd.read_csv(tmp_path / "raw/manifest.csv", dtype=str, keep_default_na=False)
    assert list(m["patient_id"]) == ["folder:p01", "folder_2:p01"]
    assert list(m["source_split"]) == ["", "test"]


def _det(root: Path, records: list[dict], size: int = 40, split: str = "train") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{split}.json").write_text(json.dumps(records))
    for r in records:
        img(root / "images" / r["file_name"], size=size)
    return root


def test_boxes_clipped_dropped_and_coco(tmp_path):
    recs = [
        {
            "file_name": "1.png",
            "syms": ["Nodule", "Mass", "Mass", "Nodule", "Mass"],
            "boxes": [
                [2, 3, 12, 13],
                [30, 30, 60, 50],
                [5, 5, 5, 9],
                [9, 9, 4, 4],
                [50, 50, 70, 70],
            ],
        },
        {"file_name": "2.png", "syms": ["Mass"], "boxes": [[10, 10, 10, 20]]},
    ]
    report = run_det(tmp_path, source="chestxdet10", path=str(_det(tmp_path / "d", recs)))
    assert report["boxes"]["kept"] == 2
    assert report["boxes"]["clipped"] == 1
    assert report["boxes"]["dropped_degenerate"] == 3
    assert report["boxes"]["dropped_outside"] == 1
    coco = json.loads((tmp_path / "raw/annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["Mass", "Nodule"]
    assert sorted(tuple(a["bbox"]) for a in coco["annotations"]) == [
        (2.0, 3.0, 10.0, 10.0),
        (30.0, 30.0, 10.0, 10.0),  # clipped at the 40 px border
    ]
    m = pd.read_csv(tmp_path / "raw/manifest.csv", dtype=str, keep_default_na=False)
    assert list(m["label"]) == ["abnormal", "normal"]  # 2.png lost its only box
    assert [im["file_name"] for im in coco["images"]] == list(m["path"])


def test_detection_errors_leave_no_output(tmp_path):
    recs = [{"file_name": "1.png", "syms": ["Nodule"], "boxes": [[1, 1, 4, 4]]}]
    root = _det(tmp_path / "d", recs)
    (root / "test.json").write_text(
        json.dumps([{"file_name": "gone.png", "syms": [], "boxes": []}])
    )
    with pytest.raises(StageError, match=r"test\.json record #0 \(file_name 'gone\.png'\)"):
        run_det(tmp_path, source="chestxdet10", path=str(root))
    with pytest.raises(StageError, match=r"record #0.*'Nodule'.*not in the configured classes"):
        run_det(tmp_path, source="chestxdet10", path=str(root), classes=["Mass"])
    assert not (tmp_path / "raw").exists()
    report = run_det(tmp_path, source="chestxdet10", path=str(root), missing_images="skip")
    assert report["sources"][0]["missing_images"]["files"][0]["file"] == "gone.png"


def test_pneumoniamnist_offline_message(tmp_path, monkeypatch):
    # no network in tests: the default URL is swapped for a closed local port (as offline)
    url, md5 = download.DEFAULT_DOWNLOADS["pneumoniamnist"]
    assert url.startswith("https://zenodo.org/") and len(md5) == 32
    monkeypatch.setitem(
        download.DEFAULT_DOWNLOADS, "pneumoniamnist", ("http://127.0.0.1:9/p.npz", md5)
    )
    cfg = parse(ClassificationData, {"source": "pneumoniamnist"}, "data.classification")
    with pytest.raises(StageError, match=r"PneumoniaMNIST.*set data\.classification\.path") as info:
        download.run(cfg, "classification", tmp_path / "raw", tmp_path / "dl")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "raw").exists() and not list((tmp_path / "dl").iterdir())


def test_missing_local_path_message(tmp_path):
    with pytest.raises(
        StageError, match=r"data\.classification\.sources\[0\]\.path.*does not exist"
    ):
        run_cls(tmp_path, sources=[{"name": "kermany", "path": str(tmp_path / "nope")}])


def test_path_outside_root_is_one_line_error_naming_root(tmp_path):
    img(tmp_path / "k/train/NORMAL/IM-0001-0001.png")
    (tmp_path / "inputs").mkdir()
    root = str(tmp_path / "inputs")
    cases = (
        (ClassificationData, "classification", {"source": "kermany", "path": str(tmp_path / "k")}),
        (DetectionData, "detection", {"sources": [{"name": "chestxdet10", "path": "../k"}]}),
    )
    for schema, task, data in cases:
        cfg = parse(schema, {"root": root, **data}, f"data.{task}")
        with pytest.raises(StageError) as info:
            download.run(cfg, task, tmp_path / "raw", tmp_path / "dl")
        msg = str(info.value)
        param = f"data.{task}.path" if "path" in data else f"data.{task}.sources[0].path"
        assert "\n" not in msg and f"{param} = " in msg and "is outside" in msg
        assert f"data.root = {root!r}" in msg
    assert not (tmp_path / "raw").exists()
    report = run_cls(tmp_path, source="kermany", path="k")  # relative to the root
    assert report["sources"][0]["origin"] == {"kind": "folder", "path": str(tmp_path / "k")}


def _shrunk_params(params: dict, path: Path) -> Path:
    params["data"]["classification"]["synthetic"].update(
        n_patients=12, image_size=64, images_per_patient=[1, 2]
    )
    params["data"]["detection"]["synthetic"].update(
        n_patients=10, image_size=64, images_per_patient=[1, 2]
    )
    path.write_text(yaml.safe_dump(params))
    return path


def test_cli_synthetic_end_to_end(params, tmp_path, monkeypatch):
    p = _shrunk_params(params, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    for task in ("classification", "detection"):
        download.main(["--task", task, "--params", str(p)])
        m = pd.read_csv(f"data/raw/{task}/manifest.csv", dtype=str, keep_default_na=False)
        assert tuple(m.columns) == MANIFEST_COLUMNS and len(m) >= 10
        assert all(p.startswith(f"data/raw/{task}/images/synthetic/") for p in m["path"])
        assert all(Path(p).is_file() for p in m["path"])
        assert set(m["source_split"]) == {"train", "test"}
    coco = json.loads(Path("data/raw/detection/annotations.json").read_text())
    assert len(coco["categories"]) >= 4 and coco["annotations"]
    assert not list(Path("data/downloads").glob("synth-*"))  # generated data is cleaned up


def test_cli_unknown_source_exits_2(params, tmp_path, monkeypatch, capsys):
    params["data"]["classification"]["source"] = "imagenet"
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: download.main(["--task", "classification", "--params", str(p)]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "data.classification.source" in err and "'pneumoniamnist'" in err
    assert not Path("data/raw").exists()
    with pytest.raises(ConfigError):
        parse(DetectionData, {"sources": [{"name": "chestxdet10", "pth": "x"}]}, "data.detection")


def test_render_size_stores_a_source_at_n_pixels(tmp_path):
    """An external test set rendered at 28 px, as MedMNIST rendered PneumoniaMNIST: its images
    are stored at 28 x 28 (the same resize as the cache's), the train source untouched."""
    from stages.common.cache import resize_gray

    img(tmp_path / "k/train/NORMAL/IM-0001-0001.png", size=64, value=1)
    img(tmp_path / "k/train/PNEUMONIA/person1_virus_1.png", size=64, value=2)
    src = img(tmp_path / "t/NORMAL/IM-0009-0001.png", size=64, value=3)
    run_cls(
        tmp_path,
        sources=[
            {"name": "kermany", "path": "k"},
            {"name": "kermany", "path": "t", "split": "test", "render_size": 28},
        ],
    )
    m = pd.read_csv(tmp_path / "raw/manifest.csv", dtype=str, keep_default_na=False)
    test = m[m["source_split"] == "test"]
    assert len(test) == 1 and (test["width"] == "28").all() and (test["height"] == "28").all()
    assert set(m.loc[m["source_split"] != "test", "width"]) == {"64"}
    written = sorted((tmp_path / "raw").rglob("IM-0009-0001.png"))
    assert len(written) == 1
    np.testing.assert_array_equal(
        load_gray(written[0]), resize_gray(load_gray(src), 28, "stretch")[0]
    )
    with pytest.raises(ConfigError, match="render_size"):
        parse(ClassificationData, {"source": "kermany", "path": "k", "render_size": 2}, "d")


def test_a_split_test_entry_overrides_the_split_its_loader_found(tmp_path):
    """An external test set shipped as a full data set (train/val/test folders): with
    ``split: test`` every one of its images is a test image, whatever folder it came from."""
    img(tmp_path / "k/train/NORMAL/IM-0001-0001.png", value=1)
    img(tmp_path / "k/train/PNEUMONIA/person1_virus_1.png", value=2)
    for i, split in enumerate(("train", "val", "test")):
        img(tmp_path / f"ext/chest_xray/{split}/NORMAL/IM-09{i}0-0001.png", value=10 + i)
        img(tmp_path / f"ext/chest_xray/{split}/PNEUMONIA/person9{i}_virus_1.png", value=20 + i)
    run_cls(
        tmp_path,
        sources=[
            {"name": "kermany", "path": "k"},
            {"name": "kermany", "path": "ext", "split": "test"},
        ],
    )
    m = pd.read_csv(tmp_path / "raw/manifest.csv", dtype=str, keep_default_na=False)
    ext = m[m["path"].str.contains("/images/kermany_2/")]
    assert len(ext) == 6 and set(ext["source_split"]) == {"test"}
    assert set(m.loc[~m.index.isin(ext.index), "source_split"]) == {"train"}
