"""Latent codecs, the dataset encoding scripts and the latent datasets, on a tiny random VAE."""
from __future__ import annotations

import io
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sprint_mm.data.latents import LatentDataset, VideoLatentDataset, image_member, latent_member
from sprint_mm.latents import IdentityCodec, VAECodec, build_codec
from tests.helpers import dataset_script
from tests.latent_layouts import write_latent_layout

encode_images = dataset_script("encode_images")
encode_videos = dataset_script("encode_videos")  # imports encode_images, loaded first

diffusers = pytest.importorskip("diffusers")
av = pytest.importorskip("av")

RESOLUTION = 16
# (class folder, file name, width, height); classes sort as cat=0, dog=1.
SOURCE_IMAGES = [
    ("cat", "a.png", 16, 16),  # already the target size: copied as is
    ("cat", "b.png", 32, 16),  # wide: only the centre columns 8..24 are kept
    ("cat", "c.png", 48, 32),  # box-halved, then resized and cropped
    ("dog", "a.png", 16, 24),
    ("dog", "b.png", 20, 20),
]
LABELS = [0, 0, 0, 1, 1]


def _tiny_vae() -> diffusers.AutoencoderKL:
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=RESOLUTION,
    )


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("vae")
    _tiny_vae().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def reference_vae(vae_dir) -> diffusers.AutoencoderKL:
    return diffusers.AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).eval()


@pytest.fixture(scope="module")
def image_source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("source")
    rng = np.random.default_rng(0)
    for folder, name, width, height in SOURCE_IMAGES:
        (root / folder).mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / folder / name)
    return root


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, image_source, vae_dir) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("encoded")
    count = encode_images.encode_image_folder(image_source, out, vae_dir, RESOLUTION, batch_size=2)
    return out, count


@pytest.fixture(scope="module")
def zipped(tmp_path_factory, image_source, vae_dir) -> Path:
    out = tmp_path_factory.mktemp("zipped")
    encode_images.main(
        ["--source", str(image_source), "--dest", str(out), "--vae", vae_dir,
         "--resolution", str(RESOLUTION), "--batch-size", "3", "--zip", "--device", "cpu"]
    )
    return out


