"""Conversion between our Sprint keys and the SPRINT, SiT and REPA checkpoint layouts, and loading either of ours.

Our Sprint state dict nests the backbone (`backbone.blocks.i`, `backbone.x_embedder`, ...) beside the wrapper's own
`mask_token` and `fusion`. SPRINT's official files split the blocks into three stacks and call the fusion
`renoise_linear`; SiT/REPA files are dense (`blocks.i`) with a Conv2d patch embed, a stored sin-cos `pos_embed` and
final-layer rows ordered (i, j, c) instead of our channel-major (c, i, j).
"""
from __future__ import annotations

import math
import os
import re
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import nn

from sprint_mm.checkpoints.files import clean_key, read_state_dict
from sprint_mm.checkpoints.strict import CheckpointMismatch, load_strict
from sprint_mm.layers import grid_coordinates, sincos_position_embedding

if TYPE_CHECKING:
    from sprint_mm.sprint import Sprint

SPRINT_STACKS = ("encoder_blocks", "middle_blocks", "decoder_blocks")
DENSE_LAYOUTS = ("sit", "repa")
PROJECTOR_PREFIX = "projectors."
STACK_KEY = re.compile(r"^(?P<stack>backbone\.blocks|blocks|encoder_blocks|middle_blocks|decoder_blocks)\.(?P<index>\d+)\.(?P<rest>.+)$")
# (our prefix, SPRINT prefix) for every tensor outside the blocks
OURS_TO_SPRINT_PREFIXES = (
    ("backbone.x_embedder.", "x_embedder."),
    ("backbone.t_embedder.", "t_embedder."),
    ("backbone.y_embedder.", "y_embedder."),
    ("backbone.final_layer.", "final_layer."),
    ("fusion.", "renoise_linear."),
    ("mask_token", "mask_token"),
)
SPRINT_TO_OURS_PREFIXES = tuple((theirs, ours) for ours, theirs in OURS_TO_SPRINT_PREFIXES)
DENSE_TO_OURS_PREFIXES = tuple(pair for pair in SPRINT_TO_OURS_PREFIXES if pair[1].startswith("backbone."))


