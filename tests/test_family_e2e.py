"""The families' gin recipes end to end through the command lines, each on a tiny random pipeline folder saved by
diffusers: stage 1 (Wan, SD3, Flux and HunyuanVideo with LoRA, LTX-Video in full; FSDP2 and activation checkpointing
as the recipes train), stage 2 from its EMA, then PDG samples decoded by the family's own VAE (mp4 for video)."""
from __future__ import annotations

import json
from pathlib import Path

import av
import gin
import pytest
import torch
from PIL import Image

from registry import BACKBONES
from sprint_mm.cli import sample_main, train_main
from sprint_mm.configs import parse_gin
from sprint_mm.lora import ADAPTER_CONFIG, LoRA
from sprint_mm.runs import list_checkpoints
from sprint_mm.sharded import read_weights
from tests.families import SAMPLES, hunyuan_video_crop, write_pipeline

pytest.importorskip("diffusers")
pytest.importorskip("peft")

# family -> (stage-1 and stage-2 recipes, the macro naming the folder, the tiny sample (latent) and what it decodes to)
RECIPES = {
    "wan": ("gin/video/wan_lora_stage1.gin", "gin/video/wan_lora_stage2.gin", "WAN"),
    "ltx_video": ("gin/video/ltx_full_stage1.gin", "gin/video/ltx_full_stage2.gin", "LTX"),
    "sd3": ("gin/image/sd3_lora_stage1.gin", "gin/image/sd3_lora_stage2.gin", "SD3"),
    "flux": ("gin/image/flux_lora_stage1.gin", "gin/image/flux_lora_stage2.gin", "FLUX"),
    "hunyuan_video": ("gin/video/hunyuan_video_lora_stage1.gin", "gin/video/hunyuan_video_lora_stage2.gin", "HUNYUAN"),
}
IMAGES = ("sd3", "flux")
# (frames, pixels) of a tiny sample
DECODED = {"wan": (9, 32), "ltx_video": (17, 32), "sd3": (1, 16), "flux": (1, 16), "hunyuan_video": (9, 32)}
PROMPTS = ["a handwritten seven", "the digit 2"]


def tiny(family: str, folder: Path, cache: Path) -> list[str]:
    """The bindings that shrink a recipe to the tiny folder: its sample, caption length, split, data, precision."""
    size, length = SAMPLES[family]["input_size"], SAMPLES[family]["text_length"]
    frames = [] if family in IMAGES else [f"CaptionedDigitsDataset.frames = {size[0]}"]
    encoder = {"sd3": ["SD3TextEncoder.t5_length = 6", "SD3TextEncoder.dtype = 'float32'"],
               "flux": [f"FluxTextEncoder.t5_length = {length}", "FluxTextEncoder.dtype = 'float32'"],
               "hunyuan_video": [f"HunyuanVideoTextEncoder.max_length = {length}", "HunyuanVideoTextEncoder.dtype = "
                                 f"'float32'", f"HunyuanVideoTextEncoder.crop_start = {hunyuan_video_crop()}"]}.get(
        family, [f"TextEncoder.max_length = {length}", "TextEncoder.dtype = 'float32'"])
    return [f"{RECIPES[family][2]} = {str(folder)!r}", f"{family}.input_size = {tuple(size)}",
            f"{family}.text_length = {length}", *encoder, f"TextConditioner.cache_dir = {str(cache)!r}",
            "Sprint.encoder_depth = 1", "Sprint.decoder_depth = 1",
            "Trainer.dataset = @CaptionedDigitsDataset()", f"CaptionedDigitsDataset.resolution = {size[-1]}",
            "CaptionedDigitsDataset.channels = 3", *frames, "Trainer.precision = 'no'", "LoRA.base_dtype = 'float32'",
            "LoRA.rank = 4", "Trainer.batch_size = 4", "Trainer.max_steps = 2", "Trainer.num_workers = 0",
            "Trainer.warmup_steps = 0",
            "Trainer.log_every = 1", "Trainer.progress = False", "import sprint_mm.data.captioned_digits"]


def gin_list(gin_file: str, binding: str) -> list:
    """The value a recipe binds (a list)."""
    parse_gin([gin_file], [])
    value = gin.query_parameter(binding)
    gin.clear_config()
    return value


def train(gin_file: str, run: Path, bindings: list[str]) -> int:
    argv = ["--gin-file", gin_file, "--run-dir", str(run)]
    for binding in bindings:
        argv += ["--gin-param", binding]
    return train_main(argv)


@pytest.mark.parametrize("family", sorted(RECIPES))
def test_a_family_trains_both_stages_from_its_folder_and_samples_with_pdg(family, tmp_path):
    folder = write_pipeline(family, tmp_path / "pipeline")
    bindings = tiny(family, folder, tmp_path / "text_cache")
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    first, second, _ = RECIPES[family]
    assert train(first, stage1, bindings) == 0
    weights = read_weights(list_checkpoints(stage1)[-1] / "ema.safetensors")  # FSDP's files, consolidated
    lora = family != "ltx_video"
    # the diffusers model's own names under backbone.transformer; LoRA adapters (peft's names) on them
    assert any(key.startswith("backbone.transformer.") for key in weights)
    assert any(".lora_A." in key for key in weights) == lora
    assert (list_checkpoints(stage1)[-1] / ADAPTER_CONFIG).is_file() == lora
    if lora:  # a checkpoint folder is a LoRA file for LoRA.weights: its EMA's adapters, under the diffusers names
        backbone = BACKBONES.build(family, path=str(folder), **SAMPLES[family])
        LoRA(rank=4, targets=tuple(gin_list(RECIPES[family][0], "LoRA.targets")),
             weights=str(list_checkpoints(stage1)[-1])).apply(backbone)
        for key, value in backbone.state_dict().items():
            if ".lora_" in key:
                assert torch.equal(value, weights[f"backbone.{key}"]), key
    assert train(second, stage2, [*bindings, f"Trainer.init_from = {str(stage1)!r}"]) == 0
    assert json.loads((stage2 / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2

    frames, pixels = DECODED[family]
    out = tmp_path / ("samples.png" if family in IMAGES else "samples.mp4")
    argv = ["--run", str(stage2), "--steps", "2", "--guidance", "pdg", "--scale", "2.0", "--out", str(out)]
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    assert sample_main(argv) == 0
    if family in IMAGES:
        assert Image.open(out).size == (2 * pixels + 3 * 2, pixels + 2 * 2)  # two samples in a grid, 2 px borders
        return
    with av.open(str(out)) as container:
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(decoded) == frames and decoded[0].shape[0] == pixels + 2 * 2
    assert torch.tensor(decoded[0]).float().std() > 0
