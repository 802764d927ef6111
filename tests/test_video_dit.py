"""The video backbone: 3D patches and RoPE, images as one-frame videos, full and factorised attention under SPRINT."""
from __future__ import annotations

import pytest
import torch

from registry import BACKBONES
from sprint_mm.layers import Attention, apply_rope, grid_coordinates
from sprint_mm.masking import TokenMasker, random_mask, structured_mask
from sprint_mm.sprint import Sprint
from sprint_mm.tokens import gather_tokens
from tests.helpers import randomize

GRID = (4, 4, 4)  # tokens of a (4, 8, 8) video with patch (1, 2, 2)


def tiny_video(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    options = dict(
        hidden_size=32, depth=4, num_heads=2, input_size=(4, 8, 8), patch_size=(1, 2, 2), in_channels=3, num_classes=4
    )
    options.update(overrides)
    return BACKBONES.build("video_dit", **options)


def tiny_sprint(seed: int = 0, **overrides) -> Sprint:
    return randomize(Sprint(tiny_video(seed, **overrides), encoder_depth=1, decoder_depth=1), seed + 1).eval()


def inputs(batch: int = 3, frames: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, frames, 8, 8, generator=g)
    return x, torch.rand(batch, generator=g), torch.randint(0, 4, (batch,), generator=g)


def tube_mask(batch: int, grid=GRID, seed: int = 0):
    return structured_mask(batch, grid, (1, 2, 2), 1, generator=torch.Generator().manual_seed(seed), tube=True)


def test_rope_scores_depend_only_on_coordinate_differences():
    rope = tiny_video().rope  # head dim 16, Wan split (8, 4, 4)
    assert rope.axis_dims == (8, 4, 4)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 2, 64, 16, generator=g)
    coords = grid_coordinates(GRID)

    def scores(c):
        cos_sin = rope(c)
        return apply_rope(q, cos_sin) @ apply_rope(k, cos_sin).transpose(-1, -2)  # (1, 2, 64, 64)

    base = scores(coords)
    for shift in ([3, 0, 0], [0, 5, 0], [0, 0, 2], [100, 7, 9]):  # beyond any trained length: no position cap
        torch.testing.assert_close(scores(coords + torch.tensor(shift)), base, atol=2e-4, rtol=1e-4)
    stretched = coords * torch.tensor([2, 1, 1])  # differences change along t only
    assert (scores(stretched) - base).abs().max() > 1e-2
    assert (base - q @ k.transpose(-1, -2)).abs().max() > 1e-2


def test_factorised_attention_equals_per_frame_and_per_position_attention():
    model = randomize(tiny_video(attention="factorised"))
    x, t, y = inputs(batch=2)
    emb = model.embed(x, t, y)
    cos, sin = emb.positions.rope
    h = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(1))
    spatial, temporal = model.blocks[0].attn, model.blocks[1].attn
    assert (spatial.span, temporal.span) == ("spatial", "temporal")
    expected_spatial, expected_temporal = torch.empty_like(h), torch.empty_like(h)
    for frame in range(4):  # raster order: frame f holds tokens 16 f .. 16 f + 15
        idx = torch.arange(16 * frame, 16 * frame + 16)
        expected_spatial[:, idx] = spatial.attend(h[:, idx], (cos[:, idx], sin[:, idx]))
    for cell in range(16):
        idx = torch.arange(cell, 64, 16)
        expected_temporal[:, idx] = temporal.attend(h[:, idx], (cos[:, idx], sin[:, idx]))
    torch.testing.assert_close(spatial(h, emb.positions), expected_spatial, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(temporal(h, emb.positions), expected_temporal, atol=1e-5, rtol=1e-5)


def test_factorised_attention_on_tube_kept_tokens_mixes_only_within_frame_or_position():
    model = randomize(tiny_video(attention="factorised"))
    x, t, y = inputs(batch=2)
    positions = model.embed(x, t, y).positions
    mask = tube_mask(2)
    kept = positions.gather(mask.ids_keep)  # (2, 16, *): 4 cells in each of 4 frames
    frame, cell = kept.coords[..., 0], kept.coords[..., 1] * GRID[2] + kept.coords[..., 2]
    h = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    poked = h.clone()
    poked[:, 0] += 1.0  # one kept token per sample
    for attn, related in ((model.blocks[0].attn, frame == frame[:, :1]), (model.blocks[1].attn, cell == cell[:, :1])):
        changed = (attn(poked, kept) - attn(h, kept)).abs().amax(-1) > 1e-6  # (2, 16)
        assert torch.equal(changed, related)
    # Equivariance: any order of the kept tokens gives the same per-token outputs.
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(2)).expand(2, -1)
    shuffled = kept.gather(perm)
    for attn in (model.blocks[0].attn, model.blocks[1].attn):
        expected = gather_tokens(attn(h, kept), perm)
        torch.testing.assert_close(attn(gather_tokens(h, perm), shuffled), expected, atol=1e-5, rtol=1e-5)


