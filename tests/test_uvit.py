"""U-ViT on the seam: its long skips by hand, the splits SPRINT allows, its FLOPs, and its digits configuration trained
end to end. tests/test_backbone_contract.py holds it to the seam like every backbone."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from registry import BACKBONES
from sprint_mm.backbone import run_blocks, run_stack
from sprint_mm.cli import sample_main, train_main
from sprint_mm.flops import forward_flops, guidance_flops
from sprint_mm.masking import structured_mask
from sprint_mm.sampling import Guidance, guided_velocity
from sprint_mm.sprint import Sprint
from sprint_mm.tokens import TokenPositions
from sprint_mm.uvit import PRESETS, LongSkipBlock, UViT
from tests.helpers import randomize

TINY = dict(hidden_size=32, num_heads=2, input_size=8, patch_size=2, in_channels=3, num_classes=4)


def tiny_uvit(depth: int = 7, seed: int = 0, **options):
    torch.manual_seed(seed)
    return BACKBONES.build("uvit", depth=depth, **{**TINY, **options})


def inputs(batch: int = 3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, 8, 8, generator=g), torch.rand(batch, generator=g), torch.randint(0, 4, (batch,), generator=g)


def apply(model: Sprint, index: int, h: torch.Tensor, c, positions, outputs: dict[int, torch.Tensor]) -> torch.Tensor:
    """Block `index` by hand: an out-block projects [h, its mirror in-block's output] before running."""
    block = model.backbone.blocks[index]
    if isinstance(block, LongSkipBlock):
        mirror = len(model.backbone.blocks) - 1 - index
        h = torch.cat([h, outputs[mirror]], dim=-1) @ block.skip_linear.weight.T + block.skip_linear.bias
        block = block.block
    return block(h, c, positions)


@pytest.mark.parametrize("split", [(1, 1), (2, 1), (3, 2)])
def test_forward_matches_u_vit_written_by_hand(split):
    """Encoder skips reach the decoder on every token and the middle at its kept tokens only; middle skips stay in the
    middle. Written per sample with plain indexing, without the seam's helpers."""
    model = randomize(Sprint(tiny_uvit(), *split)).eval()
    bb, (x, t, y) = model.backbone, inputs()
    encoder, decoder_start = model.encoder_depth, model.decoder_start
    mask = structured_mask(3, (1, 4, 4), (1, 2, 2), 1, generator=torch.Generator().manual_seed(0))
    emb = bb.embed(x, t, y)
    pos = emb.positions
    outputs, h = {}, emb.tokens
    for i in range(encoder):
        h = outputs[i] = apply(model, i, h, emb.c, pos, outputs)
    dense = h
    sparse = model.mask_token.expand_as(dense).clone()
    for row in range(3):
        keep = mask.ids_keep[row]
        row_outputs = {i: out[row : row + 1, keep] for i, out in outputs.items()}
        hr = dense[row : row + 1, keep]
        kept_pos = TokenPositions(pos.coords[:, keep], pos.cos[:, keep], pos.sin[:, keep])
        for i in range(encoder, decoder_start):
            hr = row_outputs[i] = apply(model, i, hr, emb.c[row : row + 1], kept_pos, row_outputs)
        sparse[row, keep] = hr[0]
    h = torch.cat([sparse, dense], -1) @ model.fusion.weight.T + model.fusion.bias
    for i in range(decoder_start, len(bb.blocks)):
        h = apply(model, i, h, emb.c, pos, outputs)
    torch.testing.assert_close(model(x, t, y, mask=mask), bb.unembed(h, emb), atol=1e-5, rtol=1e-5)


def test_dense_forward_runs_every_long_skip():
    bb = randomize(tiny_uvit(depth=5)).eval()
    x, t, y = inputs()
    emb = bb.embed(x, t, y)
    outputs, h = {}, emb.tokens
    for i in range(5):
        h = outputs[i] = apply(Sprint(bb, 1, 1), i, h, emb.c, emb.positions, outputs)
    torch.testing.assert_close(bb(x, t, y), bb.unembed(h, emb), atol=1e-5, rtol=1e-5)


def test_out_blocks_called_without_their_skip_say_how_to_run_them():
    bb = tiny_uvit(depth=5)
    x, t, y = inputs()
    with pytest.raises(ValueError, match="run_stack"):
        run_blocks(bb.blocks, bb.embed(x, t, y))
    with pytest.raises(ValueError, match="block 3 takes the long skip of block 1, which has not run"):
        run_stack(bb, bb.embed(x, t, y), 2)


def test_presets_blocks_and_skips_follow_u_vit():
    with torch.device("meta"):
        small = BACKBONES.build("uvit")  # U-ViT-S: hidden 512, 13 blocks, 8 heads
    assert (small.hidden_size, len(small.blocks), small.num_heads) == PRESETS["S"] == (512, 13, 8)
    assert small.long_skips == ((0, 12), (1, 11), (2, 10), (3, 9), (4, 8), (5, 7))
    assert [isinstance(b, LongSkipBlock) for b in small.blocks] == [False] * 7 + [True] * 6
    assert tuple(small.blocks[7].skip_linear.weight.shape) == (512, 1024)
    with pytest.raises(ValueError, match="odd"):
        tiny_uvit(depth=6)
    with pytest.raises(ValueError, match="'XL'.*S, M, L, H"):
        BACKBONES.build("uvit", size="XL")


@pytest.mark.parametrize("encoder, decoder", [(e, d) for e in range(1, 6) for d in range(1, 7 - e)])
def test_sprint_takes_exactly_the_splits_with_encoder_depth_at_least_decoder_depth(encoder, decoder):
    backbone = tiny_uvit(depth=7)
    if encoder >= decoder:
        Sprint(backbone, encoder, decoder)
        return
    with pytest.raises(ValueError) as err:
        Sprint(backbone, encoder, decoder)
    message = str(err.value)
    source = 6 - max(7 - decoder, 4)  # the middle block that feeds the first decoder block with a skip
    assert f"long skip {source} -> {6 - source}" in message
    assert f"encoder_depth {encoder} / decoder_depth {decoder}" in message
    assert "encoder_depth >= decoder_depth" in message
    if 2 * decoder < 7:  # an encoder as deep as the decoder still leaves a middle block
        assert f"with decoder_depth {decoder}, encoder_depth >= {decoder}" in message
    else:
        assert f"no encoder_depth leaves a middle block with decoder_depth {decoder}" in message


def test_a_malformed_long_skip_declaration_is_one_clear_error():
    backbone = tiny_uvit(depth=5)
    for bad, expected in (([(3, 1)], "0 <= source < target < 5"), ([(0, 9)], "0 <= source < target < 5"),
                          ([(0, 4), (1, 4)], "feeds block 4 twice")):
        backbone.long_skips = tuple(bad)
        with pytest.raises(ValueError, match=expected):
            Sprint(backbone, 1, 1)


@pytest.mark.parametrize("split, projections", [((2, 1), (0, 2, 1)), ((1, 1), (0, 2, 1)), ((3, 3), (0, 0, 3))])
def test_flop_shape_places_each_skip_projection_in_the_stack_of_its_target(split, projections):
    model = Sprint(tiny_uvit(depth=7), *split)  # skips 0 -> 6, 1 -> 5, 2 -> 4
    assert model.backbone.flop_shape().skip_projections == (0, 3, 0)
    assert model.flop_shape().skip_projections == projections


def test_a_flop_shape_that_miscounts_its_skip_projections_is_refused():
    model = Sprint(tiny_uvit(depth=7), 2, 1)
    model.backbone.flop_shape = lambda: replace(UViT.flop_shape(model.backbone), skip_projections=(0, 1, 0))
    with pytest.raises(ValueError, match="counts 1 skip projections for 3 long skips"):
        model.flop_shape()


def attention_scores(model: Sprint, tokens: int, kept: int, rows: int = 1, middle_rows: int = 1) -> int:
    """QK^T and AV of every block (torch's FLOP counter does not see the CPU's fused attention): 4 N^2 D each."""
    d, outer = model.backbone.hidden_size, model.encoder_depth + model.decoder_depth
    middle = len(model.backbone.blocks) - outer
    return 4 * d * (rows * outer * tokens**2 + middle_rows * middle * kept**2)


@pytest.mark.parametrize("split", [(2, 1), (3, 3)])
def test_flops_count_the_skip_projections_where_they_run(split):
    """The model run under torch's FLOP counter, with a 0.75 mask and with PDG, against the analytic count."""
    model = Sprint(tiny_uvit(depth=7), *split).eval()
    x, t, y = (v[:1] for v in inputs())
    mask = structured_mask(1, (1, 4, 4), (1, 2, 2), 1)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t, y, mask=mask)
    assert counter.get_total_flops() + attention_scores(model, 16, 4) == forward_flops(model.flop_shape(), 16, 4)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        guided_velocity(model, x, 0.5, y, Guidance("pdg", 2.0))
    expected = guidance_flops(model.flop_shape(), 16, "pdg")
    assert counter.get_total_flops() + attention_scores(model, 16, 16, rows=2) == expected


