"""LoRA: low-rank adapters (through peft) on a backbone's linear layers, the rest of the backbone frozen.

`build_model.lora = @LoRA()` adapts the backbone's linear layers that `LoRA.targets` names (module-name patterns,
matched against a module's name in the backbone or its end: 'attn.qkv' is every block's, 'blocks.1*.mlp.*' the MLPs
of blocks 10-19). What trains: the adapters, the backbone modules `LoRA.full` names (e.g. 'y_embedder' to learn new
classes) and the SPRINT wrapper's own tensors (the fusion; the mask token when `Sprint.learnable_mask_token`). The
rest of the backbone is frozen, and held in bf16 with `LoRA.base_dtype = 'bfloat16'` (training then needs
`Trainer.precision = 'bf16'`). B starts at zero, so an adapted model computes its base until it trains.

A LoRA model's state dict has peft's keys (`...attn.qkv.base_layer.weight`, `...attn.qkv.lora_A.default.weight`);
`adapt_keys` maps a plain checkpoint (a dense run, a SPRINT run, a merged file) onto them, `merge_adapters` folds the
adapters back into plain linear layers (`merge_lora.py`). Each checkpoint of a LoRA run also holds the EMA's adapters
as a peft folder (`AdapterFiles`: `adapter_config.json`, `adapter_model.safetensors`), loadable with
`peft.PeftModel.from_pretrained(base, checkpoint_folder)` on the model the run started from.

peft is imported when a LoRA is applied, so this module (and gin's registry of it) loads without it.
"""
from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import gin
import torch
from torch import nn

from sprint_mm.checkpoints import read_state_dict, save_state_dict
from sprint_mm.errors import check_number
from sprint_mm.sharded import full_tensor

ADAPTER_CONFIG = "adapter_config.json"  # peft's names: a checkpoint folder is a peft adapter folder
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what a PeftModel's keys start with
ADAPTER_KEY = re.compile(r"\.lora_[AB]\.")
BASE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BLOCK_PREFIX = re.compile(r"^blocks\.\d+\.")
DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def peft_module() -> Any:
    """The peft package, or one line saying how to install it."""
    try:
        import peft
    except ImportError as err:
        raise ImportError("LoRA needs peft: pip install 'sprint-mm[lora]' (or peft==0.21.2)") from err
    return peft


@gin.configurable
@dataclass(frozen=True)
class LoRA:
    """Low-rank adapters of `rank` (scaled by alpha / rank, `dropout` on their input) on the backbone's linear layers
    that `targets` names; `full`: backbone modules trained in full beside them; `base_dtype`: how the frozen rest of
    the backbone is held; `weights`: a LoRA file to start the adapters from (`load_adapter_file`)."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    full: tuple[str, ...] = ()
    base_dtype: str = "float32"
    weights: Optional[str] = None

    def __post_init__(self) -> None:
        check_number("LoRA.rank", self.rank, low=1, integer=True)
        check_number("LoRA.alpha", self.alpha, low=0)
        check_number("LoRA.dropout", self.dropout, 0, 1, below_high=True)
        for name in ("targets", "full"):
            patterns = getattr(self, name)
            if isinstance(patterns, str) or not all(isinstance(p, str) and p for p in patterns):
                raise ValueError(f"LoRA.{name} must be a list of module-name patterns, got {patterns!r}")
        if not self.targets:
            raise ValueError("LoRA.targets is empty: name the linear layers to adapt, e.g. ['attn.qkv', 'mlp.fc1']")
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"unknown LoRA.base_dtype {self.base_dtype!r}; allowed: {', '.join(BASE_DTYPES)}")

    def apply(self, model: nn.Module) -> nn.Module:
        """Adapt `model` (a backbone or a wrapper of one, reached as `model.backbone`) in place and return it."""
        backbone = model.backbone
        prefix = "" if backbone is model else next(n for n, m in model.named_modules() if m is backbone) + "."
        adapted = self.resolve(backbone)
        full = [name for pattern in self.full for name in matching(backbone, pattern, "LoRA.full", nn.Module)]
        overlap = sorted({name for name in adapted if any(name == f or name.startswith(f + ".") for f in full)})
        if overlap:
            raise ValueError(f"LoRA.full {list(self.full)} covers the adapted layers {overlap[:4]}: a layer is adapted "
                             "or trained in full, not both")
        config = self.peft_config([prefix + name for name in adapted])
        outside = [(p, p.requires_grad) for name, p in model.named_parameters() if prefix and not name.startswith(prefix)]
        peft_module().inject_adapter_in_model(config, model)  # which leaves only the adapters trainable
        for parameter, trained in outside:  # the wrapper's own tensors train as they did (the fusion does)
            parameter.requires_grad_(trained)
        for name, parameter in backbone.named_parameters():
            trained = ADAPTER_KEY.search("." + name) is not None or any(name.startswith(f + ".") for f in full)
            parameter.requires_grad_(trained)
            if not trained:
                parameter.data = parameter.data.to(BASE_DTYPES[self.base_dtype])
        if self.weights is not None:
            load_adapter_file(backbone, self.weights)
        model.lora = self
        return model

    def resolve(self, backbone: nn.Module) -> list[str]:
        """The names (in the backbone) of the linear layers to adapt; one line for a pattern that names none and for
        a rank above a layer's width."""
        names = []
        for pattern in self.targets:
            names += [name for name in matching(backbone, pattern, "LoRA.targets", nn.Linear) if name not in names]
        for name in names:
            layer = backbone.get_submodule(name)
            width = min(layer.in_features, layer.out_features)
            if self.rank > width:
                raise ValueError(f"LoRA.rank {self.rank} is above the width of {name} ({layer.in_features} -> "
                                 f"{layer.out_features}: rank at most {width}); lower LoRA.rank or leave it out of "
                                 "LoRA.targets")
        return names

    def peft_config(self, target_modules: list[str]) -> Any:
        """peft's LoraConfig of these adapters on the named modules (names in the adapted model)."""
        return peft_module().LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                                        target_modules=target_modules)