def split_projector(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(everything else, the REPA projector). SPRINT stores one Sequential (`projectors.{0,2,4}.*`), REPA a list of
    them (`projectors.k.{0,2,4}.*`); the projector comes back with the Sequential's own keys (`0.weight` ... `4.bias`)."""
    rest, projector = {}, {}
    for key, value in state.items():
        if not key.startswith(PROJECTOR_PREFIX):
            rest[key] = value
            continue
        parts = key[len(PROJECTOR_PREFIX):].split(".")
        if len(parts) == 3:  # REPA's list index comes first
            if parts[0] != "0":
                raise ValueError(f"checkpoint has more than one REPA projector ({key!r}); only projector 0 is supported")
            parts = parts[1:]
        projector[".".join(parts)] = value
    return rest, projector


def without_projector(state: dict[str, torch.Tensor], ignore_projector: bool) -> dict[str, torch.Tensor]:
    """The state minus projector tensors, which are only dropped when asked: otherwise they are an error."""
    rest, projector = split_projector(state)
    if projector and not ignore_projector:
        raise ValueError(
            f"checkpoint holds {len(projector)} REPA projector tensors ({PROJECTOR_PREFIX}*); keep them with "
            "split_projector(state) before converting, or pass ignore_projector=True to drop them"
        )
    return rest


def stack_depths(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Number of blocks in each block stack of a state dict; each stack must be numbered 0 .. n-1."""
    indices: dict[str, set[int]] = {}
    for key in state:
        match = STACK_KEY.match(key)
        if match:
            indices.setdefault(match["stack"], set()).add(int(match["index"]))
    for stack, found in indices.items():
        if found != set(range(len(found))):
            raise ValueError(f"checkpoint blocks {stack}.* are not numbered 0..{len(found) - 1}: found {sorted(found)}")
    return {stack: len(found) for stack, found in indices.items()}


def check_depth_split(depth: int, encoder_depth: int, decoder_depth: int) -> None:
    """Raise unless the encoder and decoder depths leave at least one middle block of `depth`."""
    if encoder_depth < 0 or decoder_depth < 0 or encoder_depth + decoder_depth >= depth:
        raise ValueError(
            f"encoder_depth {encoder_depth} + decoder_depth {decoder_depth} must leave at least one middle block "
            f"of the checkpoint's {depth} blocks"
        )


def translate_keys(
    state: dict[str, torch.Tensor],
    prefixes: tuple[tuple[str, str], ...],
    rename_block: Callable[[str, int], str],
    what: str,
) -> dict[str, torch.Tensor]:
    """Rename block keys by rename_block(stack, index) and every other key by its (from, to) prefix pair;
    a key that matches neither is an error that names it."""
    out, unknown = {}, []
    for key, value in state.items():
        match = STACK_KEY.match(key)
        if match:
            out[f"{rename_block(match['stack'], int(match['index']))}.{match['rest']}"] = value
            continue
        renamed = next((new + key[len(old):] for old, new in prefixes if key.startswith(old)), None)
        if renamed is None:
            unknown.append(key)
        else:
            out[renamed] = value
    if unknown:
        raise ValueError(f"{what}: {len(unknown)} keys have no counterpart: {sorted(unknown)[:10]}")
    return out


def state_to_sprint_keys(
    state: dict[str, torch.Tensor], encoder_depth: int, decoder_depth: int, ignore_projector: bool = False
) -> dict[str, torch.Tensor]:
    """A Sprint state dict in our keys -> the official SPRINT layout (block sub-keys unchanged)."""
    state = without_projector(state, ignore_projector)
    depth = stack_depths(state).get("backbone.blocks", 0)
    check_depth_split(depth, encoder_depth, decoder_depth)

    def block(stack: str, index: int) -> str:
        if stack != "backbone.blocks":
            raise ValueError(f"block key {stack}.{index} is not in our layout (backbone.blocks.i)")
        if index < encoder_depth:
            return f"encoder_blocks.{index}"
        if index < depth - decoder_depth:
            return f"middle_blocks.{index - encoder_depth}"
        return f"decoder_blocks.{index - depth + decoder_depth}"

    return translate_keys(state, OURS_TO_SPRINT_PREFIXES, block, "Sprint state dict -> SPRINT layout")


def to_sprint_keys(model: Sprint) -> dict[str, torch.Tensor]:
    """Our Sprint model's state dict in the official SPRINT key layout."""
    return state_to_sprint_keys(model.state_dict(), model.encoder_depth, model.decoder_depth)


def from_sprint_keys(
    state: dict[str, torch.Tensor], encoder_depth: int, decoder_depth: int, ignore_projector: bool = False
) -> dict[str, torch.Tensor]:
    """An official SPRINT state dict (e.g. the released EMA files) -> our Sprint keys. Wrapper prefixes are removed;
    projector tensors must be split off first (split_projector) or explicitly ignored."""
    state = without_projector({clean_key(k): v for k, v in state.items()}, ignore_projector)
    depths = stack_depths(state)
    stray = sorted(set(depths) - set(SPRINT_STACKS))
    if stray:
        raise ValueError(
            f"a SPRINT checkpoint has only the stacks {', '.join(SPRINT_STACKS)}, but this one has "
            f"{', '.join(f'{s}.*' for s in stray)}: a dense SiT/REPA checkpoint goes through from_sit_keys "
            "(convert_checkpoint.py --from sit|repa)"
        )
    found = tuple(depths.get(stack, 0) for stack in SPRINT_STACKS)
    if found[0] != encoder_depth or found[2] != decoder_depth or found[1] < 1:
        raise ValueError(
            f"SPRINT checkpoint has encoder/middle/decoder depths {found}, but the model expects encoder_depth "
            f"{encoder_depth}, decoder_depth {decoder_depth} and at least one middle block"
        )
    offsets = {"encoder_blocks": 0, "middle_blocks": encoder_depth, "decoder_blocks": encoder_depth + found[1]}
    return translate_keys(
        state, SPRINT_TO_OURS_PREFIXES, lambda stack, index: f"backbone.blocks.{offsets[stack] + index}",
        "SPRINT layout -> Sprint state dict",
    )


def undo_repa_legacy_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """REPA's legacy files call the blocks after the alignment depth `decoder_blocks.i` (= `blocks.(i + a)`, where
    a is REPA's alignment depth, i.e. the number of `blocks.*` before them) - unrelated to SPRINT's decoder."""
    offset = stack_depths(state).get("blocks", 0)
    out = {}
    for key, value in state.items():
        match = STACK_KEY.match(key)
        if match and match["stack"] == "decoder_blocks":
            key = f"blocks.{int(match['index']) + offset}.{match['rest']}"
        out[key] = value
    return out


def conv_patch_to_linear(weight: torch.Tensor, in_channels: int, patch: tuple[int, int]) -> torch.Tensor:
    """Conv2d patch-embed weight (D, C, ph, pw) -> our Linear (D, C*ph*pw): the same (c, i, j) order, a reshape."""
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (in_channels, *patch):
        raise ValueError(
            f"x_embedder.proj.weight has shape {tuple(weight.shape)}; a Conv2d patch embed for {in_channels} channels "
            f"and patch {patch} has shape (D, {in_channels}, {patch[0]}, {patch[1]})"
        )
    return weight.reshape(weight.shape[0], -1)


def final_rows_to_channel_major(rows: torch.Tensor, in_channels: int, patch: tuple[int, int]) -> torch.Tensor:
    """Final-layer weight or bias with rows ordered (i, j, c) over C_out channels -> rows (c, i, j) over the first
    `in_channels` channels. SiT's learn_sigma models emit 2C channels, of which the first C are the prediction."""
    per_patch = patch[0] * patch[1]
    out_channels = rows.shape[0] // per_patch
    if rows.shape[0] % per_patch or out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(
            f"final_layer.linear has {rows.shape[0]} output rows; for patch {patch} and {in_channels} channels "
            f"expected {per_patch * in_channels} or, with learn_sigma, {2 * per_patch * in_channels}"
        )
    kept = rows.unflatten(0, (*patch, out_channels))[:, :, :in_channels]  # (ph, pw, C, ...)
    return kept.movedim(2, 0).reshape(in_channels * per_patch, *rows.shape[1:])


def check_sincos_table(pos_embed: torch.Tensor) -> None:
    """SiT/REPA's stored `pos_embed` is dropped only if it is the fixed table that position='absolute' recomputes."""
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, N, D), got {tuple(pos_embed.shape)}")
    _, n, dim = pos_embed.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"pos_embed has {n} positions, not a square grid of tokens")
    expected = sincos_position_embedding(dim, grid_coordinates((side, side)))
    error = (pos_embed[0].float() - expected).abs().max().item()
    if error > 1e-4:
        raise ValueError(
            f"pos_embed is not the fixed 2D sin-cos table (max difference {error:.3g}); a learned or resampled "
            "position table cannot be reproduced by position='absolute'"
        )


