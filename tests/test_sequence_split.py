"""The arithmetic of context parallelism, in one process: how a token grid is cut into boxes, that the boxes tile the
grid and the output, that structured masks keep the same count in every box, and which counts cannot balance."""
from __future__ import annotations

import math

import pytest
import torch

from sprint_mm.layers import grid_coordinates, patchify, unpatchify
from sprint_mm.masking import TokenMasker, random_mask
from sprint_mm.sequence_split import SequenceSplit, candidate_splits, choose


@pytest.mark.parametrize("grid, parts", [((4, 4, 4), 2), ((3, 4, 6), 6), ((1, 6, 8), 4), ((21, 30, 52), 6)])
def test_boxes_tile_the_grid_and_are_sub_grids(grid, parts):
    for split in candidate_splits(grid, parts):
        ids = [split.token_ids(part) for part in range(parts)]
        assert all(part.numel() == math.prod(split.box) for part in ids)
        assert torch.equal(torch.cat(ids).sort().values, torch.arange(math.prod(grid)))  # disjoint, covering
        coords = grid_coordinates(grid)
        for part in ids:  # a box: every axis spans a contiguous range of its box length
            spans = coords[part].amax(0) - coords[part].amin(0) + 1
            assert tuple(spans.tolist()) == split.box
        assert torch.equal(split.owners()[ids[-1]], torch.full((ids[-1].numel(),), parts - 1))


@pytest.mark.parametrize("image", [False, True])
def test_assemble_puts_every_box_output_at_its_place(image):
    # what DiT.unembed does on a box (patch values -> pixels) is undone and redone on the whole
    grid, patch = ((1, 4, 6) if image else (2, 4, 6)), (1, 2, 2)
    shape = (2, 3, *[g * p for g, p in zip(grid, patch)])
    whole = torch.randn(shape)
    tokens = patchify(whole, patch)  # (B, N, C * prod(patch)) in raster order
    for split in candidate_splits(grid, 2) + candidate_splits(grid, 4):
        boxes = torch.stack([unpatchify(tokens[:, split.token_ids(part)], patch, split.box, 3)
                             for part in range(split.parts)])
        expected = whole.squeeze(2) if image else whole
        assert torch.equal(split.assemble(boxes.squeeze(3) if image else boxes, image), expected), split.factors


def test_candidates_cut_the_fewest_axes_time_first():
    assert [s.factors for s in candidate_splits((4, 6, 6), 2)] == [(2, 1, 1), (1, 2, 1), (1, 1, 2)]
    assert [s.factors for s in candidate_splits((3, 6, 4), 6)][:2] == [(1, 6, 1), (3, 2, 1)]
    assert choose((4, 6, 6), 2).factors == (2, 1, 1)  # without a mask: the first


@pytest.mark.parametrize("kind, grid, parts, factors", [
    ("structured", (4, 4, 4), 2, (2, 1, 1)),  # 2x2x2 groups: 2 frames per box
    ("structured", (3, 4, 4), 2, (1, 2, 1)),  # 3 frames (an edge group in time): cut the rows instead
    ("structured", (1, 3, 4), 2, (1, 1, 2)),  # 3 rows: an edge row of groups in every box alike
    ("structured", (21, 30, 52), 6, (1, 3, 2)),  # an 81-frame 480p Wan clip over 6 processes: two axes
    ("tube", (5, 4, 8), 4, (1, 1, 4)),
])
def test_structured_masks_keep_the_same_count_in_every_box(kind, grid, parts, factors):
    masker = TokenMasker(kind, 0.75)
    for seed in range(3):  # whatever the draw
        mask = masker(4, grid, generator=torch.Generator().manual_seed(seed))
        split = choose(grid, parts, mask.ids_keep, masker.group_for(grid)[0])
        assert split.factors == factors and choose(grid, parts, mask.ids_keep).balances(mask.ids_keep)
        assert bool((split.kept_counts(mask.ids_keep) == mask.num_kept // parts).all())
        local = [split.local_kept(mask.ids_keep, part) for part in range(parts)]
        for part, ids in enumerate(local):  # local indices of this box's kept tokens, in the mask's order
            global_ids = split.token_ids(part)[ids]
            expected = mask.ids_keep[split.owners()[mask.ids_keep] == part].view(4, -1)
            assert torch.equal(global_ids, expected)


def test_counts_that_cannot_balance_are_refused():
    masker = TokenMasker("structured", 0.75)
    # 2x2x2 groups on 5x4x4 (an edge group in time): rows and columns cut into whole groups, over 2 or 4 processes
    mask = masker(2, (5, 4, 4), generator=torch.Generator())
    assert choose((5, 4, 4), 2, mask.ids_keep, (2, 2, 2)).factors == (1, 2, 1)
    assert choose((5, 4, 4), 4, mask.ids_keep, (2, 2, 2)).factors == (1, 2, 2)
    # 2x2x6: 6 kept tokens, divisible by 2, but every cut in 2 halves a group: a draw may balance by chance, the
    # group layout says that later draws need not
    mask = masker(1, (2, 2, 6), generator=torch.Generator())
    with pytest.raises(ValueError, match="keeps 6 of the 24 tokens of grid 2x2x6 and no cut into 2 boxes of whole mask "
                                         "groups exists"):
        choose((2, 2, 6), 2, mask.ids_keep, (2, 2, 2))
    with pytest.raises(ValueError, match="a random mask never balances"):
        choose((4, 8, 8), 2, random_mask(8, (4, 8, 8), 0.75, generator=torch.Generator()).ids_keep)
    with pytest.raises(ValueError, match="split factors"):
        SequenceSplit((3, 4, 4), (2, 1, 1))
