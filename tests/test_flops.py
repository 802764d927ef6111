"""Tests for sprint_mm.flops: the paper's numbers, and a second count by torch's FLOP counter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from sprint_mm.flops import (
    TransformerShape,
    block_flops,
    forward_flops,
    guidance_flops,
    sprint_step_ratio,
)

GIGA = 1e9
HEADS = 2


def sit_xl2(depth: tuple[int, int, int], fusion: bool) -> TransformerShape:
    return TransformerShape(hidden=1152, depth=depth, mlp_hidden=4 * 1152, patch_dim=16, fusion=fusion)


SIT_XL_DENSE = sit_xl2((0, 28, 0), fusion=False)
SIT_XL_SPRINT = sit_xl2((2, 24, 2), fusion=True)


# ----------------------------------------------------------------------------------------------
# The numbers quoted in SPEC.md section 5
# ----------------------------------------------------------------------------------------------


def test_sit_xl2_256px_dense_and_sprint_gflops():
    assert forward_flops(SIT_XL_DENSE, 256) / GIGA == pytest.approx(237.2, abs=0.05)
    assert forward_flops(SIT_XL_SPRINT, 256, kept_tokens=64) / GIGA == pytest.approx(85.0, abs=0.05)
    assert sprint_step_ratio(SIT_XL_DENSE, SIT_XL_SPRINT, 256, 64) == pytest.approx(2.79, abs=0.01)


def test_sit_xl2_512px_step_ratio():
    assert sprint_step_ratio(SIT_XL_DENSE, SIT_XL_SPRINT, 1024, 256) == pytest.approx(2.93, abs=0.01)


def test_pdg_costs_0574_of_cfg_for_sit_xl2():
    pdg = guidance_flops(SIT_XL_SPRINT, 256, "pdg")
    cfg = guidance_flops(SIT_XL_SPRINT, 256, "cfg")
    assert pdg / cfg == pytest.approx(0.574, abs=0.001)


def test_sprint_model_without_dropping_costs_dense_plus_fusion():
    dense = forward_flops(SIT_XL_DENSE, 256)
    sprint_full = forward_flops(SIT_XL_SPRINT, 256)
    assert sprint_full - dense == pytest.approx(4 * 256 * 1152**2)


# ----------------------------------------------------------------------------------------------
# A second count: run a tiny hand-written model under torch's FLOP counter
# ----------------------------------------------------------------------------------------------


def _linear(x: torch.Tensor, out_features: int) -> torch.Tensor:
    weight = torch.randn(out_features, x.shape[-1])
    return F.linear(x, weight, torch.randn(out_features))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    def split(z: torch.Tensor) -> torch.Tensor:
        return z.unflatten(-1, (HEADS, -1)).transpose(1, 2)  # (B, heads, tokens, d)

    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
    return (weights @ v).transpose(1, 2).flatten(2)


def _run_block(shape: TransformerShape, x: torch.Tensor, c: torch.Tensor, context) -> torch.Tensor:
    d = shape.hidden
    _linear(F.silu(c), 6 * d)
    q, k, v = _linear(x, 3 * d).chunk(3, dim=-1)
    x = x + _linear(_attend(q, k, v), d)
    if context is not None:
        x = x + _linear(_attend(_linear(x, d), _linear(context, d), _linear(context, d)), d)
    if shape.gated_mlp:
        hidden = F.silu(_linear(x, shape.mlp_hidden)) * _linear(x, shape.mlp_hidden)
    else:
        hidden = F.gelu(_linear(x, shape.mlp_hidden), approximate="tanh")
    return x + _linear(hidden, d)


def _run_stack(shape, stack: int, x, c, context) -> torch.Tensor:
    """The blocks of one stack (0 encoder, 1 middle, 2 decoder); the first skip_projections[stack] of them project a
    long skip [x, skip] 2D -> D first (the skip here: the stack's input)."""
    skip = x
    for block in range(shape.depth[stack]):
        if block < shape.skip_projections[stack]:
            x = _linear(torch.cat([x, skip], dim=-1), shape.hidden)
        x = _run_block(shape, x, c, context)
    return x


def _run_model(shape, tokens, kept_tokens, batch=1, middle_samples=None) -> None:
    """One forward; the middle runs on the first `middle_samples` samples (all by default)."""
    middle_samples = batch if middle_samples is None else middle_samples
    context = None
    if shape.context_tokens:
        context = torch.randn(batch, shape.context_tokens, shape.context_dim)
    x = _linear(torch.randn(batch, tokens, shape.patch_dim), shape.hidden)
    c = _linear(F.silu(_linear(torch.randn(batch, 256), shape.hidden)), shape.hidden)
    x = _run_stack(shape, 0, x, c, context)
    sparse = x[:middle_samples, :kept_tokens]
    _run_stack(shape, 1, sparse, c[:middle_samples], None if context is None else context[:middle_samples])
    if shape.has_fusion:
        x = _linear(torch.cat([x, x], dim=-1), shape.hidden)
    x = _run_stack(shape, 2, x, c, context)
    _linear(F.silu(c), 2 * shape.hidden)
    _linear(x, shape.output_dim)


def _counted_flops(run) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        run()
    return counter.get_total_flops()


TINY_SHAPES = {
    "gelu": TransformerShape(hidden=8, depth=(1, 2, 1), mlp_hidden=32, patch_dim=5, out_patch_dim=7),
    "swiglu": TransformerShape(hidden=8, depth=(1, 2, 1), mlp_hidden=12, gated_mlp=True, patch_dim=5),
    "cross_attention": TransformerShape(
        hidden=8, depth=(2, 1, 1), mlp_hidden=16, patch_dim=6, context_tokens=4, context_dim=3
    ),
    "dense": TransformerShape(hidden=8, depth=(0, 3, 0), mlp_hidden=32, patch_dim=4, fusion=False),
    "long_skips": TransformerShape(hidden=8, depth=(2, 3, 2), mlp_hidden=32, patch_dim=4, skip_projections=(1, 2, 2)),
}


@pytest.mark.parametrize("name", sorted(TINY_SHAPES))
def test_block_flops_matches_torch_flop_counter(name):
    shape = TINY_SHAPES[name]
    tokens = 6
    context = None
    if shape.context_tokens:
        context = torch.randn(1, shape.context_tokens, shape.context_dim)
    x, c = torch.randn(1, tokens, shape.hidden), torch.randn(1, shape.hidden)
    counted = _counted_flops(lambda: _run_block(shape, x, c, context))
    assert block_flops(shape, tokens) == counted


def test_block_flops_is_the_spec_formula_for_gelu_ratio_4():
    d, n = 24, 10
    shape = TransformerShape(hidden=d, depth=(0, 1, 0), mlp_hidden=4 * d, fusion=False)
    assert block_flops(shape, n) == 24 * n * d**2 + 4 * n**2 * d + 12 * d**2


@pytest.mark.parametrize("name", sorted(TINY_SHAPES))
@pytest.mark.parametrize("kept_tokens", [None, 3])
def test_forward_flops_matches_torch_flop_counter(name, kept_tokens):
    shape, tokens = TINY_SHAPES[name], 6
    counted = _counted_flops(lambda: _run_model(shape, tokens, kept_tokens or tokens))
    assert forward_flops(shape, tokens, kept_tokens) == counted


def test_a_skip_projection_costs_4_n_d_squared_where_it_runs():
    shape = TINY_SHAPES["long_skips"]
    plain = TransformerShape(hidden=8, depth=(2, 3, 2), mlp_hidden=32, patch_dim=4)
    n, kept, d = 6, 3, 8
    assert forward_flops(shape, n, kept) - forward_flops(plain, n, kept) == 3 * 4 * n * d**2 + 2 * 4 * kept * d**2
    # PDG: the middle's projections run for the conditional half only
    assert guidance_flops(shape, n, "pdg") - guidance_flops(plain, n, "pdg") == 2 * 3 * 4 * n * d**2 + 2 * 4 * n * d**2


@pytest.mark.parametrize("name", ["gelu", "cross_attention", "long_skips"])
def test_guidance_flops_match_torch_flop_counter(name):
    shape, tokens = TINY_SHAPES[name], 6
    cfg = _counted_flops(lambda: _run_model(shape, tokens, tokens, batch=2))
    pdg = _counted_flops(lambda: _run_model(shape, tokens, tokens, batch=2, middle_samples=1))
    none = _counted_flops(lambda: _run_model(shape, tokens, tokens, batch=1))
    assert guidance_flops(shape, tokens, "cfg") == cfg
    assert guidance_flops(shape, tokens, "pdg") == pdg
    assert guidance_flops(shape, tokens, "none") == none


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_kept_tokens_above_tokens_is_rejected():
    with pytest.raises(ValueError, match="kept_tokens"):
        forward_flops(SIT_XL_SPRINT, 256, kept_tokens=257)


@pytest.mark.parametrize("tokens", [0, -4])
def test_non_positive_tokens_are_rejected(tokens):
    with pytest.raises(ValueError, match="tokens"):
        forward_flops(SIT_XL_SPRINT, tokens)
    with pytest.raises(ValueError, match="tokens"):
        block_flops(SIT_XL_SPRINT, tokens)


def test_unknown_guidance_mode_is_rejected():
    with pytest.raises(ValueError, match="'pag'.*none, cfg, pdg"):
        guidance_flops(SIT_XL_SPRINT, 256, "pag")


def test_pdg_on_a_dense_model_is_rejected():
    with pytest.raises(ValueError, match="pdg"):
        guidance_flops(SIT_XL_DENSE, 256, "pdg")


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"hidden": -8}, "hidden"),
        ({"mlp_hidden": 0}, "mlp_hidden"),
        ({"patch_dim": -1}, "patch_dim"),
        ({"out_patch_dim": 0}, "out_patch_dim"),
        ({"depth": (1, -2, 1)}, "depth"),
        ({"depth": (0, 0, 0)}, "depth"),
        ({"depth": (2, 2)}, "depth"),
        ({"context_tokens": -3}, "context_tokens"),
        ({"context_tokens": 5}, "context_dim"),
        ({"skip_projections": (0, -1, 0)}, "skip_projections"),
        ({"skip_projections": (2, 0, 0)}, "skip_projections"),
        ({"skip_projections": (0, 1)}, "skip_projections"),
    ],
)
def test_bad_shapes_are_rejected(overrides, field):
    arguments = {"hidden": 8, "depth": (1, 2, 1), "mlp_hidden": 32, **overrides}
    with pytest.raises(ValueError, match=field):
        TransformerShape(**arguments)
