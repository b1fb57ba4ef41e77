"""Torch helpers shared by the torch models: bf16 precision, RNG state, atomic saves.

Inputs/Outputs: none (functions). ``native_bf16`` reads /proc/cpuinfo; ``atomic_torch_save``
writes one file atomically. Imported only by modules that already need torch (the segmenter;
``stages.detector.engine`` holds the same three precision functions and can import them from
here). No run command; tested by tests/test_segmenter_train.py.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.common.utils import atomic_file


def native_bf16(device: str, cpuinfo: str | None = None) -> bool:
    """True where bf16 matrix maths runs in hardware: a CUDA GPU with bf16, or a CPU with AMX
    or AVX512-BF16 (oneDNN then runs bf16 convolutions faster than fp32; elsewhere it emulates
    them, slower than fp32). ``cpuinfo``: the text of /proc/cpuinfo (read when None)."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: no way to ask, stay on fp32
            return False
    return bool({"amx_bf16", "avx512_bf16"} & set(cpuinfo.split()))


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> ``bf16`` on hardware with native bf16 (``native_bf16``), else ``fp32``."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(precision: str, device: str) -> Any:
    """The training forward's autocast context (a resolved ``precision``: fp32 turns it off)."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=precision == "bf16")


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors/plain types (weights_only loadable)."""
    np_state = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def atomic_torch_save(payload: dict[str, Any], path: str | Path) -> None:
    """torch.save to a temp file and rename: an interrupted write never leaves a broken file."""
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)


def load_torch_file(path: str | Path) -> dict[str, Any] | None:
    """A file written by ``atomic_torch_save`` (plain types only), or None when absent."""
    path = Path(path)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


__all__ = [
    "atomic_torch_save",
    "autocast",
    "load_torch_file",
    "native_bf16",
    "resolve_precision",
    "rng_state",
    "set_rng_state",
]
