"""FLUX.1 dev and schnell (diffusers `FluxTransformer2DModel`) as a SPRINT backbone.

Flux's conventions, as its diffusers model and `FluxPipeline` have them:
- input (B, 16, H, W) latents of the Flux VAE (8x, `(z - shift_factor) * scaling_factor`), packed as the pipeline's
  `_pack_latents` packs them: 2x2 patches in raster order, features (C, 2, 2) = the transformer's `in_channels` (64),
  through `x_embedder`; the output of `proj_out` is unpacked the same way to (B, 16, H, W);
- time: FluxPipeline passes `timestep / 1000` (= sprint_mm's t, the flow-matching sigma) and the model multiplies it
  by 1000 after casting it to the tokens' dtype: the backbone computes the same, `t.to(dtype) * 1000`;
- guidance (FLUX.1-dev, `guidance_embeds`): the pipeline passes the guidance scale, which the model also multiplies by
  1000 and embeds beside the time; here it is the fixed option `guidance` (3.5 as the pipeline's default), the same
  for every row, conditional or not; schnell (no guidance embedding) takes None;
- caption vector: CLIP-L's pooled output (768) through `time_text_embed`: the adaLN vector `c` of every block;
- text: T5-XXL's last hidden states (512 tokens for dev, 256 for schnell; `sprint_mm.families.text.FluxTextEncoder`),
  no mask (every token is attended), through `context_embedder` into the text stream;
- positions: RoPE over ids (t, row, column): the pipeline's text ids are zeros, its image ids (0, row, column) of the
  packed grid, and `pos_embed` turns [text ids; image ids] into one table. The image rows are the tokens' positions
  (`TokenPositions`, gathered with them: a kept token keeps its rotation); the text rows ride with the text stream.
  Each block rotates [text; its image tokens] by [text rows; their rows].

Every block (19 dual-stream, then 38 single-stream in FLUX.1) attends over text and image tokens together and returns
both streams updated (diffusers 0.42: `(text, image)` from either kind), so the backbone `updates_context` as SD3's:
the text stream is never dropped, the middle updates it from the kept image tokens for the rows that run the middle,
and a row that skips the middle carries the encoder's text stream into the decoder.

A block on the seam swaps its attention's processor for `JointRotaryAttention` while it runs: `FluxAttnProcessor`'s
arithmetic with a rotary table per row (kept tokens differ by row; diffusers' processor takes one table for the
batch), which also spreads the image tokens over a process group (context parallelism, as SD3's
`SpreadJointAttention`: each process runs a box of the image tokens and holds the whole text stream).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from sprint_mm.backbone import Embedded
from sprint_mm.context_parallel import attend_joint, heads_of
from sprint_mm.families.adapter import (DiffusersBackbone, SeamBlock, distilled_guidance, pack_channels_first,
                                        processed_by, unpack_channels_first)
from sprint_mm.layers import apply_rope, grid_coordinates
from sprint_mm.tokens import TokenPositions

FLUX_1024PX = (128, 128)  # latent (H, W) of a 1024 px image
FLUX_DEV_TEXT_TOKENS = 512  # T5 tokens of FLUX.1-dev (schnell: 256)
PACK = (1, 2, 2)  # FluxPipeline's 2x2 packing of the latents into tokens
GUIDANCE_SCALE = 1000.0  # the model multiplies the pipeline's guidance scale by this before embedding it


class FluxSeam(SeamBlock):
    """A `FluxTransformerBlock` or `FluxSingleTransformerBlock` on the seam: context is {"text": the text stream
    (B, L, D), "cos"/"sin": its rotary rows (B, L, head_dim)}; it returns (image tokens, the context with the updated
    text stream)."""

    returns_context = True

    def seam_forward(self, x: torch.Tensor, c: torch.Tensor, positions: TokenPositions,
                     context: dict) -> tuple[torch.Tensor, dict]:
        rows, length = context["text"].shape[:2]
        rope = tuple(torch.cat([text, image.expand(rows, -1, -1)], dim=1)
                     for text, image in ((context["cos"], positions.cos), (context["sin"], positions.sin)))
        with processed_by(self.attn, JointRotaryAttention(positions.group, length)):
            text, x = self.diffusers_forward(x, context["text"], c, rope)
        # a single-stream block returns both streams as views of its joint sequence: tensors of their own, as block
        # outputs that FSDP2 hooks must be (it warns of views)
        return own_tensor(x), dict(context, text=own_tensor(text))

    def self_attentions(self) -> dict[str, nn.Module]:
        return {"attn": self.attn}


def own_tensor(x: torch.Tensor) -> torch.Tensor:
    """`x`, copied when it is a view of another tensor."""
    return x.clone() if x._base is not None else x


class JointRotaryAttention:
    """Flux's attention (`FluxAttnProcessor`'s arithmetic: projections, per-head RMS norms, [text; image] as one
    sequence, RoPE with interleaved pairs computed in float32, attention, output projections) with a rotary table
    (cos, sin) of shape (1 or B, L + n, head_dim), one per row, whose first `text_length` rows are the text's. A
    dual-stream block gives the text as `encoder_hidden_states` (its own projections); a single-stream block gives
    [text; image] as one sequence (the same projections for both) and gets the joint output back.

    With a `group`, the image tokens are spread over its processes (context parallelism): their q, k, v trade heads
    for tokens (Ulysses); the text, which every process holds whole, gives the q, k, v of this process's heads itself;
    attention runs over every image token and the text for those heads; the image output trades back, and the text
    output of all heads is gathered from the group (its adjoint sums each head's gradient over the processes that
    read it), so every process gets the same text back."""

    def __init__(self, group: Any, text_length: int) -> None:
        self.group, self.text_length = group, text_length

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None, attention_mask: Any = None,
                 image_rotary_emb: Any = None) -> Any:
        if attention_mask is not None or getattr(attn, "fused_projections", False):
            raise ValueError("flux's seam attention takes no mask and no fused projections (unfuse_qkv_projections)")
        length, (cos, sin) = self.text_length, image_rotary_emb
        own = (attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        if encoder_hidden_states is None:  # single-stream: [text; image], one set of projections
            text_states, image_states, added = hidden_states[:, :length], hidden_states[:, length:], own
        else:
            text_states, image_states = encoder_hidden_states, hidden_states
            added = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.norm_added_q, attn.norm_added_k)
        image = self.heads(attn, image_states, own, (cos[:, length:], sin[:, length:]))
        mine = heads_of(self.group, attn.heads)
        text = self.heads(attn, text_states, added, (cos[:, :length], sin[:, :length]), mine)
        image_out, text_out = attend_joint(image, text, self.group, text_first=True)
        text_out, image_out = (z.transpose(1, 2).flatten(2).to(image[0].dtype) for z in (text_out, image_out))
        if encoder_hidden_states is None:
            return torch.cat([text_out, image_out], dim=1)
        return attn.to_out[1](attn.to_out[0](image_out)), attn.to_add_out(text_out)

    @staticmethod
    def heads(attn: nn.Module, states: torch.Tensor, layers: tuple[nn.Module, ...],
              rope: Optional[tuple[torch.Tensor, ...]], chosen: slice = slice(None)) -> list[torch.Tensor]:
        """q, k, v (B, heads, n, head_dim) of `states` through the projections and q/k norms `layers`, q and k rotated
        in float32 by `rope` (cos, sin (1 or B, n, head_dim); None: not rotated); only the heads `chosen`."""
        to_q, to_k, to_v, norm_q, norm_k = layers
        q, k, v = (project(states).unflatten(-1, (attn.heads, -1)) for project in (to_q, to_k, to_v))
        q, k, v = (z.transpose(1, 2)[:, chosen] for z in (norm_q(q), norm_k(k), v))
        if rope is None:
            return [q, k, v]
        return [apply_rope(q.float(), rope).to(q.dtype), apply_rope(k.float(), rope).to(k.dtype), v]


class Flux(DiffusersBackbone):
    """FLUX.1 from a local diffusers folder (`path`) or a transformer `config` (random weights); samples of
    `input_size` (H, W) latents; captions of `text_length` T5 tokens and CLIP's pooled vector; `guidance` the fixed
    distilled-guidance value a model with `guidance_embeds` (FLUX.1-dev) reads (None for schnell)."""

    family = "flux"
    class_name = "FluxTransformer2DModel"
    blocks_attribute = ("transformer_blocks", "single_transformer_blocks")
    seam = FluxSeam
    text_dim_key = "joint_attention_dim"
    pooled_dim_key = "pooled_projection_dim"
    video = False
    updates_context = True
    shards_sequence = True  # per-token layers, attention through `JointRotaryAttention` over a group; unembed of a box

    def __init__(self, path: Optional[str] = None, config: Optional[dict] = None, input_size: Any = FLUX_1024PX,
                 text_length: int = FLUX_DEV_TEXT_TOKENS, guidance: Optional[float] = None) -> None:
        super().__init__(path, config, input_size, text_length)
        settings, packed = self.transformer.config, self.transformer.config.in_channels
        if settings.patch_size != 1 or packed % 4 or self.transformer.out_channels % 4:
            raise ValueError(f"flux adapts transformers of 2x2-packed latents (patch_size 1, in_channels and "
                             f"out_channels multiples of 4); this config has patch_size {settings.patch_size}, "
                             f"in_channels {packed}, out_channels {self.transformer.out_channels}")
        self.in_channels, self.out_channels = packed // 4, self.transformer.out_channels // 4
        self.guidance = distilled_guidance(self.family, guidance, settings.guidance_embeds, example=3.5)

    @property
    def patch(self) -> tuple[int, int, int]:
        return PACK

    def text_cost(self) -> dict[str, int]:
        return {"joint_tokens": self.condition.text_length}

    def conditioning(self, t: torch.Tensor, pooled: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The adaLN vector (B, D): time (and the guidance scale), scaled by 1000 in `dtype` as the model scales the
        pipeline's inputs, and the pooled CLIP vector."""
        embed = self.transformer.time_text_embed
        timestep = self.timestep(t.to(dtype))
        if self.guidance is None:
            return embed(timestep, pooled)
        guidance = torch.full(t.shape, self.guidance, device=t.device).to(dtype) * GUIDANCE_SCALE  # as FluxPipeline's
        return embed(timestep, guidance, pooled)

    def embed(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> Embedded:
        grid = self.token_grid(tuple(x.shape))
        model, rows = self.transformer, x.shape[0]
        tokens, _ = self.caption.check(cond)  # Flux attends to every caption token: no mask
        h = model.x_embedder(pack_channels_first(self.as_clip(x), PACK))  # (B, N, D)
        coords = grid_coordinates(grid, device=x.device)  # (N, 3): (0, row, column), FluxPipeline's image ids
        length = tokens.shape[1]
        cos, sin = model.pos_embed(torch.cat([coords.new_zeros(length, 3), coords]))  # (L + N, head_dim) each
        positions = TokenPositions(coords[None], cos[None, length:], sin[None, length:])
        context = {"text": model.context_embedder(tokens), "cos": cos[None, :length].expand(rows, -1, -1),
                   "sin": sin[None, :length].expand(rows, -1, -1)}
        return Embedded(tokens=h, c=self.conditioning(t, cond["pooled"], h.dtype), positions=positions, grid=grid,
                        image=True, context=context)

    def unembed(self, tokens: torch.Tensor, embedded: Embedded) -> torch.Tensor:
        model = self.transformer
        out = model.proj_out(model.norm_out(tokens, embedded.c))  # (B, N, C * 2 * 2)
        return unpack_channels_first(out, embedded.grid, PACK).squeeze(2)
