"""Encode a class-folder video dataset, or the videos of a caption index, into per-video latent files that
`VideoLatentDataset` reads.

    python datasets/encode_videos.py --source ucf101 --dest data/ucf101-latents \
        --vae weights/sd-vae-ft-mse --resolution 256 --num-frames 16 --frame-stride 2

    python datasets/encode_videos.py --vae-kind video --source ucf101 --dest data/ucf101-wan-latents \
        --vae weights/wan2.1-vae --resolution 256 --num-frames 17 [--shard 0 --num-shards 4]

    python datasets/encode_videos.py --vae-kind video --captions data/clips.jsonl --dest data/wan-latents \
        --vae weights/Wan2.1-T2V-1.3B-Diffusers --resolution 480 --width 832 --num-frames 81

Each `<source>/<class>/<name>` becomes `<dest>/<class>/<name>.safetensors` holding `mean` and `std` (C, T, h, w)
of the VAE posterior of ADM centre crops; `<dest>/index.jsonl` lists `{"path", "label"}` per video in source order.
With `--captions INDEX` (a JSONL or CSV caption index, `path, caption`, as `CaptionDataset` reads it) the videos are
the index's (paths relative to its folder keep their layout under `<dest>`; the index must list every file once,
inside its own folder) and the rows are `{"path", "caption"}`: captioned clips for the text-to-video families.
`--width W` crops `--resolution` x W frames instead of squares. `--vae` is a VAE folder or a diffusers pipeline folder
(its vae/).

`--vae-kind image` (default): a diffusers AutoencoderKL, frame by frame (T = --num-frames), moments of the raw
latent z; train with `VideoLatentDataset.scale = <the VAE's scaling_factor>` (0.18215 for SD).
`--vae-kind video`: a causal video VAE (`AutoencoderKLWan`, `AutoencoderKLCogVideoX`, `AutoencoderKLLTXVideo`,
see `sprint_mm.latents.VideoVAECodec`); --num-frames must be 1 + r*k (r = 4 for Wan and CogVideoX, 8 for LTX) and
gives T = 1 + k latent frames. The stored moments are those of the already normalised latent (each family's
per-channel `(z - shift) * scale`: mean' = (mean - shift) * scale, std' = std * scale), so train with
`VideoLatentDataset.scale = 1.0` and `VideoLatentDataset.shift = 0.0`. The files' safetensors metadata says which
(`vae`, `normalised`).

Finished files are skipped on a rerun and every file is written atomically, so a stopped run (Ctrl-C too) resumes where
it stopped. Each file's metadata records its source's size, mtime and sha256: a source changed since is encoded
again. `<dest>/encoding.json` records the settings (resolution, width, frames, stride, the caption index, the VAE's
kind and fingerprint); a rerun with other settings (another width or caption index too) is refused, so one index never
mixes latent sizes, or labels and captions. The index is written afresh from the listing on every run: an edited
caption needs no encoding, a row taken out of the caption index leaves it. Videos that cannot be decoded, or that
have fewer than `--num-frames` frames, are skipped with one line each and counted.

Sharding: `--shard i --num-shards n` encodes the videos at positions i, i + n, i + 2n, ... of the sorted source
listing, so n processes (any machines sharing `--dest`) split the work disjointly. Each shard writes
`index.shard-<i>-of-<n>.jsonl` when it is done, then, if all n shard indexes are there, merges them into
`index.jsonl` in source order; the last shard to finish therefore writes the full index (rerunning any one shard
merges again).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from encode_images import (KEPT, center_crop_adm, check_pixels, check_settings, list_sources,  # a sibling script
                           read_record, say_skipped, shape_and_index_settings, source_state, vae_fingerprint,
                           write_atomically, write_record)
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

from sprint_mm.data.latents import VIDEO_INDEX
from sprint_mm.errors import report_mistakes
from sprint_mm.latents import FrozenVAECodec, VAECodec, VideoVAECodec

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
VAE_KINDS = ("image", "video")
SOURCE_KEYS = ("size", "mtime_ns", "sha256")  # of the source, in each latent file's metadata as source_<key>


def read_frames(path: Path, resolution: int, num_frames: int | None = None, frame_stride: int = 1,
                width: int | None = None) -> np.ndarray:
    """Every `frame_stride`-th frame (the first `num_frames` of them), centre-cropped: (T, resolution, width or
    resolution, 3) uint8."""
    import av  # optional dependency: the "video" extra

    frames = []
    with av.open(str(path)) as container:
        for number, frame in enumerate(container.decode(video=0)):
            if number % frame_stride == 0:
                frames.append(center_crop_adm(frame.to_image(), resolution, width))
            if num_frames is not None and len(frames) == num_frames:
                break
    if not frames or (num_frames is not None and len(frames) < num_frames):
        raise ValueError(f"{path} gives {len(frames)} frame(s) at stride {frame_stride}, need {num_frames or 1}")
    return np.stack(frames)


def shard_index_name(shard: int, num_shards: int) -> str:
    return f"index.shard-{shard}-of-{num_shards}.jsonl"


def merge_shard_indexes(out: str | os.PathLike, num_shards: int) -> bool:
    """Write `out/index.jsonl` from all `num_shards` shard indexes, in source order; False while one is missing."""
    out = Path(out)
    shards = [out / shard_index_name(shard, num_shards) for shard in range(num_shards)]
    if not all(path.is_file() for path in shards):
        return False
    rows = [json.loads(line) for path in shards for line in path.read_text().splitlines()]
    rows.sort(key=lambda row: row["item"])
    items = [row["item"] for row in rows]
    if len(set(items)) != len(items):
        raise ValueError(f"the shard indexes under {str(out)!r} list a video twice; rerun the shards from one listing")
    write_atomically(out / VIDEO_INDEX, _jsonl(index_rows(rows)))
    return True


def index_rows(rows: Iterable[dict]) -> Iterable[dict]:
    """The rows of index.jsonl: a video's path and its label or caption (the shard bookkeeping `item` left out)."""
    return ({key: value for key, value in row.items() if key != "item"} for row in rows)


