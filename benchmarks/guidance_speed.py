"""One guided sampling step, CFG vs Path-Drop Guidance, on the same SPRINT model and batch.

Both double the batch ([x; x] with [cond; null]); PDG's weak half skips the middle blocks, so its cost is
(2 (E + L) + M) / (2 (E + M + L)) of CFG's in the blocks: 0.57 for SiT-XL's 2/24/2 split, less saving for shallower
models. Measured interleaved (CFG, PDG, PDG, CFG, ...) after warm-up, medians compared, next to the FLOP ratio.

    python benchmarks/guidance_speed.py [--models S2 deep] [--latent 32] [--batch 8] [--device cpu|cuda]

Models: 'S2' is SiT-S/2 (hidden 384, 12 blocks, 6 heads, 2/8/2); 'deep' has SiT-XL's depth and split (28 blocks,
2/24/2) at a small width (hidden 256, 4 heads), so the ratio approaches the paper's. Writes
benchmarks/results/guidance_speed.json.
"""
from __future__ import annotations

import argparse
import math
from typing import Optional, Sequence

import torch

from benchmarks.harness import (
    RESULTS, add_out_option, add_timing_options, apply_threads, markdown_table, median_seconds, resolve_device,
    synchronizer, time_interleaved, write_result,
)
from benchmarks.train_speed import build_pair
from sprint_mm.flops import TransformerShape, guidance_flops
from sprint_mm.sampling import Guidance, guided_velocity
from sprint_mm.sprint import Sprint

# name -> (hidden, depth, heads, encoder, decoder)
MODELS: dict[str, tuple[int, int, int, int, int]] = {
    "S2": (384, 12, 6, 2, 2),
    "deep": (256, 28, 4, 2, 2),
}
KINDS = ("cfg", "pdg")


def guidance_step(model: Sprint, x: torch.Tensor, labels: torch.Tensor, kind: str, scale: float = 1.5):
    """One velocity evaluation at t = 0.5 under `kind` guidance (inference mode)."""
    guidance = Guidance(kind, scale)

    def step() -> torch.Tensor:
        with torch.inference_mode():
            return guided_velocity(model, x, 0.5, labels, guidance)

    return step


def pdg_flop_ratio(shape: TransformerShape, tokens: int) -> float:
    """FLOPs of a PDG step over those of a CFG step."""
    return guidance_flops(shape, tokens, "pdg") / guidance_flops(shape, tokens, "cfg")


def measure_model(
    name: str, spec: tuple[int, int, int, int, int], latent: int, batch: int, repeats: int, warmup: int,
    device: torch.device,
) -> dict:
    """One table row for the model `spec` = (hidden, depth, heads, encoder, decoder): CFG and PDG medians, the
    measured PDG/CFG time ratio and the FLOP ratio."""
    hidden, depth, heads, encoder, decoder = spec
    _, model = build_pair(latent, hidden, depth, heads, encoder, decoder)
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch, 4, latent, latent), generator=generator).to(device)
    labels = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    steps = {kind: guidance_step(model, x, labels, kind) for kind in KINDS}
    times = time_interleaved(steps, repeats, warmup, synchronizer(device))
    medians = median_seconds(times)
    tokens = math.prod(model.backbone.token_grid(tuple(x.shape)))
    shape = model.flop_shape()
    return {
        "model": name,
        "hidden": hidden,
        "split": list(shape.depth),
        "tokens": tokens,
        "batch": batch,
        "cfg_s": medians["cfg"],
        "pdg_s": medians["pdg"],
        "time_ratio": medians["pdg"] / medians["cfg"],
        "flop_ratio": pdg_flop_ratio(shape, tokens),
        "times": times,
    }


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Guided sampling step time: CFG vs PDG on the same SPRINT model.")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["S2", "deep"])
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 tokens at patch 2)")
    parser.add_argument("--batch", type=int, default=8, help="samples per step (the model sees twice as many)")
    add_timing_options(parser, repeats=7, warmup=1)
    add_out_option(parser, RESULTS / "guidance_speed.json")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    apply_threads(args.threads)
    rows = [measure_model(name, MODELS[name], args.latent, args.batch, args.repeats, args.warmup, device) for name in args.models]
    result = {"device": str(device), "threads": torch.get_num_threads(), "repeats": args.repeats,
              "warmup": args.warmup, "scale": 1.5, "rows": rows}
    print(f"one guided step (scale 1.5) on {device}, {result['threads']} threads; "
          f"medians of {args.repeats} interleaved steps after {args.warmup} warm-up")
    header = ["model", "hidden", "E/M/L", "tokens", "batch", "CFG s/step", "PDG s/step", "PDG/CFG time",
              "PDG/CFG FLOPs", "speed-up"]
    print(markdown_table(header, [[r["model"], r["hidden"], "/".join(map(str, r["split"])), r["tokens"], r["batch"],
                                   r["cfg_s"], r["pdg_s"], r["time_ratio"], r["flop_ratio"], 1 / r["time_ratio"]]
                                  for r in rows]))
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
