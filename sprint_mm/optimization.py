"""How the weights train: AdamW with a linear warm-up, gradient-norm clipping, and the fp32 EMA that training keeps."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Iterable

import torch

from sprint_mm.sharded import local
from sprint_mm.errors import check_number


@dataclass(frozen=True)
class Optimization:
    """AdamW(lr, betas, adam_eps, weight_decay), a linear warm-up from `warmup_start_factor` x lr over `warmup_steps`,
    clipping at `grad_clip` (0: measure the norm, never clip), and the EMA decay (`ema_warmup`: see `ema_decay_at`).
    The names are those of the `Trainer` options that set them."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    warmup_start_factor: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = False

    def __post_init__(self) -> None:
        for name in ("lr", "adam_eps", "weight_decay", "grad_clip"):
            check_number(f"Trainer.{name}", getattr(self, name), low=0)
        check_number("Trainer.warmup_steps", self.warmup_steps, low=0, integer=True)
        check_number("Trainer.ema_decay", self.ema_decay, 0, 1, below_high=True)
        check_number("Trainer.warmup_start_factor", self.warmup_start_factor, 0, 1)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise ValueError(f"Trainer.betas must be a pair (beta1, beta2), got {self.betas!r}")
        for beta in self.betas:
            check_number("Trainer.betas", beta, 0, 1, below_high=True)

    def build(self, parameters: Iterable[torch.nn.Parameter], fused: bool
              ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """AdamW over the parameters that require gradients, and its warm-up schedule. `fused` picks the fused kernel
        (it also runs on the CPU, where it is faster than the per-parameter loop)."""
        trained = [p for p in parameters if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=self.lr, betas=tuple(self.betas), eps=self.adam_eps,
                                      weight_decay=self.weight_decay, fused=fused or None)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, self.warmup_factor)

    def warmup_factor(self, step: int) -> float:
        if self.warmup_steps <= 0 or step >= self.warmup_steps:
            return 1.0
        return self.warmup_start_factor + (1.0 - self.warmup_start_factor) * step / self.warmup_steps

    @property
    def clip_norm(self) -> float:
        """The bound clip_grad_norm_ gets: an infinite one measures without clipping."""
        return self.grad_clip if self.grad_clip > 0 else math.inf

    def ema_decay_at(self, step: int) -> float:
        return ema_decay_at(step, self.ema_decay, self.ema_warmup)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The EMA decay of update number `step` (0-based). With warm-up it is min(decay, (1 + step) / (10 + step)), so a
    short run's EMA follows the model early instead of holding its random initial weights."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy that never trains: the EMA, in fp32. The model's frozen parameters (the mask token; a LoRA run's
    frozen base) are shared with it, not copied: their average is themselves, so the EMA costs memory only for what
    trains (FSDP then shards the EMA's own view of them)."""
    frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
    ema = copy.deepcopy(model, memo=dict(frozen))
    for module in ema.modules():
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None and id(tensor) not in frozen and tensor.is_floating_point():
                tensor.data = tensor.data.float()
    return ema.eval().requires_grad_(False)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for the parameters that train (a frozen one is its own average);
    buffers are copied. Sharded (FSDP) parameters update shard by shard: the EMA is sharded like the model, so each
    process's local shards line up."""
    for e, p in zip(ema.parameters(), model.parameters()):
        if p.requires_grad:
            local(e).lerp_(local(p).detach().float(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)
