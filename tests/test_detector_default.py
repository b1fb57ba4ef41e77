"""The default detection chain (what `dvc repro` runs on a fresh clone) learns, on any CPU.

This runs the real stages with the real params.yaml, unshrunk (~2.5-3.5 min), so a change to the
phantoms, the augmentation or the defaults that breaks learning fails here.

Why the bar is where it is: training from scratch is chaotic, so the figure moves with the seed
and with the CPU (float reduction order differs between AVX2 and AVX-512 kernels). Measured spread
of the default recipe's test mAP@0.5:
- 2026-12-02, AMD EPYC (2 cores): 11 runs over data seeds 11/12/13 and training seeds 1-5,
  0.856 +- 0.082 (min 0.647, max 0.940); every class's AP@0.5 >= 0.50 in every run.
- 2026-12-03, Intel Xeon with AVX-512 and AMX (2 cores, 2.6 GHz): training seeds 1-5 on data
  seed 11, 0.929 +- 0.034 (min 0.877, max 0.965); every class's AP@0.5 >= 0.82.
The gates below sit well under the minima of both machines (mean - 4 sd of the wider spread for
the mAP), so they hold on another x86 CPU, yet a chain that stops learning (mAP ~0.1) fails them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages import augment, download, evaluate, split, train_detector

MAP50_BAR = 0.5
CLASS_BAR = 0.25


@pytest.mark.slow
def test_default_detection_chain_learns_every_class(tmp_path, monkeypatch, repo_root):
    monkeypatch.chdir(tmp_path)  # the stages write their relative outputs here
    (tmp_path / "data" / "inputs" / "detection").mkdir(parents=True)  # the default data root
    params = str(repo_root / "params.yaml")
    task = ["--task", "detection", "--params", params]
    download.main(task)
    split.main(task)
    augment.main(task)
    train_detector.main(["--params", params])
    evaluate.main(task)

    trained = json.loads(Path("metrics/train_detector.json").read_text())
    full = json.loads(Path("reports/detector/evaluation.json").read_text())
    assert trained["epochs_run"] > 0
    assert full["n_test_images"] >= 50 and full["n_gt_boxes"] >= 70  # AP not decided by one image
    ap = full["ap_50_per_class"]
    assert set(ap) == {"Consolidation", "Nodule", "Mass", "Effusion"}
    assert full["map_50"] >= MAP50_BAR, (full["map_50"], ap)
    # every class is learnt, not just the easy ones carrying the mean
    assert min(ap.values()) >= CLASS_BAR, ap
