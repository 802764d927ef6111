"""Convert checkpoints between our Sprint layout and those of SPRINT, SiT and REPA; writes safetensors.

    python convert_checkpoint.py --from sprint --to ours --input sprint_XL_imagenet256.safetensors
        --output sprint_xl.safetensors --encoder-depth 2 --decoder-depth 2
    python convert_checkpoint.py --from sit --to ours --input SiT-XL-2-256x256.pt --output sit_xl.safetensors

SiT/REPA outputs lack the SPRINT wrapper's mask token and fusion: load them with
load_sprint_checkpoint(model, path, from_dense=True) into a backbone built with position='absolute'.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

from sprint_mm.checkpoints import (
    PROJECTOR_PREFIX,
    from_sit_keys,
    from_sprint_keys,
    read_state_dict,
    save_state_dict,
    split_projector,
    state_to_sprint_keys,
)
from sprint_mm.errors import report_mistakes

SOURCES = ("sit", "repa", "sprint", "ours")
TARGETS = ("ours", "sprint")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, choices=SOURCES, help="layout of the input")
    parser.add_argument("--to", dest="target", required=True, choices=TARGETS, help="layout of the output")
    parser.add_argument("--input", required=True, help=".safetensors, or a torch file (.pt/.pth/.bin)")
    parser.add_argument("--output", required=True, help="output .safetensors file")
    parser.add_argument("--encoder-depth", type=int, default=2, help="dense blocks before the sparse middle")
    parser.add_argument("--decoder-depth", type=int, default=2, help="dense blocks after the fusion")
    parser.add_argument("--entry", default=None, help="sub-dict of a training checkpoint, e.g. ema or model")
    parser.add_argument("--in-channels", type=int, default=None, help="SiT/REPA: latent channels (default: from the patch embed)")
    parser.add_argument("--patch", type=int, default=None, help="SiT/REPA: patch size (default: from the patch embed)")
    args = parser.parse_args(argv)
    if not args.output.endswith(".safetensors"):
        parser.error(f"--output must end in .safetensors, got {args.output!r}")
    if args.source in ("sit", "repa") and args.target == "sprint":
        parser.error(
            f"--from {args.source} --to sprint is not a usable conversion: the official SPRINT model has RoPE and "
            "RMSNorm q/k norm, SiT/REPA weights were trained with absolute sin-cos positions; convert --to ours and "
            "build the backbone with position='absolute'"
        )
    return args


def dense_to_ours(state: dict[str, torch.Tensor], args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], list[str]]:
    """SiT/REPA -> our keys, with the report lines that say what changed."""
    conv = state.get("x_embedder.proj.weight")
    if conv is None or conv.dim() != 4:
        raise KeyError(f"{args.input!r} has no Conv2d patch embed x_embedder.proj.weight: not a {args.source} checkpoint")
    in_channels = args.in_channels or conv.shape[1]
    patch = args.patch or conv.shape[2]
    converted = from_sit_keys(state, args.encoder_depth, args.decoder_depth, in_channels, patch, args.source)
    notes = [f"patch embed Conv2d {tuple(conv.shape)} -> Linear {tuple(converted['backbone.x_embedder.proj.weight'].shape)}"]
    if "pos_embed" in state:
        notes.append("dropped pos_embed: it equals the fixed sin-cos table that position='absolute' recomputes")
    if "final_layer.linear.weight" in state:
        rows = state["final_layer.linear.weight"].shape[0]
        kept = converted["backbone.final_layer.linear.weight"].shape[0]
        notes.append(f"final layer rows (i, j, c) -> (c, i, j): kept {kept} of {rows}"
                     + (" (learn_sigma: the first C channels are the mean)" if kept != rows else ""))
    notes.append("new, not in the file: mask_token and fusion.*; load with "
                 "load_sprint_checkpoint(model, OUT, from_dense=True) to keep the model's freshly initialised ones")
    qk = "layernorm" if any(".attn.q_norm." in key for key in state) else "none"
    notes.append(f"build the backbone with position='absolute', qk_norm={qk!r}")
    if args.source == "sit":
        notes.append("original SiT runs time the other way (t = 1 is data): wrap the model in "
                     "sprint_mm.time_reversed.TimeReversed to sample")
    return converted, notes


def convert(args: argparse.Namespace) -> None:
    """Read, convert and write the checkpoint `args` names, and print what changed."""
    state, projector = split_projector(read_state_dict(args.input, args.entry))
    depths = (args.encoder_depth, args.decoder_depth)
    notes: list[str] = []
    if args.source in ("sit", "repa"):
        ours, notes = dense_to_ours(state, args)
    elif args.source == "sprint":
        ours = from_sprint_keys(state, *depths)
    else:
        ours = state
    if args.target == "sprint" and "mask_token" not in ours:
        raise ValueError(f"{args.input!r} has no mask_token: a dense (SiT/REPA-derived) checkpoint has no SPRINT layout")
    out = ours if args.target == "ours" else state_to_sprint_keys(ours, *depths)
    out.update({PROJECTOR_PREFIX + key: value for key, value in projector.items()})
    save_state_dict(out, args.output)

    print(f"{args.input} ({args.source} layout, {len(state) + len(projector)} tensors) -> "
          f"{args.output} ({args.target} layout, {len(out)} tensors)")
    if projector:
        print(f"  REPA projector: {len(projector)} tensors kept as {PROJECTOR_PREFIX}{{0,2,4}}.*")
    for note in notes:
        print(f"  {note}")


def main(argv: Optional[list[str]] = None) -> int:
    """The command line: 0 on success, 2 with one `error: ...` line on stderr for a missing or unfitting checkpoint."""
    return report_mistakes(convert, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
