"""Encode a class-folder video dataset into per-video latent files that `VideoLatentDataset` reads.

    python datasets/encode_videos.py --source ucf101 --dest data/ucf101-latents \
        --vae weights/sd-vae-ft-mse --resolution 256 --num-frames 16 --frame-stride 2

    python datasets/encode_videos.py --vae-kind video --source ucf101 --dest data/ucf101-wan-latents \
        --vae weights/wan2.1-vae --resolution 256 --num-frames 17 [--shard 0 --num-shards 4]

    python datasets/encode_videos.py --vae-kind video --captions data/clips.jsonl --dest data/wan-latents \
        --vae weights/Wan2.1-T2V-1.3B-Diffusers --resolution 480 --width 832 --num-frames 81

Each `<source>/<class>/<name>` becomes `<dest>/<class>/<name>.safetensors` holding `mean` and `std` (C, T, h, w)
of the VAE posterior of ADM centre crops; `<dest>/index.jsonl` lists `{"path", "label"}` per video in source order.
With `--captions INDEX` (a JSONL or CSV caption index, `path, caption`, as `CaptionDataset` reads it) the videos are
the index's (paths relative to its folder keep their layout under `<dest>`) and the rows are `{"path", "caption"}`:
captioned clips for the text-to-video families. `--width W` crops `--resolution` x W frames instead of squares.
`--vae` is a VAE folder or a diffusers pipeline folder (its vae/).

`--vae-kind image` (default): a diffusers AutoencoderKL, frame by frame (T = --num-frames), moments of the raw
latent z; train with `VideoLatentDataset.scale = <the VAE's scaling_factor>` (0.18215 for SD).
`--vae-kind video`: a causal video VAE (`AutoencoderKLWan`, `AutoencoderKLCogVideoX`, `AutoencoderKLLTXVideo`,
see `sprint_mm.latents.VideoVAECodec`); --num-frames must be 1 + r*k (r = 4 for Wan and CogVideoX, 8 for LTX) and
gives T = 1 + k latent frames. The stored moments are those of the already normalised latent (each family's
per-channel `(z - shift) * scale`: mean' = (mean - shift) * scale, std' = std * scale), so train with
`VideoLatentDataset.scale = 1.0` and `VideoLatentDataset.shift = 0.0`. The files' safetensors metadata says which
(`vae`, `normalised`).

Finished files are skipped on a rerun and every file is written atomically, so a stopped run resumes where it stopped.
Videos that cannot be decoded, or that have fewer than `--num-frames` frames, are skipped and named in a warning.

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
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from encode_images import center_crop_adm, list_class_folder, write_atomically  # a sibling script
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

from sprint_mm.data.captions import read_caption_index
from sprint_mm.data.latents import VIDEO_INDEX
from sprint_mm.latents import FrozenVAECodec, VAECodec, VideoVAECodec

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
VAE_KINDS = ("image", "video")
SHOWN = 5  # how many skipped videos the warning names


def read_frames(path: Path, resolution: int, num_frames: int | None = None, frame_stride: int = 1,
                width: int | None = None) -> np.ndarray:
    """Every `frame_stride`-th frame (the first `num_frames` of them), centre-cropped: (T, res, width or res, 3)
    uint8."""
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
    """The rows of index.jsonl: a video's path and its label or caption (the shard bookkeeping left out)."""
    return ({key: value for key, value in row.items() if key != "item"} for row in rows)


def list_videos(src: str | os.PathLike | None, captions: str | None, unlabeled: bool
                ) -> tuple[Path, list[tuple[Path, dict]]]:
    """(the folder member paths are relative to, [(video, its label or caption field)]): a class folder, or the
    videos of a caption index."""
    if captions is not None:
        records = read_caption_index(captions)
        return Path(captions).parent, [(record.path, {"caption": record.caption}) for record in records]
    if src is None:
        raise ValueError("give --source (a class folder of videos) or --captions (a caption index)")
    return Path(src), [(path, {"label": label}) for path, label in list_class_folder(src, VIDEO_EXTENSIONS, unlabeled)]


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
    captions: str | None = None,
) -> int:
    """Encode this shard's videos under `src` (or of the caption index `captions`) into `out`; returns how many
    videos this call encoded."""
    import av

    if resolution < 1 or frame_stride < 1 or (num_frames is not None and num_frames < 1):
        raise ValueError(
            "resolution, frame_stride and num_frames must be positive, "
            f"got {resolution}, {frame_stride}, {num_frames}"
        )
    if vae_kind not in VAE_KINDS:
        raise ValueError(f"vae_kind {vae_kind!r} is not one of {', '.join(VAE_KINDS)}")
    if not (num_shards >= 1 and 0 <= shard < num_shards):
        raise ValueError(f"shard {shard} of {num_shards}: need num_shards >= 1 and 0 <= shard < num_shards")
    src, videos = list_videos(src, captions, unlabeled)
    items = list(enumerate(videos))[shard::num_shards]
    out = Path(out)
    codec = _build_codec(vae_kind, vae_path, batch_size, num_frames).to(device)
    video_vae = isinstance(codec, VideoVAECodec)
    metadata = {"vae": codec.vae_class if video_vae else "AutoencoderKL", "normalised": str(video_vae).lower()}
    index, skipped, encoded = [], [], 0
    for item, (path, tag) in tqdm(items, unit="video", desc=f"encoding videos (shard {shard} of {num_shards})"):
        member = path.relative_to(src).as_posix() + ".safetensors"
        target = out / member
        if not target.is_file():
            try:
                frames = read_frames(path, resolution, num_frames, frame_stride, width)
            except (av.error.FFmpegError, ValueError) as error:
                skipped.append(f"{path} ({error})")
                continue
            x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # (1, 3, T, H, W)
            mean, std = codec.normalised_moments(x) if video_vae else codec.moments(x)
            payload = {"mean": mean[0].float().contiguous(), "std": std[0].float().contiguous()}  # (C, T, h, w)
            write_atomically(target, safetensors_bytes(payload, metadata=metadata))
            encoded += 1
        index.append({"item": item, "path": member, **tag})
    if num_shards == 1:
        write_atomically(out / VIDEO_INDEX, _jsonl(index_rows(index)))
    else:
        write_atomically(out / shard_index_name(shard, num_shards), _jsonl(index))
        merge_shard_indexes(out, num_shards)
    if skipped:
        more = f" and {len(skipped) - SHOWN} more" if len(skipped) > SHOWN else ""
        warnings.warn(f"skipped {len(skipped)} video(s): {'; '.join(skipped[:SHOWN])}{more}", stacklevel=2)
    return encoded


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help="video folder: <source>/<class>/<video>")
    parser.add_argument("--captions", help="a caption index (JSONL/CSV: path, caption) instead of --source")
    parser.add_argument("--dest", required=True, help="output folder (resumes what is already there)")
    parser.add_argument("--vae", required=True, help="local diffusers VAE folder (config.json + weights)")
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
    args = parser.parse_args(argv)
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
    main()
