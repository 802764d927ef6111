"""How one sample's token sequence is cut among the processes of a context group: the token grid (T, H, W) into equal
boxes, so that every process holds the same number of tokens and, under a SPRINT mask, keeps the same number of them.

A split is a factor per grid axis (f_t, f_h, f_w) whose product is the group size; box r (numbered in raster order of
the factors) is the sub-grid of T/f_t x H/f_h x W/f_w tokens at its place. Boxes are sub-grids, so a backbone that
unpatchifies a box gets the box's region of the output, and the regions tile the whole output (`assemble`).

Balance: a structured mask keeps a fixed count in every mask group (edge groups a proportional share), whatever the
draw; a box made of whole groups therefore keeps a fixed count too, and congruent boxes keep the same one. `choose`
takes the first split (fewest cut axes; T, then H, then W) whose boxes each keep the same count of every row's kept
tokens (and, at the start of training, whose boxes are whole mask groups, so that every later draw balances too);
random masks keep a random count per box and are refused. Kept-token counts that the group size does not divide can
never be balanced (e.g. 0.75 of an 81-frame 480p Wan clip: 8190 kept tokens over 4 or 8 processes).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional

import torch

from sprint_mm.masking import Grid

AXES = "THW"


@dataclass(frozen=True)
class SequenceSplit:
    """The token grid `grid` cut into `factors` (f_t, f_h, f_w) boxes per axis; `parts` boxes in all."""

    grid: Grid
    factors: tuple[int, int, int]

    def __post_init__(self) -> None:
        if any(length % factor for length, factor in zip(self.grid, self.factors)):
            raise ValueError(f"split factors {self.factors} do not divide the token grid {self.grid}")

    @property
    def parts(self) -> int:
        return math.prod(self.factors)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def box(self) -> Grid:
        """The token grid of one box (the local grid of each process)."""
        return tuple(length // factor for length, factor in zip(self.grid, self.factors))  # type: ignore[return-value]

    def describe(self) -> str:
        cuts = [f"{AXES[axis]} in {factor}" for axis, factor in enumerate(self.factors) if factor > 1] or ["nothing"]
        return f"grid {format_grid(self.grid)} cut along {' and '.join(cuts)} (boxes {format_grid(self.box)})"

    def token_ids(self, part: int, device: Optional[torch.device] = None) -> torch.Tensor:
        """(n,) raster indices of the tokens of box `part`, in raster order within the box."""
        if not 0 <= part < self.parts:
            raise ValueError(f"box {part} does not exist: the split has {self.parts} boxes")
        place = [index * size for index, size in zip(unravel(part, self.factors), self.box)]
        axes = [torch.arange(start, start + size, device=device) for start, size in zip(place, self.box)]
        t, h, w = torch.meshgrid(*axes, indexing="ij")
        return ((t * self.grid[1] + h) * self.grid[2] + w).flatten()

    def owners(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """(N,) the box of every token of the grid."""
        owner = torch.empty(self.num_tokens, dtype=torch.int64, device=device)
        for part in range(self.parts):
            owner[self.token_ids(part, device)] = part
        return owner

    def kept_counts(self, ids_keep: torch.Tensor) -> torch.Tensor:
        """(B, parts): how many of each row's kept tokens ids_keep (B, M) lie in each box."""
        owner = self.owners(ids_keep.device)[ids_keep]  # (B, M)
        return torch.nn.functional.one_hot(owner, self.parts).sum(dim=1)

    def whole_groups(self, group: Grid) -> bool:
        """Whether every box is made of whole mask groups of shape `group` (tiling the grid from its origin): then a
        structured or tube mask keeps the same count in every box, whatever its draw."""
        return all(size % side == 0 for size, side, factor in zip(self.box, group, self.factors) if factor > 1)

    def balances(self, ids_keep: torch.Tensor) -> bool:
        """Whether every box holds the same count of every row's kept tokens."""
        return bool((self.kept_counts(ids_keep) * self.parts == ids_keep.shape[1]).all())

    def local_kept(self, ids_keep: torch.Tensor, part: int) -> torch.Tensor:
        """(B, M / parts) the kept tokens of ids_keep (B, M) that lie in box `part`, as indices into the box's tokens,
        in the order of ids_keep. The mask must balance (`balances`)."""
        ids = self.token_ids(part, ids_keep.device)
        local = torch.full((self.num_tokens,), -1, dtype=torch.int64, device=ids_keep.device)
        local[ids] = torch.arange(ids.numel(), device=ids_keep.device)
        mine = local[ids_keep]  # (B, M): -1 outside the box
        if ids_keep.numel() and not self.balances(ids_keep):
            raise ValueError(f"the mask does not keep the same count of tokens in every box of {self.describe()}")
        return mine[mine >= 0].view(ids_keep.shape[0], ids_keep.shape[1] // self.parts)

    def assemble(self, boxes: torch.Tensor, image: bool) -> torch.Tensor:
        """The whole output from the outputs of every box, stacked (parts, B, C, t, h, w) (images: (parts, B, C, h,
        w)), each the box's region of the output (its token grid times the patch)."""
        if image:
            boxes = boxes.unsqueeze(3)
        _, b, c, t, h, w = boxes.shape
        f_t, f_h, f_w = self.factors
        whole = boxes.view(f_t, f_h, f_w, b, c, t, h, w).permute(3, 4, 0, 5, 1, 6, 2, 7)
        whole = whole.reshape(b, c, f_t * t, f_h * h, f_w * w)
        return whole.squeeze(2) if image else whole


def unravel(index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The raster coordinates of flat `index` in a grid of `shape` (last axis fastest)."""
    coords = []
    for size in reversed(shape):
        index, rest = divmod(index, size)
        coords.append(rest)
    return tuple(reversed(coords))


def format_grid(grid: tuple[int, ...]) -> str:
    return "x".join(map(str, grid))


def candidate_splits(grid: Grid, parts: int) -> list[SequenceSplit]:
    """Every split of `grid` into `parts` equal boxes: fewest cut axes first, T before H before W."""
    divisors = [[f for f in range(1, length + 1) if length % f == 0 and parts % f == 0] for length in grid]
    found = [factors for factors in itertools.product(*divisors) if math.prod(factors) == parts]
    found.sort(key=lambda factors: (sum(f > 1 for f in factors), [-f for f in factors]))
    return [SequenceSplit(tuple(grid), factors) for factors in found]  # type: ignore[arg-type]


def choose(grid: Grid, parts: int, ids_keep: Optional[torch.Tensor] = None,
           group: Optional[Grid] = None) -> SequenceSplit:
    """The split of `grid` over `parts` processes: the first candidate that balances the kept tokens `ids_keep`
    (B, M) and, given the mask `group`, whose boxes are whole groups, so that it balances every draw of that mask
    (the trainer checks this once at the start). One clear error when none exists."""
    candidates = candidate_splits(grid, parts)
    tokens = math.prod(grid)
    if not candidates:
        raise ValueError(
            f"context parallel {parts} cannot split the token grid {format_grid(grid)} ({tokens} tokens) into {parts} "
            f"equal boxes: no axis length, nor product of them, is divisible by it; choose a context size that "
            f"divides the token counts per axis {grid}, or another frame count or size")
    if group is not None:
        candidates = [split for split in candidates if split.whole_groups(group)]
    if ids_keep is not None:
        candidates = [split for split in candidates if split.balances(ids_keep)]
    if candidates:
        return candidates[0]
    kept = "some" if ids_keep is None else ids_keep.shape[1]
    why = (f"{kept} is not divisible by {parts}" if ids_keep is not None and kept % parts else
           f"no cut into {parts} boxes of whole mask groups exists (a random mask never balances)")
    raise ValueError(
        f"context parallel {parts} cannot balance the SPRINT mask: every process must keep the same count of its "
        f"tokens, but the mask keeps {kept} of the {tokens} tokens of grid {format_grid(grid)} and {why}; choose a "
        f"context size that cuts an axis into boxes of whole mask groups (structured or tube masks), or another frame "
        f"count or size")
