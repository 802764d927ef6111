"""Video speed: dense vs SPRINT training steps and CFG vs PDG sampling steps of a VideoDiT, beside their FLOP ratios.

    python benchmarks/video_speed.py [--frames 16] [--grid 8] [--hidden 128] [--depth 12] [--batch 2] [--repeats 5]

The defaults fit a CPU: 16 frames x 8 x 8 = 1024 tokens (a (16, 16, 16) 4-channel latent with patch 1x2x2), a
hidden-128 VideoDiT of 12 blocks split 2/8/2 like VideoDiT-B/2, 0.75 structured drop (2x2x2 groups keep 2). A
realistic clip (16 x 32 x 32 = 16384 tokens) is too slow for a CPU; its FLOP ratios are reported for reference, for
this model and for VideoDiT-B/2.
The compared variants run interleaved (A B, B A, A B, ...: `harness.time_interleaved`) after a warm-up and the
medians are reported, so a change of machine load hits both. Prints a markdown table and writes
benchmarks/results/video_speed.json.
"""
from __future__ import annotations

import argparse
import math
import platform
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from benchmarks.harness import (
    RESULTS, add_out_option, add_timing_options, apply_threads, median_seconds, time_interleaved, write_result,
)
from registry import BACKBONES
from sprint_mm.flops import forward_flops, guidance_flops
from sprint_mm.flow import FlowMatching
from sprint_mm.masking import TokenMasker
from sprint_mm.sampling import Guidance, guided_velocity
from sprint_mm.sprint import Sprint

PATCH = (1, 2, 2)
CHANNELS = 4
NUM_CLASSES = 10
REFERENCE_GRID = (16, 32, 32)  # tokens of a realistic clip: 16 latent frames of 64 x 64 (512 px, f8) at patch 1x2x2
GUIDANCE_SCALE = 2.0


# ----------------------------------------------------------------------------------------------------------------
# Models and the timed operations
# ----------------------------------------------------------------------------------------------------------------

def build_models(args: argparse.Namespace) -> tuple[torch.nn.Module, Sprint]:
    """The dense backbone and the same backbone (same weights) wrapped in Sprint."""
    torch.manual_seed(0)
    backbone = BACKBONES.build(
        "video_dit", hidden_size=args.hidden, depth=args.depth, num_heads=args.heads,
        input_size=(args.frames, PATCH[1] * args.grid, PATCH[2] * args.grid), patch_size=PATCH,
        in_channels=CHANNELS, num_classes=NUM_CLASSES,
    )
    return backbone, Sprint(backbone, encoder_depth=args.encoder_depth, decoder_depth=args.decoder_depth)


def reference_models() -> tuple[torch.nn.Module, Sprint]:
    """VideoDiT-B/2 (hidden 768, 12 blocks, E/M/L 2/8/2) on the reference grid, built without memory (costing only)."""
    input_size = tuple(n * p for n, p in zip(REFERENCE_GRID, PATCH))
    with torch.device("meta"):
        backbone = BACKBONES.build("video_dit", size="B", input_size=input_size, patch_size=PATCH,
                                   in_channels=CHANNELS, num_classes=NUM_CLASSES)
        return backbone, Sprint(backbone, encoder_depth=2, decoder_depth=2)