def test_uvit_digits_trains_both_stages_and_samples_with_pdg(tmp_path):
    """The shipped gin pair, 2 steps per stage on 8 px digits, then PDG samples from the stage-2 run."""
    common = ["uvit.input_size = 8", "DigitsDataset.resolution = 8", "Trainer.batch_size = 8", "Trainer.max_steps = 2",
              "Trainer.preview_every = 0", "Trainer.progress = False"]

    def train(gin_file: str, run: Path, *extra: str) -> int:
        argv = ["--gin_file", gin_file, "--run_dir", str(run)]
        for binding in (*common, *extra):
            argv += ["--gin_param", binding]
        return train_main(argv)

    assert train("gin/image/uvit_digits_stage1.gin", tmp_path / "stage1") == 0
    assert train("gin/image/uvit_digits_stage2.gin", tmp_path / "stage2", f"Trainer.init_from = '{tmp_path / 'stage1'}'") == 0
    assert "build_model.backbone = 'uvit'" in (tmp_path / "stage2" / "config.gin").read_text()
    out = tmp_path / "pdg.npz"
    assert sample_main(["--run", str(tmp_path / "stage2"), "--labels", "3", "7", "--steps", "2", "--guidance", "pdg",
                        "--out", str(out)]) == 0
    samples = np.load(out)["arr_0"]
    assert samples.shape == (2, 8, 8, 3) and samples.dtype == np.uint8
