"""One DiT family over (T, H, W) patch grids: images are one-frame videos.

adaLN-Zero blocks with q/k norm; RoPE over any of the (t, h, w) axes or absolute sin-cos positions; full or
factorised (spatial / temporal, as Latte) attention; conditioned on class ids or on text (cross-attention to the
caption tokens, which the SPRINT wrapper never drops). The registry's `sit`, `video_dit` and `text_dit` are this
class with other defaults.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from sprint_mm.backbone import Backbone, ConditionSpec, Embedded, Grid
from sprint_mm.errors import check_number
from sprint_mm.flops import TransformerShape
from sprint_mm.layers import (
    DiTBlock,
    FinalLayer,
    LabelEmbedder,
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
from sprint_mm.text import TEXT_KEYS, drop_captions
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
TEXT_OPTIONS = ("text_dim", "text_length", "pooled_text", "learned_null")


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


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, L, Dt) tokens over the positions where mask (B, L) is True."""
    total = tokens.masked_fill(~mask[..., None], 0.0).sum(dim=1)  # (B, Dt)
    return total / mask.sum(dim=1, keepdim=True).to(tokens.dtype)


#################################################################################
#                                 The DiT                                       #
#################################################################################


class DiT(Backbone):
    """A diffusion transformer over (T, H, W) patch grids; inputs (B, C, T, H, W) or images (B, C, H, W).

    `input_size` (H, W) or (T, H, W) sets the sample shape and the axes of an absolute position table. `attention`
    'factorised' alternates spatial (even blocks) and temporal (odd blocks) attention; `flop_shape` counts full
    attention, an upper bound for it. `conditioning` 'class' embeds ids (`num_classes` plus a null row); 'text'
    projects caption tokens (`text_length` x `text_dim`) once and cross-attends to them in every block, with adaLN
    reading the timestep (plus the mean of the real text tokens with `pooled_text`); its null condition is the
    empty-caption embedding (`set_null_text`) or a learned table (`learned_null`).
    """

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
        self._build_condition(conditioning, num_classes, text_dim, text_length, pooled_text, learned_null)
        spans = ("spatial", "temporal") if attention == "factorised" else ("full",)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, mlp=mlp, qk_norm=qk_norm,
                     attention_backend=attention_backend, attention_kernel=attention_kernel, span=spans[i % len(spans)],
                     cross_attention=conditioning == "text")
            for i in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, in_channels * math.prod(self.patch))
        initialize_dit_weights(self)
        if self.condition.learned_null:  # drawn after the initialisation, which would otherwise overwrite it
            self.null_text_tokens = nn.Parameter(torch.randn(text_length, text_dim) * text_dim**-0.5)

    def _build_condition(self, kind: str, num_classes: int, text_dim: int, text_length: int, pooled_text: bool,
                         learned_null: bool) -> None:
        """The embedder of the condition, and the null caption of a text model."""
        if kind == "class":
            self.condition = ConditionSpec("class", num_classes=num_classes)
            self.y_embedder = LabelEmbedder(num_classes, self.hidden_size)
            return
        self.condition = ConditionSpec("text", text_length=text_length, text_dim=text_dim, learned_null=learned_null)
        if text_dim < 1 or text_length < 1:
            raise ValueError(f"text_dim and text_length must be >= 1, got {text_dim} and {text_length}")
        d = self.hidden_size
        self.text_embedder = nn.Sequential(nn.Linear(text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.pooled_embedder = nn.Linear(text_dim, d) if pooled_text else None
        null_mask = torch.ones(text_length, dtype=torch.bool)
        if not learned_null:
            self.register_buffer("null_text_tokens", torch.zeros(text_length, text_dim))
            null_mask = torch.zeros(text_length, dtype=torch.bool)
            null_mask[0] = True  # never all False: attention over no key gives NaN
        self.register_buffer("null_text_mask", null_mask)

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

    # ---------------------------------------------------------------- conditions
    def check_text(self, cond: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The (tokens (B, L, Dt), mask (B, L)) of a text condition, or one clear error."""
        length, dim = self.condition.text_length, self.condition.text_dim
        if not isinstance(cond, dict) or any(key not in cond for key in TEXT_KEYS):
            got = sorted(cond) if isinstance(cond, dict) else type(cond).__name__
            raise ValueError(f"{type(self).__name__} takes a condition dict with keys {TEXT_KEYS}, got {got}")
        tokens, mask = cond["text_tokens"], cond["text_mask"]
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (length, dim):
            raise ValueError(
                f"text_tokens must have shape (B, {length}, {dim}) (text_length, text_dim), got {tuple(tokens.shape)}"
            )
        if mask.dtype != torch.bool or mask.shape != tokens.shape[:2]:
            raise ValueError(
                f"text_mask must be bool of shape {tuple(tokens.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}"
            )
        return tokens, mask

    @torch.no_grad()
    def set_null_text(self, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> None:
        """Use the text encoder's empty-caption embedding, (L, Dt) / (L,) or with batch 1, as the null condition."""
        if self.condition.kind != "text":
            super().set_null_text(text_tokens, text_mask)
        if self.condition.learned_null:
            raise ValueError(f"this {type(self).__name__} learns its null condition (learned_null=True); "
                             "set_null_text does not apply")
        length, dim = self.condition.text_length, self.condition.text_dim
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
        self.null_text_tokens.copy_(tokens)
        self.null_text_mask.copy_(mask)

    def drop_condition(self, cond: Any, drop: torch.Tensor) -> Any:
        if self.condition.kind == "class":
            return torch.where(drop.to(cond.device), torch.full_like(cond, self.condition.num_classes), cond)
        tokens, _ = self.check_text(cond)
        null = {"text_tokens": self.null_text_tokens[None], "text_mask": self.null_text_mask[None]}
        return drop_captions(cond, null, drop.to(tokens.device))

    def _condition_vector(self, t: torch.Tensor, cond: Any) -> tuple[torch.Tensor, Any]:
        """(c (B, D) for adaLN, the context every block reads)."""
        c = self.t_embedder(t)  # (B, D)
        if self.condition.kind == "class":
            return c + self.y_embedder(cond), None
        text, mask = self.check_text(cond)
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every text_mask row needs at least one True (real token); attention over none gives NaN")
        text = text.to(self.text_embedder[0].weight.dtype)
        if self.pooled_embedder is not None:
            c = c + self.pooled_embedder(masked_mean(text, mask))
        return c, (self.text_embedder(text), mask)  # (B, L, D), (B, L)

    # ---------------------------------------------------------------- the seam
    def embed(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> Embedded:
        grid = self.token_grid(tuple(x.shape))
        image = x.dim() == 4
        tokens = self.x_embedder(x.unsqueeze(2) if image else x)  # (B, N, D)
        if self.rope is None:
            tokens = tokens + self._absolute_positions(grid, x.device).to(tokens.dtype)
        c, context = self._condition_vector(t, cond)
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