def training_step(model: torch.nn.Module, objective: FlowMatching, x: torch.Tensor, y: torch.Tensor,
                  optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """One optimizer step: loss, backward, AdamW update."""

    def step() -> None:
        objective.loss(model, x, y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def sampling_step(model: Sprint, x: torch.Tensor, y: torch.Tensor, kind: str) -> Callable[[], None]:
    """One guided velocity estimate (the doubled batch of a sampler step) without gradients."""
    guidance = Guidance(kind, GUIDANCE_SCALE)

    @torch.no_grad()
    def step() -> None:
        guided_velocity(model, x, 0.5, y, guidance)

    return step


# ----------------------------------------------------------------------------------------------------------------
# FLOP ratios
# ----------------------------------------------------------------------------------------------------------------

def kept_tokens(masker: TokenMasker, grid: tuple[int, int, int]) -> int:
    mask = masker(1, grid, generator=torch.Generator().manual_seed(0))
    return math.prod(grid) if mask is None else mask.num_kept


def flop_ratios(dense: torch.nn.Module, sprint: Sprint, masker: TokenMasker, grid: tuple[int, int, int]) -> dict:
    """Dense / SPRINT training FLOPs (forward; backward scales alike) and PDG / CFG sampling FLOPs on `grid`."""
    tokens = math.prod(grid)
    kept = kept_tokens(masker, grid)
    dense_flops = forward_flops(dense.flop_shape(), tokens)
    sprint_flops = forward_flops(sprint.flop_shape(), tokens, kept)
    return {
        "grid": list(grid),
        "tokens": tokens,
        "kept_tokens": kept,
        "dense_gflops_per_sample": dense_flops / 1e9,
        "sprint_gflops_per_sample": sprint_flops / 1e9,
        "dense_over_sprint": dense_flops / sprint_flops,
        "pdg_over_cfg": guidance_flops(sprint.flop_shape(), tokens, "pdg") / guidance_flops(sprint.flop_shape(), tokens, "cfg"),
    }


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    apply_threads(args.threads)
    dense, sprint = build_models(args)
    grid = (args.frames, args.grid, args.grid)
    masker = TokenMasker("structured", 0.75, group=(2, 2, 2), keep=2)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, CHANNELS, args.frames, PATCH[1] * args.grid, PATCH[2] * args.grid, generator=generator)
    y = torch.randint(0, NUM_CLASSES, (args.batch,), generator=generator)
    # Path drop off for both, so every SPRINT step runs its middle blocks (the cost a step is charged on average).
    dense_objective = FlowMatching(label_dropout=0.0, path_drop=0.0, masker=None)
    sprint_objective = FlowMatching(label_dropout=0.0, path_drop=0.0, masker=masker)
    train_times = median_seconds(time_interleaved(
        {
            "dense": training_step(dense, dense_objective, x, y, torch.optim.AdamW(dense.parameters(), lr=1e-4)),
            "sprint": training_step(sprint, sprint_objective, x, y,
                                    torch.optim.AdamW([p for p in sprint.parameters() if p.requires_grad], lr=1e-4)),
        },
        args.repeats, args.warmup,
    ))
    sprint.eval()
    sample_times = median_seconds(time_interleaved(
        {"cfg": sampling_step(sprint, x, y, "cfg"), "pdg": sampling_step(sprint, x, y, "pdg")},
        args.repeats, args.warmup,
    ))
    return {
        "setup": {
            "device": "cpu",
            "machine": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "model": f"VideoDiT hidden {args.hidden}, {args.heads} heads, {args.depth} blocks "
                     f"(E/M/L {args.encoder_depth}/{args.depth - args.encoder_depth - args.decoder_depth}/"
                     f"{args.decoder_depth}), patch {'x'.join(map(str, PATCH))}, {CHANNELS} channels",
            "mask": masker.describe(grid),
            "batch": args.batch,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "timing": "interleaved, median seconds per call",
        },
        "training_step": {
            "dense_s": train_times["dense"],
            "sprint_s": train_times["sprint"],
            "measured_dense_over_sprint": train_times["dense"] / train_times["sprint"],
        },
        "sampling_step": {
            "guidance_scale": GUIDANCE_SCALE,
            "cfg_s": sample_times["cfg"],
            "pdg_s": sample_times["pdg"],
            "measured_pdg_over_cfg": sample_times["pdg"] / sample_times["cfg"],
        },
        "flops": {
            "measured_grid": flop_ratios(dense, sprint, masker, grid),
            "reference_grid": flop_ratios(dense, sprint, masker, REFERENCE_GRID),
            "reference_grid_b2": flop_ratios(*reference_models(), masker, REFERENCE_GRID),
        },
    }


def speed_table(result: dict) -> str:
    """The markdown table of a result: measured ratios beside the FLOP ratios."""
    train, sample, flops = result["training_step"], result["sampling_step"], result["flops"]
    measured, reference, b2 = flops["measured_grid"], flops["reference_grid"], flops["reference_grid_b2"]
    grid = "x".join(map(str, measured["grid"]))
    ref_grid = "x".join(map(str, reference["grid"]))
    lines = [
        f"{result['setup']['model']}; {result['setup']['mask']}; batch {result['setup']['batch']}; "
        f"{result['setup']['torch_threads']} CPU thread(s); medians of {result['setup']['repeats']} interleaved runs",
        "",
        f"| comparison ({grid} = {measured['tokens']} tokens) | A (s) | B (s) | measured A/B | FLOP A/B | "
        f"FLOP A/B at {ref_grid} = {reference['tokens']} tokens | same, VideoDiT-B/2 (2/8/2) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| training step: dense (A) vs SPRINT (B) | {train['dense_s']:.3f} | {train['sprint_s']:.3f} | "
        f"{train['measured_dense_over_sprint']:.2f}x | {measured['dense_over_sprint']:.2f}x | "
        f"{reference['dense_over_sprint']:.2f}x | {b2['dense_over_sprint']:.2f}x |",
        f"| sampling step: PDG (A) vs CFG (B) | {sample['pdg_s']:.3f} | {sample['cfg_s']:.3f} | "
        f"{sample['measured_pdg_over_cfg']:.3f} | {measured['pdg_over_cfg']:.3f} | {reference['pdg_over_cfg']:.3f} | "
        f"{b2['pdg_over_cfg']:.3f} |",
    ]
    return "\n".join(lines)


def add_model_and_timing_options(p: argparse.ArgumentParser, out: Path) -> argparse.ArgumentParser:
    """The VideoDiT size, the interleaved timing and the result file: options shared with bucket_speed.py."""
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--encoder-depth", "--encoder_depth", type=int, default=2, help="SPRINT dense encoder blocks")
    p.add_argument("--decoder-depth", "--decoder_depth", type=int, default=2, help="SPRINT dense decoder blocks")
    add_timing_options(p, repeats=5, warmup=1, device=False)
    return add_out_option(p, out)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=16, help="latent frames (= temporal tokens with patch 1x2x2)")
    p.add_argument("--grid", type=int, default=8, help="spatial tokens per side")
    p.add_argument("--batch", type=int, default=2)
    return add_model_and_timing_options(p, RESULTS / "video_speed.json")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parser().parse_args(argv)
    for name in ("frames", "grid", "hidden", "heads", "depth", "batch", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    result = run(args)
    print(speed_table(result))
    print(f"wrote {write_result(result, args.out)}")
    return result


if __name__ == "__main__":
    main()
