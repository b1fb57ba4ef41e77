"""Source loaders: file-name parsing, layouts, options, and the real files in ../shared/data."""

from __future__ import annotations

import json
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.common.config import ConfigError, parse
from stages.common.utils import StageError
from stages.sources.base import Context, Notes
from stages.sources.classification import covid_radiography, folder, kermany, pneumoniamnist
from stages.sources.config import (
    ClassificationData,
    ClassificationSource,
    DetectionData,
    DetectionSource,
)
from stages.sources.detection import chestxdet10, nih_bbox


def ctx(tmp_path: Path, key: str, prefix: str | None = None) -> Context:
    return Context(key=key, patient_prefix=prefix or key, work_dir=tmp_path / "work", notes=Notes())


def img(path: Path, size: int = 16, value: int = 0, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (np.arange(size * size).reshape(size, size) + value) % 256
    im = Image.fromarray(arr.astype(np.uint8))
    (im.convert(mode) if mode != "L" else im).save(path)
    return path


# ----------------------------------------------------------------------------- Kermany names
@pytest.mark.parametrize(
    ("name", "patient", "subtype"),
    [
        ("person63_bacteria_306.jpeg", "person63", "bacteria"),
        ("person1_virus_1_2.jpeg", "person1", "virus"),
        ("person447_virus_921_1.jpeg", "person447", "virus"),
        ("PERSON12_Bacteria_3.JPEG", "person12", "bacteria"),
        ("IM-0001-0001.jpeg", "IM-0001", ""),
        ("IM-0429-0001-0002.jpeg", "IM-0429", ""),
        ("NORMAL2-IM-0588-0001.jpeg", "NORMAL2-IM-0588", ""),
        ("NORMAL2-IM-1096-0001-0003.jpeg", "NORMAL2-IM-1096", ""),
        ("scan.jpeg", None, ""),
        ("IM-0001.jpeg", None, ""),
    ],
)
def test_kermany_parse_name(name, patient, subtype):
    assert kermany.parse_name(name) == (patient, subtype)


def _kermany_tree(root: Path) -> None:
    img(root / "chest_xray/train/NORMAL/IM-0001-0001.jpeg", value=1)
    img(root / "chest_xray/train/PNEUMONIA/person1_bacteria_1.jpeg", value=2)
    img(root / "chest_xray/train/PNEUMONIA/person1_virus_2.jpeg", value=3)
    img(root / "chest_xray/test/normal/NORMAL2-IM-0002-0001.jpeg", value=4)
    img(root / "chest_xray/val/Pneumonia/odd name.jpeg", value=5)
    # Kaggle's nested duplicate and macOS junk must not be counted
    img(root / "chest_xray/chest_xray/train/NORMAL/IM-0001-0001.jpeg", value=1)
    img(root / "chest_xray/__MACOSX/train/NORMAL/._IM-0001-0001.jpeg", value=1)
    img(root / "chest_xray/train/NORMAL/__MACOSX/x.jpeg", value=1)


def test_kermany_layout_nested_and_junk(tmp_path):
    _kermany_tree(tmp_path / "src")
    c = ctx(tmp_path, "kermany")
    src = ClassificationSource("kermany")
    recs = kermany.load(tmp_path / "src", src, c)
    got = {(r.rel, r.label, r.subtype, r.patient_id, r.source_split) for r in recs}
    assert got == {
        ("train/NORMAL/IM-0001-0001.jpeg", "NORMAL", "", "kermany:IM-0001", "train"),
        (
            "train/PNEUMONIA/person1_bacteria_1.jpeg",
            "PNEUMONIA",
            "bacteria",
            "kermany:person1",
            "train",
        ),
        ("train/PNEUMONIA/person1_virus_2.jpeg", "PNEUMONIA", "virus", "kermany:person1", "train"),
        ("test/normal/NORMAL2-IM-0002-0001.jpeg", "NORMAL", "", "kermany:NORMAL2-IM-0002", "test"),
        ("val/Pneumonia/odd name.jpeg", "PNEUMONIA", "", "kermany:val/Pneumonia/odd name", "val"),
    }
    assert c.notes.unparsed_names == ["val/Pneumonia/odd name.jpeg"]
    assert any("__MACOSX" in p for p in c.notes.ignored)


def test_kermany_subtype_classes(tmp_path):
    _kermany_tree(tmp_path / "src")
    src = ClassificationSource(
        "kermany", classes={"NORMAL": "NORMAL", "bacteria": "BACTERIA", "VIRUS": "VIRUS"}
    )
    c = ctx(tmp_path, "kermany")
    labels = Counter(r.label for r in kermany.load(tmp_path / "src", src, c))
    assert labels == {"NORMAL": 2, "BACTERIA": 1, "VIRUS": 1}
    assert c.notes.not_selected == {"PNEUMONIA": 1}  # the unparsed name has no subtype


def test_kermany_no_layout_is_clear_error(tmp_path):
    img(tmp_path / "x" / "a.png")
    with pytest.raises(StageError, match="no Kermany layout"):
        kermany.load(tmp_path, ClassificationSource("kermany"), ctx(tmp_path, "kermany"))


def test_kermany_real_train_counts(shared_data, tmp_path):
    recs = kermany.load(
        shared_data / "kermany224", ClassificationSource("kermany"), ctx(tmp_path, "kermany")
    )
    assert Counter(r.label for r in recs) == {"NORMAL": 1341, "PNEUMONIA": 3875}
    assert Counter(r.subtype for r in recs if r.label == "PNEUMONIA") == {
        "bacteria": 2530,
        "virus": 1345,
    }
    assert {r.source_split for r in recs} == {"train"}
    assert all(r.patient_id.startswith("kermany:") for r in recs)
    assert len({r.patient_id for r in recs}) < len(recs)  # several images per patient


# ----------------------------------------------------------------------------- PneumoniaMNIST
def test_pneumoniamnist_real(shared_data, tmp_path):
    path = shared_data / "pneumoniamnist" / "pneumoniamnist_trainval.npz"
    c = ctx(tmp_path, "pneumoniamnist")
    recs = pneumoniamnist.load(path, ClassificationSource("pneumoniamnist"), c)
    assert Counter(r.source_split for r in recs) == {"train": 4708, "val": 524}
    train = Counter(r.label for r in recs if r.source_split == "train")
    assert train == {"NORMAL": 1214, "PNEUMONIA": 3494}
    assert recs[123].patient_id == "pneumoniamnist:train-123"
    assert recs[0].pixels.shape == (28, 28)


def test_pneumoniamnist_subset_keys_and_bad_label(tmp_path):
    npz = tmp_path / "d" / "pneumoniamnist.npz"
    npz.parent.mkdir()
    np.savez(npz, test_images=np.zeros((3, 8, 8), np.uint8), test_labels=np.array([[0], [1], [1]]))
    recs = pneumoniamnist.load(
        npz.parent, ClassificationSource("pneumoniamnist"), ctx(tmp_path, "p")
    )
    assert [(r.source_split, r.label) for r in recs] == [
        ("test", "NORMAL"),
        ("test", "PNEUMONIA"),
        ("test", "PNEUMONIA"),
    ]
    np.savez(npz, train_images=np.zeros((2, 8, 8), np.uint8), train_labels=np.array([0, 2]))
    with pytest.raises(StageError, match=r"train_labels\[1\] = 2"):
        pneumoniamnist.load(npz, ClassificationSource("pneumoniamnist"), ctx(tmp_path, "p"))
    np.savez(npz, x=np.zeros(3))
    with pytest.raises(StageError, match="no '<split>_images'"):
        pneumoniamnist.load(npz, ClassificationSource("pneumoniamnist"), ctx(tmp_path, "p"))


# ------------------------------------------------------------------------- COVID radiography
def test_covid_real_folder(shared_data, tmp_path):
    c = ctx(tmp_path, "covid_radiography")
    recs = covid_radiography.load(
        shared_data / "covid19_radiography", ClassificationSource("covid_radiography"), c
    )
    assert len(recs) == 300
    assert {r.label for r in recs} == {"COVID"}
    assert "covid_radiography:COVID-12" in {r.patient_id for r in recs}


def test_covid_layouts_and_class_choice(tmp_path):
    root = tmp_path / "COVID-19_Radiography_Dataset"
    img(root / "COVID/images/COVID-1.png")
    img(root / "COVID/masks/COVID-1.png")  # masks are not images of the set
    img(root / "Viral Pneumonia/Viral Pneumonia-1.png")
    img(root / "Normal/images/Normal-1.png")
    img(root / "Lung_Opacity/Lung_Opacity-1.png")
    c = ctx(tmp_path, "covid_radiography")
    recs = covid_radiography.load(tmp_path, ClassificationSource("covid_radiography"), c)
    assert sorted((r.rel, r.label, r.subtype) for r in recs) == [
        ("COVID/images/COVID-1.png", "COVID", "covid"),
        ("Lung_Opacity/Lung_Opacity-1.png", "LUNG_OPACITY", ""),
        ("Normal/images/Normal-1.png", "NORMAL", ""),
        ("Viral Pneumonia/Viral Pneumonia-1.png", "VIRUS", "virus"),
    ]
    assert any(p.endswith("COVID/masks") for p in c.notes.ignored)
    only = ClassificationSource(
        "covid_radiography", classes={"COVID": "COVID", "Viral Pneumonia": "VIRUS"}
    )
    c = ctx(tmp_path, "covid_radiography")
    assert {r.label for r in covid_radiography.load(tmp_path, only, c)} == {"COVID", "VIRUS"}
    assert c.notes.not_selected == {"NORMAL": 1, "LUNG_OPACITY": 1}


# --------------------------------------------------------------------------------- folder
def test_folder_imagefolder_and_patient_regex(tmp_path):
    img(tmp_path / "data/cat/p01_a.png")
    img(tmp_path / "data/cat/sub/p01_b.png")
    img(tmp_path / "data/dog/p02_a.png")
    img(tmp_path / "data/dog/zz.png")
    src = ClassificationSource("folder", patient_regex=r"^(p\d+)_")
    c = ctx(tmp_path, "folder")
    recs = folder.load(tmp_path / "data", src, c)
    assert sorted((r.rel, r.label, r.patient_id) for r in recs) == [
        ("cat/p01_a.png", "cat", "folder:p01"),
        ("cat/sub/p01_b.png", "cat", "folder:p01"),
        ("dog/p02_a.png", "dog", "folder:p02"),
        ("dog/zz.png", "dog", "folder:dog/zz"),  # no match: its own patient, and noted
    ]
    assert c.notes.unparsed_names == ["dog/zz.png"]
    mapped = ClassificationSource("folder", classes={"dog": "DOG"})
    assert {r.label for r in folder.load(tmp_path / "data", mapped, ctx(tmp_path, "f"))} == {"DOG"}
    with pytest.raises(StageError, match="no sub-folder 'cow'"):
        folder.load(tmp_path / "data", ClassificationSource("folder", classes={"cow": "C"}), c)


def test_folder_split_layout(tmp_path):
    img(tmp_path / "d/train/a/1.png")
    img(tmp_path / "d/test/a/2.png")
    recs = folder.load(tmp_path / "d", ClassificationSource("folder"), ctx(tmp_path, "folder"))
    assert sorted((r.source_split, r.label) for r in recs) == [("test", "a"), ("train", "a")]


# --------------------------------------------------------------------------------- ChestX-Det10
def test_chestxdet10_real_with_skip(shared_data, tmp_path):
    src = DetectionSource("chestxdet10", missing_images="skip")
    c = ctx(tmp_path, "chestxdet10")
    recs = chestxdet10.load(shared_data / "chestxdet10", src, c)
    by_name = {Path(r.rel).name: r for r in recs}
    assert set(by_name) == {"36199.png", "36203.png", "36216.png", "36229.png"}
    assert len(by_name["36216.png"].boxes) == 2
    assert by_name["36199.png"].source_split == "test"
    assert by_name["36216.png"].source_split == "train"
    assert len(c.notes.missing_images) == 3001 + 542 - 4
    assert len(c.notes.categories) == 10  # all classes of the annotations, also of skipped records


def test_chestxdet10_missing_image_error_names_record(shared_data, tmp_path):
    with pytest.raises(
        StageError, match=r"train\.json record #0 \(file_name '36200\.png'\).*missing_images: skip"
    ):
        chestxdet10.load(
            shared_data / "chestxdet10", DetectionSource("chestxdet10"), ctx(tmp_path, "c")
        )


def _det_tree(root: Path, records: list[dict], split: str = "train") -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{split}.json").write_text(json.dumps(records))
    for r in records:
        img(root / "images" / r["file_name"], size=32)


def test_chestxdet10_unknown_class_and_bad_record(tmp_path):
    recs = [
        {"file_name": "1.png", "syms": ["Nodule"], "boxes": [[1, 1, 5, 5]]},
        {"file_name": "2.png", "syms": ["Mass"], "boxes": [[1, 1, 5, 5]]},
    ]
    _det_tree(tmp_path / "d", recs)
    fixed = DetectionSource("chestxdet10", classes=("Nodule",))
    with pytest.raises(StageError, match=r"train\.json record #1.*'Mass'"):
        chestxdet10.load(tmp_path / "d", fixed, ctx(tmp_path, "c"))
    _det_tree(tmp_path / "e", [{"file_name": "1.png", "syms": ["Nodule"], "boxes": []}])
    with pytest.raises(StageError, match=r"record #0.*equal length"):
        chestxdet10.load(tmp_path / "e", DetectionSource("chestxdet10"), ctx(tmp_path, "c"))


def test_chestxdet10_split_folders_and_patient_key(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "train.json").write_text(
        json.dumps([{"file_name": "7.png", "syms": [], "boxes": [], "patient_id": 3}])
    )
    (root / "test.json").write_text(json.dumps([{"file_name": "7.png", "syms": [], "boxes": []}]))
    img(root / "train_data/7.png", value=1)
    img(root / "test_data/7.png", value=2)
    recs = chestxdet10.load(root, DetectionSource("chestxdet10"), ctx(tmp_path, "chestxdet10"))
    assert [(r.source_split, r.src.parent.name, r.patient_id) for r in recs] == [
        ("train", "train_data", "chestxdet10:3"),
        ("test", "test_data", "chestxdet10:7"),
    ]


def test_chestxdet10_official_zips_extracted_into_work_dir(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "train.json").write_text(
        json.dumps([{"file_name": "5.png", "syms": ["Mass"], "boxes": [[1, 1, 9, 9]]}])
    )
    img(tmp_path / "staging/train_data/5.png", size=32, value=3)
    with zipfile.ZipFile(root / "train_data.zip", "w") as zf:
        zf.write(tmp_path / "staging/train_data/5.png", "train_data/5.png")
    c = ctx(tmp_path, "chestxdet10")
    recs = chestxdet10.load(root, DetectionSource("chestxdet10"), c)
    assert [(r.rel, r.source_split, len(r.boxes)) for r in recs] == [("train/5.png", "train", 1)]
    assert recs[0].src.is_relative_to(tmp_path / "work")  # extracted there, not beside the zip
    assert recs[0].src.read_bytes() == (tmp_path / "staging/train_data/5.png").read_bytes()


# ------------------------------------------------------------------------------------ NIH
def test_nih_bbox_real(shared_data, tmp_path):
    src = DetectionSource("nih_bbox", missing_images="skip")
    c = ctx(tmp_path, "nih_bbox", "nih")
    recs = nih_bbox.load(shared_data / "nih14_bbox", src, c)
    assert len(recs) == 44
    boxes = [b for r in recs for b in r.boxes]
    assert len(boxes) == 49
    assert Counter(b.category for b in boxes)["Pneumonia"] == 43
    assert all(b.x2 > b.x1 and b.y2 > b.y1 for b in boxes)
    assert len(c.notes.missing_images) == 880 - 44
    assert all(r.patient_id.startswith("nih:") for r in recs)
    with pytest.raises(
        StageError, match=r"BBox_List_2017\.csv rows of .*not found below.*missing_images: skip"
    ):
        nih_bbox.load(
            shared_data / "nih14_bbox", DetectionSource("nih_bbox"), ctx(tmp_path, "n", "nih")
        )


def test_nih_csv_irregular_header_and_nested_images(tmp_path):
    root = tmp_path / "nih"
    (root).mkdir()
    (root / "BBox_List_2017.csv").write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "00013118_008.png,Atelectasis,225.5,547.0,86.7,79.1,,,\n"
        "00013118_008.png,Mass,10,20,30,40\n"
    )
    img(root / "images_001/images/00013118_008.png", size=64)
    recs = nih_bbox.load(root, DetectionSource("nih_bbox"), ctx(tmp_path, "nih_bbox", "nih"))
    assert len(recs) == 1 and recs[0].patient_id == "nih:00013118"
    a, m = recs[0].boxes
    assert (a.category, a.x1, a.y1) == ("Atelectasis", 225.5, 547.0)
    assert (m.x2, m.y2) == (40.0, 60.0)  # [x, y, w, h] -> x1, y1, x2, y2
    (root / "BBox_List_2017.csv").write_text("Image Index,Finding Label,Bbox\nx.png,Mass,1,2\n")
    with pytest.raises(StageError, match="line 2"):
        nih_bbox.load(root, DetectionSource("nih_bbox"), ctx(tmp_path, "nih_bbox"))


