"""Split stage: train / val / test of one task, grouped by patient and by exact duplicate.

Inputs: ``data/raw/<task>/manifest.csv`` (+ ``annotations.json`` for detection; ``report.json``
names the test sources) and params ``split.<task>`` (mode random | official, ratios, seed,
min_val_fraction). Outputs:
``data/split/<task>/{train,val,test}.csv`` (manifest columns + ``split``, sorted by path;
byte-identical for the same inputs and seed), detection also ``{train,val,test}.json`` (COCO
subsets with the full category list, ids renumbered), and ``reports/split/<task>.json`` (counts
per split and label, patients per split, leak checks, boxes per class: git-tracked, so a review
can compare the data of two revisions without the DVC cache).

- random: stratified by label, grouped by patient; images with the same pixels (sha256) are merged
  into one group with their patients (union-find), so neither a patient nor a duplicate image can
  cross splits. A source's own test folder is re-split, but the images of a ``split: test``
  sources entry (an external test set; found through ``report.json``) stay test: the others are
  split by the ratios (their test share joins them), after dropping the images sharing a patient
  or pixels with the test source, as official mode does.
- official: the source's ``test`` rows are the test split untouched; the source's ``val`` is kept
  when it has at least ``min_val_fraction`` x train images, else it joins train and validation is
  carved from train by patient. Train/val rows sharing a patient or an image with test, or linked
  to a test image through the duplicate groups, are dropped (counted as
  ``dropped_overlapping_test``). The test rows are those the source marks ``test``: its own test
  folder, or every image of a ``split: test`` entry (an external test set). Sources without a
  test split cannot use this mode.

Run: ``python -m stages.split --task classification|detection [--params params.yaml]``
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from stages.common import paths
from stages.common.config import load_section
from stages.common.paths import SPLITS
from stages.common.split_config import SplitConfig
from stages.common.utils import (
    StageError,
    atomic_dir,
    read_json,
    run_cli,
    task_arg_parser,
    write_json,
)

log = logging.getLogger("stages.split")


def duplicate_groups(df: pd.DataFrame) -> np.ndarray:
    """Group id per row: rows sharing a patient or a pixel hash, transitively (union-find)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for pid, sha in zip(df["patient_id"], df["sha256"], strict=True):
        a, b = find(f"p:{pid}"), find(f"h:{sha}")
        if a != b:
            parent[max(a, b)] = min(a, b)
    roots = [find(f"p:{pid}") for pid in df["patient_id"]]
    numbering: dict[str, int] = {}  # by first appearance, so ids follow the row order
    return np.array([numbering.setdefault(r, len(numbering)) for r in roots], dtype=np.int64)


def assign_groups(
    labels: pd.Series, groups: np.ndarray, ratios: tuple[float, ...], seed: int
) -> np.ndarray:
    """Split index per row: greedy stratified assignment of whole groups.

    Groups are shuffled with the seed, then taken largest first (stable), each going to the
    split whose label counts lag their target most, weighted by the group's label mix. Counts end
    within about one group size of ratio x total for every label.
    """
    names = sorted(labels.unique())
    lab = pd.Categorical(labels, categories=names).codes
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    counts = np.zeros((n_groups, len(names)), dtype=np.int64)
    np.add.at(counts, (groups, lab), 1)
    shares = np.asarray(ratios, dtype=np.float64) / sum(ratios)  # official: (train, val) only
    target = np.outer(shares, counts.sum(axis=0))
    current = np.zeros_like(target)
    order = np.random.default_rng(seed).permutation(n_groups)
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]
    closed = np.asarray(ratios) <= 0
    choice = np.zeros(n_groups, dtype=np.int64)
    for g in order:
        c = counts[g]
        need = ((target - current) * c).sum(axis=1) / c.sum()
        need[closed] = -np.inf
        s = int(np.argmax(need))  # ties -> the earlier split (train)
        choice[g] = s
        current[s] += c
    return choice[groups]


