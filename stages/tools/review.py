"""review: two revisions or experiments side by side, with paired uncertainty on the same test
images, as a pull-request comment (markdown) and one self-contained HTML page.

Inputs:  A (baseline) and B (candidate): anything git resolves (commit, branch, tag) or a DVC
         experiment name (its ref under refs/exps; a queued experiment must have run). Every
         input is read at each revision without a checkout or network: with ``git show
         <rev>:<path>`` (the git-tracked cache:false outputs) reports/params/resolved.json
         (params.yaml when absent), reports/split/<task>.json, dvc.lock (md5 of the data
         outs), metrics/<model>.json, reports/<model>/{evaluation.json, predictions.csv|json,
         plots/*.csv, gradcam.png} and, when a segmenter exists,
         reports/segmenter/per_image.csv; from the local DVC cache, the DVC-tracked
         reports/live/<model>/ (training curves, training.json; left out when not cached).
Outputs: reports/review/<A>_vs_<B>.md (a pull-request comment as is: GitHub markdown, images by
         relative path, which `cml comment create` uploads), its PNGs in
         reports/review/<A>_vs_<B>/, and reports/review/<A>_vs_<B>.html (one page, images
         inlined, no external script or font: opens offline). The markdown path goes to stdout.
Run:     python -m stages.review A B [--out reports/review] [--resamples 2000] [--seed 0]
         make review A=main B=<exp>          .ci/review (CI: the base branch vs the PR head)

Statistics (docs/review.md says how to read them); every difference is B - A:
- classifier: paired bootstrap over test images (one set of resamples shared by A and B) of
  accuracy, sensitivity and specificity, each model at its own validation threshold; DeLong's
  test and interval for the difference of the two correlated ROC-AUCs;
- detector: paired bootstrap of mAP@0.5, recomputed per resample as COCO's 101-point
  interpolated AP at IoU 0.5 (greedy matching by score, at most 100 boxes per image and class),
  averaged over the classes with ground truth;
- segmenter: paired bootstrap of the mean per-image Dice.
When A and B were tested on different images, the intervals are unpaired (independent
resamples; DeLong's variances added).
"""

from __future__ import annotations

import base64
import difflib
import functools
import html
import io
import json
import logging
import re
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy.stats import norm, rankdata

from stages.common import paths
from stages.common.utils import (
    SEED,
    ArgumentParser,
    StageError,
    atomic_dir,
    float_in,
    int_in,
    run_cli,
    write_text_atomic,
)

log = logging.getLogger("stages.tools.review")

# DVC's experiment refs: refs/exps/<baseline sha[:2]>/<baseline sha[2:]>/<name>
EXP_REF = re.compile(r"refs/exps/([0-9a-f]{2})/([0-9a-f]{38,62})/([^/]+)")
DATA_ROOTS = (paths.RAW, paths.SPLIT, paths.AUGMENT)
BUDGET = 4_000_000  # floats per resample chunk (a chunk of weights is r x n)
IOU = 0.5
MAX_DETS = 100
MAX_DIFF_LINES = 300
RECALL_GRID = np.linspace(0.0, 1.0, 101)
COLOR = {"A": "#1f77b4", "B": "#d62728"}


# --------------------------------------------------------------------------- revisions


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, check=False, timeout=300
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise StageError(f"git {args[0]} failed: {exc}") from None


@dataclass(frozen=True)
class Rev:
    """A resolved revision: the name given, its commit, and what it is."""

    given: str
    sha: str
    kind: str  # "commit" | "experiment"
    baseline: str | None = None  # an experiment's baseline commit

    @property
    def short(self) -> str:
        return self.sha[:7]

    def describe(self) -> str:
        if self.kind == "experiment":
            return f"experiment `{self.given}` ({self.short}, baseline {self.baseline[:7]})"
        return f"`{self.given}` ({self.short})"


