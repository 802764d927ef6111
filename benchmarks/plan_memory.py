"""What fits before renting the cluster: the per-process memory of a training step for a model shape (a row of
benchmarks/model_shapes.csv, the shapes as data: add a row for another family), a clip's frames and size, the process
count and its data x context split, FSDP or DDP, bf16, activation checkpointing, SPRINT on or off.

    python benchmarks/plan_memory.py --model wan2.1-14b --frames 81 --size 480 832 --processes 8 --context 2
    python benchmarks/plan_memory.py --fits [--card-gib 80]     # the README table: what fits on 80 GB cards
    python benchmarks/plan_memory.py --check                    # the estimate against measured CPU peaks

How it counts, per process (`estimate`):
- state: fp32 parameters, gradients, AdamW's two moments and the fp32 EMA, 20 bytes per parameter, sharded over every
  process by FSDP (data x context); whole under DDP, whose gradient buckets add a copy of the gradients (24 bytes).
  FSDP holds the unsharded compute weights of two blocks (the current and the prefetched) and the fp32 gradients of
  one while it gathers and reduces; DDP under bf16 autocast keeps a bf16 copy of every weight for the backward pass.
- activations: what autograd keeps for the backward pass of every block at the token count it runs (this process's
  share of the tokens in the encoder and decoder, its share of the kept tokens in SPRINT's middle). The bytes per token
  of sprint_mm.layers.DiTBlock are counted, not guessed: small blocks run under `saved_tensors_hooks` and the exact
  linear law in hidden size, MLP width, heads, tokens and text tokens is fitted (`block_law`). With activation
  checkpointing each block keeps its input and one block at a time is recomputed. Outside the blocks: the fusion
  and mask-token canvas of SPRINT, the final layer, and the loss on the whole sample (every process of a context
  group holds the whole latent, noise and prediction).
- the backward pass's working memory: the gradients of one block's activations.
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
    parameters = {p.untyped_storage().data_ptr() for p in block.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            block(x, torch.randn(1, d), TokenPositions(coords[None], cos, sin), context)
    return sum(kept.values())


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
    """Per-process bytes of one training step of `plan`, by part (see the module docstring)."""
    s, sharded = plan.shape, plan.strategy == "fsdp"
    compute = 2 if plan.precision == "bf16" else 4
    parameters = s.parameters(plan.sprint)
    buckets = 4 if not sharded and plan.processes > 1 else 0  # DDP's gradient buckets (one process: no DDP)
    state = parameters * (20 + buckets) / (plan.processes if sharded else 1)
    if sharded:
        gathering = (2 * compute + 4) * s.block_parameters() if plan.processes > 1 else 0.0
    else:
        gathering = 2.0 * parameters if plan.precision == "bf16" else 0.0  # autocast's bf16 weight copies
    n = plan.tokens // plan.context
    kept = plan.kept()[0] // plan.context if plan.sprint else n
    outer = plan.encoder_depth + plan.decoder_depth if plan.sprint else 0
    middle = s.depth - outer
    b = plan.batch

    def blocks(tokens: int, count: int) -> float:
        if plan.checkpointing:
            return count * b * tokens * s.hidden * compute
        return count * block_bytes(s, tokens, plan.precision, b, weights=False)

    recomputed = block_bytes(s, n, plan.precision, b) if plan.checkpointing else 0.0
    activations = blocks(n, outer) + blocks(kept, middle) + recomputed
    latent = b * plan.tokens * s.patch_dim * 4  # one whole-sample fp32 tensor (latent, noise, prediction, ...)
    outside = 10 * latent + b * n * s.hidden * compute * (6 if plan.sprint else 3)
    working = block_bytes(s, n, plan.precision, b)
    parts = {"state": state, "gathering": gathering, "activations": activations, "outside blocks": outside,
             "backward working": working}
    return {**parts, "total": sum(parts.values())}


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
    exist), measured on the CPU; `group`: the context group (FSDP over every process)."""
    from sprint_mm.flow import FlowMatching
    from sprint_mm.optimization import frozen_copy, update_ema
    from sprint_mm.parallelize import precision_policy, shard, spread_model

    torch.manual_seed(0)
    model = build_model(plan)
    ema = frozen_copy(model)
    if group is not None:
        spread_model(model, group, "context parallel")
        shard(model, torch.device("cpu"), precision_policy(plan.precision), False)
        shard(ema, torch.device("cpu"), precision_policy("no"), False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=group is None or None)
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
