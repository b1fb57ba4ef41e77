"""check-params: every params section parsed by its schema before any other stage runs.

Inputs:  params.yaml: every section a stage reads (data.<task>, split.<task>, augment.<task>,
         train_<model>, evaluate.<task>), each parsed by the schema that stage uses.
Outputs: reports/params/resolved.json (every section with the schema defaults filled in: the
         whole effective configuration of this revision, which reviews compare) and
         reports/params/checked.json (constant; every stage depends on it, so DVC runs this check
         first, and a bad value stops `dvc repro` / `dvc exp run` before DVC deletes any other
         stage's outputs)
Run:     python -m stages.check_params [--params params.yaml]

Both outputs are ``persist`` in dvc.yaml: a failed check leaves them, and everything else, as
they were. The stages still parse their own section at start-up (they can be run by hand).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from stages.common import paths
from stages.common.config import get_section, parse, read_params, to_dict
from stages.common.split_config import SplitConfig
from stages.common.utils import StageError, run_cli, task_module, write_json
from stages.sources.config import SCHEMAS as DATA_SCHEMAS
from stages.sources.config import data_section

CHECKED = {"params": "checked"}  # constant: its hash must not move when a value changes


def schemas() -> dict[str, type]:
    """params section -> the schema its stage parses it with, for every task."""
    out: dict[str, type] = {}
    for task in paths.TASKS:
        config = task_module(task, "config")
        out[f"data.{task}"] = DATA_SCHEMAS[task]
        out[f"split.{task}"] = SplitConfig
        out[f"augment.{task}"] = config.AUGMENT_CONFIG
        out[f"train_{paths.task_paths(task).name}"] = config.TRAIN_CONFIG
        out[f"evaluate.{task}"] = config.EVALUATE_CONFIG
    return out


def section(params: dict[str, Any], name: str) -> Any:
    """The values a stage parses for section ``name`` (``data.<task>`` gets ``data.root``)."""
    if name.startswith("data."):
        return data_section(params, name.partition(".")[2])
    return get_section(params, name)


def resolve(params: dict[str, Any]) -> dict[str, Any]:
    """Every section parsed (ConfigError naming the first bad key), as plain dicts."""
    return {
        name: to_dict(parse(cls, section(params, name), name)) for name, cls in schemas().items()
    }


def run(params_path: Path, report_dir: Path) -> dict[str, Any]:
    resolved = resolve(read_params(params_path))
    write_json(Path(report_dir) / paths.RESOLVED_PARAMS_NAME, resolved)
    write_json(Path(report_dir) / paths.CHECKED_PARAMS_NAME, CHECKED)
    return resolved


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    parser.add_argument("--out", type=Path, default=paths.PARAMS_REPORT, help="report folder")
    args = parser.parse_args(argv)
    if not args.params.is_file():
        raise StageError(f"{args.params}: params file not found (run from the repository root)")
    return run(args.params, args.out)


if __name__ == "__main__":
    run_cli(main)