def from_sit_keys(
    state: dict[str, torch.Tensor],
    encoder_depth: int,
    decoder_depth: int,
    in_channels: int,
    patch: int | tuple[int, int],
    layout: str,
    ignore_projector: bool = False,
) -> dict[str, torch.Tensor]:
    """A dense SiT (willisma/SiT) or REPA (sihyun-yu/REPA) state dict -> our Sprint keys, without the wrapper's own
    tensors (mask_token, fusion), which a dense model lacks: load the result with `load_dense_into_sprint`.

    Load it into a backbone built with position='absolute' and qk_norm 'none' (SiT, REPA default) or 'layernorm'
    (REPA --qk-norm). Original SiT runs time the other way: wrap the loaded model in
    `sprint_mm.time_reversed.TimeReversed`."""
    if layout not in DENSE_LAYOUTS:
        raise ValueError(f"unknown dense layout {layout!r}; allowed: {', '.join(DENSE_LAYOUTS)}")
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    state = without_projector({clean_key(k): v for k, v in state.items()}, ignore_projector)
    if layout == "repa":
        state = undo_repa_legacy_names(state)
    depths = stack_depths(state)
    stray = sorted(set(depths) - {"blocks"})
    if stray:
        raise ValueError(
            f"a {layout} checkpoint has only blocks.i, but this one has {', '.join(f'{s}.*' for s in stray)}: "
            "SPRINT checkpoints go through from_sprint_keys; REPA's legacy decoder_blocks need layout='repa'"
        )
    check_depth_split(depths.get("blocks", 0), encoder_depth, decoder_depth)
    if "pos_embed" in state:
        check_sincos_table(state.pop("pos_embed"))
    if "x_embedder.proj.weight" in state:
        state["x_embedder.proj.weight"] = conv_patch_to_linear(state["x_embedder.proj.weight"], in_channels, patch)
    for name in ("final_layer.linear.weight", "final_layer.linear.bias"):
        if name in state:
            state[name] = final_rows_to_channel_major(state[name], in_channels, patch)
    return translate_keys(state, DENSE_TO_OURS_PREFIXES, lambda _, index: f"backbone.blocks.{index}", f"{layout} -> Sprint")