def _to_pixels(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1


# ---------------------------------------------------------------------------------------- codecs


def test_vae_codec_matches_diffusers(vae_dir, reference_vae):
    torch.manual_seed(1)
    x = torch.rand(5, 3, RESOLUTION, RESOLUTION) * 2 - 1
    codec = VAECodec(vae_dir, batch_size=2)  # 5 inputs: chunks of 2, 2, 1
    with torch.no_grad():
        posterior = reference_vae.encode(x).latent_dist
        decoded = reference_vae.decode(posterior.mean).sample
    assert codec.scale == reference_vae.config.scaling_factor and codec.shift == 0.0
    assert (codec.latent_channels, codec.downsample) == (4, 2)
    mean, std = codec.moments(x)
    torch.testing.assert_close(mean, posterior.mean)
    torch.testing.assert_close(std, posterior.std)
    torch.testing.assert_close(codec.encode(x), posterior.mean * reference_vae.config.scaling_factor)
    torch.testing.assert_close(codec.decode(codec.encode(x)), decoded, atol=1e-5, rtol=1e-4)
    explicit = VAECodec(vae_dir, scale=0.5, shift=0.1)
    torch.testing.assert_close(explicit.encode(x), (posterior.mean - 0.1) * 0.5)
    codec.train()
    assert not codec.vae.training and not any(p.requires_grad for p in codec.parameters())


def test_vae_codec_reads_scale_and_shift_from_config(tmp_path):
    vae = _tiny_vae()
    vae.register_to_config(scaling_factor=1.5, shift_factor=0.25)
    vae.save_pretrained(tmp_path)
    codec = VAECodec(str(tmp_path))
    x = torch.rand(2, 3, RESOLUTION, RESOLUTION) * 2 - 1
    mean, _ = codec.moments(x)
    assert (codec.scale, codec.shift) == (1.5, 0.25)
    torch.testing.assert_close(codec.encode(x), (mean - 0.25) * 1.5)
    torch.testing.assert_close(codec.decode(codec.encode(x)), codec.vae.decode(mean).sample, atol=1e-5, rtol=1e-4)


def test_vae_codec_missing_folder_names_path_and_contents(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json.*diffusion_pytorch_model") as info:
        VAECodec(str(tmp_path / "absent"))
    assert "absent" in str(info.value)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        VAECodec(str(tmp_path))


def test_vae_codec_encodes_video_frame_by_frame(vae_dir):
    codec = VAECodec(vae_dir, batch_size=4)  # 2 videos x 3 frames: chunks cross video boundaries
    torch.manual_seed(2)
    video = torch.rand(2, 3, 3, RESOLUTION, RESOLUTION) * 2 - 1  # (B, C, T, H, W)
    latent = codec.encode(video)
    assert latent.shape == (2, 4, 3, 8, 8)
    per_frame = torch.stack([codec.encode(video[:, :, t]) for t in range(3)], dim=2)
    torch.testing.assert_close(latent, per_frame)
    decoded = codec.decode(latent)
    torch.testing.assert_close(decoded, torch.stack([codec.decode(latent[:, :, t]) for t in range(3)], dim=2))


def test_identity_codec_round_trip_and_build_codec(vae_dir):
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    codec = build_codec("identity")
    assert isinstance(codec, IdentityCodec) and (codec.latent_channels, codec.downsample) == (3, 1)
    assert torch.equal(codec.decode(codec.encode(x)), x)
    with pytest.raises(ValueError, match="expects"):
        codec.encode(torch.rand(2, 4, 8, 8))
    assert isinstance(build_codec("vae", path=vae_dir), VAECodec)
    with pytest.raises(KeyError, match="identity, vae"):
        build_codec("vqgan")


# ---------------------------------------------------------------------------------------- encoding images


def test_encoded_layout_and_labels(encoded, image_source):
    out, count = encoded
    assert count == len(SOURCE_IMAGES)
    for tree, member in (("images", image_member), ("vae-sd", latent_member)):
        content = json.loads((out / tree / "dataset.json").read_text())
        assert content == {"labels": [[member(i), label] for i, label in enumerate(LABELS)]}
        assert all((out / tree / member(i)).is_file() for i in range(len(SOURCE_IMAGES)))
    stored = [np.array(Image.open(out / "images" / image_member(i))) for i in range(len(SOURCE_IMAGES))]
    assert all(image.shape == (RESOLUTION, RESOLUTION, 3) and image.dtype == np.uint8 for image in stored)
    source = [np.array(Image.open(image_source / folder / name)) for folder, name, _, _ in SOURCE_IMAGES]
    assert np.array_equal(stored[0], source[0])
    assert np.array_equal(stored[1], source[1][:, 8:24])


def test_stored_moments_equal_vae_posterior(encoded, reference_vae):
    out, _ = encoded
    for index in range(len(SOURCE_IMAGES)):
        moments = np.load(out / "vae-sd" / latent_member(index))
        pixels = _to_pixels(np.array(Image.open(out / "images" / image_member(index))))
        with torch.no_grad():
            posterior = reference_vae.encode(pixels).latent_dist
        assert moments.dtype == np.float32 and moments.shape == (8, 8, 8)
        expected = torch.cat([posterior.mean, posterior.std], dim=1)[0]
        torch.testing.assert_close(torch.from_numpy(moments), expected, atol=1e-5, rtol=1e-4)


def test_folder_and_zip_layouts_give_the_same_items(encoded, zipped):
    folder, _ = encoded
    assert sorted(p.name for p in zipped.iterdir()) == ["encoding.json", "images.zip", "vae-sd.zip"]
    for tree in ("images", "vae-sd"):
        on_disk = sorted(p.relative_to(folder / tree).as_posix() for p in (folder / tree).rglob("*") if p.is_file())
        with zipfile.ZipFile(zipped / f"{tree}.zip") as archive:
            assert sorted(archive.namelist()) == on_disk
    from_folder = LatentDataset(str(folder), with_images=True)
    from_zip = LatentDataset(str(zipped), with_images=True)
    assert len(from_folder) == len(from_zip) == len(SOURCE_IMAGES)
    for index in range(len(from_folder)):
        torch.manual_seed(index)
        a = from_folder[index]
        torch.manual_seed(index)
        b = from_zip[index]
        assert a["label"] == b["label"] == LABELS[index]
        assert torch.equal(a["image"], b["image"])
        torch.testing.assert_close(a["x"], b["x"], atol=1e-5, rtol=1e-4)  # batch composition differs by a few ulp
    # The zip handle opened above is not carried into copies: they pickle and reopen it themselves.
    copy = pickle.loads(pickle.dumps(from_zip))
    assert torch.equal(copy[4]["image"], from_folder[4]["image"])
    loader = torch.utils.data.DataLoader(from_zip, batch_size=1, num_workers=2)
    assert [int(batch["label"]) for batch in loader] == LABELS


def test_latent_dataset_item_is_a_scaled_posterior_draw(encoded):
    out, _ = encoded
    dataset = LatentDataset(str(out), with_images=True, scale=0.5, shift=0.1)
    moments = torch.from_numpy(np.load(out / "vae-sd" / latent_member(3)))
    torch.manual_seed(7)
    item = dataset[3]
    torch.manual_seed(7)
    eps = torch.randn(4, 8, 8)
    torch.testing.assert_close(item["x"], (moments[:4] + moments[4:] * eps - 0.1) * 0.5)
    assert item["x"].dtype == torch.float32 and item["label"] == 1
    stored = np.array(Image.open(out / "images" / image_member(3)))
    assert item["image"].dtype == torch.uint8 and torch.equal(item["image"], torch.from_numpy(stored).permute(2, 0, 1))


def test_resume_encodes_only_missing_items(encoded, image_source, vae_dir, tmp_path):
    out = tmp_path / "partial"
    shutil.copytree(encoded[0], out)
    removed = [out / "vae-sd" / latent_member(1), out / "vae-sd" / latent_member(4), out / "images" / image_member(2)]
    originals = {path: path.read_bytes() for path in removed}
    for path in removed:
        path.unlink()
    kept = out / "vae-sd" / latent_member(0)
    kept_mtime = kept.stat().st_mtime_ns
    assert encode_images.encode_image_folder(image_source, out, vae_dir, RESOLUTION, batch_size=2) == 3
    assert kept.stat().st_mtime_ns == kept_mtime
    for path, content in originals.items():
        if path.suffix == ".png":
            assert path.read_bytes() == content
        else:
            np.testing.assert_allclose(np.load(path), np.load(io.BytesIO(content)), atol=1e-5, rtol=1e-4)
    assert not list(out.rglob("*.tmp"))
    assert encode_images.encode_image_folder(image_source, out, vae_dir, RESOLUTION, batch_size=2) == 0


def test_flat_source_folder_needs_unlabeled(tmp_path):
    for name in ("b.png", "a.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    with pytest.raises(ValueError, match="--unlabeled"):
        encode_images.list_class_folder(tmp_path, encode_images.IMAGE_EXTENSIONS, unlabeled=False)
    items = encode_images.list_class_folder(tmp_path, encode_images.IMAGE_EXTENSIONS, unlabeled=True)
    assert items == [(tmp_path / "a.png", 0), (tmp_path / "b.png", 0)]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        encode_images.list_class_folder(tmp_path / "nowhere", encode_images.IMAGE_EXTENSIONS, unlabeled=False)


# ---------------------------------------------------------------------------------------- latent dataset


def test_images_and_latents_pair_by_name(tmp_path):
    indices = [1002, 0, 5]
    means = {i: np.full((2, 2, 2), float(i)) for i in indices}
    stds = {i: np.zeros((2, 2, 2)) for i in indices}
    write_latent_layout(tmp_path, means, stds, {1002: 7, 0: 3, 5: 9})
    dataset = LatentDataset(str(tmp_path), with_images=True, scale=1.0)
    assert [dataset[k]["label"] for k in range(3)] == [3, 9, 7]
    for k in range(3):
        item = dataset[k]
        assert torch.all(item["image"] == int(item["x"][0, 0, 0]) % 256)

    (tmp_path / "vae-sd" / latent_member(5)).unlink()
    assert len(LatentDataset(str(tmp_path))) == 2  # without images nothing needs a partner
    with pytest.raises(FileNotFoundError, match="img-mean-std-00000005.npy"):
        LatentDataset(str(tmp_path), with_images=True)
    (tmp_path / "images" / image_member(5)).unlink()
    (tmp_path / "images" / image_member(1002)).unlink()
    with pytest.raises(FileNotFoundError, match="img00001002.png"):
        LatentDataset(str(tmp_path), with_images=True)


def test_missing_label_or_tree_is_named(tmp_path):
    write_latent_layout(tmp_path, {0: np.zeros((2, 2, 2))}, {0: np.ones((2, 2, 2))}, {0: 1})
    (tmp_path / "vae-sd" / "dataset.json").write_text(json.dumps({"labels": [["00000/other.npy", 1]]}))
    with pytest.raises(KeyError, match="img-mean-std-00000000.npy"):
        LatentDataset(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="vae-sd.zip"):
        LatentDataset(str(tmp_path / "elsewhere"))


def test_latent_draws_have_the_scaled_posterior_statistics(tmp_path):
    rng = np.random.default_rng(3)
    mean, std = rng.normal(size=(4, 2, 2)), rng.uniform(0.5, 2.0, size=(4, 2, 2))
    write_latent_layout(tmp_path, {0: mean}, {0: std}, {0: 0})
    scale, shift, draws = 0.5, 0.2, 4000
    dataset = LatentDataset(str(tmp_path), scale=scale, shift=shift)
    torch.manual_seed(0)
    samples = torch.stack([dataset[0]["x"] for _ in range(draws)]).double()
    expected_mean = torch.from_numpy((mean - shift) * scale)
    expected_std = torch.from_numpy(std * scale)
    tolerance = 5 * expected_std / draws**0.5  # five standard errors of the sample mean
    assert torch.all((samples.mean(0) - expected_mean).abs() < tolerance)
    torch.testing.assert_close(samples.std(0), expected_std, rtol=0.1, atol=0)


# ---------------------------------------------------------------------------------------- videos


def write_test_video(path: Path, frames: np.ndarray) -> None:
    """frames (T, H, W, 3) uint8 as an mpeg4 file that PyAV and decord read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_encoding_is_per_frame_encoding(vae_dir, tmp_path, capsys):
    rng = np.random.default_rng(4)
    source, out = tmp_path / "videos", tmp_path / "latents"
    write_test_video(source / "jump" / "a.mp4", rng.integers(0, 256, (5, 20, 24, 3), dtype=np.uint8))
    write_test_video(source / "run" / "b.mp4", rng.integers(0, 256, (4, RESOLUTION, RESOLUTION, 3), dtype=np.uint8))
    (source / "run" / "broken.mp4").write_bytes(b"not a video")
    count = encode_videos.encode_video_folder(source, out, vae_dir, RESOLUTION, num_frames=4, batch_size=3)
    assert count == 2
    skipped = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert skipped[0].startswith("skipped run/broken.mp4: cannot read it (InvalidDataError") and len(skipped) == 2
    assert skipped[1].startswith("skipped 1 video(s) that cannot be read")

    lines = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert lines == [{"path": "jump/a.mp4.safetensors", "label": 0}, {"path": "run/b.mp4.safetensors", "label": 1}]
    codec = VAECodec(vae_dir)
    for entry in lines:
        stored = load_file(out / entry["path"])
        frames = encode_videos.read_frames(source / entry["path"].removesuffix(".safetensors"), RESOLUTION, 4)
        assert stored["mean"].shape == stored["std"].shape == (4, 4, 8, 8)
        for t, frame in enumerate(frames):
            mean, std = codec.moments(_to_pixels(frame))
            torch.testing.assert_close(stored["mean"][:, t], mean[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(stored["std"][:, t], std[0], atol=1e-5, rtol=1e-4)

    with av.open(str(source / "run" / "b.mp4")) as container:
        decoded = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    assert np.array_equal(encode_videos.read_frames(source / "run" / "b.mp4", RESOLUTION), decoded)

    stored = load_file(out / "run" / "b.mp4.safetensors")
    archive = Path(shutil.make_archive(str(tmp_path / "packed"), "zip", out))
    for dataset in (VideoLatentDataset(str(out), scale=0.5), VideoLatentDataset(str(archive), scale=0.5)):
        torch.manual_seed(5)
        item = dataset[1]
        torch.manual_seed(5)
        torch.testing.assert_close(item["x"], (stored["mean"] + stored["std"] * torch.randn(4, 4, 8, 8)) * 0.5)
        assert item["label"] == 1
    assert encode_videos.encode_video_folder(source, out, vae_dir, RESOLUTION, num_frames=4) == 0
    assert "skipped run/broken.mp4" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- encode_images.py reruns


def labels_by_source(out: Path, src: Path) -> dict[str, int]:
    """Each encoded item's label, keyed by the source its record names."""
    record = json.loads((out / "encoding.json").read_text())["items"]
    labels = dict(json.loads((out / "vae-sd" / "dataset.json").read_text())["labels"])
    return {name: labels[latent_member(entry["index"])] for name, entry in record.items()}


def test_a_rerun_follows_deleted_added_and_changed_sources(image_source, vae_dir, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(image_source, src)
    assert encode_images.encode_image_folder(src, out, vae_dir, RESOLUTION, batch_size=2) == 5
    first = {name: np.load(out / "vae-sd" / latent_member(entry["index"])) for name, entry in
             json.loads((out / "encoding.json").read_text())["items"].items()}
    (src / "cat" / "b.png").unlink()  # by position, every later item would now take its neighbour's label
    (src / "ant").mkdir()  # a new first class: cat becomes 1, dog 2
    Image.new("RGB", (16, 16), (9, 9, 9)).save(src / "ant" / "x.png")
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(src / "dog" / "a.png")  # same path, other content
    assert encode_images.encode_image_folder(src, out, vae_dir, RESOLUTION, batch_size=2) == 2  # ant/x, dog/a
    expected = {"ant/x.png": 0, "cat/a.png": 1, "cat/c.png": 1, "dog/a.png": 2, "dog/b.png": 2}
    assert labels_by_source(out, src) == expected
    record = json.loads((out / "encoding.json").read_text())["items"]
    assert not (out / "vae-sd" / latent_member(1)).exists()  # cat/b's item is gone
    for name in ("cat/a.png", "cat/c.png", "dog/b.png"):
        assert np.array_equal(np.load(out / "vae-sd" / latent_member(record[name]["index"])), first[name])
    assert not np.allclose(np.load(out / "vae-sd" / latent_member(record["dog/a.png"]["index"])), first["dog/a.png"])
    dataset = LatentDataset(str(out), with_images=True)
    assert len(dataset) == 5 and sorted(dataset.labels) == [0, 1, 1, 2, 2]
    assert encode_images.encode_image_folder(src, out, vae_dir, RESOLUTION, batch_size=2) == 0


def run_encoder(argv: list[str], capsys) -> tuple[int, str]:
    code = encode_images.main(argv)
    return code, capsys.readouterr().err


def test_encoder_mistakes_are_one_line_and_a_corrupt_image_is_skipped(image_source, vae_dir, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--dest", str(out), "--device", "cpu", "--batch-size", "2"]
    good = ["--source", str(image_source), "--vae", vae_dir, *common]
    for argv, expected in [
        (["--source", str(tmp_path / "nowhere"), "--vae", vae_dir, *common], "does not exist"),
        ([*good, "--resolution", "0"], "--resolution must be a positive number of pixels, got 0"),
        (["--source", str(image_source), "--vae", str(tmp_path / "no_vae"), *common], "no diffusers AutoencoderKL"),
    ]:
        code, err = run_encoder(argv, capsys)
        assert code == 2 and err.startswith("error: ") and expected in err and "Traceback" not in err
    src = tmp_path / "src"
    shutil.copytree(image_source, src)
    (src / "dog" / "broken.png").write_bytes(b"\x89PNG not an image")
    code, err = run_encoder(["--source", str(src), "--vae", vae_dir, *common, "--resolution", str(RESOLUTION)], capsys)
    assert code == 0 and [line for line in err.splitlines() if "skipped" in line] == [
        "skipped dog/broken.png: cannot read it (UnidentifiedImageError: cannot identify image file "
        f"'{src / 'dog' / 'broken.png'}')"]
    assert labels_by_source(out, src) == dict(zip(["cat/a.png", "cat/b.png", "cat/c.png", "dog/a.png", "dog/b.png"],
                                                  LABELS))
    code, err = run_encoder([*good, "--resolution", "8"], capsys)  # the same destination at another size
    assert code == 2 and "resolution 16 then, 8 now" in err
    earlier = tmp_path / "earlier"  # written before the record existed: items named by position, uncheckable
    shutil.copytree(out, earlier)
    (earlier / "encoding.json").unlink()
    code, err = run_encoder(["--source", str(src), "--vae", vae_dir, "--dest", str(earlier)], capsys)
    assert code == 2 and "no encoding.json" in err


def test_ctrl_c_keeps_what_was_encoded(image_source, vae_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = ["--source", str(image_source), "--dest", str(out), "--vae", vae_dir, "--resolution", str(RESOLUTION),
            "--batch-size", "2", "--device", "cpu"]
    real, calls = encode_images.encode_batch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(encode_images, "encode_batch", interrupted)
    code, err = run_encoder(argv, capsys)
    assert code == 130 and err.strip().splitlines()[-1].startswith("interrupted: what was encoded so far is kept")
    assert "Traceback" not in err
    monkeypatch.setattr(encode_images, "encode_batch", real)
    assert encode_images.encode_image_folder(image_source, out, vae_dir, RESOLUTION, batch_size=2) == 3
    assert labels_by_source(out, image_source) == dict(zip([f"{c}/{n}" for c, n, *_ in SOURCE_IMAGES], LABELS))


# ---------------------------------------------------------------------------------------- caption indexes and --width


def write_caption_index(path: Path, captions: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"path": name, "caption": text}) + "\n" for name, text in captions.items()))
    return path


def test_center_crop_adm_with_a_width_box_halves_while_twice_the_target_on_both_sides():
    pixels = np.random.default_rng(6).integers(0, 256, (40, 96, 3), dtype=np.uint8)  # H 40, W 96
    crop = encode_images.center_crop_adm(Image.fromarray(pixels), 16, 24)
    # 96 >= 2 * 24 and 40 >= 2 * 16: halved once to 48 x 20; 20 < 32 stops it. Covering 16 x 24: scale
    # max(16 / 20, 24 / 48) = 0.8 gives 38 x 16, whose centre 24 columns start at (38 - 24) // 2 = 7.
    by_hand = Image.fromarray(pixels).resize((48, 20), Image.BOX).resize((38, 16), Image.Resampling.BICUBIC)
    assert crop.shape == (16, 24, 3) and np.array_equal(crop, np.array(by_hand)[:, 7:31])
    square = encode_images.center_crop_adm(Image.fromarray(pixels), 16)
    assert np.array_equal(square, encode_images.center_crop_adm(Image.fromarray(pixels), 16, 16))


def captions_by_source(out: Path) -> dict[str, str]:
    """Each encoded item's caption, keyed by the source its record names."""
    record = json.loads((out / "encoding.json").read_text())["items"]
    content = json.loads((out / "vae-sd" / "dataset.json").read_text())
    assert content["labels"] is None
    captions = dict(content["captions"])
    assert len(captions) == len(record)
    return {name: captions[latent_member(entry["index"])] for name, entry in record.items()}


def test_a_caption_index_at_a_width_is_keyed_by_path_and_content_and_reruns_follow_it(vae_dir, tmp_path, capsys):
    rng = np.random.default_rng(7)
    photos = tmp_path / "data" / "photos"
    photos.mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)).save(photos / name)
    index = write_caption_index(tmp_path / "data" / "photos.jsonl",
                                {"photos/a.png": "a cat", "photos/b.png": "a dog", "photos/c.png": "a cow"})
    out = tmp_path / "out"
    argv = ["--captions", str(index), "--dest", str(out), "--vae", vae_dir, "--resolution", str(RESOLUTION),
            "--batch-size", "2", "--device", "cpu"]
    assert encode_images.main([*argv, "--width", "24"]) == 0
    assert captions_by_source(out) == {"photos/a.png": "a cat", "photos/b.png": "a dog", "photos/c.png": "a cow"}
    record = json.loads((out / "encoding.json").read_text())
    assert record["settings"]["width"] == 24 and record["settings"]["captions"] == str(index)
    b_index = record["items"]["photos/b.png"]["index"]
    stored = np.array(Image.open(out / "images" / image_member(b_index)))
    with Image.open(photos / "b.png") as image:
        assert np.array_equal(stored, encode_images.center_crop_adm(image, RESOLUTION, 24))
    first = {name: np.load(out / "vae-sd" / latent_member(entry["index"])) for name, entry in record["items"].items()}
    assert first["photos/a.png"].shape == (8, 8, 12)  # [mean; std] of 4 channels, 16 x 24 px halved

    # An edited caption needs no encoding, a dropped row drops its item, a new row and a changed image are encoded.
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(photos / "d.png")
    Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)).save(photos / "c.png")
    write_caption_index(index, {"photos/a.png": "a black cat", "photos/c.png": "a cow", "photos/d.png": "an owl"})
    assert encode_images.encode_image_folder(None, out, vae_dir, RESOLUTION, batch_size=2, width=24,
                                             captions=str(index)) == 2  # c changed, d new
    assert captions_by_source(out) == {"photos/a.png": "a black cat", "photos/c.png": "a cow", "photos/d.png": "an owl"}
    record = json.loads((out / "encoding.json").read_text())["items"]
    assert not (out / "vae-sd" / latent_member(b_index)).exists()
    assert np.array_equal(np.load(out / "vae-sd" / latent_member(record["photos/a.png"]["index"])),
                          first["photos/a.png"])
    assert not np.allclose(np.load(out / "vae-sd" / latent_member(record["photos/c.png"]["index"])),
                           first["photos/c.png"])
    dataset = LatentDataset(str(out))
    assert sorted(dataset[i]["caption"] for i in range(len(dataset))) == ["a black cat", "a cow", "an owl"]
    capsys.readouterr()

    # Another width, another caption index, or a class folder into the same destination: refused in one line.
    other = write_caption_index(tmp_path / "data" / "other.jsonl", {"photos/a.png": "a cat"})
    for extra, expected in [(["--captions", str(index)], "width 24 then, None now"),
                            (["--captions", str(index), "--width", "32"], "width 24 then, 32 now"),
                            (["--captions", str(other), "--width", "24"], f"captions {str(index)!r} then"),
                            (["--source", str(photos.parent), "--unlabeled", "--width", "24"], "captions")]:
        code, err = run_encoder([*argv[2:], *extra], capsys)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert encode_images.encode_image_folder(None, out, vae_dir, RESOLUTION, width=24, captions=str(index)) == 0


