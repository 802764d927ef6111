"""A diffusers transformer as a SPRINT backbone, its weights untouched.

`DiffusersBackbone` holds the diffusers model itself as `transformer` (loaded with `from_pretrained` from a local
folder and refused unless every tensor loads, or built from a config with random weights), so the backbone's state
dict is the diffusers model's under the one prefix `transformer.`, plus the null caption (`caption.`). Its blocks are
the diffusers blocks, each given the seam's call without a copy: the block's class becomes a subclass of it
(`SeamBlock` + the family's mixin) that answers `block(x, c, positions, context)` by calling the diffusers block's
own forward with the family's arguments, and still answers the diffusers call, so the diffusers model around them
runs as before. (FSDP2 swaps a module's class the same way.) A LoRA trained here therefore adapts modules with the
names diffusers gives them (`transformer.blocks.0.attn1.to_q`), and the model saves as a diffusers folder with
`transformer.save_pretrained`.

Time: these families train with rectified flow, x_t = (1 - sigma) x_0 + sigma eps, predicting eps - x_0, and take
`timestep = 1000 sigma`; sprint_mm's t is sigma and its velocity the same eps - x_0, so `t` goes in as `1000 t` and the
prediction comes out as it is.
"""
from __future__ import annotations

import functools
import math
import sys
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from sprint_mm.backbone import Backbone, Embedded
from sprint_mm.conditions import CaptionCondition
from sprint_mm.context_parallel import attend_spread
from sprint_mm.errors import check_number
from sprint_mm.flops import TransformerShape
from sprint_mm.masking import Grid
from sprint_mm.pipeline_folders import component_config, pipeline_component
from sprint_mm.tokens import TokenPositions

TIME_SCALE = 1000.0  # diffusers' timestep of a flow-matching sigma
FAMILIES: dict[str, str] = {}  # diffusers class name -> the family (registry name) that adapts it


class SeamBlock(nn.Module):
    """A diffusers block that also answers the seam's call, told apart by its `TokenPositions`: `seam_forward(x, c,
    positions, context)` (a family's mixin maps it onto the block's own arguments); any other call is the diffusers
    one."""

    returns_context = False  # the seam call returns (x, context): a block of a backbone that updates its context

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not kwargs and len(args) == 4 and isinstance(args[2], TokenPositions):
            return self.seam_forward(*args) if args[0].shape[0] else self.no_rows(*args)
        return self.diffusers_forward(*args, **kwargs)

    def no_rows(self, x: torch.Tensor, c: torch.Tensor, positions: TokenPositions, context: Any) -> Any:
        """An empty batch (every row skips SPRINT's middle), which diffusers blocks cannot reshape: the empty input
        back, with every trained parameter in the graph at weight zero, as a block run on zero rows leaves it (each
        gets a zero gradient, so DDP's static graph sees the same parameters at every step)."""
        touched = x + sum(p.reshape(-1)[:1].sum() for p in self.parameters() if p.requires_grad) * 0
        return (touched, context) if self.returns_context else touched

    def diffusers_forward(self, *args: Any, **kwargs: Any) -> Any:
        """The diffusers block's own forward (the class after this one in the method order)."""
        return super().forward(*args, **kwargs)

    def seam_forward(self, x: torch.Tensor, c: torch.Tensor, positions: TokenPositions, context: Any) -> Any:
        raise NotImplementedError

    def self_attentions(self) -> dict[str, nn.Module]:
        """The block's attentions over its own tokens, by attribute name: what context parallelism spreads."""
        return {"attn1": self.attn1}

    @contextmanager
    def attending_over(self, group: Any, processor: Callable[[Any], Any]) -> Iterator[None]:
        """While entered, the block's self-attentions attend over the sequence the processes of `group` share,
        through `processor(group)` (one written for the family's arithmetic); with no group their own processors run,
        untouched."""
        with ExitStack() as swaps:
            for attention in self.self_attentions().values() if group is not None else ():
                swaps.enter_context(processed_by(attention, processor(group)))
            yield


