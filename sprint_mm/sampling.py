"""Samplers (Euler and Heun ODE, Euler-Maruyama SDE; time runs 1 -> 0), guidance (none, CFG, PDG, sparse, interval),
a token-density schedule for the middle blocks (`sprint_mm.density`), and the FLOPs of a whole sampling run."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import gin
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from sprint_mm.context_parallel import gather_parts
from sprint_mm.density import DENSE, MiddleDensity, check_fraction, fraction_kept, fraction_mask
from sprint_mm.errors import check_number
from sprint_mm.flops import GUIDANCE_MODES as GUIDANCES
from sprint_mm.flops import guidance_flops
from sprint_mm.flow import FlowMatching, Shift, score_from_velocity
from sprint_mm.masking import TokenMask
from sprint_mm.tokens import batch_size_of, concat_rows

SOLVERS = ("euler", "heun", "sde")


@dataclass(frozen=True)
class SamplingDefaults:
    """What training fixed for sampling: the interpolation path (the SDE sampler's score) and the time shift."""

    path: str = "linear"
    time_shift: Optional[Shift] = None


def trained_sampling() -> SamplingDefaults:
    """The path and time shift of the objective the parsed configuration trains with."""
    objective = FlowMatching()
    return SamplingDefaults(objective.path, objective.time_shift)


@gin.configurable
@dataclass(frozen=True)
class Guidance:
    """kind 'none' | 'cfg' | 'pdg' | 'sparse'; guided only for t in `interval` (inclusive) and when scale != 1.

    The weak branch: CFG's is the model under the null condition, PDG's the null condition with the middle blocks
    skipped, sparse guidance's the conditional model with its middle on a structured fraction `sparse_keep` of the
    tokens its strong branch's middle sees (Sparse Guidance's token-sparse weak branch; `density.fraction_mask` at
    the phase of the step): with a middle keep of 0.5 at a noisy step and `sparse_keep` 0.25, the weak middle sees
    1/8 of the tokens; with `sparse_keep` 1 the branches coincide."""

    kind: str = "pdg"
    scale: float = 1.5
    interval: tuple[float, float] = (0.0, 1.0)
    sparse_keep: float = 0.25

    def __post_init__(self) -> None:
        if self.kind not in GUIDANCES:
            raise ValueError(f"unknown guidance {self.kind!r}; allowed: {', '.join(GUIDANCES)}")
        # 1 leaves the condition as it is, above 1 strengthens it, 0 is the weak branch alone
        check_number("guidance scale", self.scale, low=0)
        low, high = self.interval
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"guidance interval must satisfy 0 <= low <= high <= 1, got {tuple(self.interval)}")
        check_fraction("sparse guidance keep", self.sparse_keep)

    def active(self, t: float) -> bool:
        return self.kind != "none" and self.scale != 1.0 and self.interval[0] <= t <= self.interval[1]

    def weak_fraction(self, strong_fraction: float) -> float:
        """The fraction of all tokens sparse guidance's weak middle sees when the strong one sees `strong_fraction`."""
        return self.sparse_keep * strong_fraction


def check_sampling(model: Any, sample_shape: tuple[int, ...], guidance: Guidance, density: MiddleDensity) -> None:
    """One clear error, before sampling starts, for a middle keep, or a sparse guidance weak branch at either
    density, that the token grid of `sample_shape` (C, [T,] H, W) cannot realise."""
    if density.keep == 1.0 and guidance.kind != "sparse":
        return
    grid = model.backbone.token_grid((1, *sample_shape))
    density.check(grid)
    if guidance.kind == "sparse":
        for fraction in {1.0, density.keep}:
            fraction_kept(guidance.weak_fraction(fraction), grid)


