"""Helpers of the tests that drive DVC itself: temporary git+DVC copies of this repository, the
`dvc`/`git` commands with timeouts, and the tiny pipeline built once per session (with one
experiment on a copy of it, also once per session).

No tests here; imported by the test files that drive DVC (test_dvc_pipeline, test_remotes,
test_reproducibility, test_registry, test_review, test_exp_show, test_plots_browser, ...; the
servers: tests/remote_servers.py).
"""

from __future__ import annotations

import configparser
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.conftest import REPO, shrink_params

BIN = Path(sys.executable).parent
COPY = ["dvc.yaml", "params.yaml", "pyproject.toml", "stages", ".dvcignore", "data/inputs"]
# make_repo copies .gitignore too: what git keeps out of a clone (e.g. /models/) must then come
# from the remote, as in a real clone of this repository.
TEAM_COPY = [*COPY, ".gitignore"]


def tool_env() -> dict[str, str]:
    """The environment of every dvc/git call: the venv first on PATH (stages call `python`)."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("CXR_SHARED_DATA", None)
    # as on a user's machine: the stages write __pycache__/ beside their code (.dvcignore)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def dvc(repo: Path, *args: str, timeout: float = 900, env: dict | None = None) -> str:
    proc = subprocess.run(
        [str(BIN / "dvc"), *args],
        cwd=repo,
        env=env or tool_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{out[-4000:]}")
    return out


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def experiment_metrics(
    shown: list, name: str, metrics_file: str = "metrics/classifier.json"
) -> dict:
    """``metrics_file`` of experiment ``name`` in the output of `dvc exp show --json`."""
    stack: list = [shown]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("name") == name and isinstance(node.get("data"), dict):
                for path, entry in node["data"].get("metrics", {}).items():
                    if path.endswith(metrics_file):
                        return entry["data"]
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    raise AssertionError(f"experiment {name} not in dvc exp show: {json.dumps(shown)[:2000]}")


def git(repo: Path, *args: str) -> str:
    proc = subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=True, timeout=60
    )
    return proc.stdout


def make_repo(root: Path, shrink: Callable[[dict], dict] = shrink_params) -> Path:
    """A git+DVC copy of this repository's pipeline in ``root`` with params passed through
    ``shrink``, committed once."""
    root.mkdir(parents=True, exist_ok=True)
    for name in TEAM_COPY:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, root / name)
    params = shrink(yaml.safe_load((REPO / "params.yaml").read_text()))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    init_repo(root)
    copy_plot_setup(root)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "init")
    return root


def init_repo(root: Path) -> None:
    git(root, "init", "-q")
    git(root, "config", "user.name", "test")
    git(root, "config", "user.email", "test@example.invalid")
    dvc(root, "init", "-q")
    dvc(root, "config", "core.autostage", "true")


def copy_plot_setup(root: Path) -> None:
    """What a clone has in .dvc/ for `dvc plots show`: the custom templates and the offline page
    (.dvc/plots, without node_modules) and ``plots.html_template`` (not the rest of .dvc/config:
    a test repo must never reach the team's remote)."""
    src = REPO / ".dvc" / "plots"
    if src.is_dir():
        ignore = shutil.ignore_patterns("node_modules", "__pycache__")
        shutil.copytree(src, root / ".dvc" / "plots", ignore=ignore, dirs_exist_ok=True)
    config = configparser.ConfigParser()
    config.read(REPO / ".dvc" / "config")
    if config.has_option("plots", "html_template"):  # what `dvc config plots.html_template` writes
        with (root / ".dvc" / "config").open("a") as fh:
            fh.write(f"[plots]\n    html_template = {config.get('plots', 'html_template')}\n")


def commit_all(repo: Path, message: str) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", message)


def cached_outs(repo: Path) -> list[str]:
    """Paths of the pipeline outputs DVC caches (and pushes), as DVC itself resolves dvc.yaml."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        return sorted({out.def_path for out in dvc_repo.index.outs if out.use_cache})


def tree_digest(root: Path, rel_paths: list[str]) -> dict[str, str]:
    """sha256 of every file under each of ``rel_paths`` (files or folders), keyed by path."""
    digests = {}
    for rel in rel_paths:
        base = root / rel
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for f in files:
            digests[f.relative_to(root).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return digests


def changed_stages(repo: Path, *targets: str) -> set[str]:
    """The stages `dvc status --json` lists (changed deps, params or outs), asked of DVC in this
    process: a `dvc` start costs about a second, and some tests ask twenty times."""
    from dvc.repo import Repo

    with in_repo(repo), Repo(str(repo)) as dvc_repo:
        return set(dvc_repo.status(targets=list(targets) or None))


@contextlib.contextmanager
def in_repo(root: Path, env: dict[str, str] | None = None) -> Iterator[None]:
    """DVC in this process as the CLI would run it: from the repository root (DVC resolves the
    stages' paths from the working directory), with ``env`` as the environment if given."""
    cwd, saved = Path.cwd(), dict(os.environ)
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(saved)


def status_clean(repo: Path, *targets: str) -> bool:
    out = dvc(repo, "status", *targets)
    return "up to date" in out.lower() and "changed" not in out


# ----------------------------------------------------------------------------- shared build


@dataclass
class Built:
    """The tiny pipeline built once per test session, stage by stage, committed."""

    path: Path
    writes: dict[str, set[str]]  # stage -> workspace files it created, changed or removed
    seconds: float


@dataclass
class Experimented:
    """A copy of the built pipeline with one experiment run in its workspace (seed 001's AS-IS
    net: an architecture change whose head takes keys params.yaml does not list, set with ++)."""

    path: Path
    name: str
    output: str  # what `dvc exp run` printed


_BUILT: dict[str, Built] = {}
_SKIP_DIRS = {".git", ".dvc", "__pycache__"}  # git/DVC internals; bytecode is the interpreter's


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every workspace file -> (mtime_ns, size)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            path = Path(dirpath) / name
            st = path.stat()
            found[path.relative_to(root).as_posix()] = (st.st_mtime_ns, st.st_size)
    return found


def changed_files(before: dict, after: dict) -> set[str]:
    return {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}


def built_repo(tmp_path_factory) -> Built:
    """Build the tiny pipeline once per session, one stage at a time in dependency order (what
    `dvc repro -s <stage>` does), recording what each stage touched; shared by the pipeline,
    remote, registry, review and reproducibility tests. DVC runs in this process: one `dvc` start
    per stage would add a second to each of the 17."""
    from dvc.repo import Repo

    from stages.tools.param_table import load_stages, order

    if "repo" not in _BUILT:
        start = time.perf_counter()
        root = make_repo(tmp_path_factory.mktemp("team") / "repo")
        writes = {}
        # the stage commands' PATH, as for the `dvc` calls
        with in_repo(root, tool_env()), Repo(str(root)) as repo:
            for name in order(load_stages(root / "dvc.yaml")):
                before = snapshot(root)
                ran = [stage.addressing for stage in repo.reproduce(name, single_item=True)]
                if ran != [name]:
                    raise AssertionError(f"reproducing {name} ran {ran}")
                writes[name] = changed_files(before, snapshot(root))
        commit_all(root, "baseline")
        _BUILT["repo"] = Built(root, writes, time.perf_counter() - start)
    return _BUILT["repo"]


AS_IS = (
    "train_classifier.arch=as_is",
    "++train_classifier.head.activation=softmax",
    "++train_classifier.head.units=2",
    "++train_classifier.loss=categorical_crossentropy",
)


def experiment_repo(tmp_path_factory) -> Experimented:
    """The built pipeline plus one `dvc exp run` (``AS_IS``, named ``asis``) once per session;
    shared by the pipeline and review tests (copy it before changing it)."""
    if "experiment" not in _BUILT:
        src = built_repo(tmp_path_factory).path
        root = tmp_path_factory.mktemp("experiment") / "repo"
        shutil.copytree(src, root, symlinks=True)
        argv = [arg for override in AS_IS for arg in ("-S", override)]
        out = dvc(root, "exp", "run", "-n", "asis", *argv)
        _BUILT["experiment"] = Experimented(root, "asis", out)
    return _BUILT["experiment"]