def _jsonl(rows: Iterable[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def _build_codec(vae_kind: str, vae_path: str, batch_size: int, num_frames: int | None) -> FrozenVAECodec:
    if vae_kind == "image":
        return VAECodec(vae_path, batch_size=batch_size)
    codec = VideoVAECodec(vae_path)
    if num_frames is None:
        raise ValueError(
            f"--vae-kind video needs --num-frames: {codec.vae_class} encodes clips of {codec.allowed_frames()}"
        )
    codec.latent_frames(num_frames)
    return codec


def encode_video_folder(
    src: str | os.PathLike | None,
    out: str | os.PathLike,
    vae_path: str,
    resolution: int = 256,
    num_frames: int | None = None,
    frame_stride: int = 1,
    batch_size: int = 16,
    unlabeled: bool = False,
    device: str = "cpu",
    vae_kind: str = "image",
    shard: int = 0,
    num_shards: int = 1,
    width: int | None = None,
    captions: str | os.PathLike | None = None,
) -> int:
    """Encode this shard's videos under `src` (or of the caption index `captions`) into `out`, frames of
    `resolution` x `width` (default: square); returns how many videos this call encoded."""
    import av

    if resolution < 1 or frame_stride < 1 or (num_frames is not None and num_frames < 1):
        raise ValueError(
            "resolution, frame_stride and num_frames must be positive, "
            f"got {resolution}, {frame_stride}, {num_frames}"
        )
    if width is not None:
        check_pixels("--width", width)
    if vae_kind not in VAE_KINDS:
        raise ValueError(f"vae_kind {vae_kind!r} is not one of {', '.join(VAE_KINDS)}")
    if not (num_shards >= 1 and 0 <= shard < num_shards):
        raise ValueError(f"shard {shard} of {num_shards}: need num_shards >= 1 and 0 <= shard < num_shards")
    items = list(enumerate(list_sources(src, captions, unlabeled, VIDEO_EXTENSIONS)))[shard::num_shards]
    out, tag_key = Path(out), "label" if captions is None else "caption"
    codec = _build_codec(vae_kind, vae_path, batch_size, num_frames).to(device)
    settings = {"resolution": resolution, "num_frames": num_frames, "frame_stride": frame_stride,
                "vae_kind": vae_kind, "vae": vae_fingerprint(vae_path), "unlabeled": unlabeled,
                **shape_and_index_settings(resolution, width, captions)}
    check_settings(out, read_record(out), settings)  # files of earlier versions hold no source record: encoded again
    write_record(out, settings, {})  # the settings only: the files' metadata say where each comes from
    video_vae = isinstance(codec, VideoVAECodec)
    metadata = {"vae": codec.vae_class if video_vae else "AutoencoderKL", "normalised": str(video_vae).lower(),
                "resolution": str(resolution)}
    index, skipped, encoded = [], 0, 0
    progress = tqdm(items, unit="video", desc=f"encoding videos (shard {shard} of {num_shards})")
    for item, (name, path, tag) in progress:
        member = name + ".safetensors"
        state = source_state(path, encoded_source(out / member))
        if encoded_source(out / member) != state:
            try:
                frames = read_frames(path, resolution, num_frames, frame_stride, width)
            except (av.error.FFmpegError, ValueError) as error:
                say_skipped(name, error)
                skipped += 1
                continue
            x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # (1, 3, T, H, W)
            mean, std = codec.normalised_moments(x) if video_vae else codec.moments(x)
            payload = {"mean": mean[0].float().contiguous(), "std": std[0].float().contiguous()}  # (C, T, h, w)
            source = {f"source_{key}": str(state[key]) for key in SOURCE_KEYS}
            write_atomically(out / member, safetensors_bytes(payload, metadata={**metadata, **source}))
            encoded += 1
        index.append({"item": item, "path": member, tag_key: tag})
    if num_shards == 1:
        write_atomically(out / VIDEO_INDEX, _jsonl(index_rows(index)))
    else:
        write_atomically(out / shard_index_name(shard, num_shards), _jsonl(index))
        merge_shard_indexes(out, num_shards)
    if skipped:
        tqdm.write(f"skipped {skipped} video(s) that cannot be read (named above); they are tried again on a rerun",
                   file=sys.stderr)
    return encoded


def encoded_source(path: Path) -> Optional[dict[str, Any]]:
    """The source state recorded in a latent file's metadata; None when there is no such file, or no record in it (a
    file an earlier version wrote: encoded again), or it cannot be read."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
    except (SafetensorError, OSError):
        return None
    if not all(f"source_{key}" in metadata for key in SOURCE_KEYS):
        return None
    return {"size": int(metadata["source_size"]), "mtime_ns": int(metadata["source_mtime_ns"]),
            "sha256": metadata["source_sha256"]}


def main(argv: Sequence[str] | None = None) -> int:
    """0 done; 2 and one `error:` line for a mistake (a missing source, caption index or VAE, an image VAE given as
    --vae-kind video, other settings than the destination's); 130 and one line on Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help="video folder: <source>/<class>/<video>")
    parser.add_argument("--captions", help="a caption index (JSONL/CSV: path, caption) instead of --source")
    parser.add_argument("--dest", required=True, help="output folder (resumes what is already there)")
    parser.add_argument("--vae", required=True,
                        help="local diffusers VAE folder (config.json + weights), or a pipeline folder")
    parser.add_argument("--vae-kind", choices=VAE_KINDS, default="image",
                        help="image: AutoencoderKL frame by frame; video: a causal video VAE (Wan, CogVideoX, LTX)")
    parser.add_argument("--resolution", type=int, default=256, help="frame height (and width, unless --width)")
    parser.add_argument("--width", type=int, help="frame width in pixels (default: --resolution)")
    parser.add_argument("--num-frames", type=int, default=None,
                        help="frames per video (default: all; --vae-kind video: required, 1 + r*k)")
    parser.add_argument("--frame-stride", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16, help="frames per VAE call (--vae-kind image)")
    parser.add_argument("--unlabeled", action="store_true", help="take every video under --source, all class 0")
    parser.add_argument("--shard", type=int, default=0, help="which share of the videos this process encodes")
    parser.add_argument("--num-shards", type=int, default=1, help="how many processes share the videos")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return report_mistakes(encode_command, parser.parse_args(argv), interrupted=KEPT)


def encode_command(args: argparse.Namespace) -> None:
    encoded = encode_video_folder(
        args.source, args.dest, args.vae, args.resolution, args.num_frames, args.frame_stride,
        args.batch_size, args.unlabeled, args.device, args.vae_kind, args.shard, args.num_shards, args.width,
        args.captions,
    )
    print(f"encoded {encoded} new video(s) into {args.dest}")
    if args.num_shards > 1:
        shards = [Path(args.dest) / shard_index_name(i, args.num_shards) for i in range(args.num_shards)]
        waiting = [i for i, path in enumerate(shards) if not path.is_file()]
        print(f"{VIDEO_INDEX} written from all {args.num_shards} shards" if not waiting
              else f"{VIDEO_INDEX} is written when shard(s) {', '.join(map(str, waiting))} finish")


if __name__ == "__main__":
    sys.exit(main())
