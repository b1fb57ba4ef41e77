"""Named experiments: every published system of SEEDS.md, and our recipes, as params overrides.

Input: ``stages/tools/experiments.yaml`` (the one home of recipes: title, description, the
params each sets where it differs from the defaults, the published figures) and a data root,
the folder holding ``kermany224/``, ``pneumoniamnist/``, ``covid19_radiography/``,
``chestxdet10/`` and ``lung_masks/`` (default ``../shared/data``, relative to the repository root).
Output: the ``key=value`` overrides of ``dvc exp run -S`` in DVC's own (Hydra) syntax (``++key``
for a key params.yaml does not list), the shell commands, and the published figures the reports
put beside ours.
Run: ``python -m stages.experiments [NAME ...] [--data-root DIR] [--queue]`` prints the commands
(``#`` lines are comments); ``--run`` runs them, in order, from the repository root (a commit is
needed: DVC experiments start from one). ``python -m stages.docs --write`` regenerates
docs/experiments.md from the same file (``--check``: exit 1 with a diff when stale).
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import shlex
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from stages.common.config import PARAMS_FILE, get_section, load_yaml, read_params
from stages.common.pretrained import SOURCES
from stages.common.utils import StageError

RECIPES = Path(__file__).with_name("experiments.yaml")
DEFAULT_DATA_ROOT = "../shared/data"
ROOT = "{data_root}"  # placeholder in string values, replaced by the data root
_PLAIN = re.compile(r"[A-Za-z_./][A-Za-z0-9_./\-]*")  # strings Hydra reads back unquoted
_KEY = re.compile(r"[A-Za-z0-9_./\-]+")  # Hydra dict keys cannot be quoted
_RESERVED = {"null", "true", "false", "nan", "inf"}
_FIELDS = {"title", "description", "params", "published", "target", "table", "row", "seeds"}
_FIELDS |= {"ensemble", "when_present"}


@dataclass(frozen=True)
class Published:
    """Figures a seed document states (None = not stated). ``other``: extra named figures."""

    source: str
    train_accuracy: float | None = None
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    roc_auc: float | None = None
    other: tuple[tuple[str, float], ...] = ()
    note: str = ""
    other_label: str = ""  # what the ``other`` figures are, e.g. "AP@0.5" (README prefix)


@dataclass(frozen=True)
class Experiment:
    """One named configuration: ``set_params`` are (dotted params key, value) overrides.

    ``title``: the short name of the system (the docs' "system" column and summary line).
    ``table``/``row``: seed 002's ablation table the experiment is a row of, with the seed's row
    labels. ``target``: the stage ``dvc exp run`` reproduces (with everything upstream of it).
    ``seeds``/``ensemble``: a recipe run over several training seeds (``python -m
    stages.repeat``), and whether its figures are the seeds' ensemble (mean probability).
    """

    name: str
    title: str
    description: str
    set_params: tuple[tuple[str, Any], ...]
    published: Published
    target: str = "evaluate@classification"
    table: str = ""
    row: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()
    ensemble: bool = False
    # (folder under the data root, overrides applied instead when it exists): an external test
    # set the maintainers hold out is scored when it is there, the grouped hold-out otherwise
    when_present: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def params_for(self, data_root: str = DEFAULT_DATA_ROOT) -> tuple[tuple[str, Any], ...]:
        """``set_params`` with the ``when_present`` overrides of the folders that exist under
        ``data_root`` (a key given there replaces the recipe's, a new key is added)."""
        merged = dict(self.set_params)
        for folder, extra in self.when_present:
            if (Path(data_root) / folder).is_dir():
                merged.update(extra)
        return tuple(merged.items())


def _frozen(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return {k: _frozen(v) for k, v in value.items()}
    return value


def _experiment(name: str, entry: Any) -> Experiment:
    where = f"{RECIPES.name}: experiment {name!r}"
    if not isinstance(entry, dict):
        raise StageError(f"{where}: expected a mapping")
    unknown = sorted(set(entry) - _FIELDS)
    missing = sorted({"title", "description", "params", "published"} - set(entry))
    if unknown or missing:
        raise StageError(f"{where}: unknown keys {unknown}, missing keys {missing}")
    pub = dict(entry["published"])
    other = tuple((str(k), float(v)) for k, v in (pub.pop("other", None) or {}).items())
    return Experiment(
        name=name,
        title=str(entry["title"]),
        description=" ".join(str(entry["description"]).split()),
        set_params=tuple((str(k), _frozen(v)) for k, v in entry["params"].items()),
        published=Published(other=other, **pub),
        target=str(entry.get("target", "evaluate@classification")),
        table=str(entry.get("table", "")),
        row=tuple(str(r) for r in entry.get("row", ())),
        seeds=tuple(int(s) for s in entry.get("seeds", ())),
        ensemble=bool(entry.get("ensemble", False)),
        when_present=tuple(
            (str(folder), tuple((str(k), _frozen(v)) for k, v in extra.items()))
            for folder, extra in (entry.get("when_present") or {}).items()
        ),
    )


@cache
def load(path: Path = RECIPES) -> dict[str, Experiment]:
    """Every named experiment of ``path``, in file order."""
    doc = yaml.safe_load(Path(path).read_text())
    return {name: _experiment(name, e) for name, e in (doc.get("experiments") or {}).items()}


EXPERIMENTS: dict[str, Experiment] = load()
# The seven rows of seed 002's two ablation tables (queued by `make ablations`).
SEED002_ROWS = tuple(e.name for e in EXPERIMENTS.values() if e.table)
# Kermany's train folder + its official test (public half) as an external test source.
KERMANY_OFFICIAL = _frozen(
    [
        {"name": "kermany", "path": "kermany224"},
        {"name": "kermany", "path": "kermany_test_public", "split": "test"},
    ]
)


def official_test(name: str) -> bool:
    """Does experiment ``name`` score on Kermany's official test split (public half)?"""
    return dict(get(name).set_params).get("data.classification.sources") == KERMANY_OFFICIAL


def get(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        close = difflib.get_close_matches(name, list(EXPERIMENTS), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(EXPERIMENTS)}"
        raise StageError(f"unknown experiment {name!r}; {hint}")
    return EXPERIMENTS[name]


def format_value(value: Any) -> str:
    """A Python value in the override grammar of ``dvc exp run -S`` (Hydra's), read back equal."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        if not math.isfinite(value):
            raise ValueError(f"{value!r}: not a finite number")
        return text
    if isinstance(value, str):
        if "${" in value or "\\" in value:
            raise ValueError(f"{value!r}: Hydra would interpolate or unescape it")
        if _PLAIN.fullmatch(value) and value.lower() not in _RESERVED:
            return value
        if "'" not in value:
            return f"'{value}'"
        if '"' not in value:
            return f'"{value}"'
        raise ValueError(f"{value!r}: has both quote characters")
    if isinstance(value, Mapping):
        bad = [k for k in value if not _KEY.fullmatch(str(k))]
        if bad:
            raise ValueError(f"mapping keys {bad}: Hydra dict keys must match {_KEY.pattern}")
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Sequence):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    raise TypeError(f"{value!r}: unsupported override value type {type(value).__name__}")


def _resolve(value: Any, data_root: str) -> Any:
    if isinstance(value, str):
        return value.replace(ROOT, data_root.rstrip("/") or "/")
    if isinstance(value, Mapping):
        return {k: _resolve(v, data_root) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_resolve(v, data_root) for v in value]
    return value


def listed(key: str, params: Mapping | None = None) -> bool:
    """Does params.yaml (or ``params``) list ``key``? (DVC's ``-S key=v`` needs it to.)"""
    try:
        get_section(read_params(PARAMS_FILE) if params is None else params, key)
    except ValueError:
        return False
    return True


def overrides_for(
    name: str, data_root: str = DEFAULT_DATA_ROOT, params: Mapping | None = None
) -> list[str]:
    """The ``-S`` strings of ``dvc exp run`` for experiment ``name``: ``key=value`` for a key
    params.yaml lists, ``++key=value`` (add or change) for one it leaves to the defaults."""
    params = read_params(PARAMS_FILE) if params is None else params
    out = []
    for key, value in get(name).params_for(data_root):
        prefix = "" if listed(key, params) else "++"
        out.append(f"{prefix}{key}={format_value(_resolve(value, data_root))}")
    return out


def command(name: str, data_root: str = DEFAULT_DATA_ROOT, queue: bool = False) -> str:
    """The full shell line ``dvc exp run [--queue] -n <name> -S ... <target>``, quoted."""
    argv = ["dvc", "exp", "run", *(["--queue"] if queue else []), "-n", name]
    for override in overrides_for(name, data_root):
        argv += ["-S", override]
    return shlex.join([*argv, get(name).target])


def pretrained(set_params: Sequence[tuple[str, Any]]) -> list[str]:
    """Networks whose ImageNet weights ``python -m stages.weights`` must fetch before a
    run with these overrides trains (keras.applications' own files cannot be fetched here)."""
    given = dict(set_params)
    arch = given.get("train_classifier.arch")
    return [arch] if given.get("train_classifier.weights") == "imagenet" and arch in SOURCES else []


def repeat_command(
    name: str,
    seeds: Sequence[int] = (),
    data_root: str | None = None,
    ensemble: bool = False,
    sets: Sequence[str] = (),
    tag: str | None = None,
) -> str:
    """The ``python -m stages.repeat`` line, quoted: what ``commands`` prints and what a
    repeat report names as its writer (one grammar for both)."""
    argv = ["python", "-m", "stages.repeat", name]
    argv += ["--seeds", *map(str, seeds)] if seeds else []
    argv += ["--data-root", data_root] if data_root else []
    argv += ["--ensemble"] if ensemble else []
    argv += [a for o in sets for a in ("--set", o)] + (["--tag", tag] if tag else [])
    return shlex.join(argv)


def commands(name: str, data_root: str = DEFAULT_DATA_ROOT, queue: bool = False) -> list[str]:
    """The shell lines that reproduce ``name``, in order, from the repository root."""
    exp = get(name)
    fetch = [shlex.join(["python", "-m", "stages.weights", a]) for a in pretrained(exp.set_params)]
    if not exp.seeds:
        return [*fetch, command(name, data_root, queue)]
    return [*fetch, repeat_command(name, exp.seeds, data_root, exp.ensemble)]


def resolved_params(name: str, data_root: str = DEFAULT_DATA_ROOT) -> dict:
    """params.yaml with experiment ``name`` applied, as ``dvc exp run -S`` would leave it."""
    return apply_overrides(read_params(PARAMS_FILE), overrides_for(name, data_root))


def apply_overrides(params: dict, overrides: Sequence[str]) -> dict:
    """``params`` with the overrides applied exactly as ``dvc exp run -S`` does (pure).

    DVC's own function edits a params file, so it runs on a temporary copy, read back with
    PyYAML like the stages read params.yaml (this catches values DVC writes that the stages
    would misread). Unknown keys fail as they would in DVC (InvalidArgumentError).
    """
    from dvc.utils.hydra import apply_overrides as dvc_apply

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        dvc_apply(path, list(overrides))
        return load_yaml(path.read_text())  # the stages' reader (reads DVC's 1e-05 as a float)


def main(argv: list[str] | None = None) -> None:
    """Print the commands of the named experiments (all when none is named)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="experiments (default: all)")
    parser.add_argument(
        "--data-root", default=DEFAULT_DATA_ROOT, help="folder holding the data sets"
    )
    parser.add_argument("--queue", action="store_true", help="print --queue commands")
    parser.add_argument(
        "--run", action="store_true", help="run the commands of the named experiments, in order"
    )
    args = parser.parse_args(argv)
    names = args.names or list(EXPERIMENTS)
    for name in names:
        get(name)  # unknown name: one clear error before anything is printed or run
    if args.run and not args.names:
        raise StageError("--run needs the experiment names to run (it never runs all of them)")
    for name in names:
        lines = commands(name, args.data_root, args.queue)
        print(f"# {name}: {get(name).description}")
        print("\n".join(lines) + "\n", flush=True)
        for line in lines if args.run else ():
            if subprocess.run(line, shell=True, check=False).returncode != 0:  # noqa: S602
                raise StageError(f"{name}: command failed: {line}")


if __name__ == "__main__":
    from stages.common.utils import run_cli

    run_cli(main)