def resolve_rev(name: str, repo: Path = Path(".")) -> Rev:
    """A commit, branch or tag (git), else a DVC experiment name (refs/exps); one-line errors."""
    if not name or name.startswith("-"):
        raise StageError(f"{name!r}: give a commit, branch, tag or experiment name")
    if _git(repo, "rev-parse", "--git-dir").returncode != 0:
        raise StageError(f"{Path(repo).resolve()}: not a git repository (run from its root)")
    proc = _git(repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{name}^{{commit}}")
    if proc.returncode == 0:
        return Rev(name, proc.stdout.decode().strip(), "commit")
    listing = _git(repo, "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps")
    hits = []
    for line in listing.stdout.decode().splitlines():
        ref, _, sha = line.partition(" ")
        m = EXP_REF.fullmatch(ref)
        if m and m.group(3) == name:
            hits.append(Rev(name, sha, "experiment", m.group(1) + m.group(2)))
    if len(hits) > 1:  # one name run on several baselines: the one of HEAD, as DVC does
        head = _git(repo, "rev-parse", "HEAD").stdout.decode().strip()
        hits = [h for h in hits if h.baseline == head] or hits
        if len(hits) > 1:
            bases = ", ".join(h.baseline[:7] for h in hits)
            raise StageError(
                f"{name}: experiments of that name exist on several baselines ({bases}); "
                "give the experiment's commit instead (`dvc exp show --sha`)"
            )
    if hits:
        return hits[0]
    state = _unfinished_state(name, repo)
    if state == "queued":
        raise StageError(
            f"{name}: a queued experiment that has not run yet: run `dvc queue start` (or "
            "`dvc exp run --run-all`) first"
        )
    if state:
        raise StageError(f"{name}: experiment {state}, without results (`dvc queue status`)")
    raise StageError(
        f"{name}: unknown revision: not a commit, branch or tag, nor a DVC experiment "
        "(`git branch -a` and `dvc exp show` list them)"
    )


def _unfinished_state(name: str, repo: Path) -> str | None:
    """The state `dvc exp show --json` gives an experiment ``name`` that has no ref (queued,
    running, failed), or None (unknown name, or DVC unavailable)."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "dvc", "exp", "show", "--json"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        shown = json.loads(proc.stdout) if proc.returncode == 0 else []
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
        return None
    for baseline in shown or []:
        for exp in (baseline or {}).get("experiments") or []:
            names = {exp.get("name")} | {r.get("name") for r in exp.get("revs") or []}
            if name in names:
                return (exp.get("executor") or {}).get("state") or "without a ref"
    return None


class Tree:
    """The files of one revision: git-tracked ones read with `git show` (no checkout), the
    DVC-tracked training outputs (``DVC_FOLDERS``) from the local DVC cache at that revision."""

    def __init__(self, rev: Rev, label: str, repo: Path = Path(".")) -> None:
        self.rev, self.label, self.repo = rev, label, Path(repo)
        proc = _git(self.repo, "ls-tree", "-r", "-z", "--name-only", rev.sha)
        if proc.returncode != 0:
            raise StageError(f"{rev.given}: cannot list its files ({proc.stderr.decode().strip()})")
        self.files = set(proc.stdout.decode(errors="surrogateescape").split("\0")) - {""}

    @functools.cached_property
    def dvc_files(self) -> dict[str, bytes]:
        """Read on first use: a reader of git-tracked files only never opens the DVC cache."""
        found: dict[str, bytes] = {}
        for folder in DVC_FOLDERS:
            found.update(dvc_tracked(self.repo, self.rev.sha, folder))
        return found

    def has(self, path: str | Path) -> bool:
        return Path(path).as_posix() in self.files or Path(path).as_posix() in self.dvc_files

    def bytes(self, path: str | Path) -> bytes | None:
        if not self.has(path):
            return None
        if Path(path).as_posix() in self.dvc_files:
            return self.dvc_files[Path(path).as_posix()]
        proc = _git(self.repo, "show", f"{self.rev.sha}:{Path(path).as_posix()}")
        if proc.returncode != 0:
            why = proc.stderr.decode(errors="replace").strip().splitlines()[:1]
            raise StageError(f"{self.rev.given}: cannot read {path}: {' '.join(why)}")
        return proc.stdout

    def text(self, path: str | Path) -> str | None:
        data = self.bytes(path)
        return None if data is None else data.decode()

    def json(self, path: str | Path) -> Any:
        text = self.text(path)
        if text is None:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise StageError(f"{self.rev.given}: {path} is not valid JSON ({exc})") from None

    def under(self, folder: str | Path) -> list[str]:
        prefix = Path(folder).as_posix().rstrip("/") + "/"
        return sorted(f for f in (*self.files, *self.dvc_files) if f.startswith(prefix))


# the DVC-tracked outputs review reads: each model's training curves and summary
DVC_FOLDERS = tuple(paths.task_paths(t).live_dir.as_posix() for t in paths.TASKS)


def dvc_tracked(repo: Path, sha: str, folder: str) -> dict[str, bytes]:
    """{path: bytes} of the DVC-tracked ``folder`` as committed at ``sha``, from the local DVC
    cache (`dvc exp pull` / `dvc pull` bring a teammate's); {} when absent there or not cached."""
    from dvc.exceptions import DvcException
    from dvc.fs import DVCFileSystem
    from dvc_data.index.index import DataIndexError  # a folder whose listing is not cached

    try:
        fs = DVCFileSystem(repo=str(repo), rev=sha)
        if not fs.isdir(folder):
            return {}
        return {f: fs.read_bytes(f) for f in fs.find(folder)}
    except (DvcException, DataIndexError, OSError, KeyError):
        return {}


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Model:
    """Where one model's evaluation and training outputs live."""

    name: str  # classifier | detector | segmenter
    title: str
    metrics: Path
    report_dir: Path
    live_dir: Path
    predictions: Path | None


def _models() -> list[Model]:
    """The classifier, the detector and the segmenter (a revision without a model's evaluation
    skips it), with their per-image predictions (the segmenter's: its per_image.csv)."""
    out = []
    for task in paths.TASKS:
        p = paths.task_paths(task)
        out.append(
            Model(p.name, p.name.capitalize(), p.metrics, p.report_dir, p.live_dir, p.predictions)
        )
    return out


MODELS = _models()


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Interval:
    """A and B on one metric, B - A and its interval."""

    metric: str
    a: float
    b: float
    diff: float
    lo: float
    hi: float
    method: str
    p: float | None = None
    identical: bool = False  # every resample gave B - A = 0 (the same predictions)
    se: float | None = None  # DeLong's standard error of B - A

    @property
    def direction(self) -> str:
        if self.lo > 0:
            return "better"
        if self.hi < 0:
            return "worse"
        return "same"


Stat = Callable[[np.ndarray], np.ndarray]  # (r, n) image weights of r resamples -> (r,) values


def weight_chunks(n: int, resamples: int, seed: int, per: int) -> Iterator[np.ndarray]:
    """Bootstrap resamples of ``n`` images as (r, n) counts (how often each image was drawn),
    ``per`` resamples at a time; the same seed gives the same resamples."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < resamples:
        r = min(per, resamples - done)
        idx = rng.integers(0, n, size=(r, n)) + (np.arange(r) * n)[:, None]
        yield np.bincount(idx.ravel(), minlength=r * n).reshape(r, n).astype(np.float64)
        done += r


def bootstrap_diff(
    metric: str,
    stat_a: Stat,
    stat_b: Stat,
    n_a: int,
    n_b: int,
    paired: bool,
    resamples: int = 2000,
    seed: int = 0,
    ci: float = 0.95,
) -> Interval:
    """Percentile interval of stat_b - stat_a. Paired: one resample of the images feeds both
    (rows aligned); unpaired: A and B resampled independently."""
    if paired and n_a != n_b:
        raise ValueError(f"paired bootstrap needs aligned images: {n_a} vs {n_b}")
    a = float(stat_a(np.ones((1, n_a)))[0])
    b = float(stat_b(np.ones((1, n_b)))[0])
    per = max(1, BUDGET // max(n_a, n_b, 1))
    diffs = []
    with np.errstate(invalid="ignore", divide="ignore"):
        if paired:
            for w in weight_chunks(n_a, resamples, seed, per):
                diffs.append(stat_b(w) - stat_a(w))
        else:
            chunks = zip(
                weight_chunks(n_a, resamples, seed, per),
                weight_chunks(n_b, resamples, seed + 1, per),
                strict=True,
            )
            for wa, wb in chunks:
                diffs.append(stat_b(wb) - stat_a(wa))
    d = np.concatenate(diffs)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return Interval(metric, a, b, b - a, np.nan, np.nan, _method("bootstrap", paired))
    lo, hi = np.quantile(d, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    identical = paired and bool(np.all(d == 0)) and a == b
    return Interval(
        metric, a, b, b - a, float(lo), float(hi), _method("bootstrap", paired), None, identical
    )


def _method(name: str, paired: bool) -> str:
    return f"paired {name}" if paired else f"{name} (unpaired)"


def mean_stat(x: np.ndarray) -> Stat:
    x = np.asarray(x, dtype=np.float64)
    return lambda w: (w @ x) / w.sum(axis=1)


def ratio_stat(num: np.ndarray, den: np.ndarray) -> Stat:
    """sum(w * num) / sum(w * den): sensitivity (num = TP, den = positives) and the like;
    NaN for a resample without any ``den``."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return lambda w: (w @ num) / (w @ den)


def auc_stat(y: np.ndarray, p: np.ndarray) -> Stat:
    """ROC-AUC (Mann-Whitney, ties counted half) of weighted images; exact for a bootstrap
    resample, whose weights are how often each image was drawn."""
    y = np.asarray(y, np.float64)
    order = np.argsort(p, kind="mergesort")
    ps, ys = np.asarray(p)[order], y[order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])

    def stat(w: np.ndarray) -> np.ndarray:
        ws = w[:, order]
        pos = np.add.reduceat(ws * ys, starts, axis=1)
        neg = np.add.reduceat(ws * (1.0 - ys), starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg
        return (pos * (below + 0.5 * neg)).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1))

    return stat


