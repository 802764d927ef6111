"""What fits before renting the cluster: the per-process memory of a training step for a model shape (a row of
benchmarks/model_shapes.csv, the shapes as data: add a row for another family), a clip's frames and size, the process
count and its data x context split, FSDP or DDP, bf16, activation checkpointing, SPRINT on or off.

    python benchmarks/plan_memory.py --model wan2.1-14b --frames 81 --size 480 832 --processes 8 --context 2
    python benchmarks/plan_memory.py --fits [--card-gib 80]     # the README table: what fits on 80 GB cards
    python benchmarks/plan_memory.py --check                    # the estimate against measured CPU peaks

How it counts, per process (`estimate`):
- state: fp32 parameters, AdamW's two moments and the fp32 EMA (16 bytes per parameter) and fp32 gradients (4), sharded
  over every process by FSDP (data x context), whole under DDP, whose gradient buckets add a copy of the gradients.
  FSDP holds the unsharded compute weights of two blocks (the current and the prefetched) and the fp32 gradients of
  one while it gathers and reduces; DDP under bf16 autocast keeps a bf16 copy of every weight for the backward pass.
- activations: what autograd keeps for the backward pass of every block at the token count it runs (this process's
  share of the tokens in the encoder and decoder, its share of the kept tokens in SPRINT's middle). The bytes per token
  of sprint_mm.layers.DiTBlock are counted, not guessed: small blocks run under `saved_tensors_hooks` and the exact
  linear law in hidden size, MLP width, heads, tokens and text tokens is fitted (`block_law`). With activation
  checkpointing each block keeps its input and one block at a time is recomputed. Outside the blocks: the fusion
  and mask-token canvas of SPRINT, the final layer, and the loss on the whole sample (every process of a context
  group holds the whole latent, noise and prediction).
- the peak: the activations are all alive when the backward pass starts, the gradients all exist when it ends; the
  peak holds the larger of the two beside everything else (and, with checkpointing, the block being recomputed).
Text embeddings and latents are assumed precomputed (datasets/cache_text_embeddings.py, encode_videos.py): the text
encoder and the VAE are not resident. A card "fits" a plan when the estimate is at most 90 % of its memory (the rest for
the CUDA context, communication buffers and the allocator's fragmentation).
"""
from __future__ import annotations

import argparse
import csv
import functools
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from benchmarks.harness import RESULTS, markdown_table, write_result
from benchmarks.train_speed import saved_activation_bytes
from sprint_mm.layers import DiTBlock, RotaryEmbedding, grid_coordinates
from sprint_mm.masking import TokenMasker
from sprint_mm.sequence_split import choose
from sprint_mm.tokens import TokenPositions

SHAPES = Path(__file__).resolve().parent / "model_shapes.csv"
GIB = 2**30
USABLE = 0.9  # of a card's memory; the rest for the CUDA context, NCCL buffers and fragmentation
TIMESTEP_FEATURES = 256


# ----------------------------------------------------------------------------------------------------------------
# Model shapes: a table
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """One row of model_shapes.csv: a diffusion transformer's sizes and its latent space. `adaln` 'block': a
    Linear(D, 6D) of the conditioning in every block (DiT, sprint_mm); 'shared': one shared projection and a learned
    6D table per block (Wan)."""

    name: str
    hidden: int
    depth: int
    heads: int
    mlp_hidden: int
    mlp: str
    patch_t: int
    patch_h: int
    patch_w: int
    latent_channels: int
    vae_time: int
    vae_space: int
    text_length: int
    text_dim: int
    adaln: str
    source: str = ""

    @property
    def patch(self) -> tuple[int, int, int]:
        return self.patch_t, self.patch_h, self.patch_w

    @property
    def patch_dim(self) -> int:
        return self.latent_channels * math.prod(self.patch)

    def block_parameters(self) -> int:
        d, f, head = self.hidden, self.mlp_hidden, self.hidden // self.heads
        attention = 4 * d * d + 4 * d + 2 * head  # qkv, proj, per-head q/k norms
        mlp = d * f * (2 if self.mlp == "swiglu" else 1) + f * (2 if self.mlp == "swiglu" else 1) + f * d + d
        cross = (4 * d * d + 4 * d + 2 * head + 2 * d) if self.text_length else 0  # q, kv, proj, norms, LayerNorm
        modulation = 6 * d * d + 6 * d if self.adaln == "block" else 6 * d
        return attention + mlp + cross + modulation

    def parameters(self, sprint: bool) -> int:
        """Every parameter of the model (a SPRINT wrapper adds the fusion Linear and the mask token)."""
        d = self.hidden
        embed = self.patch_dim * d + d + TIMESTEP_FEATURES * d + d + d * d + d
        condition = (self.text_dim * d + d + d * d + d) if self.text_length else 1001 * d
        final = 2 * d * d + 2 * d + d * self.patch_dim + self.patch_dim
        shared = 6 * d * d + 6 * d if self.adaln == "shared" else 0
        wrapper = 2 * d * d + d + d if sprint else 0
        return embed + condition + self.depth * self.block_parameters() + final + shared + wrapper


