"""Training step time, dense vs SPRINT, on the same SiT backbone and batch, measured in one run.

A step is forward + backward + AdamW step through `FlowMatching.loss`: the dense baseline sees every token; SPRINT
drops 75% of the tokens (structured mask) in its middle blocks. Path drop is off here so that the measured ratio is
comparable with the FLOP ratio (in real training 10% of the samples also skip the middle: a little more saving).
The two variants run interleaved (A B, B A, A B, ...) after warm-up steps, and the medians are compared, so changes in
machine load hit both. Memory: activation bytes saved for the backward pass (counted exactly on any device, the bulk
of a training step's memory) and, on CUDA, the peak allocated memory.

    python benchmarks/train_speed.py [--sizes 32:8 64:2] [--device cpu|cuda] [--repeats 5] [--warmup 1] [--compile]
                                     [--strategy ddp fsdp] [--world-size 2] [--official /tmp/official] [--profile]

`--official PATH` adds the side-by-side with the official SPRINT code (a local copy at PATH, e.g. /tmp/official;
nothing of it is in this repository, and the measurement says so and skips when PATH is absent): our trainer's step
(`FlowMatching.loss`, backward, gradient clipping, AdamW as the trainer builds it, the EMA update) against the
official train.py's (its `FlowMatching.compute_loss`, backward, clipping, its AdamW, its `update_ema`) on the same
model, SPRINT and dense, eager (and compiled with `--compile`, each side compiling its blocks its own way), with the
same structured masks (2x2 groups keeping 1: 0.75 drop), no path-dropped rows, timed interleaved. `--profile` adds
where each step's time goes: torch.profiler's self CPU time of every op, summed by what the op is. The side by side
also gives the matrix products' floor (`matmul_floor`): the least time any step of this model can take on this device.

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
from benchmarks.official_sprint import OfficialCodeMissing, load_official, official_steps
from registry import BACKBONES
from sprint_mm.backbone import compile_blocks
from sprint_mm.flops import forward_flops
from sprint_mm.flow import FlowMatching
from sprint_mm.masking import TokenMasker
from sprint_mm.optimization import Optimization, frozen_copy, update_ema
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
    """One step of `model` on a fixed batch as the trainer takes it: the loss, backward, gradient-norm clipping, AdamW
    (`Optimization.build`, fused where the trainer fuses it: always on a single process), the EMA update."""

    def __init__(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, ema: Optional[nn.Module] = None
                 ) -> None:
        """`ema`: the EMA model when `model` is sharded (a sharded module cannot be copied; the trainer copies before
        sharding and shards both); None: a copy of `model`."""
        self.model = model.train()
        self.objective = objective_for(model)
        self.optimization = Optimization()
        self.optimizer, _ = self.optimization.build(model.parameters(), fused=True)
        self.ema = frozen_copy(model) if ema is None else ema
        self.x, self.labels = x, labels

    def loss(self) -> torch.Tensor:
        return self.objective.loss(self.model, self.x, self.labels)

    def __call__(self) -> None:
        self.loss().backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optimization.clip_norm)
        self.optimizer.step()
        update_ema(self.ema, self.model, self.optimization.ema_decay)
        self.optimizer.zero_grad(set_to_none=True)


def step_forward_flops(dense: nn.Module, sprint: Sprint, x: torch.Tensor) -> dict[str, float]:
    """Matrix-product FLOPs of one forward pass over the batch `x`: dense on every token, SPRINT at the kept-token
    count of its mask."""
    grid = sprint.backbone.token_grid(tuple(x.shape))
    tokens = math.prod(grid)
    kept = TokenMasker("structured", DROP_RATIO)(1, grid, generator=torch.Generator()).num_kept
    return {"dense": x.shape[0] * forward_flops(dense.flop_shape(), tokens),
            "sprint": x.shape[0] * forward_flops(sprint.flop_shape(), tokens, kept)}


def flop_ratio(dense: nn.Module, sprint: Sprint, x: torch.Tensor) -> float:
    """Dense forward FLOPs over SPRINT forward FLOPs at the kept-token count of the SPRINT mask."""
    flops = step_forward_flops(dense, sprint, x)
    return flops["dense"] / flops["sprint"]


def matmul_rate(rows: int, inner: int, columns: int, device: torch.device, repeats: int = 10) -> float:
    """The best FLOP/s of torch.mm on a (rows, inner) x (inner, columns) product on `device` (fp32)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn((rows, inner), generator=generator).to(device)
    b = torch.randn((inner, columns), generator=generator).to(device)
    times = time_interleaved({"mm": lambda: torch.mm(a, b)}, repeats, warmup=2, synchronize=synchronizer(device))
    return 2 * rows * inner * columns / min(times["mm"])


