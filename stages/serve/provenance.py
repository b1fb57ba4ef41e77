"""Where the served models came from: git revision, DVC experiment or commit, dvc.lock match, the
data each model was trained and tested on, and its key test figures.

Inputs (read-only, every one optional; paths relative to ``root``, the repository root): the git
checkout (``git`` commands: HEAD, the ``refs/exps`` refs and the ``dvc.lock`` of each experiment
commit), the workspace ``dvc.lock``, the model files, the data the pipeline's models were made
from (first found: the augment cache index ``data/augment/<task>/{fit/train,fit/val,test}/index.csv``, the split
``data/split/<task>/<split>.csv``, the model card ``reports/<model>/model_card.md``; their
``source`` column / line) and the headline metrics ``metrics/<model>.json``. Output: a
``Provenance``; ``markdown()`` is the page's text, ``ModelProvenance.to_json()`` what the predict
command writes beside every prediction. A missing git, lock or data file leaves that part out.
A model served from the model registry (``stages.serve.registry``) is described by its version:
name, version, stage and commit, its md5 checked against the dvc.lock of that commit, its data
and figures read from the model card and metrics of that commit (fetched with it).
No run command.

- DVC experiment: only real experiment refs count (``refs/exps/<2 hex>/<rest of the baseline
  sha>/<name>``); DVC's internal refs (``refs/exps/exec/EXEC_HEAD``, ``refs/exps/apply/ORIG_HEAD``,
  stashes, ...) are never shown. A model belongs to an experiment when HEAD is the experiment's
  commit, or when the model file's md5 is the one in that experiment's ``dvc.lock`` (the case
  after ``dvc exp apply``, which leaves HEAD on the baseline).
- Data: known for the pipeline's models only (the file at the task's model path, a model listed
  in the evaluation's decision block, or a file whose md5 a ``dvc.lock`` records); synthetic
  sources (``synthetic*``) are flagged, and the page says so prominently: figures on phantoms
  say nothing about real X-rays.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import subprocess
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stages.common import cache, paths
from stages.common.utils import read_json

CLASSIFIER_KEYS = ("accuracy", "roc_auc", "recall", "specificity", "f1", "threshold")
DETECTOR_KEYS = ("map_50", "map", "froc_avg_recall")
ROLE_TASK = {"classifier": paths.CLASSIFICATION, "detector": paths.DETECTION}
MAX_EXPERIMENTS = 500  # experiment refs searched for a model's md5 (newest first)
_HEX = re.compile(r"^[0-9a-f]+$")


def _git(*args: str, cwd: Path | None = None, stdin: bytes | None = None) -> bytes | None:
    try:
        done = subprocess.run(
            ["git", *args], capture_output=True, input=stdin, cwd=cwd, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _git_text(*args: str, cwd: Path | None = None) -> str | None:
    out = _git(*args, cwd=cwd)
    return None if out is None else out.decode(errors="replace").strip()


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_lock(text: str) -> dict[str, str]:
    """{out path: md5} over every stage of a dvc.lock text ({} when it is not one)."""
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        return {}
    out: dict[str, str] = {}
    stages = doc.get("stages") if isinstance(doc, dict) else None
    for stage in (stages or {}).values():
        for item in (stage or {}).get("outs") or []:
            if isinstance(item, dict) and "md5" in item and "path" in item:
                out[str(item["path"])] = str(item["md5"])
    return out


def lock_md5s(lock_path: Path) -> dict[str, str]:
    """{out path: md5} over every stage of dvc.lock."""
    return parse_lock(lock_path.read_text()) if lock_path.is_file() else {}


def experiment_name(ref: str) -> str | None:
    """The experiment's name for a real DVC experiment ref, None for DVC's internal refs.

    Real: ``refs/exps/<baseline sha[:2]>/<baseline sha[2:]>/<name>`` (dvc's ExpRefInfo). Internal:
    ``refs/exps/exec/EXEC_HEAD``, ``refs/exps/apply/ORIG_HEAD``, ``refs/exps/stash``, the celery
    and temp namespaces: none of them has the two hex sha parts.
    """
    parts = ref.split("/")
    if len(parts) != 5 or parts[:2] != ["refs", "exps"]:
        return None
    head, rest, name = parts[2], parts[3], parts[4]
    sha = head + rest
    if len(head) != 2 or len(sha) not in (40, 64) or not _HEX.match(sha) or not name:
        return None
    return name


@dataclass(frozen=True)
class Experiment:
    name: str
    sha: str  # the experiment's commit


@dataclass
class _Git:
    """What the checkout says: HEAD, the real experiments, and the dvc.lock of each commit."""

    head: str | None = None
    prefix: str = ""  # root's path inside the repository ("" at the top)
    dirty: bool = False
    experiments: list[Experiment] = field(default_factory=list)
    locks: dict[str, dict[str, str]] = field(default_factory=dict)  # commit sha -> lock md5s

    @classmethod
    def read(cls, root: Path) -> _Git:
        head = _git_text("rev-parse", "HEAD", cwd=root)
        if not head:
            return cls()
        git = cls(head=head, prefix=_git_text("rev-parse", "--show-prefix", cwd=root) or "")
        git.dirty = bool(_git_text("status", "--porcelain", "--untracked-files=no", cwd=root))
        fmt = "--format=%(objectname) %(refname)"
        refs = _git_text("for-each-ref", "--sort=-committerdate", fmt, "refs/exps", cwd=root)
        for line in (refs or "").splitlines():
            sha, _, ref = line.partition(" ")
            name = experiment_name(ref)
            if name:
                git.experiments.append(Experiment(name, sha))
        git.experiments = git.experiments[:MAX_EXPERIMENTS]
        commits = [head, *dict.fromkeys(e.sha for e in git.experiments)]
        git.locks = _locks_at(root, commits, git.prefix + paths.DVC_LOCK.as_posix())
        return git

    def experiments_at_head(self) -> list[str]:
        return [e.name for e in self.experiments if e.sha == self.head]


def _locks_at(root: Path, commits: Sequence[str], lock: str) -> dict[str, dict[str, str]]:
    """{commit: parsed dvc.lock} for every commit that has one (one ``git cat-file --batch``)."""
    query = "".join(f"{c}:{lock}\n" for c in commits).encode()
    out = _git("cat-file", "--batch", cwd=root, stdin=query)
    found: dict[str, dict[str, str]] = {}
    if out is None:
        return found
    pos = 0
    for commit in commits:
        end = out.find(b"\n", pos)
        if end < 0:
            break
        header = out[pos:end].split()
        pos = end + 1
        if len(header) == 3 and header[1] == b"blob":
            size = int(header[2])
            found[commit] = parse_lock(out[pos : pos + size].decode(errors="replace"))
            pos += size + 1  # the blob and its newline
    return found


# ------------------------------------------------------------------------------------ the data
def _count_sources(csv_path: Path) -> dict[str, int] | None:
    """Images per ``source`` of a csv with that column; None when absent or without it."""
    if not csv_path.is_file():
        return None
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if "source" not in (reader.fieldnames or []):
            return None
        counts = Counter(row["source"] or "unknown" for row in reader)
    return dict(sorted(counts.items()))


def _card_sources(card: Path) -> dict[str, int] | None:
    """The sources a model card names on its "- Sources: ..." line ({name: count or 0})."""
    if not card.is_file():
        return None
    for line in card.read_text(errors="replace").splitlines():
        if line.startswith("- Sources:"):
            text = line.removeprefix("- Sources:").split(";")[0].split(". ")[0]
            found = re.findall(r"([\w.-]+)(?:\s*\((\d+)\))?", text)
            return {name: int(n or 0) for name, n in found if name != "unknown"} or None
    return None


def task_data(task: paths.TaskPaths, root: Path) -> tuple[dict, dict, str] | None:
    """(train sources, test sources, where they were read) of a task's pipeline data, or None."""
    for folder, what in ((task.augment, "augment cache index"), (task.split, "split")):

        def where(split: str, folder: Path = folder) -> Path:
            if folder == task.augment:
                return cache.split_path(root / folder, split) / cache.INDEX_FILE
            return root / folder / f"{split}.csv"

        train, test = _count_sources(where("train")), _count_sources(where("test"))
        if train is not None or test is not None:
            return train or {}, test or {}, f"{folder.as_posix()} ({what})"
    card = task.report_dir / "model_card.md"
    sources = _card_sources(root / card)
    if sources:
        return sources, sources, f"{card.as_posix()} (model card)"
    return None


def is_synthetic(source: str) -> bool:
    return source.lower().startswith("synthetic")


def describe(sources: dict[str, int]) -> str:
    """'synthetic phantoms (802 images)', 'kermany (5216 images), nih_bbox (880 images)'."""
    if not sources:
        return "unknown"
    parts = []
    for name, n in sources.items():
        label = "synthetic phantoms" if is_synthetic(name) else name
        parts.append(f"{label} ({n} images)" if n else label)
    return ", ".join(parts)


# -------------------------------------------------------------------------------- per model
@dataclass
class ModelProvenance:
    role: str  # classifier | detector
    path: str
    state: str  # absent | not in dvc.lock | matches dvc.lock (md5 ...) | differs from dvc.lock
    md5: str | None = None
    experiment: Experiment | None = None
    commit: str | None = None  # short sha of HEAD when its committed dvc.lock has this file
    trained_on: dict[str, int] = field(default_factory=dict)
    tested_on: dict[str, int] = field(default_factory=dict)
    data_from: str | None = None
    data_note: str = ""  # why the data are unknown
    metrics: dict[str, Any] = field(default_factory=dict)
    metrics_from: str | None = None
    registry: dict[str, Any] | None = None  # name, version, stage, commit (registry models)

    @property
    def synthetic(self) -> bool:
        return any(is_synthetic(s) for s in {**self.trained_on, **self.tested_on})

    @property
    def origin(self) -> str:
        if self.registry:
            r = self.registry
            stage = f", stage {r['stage']}" if r.get("stage") else ""
            return f"model registry `{r['name']}` {r['version']}{stage}, git commit `{self.commit}`"
        if self.experiment is not None:
            return f"DVC experiment `{self.experiment.name}` ({self.experiment.sha[:7]})"
        if self.commit:
            return f"git commit `{self.commit}`"
        return "no git commit or DVC experiment records this file"

    def data_text(self) -> str:
        if not self.data_from:
            return f"data unknown ({self.data_note})" if self.data_note else "data unknown"
        return (
            f"trained on {describe(self.trained_on)}; tested on {describe(self.tested_on)} "
            f"(from {self.data_from})"
        )

    def to_json(self) -> dict[str, Any]:
        """The predict command's record of this model (written beside each prediction)."""
        return {
            "model_file": self.path,  # not "path": Gradio would take the dict for a file
            "experiment": self.experiment.name if self.experiment else None,
            "commit": self.experiment.sha[:7] if self.experiment else self.commit,
            "dvc_lock": self.state,
            "trained_on": dict(self.trained_on),
            "tested_on": dict(self.tested_on),
            "data_from": self.data_from,
            "synthetic_data": self.synthetic,
            "data": self.data_text(),
            **({"registry": dict(self.registry)} if self.registry else {}),
        }

    def markdown(self) -> str:
        if self.md5 is None:
            return f"**{self.role.capitalize()}** `{self.path}`: absent"
        lines = [f"**{self.role.capitalize()}** `{self.path}`: {self.origin}; {self.state}"]
        data = self.data_text()
        data = f"⚠️ **{data}**" if self.synthetic else data
        lines.append(f"**{self.role.capitalize()} data:** {data}")
        if self.metrics:
            figures = ", ".join(f"{k} {_fmt(v)}" for k, v in self.metrics.items())
            on = describe(self.tested_on) if self.tested_on else "its test split"
            lines.append(f"**{self.role} (test on {on}):** {figures}")
        return "  \n".join(lines)


@dataclass
class Provenance:
    git_rev: str | None = None
    git_dirty: bool = False
    experiments: list[str] = field(default_factory=list)
    models: list[ModelProvenance] = field(default_factory=list)

    def of(self, role: str) -> list[ModelProvenance]:
        return [m for m in self.models if m.role == role]

    def synthetic_sentence(self) -> str:
        """One plain sentence when any served model's data is synthetic, else ''."""
        roles = sorted({m.role for m in self.models if m.synthetic})
        if not roles:
            return ""
        who, were = " and the ".join(roles), "were" if len(roles) > 1 else "was"
        return (
            f"SYNTHETIC DATA: the {who} {were} trained and tested on synthetic phantoms "
            "(procedurally drawn images, not X-rays): its figures say the pipeline works, "
            "nothing about real X-rays, and its output on a real image means nothing."
        )

    def synthetic_warning(self) -> str:
        """The page's prominent form of ``synthetic_sentence`` ('' when no data is synthetic)."""
        sentence = self.synthetic_sentence()
        if not sentence:
            return ""
        head, _, tail = sentence.partition(": its figures")
        return f"⚠️ **{head}**: its figures{tail}"

    def markdown(self, warning: bool = True) -> str:
        """The page's provenance text; ``warning=False`` leaves the synthetic-data warning out
        (the page shows it on its own, above everything)."""
        rev = self.git_rev or "unknown (not a git checkout)"
        lines = [f"**Code:** git `{rev}`" + (" (uncommitted changes)" if self.git_dirty else "")]
        if self.experiments:
            lines.append("**DVC experiment:** " + ", ".join(f"`{e}`" for e in self.experiments))
        if warning and self.synthetic_warning():
            lines.insert(0, self.synthetic_warning())
        blocks = ["  \n".join(lines)] + [m.markdown() for m in self.models]
        return "\n\n".join(blocks)


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _relative(path: Path, root: Path) -> str | None:
    try:
        return Path(os.path.relpath(path.resolve(), root.resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return None


def collect(
    classifiers: Sequence[Path] = (),
    detector: Path | None = None,
    root: Path = Path("."),
    metrics_files: dict[str, Path] | None = None,
    evaluated: Sequence[Path] = (),
    registry: dict[str, Any] | None = None,
) -> Provenance:
    """The provenance of the served models (absent ones reported as such).

    ``evaluated``: models the classification evaluation names (its decision block): their data
    and figures are the pipeline's. ``metrics_files``: {role: headline metrics file} (default:
    the pipeline's, under ``root``). ``registry``: {role: ``stages.serve.registry.ServedModel``}
    for models served from the model registry: their records (dvc.lock, model card, metrics)
    are those of the version's commit, in its cache folder, not this checkout's.
    """
    root = Path(root)
    git = _Git.read(root)
    prov = Provenance(git_rev=git.head[:7] if git.head else None, git_dirty=git.dirty)
    prov.experiments = git.experiments_at_head()
    workspace_lock = lock_md5s(root / paths.DVC_LOCK)
    if metrics_files is None:
        metrics_files = {role: root / task.metrics for role, task in ROLE_TASK.items()}
    evaluated_rel = {_relative(Path(p), root) for p in evaluated}
    data_cache: dict[str, tuple[dict, dict, str] | None] = {}
    roles = [("classifier", Path(p)) for p in classifiers]
    roles += [("detector", Path(detector))] if detector is not None else []
    registry = registry or {}
    for role, path in roles:
        served = registry.get(role)
        if served is not None:
            model, role_root = _registry_model(role, path, served), Path(served.root)
        else:
            model, role_root = _model(role, path, root, git, workspace_lock), root
        task = ROLE_TASK[role]
        rel = _relative(path, role_root)
        pipeline = (
            rel == task.model.as_posix()
            or rel in evaluated_rel
            or model.experiment is not None
            or model.state.startswith("matches")
            or model.commit is not None
        )
        if not path.is_file():
            model.data_note = "the file is absent"
        elif not pipeline:
            model.data_note = (
                f"not the pipeline's model: neither {task.model.as_posix()}, nor named by the "
                "evaluation, nor recorded in a dvc.lock"
            )
        else:
            if role not in data_cache:
                data_cache[role] = task_data(task, role_root)
            found = data_cache[role]
            if found is None:
                model.data_note = "no split, cache or model card of the pipeline found"
            else:
                model.trained_on, model.tested_on, model.data_from = found
            metrics_path = metrics_files.get(role)
            if served is not None:
                metrics_path = role_root / task.metrics
            if metrics_path is not None and Path(metrics_path).is_file():
                doc = read_json(metrics_path)
                keys = CLASSIFIER_KEYS if role == "classifier" else DETECTOR_KEYS
                model.metrics = {k: doc[k] for k in keys if isinstance(doc.get(k), int | float)}
                model.metrics_from = str(metrics_path)
        prov.models.append(model)
    for model in prov.models:
        if model.experiment and model.experiment.name not in prov.experiments:
            prov.experiments.append(model.experiment.name)
    return prov


def _registry_model(role: str, path: Path, served: Any) -> ModelProvenance:
    """A registry version: checked against the dvc.lock of its own commit."""
    model = ModelProvenance(role=role, path=str(path), state="absent")
    model.registry = served.to_json()
    model.commit = served.commit[:7]
    if not path.is_file():
        return model
    model.md5 = md5 = _md5(path)
    locked = lock_md5s(Path(served.root) / paths.DVC_LOCK).get(served.artifact.path)
    if locked == md5:
        model.state = f"matches the dvc.lock of {served.commit[:7]} (md5 {md5[:8]})"
    else:
        model.state = f"differs from the dvc.lock of {served.commit[:7]}"
    return model


def _model(
    role: str, path: Path, root: Path, git: _Git, workspace_lock: dict[str, str]
) -> ModelProvenance:
    model = ModelProvenance(role=role, path=str(path), state="absent")
    if not path.is_file():
        return model
    model.md5 = md5 = _md5(path)
    rel = _relative(path, root)
    locked = workspace_lock.get(rel) if rel else None
    if locked is None:
        model.state = "not in dvc.lock"
    elif locked == md5:
        model.state = f"matches dvc.lock (md5 {md5[:8]})"
    else:
        model.state = "differs from dvc.lock: run `dvc status` / `dvc repro`"
    if rel is None:
        return model
    # dvc.lock paths are relative to the DVC root (``root``), in every commit alike.
    at_head = [e for e in git.experiments if e.sha == git.head]
    if git.head and git.locks.get(git.head, {}).get(rel) == md5:
        model.commit = git.head[:7]  # the committed model (HEAD's own experiment, if any)
        model.experiment = at_head[0] if at_head else None
        return model
    for exp in git.experiments:  # e.g. after `dvc exp apply`: HEAD is the baseline
        if git.locks.get(exp.sha, {}).get(rel) == md5:
            model.experiment = exp
            break
    return model


__all__ = [
    "Experiment",
    "ModelProvenance",
    "Provenance",
    "collect",
    "describe",
    "experiment_name",
    "lock_md5s",
    "parse_lock",
    "task_data",
]