def load_shapes(path: Path = SHAPES) -> dict[str, ModelShape]:
    """The model shapes of a CSV table, by name; one clear error for a malformed row."""
    shapes = {}
    names = [f.name for f in fields(ModelShape)]
    with open(path, newline="") as file:
        for number, row in enumerate(csv.DictReader(file), start=2):
            if set(row) != set(names):
                raise ValueError(f"{path}:{number}: columns {sorted(row)}; a shape has {names}")
            values = {key: (value if key in ("name", "mlp", "adaln", "source") else int(value))
                      for key, value in row.items()}
            if values["mlp"] not in ("gelu", "swiglu") or values["adaln"] not in ("block", "shared"):
                raise ValueError(f"{path}:{number}: mlp must be gelu or swiglu and adaln block or shared, got "
                                 f"{values['mlp']!r}, {values['adaln']!r}")
            shapes[values["name"]] = ModelShape(**values)
    return shapes


# ----------------------------------------------------------------------------------------------------------------
# The bytes a block keeps for the backward pass
# ----------------------------------------------------------------------------------------------------------------

FEATURES = ("n*D", "n*F", "n*h", "n*D/h", "n", "L*D", "L*h", "L", "D*D", "D*F", "D", "1")


def features(d: int, f: int, h: int, n: int, length: int) -> list[float]:
    return [n * d, n * f, n * h, n * d / h, n, length * d, length * h, length, d * d, d * f, d, 1]


def saved_bytes(d: int, f: int, h: int, n: int, length: int, precision: str, mlp: str) -> int:
    """Bytes autograd keeps for the backward pass of one DiTBlock (its parameters excluded) on n tokens (cross-attention
    to `length` text tokens when length > 0), each storage counted once."""
    torch.manual_seed(0)
    width = 1.5 * f if mlp == "swiglu" else f  # SwiGLU's hidden is 2/3 of the ratio's width (mlp_hidden_size)
    block = DiTBlock(d, h, mlp_ratio=(width + 0.5) / d, mlp=mlp, cross_attention=length > 0)
    coords = grid_coordinates((1, 1, n))
    cos, sin = RotaryEmbedding(d // h, (0, 0, d // h))(coords)
    x = torch.randn(1, n, d, requires_grad=True)
    context = (torch.randn(1, length, d), torch.ones(1, length, dtype=torch.bool)) if length else None

    def forward() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return block(x, torch.randn(1, d), TokenPositions(coords[None], cos, sin), context)

    return saved_activation_bytes(forward, block.parameters())


@functools.lru_cache(maxsize=None)
def block_law(precision: str, mlp: str, text: bool) -> tuple[float, ...]:
    """Coefficients of `FEATURES` that give the saved bytes of a DiTBlock (with cross-attention to text or without),
    fitted on small blocks. Every saved tensor is linear in the features, so the law is exact: tests recount blocks
    the fit did not see."""
    generator = torch.Generator().manual_seed(0)
    rows, targets = [], []
    for _ in range(len(FEATURES) + 8):
        h = [2, 4, 8][int(torch.randint(3, (1,), generator=generator))]
        d = h * 2 * int(torch.randint(1, 9, (1,), generator=generator))
        f = 8 * int(torch.randint(1, 24, (1,), generator=generator))
        n, length = (int(v) for v in torch.randint(4, 48, (2,), generator=generator))
        length = length if text else 0
        rows.append(features(d, f, h, n, length))
        targets.append(saved_bytes(d, f, h, n, length, precision, mlp))
    solution = torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64), torch.tensor(targets, dtype=torch.float64),
                                  driver="gelsd")
    return tuple(solution.solution.tolist())


PER_BLOCK = ("D*D", "D*F", "D", "1")  # terms that do not grow with the samples: autocast's copies of the weights


