"""The ``split.<task>`` params schema, importable by the split stage and the params check.

Input: a ``split.<task>`` section of params.yaml (parsed by ``stages.common.config``).
Output: a frozen ``SplitConfig``. No run command of its own (``python -m stages.split`` uses it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stages.common.config import check


@dataclass(frozen=True)
class SplitConfig:
    """random: stratified by label, grouped by patient and duplicate pixels; official: the
    source's own test split untouched, validation carved from train (see stages/split.py)."""

    # random | official (the source's own test split kept)
    mode: Literal["random", "official"] = "random"
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train / val / test
    seed: int = 42  # seed of the split (same seed and data, same split)
    min_val_fraction: float = 0.05  # official: source val kept if >= this x train images

    def __post_init__(self) -> None:
        check(all(r >= 0 for r in self.ratios), f"ratios: must be >= 0, got {list(self.ratios)}")
        check(abs(sum(self.ratios) - 1) < 1e-6, f"ratios: must sum to 1, got {sum(self.ratios)}")
        check(self.ratios[0] > 0, "ratios: the train share must be > 0")
        check(0 <= self.min_val_fraction < 1, "min_val_fraction: must be in [0, 1)")
        check(0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}")