def matching(backbone: nn.Module, pattern: str, option: str, kind: type) -> list[str]:
    """Names of the backbone's modules of `kind` that `pattern` names (the whole name, or its end after a dot).
    A pattern that names no module, or only modules of another kind, is one line listing the linear layers."""
    found = [(name, module) for name, module in backbone.named_modules()
             if name and (fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern))]
    chosen = [name for name, module in found if isinstance(module, kind)]
    if chosen:
        return chosen
    if kind is nn.Linear:
        linears = sorted({BLOCK_PREFIX.sub("", n) for n, m in backbone.named_modules() if isinstance(m, nn.Linear)})
        have = f"its linear layers: {', '.join(linears)}" if linears else "it has no nn.Linear layers"
    else:
        have = f"its modules: {', '.join(name for name, _ in backbone.named_children())}"
    what = type(backbone).__name__
    if not found:
        raise ValueError(f"{option} pattern {pattern!r} names no module of {what}; {have}")
    kinds = sorted({type(module).__name__ for _, module in found})
    raise ValueError(f"{option} pattern {pattern!r} names no {kind.__name__} layer of {what}: it names "
                     f"{', '.join(kinds)} modules ({found[0][0]}, ...); LoRA adapts linear layers, {have}")


LORA_WEIGHT = re.compile(r"^(?P<layer>.+)\.lora_(?P<part>[AB])(?:\.default)?\.weight$")
FILE_PREFIXES = (PEFT_PREFIX, "backbone.")  # what keys of our adapter files start with, before the backbone's names


def load_adapter_file(backbone: nn.Module, path: str) -> None:
    """Copy the adapters of a LoRA file into the backbone's adapters (`LoRA.weights`). The file is a safetensors file
    of `<layer>.lora_A.weight` / `<layer>.lora_B.weight` (peft's keys), or a folder holding one as peft's
    adapter_model.safetensors: a checkpoint of a LoRA run here, or a diffusers LoRA of a diffusers family (whose
    `transformer.<layer>` names are the family backbone's). Its other tensors are not read; layers it does not adapt
    keep B = 0. One line for a file without adapters, adapters of layers this backbone does not adapt (a LoRA of
    another model), or of other shapes (another rank, another width)."""
    file = Path(path) / ADAPTER_WEIGHTS if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"LoRA.weights {str(path)!r} is neither a safetensors file nor a folder holding "
                                f"{ADAPTER_WEIGHTS}")
    found: dict[str, dict[str, torch.Tensor]] = {}
    state = read_state_dict(file)
    for key, tensor in state.items():
        for prefix in FILE_PREFIXES:
            key = key.removeprefix(prefix)
        match = LORA_WEIGHT.match(key)
        if match:
            found.setdefault(match["layer"], {})[match["part"]] = tensor
    if not found:
        raise ValueError(f"LoRA.weights {str(file)!r} holds no LoRA adapters (keys <layer>.lora_A.weight and "
                         f"<layer>.lora_B.weight); it holds e.g. {sorted(state)[:2]}")
    layers = adapted_layers(backbone)
    unknown = sorted(set(found) - set(layers))
    if unknown:
        raise ValueError(f"LoRA.weights {str(file)!r} is a LoRA of another model or of other layers: {len(unknown)} "
                         f"of its {len(found)} adapted layers are not adapted layers of this "
                         f"{type(backbone).__name__} (e.g. {unknown[0]}; here e.g. {min(layers)}); start from a "
                         "LoRA of this model, with LoRA.targets naming its layers")
    with torch.no_grad():
        for name, parts in found.items():
            for part, tensor in parts.items():
                target = getattr(layers[name], f"lora_{part}")["default"].weight
                if tensor.shape != target.shape:
                    rank = target.shape[0 if part == "A" else 1]
                    raise ValueError(f"LoRA.weights {str(file)!r}: {name}.lora_{part} is {tuple(tensor.shape)} there "
                                     f"and {tuple(target.shape)} here (LoRA.rank {rank}); bind the rank it was trained "
                                     "with, on the model it was trained on")
                target.copy_(tensor)


