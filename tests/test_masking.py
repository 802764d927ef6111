"""Token masks: counts, per-group shares, the restore permutation, uniformity, tubes, seeding, errors."""
from __future__ import annotations

import itertools
import math
from fractions import Fraction

import gin
import pytest
import torch
from scipy import stats

from sprint_mm.masking import TokenMask, TokenMasker, derive_group, random_mask, structured_mask

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SIGNIFICANCE = 1e-3


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Helpers: a second, loop-based account of the groups
# ----------------------------------------------------------------------------------------------


def group_of_tokens(ids: torch.Tensor, grid, group) -> torch.Tensor:
    """Group index (groups in raster order) of token indices, from their (t, h, w) coordinates."""
    _, height, width = grid
    t, h, w = ids // (height * width), (ids // width) % height, ids % width
    groups_h, groups_w = math.ceil(height / group[1]), math.ceil(width / group[2])
    return ((t // group[0]) * groups_h + h // group[1]) * groups_w + w // group[2]


def expected_shares(grid, group, keep) -> list[int]:
    """round(keep * size / |group|), half up, for every group in raster order, by plain loops."""
    full = math.prod(group)
    shares = []
    for origin in itertools.product(*(range(0, n, g) for n, g in zip(grid, group))):
        size = math.prod(min(g, n - o) for n, g, o in zip(grid, group, origin))
        shares.append(math.floor(Fraction(keep * size, full) + Fraction(1, 2)))
    return shares


def kept_per_group(mask: TokenMask, grid, group) -> torch.Tensor:
    """(B, G) number of kept tokens in each group."""
    group_ids = group_of_tokens(mask.ids_keep, grid, group)
    counts = torch.zeros(mask.ids_keep.shape[0], len(expected_shares(grid, group, 1)), dtype=torch.int64)
    return counts.scatter_add_(1, group_ids.cpu(), torch.ones_like(group_ids.cpu()))


def full_group_patterns(mask: TokenMask, grid, group) -> torch.Tensor:
    """(draws, |group|) keep pattern of every full group of every sample, positions in raster order."""
    frames, height, width = grid
    g_t, g_h, g_w = group
    kept = ~mask.dropped.cpu().view(-1, frames, height, width)
    kept = kept[:, : frames // g_t * g_t, : height // g_h * g_h, : width // g_w * g_w]
    kept = kept.reshape(kept.shape[0], frames // g_t, g_t, height // g_h, g_h, width // g_w, g_w)
    return kept.permute(0, 1, 3, 5, 2, 4, 6).reshape(-1, g_t * g_h * g_w)


def position_pvalue(patterns: torch.Tensor) -> float:
    """Chi-square p-value of 'every position is kept equally often' for draws of k-of-n patterns.

    Each draw keeps k positions, so the counts are not multinomial: their covariance is the multinomial one
    times (n - k) / (n - 1); the Pearson statistic is rescaled by the inverse to follow chi2(n - 1).
    """
    counts = patterns.sum(0).numpy()
    n, k = patterns.shape[1], int(patterns[0].sum())
    statistic = stats.chisquare(counts).statistic * (n - 1) / (n - k)
    return float(stats.chi2.sf(statistic, n - 1))


def subset_pvalue(patterns: torch.Tensor) -> float:
    """Chi-square p-value of 'every k-subset of the n positions is kept equally often'."""
    n, k = patterns.shape[1], int(patterns[0].sum())
    codes = (patterns.long() << torch.arange(n)).sum(1)
    subsets = [sum(1 << i for i in chosen) for chosen in itertools.combinations(range(n), k)]
    counts = [int((codes == code).sum()) for code in subsets]
    assert sum(counts) == len(patterns), "every pattern must keep exactly k positions"
    return float(stats.chisquare(counts).pvalue)


# ----------------------------------------------------------------------------------------------
# Counts and the restore permutation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(1, 8, 8), (13, 8, 8), (1, 10, 10), (3, 5, 7)])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.75, 0.9])
def test_random_mask_keeps_floor_count(grid, ratio):
    mask = random_mask(3, grid, ratio, seeded())
    num_tokens = math.prod(grid)
    num_kept = math.floor(num_tokens * (1 - Fraction(str(ratio))))
    assert mask.ids_keep.shape == (3, num_kept)
    assert (mask.num_kept, mask.num_tokens) == (num_kept, num_tokens)
    assert mask.realised_ratio == (num_tokens - num_kept) / num_tokens
    assert torch.equal(mask.dropped.sum(1), torch.full((3,), num_tokens - num_kept))


MASK_MAKERS = {
    "random": lambda gen, device: random_mask(4, (3, 5, 6), 0.6, gen, device),
    "structured": lambda gen, device: structured_mask(4, (3, 5, 6), (2, 2, 2), 3, gen, device),
    "tube": lambda gen, device: structured_mask(4, (3, 5, 6), (1, 2, 3), 2, gen, device, tube=True),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", sorted(MASK_MAKERS))
def test_ids_restore_puts_kept_tokens_back_in_place(kind, device):
    mask = MASK_MAKERS[kind](seeded(), device)
    batch, num_tokens, num_kept = mask.ids_keep.shape[0], mask.num_tokens, mask.num_kept
    for tensor in (mask.ids_keep, mask.ids_restore, mask.dropped):
        assert tensor.device.type == device
    assert mask.ids_keep.dtype == mask.ids_restore.dtype == torch.int64
    # ids_restore is a permutation whose first M slots are the kept tokens, in ids_keep order.
    assert torch.equal(mask.ids_restore.sort(1).values, torch.arange(num_tokens, device=device).expand(batch, -1))
    kept_slots = torch.arange(num_kept, device=device).expand(batch, -1)
    assert torch.equal(mask.ids_restore.gather(1, mask.ids_keep), kept_slots)
    # ids_drop = the rest of the permutation; gathering cat([ids_keep, ids_drop]) by ids_restore gives arange.
    ids_drop = mask.ids_restore.argsort(1)[:, num_kept:]
    assert not mask.dropped.gather(1, mask.ids_keep).any() and mask.dropped.gather(1, ids_drop).all()
    shuffled = torch.cat([mask.ids_keep, ids_drop], 1)
    assert torch.equal(shuffled.gather(1, mask.ids_restore), torch.arange(num_tokens, device=device).expand(batch, -1))
    # How the sparse path uses it: kept values plus fillers, restored, land on their own indices.
    filler = torch.full((batch, num_tokens - num_kept), -1, device=device)
    restored = torch.cat([mask.ids_keep, filler], 1).gather(1, mask.ids_restore)
    expected = torch.where(mask.dropped, -1, torch.arange(num_tokens, device=device))
    assert torch.equal(restored, expected)


STRUCTURED_CASES = [
    ((1, 8, 8), (1, 2, 2), 1),
    ((1, 8, 8), (1, 4, 4), 6),
    ((4, 8, 8), (2, 2, 2), 2),
    ((13, 8, 8), (2, 2, 2), 2),
    ((1, 5, 6), (1, 4, 4), 6),  # edge groups of 8, 4, 2 tokens keep 3, 2 (1.5 rounds up), 1 (0.75)
    ((1, 3, 3), (1, 4, 4), 6),  # grid smaller than the group: one clipped 3x3 group keeps round(6 * 9 / 16) = 3
    ((1, 6, 6), (2, 2, 2), 2),  # an image with a video group: 1x2x2 groups keep 1
    ((3, 4, 4), (2, 2, 2), 5),  # the last frame's 1x2x2 groups keep round(2.5) = 3 (half up, not to even)
    ((5, 7, 9), (2, 3, 2), 5),
]


@pytest.mark.parametrize("grid, group, keep", STRUCTURED_CASES)
def test_structured_mask_keeps_the_share_of_every_group(grid, group, keep):
    mask = structured_mask(6, grid, group, keep, seeded())
    shares = torch.tensor(expected_shares(grid, group, keep))
    assert torch.equal(kept_per_group(mask, grid, group), shares.expand(6, -1))
    assert mask.num_kept == int(shares.sum())
    assert mask.realised_ratio == (math.prod(grid) - shares.sum().item()) / math.prod(grid)
    # ids_keep lists groups in raster order.
    group_ids = group_of_tokens(mask.ids_keep, grid, group)
    assert (group_ids.diff(dim=1) >= 0).all()


def test_thirteen_frame_video_keeps_proportional_share_in_the_last_frame():
    grid, group, keep = (13, 8, 8), (2, 2, 2), 2
    mask = structured_mask(5, grid, group, keep, seeded(3))
    frame, h, w = mask.ids_keep // 64, (mask.ids_keep // 8) % 8, mask.ids_keep % 8
    spatial_group = (h // 2) * 4 + w // 2
    for b in range(5):
        pair_counts = torch.bincount(frame[b] // 2 * 16 + spatial_group[b], minlength=7 * 16).view(7, 16)
        assert (pair_counts[:6] == 2).all(), "each full 2x2x2 group keeps 2"
        assert (pair_counts[6] == 1).all(), "each 1x2x2 group of frame 12 keeps 1"
    kept = (13 // 2) * 4 * 4 * keep + 4 * 4 * 1
    assert mask.num_kept == kept
    assert mask.realised_ratio == 1 - kept / (13 * 8 * 8)
    assert f"realised {1 - kept / 832:.3f} on 13x8x8" in TokenMasker().describe(grid)


# ----------------------------------------------------------------------------------------------
# Uniformity
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "grid, group, keep", [((1, 8, 8), (1, 2, 2), 1), ((1, 8, 8), (1, 2, 2), 2), ((4, 4, 4), (2, 2, 2), 2)]
)
def test_structured_choice_within_a_group_is_uniform(grid, group, keep):
    patterns = full_group_patterns(structured_mask(800, grid, group, keep, seeded(7)), grid, group)
    assert position_pvalue(patterns) > SIGNIFICANCE
    assert subset_pvalue(patterns) > SIGNIFICANCE


def test_random_mask_is_uniform_over_tokens():
    patterns = ~random_mask(4000, (1, 4, 4), 0.75, seeded(11)).dropped
    assert position_pvalue(patterns) > SIGNIFICANCE


def test_uniformity_checks_catch_biased_pickers():
    generator, draws = seeded(5), 6000
    # Favours position 0 of a 2x2 group (weights 2:1:1:1): wrong marginals.
    favouring = torch.multinomial(torch.tensor([2.0, 1, 1, 1]), draws, replacement=True, generator=generator)
    assert position_pvalue(torch.nn.functional.one_hot(favouring, 4).bool()) < SIGNIFICANCE
    # A random offset o keeping {o, o + 1 mod 4}: uniform marginals, but only 4 of the 6 pairs ever appear.
    offset = torch.randint(0, 4, (draws,), generator=generator)
    cyclic = torch.nn.functional.one_hot(offset, 4) + torch.nn.functional.one_hot((offset + 1) % 4, 4)
    assert position_pvalue(cyclic.bool()) > SIGNIFICANCE
    assert subset_pvalue(cyclic.bool()) < SIGNIFICANCE


# ----------------------------------------------------------------------------------------------
# Tubes, seeding, selection
# ----------------------------------------------------------------------------------------------


def test_tube_mask_shares_one_spatial_pattern_across_frames():
    grid, group, keep = (5, 6, 6), (1, 2, 3), 2
    mask = structured_mask(8, grid, group, keep, seeded(2), tube=True)
    per_frame = mask.dropped.view(8, 5, 36)
    assert (per_frame == per_frame[:, :1]).all()
    assert len({tuple(row.tolist()) for row in per_frame[:, 0]}) > 1, "each sample draws its own pattern"
    shares = torch.tensor(expected_shares(grid, group, keep))
    assert torch.equal(kept_per_group(mask, grid, group), shares.expand(8, -1))
    # Kept ids run frame after frame, each frame offset by H * W from the previous one.
    per_frame_ids = mask.ids_keep.view(8, 5, -1)
    frame_offsets = (torch.arange(5) * 36).view(1, 5, 1).expand_as(per_frame_ids)
    assert torch.equal(per_frame_ids - per_frame_ids[:, :1], frame_offsets)
    # A plain structured mask with the same group does not share its pattern.
    plain = structured_mask(8, grid, group, keep, seeded(2)).dropped.view(8, 5, 36)
    assert not (plain == plain[:, :1]).all()


@pytest.mark.parametrize("kind", sorted(MASK_MAKERS))
def test_masks_are_reproducible_with_a_seed_and_fresh_per_call_and_sample(kind):
    make = MASK_MAKERS[kind]
    generator = seeded(42)
    first, second = make(generator, None), make(generator, None)
    again = make(seeded(42), None)
    assert torch.equal(first.ids_keep, again.ids_keep) and torch.equal(first.ids_restore, again.ids_restore)
    assert not torch.equal(first.dropped, second.dropped), "a new call draws a new mask"
    assert len({tuple(row.tolist()) for row in first.dropped}) > 1, "samples of one batch differ"


# ----------------------------------------------------------------------------------------------
# Choosing the group
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ratio, grid, tube, expected",
    [
        (0.75, (1, 16, 16), False, ((1, 2, 2), 1)),
        (0.5, (1, 16, 16), False, ((1, 2, 2), 2)),
        (0.625, (1, 16, 16), False, ((1, 4, 4), 6)),
        (0.875, (1, 16, 16), False, ((1, 4, 4), 2)),
        (0.75, (13, 8, 8), False, ((2, 2, 2), 2)),
        (0.5, (13, 8, 8), False, ((2, 2, 2), 4)),
        (0.75, (13, 8, 8), True, ((1, 2, 2), 1)),
        (0.625, (13, 8, 8), True, ((1, 4, 4), 6)),
    ],
)
def test_derive_group_prefers_the_documented_candidates(ratio, grid, tube, expected):
    assert derive_group(ratio, grid, tube) == expected


@pytest.mark.parametrize("side", range(2, 9))
def test_derive_group_is_exact_for_every_expressible_ratio(side):
    for keep in range(1, side * side):
        ratio = 1 - keep / (side * side)
        group, derived_keep = derive_group(ratio, (1, 8, 8))
        assert group[0] == 1 and group[1] == group[2] <= side
        assert abs(derived_keep / math.prod(group) - keep / (side * side)) <= 1e-9


# ----------------------------------------------------------------------------------------------
# The configurable masker
# ----------------------------------------------------------------------------------------------


def test_masker_derives_the_group_for_each_grid_and_turns_off_at_zero():
    masker = TokenMasker()
    image, video = masker(2, (1, 8, 8), seeded()), masker(2, (13, 8, 8), seeded())
    assert torch.equal(kept_per_group(image, (1, 8, 8), (1, 2, 2)), torch.ones(2, 16, dtype=torch.int64))
    video_shares = torch.tensor(expected_shares((13, 8, 8), (2, 2, 2), 2))
    assert torch.equal(kept_per_group(video, (13, 8, 8), (2, 2, 2)), video_shares.expand(2, -1))
    assert TokenMasker(ratio=0.0)(2, (1, 8, 8)) is None
    assert TokenMasker(ratio=0.0, group=(1, 4, 4), keep=6)(2, (1, 8, 8)) is None
    assert TokenMasker(kind="random", ratio=0.3)(2, (1, 10, 10)).num_kept == 70
    assert TokenMasker("structured", 0.625, (1, 4, 4), 6).describe((1, 8, 8)) == (
        "structured 1x4x4 keep 6 of 16: drop 0.625 (realised 0.625 on 1x8x8)"
    )
    tube = TokenMasker(kind="tube")(3, (4, 4, 4), seeded())
    assert (tube.dropped.view(3, 4, 16) == tube.dropped.view(3, 4, 16)[:, :1]).all()


def test_masker_is_gin_configurable():
    with gin.unlock_config():
        gin.parse_config(
            [
                "TokenMasker.kind = 'tube'",
                "TokenMasker.ratio = 0.875",
                "TokenMasker.group = (1, 4, 4)",
                "TokenMasker.keep = 2",
            ]
        )
    try:
        masker = TokenMasker()
    finally:
        gin.clear_config()
    assert (masker.kind, masker.ratio, masker.group, masker.keep) == ("tube", 0.875, (1, 4, 4), 2)
    assert TokenMasker().kind == "structured"


# ----------------------------------------------------------------------------------------------
# Errors name the offending value
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: derive_group(0.3, (1, 8, 8)), r"drop ratio 0\.3 .*0\.25, 0\.5, 0\.75.*kind='random'.*group and keep"),
        (lambda: derive_group(0.33, (4, 8, 8)), r"drop ratio 0\.33 .*2xgxg then 1xgxg"),
        (lambda: random_mask(2, (1, 4, 4), 1.0), r"drop ratio 1\.0 must lie in \[0, 1\)"),
        (lambda: random_mask(2, (1, 4, 4), -0.1), r"drop ratio -0\.1 "),
        (lambda: random_mask(2, (1, 2, 2), 0.9), r"drop ratio 0\.9 keeps no token of the 4"),
        (lambda: random_mask(2, (1, 0, 4), 0.5), r"grid \(1, 0, 4\)"),
        (lambda: random_mask(0, (1, 4, 4), 0.5), r"batch 0 "),
        (lambda: structured_mask(2, (1, 8, 8), (1, 2, 2), 4), r"keep 4 must be an integer in 1\.\.3 for group 1x2x2"),
        (lambda: structured_mask(2, (1, 8, 8), (1, 2, 2), 0), r"keep 0 "),
        (lambda: structured_mask(2, (1, 8, 8), (1, 0, 2), 1), r"group \(1, 0, 2\)"),
        (lambda: structured_mask(2, (1, 8), (1, 2, 2), 1), r"grid \(1, 8\)"),
        (lambda: structured_mask(2, (4, 8, 8), (2, 2, 2), 2, tube=True), r"tube .*group 2x2x2"),
        (lambda: structured_mask(2, (1, 1, 1), (1, 4, 4), 2), r"group 1x4x4 keep 2 keeps no token on grid 1x1x1"),
        (lambda: TokenMasker(kind="blocky"), r"'blocky'.*random, structured, tube"),
        (lambda: TokenMasker(ratio=1.5), r"drop ratio 1\.5"),
        (lambda: TokenMasker(kind="random", group=(1, 2, 2), keep=1), r"random masks take no group.*\(1, 2, 2\)"),
        (lambda: TokenMasker(group=(1, 2, 2)), r"group and keep together.*keep None"),
        (
            lambda: TokenMasker(ratio=0.75, group=(1, 4, 4), keep=6),
            r"1x4x4 keep 6 drops 0\.625, not the drop ratio 0\.75",
        ),
        (lambda: TokenMasker(kind="tube", group=(2, 2, 2), keep=2), r"tube .*group 2x2x2"),
        (lambda: TokenMasker(ratio=0.3)(2, (1, 8, 8)), r"drop ratio 0\.3 "),
    ],
)
def test_bad_input_raises_one_clear_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()
