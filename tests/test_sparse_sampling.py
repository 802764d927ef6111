"""Sampling-time token density (the middle on a structured fraction of the tokens at the noisy steps), sparse guidance,
and the FLOPs of a sampling run."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sprint_mm.density import MiddleDensity, fraction_kept, fraction_mask
from sprint_mm.flops import block_flops, guidance_flops
from sprint_mm.generation import generate
from sprint_mm.latents import build_codec
from sprint_mm.masking import kept_count, rotating_mask
from sprint_mm.sampling import Guidance, guided_velocity, sample, sampling_flops
from tests.helpers import tiny_sit, tiny_sprint

GRID = (1, 4, 4)  # tiny_sprint: 8 px, patch 2


def setup(batch: int = 3, seed: int = 0, depth: int = 5):
    g = torch.Generator().manual_seed(seed)
    model = tiny_sprint(seed, depth=depth)
    return model, torch.randn(batch, 3, 8, 8, generator=g), torch.randint(0, 4, (batch,), generator=g)


# ----------------------------------------------------------------------------- the rotating mask


@pytest.mark.parametrize("grid, group, keep", [((1, 4, 4), (1, 2, 2), 1), ((1, 5, 6), (1, 2, 2), 1),
                                               ((2, 4, 4), (2, 2, 2), 2), ((1, 8, 8), (1, 4, 4), 2)])
def test_rotating_masks_cover_every_token_once_over_a_cycle_and_agree_with_the_structured_count(grid, group, keep):
    cycle = math.prod(group) // keep
    seen = torch.zeros(math.prod(grid), dtype=torch.long)
    for phase in range(cycle):
        mask = rotating_mask(2, grid, group, keep, phase)
        assert torch.equal(mask.ids_keep[0], mask.ids_keep[1])  # the same for every sample
        assert mask.num_kept == kept_count(grid, group, keep)
        assert torch.equal(mask.ids_restore.gather(1, mask.ids_keep), torch.arange(mask.num_kept).expand(2, -1))
        seen[mask.ids_keep[0]] += 1
    full_groups = all(g % s == 0 for g, s in zip(grid, group))
    if full_groups:
        assert torch.equal(seen, torch.ones_like(seen))
    assert torch.equal(rotating_mask(1, grid, group, keep, cycle).ids_keep, rotating_mask(1, grid, group, keep, 0).ids_keep)


def test_a_rotating_mask_keeps_k_spread_tokens_in_every_group():
    mask = rotating_mask(1, (2, 4, 4), (2, 2, 2), 2, phase=1)
    coords = [((i // 16), (i // 4) % 4, i % 4) for i in mask.ids_keep[0].tolist()]
    groups = {}
    for t, h, w in coords:
        groups.setdefault((t // 2, h // 2, w // 2), []).append((t % 2, h % 2, w % 2))
    assert len(groups) == 4 and all(sorted(cells) == [(0, 0, 1), (1, 0, 1)] for cells in groups.values())


def test_density_and_rotating_mask_errors():
    with pytest.raises(ValueError, match="middle keep must be a number in \\[0, 1\\], got 1.5"):
        MiddleDensity(1.5)
    with pytest.raises(ValueError, match="middle keep must be > 0"):
        MiddleDensity(0.0)
    with pytest.raises(ValueError, match="threshold.*got -0.1"):
        MiddleDensity(0.25, -0.1)
    with pytest.raises(ValueError, match="drop ratio 0.7 is not 1 - k/\\|g\\|"):
        MiddleDensity(0.3).check(GRID)
    with pytest.raises(ValueError, match="phase -1"):
        rotating_mask(1, GRID, (1, 2, 2), 1, -1)
    with pytest.raises(ValueError, match="sparse guidance keep must be > 0"):
        Guidance("sparse", 2.0, sparse_keep=0.0)


# ----------------------------------------------------------------------------- the density schedule


def test_a_schedule_that_keeps_every_token_is_the_dense_sampler_exactly():
    model, x, y = setup()
    for guidance in (Guidance("none"), Guidance("cfg", 2.0), Guidance("pdg", 2.0), Guidance("sparse", 2.0)):
        dense = sample(model, x, y, steps=4, guidance=guidance)
        assert torch.equal(sample(model, x, y, steps=4, guidance=guidance, density=MiddleDensity(1.0, 0.0)), dense)
        # a sparse keep that never applies (t > 1 never happens) leaves it untouched too
        assert torch.equal(sample(model, x, y, steps=4, guidance=guidance, density=MiddleDensity(0.25, 1.0)), dense)


def test_the_middle_is_sparse_exactly_above_the_threshold():
    model, x, y = setup()
    density = MiddleDensity(0.25, 0.5)
    for t, phase in ((0.75, 3), (0.5, 0)):
        tt = torch.full((3,), t)
        mask = rotating_mask(3, GRID, (1, 2, 2), 1, phase) if t > 0.5 else None
        expected = model(x, tt, y) if mask is None else model(x, tt, y, mask=mask)
        assert torch.equal(guided_velocity(model, x, t, y, Guidance("none"), density, phase), expected)
    assert not torch.equal(model(x, torch.full((3,), 0.75), y), guided_velocity(model, x, 0.75, y, Guidance("none"),
                                                                              density, 0))


@pytest.mark.parametrize("kind", ["cfg", "pdg"])
def test_cfg_and_pdg_with_a_sparse_middle_equal_two_passes_with_the_mask(kind):
    model, x, y = setup()
    t, tt, null = 0.8, torch.full((3,), 0.8), torch.full_like(y, 4)
    mask = rotating_mask(3, GRID, (1, 2, 2), 1, phase=2)
    strong = model(x, tt, y, mask=mask)
    weak = (model(x, tt, null, mask=mask) if kind == "cfg"
            else model(x, tt, null, mask=mask, skip_middle=torch.ones(3, dtype=torch.bool)))
    guided = guided_velocity(model, x, t, y, Guidance(kind, 2.5), MiddleDensity(0.25, 0.5), phase=2)
    torch.testing.assert_close(guided, weak + 2.5 * (strong - weak), atol=1e-5, rtol=1e-5)


def test_a_dense_backbone_is_refused_a_sparse_middle_and_sparse_guidance():
    model = tiny_sit().eval()
    noise, labels = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    codec = build_codec("identity")
    with pytest.raises(ValueError, match="middle keep of 0.25 needs a SPRINT model"):
        generate(model, labels, codec, noise, steps=2, density=MiddleDensity(0.25))
    with pytest.raises(ValueError, match="sparse guidance needs a SPRINT model"):
        generate(model, labels, codec, noise, steps=2, guidance=Guidance("sparse", 2.0))


# ----------------------------------------------------------------------------- sparse guidance


def test_branches_equal_separate_forwards():
    model, x, y = setup()
    tt = torch.full((3,), 0.3)
    mask = fraction_mask(0.25, 3, GRID, phase=1)
    full, sparse = model.branches(x, tt, y, [None, mask])
    assert torch.equal(full, model(x, tt, y)) and torch.equal(sparse, model(x, tt, y, mask=mask))


def test_sparse_guidance_with_every_token_kept_is_cfg_arithmetic_on_the_same_branches():
    """With sparse_keep 1 the weak branch is the strong one: weak + s (strong - weak), as CFG combines its branches,
    gives the conditional velocity exactly."""
    model, x, y = setup()
    tt = torch.full((3,), 0.6)
    strong = weak = model(x, tt, y)
    guided = guided_velocity(model, x, 0.6, y, Guidance("sparse", 3.0, sparse_keep=1.0))
    assert torch.equal(guided, weak + 3.0 * (strong - weak))
    assert torch.equal(guided, strong)


def test_sparse_guidance_equals_two_passes_and_thins_the_weak_branch_below_the_strong_one():
    model, x, y = setup()
    t, tt = 0.8, torch.full((3,), 0.8)
    guidance = Guidance("sparse", 2.5, sparse_keep=0.25)
    strong, weak = model(x, tt, y), model(x, tt, y, mask=rotating_mask(3, GRID, (1, 2, 2), 1, phase=5))
    torch.testing.assert_close(guided_velocity(model, x, t, y, guidance, phase=5), weak + 2.5 * (strong - weak),
                               atol=1e-6, rtol=1e-6)
    # under a middle keep of 0.5 the strong branch keeps half, the weak branch a quarter of that (1x4x4 keep 2)
    on_8 = tiny_sprint(0, depth=5, input_size=16)
    x8, grid8 = torch.randn(2, 3, 16, 16), (1, 8, 8)
    y8 = y[:2]
    strong = on_8(x8, tt[:2], y8, mask=fraction_mask(0.5, 2, grid8, phase=1))
    weak = on_8(x8, tt[:2], y8, mask=rotating_mask(2, grid8, (1, 4, 4), 2, phase=1))
    torch.testing.assert_close(guided_velocity(on_8, x8, t, y8, guidance, MiddleDensity(0.5, 0.5), phase=1),
                               weak + 2.5 * (strong - weak), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- FLOPs


def attention_scores(model, rows_kept: list[tuple[int, int]]) -> int:
    """QK^T and AV (torch's FLOP counter does not see the CPU's fused attention): 4 N^2 D per block; rows_kept lists
    (rows, middle tokens) of each middle run, the outer blocks run on `rows_kept[0][0]` rows of all 16 tokens."""
    d, outer = model.backbone.hidden_size, model.encoder_depth + model.decoder_depth
    middle = len(model.backbone.blocks) - outer
    return 4 * d * sum(rows * middle * kept**2 for rows, kept in rows_kept)


def test_sparse_guidance_flops_match_the_model_run_under_the_flop_counter():
    model, x, y = setup(batch=1, depth=6)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        guided_velocity(model, x, 0.8, y, Guidance("sparse", 2.0), MiddleDensity(0.5, 0.5), phase=0)
    d, e, dec = model.backbone.hidden_size, model.encoder_depth, model.decoder_depth
    # the encoder once, the decoder twice: 4 N^2 D of attention per block and run
    attention = 4 * d * 16**2 * (e + 2 * dec) + attention_scores(model, [(1, 8), (1, 2)])
    expected = guidance_flops(model.flop_shape(), 16, "sparse", kept_tokens=8, weak_kept_tokens=2)
    assert counter.get_total_flops() + attention == expected


def test_sampling_flops_follow_the_formula():
    """A SiT-S-like SPRINT shape by hand: F(N) = 24 N D^2 + 4 N^2 D + 12 D^2 per block, Euler 4 steps at t = 1, 0.75,
    0.5, 0.25; the middle on 64 of 256 tokens above t = 0.5 (two steps), PDG at scale 2 on [0, 0.8] (three steps)."""
    model = tiny_sprint(0, hidden_size=64, depth=6, num_heads=2, input_size=32, encoder_depth=2, decoder_depth=1)
    d, n, p = 64, 256, 3 * 2 * 2

    def block(tokens: int) -> int:
        return 24 * tokens * d * d + 4 * tokens * tokens * d + 12 * d * d

    embed = 2 * n * p * d + 2 * 256 * d + 2 * d * d
    after = 4 * n * d * d + 4 * d * d + 2 * n * d * p  # fusion, final adaLN and output
    outer = embed + 3 * block(n) + after
    middle = {256: 3 * block(256), 64: 3 * block(64)}
    assert block(n) == block_flops(model.flop_shape(), n)
    density, pdg = MiddleDensity(0.25, 0.5), Guidance("pdg", 2.0, (0.0, 0.8))
    expected = (outer + middle[64]) + (2 * outer + middle[64]) + 2 * (2 * outer + middle[256])  # t = 1 unguided
    assert sampling_flops(model, (3, 32, 32), steps=4, guidance=pdg, density=density) == expected
    sparse = Guidance("sparse", 2.0, sparse_keep=0.25)
    weak = {64: 3 * block(16), 256: 3 * block(64)}
    expected = sum(embed + 2 * block(n) + 2 * (block(n) + after) + middle[kept] + weak[kept]
                   for kept in (64, 64, 256, 256))
    assert sampling_flops(model, (3, 32, 32), steps=4, guidance=sparse, density=density) == expected
    heun = sampling_flops(model, (3, 32, 32), steps=2, solver="heun", density=density)
    assert heun == (outer + middle[64]) + 2 * (outer + middle[256])  # t = 1, then 0.5 twice (not above 0.5); none at 0
    assert fraction_kept(0.25, (1, 16, 16)) == 64 and fraction_kept(1.0, (1, 16, 16)) == 256


def test_sample_command_keeps_today_s_samples_at_keep_1_and_reports_flops(tmp_path, capsys):
    from PIL import Image

    from sprint_mm.cli import sample_main
    from tests.test_training import train

    run = tmp_path / "run"
    assert train(run, 2) == 0
    common = ["--run", str(run), "--labels", "1", "2", "--steps", "3", "--guidance", "pdg", "--scale", "2"]
    outs = {name: tmp_path / f"{name}.png" for name in ("today", "keep1", "sparse", "sparse_guidance")}
    assert sample_main([*common, "--out", str(outs["today"])]) == 0
    assert sample_main([*common, "--middle-keep", "1", "--middle-keep-above", "0", "--out", str(outs["keep1"])]) == 0
    assert sample_main([*common, "--middle-keep", "0.25", "--out", str(outs["sparse"])]) == 0
    assert sample_main(["--run", str(run), "--labels", "1", "2", "--steps", "3", "--guidance", "sparse", "--scale", "2",
                        "--middle-keep", "0.5", "--out", str(outs["sparse_guidance"])]) == 0
    pixels = {name: list(Image.open(path).getdata()) for name, path in outs.items()}
    assert pixels["keep1"] == pixels["today"]  # (the 2-step model's middle is near its zero init: no pixel to tell)
    lines = [line for line in capsys.readouterr().out.splitlines() if "GFLOPs per sample" in line]
    assert len(lines) == 4 and "middle keep 0.5 above t = 0.5, sparse keep 0.25" in lines[3]
    gflops = [float(line.split("; ")[1].split(" GFLOPs")[0]) for line in lines]
    assert gflops[0] == gflops[1] > gflops[2]