# ------------------------------------------------------------------------------------ config
def test_config_errors_name_allowed_values():
    with pytest.raises(ConfigError, match=r"data\.classification\.source.*'kermany'"):
        parse(ClassificationData, {"source": "chestxdet10"}, "data.classification")
    with pytest.raises(ConfigError, match=r"sources\[0\]\.name.*'nih_bbox'"):
        parse(DetectionData, {"sources": [{"name": "kermany"}]}, "data.detection")
    with pytest.raises(ConfigError, match="unknown key.*'colour'.*allowed keys"):
        parse(
            ClassificationData,
            {"sources": [{"name": "folder", "colour": 1}]},
            "data.classification",
        )
    with pytest.raises(ConfigError, match="'BACTERIA' is not a category of covid_radiography"):
        parse(
            ClassificationData, {"source": "covid_radiography", "classes": {"BACTERIA": "B"}}, "d"
        )
    with pytest.raises(ConfigError, match="patient_regex: only the 'folder' source"):
        parse(ClassificationData, {"source": "kermany", "patient_regex": "x"}, "d")
    with pytest.raises(ConfigError, match="missing_images.*'error' \\| 'skip'"):
        parse(DetectionData, {"source": "nih_bbox", "missing_images": "ignore"}, "d")
    with pytest.raises(ConfigError, match="inside its entries"):
        parse(DetectionData, {"limit": 3, "sources": [{"name": "nih_bbox"}]}, "d")
    with pytest.raises(ConfigError, match="synthetic source generates"):
        parse(ClassificationData, {"source": "synthetic", "path": "x"}, "d")


