"""Running a model trained in original SiT's time direction in ours."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class TimeReversed(nn.Module):
    """Runs a model trained in original SiT's time direction (t = 0 noise, t = 1 data, velocity toward the data) in
    ours (t = 0 data, t = 1 noise): it evaluates the model at 1 - t and negates the velocity. REPA needs no wrapper."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any, **kwargs: Any) -> torch.Tensor:
        """Our velocity at time t: minus the wrapped model's at 1 - t."""
        return -self.model(x, 1 - t, cond, **kwargs)

    @property
    def backbone(self) -> nn.Module:
        """The wrapped model's backbone (token grid, conditions, sample shape)."""
        return self.model.backbone