def test_source_rows(df: pd.DataFrame, in_dir: Path) -> pd.Series:
    """Rows of the ``split: test`` sources entries (external test sets), found through the
    download report (``sources[].split``/``key``; their images are under ``images/<key>/``)."""
    path = in_dir / "report.json"
    rows = pd.Series(False, index=df.index)
    if not path.is_file():
        return rows
    sources = [s for s in read_json(path).get("sources", []) if s.get("split") == "test"]
    for src in sources:
        mine = df["path"].str.contains(f"(?:^|/)images/{re.escape(src['key'])}/", regex=True)
        if int(mine.sum()) != src.get("written", int(mine.sum())):
            raise StageError(
                f"{in_dir}: report.json lists {src['written']} images of the test source "
                f"{src['key']}, the manifest {int(mine.sum())}; re-run the download stage"
            )
        rows |= mine
    return rows


def _test_leaks(df: pd.DataFrame, is_test: pd.Series) -> tuple[pd.Series, dict]:
    """Non-test rows sharing a patient or the pixels with a test image, or linked to one through
    the duplicate groups (an image of a patient whose other image equals a test image: the same
    person under two ids); they are dropped, counted by kind."""
    groups_all = duplicate_groups(df)
    leak = ~is_test & pd.Series(
        np.isin(groups_all, np.unique(groups_all[is_test.to_numpy()])), index=df.index
    )
    same_patient = leak & df["patient_id"].isin(set(df.loc[is_test, "patient_id"]))
    same_pixels = leak & ~same_patient & df["sha256"].isin(set(df.loc[is_test, "sha256"]))
    info = {
        "dropped_overlapping_test": int(leak.sum()),
        "dropped_overlapping_test_by": {
            "same_patient": int(same_patient.sum()),
            "same_pixels": int(same_pixels.sum()),
            "linked": int((leak & ~same_patient & ~same_pixels).sum()),
        },
    }
    return leak, info


def split_random(
    df: pd.DataFrame, cfg: SplitConfig, external: pd.Series | None = None
) -> tuple[pd.Series, dict]:
    """Grouped stratified split by ``cfg.ratios``; the rows of a test source (``external``)
    stay test, and the rows leaking into them are dropped, as in official mode."""
    external = pd.Series(False, index=df.index) if external is None else external
    n_marked = int(((df["source_split"] == "test") & ~external).sum())
    if n_marked:
        log.info(
            "mode random re-splits the %d images their source marks as its own test split; "
            "set mode: official to keep them as the test split",
            n_marked,
        )
    if not external.any():
        idx = assign_groups(df["label"], duplicate_groups(df), cfg.ratios, cfg.seed)
        return pd.Series(np.array(SPLITS)[idx], index=df.index), {}
    split = pd.Series("", index=df.index, dtype=object)
    split[external] = "test"
    leak, info = _test_leaks(df, external)
    pool = ~external & ~leak
    sub = df[pool]
    idx = assign_groups(sub["label"], duplicate_groups(sub), cfg.ratios, cfg.seed)
    split[pool] = np.array(SPLITS)[idx]
    log.info(
        "mode random: the %d images of the split: test source(s) stay test; %d other images "
        "sharing a patient or pixels with them dropped %s; the other %d split by patient %s",
        int(external.sum()),
        info["dropped_overlapping_test"],
        info["dropped_overlapping_test_by"],
        int(pool.sum()),
        list(cfg.ratios),
    )
    return split, info


def split_official(df: pd.DataFrame, cfg: SplitConfig) -> tuple[pd.Series, dict]:
    src = df["source_split"]
    is_test = src == "test"
    if not is_test.any():
        found = sorted(set(src) - {""}) or ["none"]
        raise StageError(
            "split mode 'official' needs a source with its own test split, but the manifest has "
            f"none (source_split values: {', '.join(found)}): add a test source (a "
            "data.<task>.sources entry with split: test) or use mode: random"
        )
    split = pd.Series("", index=df.index, dtype=object)
    split[is_test] = "test"
    leak, info = _test_leaks(df, is_test)
    pool = ~is_test & ~leak
    n_val, n_train = int((pool & (src == "val")).sum()), int((pool & (src != "val")).sum())
    sub = df[pool]
    groups = duplicate_groups(sub)
    if n_val > 0 and n_val >= cfg.min_val_fraction * n_train:
        # keep the source's val, but a group touching train rows goes to train entirely
        has_train = pd.Series(sub["source_split"].ne("val").to_numpy()).groupby(groups).any()
        to_train = has_train.to_numpy()[groups]
        split[pool] = np.where(to_train, "train", "val")
        info["val"] = "source val kept"
        info["val_moved_to_train"] = int(
            (to_train & sub["source_split"].eq("val").to_numpy()).sum()
        )
    else:
        idx = assign_groups(sub["label"], groups, cfg.ratios[:2], cfg.seed)  # val/(train+val)
        split[pool] = np.array(["train", "val"])[idx]
        info["val"] = f"carved from train by patient (source val had {n_val} images, joined train)"
    return split, info


