"""The segmentation chain end to end on tiny phantoms, through the stages' own entry points
(download -> split -> augment -> train-segmenter -> evaluate) with a temporary params file:
every output in its place, the headline keys exact, and Dice well above an untrained model's."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from stages import augment, download, evaluate, split, train
from stages.common import paths
from stages.common.config import load_section
from stages.segmenter.config import TrainSegmenterConfig
from stages.segmenter.model import build_segmenter, save_segmenter
from tests.segmenter_helpers import sections


@pytest.fixture
def chain(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    params = sections(n_patients=24, image_size=64, cache_size=64, epochs=4)
    params["train_segmenter"].update(lr=0.01, channels=[8, 16, 32, 64])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def test_tiny_phantom_chain_learns_and_reports(chain):
    args = ["--task", "segmentation"]
    download.main(args)
    split.main(args)
    summary = augment.main(args)
    p = paths.SEGMENTATION
    manifest = (p.raw / "manifest.csv").read_text().splitlines()
    assert manifest[0].endswith(",mask_path")
    assert summary["counts"]["test"] >= 3
    assert p.preview.is_file()
    trained = train.main(args)
    assert trained["epochs_run"] == 4 and paths.SEGMENTER_MODEL.is_file()
    assert json.loads(p.training.read_text())["val_dice"] == trained["val_dice"]
    doc = evaluate.main(args)

    head = json.loads(p.metrics.read_text())
    assert set(head) == {"n_test", "dice", "iou", "hd95"}
    assert head["n_test"] == summary["counts"]["test"]
    files = {f.name for f in p.report_dir.iterdir()}
    assert files == {
        "evaluation.json",
        "per_image.csv",
        "cases_best.png",
        "cases_worst.png",
        "model_card.md",
    }
    with (p.report_dir / "per_image.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == head["n_test"] and rows[0]["source"] == "synthetic"
    assert set(rows[0]) == {"image", "source", "dice", "iou", "hd95"}
    assert "HD95" in (p.report_dir / "model_card.md").read_text()
    assert doc["dice_ci"][0] <= doc["dice"] <= doc["dice_ci"][1]

    # the same network untrained (same seed, same cache) scores far lower
    cfg = load_section(TrainSegmenterConfig, "train_segmenter", "params.yaml")
    untrained = Path("untrained.pt")
    save_segmenter(
        untrained,
        build_segmenter(cfg),
        cfg,
        {"image_size": 64, "resize": "pad", "intensity": "none"},
    )
    before = evaluate.evaluate("segmentation", "params.yaml", [untrained])
    print(f"untrained Dice {before['dice']:.3f}, trained {head['dice']:.3f}")
    assert head["dice"] > before["dice"] + 0.2 and head["dice"] > 0.6, (before["dice"], head)
