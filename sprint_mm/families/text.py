"""The text encoders of the MMDiT families (CLIP + T5, CLIP + Llama) as one each, computed as their pipelines'
`encode_prompt`.

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

HunyuanVideo (`HunyuanVideoTextEncoder`, `HunyuanVideoPipeline.encode_prompt`): the tokens are Llama's (`text_encoder`,
a Llama 3 8B) third hidden state from the end, of the caption inside the pipeline's prompt template, its first 95
tokens (the template's text before the caption) cropped: 256 tokens of 4096 with their attention mask (the padding is
left out of the transformer's attention; it is zeroed here, as `sprint_mm.text.TextEncoder` zeroes it, and nothing
reads it). The pooled vector is CLIP-L's (`text_encoder_2`) pooler output (768), as Flux's.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import gin
import torch
from torch import nn

from sprint_mm.dtypes import parse_dtype
from sprint_mm.pipeline_folders import PIPELINE_INDEX, is_pipeline_folder
from sprint_mm.text import (FrozenTextEncoder, TextEncoder, check_captions, config_hash, load_encoder,
                            resolve_encoder_path)

# HunyuanVideoPipeline's DEFAULT_PROMPT_TEMPLATE: the caption inside a Llama 3 chat turn, and the template's tokens
# before it (its system turn and the user header, the begin-of-text token included) that are cropped away
HUNYUAN_VIDEO_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
HUNYUAN_VIDEO_CROP = 95


def pipeline_folder(name: str, path: str, pipeline: str, components: tuple[str, ...]) -> Path:
    """The pipeline folder `path` of a pipeline whose class starts with `pipeline`, or one line (a folder that is no
    pipeline's, or another pipeline's)."""
    folder = resolve_encoder_path(path)
    if not is_pipeline_folder(folder):
        raise FileNotFoundError(f"{name}.path {path!r} is not a diffusers pipeline folder (model_index.json with "
                                f"{', '.join(components)} and their tokenizers)")
    found = json.loads((folder / PIPELINE_INDEX).read_text()).get("_class_name", "")
    if not found.startswith(pipeline):
        raise ValueError(f"{name}.path {path!r} is a {found or 'pipeline without _class_name'} folder (its "
                         f"model_index.json), not a {pipeline}* pipeline's, whose text encoders {name} runs")
    return folder


def clip_output(model: nn.Module, tokenizer, captions: list[str], length: int) -> Any:
    """A CLIP text model's output (hidden states included) on the captions padded to `length`, as the pipelines run
    CLIP (no attention mask)."""
    ids = tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                    return_tensors="pt").input_ids.to(next(model.parameters()).device)
    return model(ids, output_hidden_states=True)


class ClipT5Encoders(FrozenTextEncoder):
    """The CLIP text models (`clip_components`, loaded as transformers' `clip_class`) and T5 (`t5_component`; absent
    from the folder only where `t5_optional`) of a pipeline folder whose pipeline class starts with `pipeline`, frozen
    in `dtype`. `identities` are their config hashes, for the subclass's cache identity."""

    def __init__(self, name: str, path: str, pipeline: str, clip_components: tuple[str, ...], clip_class: str,
                 t5_component: str, clip_length: int, t5_length: int, dtype: str, t5_optional: bool = False) -> None:
        super().__init__()
        import transformers

        folder = pipeline_folder(name, path, pipeline, (*clip_components, t5_component))
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
        return [clip_output(model, tokenizer, captions, self.clip_length)
                for model, tokenizer in zip(self.clips, self.clip_tokenizers)]

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


@gin.configurable
class HunyuanVideoTextEncoder(FrozenTextEncoder):
    """HunyuanVideo's text condition from a local pipeline folder: {"text_tokens": (B, max_length, Llama width),
    "text_mask": (B, max_length) the real tokens, "pooled": (B, CLIP-L width)}. Llama's states (`layer`, the pipeline's
    third from the end) of the caption in `template`, its first `crop_start` tokens cropped (`TextEncoder` with a
    template); CLIP-L's pooler output on the caption padded to `clip_length`. Frozen, always in eval mode."""

    def __init__(self, path: str, max_length: int = 256, clip_length: int = 77, dtype: str = "float32",
                 template: str = HUNYUAN_VIDEO_TEMPLATE, crop_start: int = HUNYUAN_VIDEO_CROP,
                 layer: str = "-3") -> None:
        super().__init__()
        import transformers

        name = "HunyuanVideoTextEncoder"
        folder = str(pipeline_folder(name, path, "HunyuanVideoPipeline", ("text_encoder", "text_encoder_2")))
        self.llama = TextEncoder(folder, max_length, dtype, layer=layer, template=template, crop_start=crop_start)
        self.dtype, self.max_length, self.clip_length = self.llama.dtype, max_length, clip_length
        self.clip, self.clip_tokenizer, _, found = load_encoder(folder, "text_encoder_2", clip_length, self.dtype,
                                                                transformers.CLIPTextModel)
        self._identity = f"hunyuan_video-{self.llama.identity}-{config_hash(found)}-clip{clip_length}"
        self.eval()

    def token_counts(self, captions: list[str]) -> list[int]:
        """Llama's tokens of each caption after the template's crop, before the cut at `max_length`."""
        return self.llama.token_counts(captions)

    @torch.no_grad()
    def forward(self, captions: list[str]) -> dict[str, torch.Tensor]:
        condition = self.llama(captions)
        pooled = clip_output(self.clip, self.clip_tokenizer, captions, self.clip_length).pooler_output
        return dict(condition, pooled=pooled.to(self.dtype))
