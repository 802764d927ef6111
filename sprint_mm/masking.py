"""Token masks over (T, H, W) patch grids: which tokens the sparse middle blocks see.

Three kinds (SPEC.md section 2):
- random: keep floor(N * (1 - ratio)) tokens chosen uniformly.
- structured ("structured with random offset"): tile the grid with g_t x g_h x g_w groups from the
  origin and keep k random positions inside each group, so the kept tokens cover the grid evenly.
  Edge groups of a grid the group does not divide keep a proportional share round(k * size / |g|).
- tube: structured with 1 x g_h x g_w groups, one spatial pattern per sample shared by every frame.

Tokens are numbered in raster order, last axis fastest: index = (t * H + h) * W + w.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import gin
import torch

Grid = tuple[int, int, int]
Device = torch.device | str | None

MASK_KINDS = ("random", "structured", "tube")
GROUP_SIDES = range(2, 9)  # candidate group sides g for derive_group
RATIO_TOLERANCE = 1e-9


# ----------------------------------------------------------------------------------------------
# The mask
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenMask:
    """Which tokens each sample keeps; every sample keeps the same number M."""

    ids_keep: torch.Tensor  # (B, M) int64, kept token indices, ordered by group
    ids_restore: torch.Tensor  # (B, N) int64, inverse permutation of cat([ids_keep, ids_drop], 1)
    dropped: torch.Tensor  # (B, N) bool, True = dropped
    realised_ratio: float  # fraction of tokens dropped, (N - M) / N

    @property
    def num_kept(self) -> int:
        return self.ids_keep.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.ids_restore.shape[1]


def _assemble(ids_keep: torch.Tensor, ids_drop: torch.Tensor) -> TokenMask:
    """Build the mask from the kept and dropped indices of each row."""
    batch, num_kept = ids_keep.shape
    num_tokens = num_kept + ids_drop.shape[1]
    ids_shuffle = torch.cat([ids_keep, ids_drop], dim=1)  # (B, N)
    positions = torch.arange(num_tokens, device=ids_keep.device).expand(batch, num_tokens)
    ids_restore = torch.empty_like(ids_shuffle).scatter_(1, ids_shuffle, positions)  # (B, N)
    dropped = ids_restore >= num_kept  # (B, N)
    return TokenMask(ids_keep, ids_restore, dropped, (num_tokens - num_kept) / num_tokens)


def _uniform_scores(shape: tuple[int, ...], generator: torch.Generator | None, device: Device) -> torch.Tensor:
    """Uniform scores drawn on the generator's device (so a seed gives the same mask anywhere), then moved."""
    draw_device = generator.device if generator is not None else device
    scores = torch.rand(shape, generator=generator, device=draw_device, dtype=torch.float64)
    return scores.to(device)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _check_grid(grid: Grid) -> Grid:
    if len(grid) != 3 or any(int(n) != n or n <= 0 for n in grid):
        raise ValueError(f"grid {tuple(grid)} must be three positive integers (T, H, W); use T = 1 for images")
    return tuple(int(n) for n in grid)


def _check_batch(batch: int) -> None:
    if batch <= 0:
        raise ValueError(f"batch {batch} must be a positive integer")


def _check_ratio(ratio: float) -> None:
    if not 0 <= ratio < 1:
        raise ValueError(f"drop ratio {ratio} must lie in [0, 1)")


def _check_group(group: Grid, keep: int) -> Grid:
    if len(group) != 3 or any(int(n) != n or n <= 0 for n in group):
        raise ValueError(
            f"group {tuple(group)} must be three positive integers (g_t, g_h, g_w); use g_t = 1 for images"
        )
    size = math.prod(group)
    if int(keep) != keep or not 1 <= keep < size:
        raise ValueError(f"keep {keep} must be an integer in 1..{size - 1} for group {_format_shape(group)}")
    return tuple(int(n) for n in group)


