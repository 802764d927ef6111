"""The families' data path: captioned clips and images encoded by the family's own VAE (a pipeline folder's vae/) into
latents whose items carry their captions, the captions cached with the encoder a recipe trains with (SD3's pooled
vector included), the null caption of a pooled family, Flux's VAE through the image codec, HunyuanVideo's through the
video codec, and the FLOPs of the joint blocks (SD3's MMDiT, Flux's dual- and single-stream blocks)."""
from __future__ import annotations

import json
from pathlib import Path

import gin
import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from registry import BACKBONES
from sprint_mm.conditioning import TextConditioning
from sprint_mm.configs import parse_gin
from sprint_mm.data.latents import LatentDataset, VideoLatentDataset
from sprint_mm.families.text import SD3TextEncoder
from sprint_mm.flops import block_flops
from sprint_mm.latents import VAECodec, VideoVAECodec
from sprint_mm.text import POOLED, EmbeddingCache, TextConditioner
from tests.families import CONFIGS, FLUX_VAE_FACTORS, SAMPLES, SD3_T5_LENGTH, write_pipeline
from tests.helpers import dataset_script
from tests.test_latents import write_test_video

pytest.importorskip("diffusers")
pytest.importorskip("av")
encode_images = dataset_script("encode_images")
encode_videos = dataset_script("encode_videos")
cache_text_embeddings = dataset_script("cache_text_embeddings")

