"""The public contract suite fails where it should: every property against a backbone that breaks it (and none of the
properties before it), by the property's name; it takes a name, a class or a plugin's backbone."""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from sprint_mm.backbone import run_stack
from sprint_mm.dit import DiT
from sprint_mm.layers import DiTBlock
from sprint_mm.testing import PROPERTIES, BackboneContractError, check_backbone
from tests.my_dit import MyDiT

SMALL = dict(hidden_size=48, depth=4, num_heads=2)
IMAGE = dict(SMALL, image_size=8, channels=3, num_classes=4)


class UnsavedScale(MyDiT):
    """Scales its tokens by a random tensor kept as a plain attribute: not in the state dict, so not saved."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.scale = torch.rand(self.hidden_size) + 0.5

    def embed(self, x, t, cond):
        embedded = super().embed(x, t, cond)
        return embedded.with_tokens(embedded.tokens * self.scale)


class ContextPositionBlock(DiTBlock):
    def forward(self, x, c, positions=None, context=None):
        return super().forward(x + context, c, positions)


class PositionsInContext(MyDiT):
    """Smuggles its per-token position table through `Embedded.context`, which the seam never gathers by token."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.blocks = nn.ModuleList(ContextPositionBlock(self.hidden_size, 2) for _ in self.blocks)

    def embed(self, x, t, cond):
        embedded = super().embed(x, t, cond)
        embedded.tokens = embedded.tokens - self.pos_embed
        embedded.context = self.pos_embed  # (1, N, D)
        return embedded


class IgnoresDrop(MyDiT):
    """Its drop_condition never drops: no null condition for CFG, PDG or label dropout."""

    def drop_condition(self, cond, drop):
        return cond


class StashBlock(DiTBlock):
    """Adds the channel means of the previous block's output, passed on a shared dict behind the seam's back."""

    def __init__(self, dim: int, stash: dict) -> None:
        super().__init__(dim, 2)
        self.stash = stash

    def forward(self, x, c, positions=None, context=None):
        out = super().forward(x + self.stash.get("last", 0.0), c, positions)
        self.stash["last"] = out.mean(dim=(0, 1))
        return out


class MiddleStateInDecoder(MyDiT):
    """Its first decoder block reads state the middle left behind, so a row that skips the middle still depends on
    it."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.stash: dict = {}
        self.blocks = nn.ModuleList(StashBlock(self.hidden_size, self.stash) for _ in self.blocks)

    def embed(self, x, t, cond):
        self.stash.clear()
        return super().embed(x, t, cond)


class BatchStatistics(MyDiT):
    """Centres the conditioning vector over the batch: a row's prediction depends on the other rows."""

    def embed(self, x, t, cond):
        embedded = super().embed(x, t, cond)
        embedded.c = embedded.c - embedded.c.mean(dim=0, keepdim=True)
        return embedded


class GlobalSkipInForward(MyDiT):
    """Adds the embedded tokens to the last block's output in its own dense forward, outside the seam: a model that
    runs the seam (SPRINT) never adds them, so converting it changes what it computes."""

    def forward(self, x, t, cond):
        embedded = self.embed(x, t, cond)
        return self.unembed(run_stack(self, embedded).tokens + embedded.tokens, embedded)


class NoiseBlock(DiTBlock):
    """Training noise from its own generator, which checkpointing's recomputation does not replay."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, 2)
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x, c, positions=None, context=None):
        if self.training:
            x = x + 0.1 * torch.randn(x.shape, generator=self.generator)
        return super().forward(x, c, positions)


class PrivateNoise(MyDiT):
    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.blocks = nn.ModuleList(NoiseBlock(self.hidden_size) for _ in self.blocks)


class VideoFrameEmbedding(DiT):
    """Adds a learned frame embedding to videos only, so a one-frame video is not its image."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.frame_embed = nn.Parameter(torch.randn(self.hidden_size))

    def embed(self, x, t, cond):
        embedded = super().embed(x, t, cond)
        return embedded if x.dim() == 4 else embedded.with_tokens(embedded.tokens + self.frame_embed)


class OutputTableFromTheStart(DiT):
    """Adds a learned table to its final tokens by raster index, counted from token 0: a box of the grid that does not
    start there reads another box's entries (context parallelism would be wrong)."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        tokens = math.prod(self.token_grid((1, self.in_channels, *self.input_size)))
        self.out_table = nn.Parameter(torch.randn(tokens, self.hidden_size))

    def unembed(self, tokens, embedded):
        return super().unembed(tokens + self.out_table[: tokens.shape[1]], embedded)


VIDEO = dict(SMALL, input_size=8, in_channels=3, num_classes=4)
# property -> a backbone that breaks it and passes every property before it
BROKEN = {
    "strict save and load": (UnsavedScale, IMAGE),
    "keep-all mask = no mask": (PositionsInContext, IMAGE),
    "drop_condition replaces the dropped rows": (IgnoresDrop, IMAGE),
    "skipped rows = mask-token path": (MiddleStateInDecoder, IMAGE),
    "identity fusion = dense forward": (GlobalSkipInForward, IMAGE),
    "PDG batch = two passes": (BatchStatistics, IMAGE),
    "gradient checkpointing gives the same gradients": (PrivateNoise, IMAGE),
    "image = one-frame video": (VideoFrameEmbedding, VIDEO),
    "a box of the grid unembeds to its region": (OutputTableFromTheStart, VIDEO),
}


@pytest.mark.parametrize("prop", list(PROPERTIES))
def test_each_property_fails_on_a_backbone_that_breaks_it(prop):
    backbone, options = BROKEN[prop]
    with pytest.raises(BackboneContractError, match=rf"^backbone {backbone.__name__!r} fails {re.escape(repr(prop))}"):
        check_backbone(backbone, **options)


@pytest.mark.parametrize("backbone, options", [(MyDiT, IMAGE), (DiT, VIDEO)])
def test_the_unbroken_originals_pass(backbone, options):
    assert check_backbone(backbone, **options)


def test_a_contract_error_is_an_assertion_error_that_keeps_its_cause():
    with pytest.raises(AssertionError) as err:
        check_backbone(IgnoresDrop, **IMAGE)
    assert isinstance(err.value, BackboneContractError) and err.value.__cause__ is not None
    assert "null condition is its condition" in str(err.value)


def test_an_unknown_name_lists_the_registered_backbones():
    with pytest.raises(KeyError, match="unknown backbone 'uvitt'.*Did you mean 'uvit'"):
        check_backbone("uvitt")


def test_something_that_is_not_a_backbone_is_refused():
    with pytest.raises(TypeError, match="not a sprint_mm.backbone.Backbone"):
        check_backbone(nn.Linear, in_features=2, out_features=2)


def test_a_backbone_too_shallow_for_a_split_is_refused():
    with pytest.raises(ValueError, match="at least 3 blocks"):
        check_backbone(MyDiT, **{**IMAGE, "depth": 2})
