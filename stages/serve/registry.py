"""The model registry as serving sees it: ``classifier@prod`` or ``classifier@v1.2.0`` -> the
version's git commit -> the model and its companion files, fetched from the team's DVC remote
into a local cache.

Inputs: GTO's git tags (``NAME@vX.Y.Z`` registers a version at a commit, ``NAME#STAGE#N``
promotes it to a stage, a trailing ``!`` undoes either, ``NAME@deprecated`` retires the name) of
the local checkout, or, when the name has no tag there, of ``--registry`` (a URL, a folder or a
git remote name) or else the checkout's ``origin``: a bare mirror of that repository kept in the
cache and refreshed on each resolution (used as last fetched when the network is down). At the
version's commit: ``dvc.yaml`` (its ``artifacts:`` entry: ``path``, ``meta.task``, and the files
that travel with the model: ``meta.files`` (DVC outputs such as the classifier's sidecar),
``meta.decision`` (the decision rule served), ``meta.metrics``, ``meta.card``), ``dvc.lock`` (the
md5 of every DVC output) and the git-tracked files; the DVC files come from the DVC remote that
commit configures (``dvc.repo.Repo.get``; the local DVC cache first for a local checkout).
Output: one folder per version, ``<cache>/models/<name>/<version>/`` (``<cache>`` =
``$CXR_CACHE_DIR``, default ``$XDG_CACHE_HOME/cxr-mlops`` or ``~/.cache/cxr-mlops``), laid out
like the repository (the model at its path, ``dvc.lock``, reports/metrics files) plus
``registry.json`` (name, version, commit, where it came from, the md5 of every file). Written
atomically; reused when every file still has its md5, fetched again when one does not. A
``ServedModel`` says what is served (name, version, stage, commit, folder) and is what the
predict JSON and the page show. No run command (``python -m stages.registry``:
stages/tools/registry.py registers, promotes, shows and fetches).

Which version a stage names: the one most recently promoted to it (tag time, then GTO's counter)
and not unassigned since, among the active versions: what ``gto show`` shows. ``latest`` is the
highest active version (SemVer).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stages.common import paths
from stages.common.utils import StageError, atomic_dir, log, read_json, write_json

STAGES = ("dev", "staging", "prod")  # also in .gto, which GTO itself enforces
CACHE_ENV = "CXR_CACHE_DIR"
RECORD = "registry.json"
PROJECT_FILE = "dvc.yaml"
MODEL_SUFFIXES = {".keras": "classifier", ".pt": "detector"}  # --model PATH -> served role
GIT_TIMEOUT_S = 300
_SEMVER = re.compile(
    r"^v(?P<major>0|[1-9]\d*)\.(?P<minor>0|[1-9]\d*)\.(?P<patch>0|[1-9]\d*)"
    r"(?:-(?P<pre>[0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$"
)
_NAME = r"[a-zA-Z0-9](?:[a-zA-Z0-9_/-]*[a-zA-Z0-9])?"  # GTO's artifact names
_SPEC = re.compile(rf"^(?P<name>{_NAME})(?P<sep>[@#])(?P<what>[0-9A-Za-z][0-9A-Za-z.+_-]*)$")
_FIELD, _RECORD_END = "\x1f", "\x1e"


def cache_root() -> Path:
    """The cache folder: ``$CXR_CACHE_DIR``, else ``$XDG_CACHE_HOME/cxr-mlops``, else
    ``~/.cache/cxr-mlops``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "cxr-mlops"