def guided_velocity(model: Any, x: torch.Tensor, t: float, cond: Any, guidance: Guidance,
                    density: MiddleDensity = DENSE, phase: int = 0, branches: Any = None) -> torch.Tensor:
    """One velocity estimate; the middle blocks see the tokens `density` keeps at time t (mask phase `phase`).

    When guidance is active the batch is doubled [x; x] with [cond; null]; PDG's weak half also skips the middle
    blocks. An undoubled batch never takes the PDG route. Sparse guidance runs the embedding and the encoder once
    and the middle, fusion and decoder for each branch (`Sprint.branches`). `branches`: a process group of two that
    computes the two halves apart (CFG-parallel, `branch_velocity`)."""
    b = x.shape[0]
    dtype = next(model.parameters()).dtype
    xin = x.to(dtype)

    def times(rows: int) -> torch.Tensor:
        return torch.full((rows,), t, device=x.device, dtype=dtype)

    def mask(rows: int, fraction: float) -> Optional[TokenMask]:
        if fraction == 1.0:
            return None  # no mask at all: the dense path, bit for bit
        return fraction_mask(fraction, rows, model.backbone.token_grid(tuple(x.shape)), phase, x.device)

    def masked(rows: int) -> dict:
        strong = mask(rows, density.fraction_at(t))
        return {} if strong is None else {"mask": strong}

    if not guidance.active(t):
        return model(xin, times(b), cond, **masked(b)).to(x.dtype)
    if branches is not None:
        return branch_velocity(model, xin, t, cond, guidance, branches, masked(b)).to(x.dtype)
    if guidance.kind == "sparse":
        fraction = density.fraction_at(t)
        masks = [mask(b, fraction), mask(b, guidance.weak_fraction(fraction))]
        strong, weak = (v.to(x.dtype) for v in model.branches(xin, times(b), cond, masks))
        return weak + guidance.scale * (strong - weak)
    extra = masked(2 * b)
    if guidance.kind == "pdg":
        extra["skip_middle"] = torch.arange(2 * b, device=x.device) >= b
    both = model(torch.cat([xin, xin]), times(2 * b), concat_rows(cond, model.backbone.null_condition(cond)),
                 **extra).to(x.dtype)
    strong, weak = both[:b], both[b:]
    return weak + guidance.scale * (strong - weak)


def branch_velocity(model: Any, x: torch.Tensor, t: float, cond: Any, guidance: Guidance,
                    branches: Any, masked: dict) -> torch.Tensor:
    """CFG-parallel: process 0 of the pair `branches` runs the conditional half of the guided batch, process 1 the weak
    half (the null condition, and under PDG without the middle blocks); both get both halves and combine them alike.
    `masked`: the middle's token mask of the step for one half, as `guided_velocity` gives it."""
    if dist.get_world_size(branches) != 2:
        raise ValueError(f"CFG-parallel needs a group of 2 processes (one per branch), got "
                         f"{dist.get_world_size(branches)}")
    b = x.shape[0]
    weak_here = dist.get_rank(branches) == 1
    skip = weak_here and guidance.kind == "pdg"
    extra = {**masked, "skip_middle": torch.ones(b, dtype=torch.bool, device=x.device)} if skip else masked
    mine = model(x, torch.full((b,), t, device=x.device, dtype=x.dtype),
                 model.backbone.null_condition(cond) if weak_here else cond, **extra)
    strong, weak = gather_parts(mine, branches)
    return weak + guidance.scale * (strong - weak)


def time_grid(solver: str, steps: int, sde_end: float = 0.04) -> list[float]:
    """ODE: linspace(1, 0, steps + 1). SDE: linspace(1, sde_end, steps) then 0 (last step deterministic)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if solver == "sde":
        grid = torch.linspace(1.0, sde_end, steps, dtype=torch.float64).tolist() if steps > 1 else [1.0]
        return grid + [0.0]
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()


def evaluation_times(grid: list[float], solver: str) -> list[tuple[int, float]]:
    """(step, t) of every model evaluation a solver makes on a time grid: one per step, and Heun's second at the
    step's end unless that is t = 0."""
    points = []
    for step, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        points.append((step, t_cur))
        if solver == "heun" and t_next > 0:
            points.append((step, t_next))
    return points


