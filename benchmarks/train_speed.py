"""Training step time, dense vs SPRINT, on the same SiT backbone and batch, measured in one run.

A step is forward + backward + AdamW step through `FlowMatching.loss`: the dense baseline sees every token; SPRINT
drops 75% of the tokens (structured mask) in its middle blocks. Path drop is off here so that the measured ratio is
comparable with the FLOP ratio (in real training 10% of the samples also skip the middle: a little more saving).
The two variants run interleaved (A B, B A, A B, ...) after warm-up steps, and the medians are compared, so changes in
machine load hit both. Memory: activation bytes saved for the backward pass (counted exactly on any device, the bulk
of a training step's memory) and, on CUDA, the peak allocated memory.

    python benchmarks/train_speed.py [--sizes 32:8 64:2] [--device cpu|cuda] [--repeats 5] [--warmup 1] [--compile]
                                     [--strategy ddp fsdp] [--world-size 2]

`--sizes` lists latent side:batch pairs (32 = 256 tokens at patch 2). Defaults are SiT-S/2 (hidden 384, 12 blocks,
6 heads; SPRINT 2/8/2) with 4 latent channels. `--compile` adds both models with every block compiled
(`compile_blocks`) to the interleaved timing; the warm-up steps pay the compilation. `--strategy` adds a table of the
per-process memory of parameters, gradients, AdamW state and EMA of SiT-XL/2 under DDP (replicated) and FSDP
(sharded over `--world-size` processes), counted from the model built on the meta device.
Writes benchmarks/results/train_speed.json.
"""
from __future__ import annotations

import argparse
import copy
import math
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from benchmarks.harness import (
    RESULTS, add_out_option, add_timing_options, apply_threads, markdown_table, median_seconds, peak_cuda_bytes,
    resolve_device, synchronizer, time_interleaved, write_result,
)
from registry import BACKBONES
from sprint_mm.backbone import compile_blocks
from sprint_mm.flops import forward_flops
from sprint_mm.flow import FlowMatching
from sprint_mm.masking import TokenMasker
from sprint_mm.sprint import Sprint

DROP_RATIO = 0.75


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------


