"""The seam between the SPRINT wrapper and a backbone: what a backbone provides, what it declares, what it returns.

A backbone is a plain diffusion transformer (alone, it is the dense baseline). It owns everything that depends on the
data: patches, positions, conditioning, the blocks, unpatchify. `Sprint` owns the depth split, the token drop, the
mask token, the fusion and path drop, and reaches the backbone only through this seam:

- `embed(x, t, cond) -> Embedded` and `unembed(tokens, embedded)`; `blocks`, each `block(x, c, positions, context)`;
- `token_grid(input_shape)`, `sample_shape`, `drop_condition(cond, drop)` / `null_condition(cond)`;
- `condition`: how it is conditioned (a `ConditionSpec`), declared instead of probed;
- `flop_shape()`: its dense cost shape; `Sprint` adds its split.

Every model, wrapped or not, reaches its backbone the same way: `model.backbone`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sprint_mm.flops import TransformerShape
from sprint_mm.masking import Grid
from sprint_mm.tokens import TokenPositions, batch_size_of, device_of, gather_tokens, select_rows

CONDITION_KINDS = ("class", "text")  # the one list of condition kinds: backbones declare one, runs configure one


def check_condition_kind(kind: str) -> None:
    """Raise a ValueError naming `kind` and the allowed kinds unless it is one of CONDITION_KINDS."""
    if kind not in CONDITION_KINDS:
        raise ValueError(f"unknown conditioning {kind!r}; allowed: {', '.join(CONDITION_KINDS)}")


@dataclass(frozen=True)
class ConditionSpec:
    """What `cond` is. 'class': int ids in [0, num_classes), id num_classes is the null class. 'text': a dict
    {"text_tokens": (B, text_length, text_dim), "text_mask": (B, text_length) bool}; the null caption is the text
    encoder's empty caption, given with `set_null_text`, unless the backbone learns it (`learned_null`)."""

    kind: str
    num_classes: int = 0
    text_length: int = 0
    text_dim: int = 0
    learned_null: bool = False

    def __post_init__(self) -> None:
        check_condition_kind(self.kind)


@dataclass
class Embedded:
    """A backbone's embedded input: everything the blocks and `unembed` read."""

    tokens: torch.Tensor  # (B, N, D)
    c: torch.Tensor  # (B, D) conditioning vector for adaLN
    positions: TokenPositions  # per-token grid coordinates (and RoPE), gathered with the tokens
    grid: Grid  # token grid (T, H, W); T = 1 for images
    image: bool = False  # the input was (B, C, H, W): unembed gives back an image, not a one-frame video
    context: Any = None  # per-sample data every block reads (e.g. text tokens), batch axis 0

    def with_tokens(self, tokens: torch.Tensor) -> Embedded:
        """The same conditioning and positions around other hidden states of all tokens (B, N, D)."""
        return replace(self, tokens=tokens)

    def subset(self, tokens: torch.Tensor, rows: torch.Tensor, ids_keep: Optional[torch.Tensor] = None) -> Embedded:
        """Hidden states tokens (B, N, D) restricted to the batch `rows` and, with ids_keep (len(rows), M), to the kept
        tokens, with their conditioning, context and true positions."""
        tokens, positions = tokens[rows], self.positions.rows(rows)
        if ids_keep is not None:
            tokens, positions = gather_tokens(tokens, ids_keep), positions.gather(ids_keep)
        return replace(self, tokens=tokens, c=self.c[rows], positions=positions, context=select_rows(self.context, rows))


class Backbone(nn.Module):
    """A plain diffusion transformer. Alone it is the dense baseline; `Sprint` wraps it.

    Subclasses build `self.blocks` (identical-signature blocks `block(x, c, positions, context)`), set
    `hidden_size` and `condition`, and implement `embed`, `unembed`, `token_grid`, `drop_condition`, `sample_shape`
    and `flop_shape`.
    """

    hidden_size: int
    blocks: nn.ModuleList
    condition: ConditionSpec
    gradient_checkpointing: bool = False  # set by build_model; read by the dense forward and by Sprint

    @property
    def backbone(self) -> Backbone:
        """Itself: every model (a backbone, or a wrapper around one) names its backbone `.backbone`."""
        return self

    def embed(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> Embedded:
        raise NotImplementedError

    def unembed(self, tokens: torch.Tensor, embedded: Embedded) -> torch.Tensor:
        """Tokens (B, N, D) back to the layout of the input `embedded` came from."""
        raise NotImplementedError

    def token_grid(self, input_shape: tuple[int, ...]) -> Grid:
        """Token grid (T, H, W) for an input of shape (B, C, ...)."""
        raise NotImplementedError

    def drop_condition(self, cond: Any, drop: torch.Tensor) -> Any:
        """Replace the condition of rows where `drop` (B,) is True by the null condition."""
        raise NotImplementedError

    def null_condition(self, cond: Any) -> Any:
        """The null condition with the batch size of `cond` (CFG/PDG's weak branch)."""
        return self.drop_condition(cond, torch.ones(batch_size_of(cond), dtype=torch.bool, device=device_of(cond)))

    def set_null_text(self, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> None:
        """Text backbones: use the text encoder's empty-caption embedding as the null condition."""
        raise ValueError(f"{type(self).__name__} is conditioned on {self.condition.kind}, not on text")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample (C, ...) at the configured input size."""
        raise NotImplementedError

    def flop_shape(self) -> TransformerShape:
        """The dense cost shape: depth (0, blocks, 0), no fusion."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """Dense forward over all blocks."""
        embedded = self.embed(x, t, cond)
        return self.unembed(run_blocks(self.blocks, embedded, self.gradient_checkpointing), embedded)


def run_blocks(blocks: Sequence[nn.Module], embedded: Embedded, checkpointing: bool = False) -> torch.Tensor:
    """Apply `blocks` in order to `embedded.tokens` with its conditioning, positions and context. With
    `checkpointing`, while gradients are recorded, each block keeps only its inputs and recomputes its activations in
    the backward pass: activation memory of one block instead of all, for about one more forward pass of compute."""
    h, c, positions, context = embedded.tokens, embedded.c, embedded.positions, embedded.context
    for block in blocks:
        if checkpointing and torch.is_grad_enabled():
            h = checkpoint(block, h, c, positions, context, use_reentrant=False)
        else:
            h = block(h, c, positions, context)
    return h


def compile_blocks(model: nn.Module, backend: str = "inductor") -> None:
    """Regional compilation: `torch.compile` each block of `model.backbone.blocks` in place. Blocks share their code,
    so one compiled graph serves every block of a shape (SPRINT's kept-token count is fixed within a stage); the
    state-dict keys stay as they were, so checkpoints do not change."""
    for block in model.backbone.blocks:
        block.compile(backend=backend)
