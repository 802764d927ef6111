"""Samplers (Euler and Heun ODE, Euler-Maruyama SDE; time runs 1 -> 0) and guidance (none, CFG, PDG, interval)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import gin
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from sprint_mm.context_parallel import gather_parts
from sprint_mm.errors import check_number
from sprint_mm.tokens import batch_size_of, concat_rows
from sprint_mm.flops import GUIDANCE_MODES as GUIDANCES
from sprint_mm.flow import FlowMatching, Shift, score_from_velocity

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
    """kind 'none' | 'cfg' | 'pdg'; guided only for t in `interval` (inclusive) and when scale != 1."""

    kind: str = "pdg"
    scale: float = 1.5
    interval: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.kind not in GUIDANCES:
            raise ValueError(f"unknown guidance {self.kind!r}; allowed: {', '.join(GUIDANCES)}")
        # 1 leaves the condition as it is, above 1 strengthens it, 0 is the weak branch alone
        check_number("guidance scale", self.scale, low=0)
        low, high = self.interval
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"guidance interval must satisfy 0 <= low <= high <= 1, got {tuple(self.interval)}")

    def active(self, t: float) -> bool:
        return self.kind != "none" and self.scale != 1.0 and self.interval[0] <= t <= self.interval[1]


def guided_velocity(model: Any, x: torch.Tensor, t: float, cond: Any, guidance: Guidance,
                    branches: Any = None) -> torch.Tensor:
    """One velocity estimate. When guidance is active the batch is doubled [x; x] with [cond; null];
    PDG's weak half also skips the middle blocks. An undoubled batch never takes the PDG route. `branches`: a
    process group of two that computes the two halves apart (CFG-parallel, `branch_velocity`)."""
    b = x.shape[0]
    dtype = next(model.parameters()).dtype
    xin = x.to(dtype)
    if not guidance.active(t):
        return model(xin, torch.full((b,), t, device=x.device, dtype=dtype), cond).to(x.dtype)
    if branches is not None:
        return branch_velocity(model, xin, t, cond, guidance, branches).to(x.dtype)
    extra = {}
    if guidance.kind == "pdg":
        extra["skip_middle"] = torch.arange(2 * b, device=x.device) >= b
    both = model(
        torch.cat([xin, xin]),
        torch.full((2 * b,), t, device=x.device, dtype=dtype),
        concat_rows(cond, model.backbone.null_condition(cond)),
        **extra,
    ).to(x.dtype)
    strong, weak = both[:b], both[b:]
    return weak + guidance.scale * (strong - weak)


def branch_velocity(model: Any, x: torch.Tensor, t: float, cond: Any, guidance: Guidance,
                    branches: Any) -> torch.Tensor:
    """CFG-parallel: process 0 of the pair `branches` runs the conditional half of the guided batch, process 1 the weak
    half (the null condition, and under PDG without the middle blocks); both get both halves and combine them alike."""
    if dist.get_world_size(branches) != 2:
        raise ValueError(f"CFG-parallel needs a group of 2 processes (one per branch), got "
                         f"{dist.get_world_size(branches)}")
    b = x.shape[0]
    weak_here = dist.get_rank(branches) == 1
    skip = weak_here and guidance.kind == "pdg"
    extra = {"skip_middle": torch.ones(b, dtype=torch.bool, device=x.device)} if skip else {}
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
    branches: Any = None,
) -> torch.Tensor:
    """Integrate from noise at t = 1 to data at t = 0; the state is kept in float64 between steps. `path` (the SDE
    sampler's score) and `time_shift` (which warps the time grid by the noise's token count) must be the ones the
    model trained with: `trained_sampling()`, or `TrainedRun.sampling` of a loaded run (`sprint_mm.trained`).
    `branches`: CFG-parallel over that pair of processes (`guided_velocity`); both hold the same noise and state."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; allowed: {', '.join(SOLVERS)}")
    if batch_size_of(cond) != noise.shape[0]:
        raise ValueError(f"condition batch {batch_size_of(cond)} does not match noise batch {noise.shape[0]}")
    x = noise.double()
    grid = time_grid(solver, steps)
    if time_shift is not None:
        tokens = math.prod(model.backbone.token_grid(tuple(noise.shape)))
        grid = time_shift(torch.tensor(grid, dtype=torch.float64), tokens).tolist()
    pairs = list(zip(grid[:-1], grid[1:]))
    for i, (t_cur, t_next) in enumerate(tqdm(pairs, desc=f"{solver} {guidance.kind}", disable=not progress, leave=False)):
        dt = t_next - t_cur
        v = guided_velocity(model, x, t_cur, cond, guidance, branches)
        if solver == "sde":
            x = sde_step(x, v, t_cur, dt, path, last=i == len(pairs) - 1, generator=generator)
        elif solver == "heun" and t_next > 0:
            x_euler = x + dt * v
            v_next = guided_velocity(model, x_euler, t_next, cond, guidance, branches)
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