def block_bytes(shape: ModelShape, tokens: int, precision: str, batch: int) -> float:
    """Saved bytes of one block of `shape` on `batch` samples of `tokens` tokens, without the copies of its weights
    (counted once for the model in `estimate`)."""
    law = block_law(precision, shape.mlp, shape.text_length > 0)
    values = features(shape.hidden, shape.mlp_hidden, shape.heads, tokens, shape.text_length)
    return batch * sum(c * v for c, v, name in zip(law, values, FEATURES) if name not in PER_BLOCK)


# ----------------------------------------------------------------------------------------------------------------
# A plan and its estimate
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """A training step to plan: clip `frames` x `height` x `width` in pixels (frames 1: images), `batch` samples per
    data group and micro-batch, `processes` in data groups of `context` processes."""

    shape: ModelShape
    frames: int
    height: int
    width: int
    batch: int = 1
    processes: int = 8
    context: int = 1
    strategy: str = "fsdp"
    precision: str = "bf16"
    checkpointing: bool = True
    sprint: bool = True
    encoder_depth: int = 2
    decoder_depth: int = 2
    drop: float = 0.75
    reduce_gradients: bool = True  # False: DDP's buckets left out (the CPU check spreads without reducing)

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid: a causal VAE turns 1 + r k frames into 1 + k latent frames; then the patch."""
        s = self.shape
        latent_frames = 1 + (self.frames - 1) // s.vae_time if s.vae_time > 1 else self.frames
        latent = (latent_frames, self.height // s.vae_space, self.width // s.vae_space)
        return tuple(size // patch for size, patch in zip(latent, s.patch))  # type: ignore[return-value]

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)

    def kept(self) -> tuple[int, Optional[str]]:
        """Kept tokens of the middle blocks, and why the processes cannot balance them (None: they can)."""
        if not self.sprint:
            return self.tokens, None
        masker = TokenMasker("structured", self.drop)
        mask = masker(1, self.grid, generator=torch.Generator())
        try:
            choose(self.grid, self.context, mask.ids_keep, masker.group_for(self.grid)[0])
        except ValueError as err:
            return mask.num_kept, str(err).split(":", 1)[0]
        return mask.num_kept, None


def estimate(plan: Plan) -> dict[str, float]:
    """Per-process bytes of one training step of `plan`, by part, and their peak (see the module docstring): the
    activations are all alive when the backward pass starts and the gradients when it ends, so the peak holds the
    larger of the two, besides what stays (weights, AdamW, EMA, copies and buffers, the tensors outside the blocks)
    and, with activation checkpointing, the block being recomputed."""
    s, sharded = plan.shape, plan.strategy == "fsdp"
    compute = 2 if plan.precision == "bf16" else 4
    parameters = s.parameters(plan.sprint)
    shards = plan.processes if sharded else 1
    if sharded:  # the unsharded compute weights of two blocks and the fp32 gradients of one
        buffers = (2 * compute + 4) * s.block_parameters() if plan.processes > 1 else 0.0
    else:  # DDP's gradient buckets (one process: no DDP); autocast's bf16 weight copies
        buckets = plan.processes > 1 and plan.reduce_gradients
        buffers = 4.0 * parameters * buckets + 2.0 * parameters * (plan.precision == "bf16")
    n = plan.tokens // plan.context
    kept = plan.kept()[0] // plan.context if plan.sprint else n
    outer = plan.encoder_depth + plan.decoder_depth if plan.sprint else 0
    b = plan.batch

    # spread over a context group, attention also keeps the values it gathered (Ulysses), which whole it reads from
    # the qkv projection's output
    gathered = s.hidden * compute if plan.context > 1 else 0

    def block(tokens: int) -> float:
        return block_bytes(s, tokens, plan.precision, b) + b * tokens * gathered

    def blocks(tokens: int, count: int) -> float:
        if plan.checkpointing:  # each block keeps its input
            return count * b * tokens * s.hidden * compute
        return count * block(tokens)

    latent = b * plan.tokens * s.patch_dim * 4  # one whole-sample fp32 tensor (latent, noise, prediction, ...)
    parts = {
        "weights, AdamW, EMA": 16.0 * parameters / shards,
        "gradients": 4.0 * parameters / shards,
        "copies and buffers": buffers,
        "activations": blocks(n, outer) + blocks(kept, s.depth - outer),
        "recomputed block": block(n) if plan.checkpointing else 0.0,
        "outside the blocks": 10 * latent + b * n * s.hidden * compute * (6 if plan.sprint else 3),
    }
    steady = sum(parts.values()) - parts["gradients"] - parts["activations"]
    return {**parts, "total": steady + max(parts["gradients"], parts["activations"])}


# ----------------------------------------------------------------------------------------------------------------
# Measured: the peak of live tensor memory of a real training step on the CPU
# ----------------------------------------------------------------------------------------------------------------

CHECK_SHAPE = ModelShape("check", hidden=128, depth=6, heads=4, mlp_hidden=512, mlp="gelu", patch_t=1, patch_h=2,
                         patch_w=2, latent_channels=4, vae_time=1, vae_space=1, text_length=16, text_dim=32,
                         adaln="block", source="a small text-to-video DiT for the CPU check")
CHECK_CLIP = dict(frames=8, height=32, width=32)  # latent units (no VAE): a 8x16x16 token grid, 2048 tokens


def build_model(plan: Plan) -> torch.nn.Module:
    """The sprint_mm model of a plan's shape (the DiT with per-block adaLN; text conditioning when it has text)."""
    from sprint_mm.models import build_backbone
    from sprint_mm.sprint import Sprint

    s = plan.shape
    text = dict(conditioning="text", text_dim=s.text_dim, text_length=s.text_length) if s.text_length else {}
    backbone = build_backbone("video_dit" if not text else "text_dit", hidden_size=s.hidden, depth=s.depth,
                              num_heads=s.heads, mlp_ratio=(s.mlp_hidden + 0.5) / s.hidden, mlp=s.mlp,
                              input_size=(plan.frames, plan.height, plan.width), patch_size=s.patch,
                              in_channels=s.latent_channels, **text)
    backbone.gradient_checkpointing = plan.checkpointing
    return Sprint(backbone, plan.encoder_depth, plan.decoder_depth) if plan.sprint else backbone


