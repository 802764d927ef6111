"""Encode a class-folder image dataset into the REPA/EDM2 latent layout that `LatentDataset` reads.

    python datasets/encode_images.py --source imagenet/train --dest data/imagenet256 \
        --vae weights/sd-vae-ft-mse --resolution 256 [--zip]

    python datasets/encode_images.py --captions data/photos.jsonl --dest data/sd3-latents \
        --vae weights/stable-diffusion-3-medium-diffusers --resolution 1024

Writes `images/` (ADM centre crops as PNG) and `vae-sd/` (float32 `[mean; std]` of the VAE posterior),
each with a `dataset.json`, in folders of 1000 files; `--zip` packs each tree into `images.zip` and
`vae-sd.zip` at the end (the folders are removed after packing, so rerunning a finished `--zip` run
encodes afresh). Every file is written atomically, so a stopped run resumes where it stopped.
Class ids follow the sorted names of the class folders `source/<class>/...`. With `--captions INDEX` (a JSONL or
CSV caption index, `path, caption`, as `CaptionDataset` reads it) the images are the index's, unlabeled, and
`dataset.json` also lists their captions (`LatentDataset` items then carry them, for text-to-image). `--width W`
crops `--resolution` x W instead of a square. `--vae` is a VAE folder or a diffusers pipeline folder (its vae/).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from sprint_mm.data.captions import read_caption_index
from sprint_mm.data.latents import CAPTIONS_ENTRY, IMAGES_TREE, LABELS_FILE, LATENTS_TREE, image_member, latent_member
from sprint_mm.data.transforms import resize_center_crop
from sprint_mm.latents import VAECodec

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
MAX_ITEMS = 10**8  # names carry an 8-digit index


def list_class_folder(root: str | os.PathLike, extensions: Sequence[str], unlabeled: bool) -> list[tuple[Path, int]]:
    """Files of `root/<class>/...` with their class id (sorted class names), in sorted order.

    With `unlabeled`, every matching file anywhere under `root` gets class 0.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"source folder {str(root)!r} does not exist")

    def media(folder: Path, recursive: bool) -> list[Path]:
        paths = folder.rglob("*") if recursive else folder.iterdir()
        return sorted(p for p in paths if p.is_file() and p.suffix.lower() in extensions)

    if unlabeled:
        items = [(path, 0) for path in media(root, recursive=True)]
    else:
        loose = media(root, recursive=False)
        if loose:
            raise ValueError(
                f"{str(root)!r} has {len(loose)} file(s) outside class folders (e.g. {loose[0].name!r}); "
                "put them in <source>/<class>/ folders, or pass --unlabeled (unlabeled=True) to give all class 0"
            )
        classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        items = [(path, label) for label, folder in enumerate(classes) for path in media(folder, recursive=True)]
    if not items:
        raise FileNotFoundError(f"no files with extensions {', '.join(extensions)} under {str(root)!r}")
    if len(items) > MAX_ITEMS:
        raise ValueError(f"{len(items)} files under {str(root)!r}; the layout's 8-digit names allow {MAX_ITEMS}")
    return items


