"""The SPRINT wrapper: masking, restore, fusion, skip_middle, gradients."""
from __future__ import annotations

import pytest
import torch

from benchmarks.train_speed import saved_activation_bytes
from sprint_mm.masking import TokenMasker, structured_mask
from sprint_mm.sprint import Sprint
from sprint_mm.tokens import TokenPositions
from tests.helpers import randomize, tiny_sit, tiny_sprint


def inputs(batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 8, 8, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, 4, (batch,), generator=g)
    return x, t, y


def test_fused_forward_matches_hand_written_recomputation():
    model = tiny_sprint()
    bb = model.backbone
    x, t, y = inputs()
    mask = structured_mask(4, (1, 4, 4), (1, 2, 2), 1, generator=torch.Generator().manual_seed(0))
    out = model(x, t, y, mask=mask)

    # Direct recomputation, written without the wrapper's helpers.
    emb = bb.embed(x, t, y)
    positions = emb.positions
    h = emb.tokens
    blocks = list(bb.blocks)
    h = blocks[0](h, emb.c, positions)
    dense = h
    expected_sparse = model.mask_token.expand(4, 16, 32).clone()
    for i in range(4):
        keep = mask.ids_keep[i]
        hi = dense[i : i + 1, keep]
        pos_i = TokenPositions(positions.coords[:, keep], positions.cos[:, keep], positions.sin[:, keep])
        for block in blocks[1:4]:
            hi = block(hi, emb.c[i : i + 1], pos_i)
        expected_sparse[i, keep] = hi[0]
    fused = torch.cat([expected_sparse, dense], -1) @ model.fusion.weight.T + model.fusion.bias
    h = blocks[4](fused, emb.c, positions)
    expected = bb.unembed(h, emb)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_dropped_positions_receive_the_mask_token_before_fusion():
    model = tiny_sprint()
    x, t, y = inputs()
    mask = structured_mask(4, (1, 4, 4), (1, 2, 2), 1, generator=torch.Generator().manual_seed(1))
    seen = {}
    model.fusion.register_forward_hook(lambda m, args, out: seen.update({"in": args[0]}))
    model(x, t, y, mask=mask)
    sparse = seen["in"][..., :32]
    token = model.mask_token[0, 0]
    for i in range(4):
        dropped = mask.dropped[i]
        assert torch.equal(sparse[i, dropped], token.expand(int(dropped.sum()), 32))
        assert not torch.isclose(sparse[i, ~dropped], token.expand(int((~dropped).sum()), 32)).all(-1).any()


def test_skip_middle_never_runs_the_middle_on_skipped_rows():
    model = tiny_sprint()
    x, t, y = inputs()
    batches = []
    model.middle_blocks[0].register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    model(x, t, y, skip_middle=torch.tensor([True, False, True, True]))
    model(x, t, y, skip_middle=torch.ones(4, dtype=torch.bool))
    assert batches == [1, 0]  # with every row skipping, the middle sees an empty batch: no compute, same graph


def test_every_trainable_parameter_is_in_every_graph():
    """What lets DDP run without scanning for unused parameters: every trainable parameter gets a gradient (zero
    where it did nothing), whether every row skips the middle, no token is dropped, or both."""
    model = randomize(Sprint(tiny_sit(), encoder_depth=1, decoder_depth=1, learnable_mask_token=True)).train()
    x, t, y = inputs()
    mask = TokenMasker("structured", 0.75)(4, (1, 4, 4), generator=torch.Generator().manual_seed(0))
    for extra in ({"skip_middle": torch.ones(4, dtype=torch.bool)}, {}, {"mask": mask}):
        model.zero_grad(set_to_none=True)
        model(x, t, y, **extra).square().mean().backward()
        assert [n for n, p in model.named_parameters() if p.grad is None] == [], extra.keys()
    middle = [p.grad for block in model.middle_blocks for p in block.parameters()]
    assert all(grad.abs().sum() > 0 for grad in middle)  # the last pass (a mask, no skip) trains the middle


def test_gradients_reach_every_trainable_parameter():
    model = Sprint(tiny_sit(), encoder_depth=1, decoder_depth=1)
    randomize(model)
    model.train()
    x, t, y = inputs()
    mask = TokenMasker("structured", 0.75)(4, (1, 4, 4), generator=torch.Generator().manual_seed(0))
    model(x, t, y, mask=mask, skip_middle=torch.tensor([False, True, False, False])).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert missing == []
    assert not model.mask_token.requires_grad


def test_learnable_mask_token_gets_gradient():
    model = randomize(Sprint(tiny_sit(), encoder_depth=1, decoder_depth=1, learnable_mask_token=True))
    x, t, y = inputs()
    mask = TokenMasker("structured", 0.75)(4, (1, 4, 4))
    model(x, t, y, mask=mask).square().mean().backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0


def test_fusion_none_feeds_the_sparse_path_to_the_decoder():
    model = randomize(Sprint(tiny_sit(), encoder_depth=1, decoder_depth=1, fusion="none")).eval()
    x, t, y = inputs()
    skip = torch.ones(4, dtype=torch.bool)
    out = model(x, t, y, skip_middle=skip)
    # With everything skipped and no fusion, the decoder sees only the mask token: the input x cannot matter.
    out2 = model(x + 1.0, t, y, skip_middle=skip)
    torch.testing.assert_close(out, out2)


def test_state_dict_holds_each_block_once():
    model = Sprint(tiny_sit(), encoder_depth=1, decoder_depth=1)
    names = list(model.state_dict())
    assert sum(n.endswith("attn.qkv.weight") for n in names) == 5
    assert "mask_token" in names and "fusion.weight" in names


def test_errors():
    with pytest.raises(ValueError, match="at least one middle block"):
        Sprint(tiny_sit(), encoder_depth=3, decoder_depth=2)
    with pytest.raises(ValueError, match="unknown fusion 'sum'"):
        Sprint(tiny_sit(), fusion="sum")
    model = tiny_sprint()
    x, t, y = inputs()
    with pytest.raises(ValueError, match="token mask is for batch 2"):
        model(x, t, y, mask=TokenMasker("random", 0.5)(2, (1, 4, 4)))
    with pytest.raises(TypeError, match="skip_middle"):  # a dense backbone has no middle path to skip
        tiny_sit()(x, t, y, skip_middle=torch.zeros(4, dtype=torch.bool))


@pytest.mark.parametrize("wrapped", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients_with_less_activation_memory(wrapped):
    model = tiny_sprint(depth=5).train() if wrapped else randomize(tiny_sit(depth=5)).train()
    backbone = model.backbone if wrapped else model
    g = torch.Generator().manual_seed(3)
    x, t, y = torch.randn(4, 3, 8, 8, generator=g), torch.rand(4, generator=g), torch.tensor([0, 1, 2, 3])
    extra = {}
    if wrapped:  # a token mask and one path-dropped row: every branch of the SPRINT forward
        extra = {"mask": TokenMasker("structured", 0.75)(4, (1, 4, 4), generator=torch.Generator().manual_seed(0)),
                 "skip_middle": torch.tensor([False, True, False, False])}

    def gradients() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = model(x, t, y, **extra)
        (out.square().mean()).backward()
        return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain_out, plain = gradients()
    kept_plain = saved_activation_bytes(lambda: model(x, t, y, **extra), model.parameters())
    backbone.gradient_checkpointing = True
    out, checkpointed = gradients()
    kept = saved_activation_bytes(lambda: model(x, t, y, **extra), model.parameters())
    torch.testing.assert_close(out, plain_out)
    assert checkpointed.keys() == plain.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)
    assert kept < 0.6 * kept_plain