def sampling_grid(model: Any, sample_shape: tuple[int, ...], steps: int, solver: str,
                  time_shift: Optional[Shift] = None) -> list[float]:
    """The sampler's time grid for samples of `sample_shape` (C, [T,] H, W), warped by `time_shift`."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; allowed: {', '.join(SOLVERS)}")
    grid = time_grid(solver, steps)
    if time_shift is not None:
        tokens = math.prod(model.backbone.token_grid((1, *sample_shape)))
        grid = time_shift(torch.tensor(grid, dtype=torch.float64), tokens).tolist()
    return grid


def sampling_flops(model: Any, sample_shape: tuple[int, ...], steps: int = 50, solver: str = "euler",
                   guidance: Guidance = Guidance(kind="none"), density: MiddleDensity = DENSE,
                   time_shift: Optional[Shift] = None) -> float:
    """Matmul FLOPs of sampling one sample (`sprint_mm.flops`), summed over the model evaluations `sample` makes
    with these settings: each evaluation's guidance mode, and the tokens the middle (and sparse guidance's weak
    middle) sees at its time."""
    check_sampling(model, sample_shape, guidance, density)
    token_grid = model.backbone.token_grid((1, *sample_shape))
    tokens, shape = math.prod(token_grid), model.flop_shape()
    total = 0.0
    for _, t in evaluation_times(sampling_grid(model, sample_shape, steps, solver, time_shift), solver):
        mode = guidance.kind if guidance.active(t) else "none"
        fraction = density.fraction_at(t)
        weak = fraction_kept(guidance.weak_fraction(fraction), token_grid) if mode == "sparse" else None
        total += guidance_flops(shape, tokens, mode, fraction_kept(fraction, token_grid), weak)
    return total


@torch.no_grad()
def sample(
    model: Any,
    noise: torch.Tensor,
    cond: Any,
    steps: int = 50,
    solver: str = "euler",
    guidance: Guidance = Guidance(kind="none"),
    path: str = "linear",
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
    time_shift: Optional[Shift] = None,
    density: MiddleDensity = DENSE,
    branches: Any = None,
) -> torch.Tensor:
    """Integrate from noise at t = 1 to data at t = 0; the state is kept in float64 between steps. `path` (the SDE
    sampler's score) and `time_shift` (which warps the time grid by the noise's token count) must be the ones the
    model trained with: `trained_sampling()`, or `TrainedRun.sampling` of a loaded run (`sprint_mm.trained`).
    `density` runs the middle blocks on fewer tokens at the noisy steps (the default: all tokens at every step).
    `branches`: CFG-parallel over that pair of processes (`guided_velocity`); both hold the same noise and state."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; allowed: {', '.join(SOLVERS)}")
    if batch_size_of(cond) != noise.shape[0]:
        raise ValueError(f"condition batch {batch_size_of(cond)} does not match noise batch {noise.shape[0]}")
    grid = sampling_grid(model, tuple(noise.shape[1:]), steps, solver, time_shift)
    check_sampling(model, tuple(noise.shape[1:]), guidance, density)
    x = noise.double()
    pairs = list(zip(grid[:-1], grid[1:]))
    for i, (t_cur, t_next) in enumerate(tqdm(pairs, desc=f"{solver} {guidance.kind}", disable=not progress, leave=False)):
        dt = t_next - t_cur
        v = guided_velocity(model, x, t_cur, cond, guidance, density, phase=i, branches=branches)
        if solver == "sde":
            x = sde_step(x, v, t_cur, dt, path, last=i == len(pairs) - 1, generator=generator)
        elif solver == "heun" and t_next > 0:
            x_euler = x + dt * v
            v_next = guided_velocity(model, x_euler, t_next, cond, guidance, density, phase=i, branches=branches)
            x = x + dt * 0.5 * (v + v_next)
        else:
            x = x + dt * v
    return x.to(noise.dtype)


def sde_step(
    x: torch.Tensor, v: torch.Tensor, t: float, dt: float, path: str, last: bool, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """Euler-Maruyama with diffusion w(t) = 2t: drift v - w/2 * score; the last step returns the mean."""
    w = 2.0 * t
    t_batch = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
    drift = v - 0.5 * w * score_from_velocity(path, x, v, t_batch)
    mean = x + drift * dt
    if last:
        return mean
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return mean + (w * abs(dt)) ** 0.5 * noise
