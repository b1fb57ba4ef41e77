"""Which params invalidate which stages: a markdown table generated from dvc.yaml.

Inputs:  dvc.yaml (foreach stages expanded; `params:` entries name params.yaml sections).
Outputs: the table on stdout (``python -m stages.docs --write`` puts it into
         docs/reproducibility.md between ``<!-- param-table:begin -->`` and
         ``<!-- param-table:end -->``).
Run:     python -m stages.param_table [--dvc-yaml dvc.yaml]

A change of any key under a section makes `dvc repro` / `dvc exp run -S` re-run the stages that
declare it; the stages downstream of those re-run only when an output they depend on changed
(DVC compares hashes), e.g. a new preview seed leaves the augment cache, and so training, alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stages.common.utils import ArgumentParser, StageError, run_cli

BEGIN = "<!-- param-table:begin -->"
END = "<!-- param-table:end -->"
WRITE = "python -m stages.param_table --write"
_VAR = re.compile(r"\$\{\s*([A-Za-z0-9_.]+)\s*\}")


@dataclass(frozen=True)
class Stage:
    name: str
    params: tuple[str, ...]
    deps: tuple[str, ...]
    outs: tuple[str, ...]  # outs, metrics and plots alike: everything the stage writes
    cmd: str = ""


def _subst(value: Any, scope: dict[str, Any]) -> Any:
    """Replace ${key} / ${item.x} the way DVC's foreach does (strings, lists, dict keys)."""
    if isinstance(value, str):

        def lookup(m: re.Match) -> str:
            node: Any = scope
            for part in m.group(1).split("."):
                node = node[part]
            return str(node)

        return _VAR.sub(lookup, value)
    if isinstance(value, list):
        return [_subst(v, scope) for v in value]
    if isinstance(value, dict):
        return {_subst(k, scope): _subst(v, scope) for k, v in value.items()}
    return value


def _names(entries: list) -> tuple[str, ...]:
    """Paths (or param keys) of a deps/outs/params list; dict entries carry flags."""
    out: list[str] = []
    for entry in entries or []:
        if isinstance(entry, str):
            out.append(entry)
        elif isinstance(entry, dict):
            for key, value in entry.items():
                # params in another file: {other.yaml: [key, ...]}; outs: {path: {flags}}
                out.extend(value if isinstance(value, list) else [key])
    return tuple(out)


def load_stages(dvc_yaml: Path) -> dict[str, Stage]:
    """Every stage of dvc.yaml, foreach expanded to ``name@key`` like DVC names them."""
    doc = yaml.safe_load(Path(dvc_yaml).read_text())
    if not isinstance(doc, dict) or "stages" not in doc:
        raise StageError(f"{dvc_yaml} has no `stages:`; is it a DVC pipeline file?")
    params_file = Path(dvc_yaml).with_name("params.yaml")  # DVC's default vars
    params = yaml.safe_load(params_file.read_text()) if params_file.is_file() else {}
    stages: dict[str, Stage] = {}
    for name, body in doc["stages"].items():
        if "foreach" in body:
            items = _subst(body["foreach"], params or {})
            pairs = items.items() if isinstance(items, dict) else [(v, v) for v in items]
            expanded = [
                (f"{name}@{k}", _subst(body["do"], {**(params or {}), "key": k, "item": v}))
                for k, v in pairs
            ]
        else:
            expanded = [(name, _subst(body, params or {}))]
        for full, spec in expanded:
            outs = _names(spec.get("outs", [])) + _names(spec.get("metrics", []))
            outs += _names(spec.get("plots", []))
            stages[full] = Stage(
                full,
                _names(spec.get("params", [])),
                _names(spec.get("deps", [])),
                outs,
                str(spec.get("cmd", "")),
            )
    return stages


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def consumers(stages: dict[str, Stage]) -> dict[str, set[str]]:
    """Stage -> the stages that read one of its outputs directly."""
    return {
        a.name: {
            b.name
            for b in stages.values()
            if b.name != a.name
            and any(_under(d, o) or _under(o, d) for d in b.deps for o in a.outs)
        }
        for a in stages.values()
    }


def downstream(stages: dict[str, Stage], start: str) -> list[str]:
    """Every stage that (transitively) reads an output of ``start``, in dvc.yaml order."""
    edges = consumers(stages)
    seen: set[str] = set()
    todo = list(edges[start])
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(edges[name])
    return [s for s in stages if s in seen]


def order(stages: dict[str, Stage]) -> list[str]:
    """A topological order of the stages (producers before consumers), stable to dvc.yaml."""
    edges = consumers(stages)
    indeg = {s: 0 for s in stages}
    for targets in edges.values():
        for t in targets:
            indeg[t] += 1
    ready = [s for s in stages if indeg[s] == 0]
    result: list[str] = []
    while ready:
        name = ready.pop(0)
        result.append(name)
        for t in sorted(edges[name], key=list(stages).index):
            indeg[t] -= 1
            if indeg[t] == 0:
                ready.append(t)
    if len(result) != len(stages):
        raise StageError("dvc.yaml has a dependency cycle")
    return result


CHECK_PARAMS = "check-params"  # declares every section; re-runs on any change


def param_rows(stages: dict[str, Stage]) -> list[tuple[str, list[str], list[str]]]:
    """(params section, stages declaring it or a section holding it, stages downstream of
    those), in dvc.yaml order: a change of ``augment.classification.lungs`` re-runs what
    declares ``augment.classification`` too. ``check-params`` (every section; its output is
    constant, so nothing below it re-runs for it) is left out."""
    readers: dict[str, list[str]] = {}
    for stage in stages.values():
        for key in stage.params:
            if stage.name != CHECK_PARAMS:
                readers.setdefault(key, []).append(stage.name)
    for key, names in readers.items():
        holders = [n for k, ns in readers.items() if key.startswith(k + ".") for n in ns]
        names[:] = [s for s in stages if s in {*names, *holders}]
    rows = []
    for key, names in readers.items():
        below = {d for n in names for d in downstream(stages, n)} - set(names)
        rows.append((key, names, [s for s in stages if s in below]))
    return rows


def render(stages: dict[str, Stage]) -> str:
    def code(names: list[str]) -> str:
        return ", ".join(f"`{n}`" for n in names) or "none"

    lines = [
        "| params (any key under) | re-runs | then re-runs when that output changes |",
        "|---|---|---|",
    ]
    for key, names, below in param_rows(stages):
        lines.append(f"| `{key}` | {code(names)} | {code(below)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description="Params -> stages table from dvc.yaml.")
    parser.add_argument("--dvc-yaml", type=Path, default=Path("dvc.yaml"))
    args = parser.parse_args(argv)
    print(render(load_stages(args.dvc_yaml)), end="")


if __name__ == "__main__":
    run_cli(main)
