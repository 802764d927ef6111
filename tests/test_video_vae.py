"""Causal video VAEs (Wan, CogVideoX, LTX-Video) as latent codecs and in encode_videos.py, on tiny random VAEs."""
from __future__ import annotations

import json

import gin
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sprint_mm.configs import parse_gin
from sprint_mm.data.latents import VideoLatentDataset
from sprint_mm.latents import VIDEO_VAES, VideoVAECodec, build_codec
from tests.helpers import dataset_script
from tests.test_latents import write_test_video

encode_images = dataset_script("encode_images")
encode_videos = dataset_script("encode_videos")  # imports encode_images, loaded first

diffusers = pytest.importorskip("diffusers")
av = pytest.importorskip("av")

SIDE = 16  # pixels; every tiny VAE divides it
LATENT_MEAN = [0.3, -0.5, 0.1, 0.8]
LATENT_STD = [1.5, 0.5, 2.0, 0.8]


def _tiny(name: str):
    """A randomly initialised VAE of class `name` with 4 latent channels and per-channel statistics that matter."""
    torch.manual_seed(0)
    if name == "AutoencoderKLWan":  # spatial 4 (3 stages), temporal 4
        return diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1,
                                          temperal_downsample=[True, True], latents_mean=LATENT_MEAN,
                                          latents_std=LATENT_STD)
    if name == "AutoencoderKLCogVideoX":  # spatial 4, temporal 4
        return diffusers.AutoencoderKLCogVideoX(
            down_block_types=("CogVideoXDownBlock3D",) * 3, up_block_types=("CogVideoXUpBlock3D",) * 3,
            block_out_channels=(8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=4, scaling_factor=0.7)
    vae = diffusers.AutoencoderKLLTXVideo(  # spatial 8, temporal 8, a timestep-conditioned decoder like LTX 0.9.1
        latent_channels=4, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
        layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5, patch_size=1, scaling_factor=0.8,
        timestep_conditioning=True)
    vae.latents_mean.copy_(torch.tensor(LATENT_MEAN))
    vae.latents_std.copy_(torch.tensor(LATENT_STD))
    return vae


# class -> (spatial, temporal) of the tiny VAE
TINY = {"AutoencoderKLWan": (4, 4), "AutoencoderKLCogVideoX": (4, 4), "AutoencoderKLLTXVideo": (8, 8)}


@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory) -> dict[str, str]:
    folders = {}
    for name in TINY:
        folder = tmp_path_factory.mktemp(name)
        _tiny(name).save_pretrained(folder)
        folders[name] = str(folder)
    return folders