def _placements(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components: per positive, the share of negatives scored below it;
    per negative, the share of positives scored above it (ties half). Their means are the AUC."""
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    pos, neg = p[y == 1], p[y == 0]
    m, n = pos.size, neg.size
    if m < 2 or n < 2:
        raise StageError("DeLong's test needs at least two positive and two negative test images")
    tz = rankdata(np.concatenate([pos, neg]))
    v10 = (tz[:m] - rankdata(pos)) / n
    v01 = 1.0 - (tz[m:] - rankdata(neg)) / m
    return v10, v01


def delong(
    y_a: np.ndarray,
    p_a: np.ndarray,
    p_b: np.ndarray,
    y_b: np.ndarray | None = None,
    ci: float = 0.95,
    metric: str = "ROC-AUC",
) -> Interval:
    """DeLong, DeLong & Clarke-Pearson (1988): AUC_B - AUC_A, its variance, z-test p and normal
    interval. Paired (``y_b`` None: the same images, labels ``y_a``): the covariance of the two
    curves enters; unpaired: the two variances add."""
    va10, va01 = _placements(y_a, p_a)
    vb10, vb01 = _placements(y_a if y_b is None else y_b, p_b)
    auc_a, auc_b = float(va10.mean()), float(vb10.mean())
    if y_b is None:
        s10 = np.cov(np.vstack([va10, vb10]))
        s01 = np.cov(np.vstack([va01, vb01]))
        contrast = np.array([-1.0, 1.0])
        var = contrast @ s10 @ contrast / va10.size + contrast @ s01 @ contrast / va01.size
    else:
        var = (
            va10.var(ddof=1) / va10.size
            + va01.var(ddof=1) / va01.size
            + vb10.var(ddof=1) / vb10.size
            + vb01.var(ddof=1) / vb01.size
        )
    diff = auc_b - auc_a
    se = float(np.sqrt(max(var, 0.0)))
    # no variance: the two curves rank every pair alike, so any difference is exact
    p_value = float(2 * norm.sf(abs(diff) / se)) if se > 0 else float(diff == 0)
    half = float(norm.ppf(1 - (1 - ci) / 2)) * se
    identical = y_b is None and np.array_equal(np.asarray(p_a), np.asarray(p_b))
    method = "DeLong" if y_b is None else "DeLong (unpaired)"
    return Interval(
        metric, auc_a, auc_b, diff, diff - half, diff + half, method, p_value, identical, se
    )


# --------------------------------------------------------------------------- detection AP


@dataclass
class Matched:
    """One revision's test detections matched to the ground truth at IoU 0.5 image by image
    (a match never depends on another image, so resampling images only reweights them)."""

    n_images: int
    gt: dict[int, np.ndarray] = field(default_factory=dict)  # class -> (n_images,) GT boxes
    det_image: dict[int, np.ndarray] = field(default_factory=dict)  # class -> image of each det
    det_tp: dict[int, np.ndarray] = field(default_factory=dict)  # class -> 1 = true positive


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of xyxy boxes."""
    ix = np.clip(
        np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[:, 0]), 0, None
    )
    iy = np.clip(
        np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[:, 1]), 0, None
    )
    inter = ix * iy
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def match_detections(images: Sequence[dict], iou: float = IOU) -> Matched:
    """Greedy matching as COCO's evaluation does it: per image and class, detections in
    descending score (at most 100), each to the unmatched ground truth of highest IoU >= iou."""
    out = Matched(len(images))
    rows: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    classes = set()
    for im in images:
        classes.update(int(c) for c in im["gt_classes"])
        classes.update(int(c) for c in im["classes"])
    for c in sorted(classes):
        out.gt[c] = np.zeros(len(images))
    for i, im in enumerate(images):
        gb = np.asarray(im["gt_boxes"], np.float64).reshape(-1, 4)
        gl = np.asarray(im["gt_classes"], np.int64).reshape(-1)
        db = np.asarray(im["boxes"], np.float64).reshape(-1, 4)
        ds = np.asarray(im["scores"], np.float64).reshape(-1)
        dl = np.asarray(im["classes"], np.int64).reshape(-1)
        for c in set(gl.tolist()) | set(dl.tolist()):
            g = gb[gl == c]
            out.gt[c][i] = len(g)
            sel = np.flatnonzero(dl == c)
            if sel.size == 0:
                continue
            sel = sel[np.argsort(-ds[sel], kind="mergesort")][:MAX_DETS]
            tp = np.zeros(sel.size)
            if len(g):
                ious = _iou(db[sel], g)
                taken = np.zeros(len(g), dtype=bool)
                for k in range(sel.size):
                    cand = np.where(taken, -1.0, ious[k])
                    j = int(np.argmax(cand))
                    if cand[j] >= min(iou, 1 - 1e-10):
                        taken[j], tp[k] = True, 1.0
            rows.setdefault(c, []).append((np.full(sel.size, i), ds[sel], tp))
    for c, parts in rows.items():
        img = np.concatenate([p[0] for p in parts])
        score = np.concatenate([p[1] for p in parts])
        tp = np.concatenate([p[2] for p in parts])
        order = np.argsort(-score, kind="mergesort")  # COCO's order: stable on image order
        out.det_image[c], out.det_tp[c] = img[order], tp[order]
    return out


def weighted_ap(
    det_image: np.ndarray, tp: np.ndarray, n_gt: np.ndarray, w: np.ndarray
) -> np.ndarray:
    """COCO's 101-point interpolated AP of one class for each row of image weights ``w``;
    NaN where the resample holds no ground truth of the class. ``n_gt``: (r,) GT counts."""
    r, d = w.shape[0], det_image.size
    out = np.full(r, np.nan)
    if d == 0:
        out[n_gt > 0] = 0.0
        return out
    step = max(1, BUDGET // d)  # rows at a time: memory stays flat in the number of boxes
    for start in range(0, r, step):
        rows = slice(start, start + step)
        ws = w[rows][:, det_image]
        ctp = np.cumsum(ws * tp, axis=1)
        cfp = np.cumsum(ws * (1.0 - tp), axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = ctp / n_gt[rows, None]
        precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).tiny)
        envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
        for i in np.flatnonzero(n_gt[rows] > 0):
            q = np.searchsorted(recall[i], RECALL_GRID, side="left")
            out[start + i] = np.where(q < d, envelope[i, np.minimum(q, d - 1)], 0.0).mean()
    return out


