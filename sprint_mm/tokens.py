"""Indexing tokens and batch rows: token positions as one typed object with one gather rule, and the row helpers
that select, join and size conditions (a tensor, or a dict / tuple of tensors, batch axis 0)."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Optional, Sequence

import torch

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (1 or B, N, head_dim)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B or 1, N, ...) gathered along the token axis with ids (B, M) -> (B, M, ...)."""
    x = x.expand(ids.shape[0], *x.shape[1:])
    index = ids.reshape(*ids.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, index)


@dataclass(frozen=True)
class TokenPositions:
    """Where every token sits: its (t, h, w) grid coordinates and, with RoPE, its rotation.

    Every tensor has the token axis 1 and a batch axis 0 of size 1 (shared by the batch) or B. A sparse path gathers
    the positions with the tokens (`gather`), so each kept token keeps its true position. `group`: the tokens are
    this process's share of a sequence spread over the processes of that group (context parallelism); attention
    gathers the rest (`sprint_mm.context_parallel`).
    """

    coords: torch.Tensor  # (1 or B, N, 3) int64 (t, h, w)
    cos: Optional[torch.Tensor] = None  # (1 or B, N, head_dim) RoPE, or None for absolute positions
    sin: Optional[torch.Tensor] = None
    group: Any = None  # a torch.distributed process group, or None: the tokens are the whole sequence

    @property
    def rope(self) -> Optional[Rope]:
        return None if self.cos is None else (self.cos, self.sin)

    def _map(self, fn) -> TokenPositions:
        present = {f.name: getattr(self, f.name) for f in fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **{name: fn(tensor) for name, tensor in present.items()})

    def gather(self, ids: torch.Tensor) -> TokenPositions:
        """The positions of the tokens ids (B, M)."""
        return self._map(lambda tensor: gather_tokens(tensor, ids))

    def rows(self, rows: torch.Tensor) -> TokenPositions:
        """The positions of a subset of batch rows; shared (batch 1) positions stay shared."""
        return self._map(lambda tensor: select_rows(tensor, rows))


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


def assign_rows(base: Any, rows: torch.Tensor, values: Any) -> Any:
    """`base` (a tensor, or a dict / tuple of them, batch axis 0) with its batch rows `rows` replaced by `values`
    (as many rows, the same structure); out of place, so gradients reach both."""
    if base is None:
        return None
    if isinstance(base, torch.Tensor):
        return base.index_copy(0, rows, values.to(base.dtype))
    if isinstance(base, dict):
        return {k: assign_rows(v, rows, values[k]) for k, v in base.items()}
    if isinstance(base, (tuple, list)):
        return type(base)(assign_rows(b, rows, v) for b, v in zip(base, values, strict=True))
    raise TypeError(f"cannot assign batch rows of {type(base).__name__}")


def concat_rows(a: Any, b: Any) -> Any:
    """Concatenate two conditions (tensors or dicts of tensors) along the batch axis."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b], dim=0)
    if isinstance(a, dict):
        return {k: concat_rows(a[k], b[k]) for k in a}
    raise TypeError(f"cannot concatenate conditions of type {type(a).__name__}")


def batch_size_of(cond: Any) -> int:
    """Batch size of a condition: a tensor or a dict of tensors with batch axis 0."""
    if isinstance(cond, torch.Tensor):
        return cond.shape[0]
    if isinstance(cond, dict) and cond:
        return batch_size_of(next(iter(cond.values())))
    raise TypeError(f"a condition must be a tensor or a dict of tensors, got {type(cond).__name__}")


def device_of(cond: Any) -> torch.device:
    """Device of a condition: a tensor or a dict of tensors."""
    return cond.device if isinstance(cond, torch.Tensor) else device_of(next(iter(cond.values())))


def as_patch(value: int | Sequence[int]) -> tuple[int, int, int]:
    """(pt, ph, pw) from an int p (= (1, p, p)), an (ph, pw) pair (temporal 1) or a triple."""
    patch = (1, value, value) if isinstance(value, int) else tuple(value)
    if len(patch) == 2:
        patch = (1, *patch)
    if len(patch) != 3 or any(isinstance(p, bool) or not isinstance(p, int) or p <= 0 for p in patch):
        raise ValueError(f"patch_size must be a positive int, an (H, W) pair or a (T, H, W) triple, got {value!r}")
    return patch  # type: ignore[return-value]
