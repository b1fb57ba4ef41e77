"""The model registry: register, promote, show and fetch versions of the models in dvc.yaml.

Versions and stages (dev, staging, prod) of the models dvc.yaml lists under ``artifacts:`` are
GTO git tags (``classifier@v1.2.0``, ``classifier#prod#3``), shared by pushing them.

Inputs:  dvc.yaml's ``artifacts:`` (at the registered revision), dvc.lock (md5 of the model, its
         companions and its data), the metrics file the artifact names, ``dvc status`` (the
         pipeline must be up to date for the artifact when registering HEAD), the git tags of
         this checkout (or of ``--registry``).
Outputs: ``register``: an annotated tag ``NAME@vX.Y.Z`` on the commit; its message holds the
         version's facts (commit, md5 of the model and companions, data md5, metrics) as JSON
         after the first blank line. ``promote``: a tag ``NAME#STAGE#N`` (stages: dev, staging,
         prod; .gto). ``show``: a table (name, latest version, each stage's version, commit,
         date, headline metrics). ``fetch``: the version's files in the model cache
         (``stages.serve.registry``), copied to ``--out`` when given. Tags stay local until
         pushed (``--push``, or ``git push origin <tag>``); the model files must be in the DVC
         remote (``dvc push``) for a teammate to fetch them.
Run:     python -m stages.registry register NAME [--version vX.Y.Z | --bump major|minor|patch]
                                     [--rev REV] [--push]
         python -m stages.registry promote NAME VERSION --stage dev|staging|prod [--push]
         python -m stages.registry show [NAME] [--registry GIT_URL|REMOTE]
         python -m stages.registry fetch NAME@STAGE|NAME@vX.Y.Z [--out DIR] [--registry ...]
         (make register NAME=... [VERSION=...|BUMP=...], make promote NAME= VERSION= STAGE=,
         make models)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stages.common import paths
from stages.common.utils import StageError, run_cli
from stages.serve import registry
from stages.serve.registry import STAGES, Source, Spec

BUMPS = ("major", "minor", "patch")
MAX_STATUS_CHARS = 300


def _git(root: Path, *args: str) -> str | None:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def _checkout(root: Path) -> Path:
    top = registry.git_root(root)
    if top is None:
        raise StageError(f"{root.resolve()} is not a git checkout: run this in the repository")
    return top


def _gto_errors() -> tuple[type[BaseException], ...]:
    from gto.exceptions import GTOException
    from scmrepo.exceptions import SCMError

    return (GTOException, SCMError, OSError)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).replace("❌", "").split()) or type(exc).__name__


# ---------------------------------------------------------------------------------- register
def status_line(status: dict[str, Any]) -> str:
    """`dvc status`'s answer in one line: 'train-classifier: changed deps (stages/common)'."""
    parts = []
    for stage, changes in status.items():
        said = []
        for change in changes if isinstance(changes, list) else [changes]:
            if isinstance(change, dict):
                for kind, what in change.items():
                    names = (
                        ", ".join(
                            f"{k}: {', '.join(v)}" if isinstance(v, dict) else k
                            for k, v in what.items()
                        )
                        if isinstance(what, dict)
                        else str(what)
                    )
                    said.append(f"{kind} ({names})")
            else:
                said.append(str(change))
        parts.append(f"{stage}: {'; '.join(said)}")
    text = "; ".join(parts)
    return text if len(text) <= MAX_STATUS_CHARS else text[: MAX_STATUS_CHARS - 3] + "..."


