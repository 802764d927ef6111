"""The seam between the SPRINT wrapper and a backbone: what a backbone provides, what it declares, what it returns.

A backbone is a plain diffusion transformer (alone, it is the dense baseline). It owns everything that depends on the
data: patches, positions, conditioning, the blocks, unpatchify. `Sprint` owns the depth split, the token drop, the
mask token, the fusion and path drop, and reaches the backbone only through this seam:

- `embed(x, t, cond) -> Embedded` and `unembed(tokens, embedded)`; `blocks`, each `block(x, c, positions, context)`;
- `updates_context`: the blocks return `(x, context)`, a context stream that every block updates (MMDiT's text tokens,
  SD3); the seam hands each block the context the previous one returned; most backbones read a fixed context;
- `long_skips`: (source, target) block pairs; the seam keeps the source's output and hands it to the target block as
  a fifth argument, `block(x, c, positions, context, skip)` (U-ViT); most backbones declare none;
- `token_grid(input_shape)`, `sample_shape`, `drop_condition(cond, drop)` / `null_condition(cond)`;
- `condition`: how it is conditioned (a `ConditionSpec`), declared instead of probed;
- `flop_shape()`: its dense cost shape; `Sprint` adds its split;
- `shards_sequence`: whether it can run a box of its token grid, so that context parallelism spreads each sample over
  processes (`Embedded.spread` / `join`; `sprint_mm.context_parallel`).

`run_stack` runs a span of the blocks with the long skips; `sprint_mm.testing.check_backbone` holds a backbone to the
seam. Every model, wrapped or not, reaches its backbone the same way: `model.backbone`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sprint_mm.context_parallel import SequenceShard, shard_for
from sprint_mm.flops import TransformerShape
from sprint_mm.layers import Attention
from sprint_mm.masking import Grid
from sprint_mm.tokens import TokenPositions, batch_size_of, device_of, gather_tokens, select_rows

CONDITION_KINDS = ("class", "text")  # the one list of condition kinds: backbones declare one, runs configure one


def check_condition_kind(kind: str) -> None:
    """Raise a ValueError naming `kind` and the allowed kinds unless it is one of CONDITION_KINDS."""
    if kind not in CONDITION_KINDS:
        raise ValueError(f"unknown conditioning {kind!r}; allowed: {', '.join(CONDITION_KINDS)}")


LongSkip = tuple[int, int]  # (source block, target block), indices into the backbone's blocks


@dataclass(frozen=True)
class ConditionSpec:
    """What `cond` is. 'class': int ids in [0, num_classes), id num_classes is the null class. 'text': a dict
    {"text_tokens": (B, text_length, text_dim), "text_mask": (B, text_length) bool} (and "pooled" (B, pooled_dim)
    when pooled_dim > 0); the null caption is the text encoder's empty caption, given with `set_null_text`, unless the
    backbone learns it (`learned_null`)."""

    kind: str
    num_classes: int = 0
    text_length: int = 0
    text_dim: int = 0
    learned_null: bool = False
    pooled_dim: int = 0  # > 0: the text condition also holds "pooled" (B, pooled_dim), a whole-caption vector (SD3)

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
    context: Any = None  # per-sample data every block reads (e.g. text tokens), batch axis 0; never gathered by token;
    # a backbone that `updates_context` gets it back from every block (a text stream)
    skips: dict[int, torch.Tensor] = field(default_factory=dict)  # block index -> its output (B, N, D), kept for a
    # long skip; restricted to rows and kept tokens with the tokens
    shard: Optional[SequenceShard] = None  # the tokens are this process's box of the grid (context parallelism)

    def with_tokens(self, tokens: torch.Tensor, context: Any = None) -> Embedded:
        """The same conditioning, positions and kept skips around other hidden states of all tokens (B, N, D) and,
        when given, another context (a context stream's state)."""
        return replace(self, tokens=tokens, context=self.context if context is None else context)

    def subset(self, tokens: torch.Tensor, rows: torch.Tensor, ids_keep: Optional[torch.Tensor] = None) -> Embedded:
        """Hidden states tokens (B, N, D) restricted to the batch `rows` and, with ids_keep (len(rows), M), to the kept
        tokens, with their conditioning, context, true positions and kept skip states (gathered like the tokens)."""

        def restrict(states: torch.Tensor) -> torch.Tensor:
            states = states[rows]
            return states if ids_keep is None else gather_tokens(states, ids_keep)

        positions = self.positions.rows(rows)
        if ids_keep is not None:
            positions = positions.gather(ids_keep)
        return replace(self, tokens=restrict(tokens), c=self.c[rows], positions=positions,
                       context=select_rows(self.context, rows),
                       skips={index: restrict(states) for index, states in self.skips.items()})


    def spread(self, group: Any, ids_keep: Optional[torch.Tensor] = None) -> Embedded:
        """This process's share of the embedded sample when its tokens are spread over the processes of `group`
        (None: the whole sample): a box of the token grid, which keeps the same count of the kept tokens `ids_keep`
        (B, M) as every other box, with the tokens' true positions. `grid` becomes the box's grid."""
        return self if group is None else self.take(shard_for(group, self.grid, ids_keep))

    def take(self, shard: SequenceShard) -> Embedded:
        """The box `shard.part` of the token grid: its tokens with their true positions (which carry the shard's
        group for attention) and kept skip states; `grid` becomes the box's grid."""
        ids = shard.token_ids(self.tokens.device)
        positions = replace(self.positions.gather(ids.expand(self.positions.coords.shape[0], -1)), group=shard.group)
        return replace(self, tokens=self.tokens[:, ids], positions=positions, grid=shard.split.box, shard=shard,
                       skips={index: states[:, ids] for index, states in self.skips.items()})

    @property
    def num_tokens(self) -> int:
        """Tokens of the whole sample (of every process's share together)."""
        return self.tokens.shape[1] if self.shard is None else self.shard.split.num_tokens

    def join(self, output: torch.Tensor) -> torch.Tensor:
        """The whole prediction from `unembed`'s output of this share (the output itself without a shard)."""
        return output if self.shard is None else self.shard.join(output, self.image)


class Backbone(nn.Module):
    """A plain diffusion transformer. Alone it is the dense baseline; `Sprint` wraps it.

    Subclasses build `self.blocks` (blocks `block(x, c, positions, context)`; the target of a long skip also takes
    `skip`), set `hidden_size`, `condition` and, with long skips, `long_skips`, and implement `embed`, `unembed`,
    `token_grid`, `drop_condition`, `sample_shape` and `flop_shape`.
    """

    hidden_size: int
    blocks: nn.ModuleList
    condition: ConditionSpec
    long_skips: tuple[LongSkip, ...] = ()  # (source, target): block target reads the output of block source
    updates_context: bool = False  # blocks return (x, context): every block updates the context (a text stream)
    gradient_checkpointing: bool = False  # set by build_model; read by the dense forward and by Sprint
    # Whether the backbone can run a box of its token grid (context parallelism): its blocks take any subset of the
    # tokens with their positions (self-attention over the group's whole sequence, `attention_heads`), and `unembed` of a box gives
    # that box's region of the output (B, C, [T,] H, W). A backbone that cannot leaves it False.
    shards_sequence: bool = False
    context_group: Any = None  # set by `sprint_mm.parallelize.spread_model`: spread each sample over this group

    @property
    def backbone(self) -> Backbone:
        """Itself: every model (a backbone, or a wrapper around one) names its backbone `.backbone`."""
        return self

    def attention_heads(self) -> dict[str, int]:
        """The heads of every self-attention that context parallelism spreads, by module name (each process attends
        with heads / p of them): every `sprint_mm.layers.Attention`, unless a backbone attends otherwise."""
        return {name: module.num_heads for name, module in self.named_modules() if isinstance(module, Attention)}

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

    def set_null_text(self, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                      pooled: Optional[torch.Tensor] = None) -> None:
        """Text backbones: use the text encoder's empty-caption embedding (and its pooled vector, for a backbone whose
        condition has one) as the null condition."""
        raise ValueError(f"{type(self).__name__} is conditioned on {self.condition.kind}, not on text")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample (C, ...) at the configured input size."""
        raise NotImplementedError

    def flop_shape(self) -> TransformerShape:
        """The dense cost shape: depth (0, blocks, 0), no fusion."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """Dense forward over all blocks (over this process's share of the tokens under context parallelism)."""
        embedded = self.embed(x, t, cond).spread(self.context_group)
        return embedded.join(self.unembed(run_stack(self, embedded).tokens, embedded))


def skip_sources(backbone: Backbone) -> dict[int, int]:
    """target block -> source block of the backbone's long skips, or one clear error for a malformed declaration."""
    depth, sources = len(backbone.blocks), {}
    for pair in backbone.long_skips:
        valid = isinstance(pair, (tuple, list)) and len(pair) == 2 and all(
            isinstance(i, int) and not isinstance(i, bool) for i in pair)
        if not valid or not 0 <= pair[0] < pair[1] < depth:
            raise ValueError(f"{type(backbone).__name__}.long_skips has {pair!r}; a long skip is a pair (source, "
                             f"target) of block indices with 0 <= source < target < {depth} (its number of blocks)")
        if pair[1] in sources:
            raise ValueError(f"{type(backbone).__name__}.long_skips feeds block {pair[1]} twice (from blocks "
                             f"{sources[pair[1]]} and {pair[0]}); a block takes at most one long skip")
        sources[pair[1]] = pair[0]
    return sources


def run_stack(backbone: Backbone, embedded: Embedded, start: int = 0, stop: Optional[int] = None) -> Embedded:
    """Run the backbone's blocks[start:stop] on `embedded`; returns the hidden states with the outputs of the long
    skips' source blocks that ran added to `skips`. The target of a long skip gets its source's kept output as
    `skip`; a source outside the span must have run before (its state in `embedded.skips`). With the backbone's
    `gradient_checkpointing`, while gradients are recorded, each block keeps only its inputs and recomputes its
    activations in the backward pass: activation memory of one block instead of all, for one more forward pass. When
    the backbone `updates_context`, each block gets the context the previous one returned, and so does the result."""
    sources = skip_sources(backbone)
    kept = {source for source, _ in backbone.long_skips}
    h, skips, context = embedded.tokens, dict(embedded.skips), embedded.context
    stop = len(backbone.blocks) if stop is None else stop
    for index in range(start, stop):
        block, args = backbone.blocks[index], (h, embedded.c, embedded.positions, context)
        if index in sources:
            if sources[index] not in skips:
                raise ValueError(f"block {index} takes the long skip of block {sources[index]}, which has not run on "
                                 f"these tokens (blocks {start}..{stop - 1} run here, after {sorted(skips) or 'none'})")
            args += (skips[sources[index]],)
        h = call_block(block, args, backbone.gradient_checkpointing)
        if backbone.updates_context:
            h, context = h
        if index in kept:
            skips[index] = h
    return replace(embedded, tokens=h, skips=skips, context=context)


def run_blocks(blocks: Sequence[nn.Module], embedded: Embedded, checkpointing: bool = False) -> torch.Tensor:
    """Apply `blocks` (none of them the target of a long skip, of a backbone that does not update its context) in order
    to `embedded.tokens` with its conditioning, positions and context; `checkpointing` as in `run_stack`. A span of a
    backbone's own blocks runs with `run_stack`, which also carries the long skips and a context stream."""
    h = embedded.tokens
    for block in blocks:
        h = call_block(block, (h, embedded.c, embedded.positions, embedded.context), checkpointing)
    return h


def call_block(block: nn.Module, args: tuple, checkpointing: bool) -> torch.Tensor:
    """block(*args), recomputed in the backward pass instead of kept when `checkpointing` and gradients are on."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def compile_blocks(model: nn.Module, backend: str = "inductor") -> None:
    """Regional compilation: `torch.compile` each block of `model.backbone.blocks` in place. Blocks share their code,
    so one compiled graph serves every block of a shape (SPRINT's kept-token count is fixed within a stage); the
    state-dict keys stay as they were, so checkpoints do not change."""
    for block in model.backbone.blocks:
        block.compile(backend=backend)