def live_bytes(*groups: object) -> int:
    """Bytes of the distinct storages of the tensors in `groups` (modules, optimizers, tensors, dicts of them); FSDP's
    DTensors count their local shard."""
    from sprint_mm.sharded import local

    storages: dict[int, int] = {}

    def add(value: object) -> None:
        if isinstance(value, torch.Tensor):
            storage = local(value).untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, torch.nn.Module):
            for tensor in [*value.parameters(), *value.buffers()]:
                add(tensor)
        elif isinstance(value, torch.optim.Optimizer):
            for state in value.state.values():
                add(state)
        elif isinstance(value, dict):
            for item in value.values():
                add(item)

    for group in groups:
        add(group)
    return sum(storages.values())


def profiled_peak(step) -> int:
    """The highest net tensor allocation during `step()`, from the profiler's memory records (each op's own
    allocations at its start, frees as they happen)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for event in events:
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def measure(plan: Plan, group: object = None) -> int:
    """Peak bytes of live tensors of one training step of `plan` on this process (the second step: AdamW's moments
    exist), measured on the CPU; `group`: the context group (FSDP over it when the plan says so; else the gradients
    stay unreduced)."""
    from sprint_mm.flow import FlowMatching
    from sprint_mm.optimization import frozen_copy, update_ema
    from sprint_mm.parallelize import precision_policy, shard, spread_model

    torch.manual_seed(0)
    model = build_model(plan)
    ema = frozen_copy(model)
    spread_model(model, group, "context parallel")
    sharded = plan.strategy == "fsdp" and group is not None
    if sharded:
        shard(model, torch.device("cpu"), precision_policy(plan.precision), False)
        shard(ema, torch.device("cpu"), precision_policy("no"), False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=not sharded or None)
    s, generator = plan.shape, torch.Generator().manual_seed(1)
    x0 = torch.randn(plan.batch, s.latent_channels, plan.frames, plan.height, plan.width, generator=generator)
    cond = {"text_tokens": torch.randn(plan.batch, s.text_length, s.text_dim, generator=generator),
            "text_mask": torch.ones(plan.batch, s.text_length, dtype=torch.bool)}
    objective = FlowMatching(label_dropout=0.0, path_drop=0.0,
                             masker=TokenMasker("structured", plan.drop) if plan.sprint else None)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=plan.precision == "bf16"):
            loss = objective.loss(model, x0, cond)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, model, 0.99)

    step()
    return live_bytes(model, ema, optimizer, x0, cond) + profiled_peak(step)


def check_plans() -> list[Plan]:
    """The CPU check: dense and SPRINT (1/4/1), fp32 and bf16, with and without activation checkpointing, on one
    process and spread over two (context parallel 2, the parameters whole on both and their gradients not reduced:
    FSDP2 over gloo holds a timing-dependent number of gather and reduce-scatter buffers on the CPU)."""
    base = Plan(CHECK_SHAPE, **CHECK_CLIP, processes=1, context=1, strategy="ddp", encoder_depth=1, decoder_depth=1)
    return [replace(base, sprint=sprint, precision=precision, checkpointing=checkpointing, processes=processes,
                    context=processes, reduce_gradients=processes == 1)
            for processes in (1, 2) for sprint in (False, True) for precision in ("no", "bf16")
            for checkpointing in (False, True)]


def measure_spread(rank: int, plans: list[Plan], address: str, results: dict) -> None:
    """One of two processes measuring `plans` spread over both (torch.multiprocessing.spawn's target)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=2)
    try:
        for index, plan in enumerate(plans):
            peak = measure(plan, dist.group.WORLD)
            if rank == 0:
                results[index] = peak
    finally:
        dist.destroy_process_group()


def run_check() -> list[dict]:
    """Estimate and measured peak of every `check_plans` plan."""
    import tempfile

    import torch.multiprocessing as mp

    plans = check_plans()
    single = [plan for plan in plans if plan.processes == 1]
    spread = [plan for plan in plans if plan.processes > 1]
    measured = {plan: measure(plan) for plan in single}
    with tempfile.TemporaryDirectory() as folder, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(measure_spread, args=(spread, f"file://{folder}/rendezvous", results), nprocs=2)
        measured.update({plan: results[index] for index, plan in enumerate(spread)})
    return [{**describe(plan), "estimate_mib": estimate(plan)["total"] / 2**20,
             "measured_mib": measured[plan] / 2**20,
             "ratio": estimate(plan)["total"] / measured[plan]} for plan in plans]


def describe(plan: Plan) -> dict:
    return {"model": plan.shape.name, "sprint": plan.sprint, "precision": plan.precision,
            "checkpointing": plan.checkpointing, "processes": plan.processes, "context": plan.context,
            "strategy": plan.strategy, "grid": "x".join(map(str, plan.grid)), "batch": plan.batch}


# ----------------------------------------------------------------------------------------------------------------
# What fits on a card
# ----------------------------------------------------------------------------------------------------------------

FIT_CLIPS = {"81 f 480p": (81, 480, 832), "81 f 720p": (81, 720, 1280)}


def fits_rows(shapes: dict[str, ModelShape], names: Sequence[str], card_gib: float, processes: int) -> list[dict]:
    """For each model, clip and context size: the per-process GiB of dense and SPRINT, with and without activation
    checkpointing (bf16, FSDP over `processes`, one sample per data group), and whether it fits."""
    rows = []
    for name in names:
        for clip, (frames, height, width) in FIT_CLIPS.items():
            for context in (1, 2, 4, 8):
                if processes % context:
                    continue
                row = {"model": name, "clip": clip, "context": context}
                for sprint in (False, True):
                    for checkpointing in (False, True):
                        plan = Plan(shapes[name], frames, height, width, processes=processes, context=context,
                                    sprint=sprint, checkpointing=checkpointing)
                        row[(sprint, checkpointing)] = cell(plan, card_gib)
                row["tokens"] = plan.tokens
                rows.append(row)
    return rows


def cell(plan: Plan, card_gib: float) -> str:
    """'12.3 yes' / '97.1 no', or why the plan cannot run (heads, tokens or kept tokens that do not split)."""
    if plan.shape.heads % plan.context:
        return f"{plan.shape.heads} heads do not split"
    try:
        choose(plan.grid, plan.context)
    except ValueError:
        return "grid does not split"
    if plan.kept()[1] is not None:
        return "kept tokens do not balance"
    total = estimate(plan)["total"] / GIB
    return f"{total:.1f} {'yes' if total <= USABLE * card_gib else 'no'}"


# ----------------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=str(SHAPES), help="the CSV table of model shapes")
    parser.add_argument("--model", default="wan2.1-14b", help="a row of the shapes table")
    parser.add_argument("--frames", type=int, default=81, help="clip frames in pixels (1: images)")
    parser.add_argument("--size", type=int, nargs=2, default=(480, 832), metavar=("H", "W"), help="pixels")
    parser.add_argument("--batch", type=int, default=1, help="samples per data group and micro-batch")
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--context", type=int, default=1, help="processes per context group")
    parser.add_argument("--strategy", choices=("fsdp", "ddp"), default="fsdp")
    parser.add_argument("--precision", choices=("bf16", "no"), default="bf16")
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                        help="keep every block's activations (default: activation checkpointing)")
    parser.add_argument("--dense", action="store_true", help="no SPRINT: every block on every token")
    parser.add_argument("--split", type=int, nargs=2, default=(2, 2), metavar=("E", "L"),
                        help="SPRINT encoder and decoder depth")
    parser.add_argument("--card-gib", type=float, default=80.0)
    parser.add_argument("--fits", action="store_true", help="the table of what fits on --card-gib cards")
    parser.add_argument("--fits-models", nargs="+", default=["wan2.1-1.3b", "wan2.1-14b"])
    parser.add_argument("--check", action="store_true", help="estimates against measured CPU peaks (small shapes)")
    parser.add_argument("--out", help="result JSON (default: benchmarks/results/plan_memory_<mode>.json)")
    return parser.parse_args(argv)