@contextmanager
def processed_by(attention: nn.Module, processor: Any) -> Iterator[None]:
    """While entered, the diffusers attention `attention` runs through `processor`; its own processor afterwards."""
    own = attention.processor
    attention.processor = processor
    try:
        yield
    finally:
        attention.processor = own


Rotation = Callable[[torch.Tensor, Any], torch.Tensor]  # a family's RoPE on q or k (B, n, heads, head_dim)


class SpreadSelfAttention:
    """The processor of a family's self-attention while its tokens are spread over the processes of `group`
    (context parallelism): the projections, q/k norms and rotation (`rotate`) of the family's own processor on this
    process's tokens, then attention over the whole sequence (`context_parallel.attend_spread`: Ulysses), then the
    output projection. Wan's and LTX-Video's processors compute the same on the whole sequence (no mask, no fused
    projections in their self-attention)."""

    def __init__(self, group: Any, rotate: Rotation) -> None:
        self.group, self.rotate = group, rotate

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, rotary_emb: Any = None) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or getattr(attn, "fused_projections",
                                                                                      False):
            raise ValueError("a spread self-attention takes the block's own tokens, without a mask or fused "
                             "projections")
        query, key = attn.norm_q(attn.to_q(hidden_states)), attn.norm_k(attn.to_k(hidden_states))
        query, key, value = (z.unflatten(2, (attn.heads, -1)) for z in (query, key, attn.to_v(hidden_states)))
        if rotary_emb is not None:
            query, key = self.rotate(query, rotary_emb), self.rotate(key, rotary_emb)
        out = attend_spread(query, key, value, self.group).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


@functools.cache
def seam_class(mixin: type, block_class: type) -> type:
    """The class `mixin` (a SeamBlock) + `block_class`, made once and named in the mixin's module (so it pickles)."""
    name = f"Seam{block_class.__name__}"
    made = type(name, (mixin, block_class), {"__module__": mixin.__module__, "__qualname__": name})
    setattr(sys.modules[mixin.__module__], name, made)
    return made


def load_transformer(family: str, class_name: str, path: Optional[str], config: Optional[dict]) -> nn.Module:
    """The diffusers `class_name` model of `path` (a pipeline folder or a transformer folder), every tensor loaded,
    or built from `config` with random weights; one line for a missing folder or config, a folder of another
    family, and weights that do not fill the model."""
    import diffusers

    if (path is None) == (config is None):
        raise ValueError(f"{family}: give `path` (a local diffusers folder) or `config` (the transformer config, for "
                         f"random weights), not {'both' if path is not None else 'neither'}")
    model_class = getattr(diffusers, class_name)
    if config is not None:
        return model_class.from_config(dict(config))
    folder = pipeline_component(path, "transformer", f"{family} transformer")
    found = component_config(folder, "transformer", class_name).get("_class_name")
    if found != class_name:
        other = FAMILIES.get(found)
        hint = f"; for that folder use build_model.backbone = {other!r}" if other else ""
        raise ValueError(f"{family}.path {path!r} holds a {found or 'model without _class_name'} (its "
                         f"transformer config.json), not the {class_name} that {family!r} adapts{hint}")
    model, info = model_class.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    problems = {kind: info.get(kind) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
                if info.get(kind)}
    if problems:
        raise ValueError(f"{family}.path {path!r}: the weights in {folder} do not fill {class_name} exactly: "
                         + "; ".join(f"{len(keys)} {kind.replace('_', ' ')} (e.g. {keys[0]})"
                                     for kind, keys in problems.items()))
    return model


def sample_size(family: str, value: Any, axes: tuple[int, ...]) -> tuple[int, ...]:
    """`input_size` as a tuple with one of the lengths `axes` allows, or one line."""
    size = (value,) * 2 if isinstance(value, int) else tuple(value)
    if len(size) not in axes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        shapes = " or ".join({2: "(H, W)", 3: "(T, H, W)"}[n] for n in axes)
        raise ValueError(f"{family}.input_size must be {shapes} in latent units, positive ints; got {value!r}")
    return size


