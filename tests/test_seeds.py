"""Every seed in params is range-checked by its schema: 0 <= seed < 2**32 (what numpy, random,
TensorFlow and torch all accept), else one ``error:`` line naming the key, before any work.

The seed keys are found by walking the schemas of every params.yaml section, so a seed added to
a schema (or a new section) is checked here without editing this file.
"""

from __future__ import annotations

import copy
import dataclasses
import typing

import pytest

from stages.check_params import schemas
from stages.common import paths
from stages.common.config import ConfigError, get_section, parse
from tests.conftest import full_params

PARAMS = full_params()  # every key written out, defaults included
SCHEMAS = schemas()  # params section -> the schema its stage parses it with


def _dataclasses_in(tp) -> list[type]:
    if dataclasses.is_dataclass(tp):
        return [tp]
    return [d for arg in typing.get_args(tp) for d in _dataclasses_in(arg)]


def _seed_keys(cls, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths of the int fields named *seed* below ``cls`` (nested dataclasses included)."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if "seed" in f.name and tp is int:
            keys.append((*prefix, f.name))
        origin = typing.get_origin(tp)
        for sub in _dataclasses_in(tp):
            if origin in (tuple, list):  # a list of entries: a seed there needs an index
                assert not _seed_keys(sub), f"{f.name}: seed in a list entry; extend this test"
                continue
            keys += _seed_keys(sub, (*prefix, f.name))
    return keys


SEED_KEYS = [(section, key) for section, cls in SCHEMAS.items() for key in _seed_keys(cls)]


def test_every_params_section_has_a_schema_here():
    """A new params section (or task) must be walked for seeds too."""
    sections = set()
    for top, value in PARAMS.items():
        tasks = [t for t in paths.TASKS if isinstance(value, dict) and t in value]
        sections |= {f"{top}.{t}" for t in tasks} if tasks else {top}
    assert sections == set(SCHEMAS)
    assert not any("seed" in k for k in PARAMS["data"] if k not in paths.TASKS)  # data.root


def test_the_known_seeds_are_found():
    found = {f"{section}.{'.'.join(key)}" for section, key in SEED_KEYS}
    assert {
        "train_classifier.seed",
        "train_detector.seed",
        "split.classification.seed",
        "data.classification.synthetic.seed",
        "data.detection.synthetic.seed",
        "evaluate.classification.seed",
        "augment.detection.preview_seed",
    } <= found


def _with(section: str, key: tuple[str, ...], value) -> dict:
    data = copy.deepcopy(get_section(PARAMS, section))
    node = data
    for part in key[:-1]:
        node = node[part]
    node[key[-1]] = value
    return data


@pytest.mark.parametrize(
    ("section", "key"), SEED_KEYS, ids=[f"{s}.{'.'.join(k)}" for s, k in SEED_KEYS]
)
def test_a_seed_out_of_range_is_one_error_naming_the_key(section, key):
    cls = SCHEMAS[section]
    for ok in (0, 2**32 - 1):
        cfg = parse(cls, _with(section, key, ok), section)
        node = cfg
        for part in key:
            node = getattr(node, part)
        assert node == ok
    where = ".".join((section, *key[:-1]))
    for bad in (-1, 2**32, -(2**40)):
        with pytest.raises(ConfigError) as info:
            parse(cls, _with(section, key, bad), section)
        msg = str(info.value)
        assert msg.startswith(f"{where}: {key[-1]} must be in [0, 2**32)"), msg
        assert str(bad) in msg and "\n" not in msg


def test_the_split_stage_stops_with_one_error_line(tmp_path, monkeypatch, capsys):
    import yaml

    from stages import split
    from stages.common.utils import run_cli

    params = copy.deepcopy(PARAMS)
    params["split"]["classification"]["seed"] = -3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: split.main(["--task", "classification"]))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: split.classification: seed must be in [0, 2**32), got -3"]