def test_config_root_checksums_and_external_split():
    cfg = parse(
        ClassificationData,
        {
            "root": "../shared/data",
            "sources": [
                {"name": "kermany", "path": "kermany224", "sha256": "A" * 64},
                {
                    "name": "kermany",
                    "path": "kermany_test_public",
                    "split": "test",
                    "md5": "f" * 32,
                },
            ],
        },
        "data.classification",
    )
    assert cfg.root == "../shared/data"
    assert [(s.split, s.md5, s.sha256) for s in cfg.effective_sources()] == [
        (None, None, "A" * 64),
        ("test", "f" * 32, None),
    ]
    single = parse(DetectionData, {"source": "nih_bbox", "path": "x.zip", "md5": "0" * 32}, "d")
    assert single.root == "data/inputs" and single.effective_sources()[0].md5 == "0" * 32
    with pytest.raises(ConfigError, match=r"sha256: expected 64 hex digits, got 'abc'"):
        parse(ClassificationData, {"source": "kermany", "sha256": "abc"}, "d")
    with pytest.raises(ConfigError, match=r"md5: expected 32 hex digits"):
        parse(DetectionData, {"sources": [{"name": "nih_bbox", "md5": "z" * 32}]}, "d")
    with pytest.raises(ConfigError, match=r"split.*'test'"):
        parse(ClassificationData, {"sources": [{"name": "kermany", "split": "train"}]}, "d")
    with pytest.raises(ConfigError, match="md5.*inside its entries"):
        parse(ClassificationData, {"md5": "0" * 32, "sources": [{"name": "kermany"}]}, "d")
    for bad in (".", "data", "data/raw/classification", "models", "./data/downloads/x"):
        with pytest.raises(ConfigError, match=r"root: .* overlaps .*which the pipeline writes"):
            parse(ClassificationData, {"root": bad}, "data.classification")
    for good in ("data/inputs", "data/inputs/classification", "/srv/xray", "data/rawdata"):
        assert parse(DetectionData, {"root": good}, "data.detection").root == good