def matmul_floor(dense: nn.Module, sprint: Sprint, x: torch.Tensor, device: torch.device) -> dict:
    """The least time a training step's matrix products can take here: its FLOPs (forward, and twice that for the
    input and weight gradients) at the best rate torch.mm reaches on the step's largest product, the MLP's first
    layer over the batch's tokens. Any step of this model, ours or the official code's, takes at least this."""
    shape = dense.flop_shape()
    tokens = math.prod(sprint.backbone.token_grid(tuple(x.shape)))
    rate = matmul_rate(x.shape[0] * tokens, shape.hidden, shape.mlp_hidden, device)
    flops = {arm: 3 * value for arm, value in step_forward_flops(dense, sprint, x).items()}
    return {"mm_shape": [x.shape[0] * tokens, shape.hidden, shape.mlp_hidden], "flops_per_second": rate,
            "step_flops": flops, "seconds": {arm: value / rate for arm, value in flops.items()}}


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


# ----------------------------------------------------------------------------------------------
# Side by side with the official code, and where the time goes
# ----------------------------------------------------------------------------------------------

# What an op is, by its name (the first category that matches, in this order); torch.profiler's self CPU time of
# every aten op of a step is summed per category.
OP_CATEGORIES = (
    ("matrix products (Linear forward and backward)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("attention kernel (SDPA forward and backward)", ("scaled_dot_product",)),
    ("GELU (forward and backward)", ("aten::gelu",)),
    ("LayerNorm (forward and backward)", ("layer_norm",)),
    ("optimizer, clipping and EMA", ("adam", "lerp", "foreach", "linalg_vector_norm", "addcdiv", "addcmul_",
                                     "aten::sqrt", "aten::mul_", "aten::add_", "aten::div_", "aten::clamp")),
    ("gather / scatter / index (the middle's token subset)", ("gather", "scatter", "index", "masked_select")),
    ("random draws and mask sorting", ("rand", "sort", "topk", "bincount", "cumsum")),
    ("reductions (bias, modulation and norm gradients, RMSNorm)", ("aten::sum", "aten::mean")),
    ("copies and layout (cat, stack, contiguous, clone)", ("aten::copy_", "aten::cat", "aten::stack", "aten::clone",
                                                           "aten::flip")),
    ("elementwise (adaLN modulation and gates, RoPE, RMSNorm, loss)", ("aten::mul", "aten::add", "aten::sub",
                                                                      "aten::neg", "aten::div", "aten::pow",
                                                                      "aten::rsqrt", "aten::silu", "aten::where",
                                                                      "aten::fill_", "aten::zero_", "aten::exp",
                                                                      "aten::sigmoid", "aten::cos", "aten::sin")),
)
OTHER = "other (dispatch, views, autograd bookkeeping)"


def op_category(name: str) -> str:
    name = name.lower()
    for category, patterns in OP_CATEGORIES:
        if any(pattern in name for pattern in patterns):
            return category
    return OTHER


def step_profile(step: Callable[[], object], steps: int) -> dict[str, float]:
    """Seconds per step of each op category (self CPU time; on the CPU the ops run one after another). One step runs
    unprofiled first: a step that follows a smaller one grows the heap, and the first writes to the new pages would
    count against whichever step is profiled first."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    seconds: dict[str, float] = {category: 0.0 for category, _ in OP_CATEGORIES}
    seconds[OTHER] = 0.0
    for event in prof.key_averages():
        seconds[op_category(event.key)] += event.self_cpu_time_total / 1e6 / steps
    return seconds


def side_by_side(args: argparse.Namespace, device: torch.device) -> dict:
    """Our trainer's step against the official code's (`benchmarks.official_sprint`), SPRINT and dense, eager and
    with `--compile` compiled, timed interleaved; with `--profile`, where each step's time goes."""
    official = load_official(args.official)
    latent, batch = args.side_by_side
    dense, sprint = build_pair(latent, args.hidden, args.depth, args.heads, args.encoder, args.decoder)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch, 4, latent, latent), generator=generator).to(device)
    labels = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    steps = {"ours_sprint": TrainingStep(sprint.to(device), x, labels),
             "ours_dense": TrainingStep(dense.to(device), x, labels),
             **official_steps(official, args, latent, x, labels, compiled=False)}
    if args.compile:
        steps.update({f"{name}_compiled": TrainingStep(compiled_copy(steps[name].model), x, labels)
                      for name in ("ours_sprint", "ours_dense")})
        steps.update(official_steps(official, args, latent, x, labels, compiled=True))
    times = time_interleaved(steps, args.repeats, args.warmup, synchronizer(device))
    medians = median_seconds(times)
    result = {"official": official.root, "triton_stand_in": official.triton_stand_in, "latent": latent,
              "tokens": (latent // 2) ** 2, "batch": batch, "seconds": medians, "times": times,
              "flop_ratio": flop_ratio(dense, sprint, x), "ratios": {},
              "matmul_floor": matmul_floor(dense, sprint, x, device)}
    for suffix in ("", "_compiled") if args.compile else ("",):
        for arm in ("sprint", "dense"):
            result["ratios"][f"ours_over_official_{arm}{suffix}"] = (medians[f"ours_{arm}{suffix}"]
                                                                     / medians[f"official_{arm}{suffix}"])
        for side in ("ours", "official"):
            result["ratios"][f"{side}_dense_over_sprint{suffix}"] = (medians[f"{side}_dense{suffix}"]
                                                                     / medians[f"{side}_sprint{suffix}"])
    if args.profile:
        result["profile"] = {name: step_profile(steps[name], args.profile)
                             for name in ("ours_sprint", "official_sprint", "ours_dense", "official_dense")}
    return result


def print_side_by_side(result: dict) -> None:
    if "skipped" in result:
        print(f"\nside by side with the official code: skipped ({result['skipped']})")
        return
    seconds, ratios = result["seconds"], result["ratios"]
    print(f"\nside by side with the official code at {result['official']} ({result['tokens']} tokens, batch "
          f"{result['batch']}; medians of interleaved steps; FLOP ratio dense / SPRINT {result['flop_ratio']:.2f}):")
    rows = []
    for suffix, mode in (("", "eager"), ("_compiled", "compiled")):
        if f"ours_sprint{suffix}" not in seconds:
            continue
        for arm in ("sprint", "dense"):
            rows.append([mode, arm, seconds[f"ours_{arm}{suffix}"], seconds[f"official_{arm}{suffix}"],
                         ratios[f"ours_over_official_{arm}{suffix}"]])
        rows.append([mode, "dense / SPRINT", ratios[f"ours_dense_over_sprint{suffix}"],
                     ratios[f"official_dense_over_sprint{suffix}"], "-"])
    print(markdown_table(["mode", "step", "ours s", "official s", "ours / official"], rows))
    floor = result["matmul_floor"]
    m, k, n = floor["mm_shape"]
    print(f"matrix products alone (at {floor['flops_per_second'] / 1e9:.1f} GFLOP/s, torch.mm's best on "
          f"{m}x{k} @ {k}x{n} here): " + ", ".join(
              f"{arm} {floor['step_flops'][arm] / 1e9:.1f} GFLOP >= {floor['seconds'][arm]:.3f} s = "
              f"{floor['seconds'][arm] / seconds[f'official_{arm}']:.3f} of the official eager step"
              for arm in ("sprint", "dense")))
    if "profile" in result:
        profile = result["profile"]
        names = list(profile)
        print("\nwhere a step's time goes (self CPU seconds per step by kind of op, torch.profiler):")
        categories = list(profile[names[0]])
        table = [[category, *(f"{profile[n][category]:.3f} ({profile[n][category] / sum(profile[n].values()):.0%})"
                              for n in names)] for category in categories]
        table.append(["total", *(f"{sum(profile[n].values()):.3f}" for n in names)])
        print(markdown_table(["op kind", *names], table))


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
    parser.add_argument("--official", help="a local copy of the official SPRINT code: adds the side-by-side steps")
    parser.add_argument("--side-by-side", type=parse_size, default=(32, 8), metavar="LATENT:BATCH",
                        help="the size of the side-by-side steps (default 32:8: 256 tokens, batch 8)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="with --official: profile STEPS steps of each side-by-side step (0: no profile)")
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
    if args.official:
        try:
            result["side_by_side"] = side_by_side(args, device)
        except OfficialCodeMissing as err:
            result["side_by_side"] = {"skipped": str(err)}
    if rows:
        print_speed_tables(result)
    if args.official:
        print_side_by_side(result["side_by_side"])
    if args.strategy:
        print_strategy_table(result["strategy_memory"])
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
