"""Token density at sampling time: a SPRINT model trained to run its middle blocks on a structured quarter of the
tokens can do the same while sampling, at the noisy steps where the coarse layout forms (SparseDiT's timestep-wise
density; t = 1 is noise).

The sampling mask is deterministic: `masking.rotating_mask` with the group and k that give the kept fraction on the
sample's grid, its phase the index of the sampling step. It is the same for every sample (so a sample does not depend
on the batch it is drawn in, nor on any random stream), and consecutive steps shift it by one position in every
group, so over g // k steps every token passes through the middle once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import gin
import torch

from sprint_mm.errors import check_number
from sprint_mm.masking import Grid, TokenMask, derive_group, kept_count, rotating_mask


def fraction_mask(fraction: float, batch: int, grid: Grid, phase: int,
                  device: torch.device | str | None = None) -> Optional[TokenMask]:
    """The rotating mask that keeps `fraction` of the tokens of `grid` at `phase`; None for a fraction of 1 (all)."""
    if fraction == 1.0:
        return None
    group, keep = derive_group(1.0 - fraction, grid)
    return rotating_mask(batch, grid, group, keep, phase, device)


def fraction_kept(fraction: float, grid: Grid) -> int:
    """How many of the tokens of `grid` the mask of `fraction_mask` keeps (all of them for a fraction of 1)."""
    if fraction == 1.0:
        return math.prod(grid)
    return kept_count(grid, *derive_group(1.0 - fraction, grid))


def check_fraction(name: str, fraction: float) -> None:
    """A kept fraction lies in (0, 1]; whether a grid can realise it is checked against the grid (`fraction_kept`)."""
    check_number(name, fraction, 0, 1)
    if fraction == 0:
        raise ValueError(f"{name} must be > 0 (the fraction of tokens the middle blocks see), got 0")


@gin.configurable
@dataclass(frozen=True)
class MiddleDensity:
    """Run the middle blocks on a fraction `keep` of the tokens while t > `above`, on all tokens below.

    `keep` must be 1 - k/|g| for a structured group (0.25, 0.5, 0.75, 0.125, ...: `masking.derive_group`); 1 is the
    dense sampler exactly (no mask at all)."""

    keep: float = 1.0
    above: float = 0.5

    def __post_init__(self) -> None:
        check_fraction("middle keep", self.keep)
        check_number("middle keep threshold (t above which the middle is sparse)", self.above, 0, 1)

    def active(self, t: float) -> bool:
        return self.keep < 1.0 and t > self.above

    def fraction_at(self, t: float) -> float:
        """The fraction of the tokens the middle sees at time t."""
        return self.keep if self.active(t) else 1.0

    def check(self, grid: Grid) -> None:
        """One clear error, before sampling starts, for a keep that the grid cannot realise."""
        fraction_kept(self.keep, grid)


DENSE = MiddleDensity()
