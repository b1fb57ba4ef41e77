"""Download stage: get the configured data sources of one task and normalise them.

Inputs: params ``data.<task>`` (one ``source``/``path`` or a ``sources`` list; see
``stages.sources.config``), the source locations: a folder or archive below ``data.root``
(a dependency of this stage in dvc.yaml: an added, removed or changed image re-runs it; nothing
is copied into the repository) or an http(s) URL, downloaded into ``data/downloads/<url key>/``
(git-ignored; a changed URL or checksum fetches again, and so does, without a checksum, a file
the server reports changed: ``stages.common.fetch`` revalidates the cached download). Outputs, written atomically under
``data/raw/<task>/``: ``images/<source>/...`` (8-bit grayscale PNG), ``manifest.csv`` (columns
``stages.sources.intake.MANIFEST_COLUMNS``, sorted by path), ``report.json`` (counts, rejected
files with reasons, missing images, clipped/dropped boxes, and per source its ``origin``: what
was fetched from where, with the file's sha256, and ``refused``: entries of a source folder not
read, with the reason: a link that loops, is broken or leaves the source folder, an unreadable
folder) and, for detection, ``annotations.json`` (COCO, boxes in pixels of the written images);
for segmentation ``masks/<source>/...`` (each image's lung mask, 8-bit 0/255 PNG at the image's
size, same relative path) and a ``mask_path`` manifest column.

Patient ids are namespaced by data set name (``kermany:person63``), so two entries of one data set
(its train folder and its test folder with ``split: test``) share ids and the split stage sees
leaks across them; ``folder`` entries are unrelated collections, namespaced per entry.

Run: ``python -m stages.download --task classification|detection|segmentation``
``[--params params.yaml]``
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from collections import Counter
from pathlib import Path

import pandas as pd

from stages.common import fetch, paths
from stages.common.utils import StageError, atomic_dir, run_cli, task_arg_parser, write_json
from stages.common.walk import FolderWalk
from stages.sources import loader
from stages.sources.base import Box, Context, Notes, apply_limit
from stages.sources.config import ROOT_KEY, DataConfig, load_data_config
from stages.sources.intake import (
    MANIFEST_COLUMNS,
    SEGMENTATION_COLUMNS,
    IntakeResult,
    Item,
    ingest_all,
    output_names,
)
from stages.sources.synthetic import (
    generate_classification,
    generate_detection,
    generate_segmentation,
)

log = logging.getLogger("stages.download")

WHAT = {
    "kermany": "the Kermany 2018 chest X-ray set (Kaggle 'chest-xray-pneumonia' archive or "
    "Mendeley ChestXRay2017.zip)",
    "pneumoniamnist": "PneumoniaMNIST (pneumoniamnist.npz from MedMNIST, zenodo.org/records/10519652)",
    "covid_radiography": "the COVID-19 Radiography Database (Kaggle)",
    "folder": "your image folder (one sub-folder per class)",
    "chestxdet10": "ChestX-Det10 (train.json, test.json and the images, github.com/Deepwise-AILab/"
    "ChestX-Det10-Dataset)",
    "nih_bbox": "the NIH ChestX-ray14 BBox_List_2017.csv and its images (nihcc.app.box.com)",
    "lung_masks": "a lung mask set in the lung_masks layout (images/<name>.png + masks/<name>.png,"
    " e.g. Montgomery/Shenzhen from Kaggle 'Chest Xray Masks and Labels')",
}
PATIENT_PREFIX = {"nih_bbox": "nih"}  # NIH file names carry the NIH patient number
# Sources whose entries are not one data set: two `folder` entries are two unrelated collections
# (another hospital), whose per-file or regex patient ids must not be merged; namespaced per entry.
PER_ENTRY_PATIENTS = frozenset({"folder"})
# Sources that download a default file when ``path`` is null: (URL, md5).
DEFAULT_DOWNLOADS = {
    # MedMNIST's own Zenodo record of pneumoniamnist.npz (28 x 28) with its published md5
    "pneumoniamnist": (
        "https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1",
        "28209eda62fecd6e6a2d98b1501bb15f",
    ),
}


def _keys(names: list[str]) -> list[str]:
    """Folder / patient namespace per source: the name, suffixed when a name repeats."""
    seen: Counter = Counter()
    keys = []
    for name in names:
        seen[name] += 1
        keys.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return keys


def _resolve(src, task: str, cfg: DataConfig, work_dir: Path, param: str, stack) -> fetch.Fetched:
    if src.name == "synthetic":
        out = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=work_dir, prefix="synth-")))
        log.info("generating synthetic %s data", task)
        if task == "classification":
            root = generate_classification(cfg.synthetic, out)
        elif task == "segmentation":
            root = generate_segmentation(cfg.synthetic, out)
        else:
            root = generate_detection(cfg.synthetic, out)
        return fetch.Fetched(root, {"kind": "generated"})
    default = DEFAULT_DOWNLOADS.get(src.name) if src.path is None else None
    return fetch.resolve(
        src.path,
        work_dir,
        what=WHAT[src.name],
        param=param,
        root=Path(cfg.root),
        root_param=ROOT_KEY,
        default_url=default[0] if default else None,
        sha256=src.sha256,
        md5=src.md5 or (default[1] if default else None),
    )


def load_sources(cfg: DataConfig, task: str, work_dir: Path, stack) -> tuple[list[Item], list]:
    """Resolve and read every source (annotation errors surface here, before any pixel work)."""
    sources = cfg.effective_sources()
    items: list[Item] = []
    loaded = []
    for i, (src, key) in enumerate(zip(sources, _keys([s.name for s in sources]), strict=True)):
        param = f"data.{task}.sources[{i}].path" if cfg.sources else f"data.{task}.path"
        if task == "detection" and src.name == "synthetic" and src.classes is None:
            src = dataclasses.replace(src, classes=tuple(sorted(cfg.synthetic.classes)))
        fetched = _resolve(src, task, cfg, work_dir, param, stack)
        root = fetched.path
        # Patient ids are namespaced by data set, not by entry: two entries of one data set (its
        # train folder and its test folder) share patients, so the leak checks compare them.
        prefix = key if src.name in PER_ENTRY_PATIENTS else PATIENT_PREFIX.get(src.name, src.name)
        ctx = Context(
            key=key,
            patient_prefix=prefix,
            work_dir=work_dir,
            notes=Notes(),
            param=param,
            walk=FolderWalk(root),  # links may not leave the source's folder
        )
        records = apply_limit(loader(task, src.name)(root, src, ctx), src.limit, ctx.notes)
        if src.split == "test":
            records = [dataclasses.replace(r, source_split="test") for r in records]
        if not records:
            raise StageError(
                f"source {key} ({root}): no images to take; check {param} and the report of "
                f"what was found: {ctx.notes.as_dict()}"
            )
        log.info("source %s: %d images listed from %s", key, len(records), root)
        names = output_names(records, key)
        render = getattr(src, "render_size", None)
        bad = getattr(src, "bad_masks", "error")
        items += [
            Item(r, src.name, key, n, render, bad) for r, n in zip(records, names, strict=True)
        ]
        loaded.append((src, key, fetched, ctx.notes, len(records)))
    return items, loaded


def _categories(loaded: list) -> list[str]:
    fixed: list[str] = []
    found: set[str] = set()
    for src, _key, _root, notes, _n in loaded:
        fixed += [c for c in (src.classes or ()) if c not in fixed]
        found |= notes.categories
    return fixed + sorted(found - set(fixed))


def to_coco(manifest: pd.DataFrame, boxes: list[tuple[Box, ...]], categories: list[str]) -> dict:
    """COCO dict: image ids follow the manifest order, bbox = [x, y, w, h] in written pixels."""
    cat_id = {name: i + 1 for i, name in enumerate(categories)}
    images, annotations = [], []
    for image_id, (row, row_boxes) in enumerate(zip(manifest.itertuples(), boxes, strict=True), 1):
        images.append(
            {"id": image_id, "file_name": row.path, "width": row.width, "height": row.height}
        )
        for b in row_boxes:
            w, h = b.x2 - b.x1, b.y2 - b.y1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat_id[b.category],
                    "bbox": [b.x1, b.y1, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n} for n, i in cat_id.items()],
    }


def _report(task: str, manifest: pd.DataFrame, result: IntakeResult, loaded: list) -> dict:
    dup = manifest["sha256"].value_counts()
    report = {
        "task": task,
        "total_images": len(manifest),
        "labels": manifest["label"].value_counts().sort_index().to_dict(),
        "rejected": {
            "count": len(result.rejected),
            "by_reason": dict(sorted(Counter(r["reason"] for r in result.rejected).items())),
            "files": result.rejected,
        },
        "duplicates": {
            "hashes_with_copies": int((dup > 1).sum()),
            "images_in_duplicate_groups": int(dup[dup > 1].sum()),
        },
        "sources": [],
    }
    for src, key, fetched, notes, n in loaded:
        rows = manifest[manifest["path"].str.contains(f"/images/{key}/", regex=False)]
        report["sources"].append(
            {
                "name": src.name,
                "key": key,
                "location": src.path,
                "split": src.split or "the source's own",
                # what was fetched from where (a generated source's temp dir never reaches the
                # report, or every re-run would change data/raw's hash and re-run what follows)
                "origin": fetched.origin,
                "listed": n,
                "written": len(rows),
                "rejected": sum(r["source"] == key for r in result.rejected),
                "labels": rows["label"].value_counts().sort_index().to_dict(),
                **notes.as_dict(),
            }
        )
    if task == "detection":
        per_class = Counter(b.category for bs in result.boxes for b in bs)
        report["boxes"] = {
            "kept": result.box_stats["kept"],
            "clipped": result.box_stats["clipped"],
            "dropped_degenerate": result.box_stats["dropped_degenerate"],
            "dropped_outside": result.box_stats["dropped_outside"],
            "per_class": dict(sorted(per_class.items())),
            "dropped": result.dropped_boxes,
        }
    return report


def run(cfg: DataConfig, task: str, out_dir: Path, work_dir: Path, workers: int = 2) -> dict:
    """Build ``out_dir`` (data/raw/<task>) from the configured sources; returns the report."""
    work_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        items, loaded = load_sources(cfg, task, work_dir, stack)
        with atomic_dir(out_dir) as tmp:
            result = ingest_all(
                items, tmp / "images", out_dir / "images", task == "detection", workers
            )
            if not result.rows:
                raise StageError(
                    f"every one of the {len(items)} images was rejected "
                    f"({Counter(r['reason'] for r in result.rejected)}); check the source files"
                )
            columns = SEGMENTATION_COLUMNS if task == "segmentation" else MANIFEST_COLUMNS
            manifest = pd.DataFrame(result.rows, columns=list(columns))
            order = manifest["path"].argsort(kind="stable").to_numpy()
            manifest = manifest.iloc[order].reset_index(drop=True)
            manifest.to_csv(tmp / "manifest.csv", index=False, lineterminator="\n")
            if task == "detection":
                boxes = [result.boxes[i] for i in order]
                coco = to_coco(manifest, boxes, _categories(loaded))
                write_json(tmp / "annotations.json", coco)
            report = _report(task, manifest, result, loaded)
            write_json(tmp / "report.json", report)
    rej = report["rejected"]
    log.info(
        "download %s: %d images written %s; %d rejected %s; report: %s",
        task,
        report["total_images"],
        report["labels"],
        rej["count"],
        rej["by_reason"],
        out_dir / "report.json",
    )
    return report


def main(argv: list[str] | None = None) -> None:
    args = task_arg_parser("Download and normalise the data sources of one task.").parse_args(argv)
    cfg = load_data_config(args.task, args.params)
    run(cfg, args.task, paths.task_paths(args.task).raw, paths.DOWNLOADS)


if __name__ == "__main__":
    run_cli(main)