def _counts(labels: pd.Series, names: list[str]) -> dict[str, int]:
    """Images per label (zeros included, so every split lists the same keys) and the total."""
    counts = labels.value_counts()
    return {**{n: int(counts.get(n, 0)) for n in names}, "total": len(labels)}


def _shared(df: pd.DataFrame, column: str) -> int:
    return int((df.groupby(column)["split"].nunique() > 1).sum())


def coco_subset(coco: dict, paths: list[str]) -> dict:
    """Images (in ``paths`` order, ids from 1) and their annotations; all categories kept."""
    by_name = {im["file_name"]: im for im in coco["images"]}
    anns: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    images, annotations = [], []
    for new_id, path in enumerate(paths, start=1):
        if path not in by_name:
            raise StageError(f"annotations.json has no image {path}; re-run the download stage")
        im = by_name[path]
        images.append({**im, "id": new_id})
        for a in anns.get(im["id"], []):
            annotations.append({**a, "id": len(annotations) + 1, "image_id": new_id})
    return {"images": images, "annotations": annotations, "categories": coco["categories"]}


def run(cfg: SplitConfig, task: str, in_dir: Path, out_dir: Path, report_path: Path) -> dict:
    """Split ``in_dir``'s manifest into ``out_dir``; returns the summary (also written to
    ``report_path``)."""
    manifest = in_dir / "manifest.csv"
    if not manifest.is_file():
        raise StageError(f"{manifest} not found; run the download stage first")
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    df = df.sort_values("path", kind="stable").reset_index(drop=True)
    if cfg.mode == "official":
        split, info = split_official(df, cfg)
    else:
        split, info = split_random(df, cfg, test_source_rows(df, in_dir))
    df = df.assign(split=split)
    df = df[df["split"] != ""]
    if not (df["split"] == "train").any():
        raise StageError(
            f"the train split is empty ({len(df)} images, mode {cfg.mode}, ratios "
            f"{list(cfg.ratios)}); add data or change split.{task}"
        )
    labels = sorted(df["label"].unique())
    metrics = {
        "mode": cfg.mode,
        "seed": cfg.seed,
        "total": len(df),
        "counts": {s: _counts(df[df["split"] == s]["label"], labels) for s in SPLITS},
        "patients": {s: int(df.loc[df["split"] == s, "patient_id"].nunique()) for s in SPLITS},
        "patients_shared_across_splits": _shared(df, "patient_id"),
        "duplicate_hashes_shared_across_splits": _shared(df, "sha256"),
        **info,
    }
    if metrics["patients_shared_across_splits"] or metrics["duplicate_hashes_shared_across_splits"]:
        raise StageError(f"split leaks patients or duplicates across splits: {metrics}")
    coco = read_json(in_dir / "annotations.json") if task == "detection" else None
    with atomic_dir(out_dir) as tmp:
        for s in SPLITS:
            part = df[df["split"] == s]
            if part.empty:
                log.warning("split %s of %s is empty", s, task)
            part.to_csv(tmp / f"{s}.csv", index=False, lineterminator="\n")
            if coco is not None:
                sub = coco_subset(coco, part["path"].tolist())
                write_json(tmp / f"{s}.json", sub)
                names = {c["id"]: c["name"] for c in coco["categories"]}
                per_class = pd.Series([names[a["category_id"]] for a in sub["annotations"]])
                metrics.setdefault("boxes", {})[s] = {
                    n: int((per_class == n).sum()) for n in names.values()
                }
    write_json(report_path, metrics)
    log.info(
        "split %s (%s): %s; patients/duplicates shared across splits: 0/0",
        task,
        cfg.mode,
        {s: metrics["counts"][s]["total"] for s in SPLITS},
    )
    return metrics


def main(argv: list[str] | None = None) -> None:
    args = task_arg_parser("Split one task's manifest into train/val/test.").parse_args(argv)
    cfg = load_section(SplitConfig, f"split.{args.task}", args.params)
    p = paths.task_paths(args.task)
    run(cfg, args.task, p.raw, p.split, p.split_report)


if __name__ == "__main__":
    run_cli(main)
