"""Per-bucket training throughput: dense vs SPRINT steps of one VideoDiT on every bucket of a mixed-size table.

    python benchmarks/bucket_speed.py [--buckets 1:32:32 1:24:40 5:16:16 9:16:16 17:16:16] [--tokens-per-step 4096]
                                      [--hidden 128] [--depth 12] [--repeats 5] [--threads 1]

Each bucket is frames:height:width in latent units (4 channels, patch 1x2x2, so a still 256 px image is 1:32:32 and
a 17-frame clip through a 4x temporal VAE is 5 latent frames); its batch comes from `propose_batch_sizes`, which keeps
the tokens per step about constant. For every bucket the dense backbone and the same backbone in SPRINT (0.75
structured drop on that bucket's grid) take optimizer steps interleaved (A B, B A, ...: `harness.time_interleaved`)
and the medians give tokens per second for both and the measured dense / SPRINT step ratio, beside the FLOP ratio.
Prints a markdown table and writes benchmarks/results/bucket_speed.json.
"""
from __future__ import annotations

import argparse
import platform
from typing import Optional, Sequence

import torch

from benchmarks.harness import RESULTS, apply_threads, markdown_table, median_seconds, time_interleaved, write_result
from benchmarks.video_speed import (
    CHANNELS, NUM_CLASSES, PATCH, add_model_and_timing_options, build_models, flop_ratios, training_step,
)
from sprint_mm.data.buckets import propose_batch_sizes
from sprint_mm.flow import FlowMatching
from sprint_mm.masking import TokenMasker

DEFAULT_BUCKETS = ("1:32:32", "1:24:40", "5:16:16", "9:16:16", "17:16:16")


def parse_bucket(text: str) -> tuple[int, int, int]:
    try:
        frames, height, width = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a bucket is frames:height:width, e.g. 5:16:16; got {text!r}") from None
    if min(frames, height, width) < 1 or height % PATCH[1] or width % PATCH[2]:
        raise argparse.ArgumentTypeError(f"bucket {text!r}: sizes must be positive and height, width multiples of "
                                         f"the patch {PATCH[1]}")
    return frames, height, width


def measure_bucket(args: argparse.Namespace, shape: tuple[int, int, int], batch: int) -> dict:
    """Dense and SPRINT optimizer steps on one bucket's batch; tokens/s of each and the ratios."""
    frames, height, width = shape
    # Built for a square grid of the bucket's height; RoPE positions follow each input, so any width runs.
    dense, sprint = build_models(argparse.Namespace(**{**vars(args), "frames": frames, "grid": height // PATCH[1]}))
    grid = (frames, height // PATCH[1], width // PATCH[2])
    masker = TokenMasker("structured", 0.75, group=(2, 2, 2), keep=2)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, CHANNELS, frames, height, width, generator=generator)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    times = median_seconds(time_interleaved(
        {
            "dense": training_step(dense, FlowMatching(label_dropout=0.0, path_drop=0.0, masker=None), x, y,
                                   torch.optim.AdamW(dense.parameters(), lr=1e-4)),
            "sprint": training_step(sprint, FlowMatching(label_dropout=0.0, path_drop=0.0, masker=masker), x, y,
                                    torch.optim.AdamW([p for p in sprint.parameters() if p.requires_grad], lr=1e-4)),
        },
        args.repeats, args.warmup,
    ))
    tokens = batch * grid[0] * grid[1] * grid[2]
    return {
        "bucket": list(shape),
        "grid": list(grid),
        "batch": batch,
        "tokens_per_step": tokens,
        "dense_s": times["dense"],
        "sprint_s": times["sprint"],
        "dense_tokens_per_s": tokens / times["dense"],
        "sprint_tokens_per_s": tokens / times["sprint"],
        "measured_dense_over_sprint": times["dense"] / times["sprint"],
        "flop_dense_over_sprint": flop_ratios(dense, sprint, masker, grid)["dense_over_sprint"],
        "mask": masker.describe(grid),
    }


def run(args: argparse.Namespace) -> dict:
    apply_threads(args.threads)
    shapes = [parse_bucket(text) for text in args.buckets]
    batches = propose_batch_sizes(shapes, args.tokens_per_step, PATCH)
    rows = [measure_bucket(args, shape, batch) for shape, batch in zip(shapes, batches)]
    return {
        "setup": {
            "machine": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "model": f"VideoDiT hidden {args.hidden}, {args.heads} heads, {args.depth} blocks (E/M/L "
                     f"{args.encoder_depth}/{args.depth - args.encoder_depth - args.decoder_depth}/{args.decoder_depth}),"
                     f" patch {'x'.join(map(str, PATCH))}, {CHANNELS} channels",
            "tokens_per_step_target": args.tokens_per_step,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "timing": "interleaved, median seconds per optimizer step",
        },
        "buckets": rows,
    }


def table(result: dict) -> str:
    header = ["bucket (T x H x W)", "tokens/sample", "batch", "dense tok/s", "SPRINT tok/s", "measured dense/SPRINT",
              "FLOP dense/SPRINT"]
    rows = [["x".join(map(str, r["bucket"])), r["tokens_per_step"] // r["batch"], r["batch"],
             f"{r['dense_tokens_per_s']:.0f}", f"{r['sprint_tokens_per_s']:.0f}",
             f"{r['measured_dense_over_sprint']:.2f}x", f"{r['flop_dense_over_sprint']:.2f}x"] for r in result["buckets"]]
    return markdown_table(header, rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--buckets", nargs="+", default=list(DEFAULT_BUCKETS), help="frames:height:width in latent units")
    p.add_argument("--tokens-per-step", type=int, default=4096)
    return add_model_and_timing_options(p, RESULTS / "bucket_speed.json")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parser().parse_args(argv)
    for name in ("tokens_per_step", "hidden", "heads", "depth", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    result = run(args)
    print(table(result))
    print(f"wrote {write_result(result, args.out)}")
    return result


if __name__ == "__main__":
    main()