def md5_file(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def semver_key(version: str) -> tuple:
    """Sort key of ``vX.Y.Z[-pre]`` (a release sorts after its pre-releases)."""
    m = _SEMVER.match(version)
    if not m:
        return (-1, -1, -1, 0, version)
    pre = m["pre"]
    return (int(m["major"]), int(m["minor"]), int(m["patch"]), 0 if pre else 1, pre or "")


def is_version(text: str) -> bool:
    return bool(_SEMVER.match(text))


# ------------------------------------------------------------------------------ references
@dataclass(frozen=True)
class Spec:
    """``name@vX.Y.Z`` (version), ``name@prod`` / ``name#prod`` (stage), ``name@latest``."""

    name: str
    version: str | None = None
    stage: str | None = None

    def __str__(self) -> str:
        return f"{self.name}@{self.version or self.stage or 'latest'}"


def parse_spec(text: str) -> Spec | None:
    """The registry reference ``text`` names, or None when it is not one (e.g. a path).

    A reference to a stage outside ``STAGES`` is a ``StageError``.
    """
    m = _SPEC.match(text.strip())
    if not m:
        return None
    name, what = m["name"], m["what"]
    if what in ("latest", "greatest"):
        return Spec(name)
    if is_version(what):
        return Spec(name, version=what)
    if what in STAGES:
        return Spec(name, stage=what)
    if what[0] == "v" and what[1:2].isdigit():
        raise StageError(f"{text}: {what} is not a version (vMAJOR.MINOR.PATCH, e.g. v1.2.0)")
    raise StageError(f"{text}: unknown stage {what!r} (stages: {', '.join(STAGES)})")


# --------------------------------------------------------------------------------- dvc.yaml
@dataclass(frozen=True)
class ArtifactDef:
    """One ``artifacts:`` entry of dvc.yaml."""

    name: str
    path: str
    type: str = ""
    desc: str = ""
    labels: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> str | None:
        task = self.meta.get("task")
        return str(task) if task else None

    @property
    def role(self) -> str | None:
        """What the page and predict serve it as (classifier | detector), None: not served."""
        return paths.task_paths(self.task).name if self.task in paths.TASKS else None

    def _one(self, key: str) -> str | None:
        value = self.meta.get(key)
        return str(value) if value else None

    @property
    def companions(self) -> tuple[str, ...]:
        """DVC outputs that must travel with the model (e.g. the classifier's sidecar)."""
        files = self.meta.get("files") or ()
        return (files,) if isinstance(files, str) else tuple(str(f) for f in files)

    @property
    def decision(self) -> str | None:
        return self._one("decision")

    @property
    def metrics(self) -> str | None:
        return self._one("metrics")

    @property
    def card(self) -> str | None:
        return self._one("card")

    @property
    def data(self) -> tuple[str, ...]:
        """dvc.lock entries whose md5 is the data version (register records them)."""
        data = self.meta.get("data") or ()
        return (data,) if isinstance(data, str) else tuple(str(d) for d in data)

    @property
    def required(self) -> tuple[str, ...]:
        """The model and its companions: a version without them cannot be served."""
        return (self.path, *self.companions)

    @property
    def files(self) -> tuple[str, ...]:
        """Every file fetched for a version, the model first."""
        extra = (self.decision, self.metrics, self.card)
        return tuple(dict.fromkeys((*self.required, *(f for f in extra if f))))


def read_artifacts(text: str | None) -> dict[str, ArtifactDef]:
    """{name: ArtifactDef} of a dvc.yaml text ({} when it has none or is not YAML)."""
    try:
        doc = yaml.safe_load(text or "") or {}
    except yaml.YAMLError:
        return {}
    found = {}
    for name, entry in ((doc.get("artifacts") if isinstance(doc, dict) else None) or {}).items():
        if isinstance(entry, dict) and entry.get("path"):
            labels = entry.get("labels") or ()
            found[str(name)] = ArtifactDef(
                name=str(name),
                path=str(entry["path"]),
                type=str(entry.get("type") or ""),
                desc=str(entry.get("desc") or ""),
                labels=tuple(str(x) for x in labels),
                meta=dict(entry.get("meta") or {}),
            )
    return found


def lock_outs(text: str | None) -> dict[str, str]:
    """{out path: md5} of every stage of a dvc.lock text."""
    try:
        doc = yaml.safe_load(text or "") or {}
    except yaml.YAMLError:
        return {}
    out: dict[str, str] = {}
    for stage in ((doc.get("stages") if isinstance(doc, dict) else None) or {}).values():
        for item in (stage or {}).get("outs") or []:
            if isinstance(item, dict) and item.get("md5") and item.get("path"):
                out[str(item["path"])] = str(item["md5"])
    return out


# ------------------------------------------------------------------------------- GTO's tags
@dataclass(frozen=True)
class Tag:
    """One GTO tag: register / deregister / assign / unassign / deprecate."""

    tag: str
    name: str
    action: str
    commit: str
    time: int = 0  # tagger date, unix seconds
    counter: int = 0  # GTO's per-artifact counter (assignments)
    version: str | None = None
    stage: str | None = None
    message: str = ""

    @property
    def order(self) -> tuple[int, int]:
        return (self.time, self.counter)


@functools.cache
def _gto_tag_re() -> re.Pattern:
    from gto.constants import tag_re  # GTO's own grammar (imported on first use: it is slow)

    return tag_re


def parse_tag(tag: str, commit: str, time: int = 0, message: str = "") -> Tag | None:
    """A GTO tag name -> ``Tag`` (None for any other tag)."""
    m = _gto_tag_re().match(tag)
    if not m or m["created"]:
        return None
    if m["deprecated"]:
        action = "deprecate"
    elif m["version"]:
        action = "deregister" if m["cancel"] else "register"
    else:
        action = "unassign" if m["cancel"] else "assign"
    return Tag(
        tag=tag,
        name=m["artifact"].replace("=", ":"),
        action=action,
        commit=commit,
        time=time,
        counter=int(m["counter"] or 0),
        version=m["version"],
        stage=m["stage"],
        message=message,
    )


@dataclass(frozen=True)
class Version:
    name: str
    version: str
    commit: str
    time: int
    tag: str
    message: str = ""

    def facts(self) -> dict[str, Any]:
        """The JSON facts ``register`` wrote after the first blank line of the message."""
        _, _, body = self.message.partition("\n\n")
        try:
            facts = json.loads(body) if body.strip() else {}
        except ValueError:
            return {}
        return facts if isinstance(facts, dict) else {}


@dataclass
class ArtifactState:
    name: str
    versions: dict[str, Version] = field(default_factory=dict)  # active versions
    stages: dict[str, Version] = field(default_factory=dict)  # stage -> its version
    deprecated: bool = False

    def latest(self) -> Version | None:
        if not self.versions:
            return None
        return max(self.versions.values(), key=lambda v: semver_key(v.version))

    def stages_of(self, version: str) -> list[str]:
        held = [s for s, v in self.stages.items() if v.version == version]
        return sorted(held, key=lambda s: (STAGES.index(s) if s in STAGES else len(STAGES), s))


def build_state(tags: Iterable[Tag]) -> dict[str, ArtifactState]:
    """{name: ArtifactState} from GTO tags, as GTO reads them (see the module docstring)."""
    by_name: dict[str, list[Tag]] = {}
    for t in tags:
        by_name.setdefault(t.name, []).append(t)
    states = {}
    for name, events in by_name.items():
        events.sort(key=lambda t: t.order)
        state = ArtifactState(name)
        last: dict[str, Tag] = {}  # version -> its last register/deregister
        for t in events:
            if t.action in ("register", "deregister"):
                last[t.version] = t
        for version, t in last.items():
            if t.action == "register":
                state.versions[version] = Version(name, version, t.commit, t.time, t.tag, t.message)
        at_commit = {v.commit: v for v in sorted(state.versions.values(), key=lambda v: v.time)}
        assigned: dict[tuple[str, str], Tag] = {}  # (stage, version) -> its last (un)assign
        for t in events:
            if t.action in ("assign", "unassign") and t.commit in at_commit:
                assigned[(t.stage, at_commit[t.commit].version)] = t
        best: dict[str, Tag] = {}
        for (stage, version), t in assigned.items():
            if t.action == "assign" and (stage not in best or t.order > best[stage].order):
                best[stage] = t
                state.stages[stage] = state.versions[version]
        deprecations = [t for t in events if t.action == "deprecate"]
        state.deprecated = bool(deprecations) and events[-1].action == "deprecate"
        states[name] = state
    return states


@dataclass(frozen=True)
class Resolution:
    name: str
    version: Version
    stage: str | None  # the stage asked for (None: asked by version or latest)
    stages: tuple[str, ...]  # the stages this version holds now
    source: str  # where the tags were read


def resolve(spec: Spec, states: dict[str, ArtifactState], where: str) -> Resolution:
    """The version ``spec`` names, or a one-line ``StageError`` naming what is unknown."""
    state = states.get(spec.name)
    if state is None or not state.versions:
        known = ", ".join(sorted(n for n, s in states.items() if s.versions)) or "none"
        raise StageError(
            f"{spec}: no registered model named {spec.name!r} in {where} (registered: {known}); "
            "register it with `make register NAME=...` and push its tag"
        )
    if state.deprecated:
        raise StageError(f"{spec}: {spec.name} is deprecated in {where}")
    if spec.version:
        version = state.versions.get(spec.version)
        if version is None:
            known = ", ".join(sorted(state.versions, key=semver_key)) or "none"
            raise StageError(
                f"{spec}: {spec.name} has no version {spec.version} in {where} (versions: {known})"
            )
    elif spec.stage:
        version = state.stages.get(spec.stage)
        if version is None:
            held = ", ".join(f"{s}={v.version}" for s, v in state.stages.items()) or "none"
            raise StageError(
                f"{spec}: no version of {spec.name} is in stage {spec.stage} in {where} "
                f"(stages: {held}); promote one with `make promote`"
            )
    else:
        version = state.latest()
    return Resolution(
        spec.name, version, spec.stage, tuple(state.stages_of(version.version)), where
    )


# ---------------------------------------------------------------------------------- sources
def _run_git(args: Sequence[str], cwd: Path | None = None, timeout: float = GIT_TIMEOUT_S):
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}  # never wait for a password prompt
    try:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, timeout=timeout, env=env, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return subprocess.CompletedProcess(args, 1, b"", str(exc).encode())


