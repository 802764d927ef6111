"""Text DiT: DiT blocks with self-attention, cross-attention to text tokens and an MLP, on images or videos.

The condition is `{"text_tokens": (B, L, Dt) float, "text_mask": (B, L) bool}` (True = real token), as sprint_mm.text
writes it. Text tokens are projected to the hidden size once and handed to every block as the context; the SPRINT
wrapper never drops them, so the sparse middle blocks still read every caption token.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from registry import BACKBONES
from registry.sit import resolve_preset
from registry.video_dit import VideoBackbone
from sprint_mm.backbone import Embedded
from sprint_mm.layers import CrossAttention, DiTBlock, Rope, initialize_dit_weights, modulate
from sprint_mm.text import TEXT_KEYS, drop_captions

TextContext = tuple[torch.Tensor, torch.Tensor]  # projected tokens (B, L, D), mask (B, L)


class TextDiTBlock(DiTBlock):
    """adaLN-Zero block with cross-attention between self-attention and MLP:
    x += gate * Attn(mod(LN(x))); x += CrossAttn(LN(x), text); x += gate * MLP(mod(LN(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        mlp: str = "gelu",
        qk_norm: str = "rmsnorm",
        attention_backend: str = "sdpa",
    ) -> None:
        super().__init__(dim, num_heads, mlp_ratio, mlp, qk_norm, attention_backend)
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, num_heads, qk_norm, attention_backend)

    def forward(self, x: torch.Tensor, c: torch.Tensor, pos: Optional[Rope], context: TextContext) -> torch.Tensor:
        text, text_mask = context
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), pos)
        x = x + self.cross_attn(self.norm_cross(x), text, text_mask)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, L, Dt) tokens over the positions where mask (B, L) is True."""
    total = tokens.masked_fill(~mask[..., None], 0.0).sum(dim=1)  # (B, Dt)
    return total / mask.sum(dim=1, keepdim=True).to(tokens.dtype)


@BACKBONES.register("text_dit")
class TextDiT(VideoBackbone):
    """Text-conditioned DiT over (t, h, w) patches with 3D RoPE; images (B, C, H, W) are one-frame videos.

    adaLN reads the timestep (plus the mean of the real text tokens with `pooled_text`). The null condition is the
    empty-caption embedding given by `set_null_text`, or a learned (L, Dt) table with `learned_null`.
    """

    def __init__(
        self,
        size: str = "S",
        hidden_size: Optional[int] = None,
        depth: Optional[int] = None,
        num_heads: Optional[int] = None,
        input_size: int | tuple[int, ...] = 32,
        patch_size: int | tuple[int, ...] = 2,
        in_channels: int = 4,
        text_dim: int = 384,
        text_length: int = 64,
        pooled_text: bool = False,
        learned_null: bool = False,
        mlp_ratio: float = 4.0,
        mlp: str = "gelu",
        qk_norm: str = "rmsnorm",
        rope_axes: Optional[tuple[int, ...]] = None,
        rope_theta: float = 10000.0,
        attention_backend: str = "sdpa",
    ) -> None:
        hidden_size, depth, num_heads = resolve_preset(size, hidden_size, depth, num_heads)
        if text_dim < 1 or text_length < 1:
            raise ValueError(f"text_dim and text_length must be >= 1, got {text_dim} and {text_length}")
        super().__init__(
            hidden_size, num_heads, input_size, patch_size, in_channels, mlp_ratio, mlp, rope_axes, rope_theta
        )
        self.text_dim = text_dim
        self.text_length = text_length
        self.learned_null = learned_null
        self.text_embedder = nn.Sequential(
            nn.Linear(text_dim, hidden_size), nn.GELU(approximate="tanh"), nn.Linear(hidden_size, hidden_size)
        )
        self.pooled_embedder = nn.Linear(text_dim, hidden_size) if pooled_text else None
        self.blocks = nn.ModuleList(
            TextDiTBlock(hidden_size, num_heads, mlp_ratio, mlp, qk_norm, attention_backend) for _ in range(depth)
        )
        initialize_dit_weights(self)
        for block in self.blocks:  # cross-attention starts silent too, so every block starts as the identity
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)

        if learned_null:
            self.null_text_tokens = nn.Parameter(torch.randn(text_length, text_dim) * text_dim**-0.5)
            null_mask = torch.ones(text_length, dtype=torch.bool)
        else:
            self.register_buffer("null_text_tokens", torch.zeros(text_length, text_dim))
            null_mask = torch.zeros(text_length, dtype=torch.bool)
            null_mask[0] = True  # never all False: attention over no key gives NaN
        self.register_buffer("null_text_mask", null_mask)

    # ---------------------------------------------------------------- the text condition
    def check_text(self, cond: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The (tokens (B, L, Dt), mask (B, L)) of a text condition, or one clear error."""
        if not isinstance(cond, dict) or any(key not in cond for key in TEXT_KEYS):
            got = sorted(cond) if isinstance(cond, dict) else type(cond).__name__
            raise ValueError(f"TextDiT takes a condition dict with keys {TEXT_KEYS}, got {got}")
        tokens, mask = cond["text_tokens"], cond["text_mask"]
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (self.text_length, self.text_dim):
            raise ValueError(
                f"text_tokens must have shape (B, {self.text_length}, {self.text_dim}) (text_length, text_dim), "
                f"got {tuple(tokens.shape)}"
            )
        if mask.dtype != torch.bool or mask.shape != tokens.shape[:2]:
            raise ValueError(
                f"text_mask must be bool of shape {tuple(tokens.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}"
            )
        return tokens, mask

    @torch.no_grad()
    def set_null_text(self, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> None:
        """Use the text encoder's empty-caption embedding, (L, Dt) / (L,) or with batch 1, as the null condition."""
        if self.learned_null:
            raise ValueError("this TextDiT learns its null condition (learned_null=True); set_null_text does not apply")
        tokens = text_tokens[0] if text_tokens.dim() == 3 and text_tokens.shape[0] == 1 else text_tokens
        mask = text_mask[0] if text_mask.dim() == 2 and text_mask.shape[0] == 1 else text_mask
        if tuple(tokens.shape) != (self.text_length, self.text_dim):
            raise ValueError(
                f"null text tokens must have shape ({self.text_length}, {self.text_dim}) or (1, {self.text_length}, "
                f"{self.text_dim}), got {tuple(text_tokens.shape)}"
            )
        if mask.dtype != torch.bool or tuple(mask.shape) != (self.text_length,) or not mask.any():
            raise ValueError(
                f"null text mask must be bool of shape ({self.text_length},) with at least one True, "
                f"got {mask.dtype} {tuple(text_mask.shape)} with {int(mask.sum())} True"
            )
        self.null_text_tokens.copy_(tokens)
        self.null_text_mask.copy_(mask)

    def drop_condition(self, cond: dict[str, torch.Tensor], drop: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens, _ = self.check_text(cond)
        null = {"text_tokens": self.null_text_tokens[None], "text_mask": self.null_text_mask[None]}
        return drop_captions(cond, null, drop.to(tokens.device))

    # ---------------------------------------------------------------- the seam
    def embed(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> Embedded:
        text, mask = self.check_text(cond)
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every text_mask row needs at least one True (real token); attention over none gives NaN")
        tokens, grid, rope = self.patch_tokens(x)  # (B, N, D)
        text = text.to(self.text_embedder[0].weight.dtype)
        c = self.t_embedder(t)  # (B, D)
        if self.pooled_embedder is not None:
            c = c + self.pooled_embedder(masked_mean(text, mask))
        context = (self.text_embedder(text), mask)  # (B, L, D), (B, L)
        return Embedded(tokens=tokens, c=c, pos=rope, grid=grid, context=context)

    def context_flop_shape(self) -> dict[str, int]:
        # The keys and values of every cross-attention read the text already projected to the hidden size.
        return {"context_tokens": self.text_length, "context_dim": self.hidden_size}
