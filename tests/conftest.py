"""Shared fixtures: the real params (shrunk by each test as needed) and the real data folder."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

import stages  # noqa: F401  (imports torch before TensorFlow: see stages/__init__.py)
from stages.common.config import read_params

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CXR_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def _params_master() -> dict:
    return read_params(REPO / "params.yaml")


@pytest.fixture
def params(_params_master) -> dict:
    """A private deep copy of the real params.yaml, for a test to shrink and modify."""
    return copy.deepcopy(_params_master)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder (../shared/data); tests using it skip with a reason when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"real data folder {SHARED_DATA} is absent (set CXR_SHARED_DATA to point at it)"
        )
    return SHARED_DATA


def shrink_params(params: dict) -> dict:
    """Shrink the real params in place to a seconds-long pipeline (tiny images, 1-2 epochs).

    Only sizes and counts change, never the structure, so every stage still parses its section.
    """
    cls = params["data"]["classification"]["synthetic"]
    cls.update(n_patients=40, images_per_patient=[1, 2], image_size=64)
    det = params["data"]["detection"]["synthetic"]
    det.update(n_patients=16, images_per_patient=[1, 2], image_size=96)
    params["augment"]["classification"].update(image_size=48, preview_count=2)
    params["augment"]["detection"].update(image_size=96, preview_count=2)
    params["train_classifier"].update(epochs=1, batch_size=16, threads=2)
    params["train_detector"].update(epochs=1, batch_size=2, warmup_iters=2, threads=2)
    params["evaluate"]["classification"].update(bootstrap=20, n_samples_grid=4, n_gradcam=2)
    params["evaluate"]["detection"].update(n_report_images=1)
    return params


@pytest.fixture
def tiny_params(params) -> dict:
    return shrink_params(params)