def _normalise_by_hand(name: str, vae, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The families' documented normalisation of a batch z (B, C, ...), written out: (latent, factor on the std)."""
    channel = (-1,) + (1,) * (z.dim() - 2)
    if name == "AutoencoderKLWan":  # WanPipeline: (z - latents_mean) / latents_std from the config
        mean = torch.tensor(vae.config.latents_mean).view(channel)
        std = torch.tensor(vae.config.latents_std).view(channel)
        return (z - mean) / std, 1 / std
    if name == "AutoencoderKLCogVideoX":  # CogVideoX: z * scaling_factor
        return z * vae.config.scaling_factor, torch.tensor(vae.config.scaling_factor)
    factor = vae.config.scaling_factor / vae.latents_std.view(channel)  # LTXPipeline._normalize_latents
    return (z - vae.latents_mean.view(channel)) * factor, factor


def test_full_size_configs_give_the_documented_factors():
    expected = {  # class: (latent channels, spatial, temporal)
        "AutoencoderKLWan": (16, 8, 4), "AutoencoderKLCogVideoX": (16, 8, 4), "AutoencoderKLLTXVideo": (128, 32, 8),
    }
    for name, (channels, spatial, temporal) in expected.items():
        with torch.device("meta"):
            facts = VIDEO_VAES[name](getattr(diffusers, name)())  # diffusers' default config = the released model
        assert (facts.latent_channels, facts.spatial, facts.temporal) == (channels, spatial, temporal)
        assert facts.shift.shape == facts.scale.shape == (channels,)


@pytest.mark.parametrize("name", list(TINY))
def test_codec_matches_diffusers_with_the_family_normalisation(name, vae_dirs):
    spatial, temporal = TINY[name]
    reference = getattr(diffusers, name).from_pretrained(vae_dirs[name], local_files_only=True).eval()
    codec = VideoVAECodec(vae_dirs[name], batch_size=1)  # 2 clips: two VAE calls
    assert codec.vae_class == name
    assert (codec.latent_channels, codec.downsample, codec.temporal_downsample) == (4, spatial, temporal)
    assert [codec.latent_frames(f) for f in (1, 1 + temporal, 1 + 2 * temporal)] == [1, 2, 3]
    assert codec.pixel_frames(3) == 1 + 2 * temporal

    torch.manual_seed(1)
    clip = torch.rand(2, 3, 1 + 2 * temporal, SIDE, SIDE) * 2 - 1
    with torch.no_grad():
        posterior = reference.encode(clip).latent_dist
    mean, std = codec.moments(clip)
    assert mean.shape == (2, 4, 3, SIDE // spatial, SIDE // spatial)
    torch.testing.assert_close(mean, posterior.mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(std, posterior.std, atol=1e-5, rtol=1e-4)
    by_hand, std_factor = _normalise_by_hand(name, reference, posterior.mean)
    latent = codec.encode(clip)
    torch.testing.assert_close(latent, by_hand, atol=1e-5, rtol=1e-4)
    normalised_mean, normalised_std = codec.normalised_moments(clip)
    torch.testing.assert_close(normalised_mean, by_hand, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(normalised_std, posterior.std * std_factor, atol=1e-5, rtol=1e-4)

    with torch.no_grad():  # decode: undo the normalisation by hand, then the diffusers decoder
        z = posterior.mean
        temb = torch.zeros(2) if name == "AutoencoderKLLTXVideo" else None
        decoded = reference.decode(z, temb).sample if temb is not None else reference.decode(z).sample
    pixels = codec.decode(latent)
    assert pixels.shape == clip.shape
    torch.testing.assert_close(pixels, decoded, atol=1e-4, rtol=1e-3)

    image = clip[:, :, 0]  # a still image is a one-frame clip, and stays 4-D
    with torch.no_grad():
        one_frame = reference.encode(image[:, :, None]).latent_dist.mean[:, :, 0]
    still = codec.encode(image)
    assert still.shape == (2, 4, SIDE // spatial, SIDE // spatial)
    torch.testing.assert_close(still, _normalise_by_hand(name, reference, one_frame)[0], atol=1e-5, rtol=1e-4)
    assert codec.decode(still).shape == image.shape

    sampling = VideoVAECodec(vae_dirs[name], sample=True)
    torch.manual_seed(3)
    drawn = sampling.encode(clip)
    torch.manual_seed(3)
    noise = torch.randn_like(posterior.std)
    torch.testing.assert_close(drawn, _normalise_by_hand(name, reference, posterior.mean + posterior.std * noise)[0],
                               atol=1e-5, rtol=1e-4)
    codec.train()
    assert not codec.vae.training and not any(p.requires_grad for p in codec.parameters())


def test_wrong_frame_count_or_size_is_one_clear_error(vae_dirs):
    codec = VideoVAECodec(vae_dirs["AutoencoderKLWan"])
    with pytest.raises(ValueError, match=r"^8 frames: AutoencoderKLWan encodes clips of 1 \+ 4k: allowed 1, 5, 9, 13"):
        codec.encode(torch.zeros(1, 3, 8, SIDE, SIDE))
    with pytest.raises(ValueError, match=r"^16 frames: AutoencoderKLLTXVideo encodes clips of 1 \+ 8k: allowed 1, 9"):
        VideoVAECodec(vae_dirs["AutoencoderKLLTXVideo"]).latent_frames(16)
    with pytest.raises(ValueError, match="18x16 pixels: AutoencoderKLWan needs height and width divisible by 4"):
        codec.encode(torch.zeros(1, 3, 5, 18, SIDE))
    with pytest.raises(ValueError, match=r"latents \(B, 4, \[T,\] H, W\), got shape \(1, 3, 2, 4, 4\)"):
        codec.decode(torch.zeros(1, 3, 2, 4, 4))
    with pytest.raises(ValueError, match="latent_frames must be >= 1, got 0"):
        codec.pixel_frames(0)


def test_missing_folder_weights_or_class_is_named(tmp_path, vae_dirs):
    with pytest.raises(FileNotFoundError, match=r"absent'.*must hold config.json and diffusion_pytorch_model"):
        VideoVAECodec(str(tmp_path / "absent"))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan"}))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        VideoVAECodec(str(tmp_path))
    image_vae = tmp_path / "image_vae"
    diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4).save_pretrained(image_vae)
    with pytest.raises(ValueError, match="_class_name 'AutoencoderKL'; VideoVAECodec loads AutoencoderKLWan, "
                                         "AutoencoderKLCogVideoX, AutoencoderKLLTXVideo"):
        VideoVAECodec(str(image_vae))
    with pytest.raises(ValueError, match="vae_class 'AutoencoderKL' is not one of AutoencoderKLWan"):
        VideoVAECodec(vae_dirs["AutoencoderKLWan"], vae_class="AutoencoderKL")


def test_wan_gin_file_builds_the_codec_it_names(vae_dirs):
    parse_gin(["gin/video/wan_latents_stage1.gin"], [f"VideoVAECodec.path = '{vae_dirs['AutoencoderKLWan']}'"])
    codec = build_codec()
    assert isinstance(codec, VideoVAECodec) and codec.vae_class == "AutoencoderKLWan"
    latent_frames, _, _ = gin.query_parameter("video_dit.input_size")
    assert codec.latent_frames(17) == latent_frames == 5
    assert (gin.query_parameter("VideoLatentDataset.scale"), gin.query_parameter("VideoLatentDataset.shift")) == (1, 0)
    assert gin.query_parameter("video_dit.in_channels") == 16  # Wan 2.1's z_dim (see the factors test)


# ---------------------------------------------------------------------------------------- encode_videos.py


@pytest.fixture(scope="module")
def video_source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    for name in ("jump/a.mp4", "jump/b.mp4", "run/c.mp4", "walk/d.mp4", "walk/e.mp4"):
        write_test_video(root / name, rng.integers(0, 256, (6, SIDE, 20, 3), dtype=np.uint8))
    write_test_video(root / "run" / "short.mp4", rng.integers(0, 256, (3, SIDE, SIDE, 3), dtype=np.uint8))
    return root


def test_sharded_video_vae_encoding_round_trips_through_the_dataset(video_source, vae_dirs, tmp_path, capsys):
    wan = vae_dirs["AutoencoderKLWan"]
    out = tmp_path / "latents"
    with pytest.raises(ValueError, match=r"^6 frames: AutoencoderKLWan encodes clips of 1 \+ 4k: allowed 1, 5, 9"):
        encode_videos.encode_video_folder(video_source, out, wan, SIDE, num_frames=6, vae_kind="video")
    with pytest.raises(ValueError, match=r"needs --num-frames: AutoencoderKLWan encodes clips of 1 \+ 4k"):
        encode_videos.encode_video_folder(video_source, out, wan, SIDE, vae_kind="video")
    with pytest.raises(ValueError, match="shard 2 of 2"):
        encode_videos.encode_video_folder(video_source, out, wan, SIDE, num_frames=5, vae_kind="video", shard=2,
                                          num_shards=2)

    # Source order: jump/a, jump/b, run/c, run/short, walk/d, walk/e; shard 0 takes a, c, d.
    first = encode_videos.encode_video_folder(video_source, out, wan, SIDE, num_frames=5, vae_kind="video",
                                              shard=0, num_shards=2)
    written_by_first = {p.relative_to(out).as_posix() for p in out.rglob("*.safetensors")}
    assert first == 3 and not (out / "index.jsonl").exists()  # shard 1 has not run yet
    # shard 1: b, short (3 frames < 5: skipped with one line), e
    assert encode_videos.main(["--source", str(video_source), "--dest", str(out), "--vae", wan, "--vae-kind", "video",
                               "--resolution", str(SIDE), "--num-frames", "5", "--shard", "1", "--num-shards", "2",
                               "--device", "cpu"]) == 0
    assert "skipped run/short.mp4: cannot read it (ValueError: " in capsys.readouterr().err
    everything = {p.relative_to(out).as_posix() for p in out.rglob("*.safetensors")}
    assert written_by_first == {"jump/a.mp4.safetensors", "run/c.mp4.safetensors", "walk/d.mp4.safetensors"}
    assert everything - written_by_first == {"jump/b.mp4.safetensors", "walk/e.mp4.safetensors"}

    listing = encode_images.list_class_folder(video_source, encode_videos.VIDEO_EXTENSIONS, unlabeled=False)
    expected = [{"path": p.relative_to(video_source).as_posix() + ".safetensors", "label": label}
                for p, label in listing if p.name != "short.mp4"]
    lines = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert lines == expected  # every video once, in source order, whichever shard encoded it

    reference = diffusers.AutoencoderKLWan.from_pretrained(wan, local_files_only=True).eval()
    dataset = VideoLatentDataset(str(out), scale=1.0, shift=0.0)  # the bindings of gin/video/wan_latents_stage1.gin
    for item, entry in enumerate(lines):
        frames = encode_videos.read_frames(video_source / entry["path"].removesuffix(".safetensors"), SIDE, 5)
        clip = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        with torch.no_grad():
            posterior = reference.encode(clip).latent_dist
        torch.manual_seed(item)
        drawn = dataset[item]
        torch.manual_seed(item)
        z = posterior.mean[0] + posterior.std[0] * torch.randn(4, 2, 4, 4)  # 1 + 4k = 5 frames -> 2 latent frames
        torch.testing.assert_close(drawn["x"], _normalise_by_hand("AutoencoderKLWan", reference, z[None])[0][0],
                                   atol=1e-4, rtol=1e-4)
        assert drawn["label"] == entry["label"]
    with safe_open(out / lines[0]["path"], "pt") as stored:
        metadata = stored.metadata()
    source = video_source / lines[0]["path"].removesuffix(".safetensors")
    assert metadata == {"vae": "AutoencoderKLWan", "normalised": "true", "resolution": str(SIDE),
                        "source_size": str(source.stat().st_size), "source_mtime_ns": str(source.stat().st_mtime_ns),
                        "source_sha256": encode_images.file_sha256(source)}

    before = load_file(out / "run/c.mp4.safetensors")
    (out / "jump/b.mp4.safetensors").unlink()
    # Resume: shard 0 has nothing left to do; shard 1 encodes only its missing file and merges the index again.
    assert encode_videos.encode_video_folder(video_source, out, wan, SIDE, num_frames=5, vae_kind="video",
                                             shard=0, num_shards=2) == 0
    assert encode_videos.encode_video_folder(video_source, out, wan, SIDE, num_frames=5, vae_kind="video",
                                             shard=1, num_shards=2) == 1
    assert "skipped run/short.mp4" in capsys.readouterr().err
    assert (out / "jump/b.mp4.safetensors").is_file()
    torch.testing.assert_close(load_file(out / "run/c.mp4.safetensors"), before, atol=0, rtol=0)
    assert [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()] == expected