def plan_from(args: argparse.Namespace, shapes: dict[str, ModelShape]) -> Plan:
    if args.model not in shapes:
        raise ValueError(f"unknown model {args.model!r} in {args.shapes}; known: {', '.join(shapes)}")
    if args.processes % args.context:
        raise ValueError(f"--context {args.context} must divide --processes {args.processes}")
    return Plan(shapes[args.model], args.frames, *args.size, batch=args.batch, processes=args.processes,
                context=args.context, strategy=args.strategy, precision=args.precision,
                checkpointing=args.checkpointing, sprint=not args.dense, encoder_depth=args.split[0],
                decoder_depth=args.split[1])


def print_plan(plan: Plan, card_gib: float) -> dict:
    parts = estimate(plan)
    kept, unbalanced = plan.kept()
    print(f"{plan.shape.name}: {plan.shape.parameters(plan.sprint) / 1e9:.2f} B parameters; grid "
          f"{'x'.join(map(str, plan.grid))} = {plan.tokens} tokens ({plan.tokens // plan.context} per process), "
          f"{'SPRINT keeps ' + str(kept) if plan.sprint else 'dense'}; {plan.processes} processes, context "
          f"{plan.context}, {plan.strategy}, {plan.precision}, checkpointing {plan.checkpointing}")
    if unbalanced:
        print(f"warning: {unbalanced}: this plan cannot run with SPRINT")
    if plan.shape.heads % plan.context:
        print(f"warning: context {plan.context} does not divide the {plan.shape.heads} attention heads: this plan "
              "cannot run")
    print(markdown_table(["part", "GiB"], [[name, value / GIB] for name, value in parts.items()]))
    print(f"fits a {card_gib:g} GB card (at most {USABLE:.0%} of it): {parts['total'] <= USABLE * card_gib * GIB}")
    return {**describe(plan), "parts_gib": {name: value / GIB for name, value in parts.items()}}


