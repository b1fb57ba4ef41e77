"""Shared fixtures: the real params (shrunk by each test as needed) and the real data folder."""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
from pathlib import Path

import pytest


def _pin_xdist_worker() -> None:
    """Under pytest-xdist (`make test` runs one worker per core) each worker, and every process
    it starts, keeps to its own share of the cores, so `threads: 0` means one thread there and
    two workers' trainings never fight over one core: unpinned, two 2-thread trainings on two
    cores made the parallel suite slower than the serial one. Runs before torch or TensorFlow
    is loaded (both size their thread pools from the affinity when they start)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= count:
        os.sched_setaffinity(0, cores[int(worker[2:]) % count :: count])


_pin_xdist_worker()

# After each command DVC starts a daemon process that sends usage analytics, unless the
# repository's config turns them off. This project's .dvc/config does; the repositories the tests
# create with `dvc init` do not, so every `dvc` call there (and every one inside a `dvc exp run`)
# would start one more Python process, offline and to no one. Inherited by every process the
# tests start.
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import stages  # noqa: E402,F401  (imports torch before TensorFlow: see stages/__init__.py)
from stages.common.config import read_params  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CXR_SHARED_DATA", REPO.parent / "shared" / "data"))


# Session builds that several test files share: under pytest-xdist the files using one run on
# the same worker, so it is built once, not once per worker.
SHARED_BUILDS = {"built_repo(": "pipeline", "experiment_repo(": "pipeline", "serve_models": "serve"}


@functools.cache
def worker_group(module: Path) -> str:
    """The worker group of a test file: the shared build it uses, else the file itself (its
    module fixtures are then built once too)."""
    text = module.read_text(encoding="utf-8")
    return next((group for use, group in SHARED_BUILDS.items() if use in text), module.stem)


def _group_of(nodeid: str) -> str:
    return worker_group(REPO / nodeid.split("::", 1)[0])


def pytest_collection_modifyitems(config, items) -> None:
    """Run the groups that hold slow tests first (the shared pipeline build first of all), so
    no long test starts last and keeps one worker busy while the other idles."""
    group_of = {item: _group_of(item.nodeid) for item in items}
    slow = {group_of[item] for item in items if item.get_closest_marker("slow")}
    rank = {group: (group != "pipeline", group not in slow) for group in group_of.values()}
    items.sort(key=lambda item: rank[group_of[item]])  # stable: files keep their test order


if importlib.util.find_spec("xdist") is not None:

    def pytest_xdist_make_scheduler(config, log):
        """One work unit per worker group, handed out in collection order (the order above).
        pytest-xdist's own `loadgroup` cannot do it under pytest 9.2 (it renames
        ``item._nodeid``, which no longer exists there)."""
        from xdist.scheduler import LoadScopeScheduling

        class GroupScheduling(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                return _group_of(nodeid)

        config.option.loadscopereorder = False
        return GroupScheduling(config, log)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


def full_params(path: Path = REPO / "params.yaml") -> dict:
    """params.yaml with every key its schemas leave to the defaults written out: what the stages
    run with, as a params file a test can change any key of and write back."""
    from stages.check_params import resolve

    params = read_params(path)
    for dotted, values in resolve(params).items():
        node = params
        for part in dotted.split("."):
            node = node.setdefault(part, {})
        if dotted.startswith("data."):
            values = {k: v for k, v in values.items() if k != "root"}  # data.root holds it
        _fill(node, values)
    return params


def _fill(node: dict, values: dict) -> None:
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(node.get(key), dict):
            _fill(node[key], value)
        else:
            node.setdefault(key, value)


@pytest.fixture(scope="session")
def _params_master() -> dict:
    return full_params()


@pytest.fixture
def params(_params_master) -> dict:
    """A private deep copy of the real params, every default written out, for a test to shrink
    and modify (and write back as a params file)."""
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

    Only sizes and counts change, so every stage still parses its section.
    """

    def section(*keys: str) -> dict:
        node = params
        for key in keys:
            node = node.setdefault(key, {})
        return node

    section("data", "classification", "synthetic").update(
        n_patients=40, images_per_patient=[1, 2], image_size=64
    )
    section("data", "detection", "synthetic").update(
        n_patients=16, images_per_patient=[1, 2], image_size=96
    )
    section("augment", "classification").update(image_size=48, preview_count=2)
    section("augment", "detection").update(image_size=96, preview_count=2)
    section("train_classifier").update(epochs=1, batch_size=16, threads=0)
    section("train_detector").update(epochs=1, batch_size=2, warmup_iters=2, threads=0)
    section("evaluate", "classification").update(bootstrap=20, n_samples_grid=4, n_gradcam=2)
    section("evaluate", "detection").update(n_report_images=1)
    section("data", "segmentation", "synthetic").update(
        n_patients=12, images_per_patient=[1, 2], image_size=64
    )
    section("augment", "segmentation").update(image_size=64, preview_count=2)
    section("train_segmenter").update(
        epochs=1, batch_size=4, channels=[8, 16, 32], res_units=1, warmup_iters=2, threads=0
    )
    section("evaluate", "segmentation").update(bootstrap=20, n_report_images=1)
    return params


@pytest.fixture
def tiny_params(params) -> dict:
    return shrink_params(params)
