"""One DiT family over (T, H, W) patch grids: images are one-frame videos.

adaLN-Zero blocks with q/k norm; RoPE over any of the (t, h, w) axes or absolute sin-cos positions; full or
factorised (spatial / temporal, as Latte) attention; conditioned on class ids or on text (cross-attention to the
caption tokens, which the SPRINT wrapper never drops) through a condition module (sprint_mm.conditions). The
registry's `sit`, `video_dit` and `text_dit` are this class with other defaults.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from sprint_mm.backbone import Backbone, Embedded, Grid, check_condition_kind
from sprint_mm.conditions import ClassCondition, TextCondition
from sprint_mm.errors import check_number
from sprint_mm.flops import TransformerShape
from sprint_mm.layers import (
    DiTBlock,
    FinalLayer,
    PatchEmbed,
    RotaryEmbedding,
    TimestepEmbedder,
    grid_coordinates,
    initialize_dit_weights,
    mlp_hidden_size,
    sincos_position_embedding,
    token_grid,
    unpatchify,
    wan_axis_split,
)
from sprint_mm.tokens import TokenPositions, as_patch

# size -> (hidden, depth, heads); depths follow the original SiT/DiT family (XL: 28 = SPRINT's 2/24/2)
PRESETS: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
POSITIONS = ("rope", "absolute")
ATTENTIONS = ("full", "factorised")
ROPE_SPLITS = ("wan", "spatial")  # named (t, h, w) channel splits of a head; a tuple gives them explicitly
TEXT_OPTIONS = ("text_dim", "text_length", "pooled_text", "learned_null")  # the options of a TextCondition


def resolve_preset(size: str, hidden_size: Optional[int], depth: Optional[int], num_heads: Optional[int]) -> tuple[int, int, int]:
    """A preset's (hidden, depth, heads) with explicit values taking precedence."""
    if size not in PRESETS:
        raise ValueError(f"unknown size preset {size!r}; allowed: {', '.join(PRESETS)}")
    hidden, layers, heads = PRESETS[size]
    return (hidden if hidden_size is None else hidden_size, layers if depth is None else depth,
            heads if num_heads is None else num_heads)


def as_sample_size(value: int | tuple[int, ...]) -> tuple[int, ...]:
    """(H, W) for image samples (an int n means (n, n)) or (T, H, W) for video samples."""
    size = (value, value) if isinstance(value, int) else tuple(value)
    if len(size) not in (2, 3) or any(not isinstance(s, int) or s <= 0 for s in size):
        raise ValueError(f"input_size must be a positive int, an (H, W) pair or a (T, H, W) triple, got {value!r}")
    return size


def rope_axis_split(rope_axes: str | tuple[int, ...], head_dim: int) -> tuple[int, int, int]:
    """A head's (t, h, w) RoPE channels: 'wan' (h and w 2*floor(d/6) each, t the rest), 'spatial' (h and w half
    each, t none: SiT's 2D RoPE) or an explicit triple."""
    if rope_axes == "wan":
        return wan_axis_split(head_dim)
    if rope_axes == "spatial":
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
        return 0, head_dim // 2, head_dim // 2
    if isinstance(rope_axes, str) or len(tuple(rope_axes)) != 3:
        raise ValueError(
            f"rope_axes must be one of {', '.join(map(repr, ROPE_SPLITS))} or the (t, h, w) channel counts of a head, "
            f"got {rope_axes!r}"
        )
    return tuple(rope_axes)  # type: ignore[return-value]


#################################################################################
#                                 The DiT                                       #
#################################################################################


