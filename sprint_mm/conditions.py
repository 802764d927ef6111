"""Condition modules: a model's condition of one kind (class ids or captions), as a module that checks, embeds and
drops it.

For its kind a condition module owns the `ConditionSpec` it declares (`spec`), the check of an incoming condition,
its embedding (a term added to the adaLN vector, and the context every block reads), dropout of rows to the null
condition and the null condition of a batch. `DiT` holds one as `y_embedder` (the name official DiT/SiT/SPRINT
checkpoints give the class table) and delegates its side of the seam to it.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from sprint_mm.backbone import ConditionSpec
from sprint_mm.layers import LabelEmbedder
from sprint_mm.text import POOLED, TEXT_KEYS, drop_captions
from sprint_mm.tokens import batch_size_of, device_of


class Condition(nn.Module):
    """What every condition module provides; `null` is `drop` of every row."""

    spec: ConditionSpec
    # Where earlier DiTs kept this module's tensors: key prefix in the DiT -> key prefix in this module
    LEGACY_KEYS: dict[str, str] = {}

    def check(self, cond: Any) -> Any:
        """`cond` when it is a condition of this kind and size, else one clear error."""
        raise NotImplementedError

    def embed(self, cond: Any) -> tuple[Optional[torch.Tensor], Any]:
        """(a (B, D) term of the adaLN vector or None, the context every block reads or None)."""
        raise NotImplementedError

    def drop(self, cond: Any, drop: torch.Tensor) -> Any:
        """`cond` with the rows where `drop` (B,) is True replaced by the null condition."""
        raise NotImplementedError

    def null(self, cond: Any) -> Any:
        """The null condition with the batch size (and device) of `cond`: CFG/PDG's weak branch."""
        return self.drop(cond, torch.ones(batch_size_of(cond), dtype=torch.bool, device=device_of(cond)))