def _git_out(args: Sequence[str], cwd: Path | None = None) -> str | None:
    done = _run_git(args, cwd)
    return done.stdout.decode(errors="replace").strip() if done.returncode == 0 else None


def _last_line(done: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in done.stderr.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else f"exit code {done.returncode}"


def git_root(path: Path) -> Path | None:
    """The top of the git checkout holding ``path`` (None: not in one)."""
    top = _git_out(["rev-parse", "--show-toplevel"], cwd=path)
    return Path(top) if top else None


@dataclass
class Source:
    """A git repository whose tags, commits and DVC remote serve the registry: the local
    checkout, or a bare mirror of the team's repository."""

    git_dir: Path  # where git commands run
    label: str  # what users are told ("this checkout" or the URL)
    url: str | None = None  # the team repository mirrored (None: local)
    note: str = ""  # e.g. the network was down: tags as last fetched

    def tags(self) -> list[Tag]:
        fmt = (
            _FIELD.join(
                [
                    "%(refname:strip=2)",
                    "%(objecttype)",
                    "%(*objectname)",
                    "%(taggerdate:unix)",
                    "%(contents)",
                ]
            )
            + _RECORD_END
        )
        out = _run_git(["for-each-ref", f"--format={fmt}", "refs/tags"], cwd=self.git_dir)
        if out.returncode != 0:
            raise StageError(f"cannot list the tags of {self.label}: {_last_line(out)}")
        found = []
        for record in out.stdout.decode(errors="replace").split(_RECORD_END):
            parts = record.strip("\n").split(_FIELD)
            if len(parts) != 5 or parts[1] != "tag":  # GTO ignores lightweight tags
                continue
            name, _, commit, when, message = parts
            tag = parse_tag(name, commit, int(when or 0), message.strip())
            if tag is not None:
                found.append(tag)
        return found

    def states(self) -> dict[str, ArtifactState]:
        return build_state(self.tags())

    def show(self, commit: str, path: str) -> bytes | None:
        """A git-tracked file's bytes at ``commit`` (None: not tracked there)."""
        done = _run_git(["cat-file", "blob", f"{commit}:{path}"], cwd=self.git_dir)
        return done.stdout if done.returncode == 0 else None

    def artifacts(self, commit: str) -> dict[str, ArtifactDef]:
        text = self.show(commit, PROJECT_FILE)
        return read_artifacts(text.decode(errors="replace") if text else None)

    @property
    def dvc_url(self) -> str:
        return str(self.git_dir)


def _mirror_dir(url: str, cache: Path) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", url).strip("-")[-40:]
    digest = hashlib.sha1(url.encode(), usedforsecurity=False).hexdigest()[:10]
    return cache / "registries" / f"{slug}-{digest}.git"


def mirror(url: str, cache: Path) -> Source:
    """A bare mirror of ``url`` in the cache, brought up to date (branches and tags); when the
    network is down the mirror serves as last fetched (``note`` says so)."""
    folder = _mirror_dir(url, cache)
    if not (folder / "HEAD").is_file():
        with atomic_dir(folder) as tmp:
            done = _run_git(["clone", "--bare", "--quiet", url, str(tmp)])
            if done.returncode != 0:
                raise StageError(f"cannot reach the registry {url}: {_last_line(done)}")
        return Source(folder, url, url)
    refspecs = ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"]
    done = _run_git(["fetch", "--quiet", "--prune", "--force", url, *refspecs], cwd=folder)
    note = ""
    if done.returncode != 0:
        note = f"cannot reach {url} ({_last_line(done)}): its tags as last fetched"
        log.warning("%s", note)
    return Source(folder, url, url, note)


def _remote_url(root: Path, name: str) -> str | None:
    """A git remote's URL, a relative folder made absolute (git reads it from ``root``)."""
    url = _git_out(["remote", "get-url", name], cwd=root)
    return _absolute(url, root) if url else None


def _absolute(url: str, base: Path) -> str:
    if "://" in url or re.match(r"^[^/]*:", url) or Path(url).is_absolute():
        return url  # a URL, scp-like host:path, or an absolute folder
    return str((base / url).resolve())


def sources(name: str, registry: str | None, root: Path, cache: Path) -> Iterator[Source]:
    """Where ``name``'s tags are read, in order: ``registry`` alone when given (a git remote
    name of this checkout, a URL or a folder); else this checkout when it has a tag of
    ``name``, then its ``origin`` (mirrored only when asked for: a version or stage this
    checkout does not know yet)."""
    top = git_root(root)
    if registry:
        url = (_remote_url(top, registry) if top else None) or _absolute(registry, Path.cwd())
        folder = Path(url).expanduser()
        if folder.is_dir() and git_root(folder) == folder.resolve():
            yield Source(folder.resolve(), url)  # a checkout on this machine: read in place
        else:
            yield mirror(url, cache)
        return
    if top is None:
        raise StageError(
            f"{name}: not in a git checkout and no --registry given: pass --registry <git url> "
            "of the team's repository"
        )
    local = Source(top, f"this checkout ({top})")
    origin = _remote_url(top, "origin")
    if any(t.name == name for t in local.tags()) or not origin:
        yield local
    if origin:
        yield mirror(origin, cache)


# ------------------------------------------------------------------------------- the cache
@dataclass(frozen=True)
class ServedModel:
    """A registry version on disk: what the page and predict serve and show."""

    name: str
    version: str
    commit: str
    stage: str | None
    stages: tuple[str, ...]
    source: str
    root: Path  # the version's cache folder (laid out like the repository)
    artifact: ArtifactDef
    facts: dict[str, Any] = field(default_factory=dict)  # what register recorded

    @property
    def path(self) -> Path:
        return self.root / self.artifact.path

    @property
    def role(self) -> str | None:
        return self.artifact.role

    @property
    def decision(self) -> Path:
        """The version's decision rule (a missing file: the predictor says so and uses 0.5)."""
        return self.root / (self.artifact.decision or paths.CLASSIFICATION.evaluation)

    @property
    def label(self) -> str:
        stage = f" ({self.stage})" if self.stage else ""
        return f"{self.name}@{self.version}{stage}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "stage": self.stage,
            "stages": list(self.stages),
            "commit": self.commit,
            "registry": self.source,
        }

    def markdown(self) -> str:
        stage = f", stage **{self.stage}**" if self.stage else ""
        held = [s for s in self.stages if s != self.stage]
        also = f" (also {', '.join(held)})" if held else ""
        return (
            f"**{self.name}** **{self.version}**{stage}{also}, git commit `{self.commit[:7]}` "
            f"(model registry: {self.source})"
        )