def print_fits(rows: list[dict], card_gib: float) -> None:
    header = ["model", "clip (tokens)", "context", "dense", "dense + ckpt", "SPRINT", "SPRINT + ckpt"]
    print(f"per-process GiB, and whether it fits an {card_gib:g} GB card (bf16, FSDP over 8 processes, one clip "
          "per data group):")
    print(markdown_table(header, [[r["model"], f"{r['clip']} ({r['tokens']})", r["context"],
                                   *(r[(s, c)] for s in (False, True) for c in (False, True))] for r in rows]))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    shapes = load_shapes(Path(args.shapes))
    if args.check:
        result = {"check": run_check()}
        print(markdown_table(["model", "SPRINT", "precision", "checkpointing", "processes", "estimate MiB",
                              "measured MiB", "estimate / measured"],
                             [[r["model"], r["sprint"], r["precision"], r["checkpointing"], r["processes"],
                               r["estimate_mib"], r["measured_mib"], r["ratio"]] for r in result["check"]]))
        mode = "check"
    elif args.fits:
        rows = fits_rows(shapes, args.fits_models, args.card_gib, args.processes)
        print_fits(rows, args.card_gib)
        result = {"card_gib": args.card_gib, "fits": [{k if isinstance(k, str) else
                                                        f"{'sprint' if k[0] else 'dense'}{'+ckpt' if k[1] else ''}": v
                                                        for k, v in row.items()} for row in rows]}
        mode = "fits"
    else:
        return print_plan(plan_from(args, shapes), args.card_gib)
    write_result(result, args.out or RESULTS / f"plan_memory_{mode}.json")
    return result


if __name__ == "__main__":
    main()
