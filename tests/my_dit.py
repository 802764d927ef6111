"""The README's "Add a backbone" example, in one file: a class-conditional DiT over a fixed image grid with a learned
position table, registered as 'my_dit'. Importing this module is all it takes to train it with SPRINT (both stages)
and sample it with PDG: tests/test_backbone_contract.py holds it to the seam like every other backbone."""
from __future__ import annotations

import math

import torch
from torch import nn

from registry import BACKBONES
from sprint_mm.backbone import Backbone, ConditionSpec, Embedded
from sprint_mm.flops import TransformerShape
from sprint_mm.layers import (
    DiTBlock,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    grid_coordinates,
    initialize_dit_weights,
    token_grid,
    unpatchify,
)
from sprint_mm.tokens import TokenPositions


@BACKBONES.register("my_dit")
class MyDiT(Backbone):
    """Images (B, C, H, W) of one size, patch p, a learned (N, D) position table."""

    def __init__(self, *, image_size: int = 8, patch: int = 2, channels: int = 1, num_classes: int = 10,
                 hidden_size: int = 32, depth: int = 4, num_heads: int = 2) -> None:
        super().__init__()
        self.hidden_size, self.patch, self.channels = hidden_size, (1, patch, patch), channels
        self.grid = (1, *token_grid((image_size, image_size), (patch, patch)))
        self.condition = ConditionSpec("class", num_classes=num_classes)
        self.x_embedder = PatchEmbed(self.patch, channels, hidden_size)
        self.pos_embed = nn.Parameter(torch.randn(1, math.prod(self.grid), hidden_size) * 0.02)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, channels * patch * patch)
        initialize_dit_weights(self)

    def token_grid(self, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
        if tuple(input_shape[1:]) != self.sample_shape:
            raise ValueError(f"MyDiT takes images (B, {', '.join(map(str, self.sample_shape))}), got {tuple(input_shape)}")
        return self.grid

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.channels, self.grid[1] * self.patch[1], self.grid[2] * self.patch[2])

    def embed(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> Embedded:
        grid = self.token_grid(tuple(x.shape))
        tokens = self.x_embedder(x.unsqueeze(2)) + self.pos_embed  # (B, N, D)
        c = self.t_embedder(t) + self.y_embedder(cond)  # (B, D)
        positions = TokenPositions(grid_coordinates(grid, device=x.device)[None])  # no RoPE: coordinates only
        return Embedded(tokens=tokens, c=c, positions=positions, grid=grid, image=True)

    def unembed(self, tokens: torch.Tensor, embedded: Embedded) -> torch.Tensor:
        out = unpatchify(self.final_layer(tokens, embedded.c), self.patch, embedded.grid, self.channels)
        return out.squeeze(2)  # (B, C, H, W)

    def drop_condition(self, cond: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        return torch.where(drop, torch.full_like(cond, self.condition.num_classes), cond)

    def flop_shape(self) -> TransformerShape:
        return TransformerShape(hidden=self.hidden_size, depth=(0, len(self.blocks), 0), mlp_hidden=4 * self.hidden_size,
                                patch_dim=self.channels * math.prod(self.patch), fusion=False)