# ------------------------------------------------------------------------------- lung_masks
def test_lung_masks_pairs_by_name_with_spaces_and_mask_suffix(tmp_path):
    from stages.sources.config import SegmentationSource
    from stages.sources.segmentation import lung_masks
    from tests.segmenter_helpers import pair, save

    root = tmp_path / "set" / "Lung Masks"  # found below a wrapper folder, any casing
    pair(root, "CHNCXR_0001_0")
    pair(root, "CHNCXR_0001_1", seed=1)  # a second film of patient CHNCXR_0001
    pair(root, "covid case 7_2")  # spaces in the name
    m = pair(root, "MCUCXR_0005_1")
    (root / "masks/MCUCXR_0005_1.png").rename(root / "masks/MCUCXR_0005_1_mask.png")  # Kaggle
    save(root / "images/odd name.jpg", np.zeros((8, 8), np.uint8))  # no _<n> part, jpg
    save(root / "masks/odd name.png", m[:8, :8].astype(np.uint8) * 255)
    (root / "masks/Thumbs.db").write_text("x")
    c = ctx(tmp_path, "lung_masks")
    recs = lung_masks.load(tmp_path / "set", SegmentationSource("lung_masks"), c)
    got = {r.rel: (r.patient_id, r.mask.name, r.label, r.source_split) for r in recs}
    assert got == {
        "CHNCXR_0001_0.png": ("lung_masks:CHNCXR_0001", "CHNCXR_0001_0.png", "lungs", ""),
        "CHNCXR_0001_1.png": ("lung_masks:CHNCXR_0001", "CHNCXR_0001_1.png", "lungs", ""),
        "MCUCXR_0005_1.png": ("lung_masks:MCUCXR_0005", "MCUCXR_0005_1_mask.png", "lungs", ""),
        "covid case 7_2.png": ("lung_masks:covid case 7", "covid case 7_2.png", "lungs", ""),
        "odd name.jpg": ("lung_masks:odd name", "odd name.png", "lungs", ""),
    }
    assert c.notes.unparsed_names == ["odd name.jpg"]
    assert [Path(p).name for p in c.notes.ignored] == ["Thumbs.db"]