def _check_tube_group(group: Grid) -> None:
    if group[0] != 1:
        raise ValueError(f"tube masks need a group of 1 frame (g_t = 1), got group {_format_shape(group)}")


def _format_shape(shape: Grid) -> str:
    return "x".join(str(n) for n in shape)


# ----------------------------------------------------------------------------------------------
# Random masks
# ----------------------------------------------------------------------------------------------


def _random_keep_count(num_tokens: int, ratio: float) -> int:
    # The tolerance keeps float noise (100 * (1 - 0.3) = 69.999...) from losing a token.
    return math.floor(num_tokens * (1 - ratio) + RATIO_TOLERANCE)


def random_mask(
    batch: int, grid: Grid, ratio: float, generator: torch.Generator | None = None, device: Device = None
) -> TokenMask:
    """Keep floor(N * (1 - ratio)) tokens per sample, chosen uniformly (in random order)."""
    _check_batch(batch)
    grid = _check_grid(grid)
    _check_ratio(ratio)
    num_tokens = math.prod(grid)
    num_kept = _random_keep_count(num_tokens, ratio)
    if num_kept < 1:
        raise ValueError(f"drop ratio {ratio} keeps no token of the {num_tokens} on grid {_format_shape(grid)}")
    order = _uniform_scores((batch, num_tokens), generator, device).argsort(dim=1)  # (B, N)
    return _assemble(order[:, :num_kept], order[:, num_kept:])


# ----------------------------------------------------------------------------------------------
# Structured masks
# ----------------------------------------------------------------------------------------------


