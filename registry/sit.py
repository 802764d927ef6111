"""Image SiT: a class-conditional DiT over 2D patch grids with 2D RoPE (or absolute sin-cos positions)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from registry import BACKBONES
from sprint_mm.backbone import Backbone, Embedded, Grid
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
)

# size -> (hidden, depth, heads); depths follow the original SiT/DiT family (XL: 28 = SPRINT's 2/24/2)
PRESETS: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
POSITIONS = ("rope", "absolute")


def resolve_preset(size: str, hidden_size: Optional[int], depth: Optional[int], num_heads: Optional[int]) -> tuple[int, int, int]:
    """A preset's (hidden, depth, heads) with explicit values taking precedence."""
    if size not in PRESETS:
        raise ValueError(f"unknown size preset {size!r}; allowed: {', '.join(PRESETS)}")
    preset = PRESETS[size]
    return hidden_size or preset[0], depth or preset[1], num_heads or preset[2]


def as_pair(value: int | tuple[int, ...], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(v <= 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or an (H, W) pair, got {value!r}")
    return pair  # type: ignore[return-value]


@BACKBONES.register("sit")
class SiT(Backbone):
    """SiT / DiT with adaLN-Zero blocks, q/k RMSNorm and 2D RoPE; any patch size, non-square grids."""

    def __init__(
        self,
        size: str = "S",
        hidden_size: Optional[int] = None,
        depth: Optional[int] = None,
        num_heads: Optional[int] = None,
        input_size: int | tuple[int, int] = 32,
        patch_size: int | tuple[int, int] = 2,
        in_channels: int = 4,
        num_classes: int = 1000,
        mlp_ratio: float = 4.0,
        mlp: str = "gelu",
        qk_norm: str = "rmsnorm",
        position: str = "rope",
        rope_theta: float = 10000.0,
        attention_backend: str = "sdpa",
    ) -> None:
        super().__init__()
        hidden_size, depth, num_heads = resolve_preset(size, hidden_size, depth, num_heads)
        if position not in POSITIONS:
            raise ValueError(f"unknown position {position!r}; allowed: {', '.join(POSITIONS)}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by {num_heads} heads")
        head_dim = hidden_size // num_heads
        if position == "rope" and head_dim % 4:
            raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim} ({hidden_size}/{num_heads})")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.input_size = as_pair(input_size, "input_size")
        self.patch = as_pair(patch_size, "patch_size")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.mlp_kind = mlp
        self.mlp_ratio = mlp_ratio
        self.position = position
        token_grid(self.input_size, self.patch)  # validates divisibility early

        self.x_embedder = PatchEmbed(self.patch, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.rope = RotaryEmbedding(head_dim, (head_dim // 2, head_dim // 2), rope_theta) if position == "rope" else None
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, mlp, qk_norm, attention_backend) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, in_channels * math.prod(self.patch))
        initialize_dit_weights(self)

    # ---------------------------------------------------------------- the seam
    def token_grid(self, input_shape: tuple[int, ...]) -> Grid:
        if len(input_shape) != 4:
            raise ValueError(f"SiT takes images (B, C, H, W), got shape {tuple(input_shape)}")
        if input_shape[1] != self.in_channels:
            raise ValueError(f"SiT was built for {self.in_channels} input channels, got {input_shape[1]}")
        h, w = token_grid(tuple(input_shape[2:]), self.patch)
        return (1, h, w)

    def embed(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> Embedded:
        grid = self.token_grid(tuple(x.shape))
        tokens = self.x_embedder(x)  # (B, N, D)
        coords = grid_coordinates(grid[1:], device=x.device)  # (N, 2) rows, cols
        pos = None
        if self.rope is not None:
            pos = self.rope(coords)  # cos, sin: (1, N, d)
        else:
            tokens = tokens + sincos_position_embedding(self.hidden_size, coords).to(tokens.dtype)
        c = self.t_embedder(t) + self.y_embedder(cond)  # (B, D)
        return Embedded(tokens=tokens, c=c, pos=pos, grid=grid)

    def unembed(self, tokens: torch.Tensor, c: torch.Tensor, grid: Grid) -> torch.Tensor:
        out = self.final_layer(tokens, c)  # (B, N, C * p * p), channel-major features
        return unpatchify(out, self.patch, grid[1:], self.in_channels)  # (B, C, H, W)

    def drop_condition(self, cond: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        return torch.where(drop.to(cond.device), torch.full_like(cond, self.num_classes), cond)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.in_channels, *self.input_size)

    def flop_shape(self, fusion: bool = False, depths: tuple[int, int, int] | None = None) -> TransformerShape:
        patch_dim = self.in_channels * math.prod(self.patch)
        return TransformerShape(
            hidden=self.hidden_size,
            depth=depths or (0, len(self.blocks), 0),
            mlp_hidden=mlp_hidden_size(self.hidden_size, self.mlp_ratio, self.mlp_kind),
            gated_mlp=self.mlp_kind == "swiglu",
            patch_dim=patch_dim,
            fusion=fusion,
        )