def _verified(entry: Path, commit: str) -> dict[str, Any] | None:
    """The record of a cached version when its commit matches and every file has its md5."""
    try:
        record = read_json(entry / RECORD)
    except (OSError, ValueError):
        return None
    files = record.get("files") if isinstance(record, dict) else None
    if record.get("commit") != commit or not isinstance(files, dict) or not files:
        return None
    for rel, md5 in files.items():
        path = entry / rel
        if not path.is_file() or md5_file(path) != md5:
            log.warning("cached %s of %s does not match its md5: fetching it again", rel, entry)
            return None
    return record


def _dvc_get(source: Source, rel: str, commit: str, dest: Path) -> None:
    """One DVC-tracked file at ``commit`` from ``source``'s DVC cache or remote into ``dest``."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        Repo.get(source.dvc_url, rel, out=str(dest), rev=commit)
    except (DvcException, OSError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise StageError(
            f"{rel} of commit {commit[:7]} is not in the model cache and could not be fetched "
            f"from the DVC remote ({reason}): connect to the remote (see `make remote`), or "
            "check that the version was pushed (`dvc push`)"
        ) from None


def fetch(resolution: Resolution, source: Source, cache: Path | None = None) -> ServedModel:
    """The version's files in the cache (fetched, or reused when verified)."""
    cache = cache if cache is not None else cache_root()
    version = resolution.version
    commit = version.commit
    where = f"{resolution.name} {version.version} (commit {commit[:7]})"
    artifact = source.artifacts(commit).get(resolution.name)
    if artifact is None:
        raise StageError(f"{where}: dvc.yaml at that commit has no artifact {resolution.name!r}")
    entry = cache / "models" / resolution.name / version.version
    record = _verified(entry, commit)
    if record is None:
        with atomic_dir(entry) as tmp:
            record = _download(source, artifact, commit, tmp, where)
            record.update(name=resolution.name, version=version.version, registry=source.label)
            write_json(tmp / RECORD, record)
    return ServedModel(
        name=resolution.name,
        version=version.version,
        commit=commit,
        stage=resolution.stage,
        stages=resolution.stages,
        source=resolution.source,
        root=entry,
        artifact=artifact,
        facts=version.facts(),
    )


