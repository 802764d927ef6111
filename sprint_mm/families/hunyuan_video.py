"""HunyuanVideo text-to-video (diffusers `HunyuanVideoTransformer3DModel`) as a SPRINT backbone.

HunyuanVideo's conventions, as its diffusers model and `HunyuanVideoPipeline` have them:
- input (B, 16, T, H, W) latents of its VAE (`AutoencoderKLHunyuanVideo`: 4x temporal, 8x spatial, latents scaled by
  0.476986, no shift; images are one-frame clips), patch 1x2x2 by a Conv3d (`x_embedder`), tokens in (t, h, w) raster
  order; `proj_out`'s features of a token are laid out (C, pt, ph, pw), unpacked to (B, 16, T, H, W);
- time: the pipeline passes the scheduler's timestep, `1000 sigma` in float32 (= sprint_mm's `1000 t`), to the
  condition embedding and to the token refiner alike;
- guidance (the released model is guidance-distilled, `guidance_embeds`): the pipeline passes `guidance_scale * 1000`
  (6.0 by default) in the transformer's dtype, embedded beside the time; here it is the fixed option `guidance`, the
  same for every row, conditional or not (as Flux's: CFG or PDG on top of it is a choice of the sampler);
- caption vector: CLIP-L's pooled output (768) through `time_text_embed` with the time (and guidance): the adaLN
  vector `c` of every block and of `norm_out`;
- text: Llama's hidden states (3rd from last, after the prompt template's crop: 256 tokens of 4096;
  `sprint_mm.families.text.HunyuanVideoTextEncoder`) with their attention mask, through the token refiner
  (`context_embedder`, which reads the time and the mask) into the text stream;
- the joint attention runs over [video; text] and leaves out the padding: diffusers attends the first `sum(mask)`
  text tokens of each row (its mask is a prefix: the tokenizer pads on the right). The adapter keeps those keys per
  row (`context["keys"]`) and builds the mask of [video tokens; text] for whichever video tokens a block runs on, so
  it stays right when SPRINT's middle runs on the kept tokens;
- positions: 3D RoPE over (frames, height, width) (`rope`, interleaved pairs, computed in float32) on the video
  tokens only: its rows are the tokens' positions (`TokenPositions`, gathered with them: a kept token keeps its
  rotation); text tokens carry none.

Every block (20 dual-stream, then 40 single-stream in the 13B model) returns both streams updated, so the backbone
`updates_context` as SD3's and Flux's. A block on the seam runs through `VideoTextAttention`: the diffusers
processor's arithmetic with a rotary table per row (kept tokens differ by row) and the text keys of each row, which
also spreads the video tokens over a process group (context parallelism, as Flux's). Image-to-video HunyuanVideo
(`image_condition_type`) is not adapted.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from sprint_mm.backbone import Embedded
from sprint_mm.context_parallel import attend_joint, heads_of
from sprint_mm.families.adapter import (DiffusersBackbone, SeamBlock, distilled_guidance, processed_by,
                                        unpack_channels_first, video_output)
from sprint_mm.families.flux import JointRotaryAttention, own_tensor
from sprint_mm.layers import grid_coordinates
from sprint_mm.tokens import TokenPositions

HUNYUAN_720P_129_FRAMES = (33, 90, 160)  # latent (T, H, W) of 129 frames at 720 x 1280 px
HUNYUAN_TEXT_TOKENS = 256  # Llama tokens after the template's crop (the pipeline's max_sequence_length)
GUIDANCE_SCALE = 1000.0  # the pipeline multiplies its guidance scale by this before the model embeds it
PIPELINE_GUIDANCE = 6.0  # HunyuanVideoPipeline's default guidance_scale


class HunyuanVideoSeam(SeamBlock):
    """A `HunyuanVideoTransformerBlock` or `HunyuanVideoSingleTransformerBlock` on the seam: context is {"text": the
    text stream (B, L, D), "keys": (B, L) bool, the text tokens attended}; it returns (video tokens, the context with
    the updated text stream)."""

    returns_context = True

    def seam_forward(self, x: torch.Tensor, c: torch.Tensor, positions: TokenPositions,
                     context: dict) -> tuple[torch.Tensor, dict]:
        with processed_by(self.attn, VideoTextAttention(positions.group, context["keys"])):
            x, text = self.diffusers_forward(x, context["text"], c, None, positions.rope)
        # a single-stream block returns both streams as views of its joint sequence: tensors of their own
        return own_tensor(x), dict(context, text=own_tensor(text))

    def self_attentions(self) -> dict[str, nn.Module]:
        return {"attn": self.attn}


class VideoTextAttention:
    """HunyuanVideo's attention (`HunyuanVideoAttnProcessor2_0`'s arithmetic: projections, per-head RMS norms, RoPE on
    the video tokens in float32, attention over [video; text] with the padding of the text left out, output
    projections where the block has them) with a rotary table (cos, sin) of shape (1 or B, n, head_dim), one per row,
    and the text keys (B, L) of each row. A dual-stream block projects the text with its own layers (`add_q_proj`...)
    and both outputs (`to_out`, `to_add_out`); a single-stream block projects both with the same layers and returns
    the attention outputs as they are. With a `group`, the video tokens are spread over its processes (as Flux's
    `JointRotaryAttention`: Ulysses for the video tokens, this process's heads of the whole text)."""

    def __init__(self, group: Any, text_keys: torch.Tensor) -> None:
        self.group, self.text_keys = group, text_keys

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: Any = None, image_rotary_emb: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None or getattr(attn, "fused_projections", False):
            raise ValueError("hunyuan_video's seam attention takes the text keys of its context, no mask, and no "
                             "fused projections (unfuse_qkv_projections)")
        own = (attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        added = own if attn.add_q_proj is None else (
            attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.norm_added_q, attn.norm_added_k)
        video = JointRotaryAttention.heads(attn, hidden_states, own, image_rotary_emb)
        text = JointRotaryAttention.heads(attn, encoder_hidden_states, added, None, heads_of(self.group, attn.heads))
        video_out, text_out = attend_joint(video, text, self.group, text_keys=self.text_keys)
        video_out, text_out = (z.transpose(1, 2).flatten(2).to(video[0].dtype) for z in (video_out, text_out))
        if attn.to_out is not None:
            video_out = attn.to_out[1](attn.to_out[0](video_out))
        return video_out, text_out if attn.to_add_out is None else attn.to_add_out(text_out)


class HunyuanVideo(DiffusersBackbone):
    """HunyuanVideo from a local diffusers folder (`path`) or a transformer `config` (random weights); samples of
    `input_size` (T, H, W) latents; captions of `text_length` Llama tokens with their mask and CLIP's pooled vector;
    `guidance` the fixed distilled-guidance scale a model with `guidance_embeds` reads (None without it)."""

    family = "hunyuan_video"
    class_name = "HunyuanVideoTransformer3DModel"
    blocks_attribute = ("transformer_blocks", "single_transformer_blocks")
    seam = HunyuanVideoSeam
    text_dim_key = "text_embed_dim"
    pooled_dim_key = "pooled_projection_dim"
    updates_context = True
    shards_sequence = True  # per-token layers, attention through `VideoTextAttention` over a group; unembed of a box

    def __init__(self, path: Optional[str] = None, config: Optional[dict] = None,
                 input_size: Any = HUNYUAN_720P_129_FRAMES, text_length: int = HUNYUAN_TEXT_TOKENS,
                 guidance: Optional[float] = PIPELINE_GUIDANCE) -> None:
        super().__init__(path, config, input_size, text_length)
        settings = self.transformer.config
        if settings.image_condition_type is not None:
            raise ValueError(f"hunyuan_video adapts text-to-video HunyuanVideo; this transformer is an image-to-video "
                             f"one (image_condition_type {settings.image_condition_type!r})")
        self.guidance = distilled_guidance(self.family, guidance, settings.guidance_embeds, example=PIPELINE_GUIDANCE)

    @property
    def patch(self) -> tuple[int, int, int]:
        settings = self.transformer.config
        return settings.patch_size_t, settings.patch_size, settings.patch_size

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.transformer.config.mlp_ratio)

    def text_cost(self) -> dict[str, int]:
        return {"joint_tokens": self.condition.text_length}

    def conditioning(self, timestep: torch.Tensor, pooled: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The adaLN vector (B, D): the time, the guidance scale (times 1000 in `dtype`, as the pipeline passes it)
        and the pooled CLIP vector."""
        guidance = None
        if self.guidance is not None:
            guidance = torch.full(timestep.shape, self.guidance, dtype=dtype, device=timestep.device) * GUIDANCE_SCALE
        return self.transformer.time_text_embed(timestep, pooled, guidance)[0]

    def embed(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> Embedded:
        grid = self.token_grid(tuple(x.shape))
        model, clip = self.transformer, self.as_clip(x)
        tokens, mask = self.caption.check(cond)
        timestep = self.timestep(t)
        h = model.x_embedder(clip)  # (B, N, D)
        cos, sin = model.rope(clip)  # (N, head_dim) each
        positions = TokenPositions(grid_coordinates(grid, device=x.device)[None], cos[None], sin[None])
        # the first sum(mask) text tokens of each row, as the diffusers model builds its attention mask
        keys = torch.arange(tokens.shape[1], device=x.device)[None] < mask.sum(dim=1, keepdim=True)
        context = {"text": model.context_embedder(tokens, timestep, mask), "keys": keys}
        return Embedded(tokens=h, c=self.conditioning(timestep, cond["pooled"], h.dtype), positions=positions,
                        grid=grid, image=x.dim() == 4, context=context)

    def unembed(self, tokens: torch.Tensor, embedded: Embedded) -> torch.Tensor:
        model = self.transformer
        out = model.proj_out(model.norm_out(tokens, embedded.c))  # (B, N, C * pt * ph * pw)
        return video_output(unpack_channels_first(out, embedded.grid, self.patch), embedded)