def test_lung_masks_split_folders_and_unpaired_files(tmp_path):
    from stages.sources.config import SegmentationSource
    from stages.sources.segmentation import lung_masks
    from tests.segmenter_helpers import pair

    for split, name in (("train", "A_1_0"), ("test", "A_1_0"), ("test", "B_2_0")):
        pair(tmp_path / "d" / split, name)
    recs = lung_masks.load(tmp_path / "d", SegmentationSource("lung_masks"), ctx(tmp_path, "k"))
    assert sorted((r.rel, r.source_split) for r in recs) == [
        ("test/A_1_0.png", "test"),
        ("test/B_2_0.png", "test"),
        ("train/A_1_0.png", "train"),
    ]
    root = tmp_path / "flat"
    pair(root, "P_1_0")
    pair(root, "P_2_0")
    (root / "masks/P_2_0.png").unlink()  # an image without its mask
    with pytest.raises(StageError, match=r"images/P_2_0\.png: no mask for this image.*bad_masks"):
        lung_masks.load(root, SegmentationSource("lung_masks"), ctx(tmp_path, "k"))
    (root / "images/P_2_0.png").unlink()
    pair(root, "P_3_0")
    (root / "images/P_3_0.png").unlink()  # a mask without its image
    with pytest.raises(StageError, match=r"masks/P_3_0\.png: no image for this mask"):
        lung_masks.load(root, SegmentationSource("lung_masks"), ctx(tmp_path, "k"))
    c = ctx(tmp_path, "k")
    recs = lung_masks.load(root, SegmentationSource("lung_masks", bad_masks="skip"), c)
    assert [r.rel for r in recs] == ["P_1_0.png"]
    assert [Path(p.split(" (")[0]).name for p in c.notes.ignored] == ["P_3_0.png"]
    with pytest.raises(StageError, match="no lung_masks layout"):
        lung_masks.load(tmp_path / "d" / "train" / "images", SegmentationSource("lung_masks"), c)