def _download(
    source: Source, artifact: ArtifactDef, commit: str, tmp: Path, where: str
) -> dict[str, Any]:
    lock = source.show(commit, paths.DVC_LOCK.as_posix())
    if lock is None:
        raise StageError(f"{where}: no dvc.lock at that commit (the pipeline was never run)")
    (tmp / paths.DVC_LOCK).write_bytes(lock)
    md5s = lock_outs(lock.decode(errors="replace"))
    files = {paths.DVC_LOCK.as_posix(): hashlib.md5(lock, usedforsecurity=False).hexdigest()}
    for rel in artifact.files:
        dest = tmp / rel
        blob = source.show(commit, rel)
        if blob is not None:  # git-tracked (reports, metrics)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(blob)
        elif rel in md5s and not md5s[rel].endswith(".dir"):
            _dvc_get(source, rel, commit, dest)
            if md5_file(dest) != md5s[rel]:
                raise StageError(
                    f"{where}: {rel} fetched from the DVC remote does not match its md5 in "
                    "dvc.lock (a damaged remote object?)"
                )
        elif rel in artifact.required:
            raise StageError(f"{where}: {rel} is not built at that commit (not in its dvc.lock)")
        else:
            continue  # an optional report the version does not have
        files[rel] = md5_file(dest)
    return {"commit": commit, "files": files}