def write_atomically(path: Path, payload: bytes) -> None:
    """Write beside `path` and rename into place: `path` is either absent or complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_bytes(payload)
    os.replace(partial, path)


def center_crop_adm(image: Image.Image, resolution: int, width: int | None = None) -> np.ndarray:
    """ADM's centre crop: box-halve while the image is at least twice the target on both sides, bicubic-resize it
    to cover `resolution` x `width` (default: a square), cut the centre. Returns (resolution, width, 3) uint8."""
    image = image.convert("RGB")
    height, width = resolution, width or resolution
    while image.size[0] >= 2 * width and image.size[1] >= 2 * height:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    rgb = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, H, W) uint8
    return resize_center_crop(rgb, (height, width), Image.Resampling.BICUBIC).permute(1, 2, 0).numpy()


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _write_labels(tree: Path, members: list[str], labels: list[int] | None, captions: list[str] | None = None) -> None:
    content = {"labels": None if labels is None else [[member, label] for member, label in zip(members, labels)]}
    if captions is not None:
        content[CAPTIONS_ENTRY] = [[member, caption] for member, caption in zip(members, captions)]
    write_atomically(tree / LABELS_FILE, json.dumps(content).encode())


def list_sources(src: str | os.PathLike | None, captions: str | None, unlabeled: bool) -> list[tuple[Path, int | str]]:
    """(file, class id) of a class folder, or (file, caption) of a caption index."""
    if captions is not None:
        return [(record.path, record.caption) for record in read_caption_index(captions)]
    if src is None:
        raise ValueError("give --source (a class folder) or --captions (a caption index)")
    return list_class_folder(src, IMAGE_EXTENSIONS, unlabeled)


def pack_tree(folder: Path) -> Path:
    """Pack `folder` into `folder.zip` (stored, same member names), then remove the folder."""
    archive = folder.with_name(folder.name + ".zip")
    partial = archive.with_name(archive.name + ".tmp")
    members = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix != ".tmp")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as zipped:
        for path in members:
            zipped.write(path, path.relative_to(folder).as_posix())
    os.replace(partial, archive)
    shutil.rmtree(folder)
    return archive


def encode_image_folder(
    src: str | os.PathLike | None,
    out: str | os.PathLike,
    vae_path: str,
    resolution: int = 256,
    batch_size: int = 16,
    zip_output: bool = False,
    unlabeled: bool = False,
    device: str = "cpu",
    width: int | None = None,
    captions: str | None = None,
) -> int:
    """Encode `src` (or the images of the caption index `captions`) into the layout under `out`; returns how many
    items this call encoded (0 if all were done)."""
    if resolution < 1 or (width is not None and width < 1):
        raise ValueError(f"resolution and width must be positive numbers of pixels, got {resolution} and {width}")
    items = list_sources(src, captions, unlabeled)
    images_dir, latents_dir = Path(out) / IMAGES_TREE, Path(out) / LATENTS_TREE
    todo = [
        index
        for index in range(len(items))
        if not ((images_dir / image_member(index)).is_file() and (latents_dir / latent_member(index)).is_file())
    ]
    codec = VAECodec(vae_path, batch_size=batch_size).to(device)
    with tqdm(total=len(items), initial=len(items) - len(todo), unit="img", desc="encoding images") as progress:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            pixels = []
            for index in batch:
                with Image.open(items[index][0]) as image:
                    pixels.append(center_crop_adm(image, resolution, width))
            x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, H, W)
            mean, std = codec.moments(x)
            moments = torch.cat([mean, std], dim=1).float().numpy()  # (B, 2C, h, w)
            for index, image_pixels, item_moments in zip(batch, pixels, moments):
                write_atomically(images_dir / image_member(index), _png_bytes(image_pixels))
                write_atomically(latents_dir / latent_member(index), _npy_bytes(item_moments))
            progress.update(len(batch))
    tags = [tag for _, tag in items]
    labels, texts = (None, tags) if captions is not None else (tags, None)
    _write_labels(images_dir, [image_member(i) for i in range(len(items))], labels, texts)
    _write_labels(latents_dir, [latent_member(i) for i in range(len(items))], labels, texts)
    if zip_output:
        pack_tree(images_dir)
        pack_tree(latents_dir)
    return len(todo)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help="image folder: <source>/<class>/<image>")
    parser.add_argument("--captions", help="a caption index (JSONL/CSV: path, caption) instead of --source")
    parser.add_argument("--dest", required=True, help="output folder (resumes what is already there)")
    parser.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder")
    parser.add_argument("--resolution", type=int, default=256, help="height (and width, unless --width) in pixels")
    parser.add_argument("--width", type=int, help="width in pixels (default: --resolution)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--zip", action="store_true", help="pack each tree into a .zip archive at the end")
    parser.add_argument("--unlabeled", action="store_true", help="take every image under --source, all class 0")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    encoded = encode_image_folder(
        args.source, args.dest, args.vae, args.resolution, args.batch_size, args.zip, args.unlabeled, args.device,
        args.width, args.captions,
    )
    print(f"encoded {encoded} new image(s) into {args.dest}")


if __name__ == "__main__":
    main()
