"""Stable Diffusion 3 / 3.5 (diffusers `SD3Transformer2DModel`, MMDiT) as a SPRINT backbone.

SD3's conventions, as its diffusers model and `StableDiffusion3Pipeline` have them:
- input (B, 16, H, W) latents of the SD3 VAE (8x, `(z - shift_factor) * scaling_factor`), patch 2 by `pos_embed`,
  which also adds the sin-cos position table cropped around the centre (so positions ride in the tokens: a kept
  token keeps its position); output (B, 16, H, W), a token's features laid out (ph, pw, C);
- time and caption vector: `timestep = 1000 t` and the pooled CLIP-L + CLIP-G vector (2048) through
  `time_text_embed`: the adaLN vector `c` of every block;
- text: CLIP-L and CLIP-G penultimate states (77 tokens, 768 + 1280 wide, zero-padded to 4096) followed by T5-XXL's
  (256 tokens): 333 tokens of 4096 (`sprint_mm.families.text.SD3TextEncoder`); no mask: every token is attended.
  `context_embedder` projects them into the text stream.

The text stream is MMDiT's second stream: every block attends over image and text tokens together and updates both,
so the backbone `updates_context`. Under SPRINT it is a per-sample state, never dropped as tokens: the encoder
updates it for every sample; the middle updates it, attending to the kept image tokens only, for the samples that run
the middle; a sample that skips the middle (path drop, PDG's weak half) carries the encoder's text stream into the
decoder. The fusion mixes image tokens only. The last block updates no text (`context_pre_only`).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from sprint_mm.backbone import Embedded
from sprint_mm.families.adapter import DiffusersBackbone, SeamBlock, unpatchify_channels_last
from sprint_mm.layers import grid_coordinates
from sprint_mm.masking import Grid
from sprint_mm.tokens import TokenPositions

SD3_1024PX = (128, 128)  # latent (H, W) of a 1024 px image
SD3_TEXT_TOKENS = 77 + 256  # CLIP's 77, then T5's 256


class SD3Seam(SeamBlock):
    """A `JointTransformerBlock` on the seam: it returns (image tokens, text stream)."""

    returns_context = True

    def seam_forward(self, x: torch.Tensor, c: torch.Tensor, positions: TokenPositions,
                     context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        text, x = self.diffusers_forward(x, context, c, None)
        return x, context if text is None else text  # the last block returns no text: nothing reads it after


class SD3(DiffusersBackbone):
    """SD3 from a local diffusers folder (`path`) or a transformer `config` (random weights); samples of `input_size`
    (H, W) latents; captions of `text_length` tokens (77 CLIP + 256 T5) and the pooled vector."""

    family = "sd3"
    class_name = "SD3Transformer2DModel"
    blocks_attribute = "transformer_blocks"
    seam = SD3Seam
    text_dim_key = "joint_attention_dim"
    pooled_dim_key = "pooled_projection_dim"
    video = False
    updates_context = True

    def __init__(self, path: Optional[str] = None, config: Optional[dict] = None, input_size: Any = SD3_1024PX,
                 text_length: int = SD3_TEXT_TOKENS) -> None:
        super().__init__(path, config, input_size, text_length)

    @property
    def patch(self) -> tuple[int, int, int]:
        return 1, self.transformer.config.patch_size, self.transformer.config.patch_size

    def token_grid(self, input_shape: tuple[int, ...]) -> Grid:
        grid = super().token_grid(input_shape)
        largest = self.transformer.config.pos_embed_max_size
        if max(grid[1:]) > largest:
            raise ValueError(f"sd3's position table covers {largest} x {largest} patches (pos_embed_max_size); an "
                             f"input of shape {tuple(input_shape)} has {grid[1]} x {grid[2]}")
        return grid

    def text_cost(self) -> dict[str, int]:
        return {"joint_tokens": self.condition.text_length}

    def embed(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> Embedded:
        grid = self.token_grid(tuple(x.shape))
        model = self.transformer
        tokens, _ = self.caption.check(cond)  # SD3 attends to every caption token: no mask
        h = model.pos_embed(x).contiguous()  # (B, N, D), positions added
        c = model.time_text_embed(self.timestep(t), cond["pooled"])  # (B, D)
        positions = TokenPositions(grid_coordinates(grid, device=x.device)[None])
        return Embedded(tokens=h, c=c, positions=positions, grid=grid, image=True,
                        context=model.context_embedder(tokens))

    def unembed(self, tokens: torch.Tensor, embedded: Embedded) -> torch.Tensor:
        model = self.transformer
        out = model.proj_out(model.norm_out(tokens, embedded.c))  # (B, N, ph * pw * C)
        return unpatchify_channels_last(out, embedded.grid, self.patch).squeeze(2)
