"""Where a run starts from another model's weights (`Trainer.init_from`): a checkpoint's tensors in this model's keys,
and the tensors this model initialises itself because the source has none.

- A SPRINT model from a dense source (a dense run of ours, whose keys are the backbone's own, or an official SiT/REPA
  checkpoint converted with `convert_checkpoint.py --from sit|repa --to ours`): every backbone tensor from the source,
  the wrapper's fusion and mask token new. With `Sprint.fusion_init = 'identity'` the result computes exactly the dense
  model while no token is dropped.
- A LoRA model from a plain source (dense, SPRINT, or a merged LoRA run): the adapted layers' weights under their
  `base_layer`, the adapters new (B = 0: the adapted model computes its base).
- A source with adapters (a LoRA stage 1) goes into a model with the same adapters; into one without them it must be
  merged first (`merge_lora.py`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from sprint_mm.checkpoints import check_depth_split, stack_depths, upgrade_keys, wrapper_keys
from sprint_mm.lora import adapt_keys, adapter_keys, lora_of
from sprint_mm.sharded import full_tensor
from sprint_mm.sprint import Sprint

BACKBONE = "backbone."


def starting_state(model: nn.Module, state: dict[str, torch.Tensor], source: str
                   ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`state` in `model`'s keys and the keys of `model` the source does not have (to keep as initialised)."""
    fresh: list[str] = []
    if isinstance(model, Sprint) and not any(key in state for key in wrapper_keys(model)):
        state = dense_into_sprint(model, state, source)
        fresh += wrapper_keys(model)
    state = upgrade_keys(model, state)
    if lora_of(model) is not None:
        state, new = adapt_keys(model, state)
        fresh += new
    elif adapter_keys(state):
        raise ValueError(f"{source} holds LoRA adapters but this model has none: bind the run's build_model.lora, or "
                         "merge them first (python merge_lora.py RUN --out FILE) and start from FILE")
    return state, fresh


def dense_into_sprint(model: Sprint, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A dense checkpoint's tensors under the SPRINT model's `backbone.` keys, after one-line checks that it is one of
    ours (not an unconverted official file) and that its depth holds the model's split."""
    if "pos_embed" in state or getattr(state.get("x_embedder.proj.weight"), "ndim", 2) == 4:
        raise ValueError(f"{source} is an official SiT/REPA checkpoint (pos_embed, Conv2d patch embed): convert it "
                         "first (python convert_checkpoint.py --from sit|repa --to ours --input FILE --output "
                         "OUT.safetensors) and start from OUT.safetensors")
    if not any(key.startswith(BACKBONE) for key in state):
        state = {BACKBONE + key: value for key, value in state.items()}
    depth = stack_depths(state).get(BACKBONE + "blocks", 0)
    try:
        check_depth_split(depth, model.encoder_depth, model.decoder_depth)
    except ValueError as err:
        raise ValueError(f"{source} cannot become this SPRINT model: {err}") from None
    built = len(model.backbone.blocks)
    if depth != built:
        raise ValueError(f"{source} has {depth} blocks but the model is built with {built}: set the backbone's depth "
                         f"to {depth}")
    return state


def describe_fresh(model: nn.Module, fresh: Sequence[str]) -> str:
    """The tensors a run initialised itself, for the log line that reports a start from other weights."""
    parts = []
    wrapper = [key for key in fresh if not key.startswith(BACKBONE) and not adapter_keys([key])]
    if wrapper:
        fusion = getattr(model, "fusion", None)
        note = ""
        if fusion is not None:
            dim = fusion.weight.shape[0]
            identity = torch.cat([torch.eye(dim), torch.zeros(dim, dim)], dim=1)
            exact = (bool(torch.equal(full_tensor(fusion.weight.detach()).cpu(), identity))
                     and not bool(full_tensor(fusion.bias.detach()).any()))
            note = (" (fusion [I | 0]: the SPRINT model computes the dense one while no token is dropped)" if exact
                    else " (fusion not the identity: bind Sprint.fusion_init = 'identity' to convert exactly)")
        parts.append(", ".join(wrapper) + note)
    adapters = adapter_keys(fresh)
    if adapters:
        parts.append(f"{len(adapters)} LoRA adapter tensors (B = 0: the adapted model computes its base)")
    return "; ".join(parts)
