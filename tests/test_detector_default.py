"""The default detection chain (what `dvc repro` runs on a fresh clone) meets its sanity bar.

The synthetic lesions and the train_detector defaults were tuned together so that a ResNet-18 FPN
trained from scratch in about two minutes on this 2-core CPU reaches mAP@0.5 >= 0.6 on the
synthetic test split. This runs the real stages with the real params.yaml, unshrunk (~2.5 min),
so a change to the phantoms, the augmentation or the defaults that breaks learning fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import stages  # noqa: F401  (torch before TensorFlow)
from stages import augment, download, evaluate, split, train_detector

BAR = 0.6


@pytest.mark.slow
def test_default_detection_chain_meets_the_map50_bar(tmp_path, monkeypatch, repo_root):
    monkeypatch.chdir(tmp_path)  # the stages write their relative outputs here
    params = str(repo_root / "params.yaml")
    task = ["--task", "detection", "--params", params]
    download.main(task)
    split.main(task)
    augment.main(task)
    train_detector.main(["--params", params])
    evaluate.main(task)

    trained = json.loads(Path("metrics/train_detector.json").read_text())
    metrics = json.loads(Path("metrics/detector.json").read_text())
    assert trained["epochs_run"] > 0 and trained["n_train"] > 100
    assert set(metrics["ap_50_per_class"]) == {"Consolidation", "Nodule", "Mass", "Effusion"}
    assert metrics["map_50"] >= BAR, (metrics["map_50"], metrics["ap_50_per_class"])
    # every class is learnt, not just the easy ones carrying the mean
    assert min(metrics["ap_50_per_class"].values()) >= BAR / 2, metrics["ap_50_per_class"]
