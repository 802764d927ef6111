"""Video DiT: a class-conditional DiT over (t, h, w) patch grids with 3D RoPE; full or factorised (Latte) attention.

Images (B, C, H, W) are one-frame videos, so image and video batches share one model when the temporal patch is 1.
`VideoBackbone` holds the 3D parts (patches, positions, one-frame images, final layer) that text_dit reuses.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from registry import BACKBONES
from registry.sit import resolve_preset
from sprint_mm.backbone import Backbone, Embedded, Grid
from sprint_mm.flops import TransformerShape
from sprint_mm.layers import (
    Attention,
    DiTBlock,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    Rope,
    RotaryEmbedding,
    TimestepEmbedder,
    grid_coordinates,
    initialize_dit_weights,
    mlp_hidden_size,
    token_grid,
    unpatchify,
    wan_axis_split,
)
from sprint_mm.sprint import gather_tokens

ATTENTIONS = ("full", "factorised")
SPANS = ("spatial", "temporal")

#################################################################################
#                          Grids: videos and one-frame images                   #
#################################################################################


class ImageGrid(tuple):
    """The (1, H, W) token grid of an image input: `unembed` gives back (B, C, H, W), not a one-frame video."""


def as_patch(value: int | tuple[int, ...]) -> tuple[int, int, int]:
    """(pt, ph, pw) from an int p (= (1, p, p)), an (ph, pw) pair (temporal 1) or a triple."""
    patch = (1, value, value) if isinstance(value, int) else tuple(value)
    if len(patch) == 2:
        patch = (1, *patch)
    if len(patch) != 3 or any(not isinstance(p, int) or p <= 0 for p in patch):
        raise ValueError(f"patch_size must be a positive int, an (H, W) pair or a (T, H, W) triple, got {value!r}")
    return patch  # type: ignore[return-value]


def as_sample_size(value: int | tuple[int, ...]) -> tuple[int, ...]:
    """(H, W) for image samples (an int n means (n, n)) or (T, H, W) for video samples."""
    size = (value, value) if isinstance(value, int) else tuple(value)
    if len(size) not in (2, 3) or any(not isinstance(s, int) or s <= 0 for s in size):
        raise ValueError(f"input_size must be a positive int, an (H, W) pair or a (T, H, W) triple, got {value!r}")
    return size


def as_video(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 1, H, W); videos pass through."""
    return x.unsqueeze(2) if x.dim() == 4 else x


#################################################################################
#                          Factorised (spatial / temporal) attention            #
#################################################################################