def _stale(top: Path, artifact: registry.ArtifactDef) -> str:
    """What `dvc status` says of the stages behind the artifact's files ('' when up to date)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    with Repo(str(top)) as repo:
        try:
            status = repo.status(targets=list(artifact.files), with_deps=True)
        except DvcException:  # a listed report that no stage declares
            status = repo.status(targets=list(artifact.required), with_deps=True)
    return status_line(status) if status else ""


def facts(source: Source, artifact: registry.ArtifactDef, commit: str) -> dict[str, Any]:
    """What a version is, read at its commit: recorded in the tag's message by ``register``."""
    lock = source.show(commit, paths.DVC_LOCK.as_posix())
    md5s = registry.lock_outs(lock.decode(errors="replace") if lock else None)
    out: dict[str, Any] = {
        "commit": commit,
        "task": artifact.task,
        "files": {f: md5s.get(f) for f in artifact.required},
        "data": {d: md5s.get(d) for d in artifact.data},
    }
    if artifact.metrics:
        blob = source.show(commit, artifact.metrics)
        try:
            doc = json.loads(blob) if blob else {}
        except ValueError:
            doc = {}
        out["metrics_file"] = artifact.metrics
        out["metrics"] = {
            k: v
            for k, v in (doc.items() if isinstance(doc, dict) else ())
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
    return out


def check_registrable(top: Path, name: str, rev: str) -> tuple[str, registry.ArtifactDef]:
    """(commit, artifact) when ``name`` can be registered at ``rev``; else a one-line error."""
    commit = _git(top, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if not commit:
        raise StageError(f"--rev {rev}: not a commit of this repository")
    source = Source(top, "this checkout")
    artifacts = source.artifacts(commit)
    artifact = artifacts.get(name)
    if artifact is None:
        known = ", ".join(sorted(artifacts)) or "none"
        raise StageError(f"{name}: not an artifact of dvc.yaml at {rev} (artifacts: {known})")
    lock = source.show(commit, paths.DVC_LOCK.as_posix())
    md5s = registry.lock_outs(lock.decode(errors="replace") if lock else None)
    for rel in artifact.required:
        if rel not in md5s and source.show(commit, rel) is None:
            raise StageError(
                f"{name} is not built at {rev} ({commit[:7]}): its dvc.lock has no {rel}; run "
                "`dvc repro`, commit dvc.lock, then register"
            )
    if commit == _git(top, "rev-parse", "HEAD"):
        changed = _git(top, "status", "--porcelain", "--", paths.DVC_LOCK.as_posix(), "dvc.yaml")
        if changed:
            raise StageError(
                f"{name}: dvc.lock / dvc.yaml have uncommitted changes; a version is a commit: "
                "commit them, then register"
            )
        stale = _stale(top, artifact)
        if stale:
            raise StageError(
                f"{name}: the pipeline is stale at HEAD ({stale}); run `dvc repro` (or "
                "`dvc pull`), commit, then register"
            )
    return commit, artifact


def register(
    name: str,
    version: str | None = None,
    bump: str | None = None,
    rev: str = "HEAD",
    push: bool = False,
    root: Path = Path("."),
) -> str:
    """Register ``name`` at ``rev`` (GTO tag ``name@vX.Y.Z``); returns the tag."""
    import gto.api

    if version and bump:
        raise StageError("give --version or --bump, not both")
    if version and not registry.is_version(version):
        raise StageError(f"--version {version}: not a version (vMAJOR.MINOR.PATCH, e.g. v1.2.0)")
    top = _checkout(root)
    commit, artifact = check_registrable(top, name, rev)
    what = facts(Source(top, "this checkout"), artifact, commit)
    message = f"Registering {name} ({artifact.path}) at commit {commit[:7]}\n\n" + json.dumps(
        what, indent=1, sort_keys=True
    )
    try:
        event = gto.api.register(
            str(top),
            name,
            commit,
            version=version,
            message=message,
            bump_major=bump == "major",
            bump_minor=bump == "minor",
            bump_patch=bump == "patch",
            push=push,
        )
    except _gto_errors() as exc:
        raise StageError(f"register {name}: {_one_line(exc)}") from None
    return event.tag


# ----------------------------------------------------------------------------------- promote
def promote(name: str, version: str, stage: str, push: bool = False, root: Path = Path(".")) -> str:
    """Promote ``name`` ``version`` to ``stage`` (GTO tag ``name#stage#N``); returns the tag."""
    import gto.api

    if stage not in STAGES:
        raise StageError(f"--stage {stage}: unknown stage (stages: {', '.join(STAGES)})")
    top = _checkout(root)
    registry.resolve(Spec(name, version=version), Source(top, "x").states(), "this checkout")
    try:
        event = gto.api.assign(
            str(top),
            name,
            stage,
            version=version,
            message=f"Promoting {name} {version} to {stage}",
            push=push,
            skip_registration=True,
        )
    except _gto_errors() as exc:
        raise StageError(f"promote {name}: {_one_line(exc)}") from None
    return event.tag


# -------------------------------------------------------------------------------------- show
def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def table(states: dict[str, registry.ArtifactState], names: list[str], max_metrics: int = 4) -> str:
    """The readable registry: one row per model (its latest version's commit, date, metrics)."""
    header = ["model", "latest", *STAGES, "commit", "registered (UTC)", "metrics (latest)"]
    rows = [header]
    for name in names:
        state = states.get(name) or registry.ArtifactState(name)
        latest = state.latest()
        stages = [state.stages[s].version if s in state.stages else "-" for s in STAGES]
        if latest is None:
            rows.append([name, "-", *stages, "-", "-", "not registered"])
            continue
        when = datetime.fromtimestamp(latest.time, UTC).strftime("%Y-%m-%d %H:%M")
        metrics = latest.facts().get("metrics") or {}
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in list(metrics.items())[:max_metrics])
        rows.append([name, latest.version, *stages, latest.commit[:7], when, shown or "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = [
        "  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]) for r in rows
    ]
    lines.insert(1, "  ".join([*("-" * w for w in widths), "-" * len(header[-1])]))
    return "\n".join(line.rstrip() for line in lines)


def show(name: str | None = None, registry_url: str | None = None, root: Path = Path(".")) -> str:
    cache = registry.cache_root()
    if registry_url:
        source = next(registry.sources(name or "", registry_url, root, cache))
    else:
        source = Source(_checkout(root), "this checkout")
    states = source.states()
    head = _git(source.git_dir, "rev-parse", "HEAD")
    listed = list(source.artifacts(head)) if head else []
    names = [name] if name else list(dict.fromkeys([*listed, *sorted(states)]))
    if name and name not in states and name not in listed:
        known = ", ".join(names) or "none"
        raise StageError(f"{name}: no such model in {source.label} (models: {known})")
    text = table(states, names)
    return text + (f"\nnote: {source.note}" if source.note else "")


# ------------------------------------------------------------------------------------ the CLI
def build_parser() -> argparse.ArgumentParser:
    prog = "python -m stages.registry" if sys.argv[0].endswith(".py") else None
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    reg = sub.add_parser("register", help="register a version of a model (a git tag)")
    reg.add_argument("name", help="an artifact of dvc.yaml (classifier, detector, ...)")
    which = reg.add_mutually_exclusive_group()
    which.add_argument("--version", help="vMAJOR.MINOR.PATCH (default: the next patch)")
    which.add_argument("--bump", choices=BUMPS, help="bump the latest version")
    reg.add_argument("--rev", default="HEAD", help="the commit to register (default: HEAD)")
    reg.add_argument("--push", action="store_true", help="push the tag to origin")
    pro = sub.add_parser("promote", help="put a version in a stage (a git tag)")
    pro.add_argument("name")
    pro.add_argument("version", help="a registered version, e.g. v1.2.0")
    pro.add_argument("--stage", required=True, choices=STAGES)
    pro.add_argument("--push", action="store_true", help="push the tag to origin")
    sho = sub.add_parser("show", help="the registry as a table")
    sho.add_argument("name", nargs="?")
    sho.add_argument("--registry", help="a git URL or remote name (default: this checkout)")
    fet = sub.add_parser("fetch", help="fetch a version into the model cache")
    fet.add_argument("spec", help="NAME@STAGE or NAME@vX.Y.Z (or NAME@latest)")
    fet.add_argument("--out", type=Path, help="also copy the files here (repository layout)")
    fet.add_argument("--registry", help="a git URL or remote name (default: this checkout)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "register":
        tag = register(args.name, args.version, args.bump, args.rev, args.push)
        print(f"registered: {tag}")
        if not args.push:
            print(f"share it: dvc push && git push origin {tag}")
    elif args.command == "promote":
        tag = promote(args.name, args.version, args.stage, args.push)
        print(f"promoted: {tag}")
        if not args.push:
            print(f"share it: git push origin '{tag}'")
    elif args.command == "show":
        print(show(args.name, args.registry))
    else:
        spec = registry.parse_spec(args.spec)
        if spec is None:
            raise StageError(f"{args.spec}: not NAME@STAGE or NAME@vX.Y.Z")
        model = registry.fetch_spec(spec, args.registry)
        print(f"{model.label}, commit {model.commit[:7]} ({model.source}): {model.root}")
        if args.out is not None:
            for path in registry.copy_out(model, args.out):
                print(path)


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