def test_segmentation_config_and_patient_names():
    from stages.sources.config import SegmentationData
    from stages.sources.segmentation.lung_masks import patient_of

    assert patient_of("CHNCXR_0001_0") == "CHNCXR_0001"
    assert patient_of("a_b_12") == "a_b"
    assert patient_of("scan") is None and patient_of("_3") is None
    cfg = parse(
        SegmentationData,
        {
            "root": "../shared/data",
            "sources": [
                {"name": "lung_masks", "path": "lung_masks"},
                {"name": "lung_masks", "path": "lung_masks_external", "split": "test"},
            ],
        },
        "data.segmentation",
    )
    assert [s.split for s in cfg.effective_sources()] == [None, "test"]
    with pytest.raises(ConfigError, match="bad_masks.*'error' \\| 'skip'"):
        parse(SegmentationData, {"source": "lung_masks", "bad_masks": "maybe"}, "d")
    with pytest.raises(ConfigError, match="data.segmentation.source.*'lung_masks'"):
        parse(SegmentationData, {"source": "kermany"}, "data.segmentation")
    with pytest.raises(ConfigError, match="bad_masks.*inside its entries"):
        parse(SegmentationData, {"bad_masks": "skip", "sources": [{"name": "lung_masks"}]}, "d")


def test_lung_masks_real_folder(shared_data, tmp_path):
    from stages.sources.config import SegmentationSource
    from stages.sources.segmentation import lung_masks

    c = ctx(tmp_path, "lung_masks")
    recs = lung_masks.load(shared_data / "lung_masks", SegmentationSource("lung_masks"), c)
    assert len(recs) == 704 and not c.notes.unparsed_names and not c.notes.ignored
    patients = Counter(r.patient_id for r in recs)
    assert patients["lung_masks:CHNCXR_0001"] == 1
    assert all(r.mask.name == r.src.name for r in recs)