def group_by_frame(frame: torch.Tensor, cell: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Order tokens frame by frame, each frame by spatial cell: (order (b, n), frames T, tokens per frame S).

    Factorised attention needs every frame to hold the same cells (a tube mask); anything else raises.
    """
    order = cell.argsort(dim=1, stable=True)
    order = order.gather(1, frame.gather(1, order).argsort(dim=1, stable=True))  # (b, n): by frame, then by cell
    frame, cell = frame.gather(1, order), cell.gather(1, order)
    n = order.shape[1]
    frames = int((frame[0, 1:] != frame[0, :-1]).sum()) + 1
    per_frame = n // frames
    if n % frames == 0:
        frame, cell = frame.view(-1, frames, per_frame), cell.view(-1, frames, per_frame)
        one_frame_each = bool((frame == frame[..., :1]).all() and (frame[:, 1:, 0] != frame[:, :-1, 0]).all())
        if one_frame_each and bool((cell == cell[:, :1]).all()):
            return order, frames, per_frame
    raise ValueError(
        f"factorised attention needs the same token positions in every frame, but the {n} tokens it got do not "
        "form such frames; use a tube mask (TokenMasker kind 'tube') or attention='full'"
    )


class FactorisedAttention(Attention):
    """Self-attention within each frame ('spatial') or across frames at each spatial position ('temporal').

    pos is (cos, sin, frame, cell): RoPE plus every token's frame index and spatial cell, gathered with the tokens.
    """

    def __init__(self, dim: int, num_heads: int, span: str, qk_norm: str = "rmsnorm", backend: str = "sdpa") -> None:
        super().__init__(dim, num_heads, qk_norm, backend)
        if span not in SPANS:
            raise ValueError(f"unknown attention span {span!r}; allowed: {', '.join(SPANS)}")
        self.span = span

    def forward(self, x: torch.Tensor, pos: Optional[tuple[torch.Tensor, ...]] = None) -> torch.Tensor:
        if pos is None or len(pos) != 4:
            raise ValueError("factorised attention needs pos = (cos, sin, frame, cell) from VideoDiT.embed")
        cos, sin, frame, cell = pos
        b, n, d = x.shape
        order, frames, per_frame = group_by_frame(frame, cell)
        order = order.expand(b, -1)  # (B, n)
        grouped = [gather_tokens(z, order).reshape(b, frames, per_frame, -1) for z in (x, cos, sin)]  # (B, T, S, *)
        if self.span == "temporal":
            grouped = [z.transpose(1, 2) for z in grouped]  # (B, S, T, *)
        x_g, cos_g, sin_g = (z.flatten(0, 1) for z in grouped)  # (B*T, S, *) or (B*S, T, *)
        out = super().forward(x_g, (cos_g, sin_g)).unflatten(0, grouped[0].shape[:2])
        if self.span == "temporal":
            out = out.transpose(1, 2)  # (B, T, S, D)
        return torch.empty_like(x).scatter(1, order[..., None].expand(-1, -1, d), out.reshape(b, n, d))


class FactorisedBlock(DiTBlock):
    """A DiT block (same parameters) whose self-attention spans one frame or one spatial position across frames."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        span: str,
        mlp_ratio: float = 4.0,
        mlp: str = "gelu",
        qk_norm: str = "rmsnorm",
        attention_backend: str = "sdpa",
    ) -> None:
        super().__init__(dim, num_heads, mlp_ratio, mlp, qk_norm, attention_backend)
        self.attn = FactorisedAttention(dim, num_heads, span, qk_norm, attention_backend)


#################################################################################
#                          The shared 3D backbone parts                         #
#################################################################################