def distilled_guidance(family: str, guidance: Optional[float], embeds: bool, example: float) -> Optional[float]:
    """The fixed guidance scale `guidance` of a family with a distilled-guidance embedding (FLUX.1-dev's and
    HunyuanVideo's `guidance_embeds`) when it agrees with the config (a number >= 0 with the embedding, None without
    it), else one line; `example` is the value the family's pipeline defaults to."""
    if embeds and guidance is None:
        raise ValueError(f"{family}.guidance is None, but this transformer embeds a distilled guidance scale "
                         f"(guidance_embeds): give the fixed value it reads, e.g. {family}.guidance = {example}")
    if not embeds and guidance is not None:
        raise ValueError(f"{family}.guidance = {guidance!r}, but this transformer has no guidance embedding "
                         f"(guidance_embeds false): set {family}.guidance = None")
    if guidance is not None:
        check_number(f"{family}.guidance", guidance, low=0.0)
    return guidance


class DiffusersBackbone(Backbone):
    """A diffusers transformer on the seam. A family sets `family` (its registry and gin name), `class_name`,
    `blocks_attribute` (where the model keeps its blocks), `seam` (its SeamBlock mixin), `text_dim_key` and
    `pooled_dim_key` (the config entries of its text widths), and implements `patch`, `embed` and `unembed` (and
    `mlp_hidden` and `text_cost` where its blocks differ from 4 D MLPs with cross-attention)."""

    family: str
    class_name: str
    blocks_attribute: str | tuple[str, ...]  # a tuple: the blocks of each list in turn (Flux's dual, then single)
    seam: type
    text_dim_key: str
    pooled_dim_key: Optional[str] = None
    video: bool = True  # takes (B, C, T, H, W) clips (and images as one-frame clips); else images only

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        FAMILIES[cls.class_name] = cls.family

    def __init__(self, path: Optional[str], config: Optional[dict], input_size: Any, text_length: int) -> None:
        super().__init__()
        self.input_size = sample_size(self.family, input_size, (2, 3) if self.video else (2,))
        if isinstance(text_length, bool) or not isinstance(text_length, int) or text_length < 1:
            raise ValueError(f"{self.family}.text_length must be a positive int (the caption tokens of a condition), "
                             f"got {text_length!r}")
        self.transformer = load_transformer(self.family, self.class_name, path, config)
        for block in self.blocks:
            block.__class__ = seam_class(self.seam, type(block))
        settings = self.transformer.config
        self.in_channels, self.out_channels = settings.in_channels, settings.out_channels
        self.hidden_size = settings.num_attention_heads * settings.attention_head_dim
        pooled = settings[self.pooled_dim_key] if self.pooled_dim_key else 0
        self.caption = CaptionCondition(settings[self.text_dim_key], text_length, pooled)
        self.condition = self.caption.spec

    @property
    def blocks(self) -> nn.ModuleList:
        """The diffusers model's own blocks (they answer the seam's call), of every list `blocks_attribute` names."""
        if isinstance(self.blocks_attribute, str):
            return getattr(self.transformer, self.blocks_attribute)
        return nn.ModuleList([block for name in self.blocks_attribute for block in getattr(self.transformer, name)])

    def attention_heads(self) -> dict[str, int]:
        """The self-attentions of every block (`SeamBlock.self_attentions`, which context parallelism spreads)."""
        return {f"transformer.{path}.{name}": attention.heads for path, block in self.transformer.named_modules()
                if isinstance(block, SeamBlock) for name, attention in block.self_attentions().items()}

    @property
    def patch(self) -> tuple[int, int, int]:
        """(pt, ph, pw) of the patches that become tokens."""
        raise NotImplementedError

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.in_channels, *self.input_size)

    def token_grid(self, input_shape: tuple[int, ...]) -> Grid:
        """(T, H, W) tokens of an input (B, C, H, W) or, for video families, (B, C, T, H, W); one line for another
        channel count or a size the patch does not divide."""
        allowed = "(B, C, H, W) images or (B, C, T, H, W) clips" if self.video else "(B, C, H, W) images"
        if len(input_shape) not in ((4, 5) if self.video else (4,)):
            raise ValueError(f"{self.family} takes {allowed}; got shape {tuple(input_shape)}")
        if input_shape[1] != self.in_channels:
            raise ValueError(f"{self.family} takes {self.in_channels} latent channels (from its config's in_channels); "
                             f"got shape {tuple(input_shape)}")
        size = (1, *input_shape[2:]) if len(input_shape) == 4 else tuple(input_shape[2:])
        if any(s % p for s, p in zip(size, self.patch)):
            raise ValueError(f"{self.family}'s patch {self.patch} (T, H, W) does not divide the input's (T, H, W) "
                             f"{size}")
        return tuple(s // p for s, p in zip(size, self.patch))  # type: ignore[return-value]

    # ---------------------------------------------------------------- conditions: the caption module's
    def drop_condition(self, cond: Any, drop: torch.Tensor) -> Any:
        return self.caption.drop(cond, drop)

    def set_null_text(self, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                      pooled: Optional[torch.Tensor] = None) -> None:
        self.caption.set_null_text(text_tokens, text_mask, pooled)

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The diffusers timestep of sprint_mm's t (B,): 1000 t."""
        return t * TIME_SCALE

    def as_clip(self, x: torch.Tensor) -> torch.Tensor:
        """A video family's input as a clip (B, C, T, H, W): an image is a one-frame clip."""
        return x.unsqueeze(2) if x.dim() == 4 else x

    @property
    def mlp_hidden(self) -> int:
        """The width of a block's MLP: 4 D unless the family says otherwise."""
        return 4 * self.hidden_size

    def flop_shape(self) -> TransformerShape:
        return TransformerShape(hidden=self.hidden_size, depth=(0, len(self.blocks), 0), mlp_hidden=self.mlp_hidden,
                                patch_dim=self.in_channels * math.prod(self.patch),
                                out_patch_dim=self.out_channels * math.prod(self.patch),
                                **self.text_cost(), fusion=False)

    def text_cost(self) -> dict[str, int]:
        """How the blocks read the caption, for `flop_shape`: cross-attention to its tokens projected to the width."""
        return {"context_tokens": self.condition.text_length, "context_dim": self.hidden_size}


def unpatchify_channels_last(tokens: torch.Tensor, grid: Grid, patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, N, pt * ph * pw * C) tokens whose features are (pt, ph, pw, C), over a (T, H, W) grid -> (B, C, T', H', W'):
    the diffusers families' output layout."""
    b = tokens.shape[0]
    (t, h, w), (pt, ph, pw) = grid, patch
    x = tokens.reshape(b, t, h, w, pt, ph, pw, -1)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, -1, t * pt, h * ph, w * pw)


def pack_channels_first(clip: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, N, C * pt * ph * pw): tokens in (t, h, w) raster order whose features are (C, pt, ph,
    pw), as LTXPipeline and FluxPipeline pack latents."""
    b, c, t, h, w = clip.shape
    pt, ph, pw = patch
    x = clip.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def unpack_channels_first(tokens: torch.Tensor, grid: Grid, patch: tuple[int, int, int]) -> torch.Tensor:
    """The inverse of `pack_channels_first` over a (T, H, W) token grid."""
    b = tokens.shape[0]
    (t, h, w), (pt, ph, pw) = grid, patch
    x = tokens.reshape(b, t, h, w, -1, pt, ph, pw)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, -1, t * pt, h * ph, w * pw)


def video_output(video: torch.Tensor, embedded: Embedded) -> torch.Tensor:
    """A clip back to the input's layout (an image input gets its one frame back)."""
    return video.squeeze(2) if embedded.image else video
