"""The text backbone: cross-attention with padding, the null caption, text under SPRINT masks, images and videos."""
from __future__ import annotations

import pytest
import torch

from registry import BACKBONES
from sprint_mm.layers import CrossAttention
from sprint_mm.masking import TokenMasker
from sprint_mm.sprint import Sprint
from tests.helpers import randomize

LENGTH, TEXT_DIM = 6, 12
REAL_TOKENS = (2, 6, 4)  # real tokens per caption of the batch


def tiny_text(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    options = dict(hidden_size=32, depth=4, num_heads=2, input_size=8, patch_size=2, in_channels=3)
    options.update(text_dim=TEXT_DIM, text_length=LENGTH)
    options.update(overrides)
    return BACKBONES.build("text_dit", **options)


def tiny_sprint(seed: int = 0, **overrides) -> Sprint:
    return randomize(Sprint(tiny_text(seed, **overrides), encoder_depth=1, decoder_depth=1), seed + 1).eval()


def text_condition(seed: int = 0, real_tokens=REAL_TOKENS) -> dict[str, torch.Tensor]:
    """Random caption embeddings padded with zeros, as sprint_mm.text writes them."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(LENGTH)[None] < torch.tensor(real_tokens)[:, None]  # (B, L)
    tokens = torch.randn(len(real_tokens), LENGTH, TEXT_DIM, generator=g).masked_fill(~mask[..., None], 0.0)
    return {"text_tokens": tokens, "text_mask": mask}


def inputs(batch: int = 3, frames: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 3, 8, 8) if frames is None else (batch, 3, frames, 8, 8)
    return torch.randn(shape, generator=g), torch.rand(batch, generator=g)


def test_cross_attention_mask_equals_attending_to_the_real_tokens_only():
    torch.manual_seed(0)
    attn = CrossAttention(32, 2)
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(3, 5, 32, generator=g), torch.randn(3, LENGTH, 32, generator=g)
    mask = text_condition()["text_mask"]
    out = attn(x, context, mask)
    for row, real in enumerate(REAL_TOKENS):
        torch.testing.assert_close(out[row : row + 1], attn(x[row : row + 1], context[row : row + 1, :real]))


@pytest.mark.parametrize("pooled_text", [False, True])
def test_padded_positions_change_nothing_and_real_tokens_do(pooled_text):
    model = tiny_sprint(pooled_text=pooled_text)
    x, t = inputs()
    cond = text_condition()
    mask = TokenMasker("structured", 0.75)(3, (1, 4, 4), generator=torch.Generator().manual_seed(0))
    out = model(x, t, cond, mask=mask)
    noisy_padding = dict(cond, text_tokens=cond["text_tokens"] + 5.0 * (~cond["text_mask"][..., None]))
    torch.testing.assert_close(model(x, t, noisy_padding, mask=mask), out)
    changed_real = {**cond, "text_tokens": cond["text_tokens"].clone()}
    changed_real["text_tokens"][:, 1] += 1.0  # position 1 is real in every row
    assert ((model(x, t, changed_real, mask=mask) - out).abs().amax(dim=(1, 2, 3)) > 1e-4).all()


def test_null_condition_drop_condition_and_set_null_text():
    model = tiny_sprint()
    backbone = model.backbone
    cond = text_condition()
    null = backbone.null_condition(cond)
    assert torch.equal(null["text_mask"], torch.tensor([[True] + [False] * (LENGTH - 1)] * 3))  # before set_null_text
    assert torch.equal(null["text_tokens"], torch.zeros(3, LENGTH, TEXT_DIM))
    all_dropped = backbone.drop_condition(cond, torch.ones(3, dtype=torch.bool))
    assert all(torch.equal(all_dropped[k], null[k]) for k in null)
    some = backbone.drop_condition(cond, torch.tensor([True, False, True]))
    for key in null:
        assert torch.equal(some[key][[0, 2]], null[key][[0, 2]]) and torch.equal(some[key][1], cond[key][1])

    x, t = inputs()
    before = model(x, t, null)
    empty = text_condition(seed=5, real_tokens=(3,))
    backbone.set_null_text(**empty)  # batch 1, as the text encoder's empty() gives it
    null = backbone.null_condition(cond)
    assert torch.equal(null["text_tokens"], empty["text_tokens"].expand(3, -1, -1))
    assert torch.equal(null["text_mask"], empty["text_mask"].expand(3, -1))
    assert (model(x, t, null) - before).abs().max() > 1e-4
    state = backbone.state_dict()
    assert torch.equal(state["y_embedder.null_tokens"], empty["text_tokens"][0])  # saved with the checkpoint


def test_every_parameter_and_the_learned_null_get_gradient():
    model = randomize(Sprint(tiny_text(learned_null=True, pooled_text=True), encoder_depth=1, decoder_depth=1))
    x, t = inputs()
    cond = model.backbone.drop_condition(text_condition(), torch.tensor([True, False, False]))
    assert cond["text_mask"][0].all()
    mask = TokenMasker("structured", 0.75)(3, (1, 4, 4), generator=torch.Generator().manual_seed(0))
    model(x, t, cond, mask=mask).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []
    assert (model.backbone.y_embedder.null_tokens.grad.abs().sum(-1) > 0).all()  # every position of the learned null
    with pytest.raises(ValueError, match="learned_null=True"):
        model.backbone.set_null_text(**text_condition(real_tokens=(3,)))


def test_middle_blocks_see_every_text_token_under_a_75_percent_mask():
    model = tiny_sprint()
    x, t = inputs()
    cond = text_condition()
    seen = {}
    for name, block in (("encoder", model.encoder_blocks[0]), ("middle", model.middle_blocks[-1])):
        block.cross_attn.register_forward_hook(lambda m, args, out, name=name: seen.update({name: args}))
    mask = TokenMasker("structured", 0.75)(3, (1, 4, 4), generator=torch.Generator().manual_seed(0))
    model(x, t, cond, mask=mask)
    queries, text, text_mask = seen["middle"]
    assert queries.shape == (3, 4, 32)  # a quarter of the 16 image tokens
    assert text.shape == (3, LENGTH, 32) and torch.equal(text_mask, cond["text_mask"])
    torch.testing.assert_close(text, seen["encoder"][1])


def test_images_and_videos():
    model = tiny_sprint(input_size=(4, 8, 8))
    assert model.backbone.sample_shape == (3, 4, 8, 8) and tiny_text().sample_shape == (3, 8, 8)
    cond = text_condition()
    x, t = inputs(frames=4)
    mask = TokenMasker("structured", 0.75, (2, 2, 2), 2)(3, model.backbone.token_grid(tuple(x.shape)))
    video_out = model(x, t, cond, mask=mask)
    assert video_out.shape == x.shape and torch.isfinite(video_out).all()
    image_out = model(x[:, :, 0], t, cond)
    assert image_out.shape == (3, 3, 8, 8)
    torch.testing.assert_close(image_out, model(x[:, :, :1], t, cond).squeeze(2))
    other_text = text_condition(seed=1)
    assert (model(x, t, other_text, mask=mask) - video_out).abs().max() > 1e-4


def test_flop_shape_counts_cross_attention():
    shape = Sprint(tiny_text(), encoder_depth=1, decoder_depth=1).flop_shape()
    assert (shape.context_tokens, shape.context_dim, shape.depth, shape.patch_dim) == (LENGTH, 32, (1, 2, 1), 12)


def test_errors():
    model = tiny_text()
    x, t = inputs()
    cond = text_condition()
    with pytest.raises(ValueError, match="condition dict"):
        model(x, t, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"\(B, {LENGTH}, {TEXT_DIM}\)"):
        model(x, t, dict(cond, text_tokens=cond["text_tokens"][:, :4]))
    with pytest.raises(ValueError, match="text_mask must be bool"):
        model(x, t, dict(cond, text_mask=cond["text_mask"].float()))
    with pytest.raises(ValueError, match="at least one True"):
        model(x, t, dict(cond, text_mask=torch.zeros(3, LENGTH, dtype=torch.bool)))
    with pytest.raises(ValueError, match="null text tokens"):
        model.set_null_text(torch.zeros(2, LENGTH, TEXT_DIM), torch.ones(2, LENGTH, dtype=torch.bool))
    with pytest.raises(ValueError, match="null text mask"):
        model.set_null_text(torch.zeros(LENGTH, TEXT_DIM), torch.zeros(LENGTH, dtype=torch.bool))
