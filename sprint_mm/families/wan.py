"""Wan 2.1 text-to-video (diffusers `WanTransformer3DModel`) as a SPRINT backbone.

Wan's conventions, as its diffusers model and `WanPipeline` have them:
- input (B, 16, T, H, W) latents of the Wan VAE (4x temporal, 8x spatial; images are one-frame clips), patch 1x2x2
  by a Conv3d, tokens in (t, h, w) raster order; output (B, 16, T, H, W), the features of a token laid out
  (pt, ph, pw, C);
- time: the sinusoid of `timestep = 1000 t` through `condition_embedder`, whose shared projection gives every block
  its six adaLN vectors (`c`, (B, 6, D)); the output layer reads the time embedding itself (kept in `context`);
- text: umT5-XXL's last hidden states, 512 tokens; the pipeline zeroes the padding and passes no mask, so the
  blocks' cross-attention reads all 512 tokens: the adapter zeroes the positions `text_mask` marks as padding and
  ignores the mask otherwise;
- positions: 3D RoPE (`WanRotaryPosEmbed`: a head's channels split t / h / w), cos and sin (1, N, 1, head_dim) per
  token: gathered with the tokens, so a kept token keeps its rotation;
- context parallelism: each process runs a box of the token grid; self-attention trades heads for tokens with the
  others (`SeamBlock.attending_over`), cross-attention reads the whole caption every process holds.
Image-to-video Wan (an image encoder's tokens beside the text) and Wan 2.2 (two experts split by noise level,
per-token timesteps) are not adapted.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch

from sprint_mm.backbone import Embedded
from sprint_mm.families.adapter import (DiffusersBackbone, SeamBlock, SpreadSelfAttention, unpatchify_channels_last,
                                        video_output)
from sprint_mm.layers import grid_coordinates
from sprint_mm.tokens import TokenPositions

WAN_480P_81_FRAMES = (21, 60, 104)  # latent (T, H, W) of 81 frames at 480 x 832 px


class WanSeam(SeamBlock):
    """A `WanTransformerBlock` on the seam: c is its (B, 6, D) adaLN input, context["text"] the projected caption."""

    def seam_forward(self, x: torch.Tensor, c: torch.Tensor, positions: TokenPositions, context: Any) -> torch.Tensor:
        with self.attending_over(positions.group, functools.partial(SpreadSelfAttention, rotate=rotate_pairs)):
            return self.diffusers_forward(x, context["text"], c, positions.rope)


def rotate_pairs(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Wan's RoPE on q or k (B, n, heads, head_dim): channels (2i, 2i + 1) turn by the angle of cos/sin (1, n, 1,
    head_dim), whose entries repeat in pairs (the arithmetic of `WanAttnProcessor`)."""
    cos, sin = rope[0][..., 0::2], rope[1][..., 1::2]
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).type_as(x)


class Wan(DiffusersBackbone):
    """Wan from a local diffusers folder (`path`: the pipeline folder or its transformer/) or a transformer `config`
    (random weights); samples of `input_size` (T, H, W) latents; captions of `text_length` umT5 tokens."""

    family = "wan"
    class_name = "WanTransformer3DModel"
    blocks_attribute = "blocks"
    seam = WanSeam
    text_dim_key = "text_dim"
    shards_sequence = True  # per-token layers, self-attention through `SpreadSelfAttention`; unembed of a box

    def __init__(self, path: Optional[str] = None, config: Optional[dict] = None,
                 input_size: Any = WAN_480P_81_FRAMES, text_length: int = 512) -> None:
        super().__init__(path, config, input_size, text_length)
        settings = self.transformer.config
        if settings.image_dim is not None or settings.added_kv_proj_dim is not None:
            raise ValueError("wan adapts text-to-video Wan; this transformer also reads an image encoder's tokens "
                             "(image_dim / added_kv_proj_dim are set: an image-to-video model)")

    @property
    def patch(self) -> tuple[int, int, int]:
        return tuple(self.transformer.config.patch_size)  # type: ignore[return-value]

    @property
    def mlp_hidden(self) -> int:
        return self.transformer.config.ffn_dim

    def embed(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> Embedded:
        grid = self.token_grid(tuple(x.shape))
        model, clip = self.transformer, self.as_clip(x)
        tokens, mask = self.caption.check(cond)
        text = tokens * mask[..., None].to(tokens.dtype)  # WanPipeline's zero padding
        cos, sin = model.rope(clip)  # (1, N, 1, head_dim) each
        h = model.patch_embedding(clip).flatten(2).transpose(1, 2).contiguous()  # (B, N, D)
        temb, timestep_proj, text, _ = model.condition_embedder(self.timestep(t), text, None)
        positions = TokenPositions(grid_coordinates(grid, device=x.device)[None], cos, sin)
        return Embedded(tokens=h, c=timestep_proj.unflatten(1, (6, -1)), positions=positions, grid=grid,
                        image=x.dim() == 4, context={"text": text, "time": temb})

    def unembed(self, tokens: torch.Tensor, embedded: Embedded) -> torch.Tensor:
        model = self.transformer
        shift, scale = (model.scale_shift_table + embedded.context["time"].unsqueeze(1)).chunk(2, dim=1)
        h = (model.norm_out(tokens.float()) * (1 + scale) + shift).type_as(tokens)
        out = unpatchify_channels_last(model.proj_out(h), embedded.grid, self.patch)  # (B, C, T, H, W)
        return video_output(out, embedded)
