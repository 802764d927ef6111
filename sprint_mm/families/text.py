"""The CLIP + T5 text encoders of the MMDiT families as one each, computed as their pipelines' `encode_prompt`.

`ClipT5Encoders` loads a pipeline folder's CLIP text models and its T5 (frozen, in one dtype) and runs them as the
pipelines do: each CLIP on the caption padded to 77 tokens, T5 on it padded to its length, without an attention mask.

SD3 (`SD3TextEncoder`, `StableDiffusion3Pipeline.encode_prompt`): CLIP-L (`text_encoder`) and CLIP-G
(`text_encoder_2`) penultimate hidden states are concatenated (768 + 1280) and zero-padded to T5's width; T5-XXL's
(`text_encoder_3`, 256 tokens) last hidden states follow: 77 + 256 tokens of 4096. The pooled vector is CLIP-L's and
CLIP-G's projected pools, concatenated (2048). A pipeline folder without T5 (SD3's documented "drop T5" mode) gives
zeros in T5's place, as the pipeline does.

Flux (`FluxTextEncoder`, `FluxPipeline.encode_prompt`): the tokens are T5-XXL's (`text_encoder_2`) last hidden states
(512 tokens for FLUX.1-dev, 256 for schnell); the pooled vector is CLIP-L's (`text_encoder`, a `CLIPTextModel`)
pooler output (768: the final state at the end-of-text token, without a projection). CLIP's token states are unused.

Every token is real for both (no mask: padding tokens are attended too), so `text_mask` is all True.
"""
from __future__ import annotations

import json
from typing import Optional

import gin
import torch
from torch import nn

from sprint_mm.dtypes import parse_dtype
from sprint_mm.pipeline_folders import PIPELINE_INDEX, is_pipeline_folder
from sprint_mm.text import FrozenTextEncoder, check_captions, config_hash, load_encoder, resolve_encoder_path


class ClipT5Encoders(FrozenTextEncoder):
    """The CLIP text models (`clip_components`, loaded as transformers' `clip_class`) and T5 (`t5_component`; absent
    from the folder only where `t5_optional`) of a pipeline folder whose pipeline class starts with `pipeline`, frozen
    in `dtype`. `identities` are their config hashes, for the subclass's cache identity."""

    def __init__(self, name: str, path: str, pipeline: str, clip_components: tuple[str, ...], clip_class: str,
                 t5_component: str, clip_length: int, t5_length: int, dtype: str, t5_optional: bool = False) -> None:
        super().__init__()
        import transformers

        folder = resolve_encoder_path(path)
        if not is_pipeline_folder(folder):
            raise FileNotFoundError(f"{name}.path {path!r} is not a diffusers pipeline folder (model_index.json with "
                                    f"{', '.join(clip_components)}, {t5_component} and their tokenizers)")
        found = json.loads((folder / PIPELINE_INDEX).read_text()).get("_class_name", "")
        if not found.startswith(pipeline):
            raise ValueError(f"{name}.path {path!r} is a {found or 'pipeline without _class_name'} folder (its "
                             f"model_index.json), not a {pipeline}* pipeline's, whose text encoders {name} runs")
        self.dtype = parse_dtype(dtype)
        clips = [load_encoder(str(folder), component, clip_length, self.dtype, getattr(transformers, clip_class))
                 for component in clip_components]
        self.clips = nn.ModuleList(model for model, *_ in clips)
        self.clip_tokenizers = [tokenizer for _, tokenizer, *_ in clips]
        self.t5, self.t5_tokenizer, self.identities = None, None, [config_hash(found) for *_, found in clips]
        if (folder / t5_component).is_dir() or not t5_optional:
            self.t5, self.t5_tokenizer, _, found = load_encoder(str(folder), t5_component, t5_length, self.dtype,
                                                                transformers.T5EncoderModel)
            self.identities.append(config_hash(found))
        self.clip_length, self.t5_length = clip_length, t5_length

    def run_clips(self, captions: list[str]) -> list:
        """Each CLIP's output (hidden states included) on the captions padded to `clip_length`."""
        outputs = []
        for model, tokenizer in zip(self.clips, self.clip_tokenizers):
            ids = tokenizer(captions, padding="max_length", max_length=self.clip_length, truncation=True,
                            return_tensors="pt").input_ids.to(self.device)
            outputs.append(model(ids, output_hidden_states=True))
        return outputs

    def run_t5(self, captions: list[str]) -> Optional[torch.Tensor]:
        """T5's last hidden states (B, t5_length, width) on the captions padded to `t5_length`, without the attention
        mask; None without T5."""
        if self.t5 is None:
            return None
        ids = self.t5_tokenizer(captions, padding="max_length", max_length=self.t5_length, truncation=True,
                                add_special_tokens=True, return_tensors="pt").input_ids.to(self.device)
        return self.t5(ids)[0]

    def condition(self, tokens: torch.Tensor, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        """The text condition: every token real."""
        return {"text_tokens": tokens.to(self.dtype),
                "text_mask": torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device),
                "pooled": pooled.to(self.dtype)}


@gin.configurable
class SD3TextEncoder(ClipT5Encoders):
    """SD3's text condition from a local pipeline folder: {"text_tokens": (B, clip_length + t5_length, T5 width),
    "text_mask": all True, "pooled": (B, CLIP-L + CLIP-G projection widths)}. Frozen, always in eval mode."""

    def __init__(self, path: str, clip_length: int = 77, t5_length: int = 256, dtype: str = "float32") -> None:
        super().__init__("SD3TextEncoder", path, "StableDiffusion3", ("text_encoder", "text_encoder_2"),
                         "CLIPTextModelWithProjection", "text_encoder_3", clip_length, t5_length, dtype,
                         t5_optional=True)
        self.width = self.t5.config.d_model if self.t5 is not None else sum(m.config.hidden_size for m in self.clips)
        self._identity = f"sd3-{'-'.join(self.identities)}-clip{clip_length}-t5{t5_length}"
        self.eval()

    @torch.no_grad()
    def forward(self, captions: list[str]) -> dict[str, torch.Tensor]:
        check_captions(captions)
        outputs = self.run_clips(captions)
        clip = torch.cat([output.hidden_states[-2] for output in outputs], dim=-1)  # (B, 77, 768 + 1280)
        t5 = self.run_t5(captions)
        if t5 is None:
            t5 = clip.new_zeros(len(captions), self.t5_length, self.width)
        tokens = torch.cat([nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1])), t5], dim=1)
        return self.condition(tokens, torch.cat([output.text_embeds for output in outputs], dim=-1))


@gin.configurable
class FluxTextEncoder(ClipT5Encoders):
    """Flux's text condition from a local pipeline folder: {"text_tokens": (B, t5_length, T5 width), "text_mask": all
    True, "pooled": (B, CLIP-L width)}. `t5_length` 512 for FLUX.1-dev, 256 for schnell. Frozen, always in eval
    mode."""

    def __init__(self, path: str, clip_length: int = 77, t5_length: int = 512, dtype: str = "float32") -> None:
        super().__init__("FluxTextEncoder", path, "Flux", ("text_encoder",), "CLIPTextModel", "text_encoder_2",
                         clip_length, t5_length, dtype)
        self.width = self.t5.config.d_model
        self._identity = f"flux-{'-'.join(self.identities)}-clip{clip_length}-t5{t5_length}"
        self.eval()

    @torch.no_grad()
    def forward(self, captions: list[str]) -> dict[str, torch.Tensor]:
        check_captions(captions)
        (clip,) = self.run_clips(captions)
        return self.condition(self.run_t5(captions), clip.pooler_output)