def test_non_tube_masks_with_factorised_attention_raise():
    model = tiny_sprint(attention="factorised")
    x, t, y = inputs()
    assert model(x, t, y, mask=tube_mask(3)).shape == x.shape
    generator = torch.Generator().manual_seed(0)
    per_frame = structured_mask(3, GRID, (1, 2, 2), 1, generator=generator)  # 4 tokens in every frame, cells differ
    uneven = structured_mask(3, GRID, (2, 2, 2), 2, generator=generator)
    for mask in (per_frame, uneven, random_mask(3, GRID, 0.5, generator=generator)):
        with pytest.raises(ValueError, match="tube mask"):
            model(x, t, y, mask=mask)


@pytest.mark.parametrize(
    "attention, masker",
    [("full", TokenMasker("structured", 0.75, (2, 2, 2), 2)), ("factorised", TokenMasker("tube", 0.75))],
)
def test_sprint_on_13_frames_trains_every_parameter(attention, masker):
    model = randomize(Sprint(tiny_video(attention=attention, depth=5), encoder_depth=1, decoder_depth=1)).train()
    x, t, y = inputs(batch=2, frames=13)
    grid = model.backbone.token_grid(tuple(x.shape))
    assert grid == (13, 4, 4)
    mask = masker(2, grid, generator=torch.Generator().manual_seed(0))
    assert mask.num_kept < 13 * 16 // 2
    out = model(x, t, y, mask=mask, skip_middle=torch.tensor([False, True]))
    assert out.shape == x.shape
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []


def test_presets_layout_and_flop_shape():
    model = tiny_video(patch_size=(2, 2, 2), hidden_size=None, num_heads=None, depth=2)  # S preset width and heads
    assert (model.hidden_size, model.num_heads, len(model.blocks)) == (384, 6, 2)
    assert model.sample_shape == (3, 4, 8, 8) and model.token_grid((1, 3, 4, 8, 8)) == (2, 4, 4)
    assert model.rope.axis_dims == (24, 20, 20)
    names = set(model.state_dict())
    assert {"x_embedder.proj.weight", "t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight"} <= names
    assert {"blocks.1.attn.qkv.weight", "final_layer.linear.weight"} <= names
    shape = Sprint(tiny_video(), encoder_depth=1, decoder_depth=1).flop_shape()
    assert (shape.patch_dim, shape.depth, shape.hidden, shape.fusion) == (3 * 4, (1, 2, 1), 32, True)
    assert tiny_video(rope_axes=(4, 6, 6)).rope.axis_dims == (4, 6, 6)


def test_errors():
    with pytest.raises(ValueError, match="unknown attention 'axial'"):
        tiny_video(attention="axial")
    with pytest.raises(ValueError, match="rope_axes"):
        tiny_video(rope_axes=(8, 8))
    with pytest.raises(ValueError, match="not divisible"):
        tiny_video(input_size=(4, 9, 8))
    video_patch2 = tiny_video(patch_size=(2, 2, 2))
    x, t, y = inputs(frames=4)
    with pytest.raises(ValueError, match="temporal patch 2"):
        video_patch2(x[:, :, 0], t, y)
    with pytest.raises(ValueError, match="input channels"):
        video_patch2(x[:, :2], t, y)
    with pytest.raises(ValueError, match="needs the tokens' positions"):
        Attention(32, 2, span="spatial")(torch.zeros(1, 4, 32), None)
    with pytest.raises(ValueError, match="unknown attention span"):
        Attention(32, 2, span="diagonal")
