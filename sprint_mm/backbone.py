"""The seam between the SPRINT wrapper and a backbone: what a backbone must provide."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sprint_mm.flops import TransformerShape

Grid = tuple[int, int, int]


@dataclass
class Embedded:
    """A backbone's embedded input: everything the blocks and `unembed` read."""

    tokens: torch.Tensor  # (B, N, D)
    c: torch.Tensor  # (B, D) conditioning vector for adaLN
    pos: Optional[tuple[torch.Tensor, ...]]  # per-token positional data, token axis 1, batch axis 0 of size 1 or B
    grid: Grid  # token grid (T, H, W); T = 1 for images
    context: Any = None  # per-sample data every block reads (e.g. text tokens), batch axis 0


class Backbone(nn.Module):
    """A plain diffusion transformer. Alone it is the dense baseline; `Sprint` wraps it.

    Subclasses build `self.blocks` (identical-signature blocks `block(x, c, pos, context)`) and implement
    `embed`, `unembed`, `token_grid`, `drop_condition`, `sample_shape` and `flop_shape`.
    """

    hidden_size: int
    blocks: nn.ModuleList
    gradient_checkpointing: bool = False  # set by build_model; read by the dense forward and by Sprint

    def embed(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> Embedded:
        raise NotImplementedError

    def unembed(self, tokens: torch.Tensor, c: torch.Tensor, grid: Grid) -> torch.Tensor:
        raise NotImplementedError

    def token_grid(self, input_shape: tuple[int, ...]) -> Grid:
        """Token grid (T, H, W) for an input of shape (B, C, ...)."""
        raise NotImplementedError

    def drop_condition(self, cond: Any, drop: torch.Tensor) -> Any:
        """Replace the condition of rows where `drop` (B,) is True by the null condition."""
        raise NotImplementedError

    def null_condition(self, cond: Any) -> Any:
        """The null condition with the batch size of `cond` (CFG/PDG's weak branch)."""
        batch = batch_size_of(cond)
        return self.drop_condition(cond, torch.ones(batch, dtype=torch.bool, device=device_of(cond)))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample (C, ...) at the configured input size."""
        raise NotImplementedError

    def flop_shape(self, fusion: bool = False, depths: tuple[int, int, int] | None = None) -> TransformerShape:
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: Any,
        mask: Any = None,
        skip_middle: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Dense forward over all blocks."""
        if mask is not None or skip_middle is not None:
            raise ValueError(
                f"{type(self).__name__} is a dense backbone: it takes no token mask and no skip_middle "
                "(no middle path); wrap it in sprint_mm.sprint.Sprint for token drop, path drop or PDG"
            )
        emb = self.embed(x, t, cond)
        h = run_blocks(self.blocks, emb.tokens, emb.c, emb.pos, emb.context, self.gradient_checkpointing)
        return self.unembed(h, emb.c, emb.grid)


def run_blocks(
    blocks: Sequence[nn.Module],
    h: torch.Tensor,
    c: torch.Tensor,
    pos: Optional[tuple[torch.Tensor, ...]],
    context: Any,
    checkpointing: bool = False,
) -> torch.Tensor:
    """Apply `blocks` in order. With `checkpointing`, while gradients are recorded, each block keeps only its inputs
    and recomputes its activations in the backward pass: activation memory of one block instead of all, for about
    one more forward pass of compute."""
    for block in blocks:
        if checkpointing and torch.is_grad_enabled():
            h = checkpoint(block, h, c, pos, context, use_reentrant=False)
        else:
            h = block(h, c, pos, context)
    return h


def batch_size_of(cond: Any) -> int:
    """Batch size of a condition: a tensor or a dict of tensors with batch axis 0."""
    if isinstance(cond, torch.Tensor):
        return cond.shape[0]
    if isinstance(cond, dict) and cond:
        return batch_size_of(next(iter(cond.values())))
    raise TypeError(f"a condition must be a tensor or a dict of tensors, got {type(cond).__name__}")


def device_of(cond: Any) -> torch.device:
    if isinstance(cond, torch.Tensor):
        return cond.device
    return device_of(next(iter(cond.values())))


def select_rows(obj: Any, rows: torch.Tensor) -> Any:
    """Index batch axis 0 of a tensor, a dict/tuple of them, or None; size-1 batch axes broadcast and stay."""
    if obj is None:
        return None
    if isinstance(obj, torch.Tensor):
        return obj if obj.shape[0] == 1 else obj[rows]
    if isinstance(obj, dict):
        return {k: select_rows(v, rows) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(select_rows(v, rows) for v in obj)
    raise TypeError(f"cannot select batch rows of {type(obj).__name__}")


def concat_rows(a: Any, b: Any) -> Any:
    """Concatenate two conditions (tensors or dicts of tensors) along the batch axis."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b], dim=0)
    if isinstance(a, dict):
        return {k: concat_rows(a[k], b[k]) for k in a}
    raise TypeError(f"cannot concatenate conditions of type {type(a).__name__}")