def map_stat(m: Matched) -> Stat:
    """mAP@0.5 of weighted images: the mean AP over classes with ground truth in the resample."""

    def stat(w: np.ndarray) -> np.ndarray:
        aps = []
        for c, gt in m.gt.items():
            empty = np.zeros(0, dtype=np.int64)
            det_image = m.det_image.get(c, empty)
            aps.append(weighted_ap(det_image, m.det_tp.get(c, empty.astype(float)), w @ gt, w))
        if not aps:
            return np.full(w.shape[0], np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample without any GT: NaN
            return np.nanmean(np.vstack(aps), axis=0)

    return stat


# --------------------------------------------------------------------------- pairing


def align(keys_a: Sequence[str], keys_b: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """Row orders putting A's and B's images in one order, or None when the sets differ."""
    ka, kb = np.asarray(keys_a, dtype=object), np.asarray(keys_b, dtype=object)
    if ka.size != kb.size:
        return None
    ia, ib = np.argsort(ka, kind="mergesort"), np.argsort(kb, kind="mergesort")
    if not np.array_equal(ka[ia], kb[ib]):
        return None
    return ia, ib


@dataclass
class ClsPreds:
    keys: np.ndarray
    y: np.ndarray  # 1 = positive class(es)
    p: np.ndarray  # probability of the positive class(es)
    pred: np.ndarray  # 1 = predicted positive at the model's validation threshold

    def take(self, idx: np.ndarray) -> ClsPreds:
        return ClsPreds(self.keys[idx], self.y[idx], self.p[idx], self.pred[idx])


def read_cls_predictions(text: str) -> ClsPreds:
    df = pd.read_csv(
        io.StringIO(text), dtype={"path": str, "sha256": str, "source": str}, keep_default_na=False
    )
    keys = (df["path"].astype(str) + "#" + df["sha256"].astype(str)).to_numpy()
    return ClsPreds(
        keys,
        df["positive"].to_numpy(np.int64),
        df["p_positive"].to_numpy(np.float64),
        df["predicted"].to_numpy(np.int64),
    )


def classifier_intervals(
    a: ClsPreds, b: ClsPreds, resamples: int, seed: int, ci: float
) -> tuple[list[Interval], bool]:
    """(intervals of accuracy, sensitivity, specificity and ROC-AUC, paired?)."""
    order = align(a.keys, b.keys)
    paired = order is not None
    if paired and not np.array_equal(a.y[order[0]], b.y[order[1]]):
        paired = False  # the positive class(es) changed: the same images, other labels
    if paired:
        a, b = a.take(order[0]), b.take(order[1])

    def stats(s: ClsPreds) -> dict[str, Stat]:
        hit = (s.pred == s.y).astype(float)
        return {
            "accuracy": mean_stat(hit),
            "sensitivity": ratio_stat(hit * s.y, s.y),
            "specificity": ratio_stat(hit * (1 - s.y), 1 - s.y),
        }

    sa, sb = stats(a), stats(b)
    out = [
        bootstrap_diff(k, sa[k], sb[k], a.y.size, b.y.size, paired, resamples, seed, ci) for k in sa
    ]
    if min(a.y.sum(), (1 - a.y).sum(), b.y.sum(), (1 - b.y).sum()) >= 2:
        out.append(delong(a.y, a.p, b.p, None if paired else b.y, ci))
    else:  # too few of a class for DeLong's variances: the bootstrap, NaN where one is missing
        aa, ab = auc_stat(a.y, a.p), auc_stat(b.y, b.p)
        out.append(
            bootstrap_diff("ROC-AUC", aa, ab, a.y.size, b.y.size, paired, resamples, seed, ci)
        )
    return out, paired


def read_det_predictions(text: str) -> tuple[dict[str, str], list[dict]]:
    doc = json.loads(text)
    return {str(k): v for k, v in doc.get("classes", {}).items()}, doc["images"]


def _det_keys(images: list[dict]) -> list[str]:
    return [f"{im.get('key', '')}#{im.get('sha256', '')}" for im in images]


def detector_interval(
    a: list[dict], b: list[dict], resamples: int, seed: int, ci: float
) -> tuple[Interval, bool]:
    order = align(_det_keys(a), _det_keys(b))
    paired = order is not None
    if paired:
        a, b = [a[i] for i in order[0]], [b[i] for i in order[1]]
    log.info("detector: matching boxes (%d + %d test images)", len(a), len(b))
    ma, mb = match_detections(a), match_detections(b)
    log.info("detector: bootstrap of mAP@0.5, %d resamples", resamples)
    iv = bootstrap_diff(
        "mAP@0.5", map_stat(ma), map_stat(mb), len(a), len(b), paired, resamples, seed, ci
    )
    return iv, paired


def segmenter_interval(
    a: pd.DataFrame, b: pd.DataFrame, resamples: int, seed: int, ci: float
) -> tuple[Interval, bool]:
    order = align(a["image"].astype(str).tolist(), b["image"].astype(str).tolist())
    paired = order is not None
    da, db = a["dice"].to_numpy(np.float64), b["dice"].to_numpy(np.float64)
    if paired:
        da, db = da[order[0]], db[order[1]]
    iv = bootstrap_diff(
        "Dice", mean_stat(da), mean_stat(db), da.size, db.size, paired, resamples, seed, ci
    )
    return iv, paired


# --------------------------------------------------------------------------- verdicts


def _fmt_ci(iv: Interval, ci: float) -> str:
    text = f"{iv.diff:+.3f}, {ci * 100:g} % CI {iv.lo:+.3f} to {iv.hi:+.3f}"
    if iv.p is not None:
        text += f", {iv.method.split()[0]} {fmt_p(iv.p)}"
    return text


def fmt_p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def verdict(intervals: Sequence[Interval], ci: float = 0.95, n: int | None = None) -> str:
    """One line: where B is better or worse than A (interval off 0), and what is not
    distinguishable."""
    if intervals and all(iv.identical for iv in intervals):
        return "identical predictions" + (f" on all {n} test images" if n else "")
    groups: dict[str, list[Interval]] = {"better": [], "worse": [], "same": []}
    for iv in intervals:
        groups[iv.direction].append(iv)
    parts = []
    for word in ("better", "worse"):
        if groups[word]:
            items = [f"{iv.metric} ({_fmt_ci(iv, ci)})" for iv in groups[word]]
            parts.append(f"B {word} on " + _and(items))
    if groups["same"]:
        parts.append(f"{_and([iv.metric for iv in groups['same']])} not distinguishable")
    return "; ".join(parts)


# --------------------------------------------------------------------------- documents


class Doc:
    """Blocks rendered twice: GitHub markdown (images by relative path) and one HTML page
    (images inlined). Inline text may use `code` and **bold**."""

    def __init__(self) -> None:
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def bullets(self, items: Sequence[str]) -> None:
        if items:
            self.blocks.append(("ul", list(items)))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self.blocks.append(("table", list(header), [[str(c) for c in r] for r in rows]))

    def images(self, items: Sequence[tuple[str, str]]) -> None:
        """(caption, file name in the assets folder) shown side by side."""
        if items:
            self.blocks.append(("img", list(items)))

    def code(self, text: str, lang: str = "") -> None:
        self.blocks.append(("code", lang, text))

    def details(self, summary: str, inner: Doc) -> None:
        if inner.blocks:
            self.blocks.append(("details", summary, inner))

    # ---- markdown

    def markdown(self, assets: str) -> str:
        out: list[str] = []
        for block in self.blocks:
            out.append(self._md(block, assets))
        return "\n\n".join(out) + "\n"

    def _md(self, block: tuple, assets: str) -> str:
        kind = block[0]
        if kind == "h":
            return "#" * block[1] + " " + block[2]
        if kind == "p":
            return block[1]
        if kind == "ul":
            return "\n".join(f"- {item}" for item in block[1])
        if kind == "table":
            header, rows = block[1], block[2]
            lines = [_md_row(header), "|" + "|".join("---" for _ in header) + "|"]
            return "\n".join(lines + [_md_row(r) for r in rows])
        if kind == "img":
            items = block[1]
            if len(items) == 1:
                caption, name = items[0]
                return f"![{caption}]({assets}/{name})"
            return "\n".join(
                [
                    _md_row([c for c, _ in items]),
                    "|" + "|".join("---" for _ in items) + "|",
                    _md_row([f"![{c}]({assets}/{n})" for c, n in items]),
                ]
            )
        if kind == "code":
            return f"```{block[1]}\n{block[2].rstrip()}\n```"
        if kind == "details":
            return (
                f"<details><summary>{html.escape(block[1])}</summary>\n\n"
                f"{block[2].markdown(assets).rstrip()}\n\n</details>"
            )
        raise ValueError(kind)

    # ---- html

    def html(self, title: str, assets: dict[str, bytes]) -> str:
        body = "\n".join(self._html(b, assets) for b in self.blocks)
        return HTML_PAGE.format(title=html.escape(title), body=body)

    def _html(self, block: tuple, assets: dict[str, bytes]) -> str:
        kind = block[0]
        if kind == "h":
            return f"<h{block[1]}>{_inline(block[2])}</h{block[1]}>"
        if kind == "p":
            return f"<p>{_inline(block[1])}</p>"
        if kind == "ul":
            return "<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block[1]) + "</ul>"
        if kind == "table":
            head = "".join(f"<th>{_inline(c)}</th>" for c in block[1])
            rows = "".join(
                "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in block[2]
            )
            return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
        if kind == "img":
            figs = []
            for caption, name in block[1]:
                data = base64.b64encode(assets[name]).decode()
                figs.append(
                    f'<figure><img alt="{html.escape(caption)}" '
                    f'src="data:image/png;base64,{data}"><figcaption>{_inline(caption)}'
                    "</figcaption></figure>"
                )
            return '<div class="row">' + "".join(figs) + "</div>"
        if kind == "code":
            return f"<pre><code>{html.escape(block[2])}</code></pre>"
        if kind == "details":
            inner = "\n".join(block[2]._html(b, assets) for b in block[2].blocks)
            return f"<details><summary>{html.escape(block[1])}</summary>{inner}</details>"
        raise ValueError(kind)


HTML_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 1200px; margin: 1em auto; padding: 0 1em;
       color: #222; line-height: 1.4; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }}
th {{ background: #f3f3f3; }}
code {{ background: #f3f3f3; padding: 0 0.2em; }}
pre {{ background: #f6f6f6; padding: 0.6em; overflow-x: auto; }}
.row {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0.5em 0; flex: 1 1 400px; }}
figure img {{ max-width: 100%; }}
figcaption {{ font-size: 0.9em; color: #555; }}
</style></head>
<body>
{body}
</body></html>
"""


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def _inline(text: str) -> str:
    out = html.escape(str(text), quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "rev"


# --------------------------------------------------------------------------- formatting


def _num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, int | float):
        text = json.dumps(v) if isinstance(v, list | dict) else str(v)
        return f"`{text}`" if text else "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}" if abs(v) >= 1000 or (v != 0 and abs(v) < 1e-3) else f"{v:.4f}"


def _delta(a: Any, b: Any) -> str:
    ok = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (a, b))
    if not ok:
        return "" if a == b else "changed"
    d = b - a
    return "0" if d == 0 else (f"{d:+d}" if isinstance(d, int) else f"{d:+.4f}")


def flatten(doc: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(doc, dict):
        out: dict[str, Any] = {}
        for k, v in doc.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): doc}


# --------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def png(fig) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def roc_pr_figure(curves: dict[str, dict]) -> bytes:
    """ROC and precision-recall of A and B on one axis each; the dot marks each model's
    operating point (its validation threshold)."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.4))
    for label, c in curves.items():
        color = COLOR[label]
        ax1.plot(c["fpr"], c["tpr"], color=color, label=f"{label} {c['name']} (AUC {c['auc']:.3f})")
        ax2.plot(c["recall"], c["precision"], color=color, label=f"{label} {c['name']}")
        if c.get("point"):
            fpr, tpr, prec = c["point"]
            ax1.plot([fpr], [tpr], "o", color=color)
            ax2.plot([tpr], [prec], "o", color=color)
    ax1.plot([0, 1], [0, 1], ":", color="grey", linewidth=1)
    ax1.set(xlabel="false positive rate", ylabel="sensitivity", title="ROC (test)")
    ax2.set(xlabel="recall (sensitivity)", ylabel="precision", title="Precision-recall (test)")
    for ax in (ax1, ax2):
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if ax is ax1 else "lower left", fontsize=8)
    return png(fig)


def confusion_figure(mats: dict[str, tuple[list[list[int]], list[str], str]]) -> bytes:
    plt = _plt()
    fig, axes = plt.subplots(1, len(mats), figsize=(4.2 * len(mats), 3.8))
    for ax, (label, (cm, names, title)) in zip(np.atleast_1d(axes), mats.items(), strict=True):
        arr = np.asarray(cm)
        ax.imshow(arr, cmap="Blues")
        for (i, j), v in np.ndenumerate(arr):
            color = "white" if v > arr.max() / 2 else "black"
            ax.text(j, i, str(v), ha="center", va="center", color=color)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set(xlabel="predicted", ylabel="true", title=f"{label}: {title}")
    fig.tight_layout()
    return png(fig)


def froc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray, dict, str]]) -> bytes:
    """Mean FROC of A and B on a log FP axis; dots at the reported operating points."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label, (x, y, points, name) in curves.items():
        keep = x > 0
        ax.plot(x[keep], y[keep], color=COLOR[label], label=f"{label} {name}")
        if points:
            xs = [float(k) for k in points]
            ax.plot(xs, list(points.values()), "o", color=COLOR[label])
    ax.set_xscale("log")
    ax.set(xlabel="false positives per image (log)", ylabel="sensitivity", title="FROC (test)")
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return png(fig)


def training_figure(curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]) -> bytes:
    """Per metric one panel: A and B (colour), train and val (line style) overlaid."""
    plt = _plt()
    metrics = sorted({k.rpartition("/")[2] for c in curves.values() for k in c})
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    style = {"train": "--", "val": "-"}
    for ax, metric in zip(axes.ravel(), metrics, strict=False):
        for label, c in curves.items():
            for key, (x, y) in sorted(c.items()):
                if key.rpartition("/")[2] != metric:
                    continue
                phase = key.rpartition("/")[0] or "all"
                ax.plot(x, y, style.get(phase, "-"), color=COLOR[label], label=f"{label} {phase}")
        ax.set(title=metric, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(metrics) :]:
        ax.axis("off")
    fig.tight_layout()
    return png(fig)


# --------------------------------------------------------------------------- the review


@dataclass
class Review:
    a: Tree
    b: Tree
    resamples: int = 2000
    seed: int = 0
    ci: float = 0.95
    assets: dict[str, bytes] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)

    @property
    def sides(self) -> tuple[Tree, Tree]:
        return self.a, self.b

    def add(self, name: str, data: bytes) -> str:
        self.assets[name] = data
        return name

    def figure(self, doc: Doc, caption: str, name: str, data: bytes) -> None:
        doc.images([(caption, self.add(name, data))])

    def ci_label(self) -> str:
        return f"{self.ci * 100:g} % CI"


def _models_at(r: Review) -> list[Model]:
    return [m for m in MODELS if r.a.has(m.metrics) or r.b.has(m.metrics)]


def params_section(r: Review, doc: Doc) -> None:
    doc.h(2, "Params")
    resolved = (paths.PARAMS_REPORT / paths.RESOLVED_PARAMS_NAME).as_posix()
    ra, rb = r.a.json(resolved), r.b.json(resolved)
    if ra is not None and rb is not None:
        fa, fb = flatten(ra), flatten(rb)
        keys = sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))
        if not keys:
            doc.p(f"Identical: every resolved param ({len(fa)} keys, defaults included).")
            return
        doc.p(f"{len(keys)} of {len(fa | fb)} resolved params differ (`{resolved}`):")
        doc.table(["param", "A", "B"], [[f"`{k}`", _num(fa.get(k)), _num(fb.get(k))] for k in keys])
        return
    pa, pb = r.a.text("params.yaml") or "", r.b.text("params.yaml") or ""
    missing = " and ".join(t.label for t in r.sides if t.json(resolved) is None)
    doc.p(f"`{resolved}` is absent at {missing} (an older revision): the raw `params.yaml` diff.")
    lines = list(
        difflib.unified_diff(
            pa.splitlines(True), pb.splitlines(True), "A/params.yaml", "B/params.yaml"
        )
    )
    if lines:
        inner = Doc()
        # a pull-request comment holds 65536 characters: the head of a long diff only
        more = (
            f"... {len(lines) - MAX_DIFF_LINES} more lines\n" if len(lines) > MAX_DIFF_LINES else ""
        )
        inner.code("".join(lines[:MAX_DIFF_LINES]) + more, "diff")
        doc.details(f"params.yaml: {len(lines)} diff lines", inner)
    else:
        doc.p("`params.yaml` is identical.")


def _lock_outs(tree: Tree) -> dict[str, str]:
    text = tree.text(paths.DVC_LOCK)
    if not text:
        return {}
    lock = yaml.safe_load(text) or {}
    out = {}
    for stage in (lock.get("stages") or {}).values():
        for o in stage.get("outs") or []:
            if "md5" in o:
                out[str(o["path"])] = str(o["md5"])
    return out


def data_section(r: Review, doc: Doc) -> None:
    doc.h(2, "Data")
    split_dir = paths.task_paths(paths.TASKS[0]).split_report.parent
    tasks = sorted(
        {Path(f).stem for t in r.sides for f in t.under(split_dir) if f.endswith(".json")}
    )
    locks = [_lock_outs(t) for t in r.sides]
    for task in tasks:
        doc.h(3, task.capitalize())
        path = (split_dir / f"{task}.json").as_posix()
        sa, sb = r.a.json(path) or {}, r.b.json(path) or {}
        rows = []
        for key, label in (("counts", "images"), ("boxes", "boxes")):
            ca, cb = sa.get(key) or {}, sb.get(key) or {}
            for split in [s for s in paths.SPLITS if s in ca or s in cb]:
                a_split, b_split = ca.get(split) or {}, cb.get(split) or {}
                for cls in sorted(a_split.keys() | b_split.keys(), key=lambda c: (c == "total", c)):
                    va, vb = a_split.get(cls), b_split.get(cls)
                    rows.append([f"{label}: {split}", cls, _num(va), _num(vb), _delta(va, vb)])
        pa, pb = sa.get("patients") or {}, sb.get("patients") or {}
        for split in [s for s in paths.SPLITS if s in pa or s in pb]:
            va, vb = pa.get(split), pb.get(split)
            rows.append([f"patients: {split}", "", _num(va), _num(vb), _delta(va, vb)])
        for key in ("patients_shared_across_splits", "duplicate_hashes_shared_across_splits"):
            if key in sa or key in sb:
                va, vb = sa.get(key), sb.get(key)
                rows.append(
                    ["leak check", key.replace("_", " "), _num(va), _num(vb), _delta(va, vb)]
                )
        if rows:
            doc.table(["split", "class", "A", "B", "B − A"], rows)
        else:
            doc.p(f"No `{path}` at either revision.")
        hashes = []
        for root in DATA_ROOTS:
            base = (root / task).as_posix()  # the task's output, or its parts (augment: fit, test)
            outs = {k for lock in locks for k in lock if k == base or k.startswith(f"{base}/")}
            for out in sorted(outs):
                ha, hb = (lock.get(out) for lock in locks)
                same = "identical" if ha == hb else "differs"
                hashes.append([f"`{out}`", _short_md5(ha), _short_md5(hb), same])
        doc.table(["data (dvc.lock md5)", "A", "B", ""], hashes)


def _short_md5(md5: str | None) -> str:
    return "-" if md5 is None else f"`{md5.removesuffix('.dir')[:10]}`"


def _metric_rows(ma: dict, mb: dict) -> list[list[str]]:
    fa, fb = flatten(ma or {}), flatten(mb or {})
    keys = list(dict.fromkeys([*fa, *fb]))
    return [
        [f"`{k}`", _num(fa.get(k)), _num(fb.get(k)), _delta(fa.get(k), fb.get(k))] for k in keys
    ]


def _interval_rows(ivs: Sequence[Interval]) -> list[list[str]]:
    rows = []
    for iv in ivs:
        p = "" if iv.p is None else fmt_p(iv.p).removeprefix("p = ").removeprefix("p ")
        span = "-" if np.isnan(iv.lo) else f"{iv.lo:+.4f} to {iv.hi:+.4f}"
        rows.append(
            [iv.metric, f"{iv.a:.4f}", f"{iv.b:.4f}", f"{iv.diff:+.4f}", span, p, iv.method]
        )
    return rows


@dataclass
class TaskOut:
    metrics: Doc = field(default_factory=Doc)
    figures: Doc = field(default_factory=Doc)


def classifier_task(r: Review, m: Model, out: TaskOut) -> str:
    preds = [t.text(m.predictions) for t in r.sides]
    evals = [t.json(m.report_dir / paths.EVALUATION_NAME) or {} for t in r.sides]
    if any(e.get("threshold") is not None for e in evals):
        ta, tb = (_num(e.get("threshold")) for e in evals)
        out.metrics.p(f"Each model at its own threshold (chosen on validation): A {ta}, B {tb}.")
    line = ""
    parsed = [read_cls_predictions(t) if t else None for t in preds]
    if all(parsed):
        log.info("classifier: paired bootstrap (%d resamples) and DeLong", r.resamples)
        ivs, paired = classifier_intervals(*parsed, r.resamples, r.seed, r.ci)
        n = parsed[0].y.size
        if not paired:
            out.metrics.p(
                f"**The test images or their labels differ** (A {parsed[0].y.size}, B "
                f"{parsed[1].y.size} images, "
                f"{len(set(parsed[0].keys) & set(parsed[1].keys))} in common): unpaired intervals."
            )
        else:
            out.metrics.p(f"Paired on the same {n} test images.")
        out.metrics.table(
            ["metric", "A", "B", "B − A", r.ci_label(), "p", "method"], _interval_rows(ivs)
        )
        line = verdict(ivs, r.ci, n if paired else None)
        if not paired:
            line += " (unpaired: the test images differ)"
    else:
        missing = " and ".join(t.label for t, p in zip(r.sides, parsed, strict=True) if p is None)
        note = (
            f"no `{m.predictions}` at {missing} (evaluated before per-image predictions were "
            "written): no intervals; re-run its evaluation (`dvc exp run`) to get them"
        )
        out.metrics.p(_sentence(note))
        line = note
    _classifier_figures(r, m, out.figures, parsed, evals)
    return line


def _classifier_figures(r: Review, m: Model, doc: Doc, parsed, evals) -> None:
    from sklearn.metrics import precision_recall_curve, roc_curve

    curves = {}
    for t, p, e in zip(r.sides, parsed, evals, strict=True):
        if p is not None and p.y.min() != p.y.max():
            fpr, tpr, _ = roc_curve(p.y, p.p)
            prec, rec, _ = precision_recall_curve(p.y, p.p)
            tp = int(((p.pred == 1) & (p.y == 1)).sum())
            point = (
                float(((p.pred == 1) & (p.y == 0)).sum() / max((p.y == 0).sum(), 1)),
                float(tp / max((p.y == 1).sum(), 1)),
                float(tp / max((p.pred == 1).sum(), 1)),
            )
            auc = float(auc_stat(p.y, p.p)(np.ones((1, p.y.size)))[0])
            curves[t.label] = {
                "fpr": fpr, "tpr": tpr, "precision": prec, "recall": rec,
                "auc": auc, "point": point, "name": t.rev.given,
            }  # fmt: skip
        else:
            roc = _csv(t, m.report_dir / paths.PLOTS_NAME / "roc.csv")
            pr = _csv(t, m.report_dir / paths.PLOTS_NAME / "pr.csv")
            if roc is not None and pr is not None:
                curves[t.label] = {
                    "fpr": roc["fpr"], "tpr": roc["tpr"], "precision": pr["precision"],
                    "recall": pr["recall"], "auc": float(e.get("roc_auc", np.nan)),
                    "point": None, "name": t.rev.given,
                }  # fmt: skip
    if curves:
        r.figure(doc, "ROC and precision-recall", "classifier_roc_pr.png", roc_pr_figure(curves))
    mats = {}
    for t, p, e in zip(r.sides, parsed, evals, strict=True):
        labels = e.get("confusion_labels") or ["negative", "positive"]
        if p is not None:  # the predictions the intervals use, positive vs the rest
            cm = [[int(((p.y == i) & (p.pred == j)).sum()) for j in (0, 1)] for i in (0, 1)]
            mats[t.label] = (cm, labels, t.rev.given)
        elif e.get("confusion_matrix"):
            mats[t.label] = (e["confusion_matrix"], labels, t.rev.given)
    if mats:
        r.figure(
            doc, "Confusion matrices (test)", "classifier_confusion.png", confusion_figure(mats)
        )
    cams = []
    for t in r.sides:
        data = t.bytes(m.report_dir / "gradcam.png")
        if data:
            name = r.add(f"classifier_gradcam_{t.label}.png", data)
            cams.append((f"Grad-CAM {t.label}: {t.rev.given}", name))
    doc.images(cams)


def _csv(t: Tree, path: Path) -> pd.DataFrame | None:
    text = t.text(path)
    return None if text is None else pd.read_csv(io.StringIO(text))


def detector_task(r: Review, m: Model, out: TaskOut) -> str:
    texts = [t.text(m.predictions) for t in r.sides]
    evals = [t.json(m.report_dir / paths.EVALUATION_NAME) or {} for t in r.sides]
    line = ""
    if all(texts):
        (names, ia), (_, ib) = (read_det_predictions(t) for t in texts)
        iv, paired = detector_interval(ia, ib, r.resamples, r.seed, r.ci)
        out.metrics.p(
            f"Paired on the same {len(ia)} test images."
            if paired
            else f"**The test images differ** (A {len(ia)}, B {len(ib)}): unpaired interval."
        )
        out.metrics.table(
            ["metric", "A", "B", "B − A", r.ci_label(), "p", "method"], _interval_rows([iv])
        )
        out.metrics.p(
            "mAP@0.5 here: COCO's 101-point interpolated AP at IoU 0.5 (greedy matching by score, "
            "at most 100 boxes per image and class), the mean over classes with ground truth, "
            "recomputed on every resample; `map_50` below is torchmetrics' (pycocotools) figure "
            "of the same definition."
        )
        line = verdict([iv], r.ci, len(ia) if paired else None)
        if not paired:
            line += " (unpaired: the test images differ)"
    else:
        missing = " and ".join(t.label for t, x in zip(r.sides, texts, strict=True) if not x)
        line = (
            f"no `{m.predictions}` at {missing} (evaluated before per-image predictions were "
            "written): no interval; re-run its evaluation (`dvc exp run`) to get it"
        )
        out.metrics.p(_sentence(line))
    ap = [e.get("ap_50_per_class") or {} for e in evals]
    classes = list(dict.fromkeys([*ap[0], *ap[1]]))
    out.metrics.table(
        ["AP@0.5 per class", "A", "B", "B − A"],
        [
            [c, _num(ap[0].get(c)), _num(ap[1].get(c)), _delta(ap[0].get(c), ap[1].get(c))]
            for c in classes
        ],
    )
    curves = {}
    for t, e in zip(r.sides, evals, strict=True):
        froc = _csv(t, m.report_dir / paths.PLOTS_NAME / "froc.csv")
        if froc is not None:
            x, y = froc["fps_per_image"].to_numpy(float), froc["sensitivity"].to_numpy(float)
            curves[t.label] = (x, y, e.get("froc_recall_at") or {}, t.rev.given)
    if curves:
        r.figure(out.figures, "FROC", "detector_froc.png", froc_figure(curves))
    return line


def segmenter_task(r: Review, m: Model, out: TaskOut) -> str:
    tables = [_csv(t, m.predictions) for t in r.sides]
    if all(x is not None for x in tables):
        log.info("segmenter: paired bootstrap of Dice (%d resamples)", r.resamples)
        iv, paired = segmenter_interval(*tables, r.resamples, r.seed, r.ci)
        out.metrics.table(
            ["metric", "A", "B", "B − A", r.ci_label(), "p", "method"], _interval_rows([iv])
        )
        line = verdict([iv], r.ci, len(tables[0]) if paired else None)
        return line if paired else line + " (unpaired: the test images differ)"
    missing = " and ".join(t.label for t, x in zip(r.sides, tables, strict=True) if x is None)
    line = f"no `{m.predictions}` at {missing}: no interval for Dice"
    out.metrics.p(_sentence(line))
    return line


TASKS = {"classifier": classifier_task, "detector": detector_task, "segmenter": segmenter_task}


def _training(r: Review, m: Model, doc: Doc) -> None:
    missing = [t.label for t in r.sides if not t.under(m.live_dir)]
    if missing:  # DVC-tracked: only what the local cache holds
        doc.p(
            f"Training curves of {' and '.join(missing)}: `{m.live_dir.as_posix()}/` is not in "
            "the local DVC cache (`dvc pull`, or `dvc exp pull origin <experiment>`, brings it)."
        )
    curves: dict[str, dict] = {}
    root = m.live_dir / "plots" / "metrics"
    for t in r.sides:
        found = {}
        for f in t.under(root):
            if not f.endswith(".tsv"):
                continue
            df = pd.read_csv(io.StringIO(t.text(f)), sep="\t")
            value = [c for c in df.columns if c not in ("step", "timestamp")]
            if "step" in df and value:
                key = Path(f).relative_to(root).with_suffix("").as_posix()
                found[key] = (df["step"].to_numpy(), df[value[-1]].to_numpy())
        if found:
            curves[t.label] = found
    if curves:
        r.figure(doc, "Training curves", f"training_{m.name}.png", training_figure(curves))
    summary = [t.json(m.live_dir / paths.TRAINING_NAME) or {} for t in r.sides]
    rows = []
    for k in dict.fromkeys([*summary[0], *summary[1]]):
        va, vb = summary[0].get(k), summary[1].get(k)
        if isinstance(va, list | dict) or isinstance(vb, list | dict):
            continue
        rows.append([f"`{k}`", _num(va), _num(vb), _delta(va, vb)])
    inner = Doc()
    inner.table(["training.json", "A", "B", "B − A"], rows)
    doc.details(f"Training summary ({(m.live_dir / paths.TRAINING_NAME).as_posix()})", inner)


def build(r: Review) -> Doc:
    models = _models_at(r)
    if not models:
        raise StageError("no model was evaluated at either revision")
    outs: dict[str, TaskOut] = {}
    lines = []
    for m in models:
        out = outs[m.name] = TaskOut()
        here = [t.has(m.metrics) for t in r.sides]
        if not all(here):
            only = r.a if here[0] else r.b
            lines.append(f"**{m.title}**: evaluated at {only.label} only")
        else:
            lines.append(f"**{m.title}**: {TASKS[m.name](r, m, out)}")
        ma, mb = (t.json(m.metrics) or {} for t in r.sides)
        inner = Doc()
        inner.table(["metric", "A", "B", "B − A"], _metric_rows(ma, mb))
        out.metrics.details(f"Every figure of {m.metrics.as_posix()}", inner)
        log.info("%s: figures", m.name)
        _training(r, m, out.figures)

    doc = Doc()
    doc.h(1, f"Review: {r.a.rev.given} vs {r.b.rev.given}")
    doc.p(
        f"A (baseline) = {r.a.rev.describe()}, B (candidate) = {r.b.rev.describe()}. "
        f"Differences are B − A; intervals are {r.ci * 100:g} % (paired bootstrap over the test "
        f"images, {r.resamples} resamples, seed {r.seed}; DeLong for ROC-AUC). How to read them: "
        "`docs/review.md`."
    )
    doc.h(2, "Summary")
    doc.bullets(lines)
    params_section(r, doc)
    data_section(r, doc)
    doc.h(2, "Metrics")
    for m in models:
        doc.h(3, m.title)
        doc.blocks.extend(outs[m.name].metrics.blocks)
    doc.h(2, "Figures")
    for m in models:
        if outs[m.name].figures.blocks:
            doc.h(3, m.title)
            doc.blocks.extend(outs[m.name].figures.blocks)
    return doc


# the bounds of --resamples and --ci, checked by the command line and by review() alike
MIN_RESAMPLES = 100
CI_LEVELS = (0.5, 1.0)  # [low, high)


def review(
    a: str,
    b: str,
    out_dir: Path = paths.REVIEW,
    resamples: int = 2000,
    seed: int = 0,
    ci: float = 0.95,
    repo: Path = Path("."),
) -> Path:
    """Write the markdown, its figures and the HTML page; return the markdown path."""
    if resamples < MIN_RESAMPLES:
        raise StageError(
            f"--resamples {resamples}: use at least {MIN_RESAMPLES} (2000 is the default)"
        )
    if not CI_LEVELS[0] <= ci < CI_LEVELS[1]:
        raise StageError(f"--ci {ci}: give a level in [{CI_LEVELS[0]}, {CI_LEVELS[1]}), e.g. 0.95")
    revs = [resolve_rev(a, repo), resolve_rev(b, repo)]
    trees = [Tree(rev, label, repo) for rev, label in zip(revs, "AB", strict=True)]
    for t in trees:
        if not any(t.has(m.metrics) for m in MODELS):
            wanted = ", ".join(m.metrics.as_posix() for m in MODELS[:2])
            raise StageError(
                f"{t.rev.given} ({t.rev.short}) has no evaluation outputs ({wanted}): run "
                "`dvc repro` / `dvc exp run` first and commit the results"
            )
    log.info("A = %s, B = %s", revs[0].describe(), revs[1].describe())
    r = Review(trees[0], trees[1], resamples, seed, ci)
    doc = build(r)
    stem = f"{file_safe(a)}_vs_{file_safe(b)}"
    out_dir = Path(out_dir)
    with atomic_dir(out_dir / stem) as tmp:
        for name, data in r.assets.items():
            (tmp / name).write_bytes(data)
    md_path = out_dir / f"{stem}.md"
    write_text_atomic(md_path, doc.markdown(stem))
    html_path = out_dir / f"{stem}.html"
    write_text_atomic(html_path, doc.html(f"Review: {a} vs {b}", r.assets))
    log.info("wrote %s, %s and %s/", md_path, html_path, out_dir / stem)
    return md_path


def main(argv: list[str] | None = None) -> Path:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="baseline: commit, branch, tag or experiment name")
    parser.add_argument("b", help="candidate: commit, branch, tag or experiment name")
    parser.add_argument("--out", type=Path, default=paths.REVIEW, help="report folder")
    parser.add_argument(
        "--resamples", type=int_in(MIN_RESAMPLES), default=2000, help="bootstrap resamples"
    )
    parser.add_argument("--seed", type=SEED, default=0, help="seed of the resamples")
    parser.add_argument(
        "--ci", type=float_in(*CI_LEVELS, hi_open=True), default=0.95, help="interval level"
    )
    parser.add_argument("--repo", type=Path, default=Path("."), help="git repository")
    args = parser.parse_args(argv)
    md = review(args.a, args.b, args.out, args.resamples, args.seed, args.ci, args.repo)
    print(md)
    return md


if __name__ == "__main__":
    run_cli(main)
