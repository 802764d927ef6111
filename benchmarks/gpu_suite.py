"""The GPU suite: two tables for one GPU in about 10 minutes (estimated; `bash benchmarks/gpu_suite.sh` runs this file).

SiT-XL/2 at 256 px (32x32 latents, 256 tokens), bf16 autocast, batch 32: the training step (forward + backward +
AdamW) dense vs SPRINT (2/24/2, 0.75 structured drop), eager and with compiled blocks, all four interleaved; then one
guided sampling step, CFG vs PDG (scale 1.5, eager), interleaved. Each row: median seconds, peak allocated memory,
the matmul FLOPs of the step (`sprint_mm.flops`; a training step counts 3 forward passes) and the TFLOP/s they make,
as a fraction of `--peak-tflops` (989: H100/H200 bf16 dense).

    bash benchmarks/gpu_suite.sh [--peak-tflops 989] [--repeats 5] [--warmup 2] [--out FILE]
    bash benchmarks/gpu_suite.sh --tiny        # a tiny model on the CPU in fp32, seconds: checks the suite itself

The four training variants are four SiT-XL/2 copies with AdamW (about 11 GB each in fp32) plus one step's
activations: plan for 60-70 GB of GPU memory. Writes benchmarks/results/gpu_suite.json (gpu_suite_tiny.json with
--tiny).

A second table: the diffusers families at their real shapes (`--families`, default Wan 2.1 T2V-1.3B at 81 frames of
480p and SD3-medium at 1024 px; the configs are data, benchmarks/family_configs.json), random weights built from the
config on the GPU (nothing downloaded), the training step as the recipes train: FSDP2 (one process), bf16 compute
with fp32 reduction, activation checkpointing; dense vs SPRINT (2 / depth-4 / 2, 0.75 structured drop). A
1.3-2B model with AdamW does not fit twice beside its activations, so the two variants run one after the other
(dense first), each alone on the GPU, not interleaved. `--tiny` runs the tiny configs of the same families.
"""
from __future__ import annotations

import argparse
import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from benchmarks.guidance_speed import KINDS, guidance_step
from benchmarks.harness import (
    RESULTS, add_out_option, add_timing_options, apply_threads, markdown_table, median_seconds, peak_cuda_bytes,
    synchronizer, time_interleaved, write_result,
)
from benchmarks.train_speed import DROP_RATIO, TrainingStep, build_pair, compiled_copy
from registry import BACKBONES
from sprint_mm.flops import forward_flops, guidance_flops
from sprint_mm.masking import TokenMasker
from sprint_mm.optimization import frozen_copy
from sprint_mm.parallelize import ensure_process_group, precision_policy, shard
from sprint_mm.sprint import Sprint

# (latent side, batch, hidden, depth, heads, encoder, decoder)
SIT_XL2_256 = (32, 32, 1152, 28, 16, 2, 2)
TINY = (8, 2, 32, 4, 2, 1, 1)
PRECISIONS = {"bf16": torch.bfloat16, "fp32": None}
FAMILY_CONFIGS = Path(__file__).resolve().parent / "family_configs.json"
DEFAULT_FAMILIES = ("wan2.1-t2v-1.3b", "sd3-medium")


def autocast(step: Callable[[], object], device: torch.device, dtype: Optional[torch.dtype]) -> Callable[[], None]:
    """`step` run under autocast to `dtype` (None: as it is)."""

    def run() -> None:
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext():
            step()

    return run


