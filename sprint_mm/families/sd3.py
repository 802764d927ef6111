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

Context parallelism: each process runs a box of the image tokens and holds the whole text stream; the joint attention
(`SpreadJointAttention`) attends over every image token and the text, and every process gets the same text back.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from sprint_mm.backbone import Embedded
from sprint_mm.context_parallel import attend_joint, heads_of
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
        with self.attending_over(positions.group, SpreadJointAttention):
            text, x = self.diffusers_forward(x, context, c, None)
        # the last block returns no text and nothing reads the stream after it: its input goes on, cut from the graph
        # (returned as it came, a view of another tensor would be a module output FSDP2 warns about)
        return x, context.detach() if text is None else text

    def self_attentions(self) -> dict[str, nn.Module]:
        """The joint attention and, in SD3.5's dual-attention blocks, the image-only second one."""
        return {name: module for name in ("attn", "attn2") if (module := getattr(self, name)) is not None}


class SpreadJointAttention:
    """SD3's attention (`JointAttnProcessor2_0`'s arithmetic) with the image tokens spread over the processes of
    `group`: the image tokens' q, k, v trade heads for tokens (Ulysses); the text stream, which every process holds
    whole, gives the q, k, v of this process's heads itself; attention runs over every image token and the text for
    those heads; the image output trades back, and the text output of all heads is gathered from the group (its
    adjoint sums each head's gradient over the processes that read it). Without text (SD3.5's second attention) it is
    a plain spread self-attention."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Any = None) -> Any:
        if attention_mask is not None:
            raise ValueError("SD3's spread attention takes no mask (SD3 attends to every caption token)")
        image = [self.heads(attn, project(hidden_states), norm)
                 for project, norm in ((attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k), (attn.to_v, None))]
        mine = heads_of(self.group, attn.heads)
        text = None if encoder_hidden_states is None else [
            self.heads(attn, project(encoder_hidden_states), norm)[:, mine]
            for project, norm in ((attn.add_q_proj, attn.norm_added_q), (attn.add_k_proj, attn.norm_added_k),
                                  (attn.add_v_proj, None))]
        image_out, text_out = attend_joint(image, text, self.group)
        image_out = attn.to_out[1](attn.to_out[0](self.merge(image_out)))
        if text_out is None:
            return image_out
        text_out = self.merge(text_out)
        return image_out, text_out if attn.context_pre_only else attn.to_add_out(text_out)

    @staticmethod
    def heads(attn: nn.Module, projected: torch.Tensor, norm: Optional[nn.Module]) -> torch.Tensor:
        """(B, n, h d) -> (B, h, n, d), then the per-head norm where the model has one."""
        split = projected.unflatten(2, (attn.heads, -1)).transpose(1, 2)
        return split if norm is None else norm(split)

    @staticmethod
    def merge(out: torch.Tensor) -> torch.Tensor:
        """(B, h, n, d) -> (B, n, h d)."""
        return out.transpose(1, 2).flatten(2)


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
    shards_sequence = True  # per-token layers, attention through `SpreadJointAttention`; unembed of a box

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