class DiT(Backbone):
    """A diffusion transformer over (T, H, W) patch grids; inputs (B, C, T, H, W) or images (B, C, H, W).

    `input_size` (H, W) or (T, H, W) sets the sample shape and the axes of an absolute position table. `attention`
    'factorised' alternates spatial (even blocks) and temporal (odd blocks) attention; `flop_shape` counts full
    attention, an upper bound for it. `conditioning` picks the condition module `y_embedder`: 'class' a
    `ClassCondition` (`num_classes` plus a null row), 'text' a `TextCondition` (caption tokens `text_length` x
    `text_dim`, read by a cross-attention in every block; `pooled_text`, `learned_null`).
    """

    shards_sequence = True  # per-token layers and sprint_mm.layers attention; unembed unpatchifies a box

    def __init__(
        self,
        *,
        size: str = "S",
        hidden_size: Optional[int] = None,
        depth: Optional[int] = None,
        num_heads: Optional[int] = None,
        input_size: int | tuple[int, ...] = 32,
        patch_size: int | tuple[int, ...] = 2,
        in_channels: int = 4,
        conditioning: str = "class",
        num_classes: int = 1000,
        text_dim: int = 384,
        text_length: int = 64,
        pooled_text: bool = False,
        learned_null: bool = False,
        position: str = "rope",
        rope_axes: str | tuple[int, ...] = "wan",
        rope_theta: float = 10000.0,
        attention: str = "full",
        mlp: str = "gelu",
        mlp_ratio: float = 4.0,
        qk_norm: str = "rmsnorm",
        attention_backend: str = "sdpa",
        attention_kernel: str = "auto",
    ) -> None:
        super().__init__()
        hidden_size, depth, num_heads = resolve_preset(size, hidden_size, depth, num_heads)
        for name, value in (("hidden_size", hidden_size), ("depth", depth), ("num_heads", num_heads)):
            check_number(name, value, low=1, integer=True)
        for name, value, allowed in (("position", position, POSITIONS), ("attention", attention, ATTENTIONS)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by {num_heads} heads")
        head_dim = hidden_size // num_heads
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.input_size = as_sample_size(input_size)
        self.patch = as_patch(patch_size)
        self.in_channels = in_channels
        self.mlp_kind, self.mlp_ratio = mlp, mlp_ratio
        self.token_grid((1, in_channels, *self.input_size))  # validates divisibility early

        self.x_embedder = PatchEmbed(self.patch, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.rope = RotaryEmbedding(head_dim, rope_axis_split(rope_axes, head_dim), rope_theta) if position == "rope" else None
        check_condition_kind(conditioning)
        self.y_embedder = (ClassCondition(num_classes, hidden_size) if conditioning == "class"
                           else TextCondition(hidden_size, text_dim, text_length, pooled_text, learned_null))
        self.condition = self.y_embedder.spec
        spans = ("spatial", "temporal") if attention == "factorised" else ("full",)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, mlp=mlp, qk_norm=qk_norm,
                     attention_backend=attention_backend, attention_kernel=attention_kernel, span=spans[i % len(spans)],
                     cross_attention=conditioning == "text")
            for i in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, in_channels * math.prod(self.patch))
        initialize_dit_weights(self)
        if self.condition.learned_null:  # drawn last, as before: a seed gives the initial weights it always gave
            self.y_embedder.draw_learned_null()
        self.register_load_state_dict_pre_hook(upgrade_before_load)

    # ---------------------------------------------------------------- shapes and positions
    def token_grid(self, input_shape: tuple[int, ...]) -> Grid:
        name = type(self).__name__
        if len(input_shape) not in (4, 5):
            raise ValueError(
                f"{name} takes videos (B, C, T, H, W) or images (B, C, H, W), got shape {tuple(input_shape)}"
            )
        if input_shape[1] != self.in_channels:
            raise ValueError(f"{name} was built for {self.in_channels} input channels, got {input_shape[1]}")
        if len(input_shape) == 4:
            if self.patch[0] != 1:
                raise ValueError(
                    f"{name} has temporal patch {self.patch[0]}, so it cannot take images (B, C, H, W) of shape "
                    f"{tuple(input_shape)}; images need a temporal patch of 1"
                )
            return (1, *token_grid(tuple(input_shape[2:]), self.patch[1:]))
        return token_grid(tuple(input_shape[2:]), self.patch)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.in_channels, *self.input_size)

    def _positions(self, grid: Grid, device: torch.device) -> TokenPositions:
        coords = grid_coordinates(grid, device=device)  # (N, 3) t, h, w
        cos, sin = (None, None) if self.rope is None else self.rope(coords)  # (1, N, head_dim)
        return TokenPositions(coords[None], cos, sin)

    def _absolute_positions(self, grid: Grid, device: torch.device) -> torch.Tensor:
        """The sin-cos table (N, D) over the axes of the configured input: (h, w) for images, (t, h, w) for videos."""
        axes = len(self.input_size)
        if axes == 2 and grid[0] != 1:
            raise ValueError(
                f"this model's absolute positions cover (H, W) only (it was configured for images of "
                f"{self.input_size}); a video of {grid[0]} token frames needs a (T, H, W) input_size"
            )
        coords = grid_coordinates(grid[3 - axes:], device=device)
        return sincos_position_embedding(self.hidden_size, coords)

    # ---------------------------------------------------------------- conditions: the condition module's
    def drop_condition(self, cond: Any, drop: torch.Tensor) -> Any:
        return self.y_embedder.drop(cond, drop)

    def null_condition(self, cond: Any) -> Any:
        return self.y_embedder.null(cond)

    def set_null_text(self, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                      pooled: Optional[torch.Tensor] = None) -> None:
        if self.condition.kind != "text":
            super().set_null_text(text_tokens, text_mask)
        self.y_embedder.set_null_text(text_tokens, text_mask, pooled)

    def upgrade_state_dict(self, state: dict[str, torch.Tensor], prefix: str = "") -> None:
        """Rename in place the keys that DiTs written before condition modules gave the condition's tensors (e.g.
        `text_embedder.0.weight` -> `y_embedder.token_proj.0.weight`); `prefix` is this DiT's in `state`."""
        for old, new in self.y_embedder.LEGACY_KEYS.items():
            for key in [key for key in state if key.startswith(prefix + old)]:
                current = f"{prefix}y_embedder.{new}{key[len(prefix + old):]}"
                if current not in state:  # with both, strict loading names the old key as unexpected
                    state[current] = state.pop(key)

    # ---------------------------------------------------------------- the seam
    def embed(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> Embedded:
        grid = self.token_grid(tuple(x.shape))
        image = x.dim() == 4
        tokens = self.x_embedder(x.unsqueeze(2) if image else x)  # (B, N, D)
        if self.rope is None:
            tokens = tokens + self._absolute_positions(grid, x.device).to(tokens.dtype)
        c = self.t_embedder(t)  # (B, D)
        term, context = self.y_embedder.embed(cond)
        if term is not None:
            c = c + term
        return Embedded(tokens=tokens, c=c, positions=self._positions(grid, x.device), grid=grid, image=image,
                        context=context)

    def unembed(self, tokens: torch.Tensor, embedded: Embedded) -> torch.Tensor:
        out = self.final_layer(tokens, embedded.c)  # (B, N, C * prod(patch)), channel-major features
        video = unpatchify(out, self.patch, embedded.grid, self.in_channels)  # (B, C, T, H, W)
        return video.squeeze(2) if embedded.image else video

    def flop_shape(self) -> TransformerShape:
        text = self.condition.kind == "text"
        return TransformerShape(
            hidden=self.hidden_size,
            depth=(0, len(self.blocks), 0),
            mlp_hidden=mlp_hidden_size(self.hidden_size, self.mlp_ratio, self.mlp_kind),
            gated_mlp=self.mlp_kind == "swiglu",
            patch_dim=self.in_channels * math.prod(self.patch),
            # the keys and values of every cross-attention read the text already projected to the hidden size
            context_tokens=self.condition.text_length if text else 0,
            context_dim=self.hidden_size if text else 0,
            fusion=False,
        )


def upgrade_before_load(module: DiT, state: dict[str, torch.Tensor], prefix: str, *_: Any) -> None:
    """load_state_dict's pre-hook: checkpoints in an earlier layout load strictly (see `DiT.upgrade_state_dict`)."""
    module.upgrade_state_dict(state, prefix)