class ClassCondition(LabelEmbedder, Condition):
    """Class ids (B,) in [0, num_classes): a table with the null class as its extra row `num_classes`, whose rows are
    added to the adaLN vector; no context."""

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        super().__init__(num_classes, hidden_size)
        self.spec = ConditionSpec("class", num_classes=num_classes)

    def check(self, cond: Any) -> torch.Tensor:
        if not isinstance(cond, torch.Tensor) or cond.dim() != 1:
            got = f"shape {tuple(cond.shape)}" if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise ValueError(f"a class condition is a (B,) tensor of class ids, got {got}")
        return cond

    def embed(self, cond: Any) -> tuple[torch.Tensor, None]:
        return self(self.check(cond)), None  # (B, D); the table checks the dtype and the range of the ids

    def drop(self, cond: Any, drop: torch.Tensor) -> torch.Tensor:
        labels = self.check(cond)
        return torch.where(drop.to(labels.device), torch.full_like(labels, self.num_classes), labels)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, L, Dt) tokens over the positions where mask (B, L) is True."""
    total = tokens.masked_fill(~mask[..., None], 0.0).sum(dim=1)  # (B, Dt)
    return total / mask.sum(dim=1, keepdim=True).to(tokens.dtype)


class CaptionCondition(Condition):
    """Captions as a text encoder gives them, `{"text_tokens": (B, L, Dt), "text_mask": (B, L) bool}` (True = real
    token) and, with `pooled_dim`, `"pooled": (B, pooled_dim)` (a whole-caption vector, SD3's CLIP pools): checked, and
    rows dropped to the null caption. The null caption is the text encoder's empty caption, given with `set_null_text`
    (one zero token until then), or a table learned with the model (`learned_null`). How the caption is embedded is its
    user's: `TextCondition` projects it for the DiT; a diffusers family hands it to the diffusers model's embedders."""

    def __init__(self, text_dim: int, text_length: int, pooled_dim: int = 0, learned_null: bool = False) -> None:
        super().__init__()
        self.init_captions(text_dim, text_length, pooled_dim, learned_null)

    def init_captions(self, text_dim: int, text_length: int, pooled_dim: int = 0, learned_null: bool = False) -> None:
        """Declare the spec and register the null caption (a subclass calls this after its own layers, so that its
        parameters keep their order)."""
        if text_dim < 1 or text_length < 1 or pooled_dim < 0:
            raise ValueError(f"text_dim and text_length must be >= 1 and pooled_dim >= 0, got {text_dim}, "
                             f"{text_length} and {pooled_dim}")
        self.spec = ConditionSpec("text", text_length=text_length, text_dim=text_dim, learned_null=learned_null,
                                  pooled_dim=pooled_dim)
        if learned_null:  # its values come from draw_learned_null
            self.null_tokens = nn.Parameter(torch.zeros(text_length, text_dim))
            null_mask = torch.ones(text_length, dtype=torch.bool)
        else:
            self.register_buffer("null_tokens", torch.zeros(text_length, text_dim))
            null_mask = torch.zeros(text_length, dtype=torch.bool)
            null_mask[0] = True  # never all False: attention over no key gives NaN
        self.register_buffer("null_mask", null_mask)
        if pooled_dim:
            self.register_buffer("null_pooled", torch.zeros(pooled_dim))

    @torch.no_grad()
    def draw_learned_null(self) -> None:
        """Draw the learned null caption, N(0, 1 / text_dim) per value. The model calls it after its initialisation:
        the order of random draws that makes a seed give the same initial weights as before."""
        length, dim = self.spec.text_length, self.spec.text_dim
        self.null_tokens.copy_(torch.randn(length, dim) * dim**-0.5)

    def check(self, cond: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The (tokens (B, L, Dt), mask (B, L)) of a text condition, or one clear error (also for a missing or
        mis-shaped pooled vector)."""
        length, dim = self.spec.text_length, self.spec.text_dim
        if not isinstance(cond, dict) or any(key not in cond for key in TEXT_KEYS):
            got = sorted(cond) if isinstance(cond, dict) else type(cond).__name__
            raise ValueError(f"a text-conditioned model takes a condition dict with keys {TEXT_KEYS}, got {got}")
        tokens, mask = cond["text_tokens"], cond["text_mask"]
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (length, dim):
            raise ValueError(
                f"text_tokens must have shape (B, {length}, {dim}) (text_length, text_dim), got {tuple(tokens.shape)}"
            )
        if mask.dtype != torch.bool or mask.shape != tokens.shape[:2]:
            raise ValueError(
                f"text_mask must be bool of shape {tuple(tokens.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}"
            )
        if self.spec.pooled_dim:
            pooled = cond.get(POOLED)
            if pooled is None or tuple(pooled.shape) != (tokens.shape[0], self.spec.pooled_dim):
                got = "none" if pooled is None else f"shape {tuple(pooled.shape)}"
                raise ValueError(f"this model also takes the pooled caption vector, cond['{POOLED}'] of shape "
                                 f"({tokens.shape[0]}, {self.spec.pooled_dim}); got {got}")
        return tokens, mask

    def drop(self, cond: Any, drop: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens, _ = self.check(cond)
        drop = drop.to(tokens.device)
        null = {"text_tokens": self.null_tokens[None], "text_mask": self.null_mask[None]}
        dropped = drop_captions(cond, null, drop)
        if self.spec.pooled_dim:
            pooled = cond[POOLED]
            dropped[POOLED] = torch.where(drop[:, None], self.null_pooled.to(pooled), pooled)
        return dropped

    @torch.no_grad()
    def set_null_text(self, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                      pooled: Optional[torch.Tensor] = None) -> None:
        """Use the text encoder's empty-caption embedding, (L, Dt) / (L,) (and (pooled_dim,)), or with batch 1, as the
        null caption."""
        if self.spec.learned_null:
            raise ValueError("this model learns its null caption (learned_null=True); set_null_text does not apply")
        length, dim = self.spec.text_length, self.spec.text_dim
        tokens = text_tokens[0] if text_tokens.dim() == 3 and text_tokens.shape[0] == 1 else text_tokens
        mask = text_mask[0] if text_mask.dim() == 2 and text_mask.shape[0] == 1 else text_mask
        if tuple(tokens.shape) != (length, dim):
            raise ValueError(
                f"null text tokens must have shape ({length}, {dim}) or (1, {length}, {dim}), "
                f"got {tuple(text_tokens.shape)}"
            )
        if mask.dtype != torch.bool or tuple(mask.shape) != (length,) or not mask.any():
            raise ValueError(
                f"null text mask must be bool of shape ({length},) with at least one True, "
                f"got {mask.dtype} {tuple(text_mask.shape)} with {int(mask.sum())} True"
            )
        if self.spec.pooled_dim:
            if pooled is None or pooled.numel() != self.spec.pooled_dim:
                got = "none" if pooled is None else f"shape {tuple(pooled.shape)}"
                raise ValueError(f"the null caption of this model needs its pooled vector of {self.spec.pooled_dim} "
                                 f"values; got {got}")
            self.null_pooled.copy_(pooled.reshape(-1))
        self.null_tokens.copy_(tokens)
        self.null_mask.copy_(mask)


class TextCondition(CaptionCondition):
    """Captions (see `CaptionCondition`) projected once to the hidden size as the context of every block's
    cross-attention; with `pooled_text` the mean of the real tokens is also projected into the adaLN vector."""

    LEGACY_KEYS = {"text_embedder.": "token_proj.", "pooled_embedder.": "pooled_proj.",
                   "null_text_tokens": "null_tokens", "null_text_mask": "null_mask"}

    def __init__(self, hidden_size: int, text_dim: int, text_length: int, pooled_text: bool = False,
                 learned_null: bool = False) -> None:
        Condition.__init__(self)
        if text_dim < 1 or text_length < 1:
            raise ValueError(f"text_dim and text_length must be >= 1, got {text_dim} and {text_length}")
        d = hidden_size
        self.token_proj = nn.Sequential(nn.Linear(text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.pooled_proj = nn.Linear(text_dim, d) if pooled_text else None
        self.init_captions(text_dim, text_length, learned_null=learned_null)

    def embed(self, cond: Any) -> tuple[Optional[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """(the pooled caption's adaLN term (B, D) or None, context (tokens (B, L, D), mask (B, L)))."""
        tokens, mask = self.check(cond)
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every text_mask row needs at least one True (real token); attention over none gives NaN")
        tokens = tokens.to(self.token_proj[0].weight.dtype)
        pooled = None if self.pooled_proj is None else self.pooled_proj(masked_mean(tokens, mask))
        return pooled, (self.token_proj(tokens), mask)