def _group_layout(grid: Grid, group: Grid, keep: int, device: Device = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Group id of every token (groups in raster order) and how many tokens each group keeps.

    A group cut by the grid's edge (or larger than the grid) keeps round(keep * size / |group|), half up.
    """
    group_id = torch.zeros((), dtype=torch.int64, device=device)
    group_size = torch.ones((), dtype=torch.int64, device=device)
    for length, side in zip(grid, group):
        num_groups = -(-length // side)
        axis_id = torch.arange(length, device=device) // side  # (length,)
        axis_size = (length - torch.arange(num_groups, device=device) * side).clamp(max=side)  # (num_groups,)
        group_id = group_id.unsqueeze(-1) * num_groups + axis_id
        group_size = group_size.unsqueeze(-1) * axis_size
    full_size = math.prod(group)
    share = (2 * keep * group_size.flatten() + full_size) // (2 * full_size)  # round half up
    return group_id.flatten(), share


def _structured_order(
    batch: int, grid: Grid, group: Grid, keep: int, generator: torch.Generator | None, device: Device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept and dropped token indices per sample, each ordered by group, random within a group."""
    group_id, share = _group_layout(grid, group, keep, device)  # (N,), (G,)
    num_tokens = group_id.numel()
    # Shuffle every row, then stable-sort by group: groups come out in raster order, each internally shuffled.
    shuffled = _uniform_scores((batch, num_tokens), generator, device).argsort(dim=1)  # (B, N)
    by_group = group_id[shuffled].argsort(dim=1, stable=True)  # (B, N)
    order = shuffled.gather(1, by_group)  # (B, N)
    # After the sort, position p holds a token of group sorted_id[p] for every row alike.
    sorted_id = group_id.sort().values  # (N,)
    group_count = torch.bincount(group_id, minlength=share.numel())  # (G,)
    group_start = group_count.cumsum(0) - group_count  # (G,)
    rank_in_group = torch.arange(num_tokens, device=device) - group_start[sorted_id]  # (N,)
    kept = rank_in_group < share[sorted_id]  # (N,)
    if not kept.any():
        raise ValueError(
            f"group {_format_shape(group)} keep {keep} keeps no token on grid {_format_shape(grid)}; "
            "use a smaller group or a larger keep"
        )
    return order[:, kept], order[:, ~kept]


def structured_mask(
    batch: int,
    grid: Grid,
    group: Grid,
    keep: int,
    generator: torch.Generator | None = None,
    device: Device = None,
    tube: bool = False,
) -> TokenMask:
    """Keep `keep` random positions in every group tiling the grid; with `tube`, one spatial pattern for all frames."""
    _check_batch(batch)
    grid = _check_grid(grid)
    group = _check_group(group, keep)
    if not tube:
        return _assemble(*_structured_order(batch, grid, group, keep, generator, device))
    _check_tube_group(group)
    frames, height, width = grid
    ids_keep, ids_drop = _structured_order(batch, (1, height, width), group, keep, generator, device)  # (B, m)
    frame_offset = torch.arange(frames, device=ids_keep.device).view(1, frames, 1) * (height * width)

    def every_frame(ids: torch.Tensor) -> torch.Tensor:
        return (ids.unsqueeze(1) + frame_offset).flatten(1)  # (B, T * m), frame after frame

    return _assemble(every_frame(ids_keep), every_frame(ids_drop))


def rotating_mask(batch: int, grid: Grid, group: Grid, keep: int, phase: int, device: Device = None) -> TokenMask:
    """A structured mask without randomness, the same for every sample: each group of g tokens keeps the k of
    ranks (phase + j * g // k) mod g, j < k (ranks in raster order within the group, so the kept ones are spread
    g // k apart: a 2x2x2 group keeping 2 keeps one cell in both frames; an edge group keeps its proportional
    share the same way). Phase p + 1 shifts every kept rank by one, so g // k consecutive phases cover every token
    once."""
    _check_batch(batch)
    grid = _check_grid(grid)
    group = _check_group(group, keep)
    if isinstance(phase, bool) or not isinstance(phase, int) or phase < 0:
        raise ValueError(f"phase {phase!r} must be a non-negative int")
    group_id, share = _group_layout(grid, group, keep, device)  # (N,), (G,)
    size = torch.bincount(group_id, minlength=share.numel())  # (G,) tokens per group
    order = group_id.argsort(stable=True)  # token indices grouped, raster order within a group
    start = size.cumsum(0) - size
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - start[group_id[order]]  # (N,) rank in group
    group_share, group_size = share[group_id[order]], size[group_id[order]]
    stride = (group_size // group_share.clamp(min=1)).clamp(min=1)
    offset = (rank[order] - phase) % group_size
    kept = (offset % stride == 0) & (offset // stride < group_share)  # (N,) in grouped order
    ids_keep, ids_drop = order[kept], order[~kept]
    if ids_keep.numel() == 0:
        raise ValueError(f"group {_format_shape(group)} keep {keep} keeps no token on grid {_format_shape(grid)}")
    return _assemble(ids_keep.expand(batch, -1), ids_drop.expand(batch, -1))


def kept_count(grid: Grid, group: Grid, keep: int) -> int:
    """How many tokens a structured (or rotating) mask with `group` and `keep` keeps on `grid`."""
    return int(_group_layout(_check_grid(grid), _check_group(group, keep), keep)[1].sum())


# ----------------------------------------------------------------------------------------------
# Choosing a group for a ratio
# ----------------------------------------------------------------------------------------------


def _candidate_groups(grid: Grid, tube: bool) -> list[Grid]:
    spatial = [(1, g, g) for g in GROUP_SIDES]
    if grid[0] > 1 and not tube:
        return [(2, g, g) for g in GROUP_SIDES] + spatial
    return spatial


def _keep_for_ratio(ratio: float, group: Grid) -> int | None:
    """The k with k / |group| == 1 - ratio, if there is one in 1..|group|-1."""
    size = math.prod(group)
    keep = round((1 - ratio) * size)
    if 1 <= keep < size and abs(keep / size - (1 - ratio)) <= RATIO_TOLERANCE:
        return keep
    return None


def derive_group(ratio: float, grid: Grid, tube: bool = False) -> tuple[Grid, int]:
    """The first candidate group (2xgxg for video, then 1xgxg, g = 2..8) that drops exactly `ratio`, and its k."""
    _check_ratio(ratio)
    grid = _check_grid(grid)
    candidates = _candidate_groups(grid, tube)
    for group in candidates:
        keep = _keep_for_ratio(ratio, group)
        if keep is not None:
            return group, keep
    shapes = " then ".join(sorted({f"{t}xgxg" for t, _, _ in candidates}, reverse=True))
    first_size = math.prod(candidates[0])
    examples = ", ".join(f"{1 - k / first_size:g}" for k in range(first_size - 1, 0, -1))
    raise ValueError(
        f"drop ratio {ratio} is not 1 - k/|g| for any group {shapes} (g = 2..8); expressible ratios include "
        f"{examples} ({_format_shape(candidates[0])}), 0.625 and 0.875 (1x4x4 keep 6 or 2); "
        "use kind='random' or give group and keep explicitly"
    )


# ----------------------------------------------------------------------------------------------
# The configurable masker
# ----------------------------------------------------------------------------------------------


@gin.configurable
class TokenMasker:
    """Draws a fresh mask per sample per call; kind 'random' | 'structured' | 'tube'.

    Without `group`/`keep`, structured and tube masks derive them from `ratio` and the grid at each call.
    `ratio` 0 switches masking off (stage 2), whatever group and keep say.
    """

    def __init__(
        self,
        kind: str = "structured",
        ratio: float = 0.75,
        group: Grid | None = None,
        keep: int | None = None,
    ) -> None:
        if kind not in MASK_KINDS:
            raise ValueError(f"mask kind {kind!r} is unknown; choose one of {', '.join(MASK_KINDS)}")
        _check_ratio(ratio)
        if kind == "random" and (group is not None or keep is not None):
            raise ValueError(f"random masks take no group or keep (got group {group}, keep {keep})")
        if (group is None) != (keep is None):
            raise ValueError(f"give group and keep together or neither (got group {group}, keep {keep})")
        if group is not None:
            group = _check_group(tuple(group), keep)
            if kind == "tube":
                _check_tube_group(group)
            if ratio > 0 and abs(1 - keep / math.prod(group) - ratio) > RATIO_TOLERANCE:
                raise ValueError(
                    f"group {_format_shape(group)} keep {keep} drops {1 - keep / math.prod(group):g}, "
                    f"not the drop ratio {ratio}; make them agree"
                )
        self.kind = kind
        self.ratio = ratio
        self.group = group
        self.keep = keep

    def group_for(self, grid: Grid) -> tuple[Grid, int]:
        """The group and k a structured or tube mask uses on `grid`."""
        if self.group is not None:
            return self.group, self.keep
        return derive_group(self.ratio, grid, tube=self.kind == "tube")

    def __call__(
        self, batch: int, grid: Grid, generator: torch.Generator | None = None, device: Device = None
    ) -> TokenMask | None:
        if self.ratio == 0:
            return None
        if self.kind == "random":
            return random_mask(batch, grid, self.ratio, generator, device)
        group, keep = self.group_for(grid)
        return structured_mask(batch, grid, group, keep, generator, device, tube=self.kind == "tube")

    def describe(self, grid: Grid) -> str:
        """One line for logs, e.g. 'structured 2x2x2 keep 2 of 8: drop 0.750 (realised 0.750 on 13x8x8)'."""
        grid = _check_grid(grid)
        if self.ratio == 0:
            return "no mask: drop 0"
        num_tokens = math.prod(grid)
        if self.kind == "random":
            head = "random"
            num_kept = _random_keep_count(num_tokens, self.ratio)
        else:
            group, keep = self.group_for(grid)
            head = f"{self.kind} {_format_shape(group)} keep {keep} of {math.prod(group)}"
            num_kept = kept_count(grid, group, keep)
        realised = (num_tokens - num_kept) / num_tokens
        return f"{head}: drop {self.ratio:.3f} (realised {realised:.3f} on {_format_shape(grid)})"
