"""DVC push/pull time to a local folder remote: many small files vs a few large shards.

Input:  (a) the default pipeline's data outputs (download -> split -> augment of both tasks with
        the repository's params.yaml, built by `dvc repro` in a temporary git+DVC copy);
        (b) the 5,216 JPEGs of ``../shared/data/kermany224/train`` added with `dvc add` as a
        folder, vs the same images decoded into one uint8 .npy shard (N, 224, 224).
Measures, each against a fresh local folder remote: `dvc push` of everything, then `dvc pull`
        into the same repository with its cache and the outputs deleted (a new teammate's pull).
        Wall-clock of the dvc commands (the venv's dvc, default jobs).
Output: a table, the files-vs-shard ratios; JSON with ``--out``.
Run:    .venv/bin/python bench/remote_transfer.py [--kermany ../shared/data/kermany224/train]
        [--skip-pipeline] [--limit N] [--out remote_transfer.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import KERMANY_TRAIN, load1, machine, print_table, save
from PIL import Image
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# data/inputs: the default data roots, which dvc.yaml declares as deps of the download stages
PIPELINE_FILES = [
    "dvc.yaml",
    "params.yaml",
    "pyproject.toml",
    "stages",
    ".dvcignore",
    "data/inputs",
]
DATA_TARGETS = ["augment@classification", "augment@detection"]


def run(cmd: list[str], cwd: Path, timeout: float = 3600) -> float:
    """Run a command, fail loudly, return its wall-clock seconds."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    start = time.perf_counter()
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return time.perf_counter() - start


def dvc(repo: Path, *args: str) -> float:
    return run([str(BIN / "dvc"), *args], repo)


def new_repo(root: Path) -> Path:
    root.mkdir(parents=True)
    run(["git", "init", "-q"], root)
    dvc(root, "init", "-q")
    return root


def tree_size(paths: list[Path]) -> tuple[int, int]:
    files = [f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
    return len(files), sum(f.stat().st_size for f in files)


def push_pull(repo: Path, outs: list[str], remote: Path, label: str) -> dict[str, Any]:
    """Push ``outs`` to a fresh folder remote, wipe cache + outputs, pull them back."""
    dvc(repo, "remote", "add", "--local", "-f", "-d", "bench", str(remote))
    n_files, n_bytes = tree_size([repo / o for o in outs])
    load = load1()
    push = dvc(repo, "push", *outs)
    shutil.rmtree(repo / ".dvc" / "cache")
    for o in outs:
        path = repo / o
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    pull = dvc(repo, "pull", *outs)
    if tree_size([repo / o for o in outs]) != (n_files, n_bytes):
        raise RuntimeError(f"{label}: pull did not restore every file")
    row = {
        "what": label,
        "files": n_files,
        "MB": round(n_bytes / 1e6, 1),
        "push_s": round(push, 2),
        "pull_s": round(pull, 2),
        "push_ms_per_file": round(1000 * push / n_files, 2),
        "load1": load,
    }
    print(row, flush=True)
    return row


def pipeline_outputs(work: Path) -> dict[str, Any]:
    repo = work / "pipeline"
    repo.mkdir()
    for name in PIPELINE_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, repo / name)
    run(["git", "init", "-q"], repo)
    dvc(repo, "init", "-q")
    seconds = dvc(repo, "repro", *DATA_TARGETS)
    print(f"data stages of the default pipeline built in {seconds:.0f} s", flush=True)
    outs = [
        f"data/{kind}/{task}"
        for kind in ("raw", "split", "augment")
        for task in ("classification", "detection")
    ]
    return push_pull(repo, outs, work / "remote-pipeline", "default pipeline data outputs")


def kermany_rows(work: Path, folder: Path, limit: int | None) -> list[dict[str, Any]]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    files = files[:limit] if limit else files
    jpeg_repo = new_repo(work / "jpeg")
    for f in files:
        dst = jpeg_repo / "kermany" / f.relative_to(folder)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dst)
    add = dvc(jpeg_repo, "add", "kermany")
    print(f"dvc add of {len(files)} files: {add:.1f} s", flush=True)
    row_files = push_pull(jpeg_repo, ["kermany"], work / "remote-jpeg", f"{len(files)} JPEG files")
    row_files["add_s"] = round(add, 2)

    shard_repo = new_repo(work / "shard")
    images = np.lib.format.open_memmap(
        shard_repo / "kermany.npy", mode="w+", dtype=np.uint8, shape=(len(files), 224, 224)
    )
    for i, f in enumerate(tqdm(files, desc="decode", mininterval=2.0)):
        with Image.open(f) as im:
            images[i] = np.asarray(im.convert("L").resize((224, 224)), dtype=np.uint8)
    images.flush()
    del images
    add = dvc(shard_repo, "add", "kermany.npy")
    row_shard = push_pull(
        shard_repo, ["kermany.npy"], work / "remote-shard", f"same {len(files)} as one .npy"
    )
    row_shard["add_s"] = round(add, 2)
    return [row_files, row_shard]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kermany", type=Path, default=KERMANY_TRAIN)
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--limit", type=int, default=None, help="first N Kermany files (smoke)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": machine(), "rows": []}
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp:
        work = Path(tmp)
        if not args.skip_pipeline:
            results["rows"].append(pipeline_outputs(work))
        if args.kermany.is_dir():
            files, shard = kermany_rows(work, args.kermany, args.limit)
            results["rows"] += [files, shard]
            results["ratios_files_over_shard"] = {
                "push": round(files["push_s"] / shard["push_s"], 1),
                "pull": round(files["pull_s"] / shard["pull_s"], 1),
                "add": round(files["add_s"] / shard["add_s"], 1),
                "bytes": round(files["MB"] / shard["MB"], 2),
            }
        else:
            print(f"{args.kermany} absent: Kermany rows skipped")
    columns = ["what", "files", "MB", "add_s", "push_s", "pull_s", "push_ms_per_file", "load1"]
    print_table(results["rows"], columns, "DVC push/pull to a local folder remote")
    if "ratios_files_over_shard" in results:
        print("\nfiles / shard ratios:", results["ratios_files_over_shard"])
    save(args.out, results)


if __name__ == "__main__":
    main()
