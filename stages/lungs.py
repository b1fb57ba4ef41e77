"""lungs@<task>: the segmenter's lungs of a task's films, for lung-aware preprocessing and for the
meter of where the classifier looks.

Inputs:  data/split/<task>/{train,val,test}.csv (the films, by their data/raw paths and sha256),
         models/segmenter.pt (``stages.segmenter.predict``), params ``augment.<task>.lungs`` and
         ``lungs_framings`` (the margins are applied by augment, from the tight boxes written
         here)
Outputs: data/lungs/<task>/
         preprocess/  what the cache's preprocessing reads: lungs.json (the mode and the
                      training framings; with either, also the segmenter's md5) and, with crop |
                      mask or framings, boxes.csv (one row per film: path, sha256, the lungs'
                      tight box x0, y0, x1, y1, found, the lungs' share of the film) and
                      masks/<sha256>.png.
                      With ``lungs: none`` and no ``lungs_framings`` it is one constant line, so
                      a new segmenter never re-runs the classifier's cache or training.
         meter/       always: the test films' lungs (boxes.csv, masks/), which evaluate's
                      ``cam_in_lungs`` compares the Grad-CAM maps with.
         Masks are 0/255 PNG at the film's size, named by the film's sha256.
Run:     python -m stages.lungs --task classification [--params params.yaml]

``python -m stages.augment`` applies them (``stages.common.lungs.apply``) before resizing, and
the classifier's sidecar records the mode and the segmenter's md5, so serving repeats it.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from stages.common import paths
from stages.common.cache import read_index
from stages.common.config import get_section, parse, read_params
from stages.common.imageio import ImageRejected, load_gray
from stages.common.lungs import LungsConfig
from stages.common.paths import SPLITS
from stages.common.utils import ArgumentParser, StageError, atomic_parts, run_cli, write_json

log = logging.getLogger("stages.lungs")
TASKS_WITH_LUNGS = ("classification",)  # the tasks whose augment section has the lungs keys
BATCH = 16
COLUMNS = ["path", "sha256", "x0", "y0", "x1", "y1", "found", "lung_share"]


def load_config(task: str, params_path: str | Path) -> LungsConfig:
    """The lungs mode and framings of ``augment.<task>`` (the rest of the section is augment's)."""
    section = get_section(read_params(params_path), f"augment.{task}") or {}
    keys = ("lungs", "lungs_framings")
    return parse(LungsConfig, {k: section[k] for k in keys if k in section}, f"augment.{task}")


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def films(split_dir: Path, splits: tuple[str, ...] = SPLITS) -> pd.DataFrame:
    """Every film of ``splits`` once (path, sha256), in split order."""
    parts = []
    for split in splits:
        csv = Path(split_dir) / f"{split}.csv"
        if not csv.is_file():
            raise StageError(f"{csv} not found: run the split stage first")
        parts.append(read_index(csv)[["path", "sha256"]])
    return pd.concat(parts, ignore_index=True).drop_duplicates("path", ignore_index=True)


def segment_into(model, table: pd.DataFrame, out: Path, desc: str) -> tuple[int, int]:
    """Write boxes.csv and masks/ of ``table``'s films into ``out``; (films, with lungs found)."""
    (out / paths.LUNGS_MASKS_NAME).mkdir(parents=True)
    rows, found = [], 0
    with tqdm(total=len(table), desc=desc, mininterval=2.0) as bar:
        for start in range(0, len(table), BATCH):
            chunk = table.iloc[start : start + BATCH]
            images = [_film(p) for p in chunk["path"]]
            for (path, sha), lungs in zip(
                chunk.itertuples(index=False), model.segment(images, margin=0.0), strict=True
            ):
                mask = Image.fromarray(lungs.mask.astype(np.uint8) * 255)
                mask.save(out / paths.LUNGS_MASKS_NAME / f"{sha}.png", compress_level=1)
                found += lungs.found
                share = round(float(lungs.mask.mean()), 4)
                rows.append((path, sha, *lungs.box, bool(lungs.found), share))
            bar.update(len(chunk))
    pd.DataFrame(rows, columns=COLUMNS).to_csv(out / paths.LUNGS_BOXES_NAME, index=False)
    return len(rows), found


def run(cfg: LungsConfig, split_dir: Path, segmenter: Path, out_dir: Path) -> dict:
    """Write ``out_dir`` (module docstring); returns preprocess/lungs.json's content."""
    if not Path(segmenter).is_file():
        raise StageError(f"{segmenter} not found: run train-segmenter first (dvc repro)")
    from stages.segmenter.predict import LungSegmenter

    model = LungSegmenter(segmenter)
    md5 = file_md5(Path(segmenter))
    doc: dict = {"lungs": cfg.lungs}
    if cfg.lungs_framings:  # absent otherwise: the constant line of lungs none stays as it was
        doc["framings"] = list(cfg.lungs_framings)
    layout = paths.CLASSIFICATION  # data/lungs/<task>/ is laid out alike for every task
    parts = (layout.lungs_preprocess.name, layout.lungs_meter.name)
    with atomic_parts(out_dir, parts) as tmp:
        pre, meter = (tmp / part for part in parts)
        pre.mkdir()
        if cfg.needs_lungs:
            n, found = segment_into(model, films(split_dir), pre, "lungs")
            doc.update(segmenter=md5, films=n, found=found)
            if found < n:
                log.warning("lungs: none found on %d of %d films; they keep the whole film",
                            n - found, n)  # fmt: skip
        write_json(pre / paths.LUNGS_INFO_NAME, doc)
        test = films(split_dir, ("test",))
        n, found = segment_into(model, test, meter, "lungs of the test films")
        write_json(meter / paths.LUNGS_INFO_NAME, {"segmenter": md5, "films": n, "found": found})
    log.info("lungs %s: preprocess %s, meter %d test films", cfg.lungs, doc, n)
    return doc


def _film(path: str) -> np.ndarray:
    try:
        return load_gray(path)
    except FileNotFoundError:
        raise StageError(f"{path}: film listed in the split is missing; re-run download") from None
    except ImageRejected as exc:
        raise StageError(f"{path}: cannot decode ({exc}); re-run download") from None


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=TASKS_WITH_LUNGS, required=True, help="which chain")
    parser.add_argument("--params", default="params.yaml", help="params file")
    parser.add_argument("--segmenter", type=Path, default=paths.SEGMENTER_MODEL)
    args = parser.parse_args(argv)
    cfg = load_config(args.task, args.params)
    p = paths.task_paths(args.task)
    return run(cfg, p.split, args.segmenter, p.lungs)


if __name__ == "__main__":
    run_cli(main)