def wrapper_keys(model: Sprint) -> list[str]:
    """The tensors the SPRINT wrapper owns (mask token, fusion): new when a dense checkpoint is SPRINT-ized."""
    return [key for key in model.state_dict() if not key.startswith("backbone.")]


def load_dense_into_sprint(model: Sprint, state: dict[str, torch.Tensor], source: str = "dense checkpoint") -> list[str]:
    """Load a converted dense checkpoint (our keys) strictly into every backbone tensor, keep the model's freshly
    initialised mask token and fusion, and return their keys."""
    fresh = wrapper_keys(model)
    present = [key for key in fresh if key in state]
    if present:
        raise ValueError(f"{source} is not dense: it already has the SPRINT tensors {present}; load it with load_strict")
    own = model.state_dict()
    load_strict(model, {**state, **{key: own[key] for key in fresh}}, source=source)
    return fresh


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    """'ours', 'sprint' or 'dense' (SiT/REPA) from the top-level key names."""
    tops = {key.split(".")[0] for key in state}
    if "backbone" in tops:
        return "ours"
    if tops & {"blocks", "pos_embed"}:
        return "dense"
    if tops & {*SPRINT_STACKS, "renoise_linear", "mask_token"}:
        return "sprint"
    raise ValueError(f"cannot tell the checkpoint layout from its keys (e.g. {sorted(state)[:6]}); expected ours "
                     "(backbone.*), SPRINT (encoder_blocks.*, middle_blocks.*, ...) or SiT/REPA (blocks.*, pos_embed)")


def load_sprint_checkpoint(
    model: Sprint,
    path: str | os.PathLike,
    entry: Optional[str] = None,
    projector: Optional[nn.Module] = None,
    ignore_projector: bool = False,
    from_dense: bool = False,
) -> str:
    """Load a checkpoint in our layout or SPRINT's strictly into `model` and return a readable report.

    REPA projector tensors are loaded (strictly) into `projector` (a Sequential Linear-SiLU-Linear-SiLU-Linear),
    or dropped only with ignore_projector=True. from_dense=True loads a converted SiT/REPA file (no mask token,
    no fusion) and keeps the model's fresh wrapper tensors."""
    state, projector_state = split_projector(read_state_dict(path, entry))
    if projector_state and projector is None and not ignore_projector:
        raise ValueError(
            f"{str(path)!r} holds {len(projector_state)} REPA projector tensors; pass projector=<module> to load "
            "them or ignore_projector=True to drop them"
        )
    if projector is not None and not projector_state:
        raise CheckpointMismatch(f"{str(path)!r} has no projector tensors ({PROJECTOR_PREFIX}*) for the given projector")
    layout = detect_layout(state)
    if layout == "dense":
        raise ValueError(
            f"{str(path)!r} is a dense SiT/REPA checkpoint; convert it first (convert_checkpoint.py --from sit|repa "
            "--to ours, or from_sit_keys) and load the result with from_dense=True"
        )
    if layout == "sprint":
        state = from_sprint_keys(state, model.encoder_depth, model.decoder_depth)
    source = f"checkpoint {str(path)!r} ({layout} layout)"
    if from_dense:
        fresh = load_dense_into_sprint(model, state, source)
        kept = f"; kept the model's fresh {', '.join(fresh)} (not in a dense checkpoint)"
    else:
        if "mask_token" not in state:
            raise CheckpointMismatch(
                f"{source} has no mask_token: it looks like a converted dense SiT/REPA checkpoint; pass from_dense=True "
                "to keep the model's freshly initialised mask token and fusion"
            )
        load_strict(model, state, source)
        kept = ""
    middle = len(model.middle_blocks)
    report = (f"loaded {len(state)} tensors from {str(path)!r} ({layout} layout) into Sprint(encoder "
              f"{model.encoder_depth}, middle {middle}, decoder {model.decoder_depth}){kept}")
    if projector_state and projector is not None:
        load_strict(projector, projector_state, f"{source} projector")
        report += f"; loaded {len(projector_state)} projector tensors"
    elif projector_state:
        report += f"; ignored {len(projector_state)} projector tensors as asked"
    return report