class VideoBackbone(Backbone):
    """What every (t, h, w) backbone shares: size checks, 3D patches, 3D RoPE (no position cap), the final layer.

    Subclasses add the conditioning, build `self.blocks`, then call `initialize_dit_weights(self)`.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        input_size: int | tuple[int, ...],
        patch_size: int | tuple[int, ...],
        in_channels: int,
        mlp_ratio: float,
        mlp: str,
        rope_axes: Optional[tuple[int, ...]],
        rope_theta: float,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by {num_heads} heads")
        head_dim = hidden_size // num_heads
        rope_axes = wan_axis_split(head_dim) if rope_axes is None else tuple(rope_axes)
        if len(rope_axes) != 3:
            raise ValueError(f"rope_axes must give the (t, h, w) channel counts of a head, got {rope_axes!r}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.input_size = as_sample_size(input_size)
        self.patch = as_patch(patch_size)
        self.in_channels = in_channels
        self.mlp_ratio = mlp_ratio
        self.mlp_kind = mlp
        self.token_grid((1, in_channels, *self.input_size))  # validates divisibility early

        self.x_embedder = PatchEmbed(self.patch, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.rope = RotaryEmbedding(head_dim, rope_axes, rope_theta)
        self.final_layer = FinalLayer(hidden_size, in_channels * math.prod(self.patch))

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
            return ImageGrid(token_grid((1, *input_shape[2:]), self.patch))
        return token_grid(tuple(input_shape[2:]), self.patch)

    def patch_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid, Rope]:
        """Tokens (B, N, D), their grid and RoPE (cos, sin) of shape (1, N, head_dim)."""
        grid = self.token_grid(tuple(x.shape))
        return self.x_embedder(as_video(x)), grid, self.rope(grid_coordinates(grid, device=x.device))

    def unembed(self, tokens: torch.Tensor, c: torch.Tensor, grid: Grid) -> torch.Tensor:
        out = self.final_layer(tokens, c)  # (B, N, C * prod(patch)), channel-major features
        video = unpatchify(out, self.patch, tuple(grid), self.in_channels)  # (B, C, T, H, W)
        return video.squeeze(2) if isinstance(grid, ImageGrid) else video

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.in_channels, *self.input_size)

    def flop_shape(self, fusion: bool = False, depths: tuple[int, int, int] | None = None) -> TransformerShape:
        return TransformerShape(
            hidden=self.hidden_size,
            depth=depths or (0, len(self.blocks), 0),
            mlp_hidden=mlp_hidden_size(self.hidden_size, self.mlp_ratio, self.mlp_kind),
            gated_mlp=self.mlp_kind == "swiglu",
            patch_dim=self.in_channels * math.prod(self.patch),
            fusion=fusion,
            **self.context_flop_shape(),
        )

    def context_flop_shape(self) -> dict[str, int]:
        """Cross-attention sizes for `TransformerShape` (none here)."""
        return {}


#################################################################################
#                          The class-conditional video DiT                      #
#################################################################################


@BACKBONES.register("video_dit")
class VideoDiT(VideoBackbone):
    """Class-conditional DiT over (t, h, w) patches; attention 'full' (spatiotemporal) or 'factorised' (Latte).

    Factorised blocks alternate spatial (even blocks) and temporal (odd blocks) attention.
    `flop_shape` counts full attention, an upper bound for factorised attention.
    """

    def __init__(
        self,
        size: str = "S",
        hidden_size: Optional[int] = None,
        depth: Optional[int] = None,
        num_heads: Optional[int] = None,
        input_size: int | tuple[int, ...] = (16, 32, 32),
        patch_size: int | tuple[int, ...] = (1, 2, 2),
        in_channels: int = 4,
        num_classes: int = 1000,
        mlp_ratio: float = 4.0,
        mlp: str = "gelu",
        qk_norm: str = "rmsnorm",
        attention: str = "full",
        rope_axes: Optional[tuple[int, ...]] = None,
        rope_theta: float = 10000.0,
        attention_backend: str = "sdpa",
    ) -> None:
        hidden_size, depth, num_heads = resolve_preset(size, hidden_size, depth, num_heads)
        if attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {attention!r}; allowed: {', '.join(ATTENTIONS)}")
        super().__init__(
            hidden_size, num_heads, input_size, patch_size, in_channels, mlp_ratio, mlp, rope_axes, rope_theta
        )
        self.num_classes = num_classes
        self.attention = attention
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        options = (mlp_ratio, mlp, qk_norm, attention_backend)
        if attention == "full":
            blocks = (DiTBlock(hidden_size, num_heads, *options) for _ in range(depth))
        else:
            blocks = (FactorisedBlock(hidden_size, num_heads, SPANS[i % 2], *options) for i in range(depth))
        self.blocks = nn.ModuleList(blocks)
        initialize_dit_weights(self)

    def embed(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> Embedded:
        tokens, grid, rope = self.patch_tokens(x)  # (B, N, D)
        pos: tuple[torch.Tensor, ...] = rope
        if self.attention == "factorised":
            coords = grid_coordinates(grid, device=x.device)  # (N, 3) t, h, w
            frame = coords[:, 0][None]  # (1, N)
            cell = (coords[:, 1] * grid[2] + coords[:, 2])[None]  # (1, N) spatial position within the frame
            pos = (*rope, frame, cell)
        c = self.t_embedder(t) + self.y_embedder(cond)  # (B, D)
        return Embedded(tokens=tokens, c=c, pos=pos, grid=grid)

    def drop_condition(self, cond: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        return torch.where(drop.to(cond.device), torch.full_like(cond, self.num_classes), cond)
