"""SD3's three text encoders as one, computed as `StableDiffusion3Pipeline.encode_prompt` computes them.

CLIP-L (`text_encoder`) and CLIP-G (`text_encoder_2`) read the caption padded to 77 tokens; their penultimate hidden
states are concatenated (768 + 1280) and zero-padded to T5's width; T5-XXL (`text_encoder_3`) reads it padded to 256
tokens, without an attention mask (as the pipeline runs it), and its last hidden states follow: 77 + 256 tokens of
4096. The pooled vector is CLIP-L's and CLIP-G's projected pools, concatenated (2048). Every token is real for SD3
(no mask: padding tokens are attended too), so `text_mask` is all True. A pipeline folder without T5 (SD3's
documented "drop T5" mode) gives zeros in T5's place, as the pipeline does.
"""
from __future__ import annotations

import gin
import torch
from torch import nn

from sprint_mm.dtypes import parse_dtype
from sprint_mm.pipeline_folders import is_pipeline_folder
from sprint_mm.text import FrozenTextEncoder, check_captions, config_hash, load_encoder, resolve_encoder_path

CLIP_COMPONENTS = ("text_encoder", "text_encoder_2")
T5_COMPONENT = "text_encoder_3"


@gin.configurable
class SD3TextEncoder(FrozenTextEncoder):
    """SD3's text condition from a local pipeline folder: {"text_tokens": (B, clip_length + t5_length, T5 width),
    "text_mask": all True, "pooled": (B, CLIP-L + CLIP-G projection widths)}. Frozen, always in eval mode."""

    def __init__(self, path: str, clip_length: int = 77, t5_length: int = 256, dtype: str = "float32") -> None:
        super().__init__()
        import transformers

        folder = resolve_encoder_path(path)
        if not is_pipeline_folder(folder):
            raise FileNotFoundError(f"SD3TextEncoder.path {path!r} is not a diffusers pipeline folder "
                                    f"(model_index.json with {', '.join(CLIP_COMPONENTS)}, {T5_COMPONENT} and their "
                                    "tokenizers)")
        self.dtype = parse_dtype(dtype)
        clips = [load_encoder(str(folder), name, clip_length, self.dtype, transformers.CLIPTextModelWithProjection)
                 for name in CLIP_COMPONENTS]
        self.clips = nn.ModuleList(model for model, *_ in clips)
        self.clip_tokenizers = [tokenizer for _, tokenizer, *_ in clips]
        self.t5, self.t5_tokenizer, identities = None, None, [config_hash(found) for *_, found in clips]
        if (folder / T5_COMPONENT).is_dir():
            self.t5, self.t5_tokenizer, _, found = load_encoder(str(folder), T5_COMPONENT, t5_length, self.dtype,
                                                                transformers.T5EncoderModel)
            identities.append(config_hash(found))
        self.clip_length, self.t5_length = clip_length, t5_length
        self.width = self.t5.config.d_model if self.t5 is not None else sum(m.config.hidden_size for m in self.clips)
        self._identity = f"sd3-{'-'.join(identities)}-clip{clip_length}-t5{t5_length}"
        self.eval()

    @torch.no_grad()
    def forward(self, captions: list[str]) -> dict[str, torch.Tensor]:
        check_captions(captions)
        states, pools = [], []
        for model, tokenizer in zip(self.clips, self.clip_tokenizers):
            ids = tokenizer(captions, padding="max_length", max_length=self.clip_length, truncation=True,
                            return_tensors="pt").input_ids.to(self.device)
            output = model(ids, output_hidden_states=True)
            states.append(output.hidden_states[-2])
            pools.append(output.text_embeds)
        clip = torch.cat(states, dim=-1)  # (B, 77, 768 + 1280)
        if self.t5 is None:
            t5 = clip.new_zeros(len(captions), self.t5_length, self.width)
        else:
            ids = self.t5_tokenizer(captions, padding="max_length", max_length=self.t5_length, truncation=True,
                                    add_special_tokens=True, return_tensors="pt").input_ids.to(self.device)
            t5 = self.t5(ids)[0]
        tokens = torch.cat([nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1])), t5], dim=1)
        return {"text_tokens": tokens.to(self.dtype), "text_mask": torch.ones(tokens.shape[:2], dtype=torch.bool,
                                                                               device=tokens.device),
                "pooled": torch.cat(pools, dim=-1).to(self.dtype)}