def fetch_spec(
    spec: Spec, registry: str | None = None, root: Path = Path("."), cache: Path | None = None
) -> ServedModel:
    """``name@stage`` / ``name@vX.Y.Z`` -> its ``ServedModel`` (resolved, fetched, verified)."""
    cache = cache if cache is not None else cache_root()
    found = sources(spec.name, registry, Path(root), cache)
    error: StageError | None = None
    while True:
        try:
            source = next(found)
        except StopIteration:
            break
        except StageError as exc:  # e.g. origin unreachable after this checkout said no
            raise StageError(f"{error}; {exc}" if error else str(exc)) from None
        try:
            resolution = resolve(spec, source.states(), source.label)
        except StageError as exc:
            error = exc  # the last source asked (the team's repository) has the last word
            continue
        if source.note:
            log.warning("%s: %s", spec, source.note)
        return fetch(resolution, source, cache)
    raise error or StageError(f"{spec}: no registry to read")


# --------------------------------------------------------------------- the --model argument
@dataclass
class Selection:
    """The models a command serves: keyword arguments of ``stages.serve.inference.Predictor``."""

    classifier: Any  # DEFAULT, a list of paths, or None
    detector: Path | None
    evaluation: Path
    registry: dict[str, ServedModel] = field(default_factory=dict)  # role -> version
    segmenter: Path | None = None  # the lungs of a lung-aware classifier (its version's own)