def test_caption_index_mistakes_are_one_line(vae_dir, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "outside.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "data" / "a.png")
    common = ["--dest", str(tmp_path / "out"), "--vae", vae_dir, "--device", "cpu"]
    cases = [
        ({"../outside.png": "x"}, [], "lies outside the caption index's folder"),
        ({"a.png": "x", "./a.png": "y"}, [], "lists 'a.png' again (first at"),
        ({"a.png": "x", "missing.png": "y"}, [], "lists 1 of 2 media file(s) that do not exist"),
        ({"a.png": "x"}, ["--source", str(tmp_path)], "give --source (a class folder) or --captions"),
        ({"a.png": "x"}, ["--unlabeled"], "--unlabeled"),
        ({"a.png": "x"}, ["--width", "0"], "--width must be a positive number of pixels, got 0"),
    ]
    for captions, extra, expected in cases:
        index = write_caption_index(tmp_path / "data" / "index.jsonl", captions)
        code, err = run_encoder(["--captions", str(index), *common, *extra], capsys)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
        assert not (tmp_path / "out" / "encoding.json").exists()


def test_a_pipeline_folder_has_the_fingerprint_of_its_vae(vae_dir, tmp_path):
    pipeline = tmp_path / "pipeline"
    shutil.copytree(vae_dir, pipeline / "vae")
    (pipeline / "model_index.json").write_text("{}")
    other = tmp_path / "other"
    shutil.copytree(vae_dir, other / "vae")
    (other / "model_index.json").write_text("{}")
    config = json.loads((other / "vae" / "config.json").read_text())
    (other / "vae" / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.5}))
    assert encode_images.vae_fingerprint(pipeline) == encode_images.vae_fingerprint(vae_dir)
    assert encode_images.vae_fingerprint(other) != encode_images.vae_fingerprint(pipeline)


