"""Shared layers and the image SiT: patchify, RoPE, attention backends, presets, grids."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from registry import BACKBONES
from sprint_mm.dit import PRESETS
from sprint_mm.layers import (
    Attention,
    RotaryEmbedding,
    TimestepEmbedder,
    apply_rope,
    check_attention_backend,
    grid_coordinates,
    patchify,
    unpatchify,
    wan_axis_split,
)
from tests.helpers import randomize, tiny_sit


def test_patchify_equals_a_strided_conv_and_unpatchify_inverts_it():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 12, generator=g)
    weight = torch.randn(5, 3, 2, 4, generator=g)
    conv = F.conv2d(x, weight, stride=(2, 4)).flatten(2).transpose(1, 2)  # (B, N, 5)
    tokens = patchify(x, (2, 4))
    torch.testing.assert_close(tokens @ weight.reshape(5, -1).T, conv)
    torch.testing.assert_close(unpatchify(tokens, (2, 4), (4, 3), 3), x)
    video = torch.randn(2, 3, 4, 6, 6, generator=g)
    torch.testing.assert_close(unpatchify(patchify(video, (2, 3, 3)), (2, 3, 3), (2, 2, 2), 3), video)
    with pytest.raises(ValueError, match=r"not divisible by the patch size \(2, 4\)"):
        patchify(torch.randn(1, 3, 7, 12), (2, 4))


def test_rope_scores_depend_only_on_relative_positions():
    g = torch.Generator().manual_seed(0)
    rope = RotaryEmbedding(16, (8, 8))
    q, k = torch.randn(1, 1, 2, 16, generator=g), torch.randn(1, 1, 2, 16, generator=g)

    def score(a, b):
        cos, sin = rope(torch.tensor([a, b], dtype=torch.float32))
        rq, rk = apply_rope(q, (cos, sin)), apply_rope(k, (cos, sin))
        return (rq[0, 0, 0] * rk[0, 0, 1]).sum()

    torch.testing.assert_close(score([1, 2], [4, 7]), score([11, 32], [14, 37]), atol=1e-4, rtol=1e-4)
    assert not torch.isclose(score([1, 2], [4, 7]), score([1, 2], [5, 7]), atol=1e-3)
    # Interleaved pairs: channel pair (0, 1) of the row axis rotates by position * theta_0 = position.
    cos, sin = rope(torch.tensor([[3.0, 0.0]]))
    assert torch.allclose(cos[0, 0, :2], torch.cos(torch.tensor(3.0)).expand(2))
    assert wan_axis_split(72) == (24, 24, 24) and wan_axis_split(64) == (24, 20, 20)


def test_timestep_features_are_cos_first_on_unit_time():
    emb = TimestepEmbedder(8, frequency_size=4)
    feats = emb.features(torch.tensor([0.5]))
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(2) / 2)
    torch.testing.assert_close(feats[0], torch.cat([torch.cos(0.5 * freqs), torch.sin(0.5 * freqs)]))


def test_sit_runs_on_non_square_grids_and_any_patch_size():
    for patch, size in ((1, (6, 10)), (2, (8, 12)), (4, (8, 16))):
        model = randomize(tiny_sit(input_size=size, patch_size=patch))
        x = torch.randn(2, 3, *size)
        out = model(x, torch.rand(2), torch.tensor([0, 3]))
        assert out.shape == x.shape
        assert model.token_grid(tuple(x.shape)) == (1, size[0] // patch, size[1] // patch)
    with pytest.raises(ValueError, match="not divisible"):
        tiny_sit(input_size=(8, 10), patch_size=4)


def test_presets_set_width_heads_and_depth_and_explicit_values_win():
    for size, (hidden, depth, heads) in PRESETS.items():
        with torch.device("meta"):
            model = BACKBONES.build("sit", size=size, input_size=8)
        assert (model.hidden_size, len(model.blocks), model.num_heads) == (hidden, depth, heads)
    with torch.device("meta"):
        assert len(BACKBONES.build("sit", size="XL", depth=4, input_size=8).blocks) == 4
    with pytest.raises(ValueError, match="unknown size preset 'XXL'"):
        BACKBONES.build("sit", size="XXL")


def test_registry_errors_name_close_matches():
    with pytest.raises(KeyError, match="Did you mean 'sit'"):
        BACKBONES.get("sitt")
    assert {"text_dit", "video_dit"} <= set(BACKBONES.list("*dit")) and "sit" not in BACKBONES.list("*dit")


def test_labels_out_of_range_and_bad_backends_are_clear_errors():
    model = tiny_sit()
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 4\]"):
        model(torch.randn(1, 3, 8, 8), torch.rand(1), torch.tensor([9]))
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        check_attention_backend("flash")
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        with pytest.raises(ImportError, match="xformers"):
            Attention(32, 2, backend="xformers")


def test_attention_key_mask_ignores_masked_keys():
    g = torch.Generator().manual_seed(0)
    from sprint_mm.layers import attention

    q, k, v = (torch.randn(1, 2, 3, 4, generator=g) for _ in range(3))
    mask = torch.tensor([[True, True, False]])
    out = attention(q, k, v, key_mask=mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k[:, :, :2], v[:, :, :2]))
    assert grid_coordinates((2, 3)).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