def measure(spec: tuple[int, ...], device: torch.device, dtype: Optional[torch.dtype], compile_backend: str,
            repeats: int, warmup: int, peak_tflops: float) -> list[dict]:
    """The suite's rows: training steps (dense / SPRINT, eager / compiled), then CFG / PDG sampling steps."""
    latent, batch, hidden, depth, heads, encoder, decoder = spec
    dense, sprint = build_pair(latent, hidden, depth, heads, encoder, decoder)
    dense, sprint = dense.to(device), sprint.to(device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch, 4, latent, latent), generator=generator).to(device)
    labels = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    grid = sprint.backbone.token_grid(tuple(x.shape))
    tokens = math.prod(grid)
    kept = TokenMasker("structured", DROP_RATIO)(1, grid, generator=torch.Generator()).num_kept
    flops = {
        "dense": 3 * batch * forward_flops(dense.flop_shape(), tokens),
        "sprint": 3 * batch * forward_flops(sprint.flop_shape(), tokens, kept),
        **{kind: batch * guidance_flops(sprint.flop_shape(), tokens, kind) for kind in KINDS},
    }
    training = {"dense": TrainingStep(dense, x, labels), "sprint": TrainingStep(sprint, x, labels)}
    training.update({f"{name} compiled": TrainingStep(compiled_copy(step.model, compile_backend), x, labels)
                     for name, step in list(training.items())})
    rows = time_rows({name: autocast(step, device, dtype) for name, step in training.items()}, "training step",
                     flops, repeats, warmup, device, peak_tflops)
    del training  # the optimizers' state and the compiled copies
    sprint.eval()
    sampling = {kind: autocast(guidance_step(sprint, x, labels, kind), device, dtype) for kind in KINDS}
    return rows + time_rows(sampling, "sampling step", flops, repeats, warmup, device, peak_tflops)


def time_rows(steps: dict[str, Callable[[], None]], kind: str, flops: dict[str, float], repeats: int, warmup: int,
              device: torch.device, peak_tflops: float) -> list[dict]:
    """Interleaved medians of `steps`, each with its peak memory and achieved TFLOP/s (FLOPs keyed by the variant's
    first word)."""
    medians = median_seconds(time_interleaved(steps, repeats, warmup, synchronizer(device)))
    rows = []
    for name, step in steps.items():
        step_flops = flops[name.split()[0]]
        achieved = step_flops / medians[name] / 1e12
        rows.append({"step": kind, "variant": name, "seconds": medians[name],
                     "peak_bytes": peak_cuda_bytes(step, device), "tflop": step_flops / 1e12,
                     "tflops": achieved, "peak_fraction": achieved / peak_tflops})
    return rows


# ----------------------------------------------------------------------------------------------
# The diffusers families at their real shapes
# ----------------------------------------------------------------------------------------------


def family_settings(name: str, tiny: bool) -> dict:
    """The config, sample and batch of a model of family_configs.json (its tiny variant with `tiny`)."""
    table = json.loads(FAMILY_CONFIGS.read_text())
    if name not in table:
        raise SystemExit(f"error: unknown --families entry {name!r}; known: {', '.join(table)}")
    entry = table[name]
    return {"family": entry["family"], **(entry["tiny"] if tiny else
                                          {key: entry[key] for key in ("config", "sample", "batch")})}


def family_inputs(backbone: torch.nn.Module, batch: int, device: torch.device) -> tuple[torch.Tensor, dict]:
    """Random latents and a random caption condition of the backbone's declared shapes."""
    generator = torch.Generator().manual_seed(0)
    spec = backbone.condition
    x = torch.randn((batch, *backbone.sample_shape), generator=generator)
    cond = {"text_tokens": torch.randn(batch, spec.text_length, spec.text_dim, generator=generator),
            "text_mask": torch.ones(batch, spec.text_length, dtype=torch.bool)}
    if spec.pooled_dim:
        cond["pooled"] = torch.randn(batch, spec.pooled_dim, generator=generator)
    return x.to(device), {key: value.to(device) for key, value in cond.items()}


