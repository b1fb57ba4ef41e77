"""Where the served models came from: git revision, DVC experiment, dvc.lock match, key metrics.

Inputs: the git checkout (read-only ``git`` commands), ``dvc.lock``, the model files and
``metrics/classifier.json`` / ``metrics/detector.json``. Output: a ``Provenance`` whose
``markdown()`` the page shows. Everything is optional: a missing git, lock or metrics file just
leaves that line out. No run command.
"""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stages.common import paths
from stages.common.utils import read_json

CLASSIFIER_KEYS = ("accuracy", "roc_auc", "recall", "specificity", "f1", "threshold")
DETECTOR_KEYS = ("map_50", "map", "froc_avg_recall")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def lock_md5s(lock_path: Path) -> dict[str, str]:
    """{out path: md5} over every stage of dvc.lock."""
    if not lock_path.is_file():
        return {}
    doc = yaml.safe_load(lock_path.read_text()) or {}
    out: dict[str, str] = {}
    for stage in (doc.get("stages") or {}).values():
        for item in stage.get("outs") or []:
            if "md5" in item:
                out[str(item["path"])] = str(item["md5"])
    return out


@dataclass
class Provenance:
    git_rev: str | None = None
    git_dirty: bool = False
    experiments: list[str] = field(default_factory=list)
    models: dict[str, str] = field(default_factory=dict)  # path -> "matches dvc.lock" / ...
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)

    def markdown(self) -> str:
        rev = self.git_rev or "unknown (not a git checkout)"
        lines = [f"**Code:** git `{rev}`" + (" (uncommitted changes)" if self.git_dirty else "")]
        if self.experiments:
            lines.append("**DVC experiment:** " + ", ".join(f"`{e}`" for e in self.experiments))
        for path, state in self.models.items():
            lines.append(f"**{path}:** {state}")
        for name, values in self.metrics.items():
            figures = ", ".join(f"{k} {_fmt(v)}" for k, v in values.items())
            lines.append(f"**{name}:** {figures}")
        return "  \n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def collect(
    model_paths: list[Path],
    metrics_files: dict[str, Path] | None = None,
    lock_path: Path = Path("dvc.lock"),
) -> Provenance:
    """Read the provenance of ``model_paths`` (absent ones are reported as such)."""
    prov = Provenance(git_rev=_git("rev-parse", "--short", "HEAD"))
    if prov.git_rev:
        prov.git_dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
        refs = _git("for-each-ref", "--points-at", "HEAD", "--format=%(refname)", "refs/exps")
        prov.experiments = [r.rsplit("/", 1)[-1] for r in (refs or "").splitlines() if r]
    locked = lock_md5s(lock_path)
    for path in model_paths:
        if not path.is_file():
            prov.models[str(path)] = "absent"
        elif path.as_posix() not in locked:
            prov.models[str(path)] = "not in dvc.lock"
        elif _md5(path) == locked[path.as_posix()]:
            prov.models[str(path)] = f"matches dvc.lock (md5 {locked[path.as_posix()][:8]})"
        else:
            prov.models[str(path)] = "differs from dvc.lock: run `dvc status` / `dvc repro`"
    if metrics_files is None:
        metrics_files = {
            "classifier (test)": paths.CLASSIFICATION.metrics,
            "detector (test)": paths.DETECTION.metrics,
        }
    for name, path in metrics_files.items():
        if path.is_file():
            doc = read_json(path)
            keys = CLASSIFIER_KEYS if "roc_auc" in doc else DETECTOR_KEYS
            prov.metrics[name] = {k: doc[k] for k in keys if isinstance(doc.get(k), int | float)}
    return prov


__all__ = ["Provenance", "collect", "lock_md5s"]
