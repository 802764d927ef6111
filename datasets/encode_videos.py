"""Encode a class-folder video dataset into per-video latent files that `VideoLatentDataset` reads.

    python datasets/encode_videos.py --source ucf101 --dest data/ucf101-latents \
        --vae weights/sd-vae-ft-mse --resolution 256 --num-frames 16 --frame-stride 2

Each `<source>/<class>/<name>` becomes `<dest>/<class>/<name>.safetensors` holding `mean` and `std`
(C, T, h, w) of the VAE posterior, frame by frame, of ADM centre crops; `<dest>/index.jsonl` lists
`{"path", "label"}` per video. Finished files are skipped on a rerun. Videos that cannot be decoded, or
that have fewer than `--num-frames` frames, are skipped and named in a warning.
"""
from __future__ import annotations

import argparse
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from encode_images import center_crop_adm, list_class_folder, write_atomically  # also puts the repo on sys.path
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

from sprint_mm.data.latents import VIDEO_INDEX
from sprint_mm.latents import VAECodec

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
SHOWN = 5  # how many skipped videos the warning names


def read_frames(path: Path, resolution: int, num_frames: int | None = None, frame_stride: int = 1) -> np.ndarray:
    """Every `frame_stride`-th frame (the first `num_frames` of them), centre-cropped: (T, res, res, 3) uint8."""
    import av  # optional dependency: the "video" extra

    frames = []
    with av.open(str(path)) as container:
        for number, frame in enumerate(container.decode(video=0)):
            if number % frame_stride == 0:
                frames.append(center_crop_adm(frame.to_image(), resolution))
            if num_frames is not None and len(frames) == num_frames:
                break
    if not frames or (num_frames is not None and len(frames) < num_frames):
        raise ValueError(f"{path} gives {len(frames)} frame(s) at stride {frame_stride}, need {num_frames or 1}")
    return np.stack(frames)


def encode_video_folder(
    src: str | os.PathLike,
    out: str | os.PathLike,
    vae_path: str,
    resolution: int = 256,
    num_frames: int | None = None,
    frame_stride: int = 1,
    batch_size: int = 16,
    unlabeled: bool = False,
    device: str = "cpu",
) -> int:
    """Encode every video under `src` into `out`; returns how many videos this call encoded."""
    import av

    if resolution < 1 or frame_stride < 1 or (num_frames is not None and num_frames < 1):
        raise ValueError(
            "resolution, frame_stride and num_frames must be positive, "
            f"got {resolution}, {frame_stride}, {num_frames}"
        )
    items = list_class_folder(src, VIDEO_EXTENSIONS, unlabeled)
    src, out = Path(src), Path(out)
    codec = VAECodec(vae_path, batch_size=batch_size).to(device)
    index, skipped, encoded = [], [], 0
    for path, label in tqdm(items, unit="video", desc="encoding videos"):
        member = path.relative_to(src).as_posix() + ".safetensors"
        target = out / member
        if not target.is_file():
            try:
                frames = read_frames(path, resolution, num_frames, frame_stride)
            except (av.error.FFmpegError, ValueError) as error:
                skipped.append(f"{path} ({error})")
                continue
            x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # (1, 3, T, H, W)
            mean, std = codec.moments(x)
            payload = {"mean": mean[0].float().contiguous(), "std": std[0].float().contiguous()}  # (C, T, h, w)
            write_atomically(target, safetensors_bytes(payload))
            encoded += 1
        index.append({"path": member, "label": label})
    write_atomically(out / VIDEO_INDEX, "".join(json.dumps(entry) + "\n" for entry in index).encode())
    if skipped:
        more = f" and {len(skipped) - SHOWN} more" if len(skipped) > SHOWN else ""
        warnings.warn(f"skipped {len(skipped)} video(s): {'; '.join(skipped[:SHOWN])}{more}", stacklevel=2)
    return encoded


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="video folder: <source>/<class>/<video>")
    parser.add_argument("--dest", required=True, help="output folder (resumes what is already there)")
    parser.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--num-frames", type=int, default=None, help="frames per video (default: all)")
    parser.add_argument("--frame-stride", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16, help="frames per VAE call")
    parser.add_argument("--unlabeled", action="store_true", help="take every video under --source, all class 0")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    encoded = encode_video_folder(
        args.source, args.dest, args.vae, args.resolution, args.num_frames, args.frame_stride,
        args.batch_size, args.unlabeled, args.device,
    )
    print(f"encoded {encoded} new video(s) into {args.dest}")


if __name__ == "__main__":
    main()
