"""The layout holds: layers, no import circles, stage deps equal to each stage's import closure,
one home for paths, schema defaults equal to params.yaml, and every module documented.

All static (``tests/imports.py`` reads the sources with ``ast``), so this runs in a second.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
from pathlib import Path

import pytest
import yaml

from stages.common import cache, paths
from stages.common.utils import TASK_PACKAGES
from stages.sources import LOADERS
from tests.imports import REPO, closure_files, direct_imports, module_file, project_modules
from tests.stage_graph import stage_entries

STAGE_MODULES = {
    "check_params",
    "download",
    "lungs",
    "split",
    "augment",
    "train",
    "evaluate",
}


def layer(module: str) -> tuple[int, str]:
    """(floor, room): a module may import modules on lower floors, or in its own room."""
    parts = module.split(".")
    if module == "stages" or parts[1] == "common":
        return 0, "common"
    if parts[1] in ("sources", "classifier", "detector", "segmenter"):
        return 1, parts[1]
    if parts[1] == "serve":
        return 2, "serve"
    if parts[1] in STAGE_MODULES:
        return 2, f"stage:{parts[1]}"
    if parts[1] == "tools":
        return 3, "tools"
    raise AssertionError(f"{module}: not in any layer; add its folder to tests/test_layout.py")


def test_top_of_stages_holds_only_the_stage_entry_points():
    top = {p.stem for p in (REPO / "stages").glob("*.py")}
    assert top == STAGE_MODULES | {"__init__"}, sorted(top - STAGE_MODULES)


def test_no_import_goes_up_or_sideways():
    bad = []
    for mod in project_modules():
        floor, room = layer(mod)
        for dep in direct_imports(mod):
            if dep == "stages":
                continue
            dep_floor, dep_room = layer(dep)
            if dep_floor > floor or (dep_floor == floor and dep_room != room):
                bad.append(f"{mod} -> {dep}")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_import_circles():
    graph = {m: set(direct_imports(m)) - {"stages"} for m in project_modules()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for mod in graph:
        if mod not in state:
            visit(mod, [mod])
    assert not cycles, cycles


def _dynamic_modules(stage: str, task: str | None) -> list[str]:
    """Modules a stage imports by name at run time (so the static closure cannot see them)."""
    if stage == "download" and task:
        return sorted(set(LOADERS[task].values()))
    if stage == "augment" and task:
        return [f"{TASK_PACKAGES[task]}.augment", f"{TASK_PACKAGES[task]}.config"]
    if stage == "evaluate" and task:
        return [f"{TASK_PACKAGES[task]}.evaluate", f"{TASK_PACKAGES[task]}.config"]
    if stage == "train" and task:
        return [f"{TASK_PACKAGES[task]}.train", f"{TASK_PACKAGES[task]}.config"]
    if stage == "check_params":
        return [f"{pkg}.config" for pkg in TASK_PACKAGES.values()]
    return []


def _covered(path: Path, deps: list[Path]) -> bool:
    return any(path == d or d in path.parents for d in deps)


@pytest.mark.parametrize("entry", stage_entries(), ids=lambda e: e.name)
def test_stage_deps_equal_the_import_closure(entry):
    """Every file the stage can execute is a dep (so editing it makes the stage stale), and no
    code dep is listed that the stage does not use (so editing it re-runs nothing)."""
    module = re.search(r"python -m (stages\.\w+)", entry.cmd).group(1)
    stage = module.split(".")[1]
    task = entry.name.partition("@")[2] or (re.findall(r"--task (\w+)", entry.cmd) or [None])[0]
    needed = closure_files(module)
    for extra in _dynamic_modules(stage, task):
        needed |= closure_files(extra)
    code_deps = [REPO / d for d in entry.deps if d.startswith("stages")]
    missing = sorted(p.relative_to(REPO).as_posix() for p in needed if not _covered(p, code_deps))
    assert not missing, f"{entry.name}: add to its deps in dvc.yaml: {missing}"
    unused = [
        d.relative_to(REPO).as_posix()
        for d in code_deps
        if not any(p == d or d in p.parents for p in needed)
    ]
    assert not unused, f"{entry.name}: deps in dvc.yaml it never imports: {unused}"
    for other in set(paths.TASKS) - {task} if task else ():
        # the chains stay independent: no code of another task is executed or a dep (the
        # download stages share stages/sources, whose loaders they import by task), unless the
        # stage consumes that task's model (lungs@classification runs the segmenter)
        if paths.task_paths(other).model.as_posix() in entry.deps:
            continue
        pkg = REPO / TASK_PACKAGES[other].replace(".", "/")
        leaked = [p for p in needed if pkg in p.parents or f"/sources/{other}/" in p.as_posix()]
        assert not leaked, f"{entry.name} executes {other} code: {leaked}"
        assert not _covered(pkg / "__init__.py", code_deps), f"{entry.name} depends on {pkg}"


def test_check_params_runs_first_and_knows_every_section():
    """Every stage depends on check-params' marker (so DVC runs the check before removing any
    stage's outputs), and the check parses every section a stage declares."""
    from stages.check_params import schemas

    entries = {e.name: e for e in stage_entries()}
    marker = (paths.PARAMS_REPORT / paths.CHECKED_PARAMS_NAME).as_posix()
    assert marker in entries["check-params"].outs
    declared = set()
    for name, entry in entries.items():
        if name != "check-params":
            assert marker in entry.deps, f"{name} does not depend on {marker}"
            declared.update(entry.params)
    # data.root is parsed with each data.<task> section (stages.sources.config.data_section);
    # a stage may declare single keys of a section (lungs@classification: augment's lungs keys)
    sections = {d for d in declared if not any(d.startswith(s + ".") for s in declared)}
    assert sections - {"data.root"} == set(schemas()), sections ^ set(schemas())
    tops = {s.split(".")[0] for s in declared}
    assert set(entries["check-params"].params) == tops