def _role_of_path(value: str) -> str:
    role = MODEL_SUFFIXES.get(Path(value).suffix)
    if role is None:
        suffixes = ", ".join(f"{s} ({r})" for s, r in MODEL_SUFFIXES.items())
        raise StageError(
            f"--model {value}: not a registry reference (NAME@STAGE or NAME@vX.Y.Z) and not a "
            f"model file ({suffixes})"
        )
    return role


def select(
    models: Sequence[str] | None,
    registry: str | None,
    classifier: Sequence[Path] | None,
    detector: Path | None,
    evaluation: Path,
    default_classifier: Any,
    default_detector: Path,
    root: Path = Path("."),
) -> Selection:
    """What to serve from the command line. Without ``--model``: ``--classifier`` (or the
    default), ``--detector`` (or the default). With ``--model`` (repeatable): the models it
    names, plus any ``--classifier`` / ``--detector`` given; a registry classifier brings its
    own decision rule (the evaluation of its version; ``--evaluation`` is for file models)."""
    if not models:
        return Selection(
            list(classifier) if classifier else default_classifier,
            detector if detector is not None else default_detector,
            evaluation,
        )
    files: dict[str, list[Path]] = {"classifier": list(classifier or ())}
    files["detector"] = [detector] if detector is not None else []
    served: dict[str, ServedModel] = {}
    for value in models:
        spec = None if Path(value).exists() else parse_spec(value)
        if spec is None:
            files[_role_of_path(value)].append(Path(value))
            continue
        model = fetch_spec(spec, registry, root)
        if model.role not in files:
            raise StageError(
                f"--model {value}: {model.name} is a {model.artifact.task or 'untyped'} model; "
                "the page and predict serve classification and detection models"
            )
        if model.role in served:
            raise StageError(f"--model {value}: a {model.role} from the registry is given twice")
        served[model.role] = model
    for role, model in served.items():
        if files[role]:
            raise StageError(
                f"--model {model.label} and a {role} file ({files[role][0]}) both given: serve one"
            )
    if len(files["detector"]) > 1:
        raise StageError("more than one detector given: serve one")
    cls = [served["classifier"].path] if "classifier" in served else files["classifier"]
    det = served["detector"].path if "detector" in served else next(iter(files["detector"]), None)
    segmenter = None
    if "classifier" in served:
        evaluation = served["classifier"].decision
        if paths.SEGMENTER_MODEL.as_posix() in served["classifier"].artifact.companions:
            segmenter = served["classifier"].root / paths.SEGMENTER_MODEL
    return Selection(cls or None, det, evaluation, served, segmenter)


def copy_out(model: ServedModel, out: Path) -> list[Path]:
    """Copy a fetched version's files into ``out`` (repository layout); returns the files."""
    copied = []
    for rel in read_json(model.root / RECORD)["files"]:
        dest = Path(out) / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        shutil.copy2(model.root / rel, dest)
        copied.append(dest)
    return copied


def registry_markdown(served: dict[str, ServedModel]) -> str:
    """The page's line per registry model: name, version, stage, commit, registry."""
    return "  \n".join(f"**Model registry:** {m.markdown()}" for m in served.values())


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` / ``--registry`` of the page and the predict command."""
    parser.add_argument(
        "--model",
        action="append",
        metavar="NAME@STAGE|NAME@VERSION|FILE",
        help="serve this model, and only the models so named (repeatable): classifier@prod, "
        "classifier@v1.2.0, detector@staging (the model registry, fetched into a cache) or a "
        "model file",
    )
    parser.add_argument(
        "--registry",
        metavar="GIT_URL|REMOTE",
        help="read the registry's tags there (default: this checkout, else its origin)",
    )


def select_models(
    args: argparse.Namespace, default_classifier: Any, default_detector: Path
) -> Selection:
    """``select`` on the parsed arguments of the page / the predict command."""
    return select(
        args.model,
        args.registry,
        args.classifier,
        args.detector,
        args.evaluation,
        default_classifier,
        default_detector,
    )


__all__ = [
    "STAGES",
    "add_model_arguments",
    "registry_markdown",
    "select_models",
    "ArtifactDef",
    "ArtifactState",
    "Resolution",
    "Selection",
    "ServedModel",
    "Source",
    "Spec",
    "Tag",
    "build_state",
    "cache_root",
    "fetch",
    "fetch_spec",
    "sources",
    "parse_spec",
    "parse_tag",
    "read_artifacts",
    "resolve",
    "select",
]