def lora_of(model: nn.Module) -> Optional[LoRA]:
    """The LoRA a model was adapted with (None: none)."""
    return getattr(model, "lora", None)


def adapter_keys(state: Iterable[str]) -> list[str]:
    """The LoRA adapter keys among `state`'s keys."""
    return [key for key in state if ADAPTER_KEY.search(key)]


def adapted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """name -> LoRA layer of every adapted linear layer of `model`."""
    layer_type = peft_module().tuners.lora.LoraLayer
    return {name: module for name, module in model.named_modules() if isinstance(module, layer_type)}


def adapt_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A plain checkpoint's tensors in the keys of `model`, which has LoRA adapters: an adapted layer's weight and
    bias go under its `base_layer`; returns them and the adapter keys the model initialises itself. A state that has
    adapters already is returned as it is."""
    if adapter_keys(state):
        return state, []
    moved = dict(state)
    for name in adapted_layers(model):
        for tensor in ("weight", "bias"):
            if f"{name}.{tensor}" in moved:
                moved[f"{name}.base_layer.{tensor}"] = moved.pop(f"{name}.{tensor}")
    return moved, adapter_keys(model.state_dict())


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its linear layer (W + alpha / rank * B A, peft's merge) and put the plain layer back
    in place: the model computes what it computed and has the keys of a model without LoRA. In place; returns it."""
    for name, layer in adapted_layers(model).items():
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    for attribute in ("lora", "peft_config"):
        if hasattr(model, attribute):
            delattr(model, attribute)
    return model


def carried_tensors(model: nn.Module) -> list[str]:
    """What a LoRA checkpoint adds to the weights the run started from: the adapters, everything else that trains,
    and the SPRINT wrapper's own tensors (new when a dense model was converted)."""
    backbone = model.backbone
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    own = set() if backbone is model else {k for k in model.state_dict() if not k.startswith("backbone.")}
    return sorted(trained | own)


class AdapterFiles:
    """A checkpoint part: the EMA's adapters and the other tensors a LoRA run adds to its starting weights, written
    as a peft adapter folder (`adapter_config.json`, `adapter_model.safetensors`) into every checkpoint. The model
    and EMA files hold them too (resume reads those); this part checks that a checkpoint was trained with the same
    adapters before it is resumed or continued in stage 2."""

    files = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)

    def __init__(self, model: nn.Module, ema: nn.Module) -> None:
        self.model, self.ema, self.lora = model, ema, lora_of(model)
        self.pending: Optional[dict[str, torch.Tensor]] = None

    def gather(self) -> None:
        """On every process, before the main one saves: the EMA's carried tensors in full (collective when the EMA is
        sharded)."""
        state = self.ema.state_dict()
        full = {key: full_tensor(state[key]) for key in carried_tensors(self.model)}
        peft = peft_module()
        adapters = peft.get_peft_model_state_dict(self.ema, state_dict=full)
        others = {key: value for key, value in full.items() if not ADAPTER_KEY.search(key)}
        self.pending = {PEFT_PREFIX + key: value for key, value in {**adapters, **others}.items()}

    def save(self, folder: Path) -> None:
        if self.pending is None:
            self.gather()
        save_state_dict(self.pending, folder / ADAPTER_WEIGHTS)
        self.pending = None
        targets = sorted(adapted_layers(self.model))
        self.lora.peft_config(targets).save_pretrained(str(folder))

    def load(self, folder: Path) -> None:
        """Resume: the model and EMA files hold the weights; refuse a checkpoint of other adapters."""
        self.check(folder)

    def start_from(self, folder: Path) -> Optional[str]:
        """Stage 2: a source trained with adapters must have had these ones (its weights load with the model's)."""
        if (folder / ADAPTER_CONFIG).is_file():
            self.check(folder)
        return None

    def check(self, folder: Path) -> None:
        """One line when the checkpoint's adapters differ from this run's in rank, alpha or adapted layers (a
        different alpha would scale them silently)."""
        saved = json.loads((folder / ADAPTER_CONFIG).read_text())
        ours = {"r": self.lora.rank, "lora_alpha": self.lora.alpha,
                "target_modules": sorted(adapted_layers(self.model))}
        differ = {key: (saved.get(key), value) for key, value in ours.items()
                  if (sorted(saved.get(key) or []) if key == "target_modules" else saved.get(key)) != value}
        if differ:
            raise ValueError(f"checkpoint {folder} was trained with other LoRA adapters than this run's "
                             f"(checkpoint, run): {differ}; bind the same LoRA.rank, LoRA.alpha and LoRA.targets")


def adapter_parts(model: nn.Module, ema: nn.Module) -> dict[str, AdapterFiles]:
    """The checkpoint parts of a LoRA model: its adapter files (none without LoRA)."""
    return {"LoRA adapters": AdapterFiles(model, ema)} if lora_of(model) is not None else {}