CAPTIONS = {"clips/a.mp4": "a red cat", "clips/b.mp4": "the digit seven", "photos/c.png": "a blue dog"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    return {family: write_pipeline(family, tmp_path_factory.mktemp(family))
            for family in ("wan", "sd3", "flux", "hunyuan_video")}


def caption_index(root, names) -> str:
    index = root / "captions.jsonl"
    index.write_text("".join(json.dumps({"path": name, "caption": CAPTIONS[name]}) + "\n" for name in names))
    return str(index)


def test_captioned_clips_become_captioned_latents_of_the_family_vae_and_their_captions_are_cached(folders, tmp_path):
    rng = np.random.default_rng(0)
    for name in ("clips/a.mp4", "clips/b.mp4"):
        write_test_video(tmp_path / name, rng.integers(0, 255, (5, 24, 40, 3), dtype=np.uint8))
    index = caption_index(tmp_path, ["clips/a.mp4", "clips/b.mp4"])
    out = tmp_path / "latents"
    encoded = encode_videos.encode_video_folder(None, out, str(folders["wan"]), resolution=16, num_frames=5,
                                                vae_kind="video", width=32, captions=index)
    assert encoded == 2
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert rows == [{"path": "clips/a.mp4.safetensors", "caption": "a red cat"},
                    {"path": "clips/b.mp4.safetensors", "caption": "the digit seven"}]
    dataset = VideoLatentDataset(str(out), scale=1.0)
    item = dataset[1]
    assert item["caption"] == "the digit seven" and "label" not in item
    assert item["x"].shape == (3, 2, 4, 8)  # the tiny Wan VAE: 4x in time and space; 16 x 32 px frames

    # the captions cached with the encoder the Wan recipe trains with, under its cache key
    cache = tmp_path / "text_cache"
    cache_text_embeddings.main(["--index", str(out / "index.jsonl"), "--gin-file", "gin/base/wan.gin",
                                "--gin-param", f"WAN = {str(folders['wan'])!r}", "--gin-param",
                                "TextEncoder.max_length = 6", "--gin-param", "TextEncoder.dtype = 'float32'",
                                "--gin-param", f"TextConditioner.cache_dir = {str(cache)!r}"])
    conditioner = TextConditioner()  # the configuration just parsed
    stored = EmbeddingCache(cache, conditioner.encoder.identity)
    for caption in ["", "a red cat", "the digit seven"]:
        torch.testing.assert_close(stored.get(caption)["text_tokens"], conditioner.encoder([caption])["text_tokens"][0])


def test_captioned_images_become_captioned_latents_and_sd3_captions_cache_their_pooled_vector(folders, tmp_path):
    (tmp_path / "photos").mkdir()
    pixels = np.random.default_rng(1).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photos/c.png")
    out = tmp_path / "latents"
    assert encode_images.encode_image_folder(None, out, str(folders["sd3"]), resolution=8, width=16,
                                             captions=caption_index(tmp_path, ["photos/c.png"])) == 1
    item = LatentDataset(str(out), scale=1.5305, shift=0.0609)[0]
    assert item["caption"] == "a blue dog" and item["x"].shape == (3, 4, 8)  # the tiny SD3 VAE halves

    encoder = SD3TextEncoder(str(folders["sd3"]), t5_length=SD3_T5_LENGTH)
    fresh = TextConditioner(encoder, cache_dir=str(tmp_path / "cache"))(["a blue dog", ""])
    cached = TextConditioner(encoder, cache_dir=str(tmp_path / "cache"))
    entry = cached.cache.get("a blue dog")
    assert set(entry) == {"text_tokens", "text_mask", POOLED}
    again = cached(["a blue dog", ""])
    for key in fresh:
        torch.testing.assert_close(again[key], fresh[key])


def test_a_pooled_family_takes_the_empty_captions_tokens_and_pooled_vector_as_its_null(folders):
    parse_gin([], [f"SD3TextEncoder.path = {str(folders['sd3'])!r}", f"SD3TextEncoder.t5_length = {SD3_T5_LENGTH}",
                   "TextConditioner.encoder = @SD3TextEncoder()"])
    model = BACKBONES.build("sd3", path=str(folders["sd3"]), **SAMPLES["sd3"])
    conditioning = TextConditioning()
    conditioning.prepare(model)
    empty = conditioning.conditioner.encoder([""])
    null = model.null_condition({key: value.repeat(2, *[1] * (value.dim() - 1)) for key, value in empty.items()})
    for key, value in empty.items():
        torch.testing.assert_close(null[key], value.expand_as(null[key]))
    wan = BACKBONES.build("wan", config=CONFIGS["wan"], **SAMPLES["wan"])
    with pytest.raises(ValueError, match=r"gives captions of 83 tokens of width 24, but Wan reads 6 tokens of width "
                                         r"16"):
        conditioning.prepare(wan)


@torch.no_grad()
def test_the_flux_vae_encodes_and_decodes_as_flux_pipeline_normalises_its_latents(folders):
    """The image codec of the recipes on a Flux folder: its scaling and shift factors from vae/config.json, latents
    (z - shift) * scale of the posterior mean, decoded from latent / scale + shift as FluxPipeline decodes; the
    recipe's dataset normalisation is the same."""
    import diffusers

    vae = diffusers.AutoencoderKL.from_pretrained(folders["flux"] / "vae").eval()
    codec = VAECodec(str(folders["flux"]))
    assert (codec.scale, codec.shift) == (FLUX_VAE_FACTORS["scaling_factor"], FLUX_VAE_FACTORS["shift_factor"])
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = codec.encode(images)
    expected = (vae.encode(images).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-6)
    decoded = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    torch.testing.assert_close(codec.decode(latents), decoded, rtol=1e-5, atol=1e-6)
    parse_gin(["gin/base/flux.gin"], [])
    try:
        assert (gin.query_parameter("LatentDataset.scale"), gin.query_parameter("LatentDataset.shift")) == (
            FLUX_VAE_FACTORS["scaling_factor"], FLUX_VAE_FACTORS["shift_factor"])
    finally:
        gin.clear_config()


@torch.no_grad()
def test_the_hunyuan_video_vae_encodes_and_decodes_as_its_pipeline_scales_its_latents(folders):
    """The video codec of the HunyuanVideo recipe on its folder: 1 + 4k frames to 1 + k latent frames, latents the
    posterior mean times the config's scaling factor (0.476986, no shift), decoded from latent / scaling_factor as
    HunyuanVideoPipeline decodes."""
    import diffusers

    vae = diffusers.AutoencoderKLHunyuanVideo.from_pretrained(folders["hunyuan_video"] / "vae").eval()
    codec = VideoVAECodec(str(folders["hunyuan_video"]))
    assert (codec.temporal_downsample, codec.downsample) == (4, 4)  # the tiny VAE's; 8x spatial in the released one
    assert bool((codec.scale == 0.476986).all()) and not codec.shift.any()
    clips = torch.rand(2, 3, 9, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = codec.encode(clips)
    assert latents.shape == (2, 3, 3, 4, 4)
    torch.testing.assert_close(latents, vae.encode(clips).latent_dist.mean * vae.config.scaling_factor, rtol=1e-5,
                               atol=1e-6)
    decoded = vae.decode(latents / vae.config.scaling_factor).sample  # both clips in one call; the codec's one by one
    torch.testing.assert_close(codec.decode(latents), decoded, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"6 frames: AutoencoderKLHunyuanVideo encodes clips of 1 \+ 4k"):
        codec.encode(clips[:, :, :6])


@pytest.mark.parametrize("family", ["sd3", "flux", "hunyuan_video"])
def test_the_joint_blocks_cost_what_the_flop_counter_counts(family):
    model = BACKBONES.build(family, config=CONFIGS[family], **SAMPLES[family])
    x, t = torch.randn(1, *model.sample_shape), torch.rand(1)
    spec = model.condition
    cond = {"text_tokens": torch.randn(1, spec.text_length, spec.text_dim),
            "text_mask": torch.ones(1, spec.text_length, dtype=torch.bool), POOLED: torch.randn(1, spec.pooled_dim)}
    embedded = model.embed(x, t, cond)
    # Flux: a dual-stream block costs the same; a single-stream block projects and MLPs every token of both streams
    # as much (q, k, v, a 4 D MLP and a (D + 4 D) -> D output: 12 D^2 a token), with one adaLN of 3 D for both
    # (6 D^2 instead of two of 6 D: 24 D^2), which the cost model leaves at 18 D^2 too many (< 1e-4 of a FLUX.1 block);
    # HunyuanVideo's blocks are Flux's two kinds over [video; text]
    d = model.hidden_size
    for index, surplus in ((1, 0), (-1, 18 * d * d)) if family in ("flux", "hunyuan_video") else ((1, 0),):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # the math kernel's matmuls are counted
            model.blocks[index](embedded.tokens, embedded.c, embedded.positions, embedded.context)
        assert counter.get_total_flops() == block_flops(model.flop_shape(), embedded.tokens.shape[1]) - surplus


def test_the_real_shapes_of_the_gpu_suite_build_the_published_models():
    """benchmarks/family_configs.json, built on the meta device: the advertised sizes, and the token grids of the
    clips and images its sources name (frames and pixels through each family's VAE and patch)."""
    table = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "family_configs.json").read_text())
    published = {"wan2.1-t2v-1.3b": (1.3e9, ((81 - 1) // 4 + 1, 480 // 8 // 2, 832 // 8 // 2)),
                 "sd3-medium": (2.0e9, (1, 1024 // 8 // 2, 1024 // 8 // 2)),
                 "ltx-video-2b": (2.0e9, ((121 - 1) // 8 + 1, 512 // 32, 768 // 32)),
                 "flux.1-dev": (11.9e9, (1, 1024 // 8 // 2, 1024 // 8 // 2)),
                 "hunyuan-video-13b": (12.8e9, ((129 - 1) // 4 + 1, 720 // 8 // 2, 1280 // 8 // 2))}
    for name, (size, grid) in published.items():
        entry = table[name]
        with torch.device("meta"):
            model = BACKBONES.build(entry["family"], config=entry["config"], **entry["sample"])
        assert abs(sum(p.numel() for p in model.transformer.parameters()) / size - 1) < 0.1, name
        assert model.token_grid((1, *model.sample_shape)) == grid, name
