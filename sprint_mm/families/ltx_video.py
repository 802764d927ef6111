"""LTX-Video (diffusers `LTXVideoTransformer3DModel`) as a SPRINT backbone.

LTX-Video's conventions, as its diffusers model and `LTXPipeline` have them:
- input (B, 128, T, H, W) latents of the LTX VAE (8x temporal, 32x spatial; images are one-frame clips), packed by
  the pipeline into tokens of (C, pt, ph, pw) features in (t, h, w) raster order (patch 1x1x1 for LTX 0.9.x) and
  projected by `proj_in`; output the same layout, unpacked;
- time: `timestep = 1000 t` through `time_embed` (PixArt's single adaLN): every block reads the (B, 1, 6D) vector
  (`c`), the output layer the embedded timestep (kept in `context`);
- text: T5-XXL's last hidden states, 128 tokens, with their mask: padding is turned into an attention bias of -10000
  as the model does;
- positions: 3D RoPE over the whole inner width (cos and sin (1, N, D) per token), of the token's (t, h, w) scaled by
  `rope_interpolation_scale` = (VAE temporal factor / frame rate, VAE spatial factor, VAE spatial factor), as the
  pipeline passes it: `frame_rate` is part of the condition (25 by default, as LTXPipeline's). Gathered with the
  tokens, so a kept token keeps its rotation;
- context parallelism: as Wan's (`SeamBlock.attending_over`), the text bias read whole by every process.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch

from sprint_mm.backbone import Embedded
from sprint_mm.errors import check_number
from sprint_mm.families.adapter import (DiffusersBackbone, SeamBlock, SpreadSelfAttention, pack_channels_first,
                                        unpack_channels_first, video_output)
from sprint_mm.layers import grid_coordinates
from sprint_mm.tokens import TokenPositions

LTX_121_FRAMES_768x512 = (16, 16, 24)  # latent (T, H, W) of 121 frames at 512 x 768 px
VAE_COMPRESSION = (8, 32)  # LTX VAE: temporal, spatial


class LTXVideoSeam(SeamBlock):
    """An `LTXVideoTransformerBlock` on the seam: c is its (B, 1, 6D) adaLN input, context the projected caption and
    its attention bias."""

    def seam_forward(self, x: torch.Tensor, c: torch.Tensor, positions: TokenPositions, context: Any) -> torch.Tensor:
        with self.attending_over(positions.group, functools.partial(SpreadSelfAttention, rotate=rotate_inner)):
            return self.diffusers_forward(x, context["text"], c, positions.rope, context["bias"])


def rotate_inner(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """LTX-Video's RoPE (diffusers' `apply_rotary_emb` over the whole inner width, cos/sin (1, n, D)) on q or k
    (B, n, heads, head_dim)."""
    from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

    return apply_rotary_emb(x.flatten(2), rope).unflatten(2, x.shape[2:])


class LTXVideo(DiffusersBackbone):
    """LTX-Video from a local diffusers folder (`path`) or a transformer `config` (random weights); samples of
    `input_size` (T, H, W) latents; captions of `text_length` T5 tokens; RoPE scaled for `frame_rate` and the VAE's
    `vae_compression` (temporal, spatial)."""

    family = "ltx_video"
    class_name = "LTXVideoTransformer3DModel"
    blocks_attribute = "transformer_blocks"
    seam = LTXVideoSeam
    text_dim_key = "caption_channels"
    shards_sequence = True  # per-token layers, self-attention through `SpreadSelfAttention`; unembed of a box

    def __init__(self, path: Optional[str] = None, config: Optional[dict] = None,
                 input_size: Any = LTX_121_FRAMES_768x512, text_length: int = 128, frame_rate: float = 25.0,
                 vae_compression: tuple[int, int] = VAE_COMPRESSION) -> None:
        super().__init__(path, config, input_size, text_length)
        check_number("ltx_video.frame_rate", frame_rate, low=1e-3)
        temporal, spatial = vae_compression
        self.rope_scale = (temporal / frame_rate, spatial, spatial)

    @property
    def patch(self) -> tuple[int, int, int]:
        settings = self.transformer.config
        return settings.patch_size_t, settings.patch_size, settings.patch_size

    def embed(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> Embedded:
        grid = self.token_grid(tuple(x.shape))
        model, b = self.transformer, x.shape[0]
        tokens, mask = self.caption.check(cond)
        h = model.proj_in(pack_channels_first(self.as_clip(x), self.patch))  # (B, N, D)
        temb, embedded_timestep = model.time_embed(self.timestep(t).flatten(), batch_size=b, hidden_dtype=h.dtype)
        text = model.caption_projection(tokens).view(b, -1, h.size(-1))  # (B, L, D)
        bias = ((1 - mask.to(h.dtype)) * -10000.0).unsqueeze(1)  # (B, 1, L), as the model turns its mask
        cos, sin = model.rope(h[:1], *grid, self.rope_scale)  # (1, N, D) each
        positions = TokenPositions(grid_coordinates(grid, device=x.device)[None], cos, sin)
        return Embedded(tokens=h, c=temb.view(b, -1, temb.size(-1)), positions=positions, grid=grid,
                        image=x.dim() == 4,
                        context={"text": text, "bias": bias, "time": embedded_timestep.view(b, -1, h.size(-1))})

    def unembed(self, tokens: torch.Tensor, embedded: Embedded) -> torch.Tensor:
        model = self.transformer
        values = model.scale_shift_table[None, None] + embedded.context["time"][:, :, None]
        shift, scale = values[:, :, 0], values[:, :, 1]
        out = model.proj_out(model.norm_out(tokens) * (1 + scale) + shift)  # (B, N, C * pt * ph * pw)
        return video_output(unpack_channels_first(out, embedded.grid, self.patch), embedded)

