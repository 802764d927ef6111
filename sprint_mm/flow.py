"""Flow matching: interpolation paths (t = 0 data, t = 1 noise), time sampling, and the training loss."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import gin
import torch
from torch import nn

from sprint_mm.errors import check_number
from sprint_mm.masking import TokenMasker
from sprint_mm.sequence_split import choose
from sprint_mm.sprint import Sprint

PATHS = ("linear", "cosine")
TIME_SAMPLINGS = ("uniform", "logit_normal")


@dataclass(frozen=True)
class PathCoefficients:
    """x_t = alpha x0 + sigma eps and the velocity target d_alpha x0 + d_sigma eps."""

    alpha: torch.Tensor
    sigma: torch.Tensor
    d_alpha: torch.Tensor
    d_sigma: torch.Tensor


def path_coefficients(path: str, t: torch.Tensor) -> PathCoefficients:
    if path == "linear":
        return PathCoefficients(1 - t, t, -torch.ones_like(t), torch.ones_like(t))
    if path == "cosine":
        half_pi = math.pi / 2
        return PathCoefficients(
            torch.cos(half_pi * t), torch.sin(half_pi * t), -half_pi * torch.sin(half_pi * t), half_pi * torch.cos(half_pi * t)
        )
    raise ValueError(f"unknown path {path!r}; allowed: {', '.join(PATHS)}")


def broadcast_time(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) matching `like`'s rank."""
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def score_from_velocity(path: str, x: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Score -eps/sigma recovered from the predicted velocity by solving the 2x2 system of x_t and v (t > 0)."""
    k = path_coefficients(path, broadcast_time(t, x))
    eps = (k.alpha * v - k.d_alpha * x) / (k.alpha * k.d_sigma - k.sigma * k.d_alpha)
    return -eps / k.sigma


class Shift:
    """A timestep shift t -> s t / (1 + (s - 1) t) by a factor s that may depend on a sample's token count.

    Time 1 is noise; s > 1 moves time toward it, so training and sampling spend more time at the high noise levels
    where a sample's coarse layout forms (at a fixed noise level, more tokens keep more of the signal). The map fixes 0
    and 1 and is monotone, so a sampling grid stays a grid.
    """

    def factor(self, tokens: int) -> float:
        raise NotImplementedError

    def __call__(self, t: torch.Tensor, tokens: int) -> torch.Tensor:
        s = self.factor(tokens)
        return s * t / (1 + (s - 1) * t)


@gin.configurable
@dataclass(frozen=True)
class TimeShift(Shift):
    """A shift that grows with the token count (SD3's resolution-dependent shift; Open-Sora shifts by resolution and
    frames alike): s = (tokens / base_tokens) ** exponent, so s = 1 at `base_tokens`."""

    base_tokens: int = 256
    exponent: float = 0.5

    def __post_init__(self) -> None:
        check_number("TimeShift.base_tokens", self.base_tokens, low=1, integer=True)
        check_number("TimeShift.exponent", self.exponent, low=0)

    def factor(self, tokens: int) -> float:
        return (tokens / self.base_tokens) ** self.exponent


@gin.configurable
@dataclass(frozen=True)
class ConstantShift(Shift):
    """One factor at every size: the `shift` of diffusers' FlowMatchEulerDiscreteScheduler (SD3 trained and samples
    at 3.0; Wan 2.1 samples at 3.0 for 480p and 5.0 for 720p)."""

    shift: float = 3.0

    def __post_init__(self) -> None:
        check_number("ConstantShift.shift", self.shift, low=1e-3)

    def factor(self, tokens: int) -> float:
        return self.shift


@gin.configurable
@dataclass(frozen=True)
class SequenceShift(Shift):
    """diffusers' dynamic shifting (LTX-Video, Flux): s = exp(mu), mu linear in the token count through
    (base_tokens, base_shift) and (max_tokens, max_shift). The defaults are LTX-Video's scheduler's."""

    base_tokens: int = 1024
    max_tokens: int = 4096
    base_shift: float = 0.95
    max_shift: float = 2.05

    def __post_init__(self) -> None:
        check_number("SequenceShift.base_tokens", self.base_tokens, low=1, integer=True)
        check_number("SequenceShift.max_tokens", self.max_tokens, low=self.base_tokens + 1, integer=True)

    def factor(self, tokens: int) -> float:
        slope = (self.max_shift - self.base_shift) / (self.max_tokens - self.base_tokens)
        return math.exp(self.base_shift + slope * (tokens - self.base_tokens))


@gin.configurable
class FlowMatching:
    """The SPRINT objective: v-prediction MSE over all positions, with label dropout, token drop and path drop.

    `time_shift` (e.g. `@TimeShift()`, `@ConstantShift()`, `@SequenceShift()`) shifts the sampled times by the token
    count of each batch's grid; sampling reads the same shift from the run's configuration
    (`sampling.trained_sampling`).
    """

    def __init__(
        self,
        path: str = "linear",
        time_sampling: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        label_dropout: float = 0.1,
        path_drop: float = 0.1,
        masker: Optional[TokenMasker] = None,
        time_shift: Optional[Shift] = None,
    ) -> None:
        if path not in PATHS:
            raise ValueError(f"unknown path {path!r}; allowed: {', '.join(PATHS)}")
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time_sampling {time_sampling!r}; allowed: {', '.join(TIME_SAMPLINGS)}")
        for name, p in (("label_dropout", label_dropout), ("path_drop", path_drop)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        self.path = path
        self.time_sampling = time_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.label_dropout = label_dropout
        self.path_drop = path_drop
        self.masker = masker
        self.time_shift = time_shift

    @property
    def uses_middle_path(self) -> bool:
        """Whether the loss needs a SPRINT model (token drop or path drop)."""
        return self.path_drop > 0 or (self.masker is not None and self.masker.ratio > 0)

    # ---------------------------------------------------------------- the objective seam (what the trainer calls)
    def attach(self, model: nn.Module, device: torch.device) -> nn.Module:
        """What trains under this objective: the model itself. A dense backbone is refused when the loss drops tokens
        or paths."""
        if self.uses_middle_path and not isinstance(model, Sprint):
            raise ValueError(
                "the objective drops tokens or paths but the model is a dense backbone: "
                "set `build_model.sprint = True`, or `FlowMatching.path_drop = 0.0` and `FlowMatching.masker = None`"
            )
        return model

    def losses(self, trained: nn.Module, x0: torch.Tensor, cond: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The losses of one micro-batch; the trainer minimises "loss" and logs them all."""
        return {"loss": self.loss(trained, x0, cond)}

    def kept_tokens(self, grid: tuple[int, int, int]) -> int:
        """How many of a sample's tokens the middle blocks see in training (for the FLOP accounting)."""
        mask = None if self.masker is None else self.masker(1, grid, generator=torch.Generator())
        return math.prod(grid) if mask is None else mask.num_kept  # a ratio of 0 gives no mask

    def check_spread(self, grid: tuple[int, int, int], parts: int) -> None:
        """One line when a sample of token grid `grid` cannot be spread over `parts` processes (context parallelism)
        with the masks this objective draws: a structured or tube mask keeps the same count in every box of whole
        mask groups whatever its draw, so one draw decides; a random mask keeps a random count per process."""
        if self.masker is not None and self.masker.kind == "random" and self.masker.ratio > 0:
            raise ValueError(f"context parallel {parts} needs a structured or tube TokenMasker: a random mask keeps a "
                             "random count of each process's tokens, so the processes cannot stay balanced")
        mask = None if self.masker is None else self.masker(1, grid, generator=torch.Generator())
        if mask is None:
            choose(grid, parts)
        else:
            choose(grid, parts, mask.ids_keep, self.masker.group_for(grid)[0])

    def checkpoint_parts(self) -> dict[str, Any]:
        """Parts of the training state the objective keeps in files of its own: none."""
        return {}

    def sample_time(self, batch: int, device: torch.device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.time_sampling == "uniform":
            return torch.rand(batch, device=device, generator=generator)
        n = torch.randn(batch, device=device, generator=generator) * self.logit_std + self.logit_mean
        return torch.sigmoid(n)

    def interpolate(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, target velocity)."""
        k = path_coefficients(self.path, broadcast_time(t, x0))
        return k.alpha * x0 + k.sigma * eps, k.d_alpha * x0 + k.d_sigma * eps

    def loss(self, model: Callable[..., torch.Tensor], x0: torch.Tensor, cond: Any,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Mean squared velocity error of `model` (a backbone or a wrapper of one, reached as `model.backbone` for
        the token grid and the null condition) on data x0 with condition `cond`."""
        backbone = model.backbone
        b, device = x0.shape[0], x0.device
        grid = backbone.token_grid(tuple(x0.shape))
        t = self.sample_time(b, device, generator)
        if self.time_shift is not None:
            t = self.time_shift(t, math.prod(grid))
        eps = torch.randn(x0.shape, device=device, generator=generator, dtype=x0.dtype)
        x_t, target = self.interpolate(x0, eps, t)
        # Always through drop_condition, so that a learned null condition is in every graph (DDP needs no scan).
        cond = backbone.drop_condition(cond, torch.rand(b, device=device, generator=generator) < self.label_dropout)
        extra = {}
        if self.masker is not None:
            extra["mask"] = self.masker(b, grid, generator=generator, device=device)
        if self.path_drop > 0:
            extra["skip_middle"] = torch.rand(b, device=device, generator=generator) < self.path_drop
        return mean_squared_error(model(x_t, t, cond, **extra), target)


def mean_squared_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over all positions of each sample, then over the batch (fp32)."""
    return ((pred.float() - target.float()) ** 2).flatten(1).mean(1).mean()