def family_rows(name: str, device: torch.device, precision: str, repeats: int, warmup: int, peak_tflops: float,
                tiny: bool) -> list[dict]:
    """Dense and SPRINT training steps of one family model, each built alone (random weights on the device), sharded
    with FSDP2, activation checkpointing on; timed one after the other."""
    settings = family_settings(name, tiny)
    ensure_process_group(device)
    rows = []
    for variant in ("dense", "sprint"):
        torch.manual_seed(0)
        with torch.device(device):
            model = BACKBONES.build(settings["family"], config=settings["config"], **settings["sample"])
        model.gradient_checkpointing = True
        model = Sprint(model, 2 if not tiny else 1, 2 if not tiny else 1) if variant == "sprint" else model
        ema = frozen_copy(model)  # as the trainer does: copied before sharding, then sharded like the model
        shard(model, device, precision_policy("bf16" if precision == "bf16" else "no"), False)
        shard(ema, device, precision_policy("no"), False)
        x, cond = family_inputs(model.backbone, settings["batch"], device)
        step = TrainingStep(model, x, cond, ema)
        grid = model.backbone.token_grid(tuple(x.shape))
        tokens = math.prod(grid)
        kept = TokenMasker("structured", DROP_RATIO)(1, grid, generator=torch.Generator()).num_kept
        flops = {variant: 3 * settings["batch"] * forward_flops(model.flop_shape(), tokens,
                                                                kept if variant == "sprint" else None)}
        row = time_rows({variant: step}, "training step", flops, repeats, warmup, device, peak_tflops)[0]
        rows.append({"model": name, "tokens": tokens, "batch": settings["batch"],
                     "parameters": sum(p.numel() for p in model.parameters()), **row})
        del model, ema, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_family_table(rows: list[dict]) -> None:
    if not rows:
        return
    print("\nthe diffusers families at their shapes: FSDP2 (one process), activation checkpointing, dense and SPRINT "
          "measured one after the other")
    print(markdown_table(["model", "tokens x batch", "variant", "s/step", "peak MiB", "GFLOP/step", "TFLOP/s"],
                         [[r["model"], f"{r['tokens']} x {r['batch']}", r["variant"], r["seconds"],
                           "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}",
                           f"{1e3 * r['tflop']:.4g}", f"{r['tflops']:.4g}"] for r in rows]))


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="SiT-XL/2 on one GPU: dense vs SPRINT training, CFG vs PDG sampling.")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny model on the CPU in fp32 with the aot_eager compiler backend: checks the suite")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the device's peak dense TFLOP/s at the precision used (989: H100/H200 bf16)")
    parser.add_argument("--families", nargs="*", default=list(DEFAULT_FAMILIES),
                        help="models of benchmarks/family_configs.json to time at their real shapes (none: skip)")
    add_timing_options(parser, repeats=5, warmup=2, device=False)  # the warm-up steps pay the compilation
    add_out_option(parser, None, "JSON result (default: benchmarks/results/gpu_suite[_tiny].json)")
    args = parser.parse_args(argv)
    if args.peak_tflops <= 0:
        parser.error(f"--peak-tflops must be positive, got {args.peak_tflops}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    apply_threads(1 if args.tiny and args.threads is None else args.threads)
    if args.tiny:
        spec, device, precision, backend = TINY, torch.device("cpu"), "fp32", "aot_eager"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("error: the GPU suite needs a CUDA device (torch sees none); --tiny runs on the CPU")
        spec, device, precision, backend = SIT_XL2_256, torch.device("cuda"), "bf16", "inductor"
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rows = measure(spec, device, PRECISIONS[precision], backend, args.repeats, args.warmup, args.peak_tflops)
    families = [row for name in args.families for row in family_rows(name, device, precision, args.repeats,
                                                                      args.warmup, args.peak_tflops, args.tiny)]
    latent, batch, hidden, depth, heads, encoder, decoder = spec
    result = {"model": {"hidden": hidden, "depth": depth, "heads": heads, "latent": latent, "patch": 2,
                        "split": [encoder, depth - encoder - decoder, decoder], "drop_ratio": DROP_RATIO},
              "batch": batch, "precision": precision, "compile_backend": backend,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "peak_tflops": args.peak_tflops, "repeats": args.repeats, "warmup": args.warmup, "rows": rows,
              "families": families}
    print(f"SiT hidden {hidden}, {depth} blocks, {(latent // 2) ** 2} tokens, batch {batch}, {precision}, "
          f"{result['device']}; medians of {args.repeats} interleaved steps after {args.warmup} warm-up")
    print(markdown_table(["step", "variant", "s/step", "peak MiB", "GFLOP/step", "TFLOP/s", "of peak"],
                         [[r["step"], r["variant"], r["seconds"],
                           "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}",
                           f"{1e3 * r['tflop']:.4g}", f"{r['tflops']:.4g}", f"{100 * r['peak_fraction']:.2g}%"]
                          for r in rows]))
    print_family_table(families)
    write_result(result, args.out or RESULTS / f"gpu_suite{'_tiny' if args.tiny else ''}.json")
    return result


if __name__ == "__main__":
    main()