def test_every_stage_output_path_comes_from_the_paths_module():
    """dvc.yaml's outs/metrics equal what stages/common/paths.py says each stage writes."""
    expected: dict[str, set[str]] = {}
    expected["check-params"] = {
        (paths.PARAMS_REPORT / paths.RESOLVED_PARAMS_NAME).as_posix(),
        (paths.PARAMS_REPORT / paths.CHECKED_PARAMS_NAME).as_posix(),
    }
    for task in paths.TASKS:
        p = paths.task_paths(task)
        expected[f"download@{task}"] = {p.raw.as_posix()}
        expected[f"split@{task}"] = {p.split.as_posix(), p.split_report.as_posix()}
        parts = {(p.augment / part).as_posix() for part in cache.PARTS}
        expected[f"augment@{task}"] = {*parts, p.preview.as_posix()}
        expected[f"evaluate@{task}"] = {p.report_dir.as_posix(), p.metrics.as_posix()}
    lungs = (paths.CLASSIFICATION.lungs_preprocess, paths.CLASSIFICATION.lungs_meter)
    expected["lungs@classification"] = {p.as_posix() for p in lungs}
    for p in (paths.task_paths(t) for t in paths.TASKS if t != "classification"):
        expected[f"train-{p.name}"] = {p.model.as_posix(), p.live_dir.as_posix()}
    c = paths.CLASSIFICATION
    expected["train-classifier"] = {
        paths.CLASSIFIER_MODEL.as_posix(),
        paths.CLASSIFIER_SIDECAR.as_posix(),
        c.live_dir.as_posix(),
    }

    got = {e.name: set(e.outs) for e in stage_entries()}
    assert got == expected


def test_the_expensive_stages_keep_run_cache_records():
    """DVC keeps no run-cache record of a stage with a persist output or a plain cache: false
    output (dvc/stage/__init__.py, Stage.run): only the cheap stages that write git-tracked
    reports (check-params, split, evaluate) may have one, so a queued run or a teammate restores
    download, lungs, augment and training instead of recomputing them."""
    from dvc.repo import Repo

    cheap = ("check-params", "split@", "evaluate@")
    with Repo(str(REPO)) as repo:
        blocked = {
            stage.addressing: [
                o.def_path
                for o in stage.outs
                if o.persist or not o.use_cache and not (o.is_metric or o.is_plot)
            ]  # fmt: skip
            for stage in repo.index.stages
        }
    blocked = {k: v for k, v in blocked.items() if v and not k.startswith(cheap)}
    assert not blocked, blocked