def test_captioned_clips_at_a_width_keep_their_layout_and_reruns_rewrite_the_captions(vae_dir, tmp_path, capsys):
    rng = np.random.default_rng(8)
    for name in ("clips/a.mp4", "clips/more/b.mp4"):
        write_test_video(tmp_path / name, rng.integers(0, 256, (4, 20, 40, 3), dtype=np.uint8))
    index = write_caption_index(tmp_path / "clips.jsonl", {"clips/a.mp4": "waves", "clips/more/b.mp4": "rain"})
    out = tmp_path / "latents"
    for shard in (0, 1):  # two shards merge their rows, captions included
        assert encode_videos.encode_video_folder(None, out, vae_dir, RESOLUTION, num_frames=4, width=24,
                                                 captions=str(index), shard=shard, num_shards=2) == 1
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert rows == [{"path": "clips/a.mp4.safetensors", "caption": "waves"},
                    {"path": "clips/more/b.mp4.safetensors", "caption": "rain"}]
    frames = encode_videos.read_frames(tmp_path / "clips/more/b.mp4", RESOLUTION, 4, width=24)
    mean, _ = VAECodec(vae_dir).moments(_to_pixels(frames[2]))
    stored = load_file(out / "clips/more/b.mp4.safetensors")
    assert frames.shape == (4, RESOLUTION, 24, 3) and stored["mean"].shape == (4, 4, 8, 12)
    torch.testing.assert_close(stored["mean"][:, 2], mean[0], atol=1e-5, rtol=1e-4)
    item = VideoLatentDataset(str(out), scale=0.5)[1]
    assert item["caption"] == "rain" and "label" not in item

    write_caption_index(index, {"clips/more/b.mp4": "heavy rain"})  # an edited caption, a dropped row
    assert encode_videos.encode_video_folder(None, out, vae_dir, RESOLUTION, num_frames=4, width=24,
                                             captions=str(index)) == 0
    assert (out / "index.jsonl").read_text() == json.dumps({"path": "clips/more/b.mp4.safetensors",
                                                             "caption": "heavy rain"}) + "\n"
    capsys.readouterr()
    argv = ["--captions", str(index), "--dest", str(out), "--vae", vae_dir, "--num-frames", "4", "--device", "cpu",
            "--resolution", str(RESOLUTION)]
    assert encode_videos.main([*argv, "--width", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "width 24 then, 32 now" in err


def test_video_encoder_reruns_check_the_settings_and_follow_changed_sources(vae_dir, tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(5)
    source, out = tmp_path / "videos", tmp_path / "latents"
    for name in ("jump/a.mp4", "run/b.mp4"):
        write_test_video(source / name, rng.integers(0, 256, (4, RESOLUTION, RESOLUTION, 3), dtype=np.uint8))
    argv = ["--source", str(source), "--dest", str(out), "--vae", vae_dir, "--num-frames", "4", "--device", "cpu"]
    assert encode_videos.main([*argv, "--resolution", str(RESOLUTION)]) == 0
    capsys.readouterr()
    before = {name: load_file(out / f"{name}.safetensors") for name in ("jump/a.mp4", "run/b.mp4")}
    assert encode_videos.main([*argv, "--resolution", "8"]) == 2  # one index would mix 8x8 and 4x4 latents
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "resolution 16 then, 8 now" in err
    assert encode_videos.main([*argv, "--resolution", str(RESOLUTION), "--vae-kind", "video"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "'AutoencoderKL'" in err and "Traceback" not in err
    write_test_video(source / "jump/a.mp4", rng.integers(0, 256, (4, RESOLUTION, RESOLUTION, 3), dtype=np.uint8))
    assert encode_videos.encode_video_folder(source, out, vae_dir, RESOLUTION, num_frames=4) == 1  # a.mp4 changed
    assert not torch.equal(load_file(out / "jump/a.mp4.safetensors")["mean"], before["jump/a.mp4"]["mean"])
    assert torch.equal(load_file(out / "run/b.mp4.safetensors")["mean"], before["run/b.mp4"]["mean"])
    monkeypatch.setattr(encode_videos, "read_frames", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt()))
    (out / "run/b.mp4.safetensors").unlink()
    assert encode_videos.main([*argv, "--resolution", str(RESOLUTION)]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("interrupted: what was encoded so far is kept")
