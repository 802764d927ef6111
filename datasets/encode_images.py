"""Encode a class-folder image dataset, or the images of a caption index, into the REPA/EDM2 latent layout that
`LatentDataset` reads.

    python datasets/encode_images.py --source imagenet/train --dest data/imagenet256 \
        --vae weights/sd-vae-ft-mse --resolution 256 [--zip]

    python datasets/encode_images.py --captions data/photos.jsonl --dest data/sd3-latents \
        --vae weights/stable-diffusion-3-medium-diffusers --resolution 1024

Writes `images/` (ADM centre crops as PNG) and `vae-sd/` (float32 `[mean; std]` of the VAE posterior),
each with a `dataset.json`, in folders of 1000 files; `--zip` packs each tree into `images.zip` and
`vae-sd.zip` at the end (the folders are removed after packing, so rerunning a finished `--zip` run
encodes afresh). Class ids follow the sorted names of the class folders `source/<class>/...`. With `--captions INDEX`
(a JSONL or CSV caption index, `path, caption`, as `CaptionDataset` reads it) the images are the index's, unlabeled,
and `dataset.json` also lists their captions (`LatentDataset` items then carry them, for text-to-image); the index
must list every file once, inside its own folder. `--width W` crops `--resolution` x W instead of a square. `--vae`
is a VAE folder or a diffusers pipeline folder (its vae/).

`<dest>/encoding.json` records the settings (resolution, width, the caption index, the VAE's fingerprint) and, per
source image by its path relative to `--source` (or to the caption index's folder), its item number and content
(size, mtime, sha256). A rerun refuses other settings (another width or caption index too), encodes only new or
changed images, and drops the items of deleted ones (or of rows taken out of the index), so every item keeps the
label or caption of its own source; captions are written afresh from the index on every run, so an edited caption
needs no encoding.
Every file is written atomically and the record after every batch, so a stopped run (Ctrl-C too) resumes where it
stopped. A source that cannot be read is skipped with one line naming it, counted, and retried on the next run.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from sprint_mm.data.captions import check_caption_records, read_caption_index
from sprint_mm.data.latents import CAPTIONS_ENTRY, IMAGES_TREE, LABELS_FILE, LATENTS_TREE, image_member, latent_member
from sprint_mm.data.transforms import resize_center_crop
from sprint_mm.errors import report_mistakes
from sprint_mm.latents import WEIGHT_FILES, VAECodec
from sprint_mm.pipeline_folders import pipeline_component

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
MAX_ITEMS = 10**8  # names carry an 8-digit index
RECORD = "encoding.json"  # the settings and the source of every item, in the destination folder
UNREADABLE = (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError)
KEPT = "what was encoded so far is kept; rerun the same command to continue"
RECORD_EVERY_S = 30.0  # seconds between writes of the record while encoding (a lost write only costs re-encoding)


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


class Source(NamedTuple):
    """A source file: `name` keys its item in the record (its path relative to `--source` or to the caption index's
    folder), `tag` is its class id or its caption."""

    name: str
    path: Path
    tag: int | str


def list_sources(src: str | os.PathLike | None, captions: str | os.PathLike | None, unlabeled: bool,
                 extensions: Sequence[str]) -> list[Source]:
    """The sources of the class folder `src` (tagged with class ids) or of the caption index `captions` (tagged with
    their captions), in listing order."""
    if (src is None) == (captions is None):
        raise ValueError("give --source (a class folder) or --captions (a caption index)"
                         + ("" if src is None else ", not both"))
    if captions is not None:
        if unlabeled:
            raise ValueError("--unlabeled gives every file under --source class 0; the images of a caption index are "
                             "unlabeled already: leave it out")
        return caption_sources(Path(captions))
    return [Source(path.relative_to(src).as_posix(), path, label)
            for path, label in list_class_folder(src, extensions, unlabeled)]


def caption_sources(index: Path) -> list[Source]:
    """The files of a caption index, named by their path relative to its folder. Refused at start: a missing file,
    captions that are all empty, a file outside the index's folder (it has no such name) or listed twice (an item
    holds one caption)."""
    records = read_caption_index(index)
    check_caption_records(index, records)
    if len(records) > MAX_ITEMS:
        raise ValueError(f"{str(index)!r} lists {len(records)} files; the layout's 8-digit names allow {MAX_ITEMS}")
    root = Path(os.path.abspath(index.parent))
    sources, first_row = [], {}
    for record in records:
        path = Path(os.path.abspath(record.path))  # lexically normalised: "a/../b.png" is b.png
        if not path.is_relative_to(root):
            raise ValueError(f"{record.where}: {str(record.path)!r} lies outside the caption index's folder "
                             f"{str(root)!r}; items are named by their path relative to it: put the index in a folder "
                             "above its files")
        name = path.relative_to(root).as_posix()
        if name in first_row:
            raise ValueError(f"{record.where} lists {name!r} again (first at {first_row[name]}): an item holds one "
                             "caption; keep one row per file")
        first_row[name] = record.where
        sources.append(Source(name, record.path, record.caption))
    return sources


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


def check_pixels(option: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} must be a positive number of pixels, got {value}")


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _write_labels(tree: Path, members: list[str], labels: Optional[list[int]], captions: Optional[list[str]]) -> None:
    content: dict[str, Any] = {"labels": None if labels is None else [list(pair) for pair in zip(members, labels)]}
    if captions is not None:
        content[CAPTIONS_ENTRY] = [list(pair) for pair in zip(members, captions)]
    write_atomically(tree / LABELS_FILE, json.dumps(content).encode())


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


# ----------------------------------------------------------------------------------------------
# The record of an encoding: its settings, and where every item comes from
# ----------------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def vae_fingerprint(folder: str | os.PathLike) -> str:
    """sha256 over the VAE folder's config.json and weight files (a pipeline folder's vae/): the same VAE in another
    folder has the same one."""
    folder = pipeline_component(folder, "vae", "VAE")
    digest = hashlib.sha256()
    for name in ("config.json", *WEIGHT_FILES):
        if (Path(folder) / name).is_file():
            digest.update(f"{name}:{file_sha256(Path(folder) / name)};".encode())
    return digest.hexdigest()


def source_state(path: Path, known: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """A source file's size, mtime and sha256; the sha256 is taken from `known` (its record) while size and mtime are
    unchanged, so a rerun hashes only files that were touched."""
    stat = path.stat()
    state = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if known is not None and all(known.get(key) == value for key, value in state.items()):
        return {**state, "sha256": known["sha256"]}
    return {**state, "sha256": file_sha256(path)}


def read_record(out: Path, trees: Sequence[str] = ()) -> Optional[dict[str, Any]]:
    """The destination's record; None for a new destination. A destination that holds one of `trees` (a folder or
    its .zip) but no record was written by an earlier version that named items by their position in the listing: it
    cannot be checked, and is refused."""
    path = out / RECORD
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError as error:
            raise ValueError(f"{path} is damaged ({error}); encode into a new --dest") from None
    earlier = [name for name in trees if (out / name).exists() or (out / f"{name}.zip").exists()]
    if earlier:
        raise ValueError(f"{out} holds {', '.join(earlier)} but no {RECORD}: it was encoded by an earlier version "
                         "whose items are named by their place in the source listing, so a changed source would give "
                         "them wrong labels; encode into a new --dest")
    return None


def shape_and_index_settings(resolution: int, width: Optional[int], captions: str | os.PathLike | None
                             ) -> dict[str, Any]:
    """The settings `--width` and `--captions` add to the record: a width other than the resolution, and the caption
    index (by its absolute path). Each is present only when given, so a record written before they existed matches a
    run without them."""
    settings: dict[str, Any] = {}
    if width is not None and width != resolution:
        settings["width"] = width
    if captions is not None:
        settings["captions"] = os.path.abspath(captions)
    return settings


def check_settings(out: Path, record: Optional[dict[str, Any]], settings: dict[str, Any]) -> None:
    """Refuse to add to an encoding made with other settings (items of two sizes or two VAEs in one dataset, labels
    and captions mixed)."""
    if record is None or record["settings"] == settings:
        return
    then = record["settings"]
    differ = [f"{key} {then.get(key)!r} then, {settings.get(key)!r} now" for key in {**then, **settings}
              if then.get(key) != settings.get(key)]
    raise ValueError(f"{out} was encoded with other settings ({'; '.join(differ)}): a rerun adds only to an encoding "
                     "of the same settings; use them, or encode into a new --dest")


def write_record(out: Path, settings: dict[str, Any], items: dict[str, dict[str, Any]]) -> None:
    write_atomically(out / RECORD, json.dumps({"settings": settings, "items": items}, indent=1).encode())


def say_skipped(name: str, error: BaseException) -> None:
    """One line per source that cannot be read."""
    tqdm.write(f"skipped {name}: cannot read it ({type(error).__name__}: {error})", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------


def plan_images(sources: list[Source], known: dict[str, dict[str, Any]], out: Path
                ) -> tuple[dict[str, dict[str, Any]], list[tuple[str, Path, dict[str, Any]]], list[str]]:
    """(the record of every listed source, the (name, path, state) of those to encode, the names of deleted sources).

    An item keeps its number while its source keeps its path; a new source gets the next unused number. A source to
    encode (new, changed, or its files missing) is recorded with sha256 None until its files are written, so an
    interrupted run encodes it again under the same number."""
    images_dir, latents_dir = out / IMAGES_TREE, out / LATENTS_TREE
    listed = {source.name: source.path for source in sources}
    deleted = [name for name in known if name not in listed]
    next_index = max((entry["index"] for entry in known.values()), default=-1) + 1
    records, todo = {}, []
    for name, path in listed.items():
        entry = known.get(name)
        if entry is None:
            entry, next_index = {"index": next_index, "sha256": None}, next_index + 1
        state = source_state(path, entry if entry["sha256"] else None)
        index = entry["index"]
        done = (entry["sha256"] == state["sha256"] and (images_dir / image_member(index)).is_file()
                and (latents_dir / latent_member(index)).is_file())
        records[name] = {"index": index, **state} if done else {"index": index, "sha256": None}
        if not done:
            todo.append((name, path, state))
    return records, todo, deleted


def remove_item(out: Path, index: int) -> None:
    for path in (out / IMAGES_TREE / image_member(index), out / LATENTS_TREE / latent_member(index)):
        path.unlink(missing_ok=True)


def encode_batch(codec: VAECodec, batch: list[tuple[str, Path, dict[str, Any]]], records: dict[str, dict[str, Any]],
                 out: Path, resolution: int, width: Optional[int] = None) -> int:
    """Encode and write one batch, recording each item's source state; a source that cannot be read is skipped with
    one line, its item removed. Returns how many were encoded."""
    pixels, done = [], []
    for name, path, state in batch:
        try:
            with Image.open(path) as image:
                pixels.append(center_crop_adm(image, resolution, width))
            done.append((name, state))
        except UNREADABLE as error:
            say_skipped(name, error)
            remove_item(out, records.pop(name)["index"])
    if done:
        x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, H, W)
        mean, std = codec.moments(x)
        moments = torch.cat([mean, std], dim=1).float().numpy()  # (B, 2C, h, w)
        for (name, state), image_pixels, item_moments in zip(done, pixels, moments):
            index = records[name]["index"]
            write_atomically(out / IMAGES_TREE / image_member(index), _png_bytes(image_pixels))
            write_atomically(out / LATENTS_TREE / latent_member(index), _npy_bytes(item_moments))
            records[name] = {"index": index, **state}
    return len(done)


def encode_image_folder(
    src: str | os.PathLike | None,
    out: str | os.PathLike,
    vae_path: str,
    resolution: int = 256,
    batch_size: int = 16,
    zip_output: bool = False,
    unlabeled: bool = False,
    device: str = "cpu",
    width: Optional[int] = None,
    captions: str | os.PathLike | None = None,
) -> int:
    """Encode `src` (or the images of the caption index `captions`) into the layout under `out`, crops of
    `resolution` x `width` (default: square); returns how many items this call encoded (0 if all were done).
    Sources that cannot be read are skipped with one line each (`say_skipped`) and left out of the labels."""
    check_pixels("--resolution", resolution)
    if width is not None:
        check_pixels("--width", width)
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    out = Path(out)
    sources = list_sources(src, captions, unlabeled, IMAGE_EXTENSIONS)
    codec = VAECodec(vae_path, batch_size=batch_size).to(device)  # a missing VAE is refused here, in one line
    settings = {"resolution": resolution, "vae": vae_fingerprint(vae_path), "unlabeled": unlabeled,
                **shape_and_index_settings(resolution, width, captions)}
    record = read_record(out, (IMAGES_TREE, LATENTS_TREE))
    check_settings(out, record, settings)
    known = {} if record is None else record["items"]
    records, todo, deleted = plan_images(sources, known, out)
    for name in deleted:
        remove_item(out, known[name]["index"])
    write_record(out, settings, records)
    encoded, saved = 0, time.monotonic()
    try:
        with tqdm(total=len(sources), initial=len(sources) - len(todo), unit="img", desc="encoding images") as progress:
            for start in range(0, len(todo), batch_size):
                encoded += encode_batch(codec, todo[start : start + batch_size], records, out, resolution, width)
                progress.update(len(todo[start : start + batch_size]))
                if time.monotonic() - saved > RECORD_EVERY_S:
                    write_record(out, settings, records)
                    saved = time.monotonic()
    finally:  # also on Ctrl-C: what was written is recorded
        write_record(out, settings, records)
    write_labels(out, sources, records, captioned=captions is not None)
    if zip_output:
        pack_tree(out / IMAGES_TREE)
        pack_tree(out / LATENTS_TREE)
    return encoded


def write_labels(out: Path, sources: list[Source], records: dict[str, dict[str, Any]], captioned: bool) -> None:
    """Both trees' dataset.json: every encoded item with the label (or, `captioned`, the caption and no label) of its
    own source, as listed now."""
    tagged = sorted((records[source.name]["index"], source.tag) for source in sources if source.name in records)
    tags = [tag for _, tag in tagged]
    for tree, member in ((IMAGES_TREE, image_member), (LATENTS_TREE, latent_member)):
        _write_labels(out / tree, [member(index) for index, _ in tagged], None if captioned else tags,
                      tags if captioned else None)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help="image folder: <source>/<class>/<image>")
    parser.add_argument("--captions", help="a caption index (JSONL/CSV: path, caption) instead of --source")
    parser.add_argument("--dest", required=True, help="output folder (resumes what is already there)")
    parser.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder, or a pipeline folder")
    parser.add_argument("--resolution", type=int, default=256, help="height (and width, unless --width) in pixels")
    parser.add_argument("--width", type=int, help="width in pixels (default: --resolution)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--zip", action="store_true", help="pack each tree into a .zip archive at the end")
    parser.add_argument("--unlabeled", action="store_true", help="take every image under --source, all class 0")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def encode_command(args: argparse.Namespace) -> None:
    encoded = encode_image_folder(
        args.source, args.dest, args.vae, args.resolution, args.batch_size, args.zip, args.unlabeled, args.device,
        args.width, args.captions,
    )
    print(f"encoded {encoded} new image(s) into {args.dest}")


def main(argv: Sequence[str] | None = None) -> int:
    """0 done; 2 and one `error:` line for a mistake (a missing source, caption index or VAE, --resolution 0, other
    settings than the destination's); 130 and one line on Ctrl-C."""
    return report_mistakes(encode_command, parse_args(argv), interrupted=KEPT)


if __name__ == "__main__":
    sys.exit(main())