def test_no_stage_depends_on_a_path_inside_another_stages_output():
    """A consumer depends on a whole output, never on a folder inside one: DVC's experiments
    look such a path up in the commit's directory listing, so in a clone whose cache lacks it
    (a fresh clone) a queued run stops at the first consumer it restores from the run cache
    ("failed to load directory"). The augment cache (fit/, test/) and the lungs (preprocess/,
    meter/) are two outputs each for that reason; tests/test_dvc_pipeline.py runs the case."""
    outs = [Path(o) for e in stage_entries() for o in e.outs]
    inside = [
        (e.name, dep, str(out))
        for e in stage_entries()
        for dep in e.deps
        for out in outs
        if out in Path(dep).parents
    ]
    assert not inside, inside


def test_no_module_holds_a_pipeline_path_of_its_own():
    """Literal data/, models/, metrics/ or reports/ paths live in stages/common/paths.py only."""
    pattern = re.compile(r"""["'](?:data|models|metrics|reports)/[\w./-]+["']""")
    offenders = []
    for path in (REPO / "stages").rglob("*.py"):
        if path == REPO / "stages/common/paths.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.FunctionDef | ast.ClassDef)
            and n.body
            and isinstance(n.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if id(node) in docstrings:
                    continue
                if pattern.search(repr(node.value)) and "\n" not in node.value:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value!r}")
    assert not offenders, offenders


def _schemas():
    from stages.check_params import schemas
    from stages.common.config import read_params

    params = read_params(REPO / "params.yaml")
    return params, [(cls, section) for section, cls in schemas().items()]


def _defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        out[f.name] = value
    return out


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def test_schema_defaults_equal_params_yaml():
    """One home per default: the schemas hold every default and params.yaml shows the usual
    knobs with the same values, so a key deleted from params.yaml changes nothing."""
    params, schemas = _schemas()
    from stages.common.config import get_section

    diffs = []
    for cls, section in schemas:
        values = get_section(params, section)
        for name, default in _defaults(cls).items():
            if name in values and _plain(default) != _plain(values[name]):
                if isinstance(default, float | int) and values[name] == default:
                    continue
                if dataclasses.is_dataclass(default):
                    sub = _plain(default)
                    given = values[name]
                    bad = {k: (sub[k], given[k]) for k in given if _plain(given[k]) != sub.get(k)}
                    if not bad:
                        continue
                    diffs.append(f"{section}.{name}: schema {bad}")
                    continue
                diffs.append(f"{section}.{name}: schema {default!r}, params {values[name]!r}")
    assert not diffs, diffs


def test_every_module_says_what_it_is():
    """Every module opens with a docstring; no docstring cites a name defined nowhere."""
    undocumented = [
        m for m in project_modules() if not ast.get_docstring(ast.parse(module_file(m).read_text()))
    ]
    assert not undocumented, undocumented
    text = "\n".join(p.read_text() for p in (REPO / "stages").rglob("*.py"))
    assert not re.search(r"contract \d", text), "docstrings cite 'contract N', defined nowhere"
    for cited in set(re.findall(r"``(stages(?:\.\w+)+)``", text)):
        assert _resolvable(cited), f"a docstring cites {cited}, which does not exist"


def _resolvable(dotted: str) -> bool:
    """A module, or a name defined at the top of the longest module prefix."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        path = module_file(".".join(parts[:i]))
        if path is None:
            continue
        if i == len(parts):
            return True
        tree = ast.parse(path.read_text())
        names = set()
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(t.id for t in targets if isinstance(t, ast.Name))
        return parts[i] in names
    return False


def test_command_aliases_point_at_real_modules():
    import stages

    for alias, real in stages.COMMANDS.items():
        assert module_file(real), (alias, real)
        spec = importlib.util.find_spec(f"stages.{alias}")
        assert spec is not None and Path(spec.origin) == module_file(real)


def test_dvc_yaml_is_the_one_home_of_stage_commands():
    doc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for name, stage in doc["stages"].items():
        body = stage.get("do", stage)
        assert re.fullmatch(
            r"python -m stages\.\w+( --task (\$\{(key|item)\}|\w+))?", body["cmd"]
        ), name
