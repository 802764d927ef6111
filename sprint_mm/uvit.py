"""U-ViT (Bao et al., "All are Worth Words: A ViT Backbone for Diffusion Models", CVPR 2023) on the seam.

In-blocks, one mid block, out-blocks: out-block j reads the output of its mirror in-block through a long skip
(blocks i -> depth-1-i), concatenates [x, skip] and projects 2D -> D before the block, as U-ViT does. The seam runs
the skips (`Backbone.long_skips`), so SPRINT wraps it like any backbone; its legal splits are encoder_depth >=
decoder_depth (no skip from a middle block into a decoder block).

How it differs from the paper's U-ViT: time and class reach every block through adaLN-Zero (the DiT blocks of
sprint_mm.layers) instead of entering the token sequence as two extra tokens, so a SPRINT token drop can never drop
them; positions are RoPE or fixed sin-cos instead of a learned table; attention has q/k norm; there is no 3x3
convolution after unpatchify. Patches, positions, inputs (images, or videos with images as one-frame videos) and
attention options are those of sprint_mm.dit.DiT, which it extends.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

import torch
from torch import nn

from sprint_mm.dit import DiT
from sprint_mm.errors import check_number
from sprint_mm.flops import TransformerShape
from sprint_mm.tokens import TokenPositions

# size -> (hidden, depth, heads): U-ViT's Small, Mid, Large and Huge
PRESETS: dict[str, tuple[int, int, int]] = {
    "S": (512, 13, 8),
    "M": (768, 17, 12),
    "L": (1024, 21, 16),
    "H": (1152, 29, 16),
}


class LongSkipBlock(nn.Module):
    """A block fed by a long skip: Linear(2D -> D) of [x, skip], then the block."""

    def __init__(self, block: nn.Module, dim: int) -> None:
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim)
        nn.init.xavier_uniform_(self.skip_linear.weight)
        nn.init.zeros_(self.skip_linear.bias)
        self.block = block

    def forward(self, x: torch.Tensor, c: torch.Tensor, positions: Optional[TokenPositions] = None, context: Any = None,
                skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        if skip is None:
            raise ValueError("a U-ViT out-block reads the long skip of its mirror in-block: run the backbone's blocks "
                             "with sprint_mm.backbone.run_stack, which hands it over")
        return self.block(self.skip_linear(torch.cat([x, skip], dim=-1)), c, positions, context)  # (B, N, D)


class UViT(DiT):
    """A class-conditional U-ViT over (T, H, W) patch grids; inputs (B, C, T, H, W) or images (B, C, H, W).

    `size` picks U-ViT's S/M/L/H preset (explicit hidden_size, depth, num_heads win); depth is odd: (depth - 1) / 2
    in-blocks, a mid block, as many out-blocks. The other options are DiT's.
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
        num_classes: int = 1000,
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
        if size not in PRESETS:
            raise ValueError(f"unknown U-ViT size preset {size!r}; allowed: {', '.join(PRESETS)}")
        preset_hidden, preset_depth, preset_heads = PRESETS[size]
        depth = preset_depth if depth is None else depth
        check_number("U-ViT depth", depth, low=3, integer=True)
        if depth % 2 == 0:
            raise ValueError(f"U-ViT depth must be odd (in-blocks, one mid block, as many out-blocks), got {depth}")
        super().__init__(
            hidden_size=preset_hidden if hidden_size is None else hidden_size, depth=depth,
            num_heads=preset_heads if num_heads is None else num_heads, input_size=input_size, patch_size=patch_size,
            in_channels=in_channels, conditioning="class", num_classes=num_classes, position=position,
            rope_axes=rope_axes, rope_theta=rope_theta, attention=attention, mlp=mlp, mlp_ratio=mlp_ratio,
            qk_norm=qk_norm, attention_backend=attention_backend, attention_kernel=attention_kernel,
        )
        self.long_skips = tuple((i, depth - 1 - i) for i in range(depth // 2))  # in-block i -> its mirror out-block
        for _, target in self.long_skips:
            self.blocks[target] = LongSkipBlock(self.blocks[target], self.hidden_size)

    def flop_shape(self) -> TransformerShape:
        return replace(super().flop_shape(), skip_projections=(0, len(self.long_skips), 0))