def saved_activation_bytes(run_forward: Callable[[], object], parameters: Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of `run_forward()` (each storage counted once,
    parameters excluded): the activation memory of a training step."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = run_forward()
    del output  # frees the graph (and the saved tensors) without a backward pass
    return sum(kept.values())


# ----------------------------------------------------------------------------------------------
# The compared training steps
# ----------------------------------------------------------------------------------------------


def build_pair(
    latent: int, hidden: int, depth: int, heads: int, encoder: int, decoder: int, channels: int = 4,
    patch: int = 2, num_classes: int = 1000, seed: int = 0,
) -> tuple[nn.Module, Sprint]:
    """The dense SiT and the same weights wrapped in SPRINT (E / depth - E - L / L)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        dense = BACKBONES.build("sit", hidden_size=hidden, depth=depth, num_heads=heads, input_size=latent,
                                patch_size=patch, in_channels=channels, num_classes=num_classes)
        sprint = Sprint(copy.deepcopy(dense), encoder_depth=encoder, decoder_depth=decoder)
    return dense, sprint


def objective_for(model: nn.Module) -> FlowMatching:
    """Dense: every token; SPRINT: 0.75 structured drop. Path drop off (see the module docstring)."""
    masker = TokenMasker("structured", DROP_RATIO) if isinstance(model, Sprint) else None
    return FlowMatching(path_drop=0.0, masker=masker)


class TrainingStep:
    """One forward + backward + AdamW step of `model` on a fixed batch."""

    def __init__(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> None:
        self.model = model.train()
        self.objective = objective_for(model)
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        self.x, self.labels = x, labels

    def loss(self) -> torch.Tensor:
        return self.objective.loss(self.model, self.x, self.labels)

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss().backward()
        self.optimizer.step()


def flop_ratio(dense: nn.Module, sprint: Sprint, x: torch.Tensor) -> float:
    """Dense forward FLOPs over SPRINT forward FLOPs at the kept-token count of the SPRINT mask."""
    grid = sprint.backbone.token_grid(tuple(x.shape))
    tokens = math.prod(grid)
    kept = TokenMasker("structured", DROP_RATIO)(1, grid, generator=torch.Generator()).num_kept
    return forward_flops(dense.flop_shape(), tokens) / forward_flops(sprint.flop_shape(), tokens, kept)


def compiled_copy(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """A copy of `model` (same weights) with every block compiled by `backend`."""
    model = copy.deepcopy(model)
    compile_blocks(model, backend)
    return model


def measure_size(
    latent: int, batch: int, args: argparse.Namespace, device: torch.device
) -> dict:
    """One table row: medians of both steps (and of their compiled copies with --compile), the measured and FLOP
    ratios, and memory."""
    dense, sprint = build_pair(latent, args.hidden, args.depth, args.heads, args.encoder, args.decoder)
    dense, sprint = dense.to(device), sprint.to(device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch, 4, latent, latent), generator=generator).to(device)
    labels = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    steps = {"dense": TrainingStep(dense, x, labels), "sprint": TrainingStep(sprint, x, labels)}
    timed = dict(steps)
    if args.compile:
        timed.update({f"{name}_compiled": TrainingStep(compiled_copy(step.model), x, labels)
                      for name, step in steps.items()})
    times = time_interleaved(timed, args.repeats, args.warmup, synchronizer(device))
    medians = median_seconds(times)
    row = {
        "latent": latent,
        "tokens": math.prod(sprint.backbone.token_grid(tuple(x.shape))),
        "batch": batch,
        "dense_s": medians["dense"],
        "sprint_s": medians["sprint"],
        "speedup": medians["dense"] / medians["sprint"],
        "flop_ratio": flop_ratio(dense, sprint, x),
        "times": times,
    }
    if args.compile:
        for name in steps:
            row[f"{name}_compiled_s"] = medians[f"{name}_compiled"]
            row[f"{name}_compile_speedup"] = medians[name] / medians[f"{name}_compiled"]
    for name, step in steps.items():
        row[f"{name}_activation_bytes"] = saved_activation_bytes(step.loss, step.model.parameters())
        row[f"{name}_peak_cuda_bytes"] = peak_cuda_bytes(step, device)
    for name, step in steps.items():  # with activation checkpointing (build_model.gradient_checkpointing = True)
        step.model.backbone.gradient_checkpointing = True
        row[f"{name}_checkpointed_activation_bytes"] = saved_activation_bytes(step.loss, step.model.parameters())
    return row


def strategy_memory(strategies: Sequence[str], world_size: int) -> list[dict]:
    """Per-process bytes of SiT-XL/2's fp32 parameters, gradients, AdamW moments and EMA for each strategy: DDP
    replicates all of them on every process, FSDP shards each over `world_size` processes. Counted from the model
    built on the meta device (no memory, no time); activations come on top and do not depend on the strategy."""
    with torch.device("meta"):
        model = BACKBONES.build("sit", size="XL", patch_size=2, input_size=32, in_channels=4, num_classes=1000)
    parameters = sum(p.numel() for p in model.parameters())
    full = {"parameters": 4 * parameters, "gradients": 4 * parameters, "adamw": 8 * parameters, "ema": 4 * parameters}
    rows = []
    for strategy in strategies:
        shards = world_size if strategy == "fsdp" else 1
        row = {name: math.ceil(nbytes / shards) for name, nbytes in full.items()}
        rows.append({"strategy": strategy, "world_size": world_size, "parameter_count": parameters, **row,
                     "total": sum(row.values())})
    return rows


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """'32:8' -> (latent side 32, batch 8)."""
    parts = text.split(":")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"size {text!r} must be LATENT:BATCH with positive integers, e.g. 32:8")
    return int(parts[0]), int(parts[1])


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Training step time: dense SiT vs SPRINT on the same backbone.")
    parser.add_argument("--sizes", type=parse_size, nargs="*", default=[(32, 8), (64, 2)],
                        help="LATENT:BATCH pairs (none: no timing, e.g. for --strategy alone)")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--encoder", type=int, default=2, help="SPRINT dense encoder blocks")
    parser.add_argument("--decoder", type=int, default=2, help="SPRINT dense decoder blocks")
    add_timing_options(parser, repeats=5, warmup=1)
    parser.add_argument("--compile", action="store_true", help="also time both models with compiled blocks")
    parser.add_argument("--strategy", nargs="+", choices=("ddp", "fsdp"), default=[],
                        help="per-process memory of SiT-XL/2's training state under these strategies")
    parser.add_argument("--world-size", type=int, default=2, help="processes for --strategy")
    add_out_option(parser, RESULTS / "train_speed.json")
    return parser.parse_args(argv)


def mib(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def gib(value: int) -> str:
    return f"{value / 2**30:.2f}"


def print_speed_tables(result: dict) -> None:
    """The dense vs SPRINT table and, with --compile, the eager vs compiled one."""
    rows, model = result["rows"], result["model"]
    split = "/".join(map(str, model["split"]))
    print(f"SiT hidden {model['hidden']}, {model['depth']} blocks (SPRINT {split}, drop {DROP_RATIO}), "
          f"{result['device']}, {result['threads']} threads; medians of {result['repeats']} interleaved steps after "
          f"{result['warmup']} warm-up")
    header = ["tokens", "batch", "dense s/step", "SPRINT s/step", "measured speed-up", "FLOP ratio",
              "dense act. MiB", "SPRINT act. MiB", "checkpointed: dense / SPRINT act. MiB", "dense peak MiB",
              "SPRINT peak MiB"]
    print(markdown_table(header, [[r["tokens"], r["batch"], r["dense_s"], r["sprint_s"], r["speedup"], r["flop_ratio"],
                                   mib(r["dense_activation_bytes"]), mib(r["sprint_activation_bytes"]),
                                   f"{mib(r['dense_checkpointed_activation_bytes'])} / "
                                   f"{mib(r['sprint_checkpointed_activation_bytes'])}",
                                   mib(r["dense_peak_cuda_bytes"]), mib(r["sprint_peak_cuda_bytes"])] for r in rows]))
    if result["device"] != "cuda":
        print("peak memory: CUDA only (on the CPU, 'act. MiB' counts the activations kept for the backward pass)")
    if "dense_compiled_s" in rows[0]:
        print("\ncompiled blocks (torch.compile, regional), timed interleaved with the eager steps:")
        print(markdown_table(["tokens", "batch", "dense eager s", "dense compiled s", "dense speed-up",
                              "SPRINT eager s", "SPRINT compiled s", "SPRINT speed-up"],
                             [[r["tokens"], r["batch"], r["dense_s"], r["dense_compiled_s"], r["dense_compile_speedup"],
                               r["sprint_s"], r["sprint_compiled_s"], r["sprint_compile_speedup"]] for r in rows]))


def print_strategy_table(memory: list[dict]) -> None:
    """Per-process training-state memory of SiT-XL/2 under each strategy."""
    print(f"\nSiT-XL/2 training state per process ({memory[0]['parameter_count'] / 1e6:.1f} M parameters, fp32; "
          "counted on the meta device, activations not included):")
    keys = ("parameters", "gradients", "adamw", "ema", "total")
    print(markdown_table(["strategy", "processes", "parameters GiB", "gradients GiB", "AdamW GiB", "EMA GiB",
                          "total GiB"], [[m["strategy"], m["world_size"], *(gib(m[k]) for k in keys)] for m in memory]))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    apply_threads(args.threads)
    rows = [measure_size(latent, batch, args, device) for latent, batch in args.sizes]
    result = {
        "model": {"backbone": "sit", "hidden": args.hidden, "depth": args.depth, "heads": args.heads, "patch": 2,
                  "split": [args.encoder, args.depth - args.encoder - args.decoder, args.decoder],
                  "drop_ratio": DROP_RATIO},
        "device": device.type,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "rows": rows,
        "strategy_memory": strategy_memory(args.strategy, args.world_size),
    }
    if rows:
        print_speed_tables(result)
    if args.strategy:
        print_strategy_table(result["strategy_memory"])
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
