"""Strict loading: every tensor fits or nothing is loaded, with a readable report of what does not fit.

A module whose tensors once had other keys (e.g. `DiT`, whose condition tensors moved into its condition module)
defines `upgrade_state_dict(state, prefix)`, which renames the old keys under its prefix in place; `upgrade_keys`
applies every such module's renaming, so checkpoints written before still fit and load strictly."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class CheckpointMismatch(ValueError):
    """A state dict that does not fit the model: lists what is missing, unexpected and of another shape."""


def upgrade_keys(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of `state` with the keys of earlier layouts renamed to `module`'s (see the module docstring)."""
    state = dict(state)
    for name, submodule in module.named_modules():
        upgrade = getattr(submodule, "upgrade_state_dict", None)
        if callable(upgrade):
            upgrade(state, f"{name}." if name else "")
    return state


def mismatch_report(module: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrong-shape descriptions) of `state`, its keys upgraded, against `module`."""
    own, state = module.state_dict(), upgrade_keys(module, state)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(own[k].shape) != tuple(state[k].shape)
    )
    return missing, unexpected, shapes


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load every tensor or raise CheckpointMismatch naming what does not fit; never a partial, silent load."""
    state = upgrade_keys(module, state)
    check_fits(module, state, source)
    module.load_state_dict(state, strict=True)


def check_fits(module: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise CheckpointMismatch naming what of `state` does not fit `module` (sharded modules compare full shapes)."""
    missing, unexpected, shapes = mismatch_report(module, state)
    if missing or unexpected or shapes:
        raise checkpoint_mismatch(source, missing, unexpected, shapes)


def checkpoint_mismatch(source: str, missing: Sequence[str], unexpected: Sequence[str] = (), shapes: Sequence[str] = ()
                        ) -> CheckpointMismatch:
    """The one error for a checkpoint that does not fit: each non-empty list counted, its first 12 items named."""
    def listing(title: str, items: Sequence[str]) -> str:
        shown = "\n    ".join(items[:12]) + (f"\n    ... and {len(items) - 12} more" if len(items) > 12 else "")
        return f"  {title} ({len(items)}):\n    {shown}" if items else ""

    parts = [listing("missing from the checkpoint", missing), listing("unexpected in the checkpoint", unexpected),
             listing("shape mismatches", shapes)]
    return CheckpointMismatch(f"{source} does not fit the model:\n" + "\n".join(p for p in parts if p))
