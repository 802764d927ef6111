"""The video path end to end through the command lines: real mp4s (one corrupt), stage 1, stage 2, .mp4/.gif samples."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import av
import gin
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from benchmarks import demo_accuracy
from benchmarks.digits_classifier import DigitsClassifier
from benchmarks.harness import load_class_run
from demos.two_stages import stage_budgets
from demos.video import run_video_demo
from registry import BACKBONES
from sprint_mm.cli import sample_main, train_main
from sprint_mm.configs import parse_gin
from sprint_mm.flow import FlowMatching
from sprint_mm.masking import TokenMasker
from sprint_mm.media import image_grid
from sprint_mm.runs import list_checkpoints
from sprint_mm.sprint import Sprint
from sprint_mm.data.moving_digits import write_moving_digits
from tests.helpers import randomize

STAGE1 = "gin/video/moving_digits_stage1.gin"
STAGE2 = "gin/video/moving_digits_stage2.gin"
FRAMES, SIZE, NUM_VIDEOS = 4, 16, 6
TINY = [
    "video_dit.hidden_size = 32",
    "video_dit.depth = 4",
    "video_dit.num_heads = 2",
    f"video_dit.input_size = ({FRAMES}, {SIZE}, {SIZE})",
    "video_dit.patch_size = (2, 4, 4)",
    "Sprint.encoder_depth = 1",
    "Sprint.decoder_depth = 1",
    f"VideoFolderDataset.clip_length = {FRAMES}",
    "Trainer.batch_size = 4",
    "Trainer.log_every = 1",
    "Trainer.checkpoint_every = 100",
    "Trainer.preview_every = 0",
    "Trainer.time_budget_minutes = None",
    "Trainer.progress = False",
]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Six moving-digit mp4s (digits 0..5, one per class folder) plus one corrupt file in class 0."""
    folder = tmp_path_factory.mktemp("moving_digits")
    write_moving_digits(folder, NUM_VIDEOS, frames=FRAMES, size=SIZE, seed=3)
    (folder / "0" / "zz_corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 4)
    return folder


def train(run_dir: Path, videos: Path, steps: int, *extra: str, gin_file: str = STAGE1) -> int:
    params = TINY + [f"VideoFolderDataset.root = {str(videos)!r}", f"Trainer.max_steps = {steps}", *extra]
    argv = ["--gin-file", gin_file, "--run-dir", str(run_dir)]
    for param in params:
        argv += ["--gin-param", param]
    return train_main(argv)


def weights(run_dir: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(run_dir)[-1] / f"{name}.safetensors"))


def mp4_frames(path: Path) -> list:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_video_runs_end_to_end_through_the_command_lines(tmp_path, videos, capsys):
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    # 2 steps x 4 clips cover all 7 files of the first pass: the corrupt one is met, skipped, counted and named.
    assert train(stage1, videos, 2) == 0
    assert json.loads((stage1 / "metrics.jsonl").read_text().splitlines()[-1])["bad_video"] == 1
    assert re.search(r"1 of 8 items read were bad .*zz_corrupt\.mp4", capsys.readouterr().out)
    assert "TokenMasker.ratio = 0.75" in (stage1 / "config.gin").read_text()

    # Stage 2 with lr 0: its model and new EMA must be exactly the stage-1 EMA; the video preview is written.
    assert train(stage2, videos, 1, f"Trainer.init_from = {str(stage1)!r}", "Trainer.lr = 0.0",
                 "Trainer.warmup_steps = 0", "Trainer.preview_every = 1", "Previewer.count = 2", "Previewer.steps = 2",
                 gin_file=STAGE2) == 0
    assert "TokenMasker.ratio = 0.0" in (stage2 / "config.gin").read_text()
    ema1 = weights(stage1, "ema")
    for name in ("model", "ema"):
        later = weights(stage2, name)
        assert later.keys() == ema1.keys()
        for key in ema1:
            torch.testing.assert_close(later[key], ema1[key], rtol=0, atol=1e-6)
    preview = Image.open(stage2 / "samples" / "step_0000001_pdg.png")
    assert preview.size == image_grid(torch.zeros(2 * FRAMES, 3, SIZE, SIZE), nrow=FRAMES).shape[1::-1]

    # Samples: an .mp4 (with a .png strip beside it) and an animated .gif, each with every frame of the clip.
    mp4, gif = tmp_path / "samples.mp4", tmp_path / "samples.gif"
    common = ["--run", str(stage2), "--labels", "1", "4", "--steps", "2", "--guidance", "pdg", "--scale", "2.0"]
    assert sample_main([*common, "--out", str(mp4)]) == 0
    frames = mp4_frames(mp4)
    grid = image_grid(torch.zeros(2, 3, SIZE, SIZE))  # one frame: the two samples side by side
    assert len(frames) == FRAMES
    assert frames[0].shape == grid.shape
    strip = Image.open(mp4.with_suffix(".png"))
    assert strip.size == image_grid(torch.zeros(2 * FRAMES, 3, SIZE, SIZE), nrow=FRAMES).shape[1::-1]
    longer = tmp_path / "longer.mp4"  # twice the trained frame count: 3D RoPE extends in time
    assert sample_main([*common, "--frames", str(2 * FRAMES), "--out", str(longer)]) == 0
    assert len(mp4_frames(longer)) == 2 * FRAMES
    assert sample_main([*common, "--frames", "3", "--out", str(longer)]) == 2  # the temporal patch is 2
    assert sample_main([*common, "--out", str(gif)]) == 0
    with Image.open(gif) as animation:
        assert animation.size == grid.shape[1::-1]
        # GIF merges identical consecutive frames, so at most FRAMES; a 2-step sampler leaves them distinct.
        assert animation.n_frames == FRAMES


def test_video_demo_reuses_existing_videos_and_samples_every_digit(tmp_path, videos):
    root = tmp_path / "demo"
    shutil.copytree(videos, root / "videos")
    before = sorted((root / "videos").rglob("*.mp4"))
    tiny = [p for p in TINY if not p.startswith("VideoFolderDataset.root")] + ["Trainer.max_steps = 1"]
    out = run_video_demo(str(root), minutes=0.5, gin_params=tiny, steps=2)
    assert sorted((root / "videos").rglob("*.mp4")) == before  # present videos are not rewritten
    assert out == root / "samples_pdg.mp4"
    assert mp4_frames(out)[0].shape == image_grid(torch.zeros(10, 3, SIZE, SIZE)).shape
    strip = Image.open(out.with_suffix(".png"))
    assert strip.size == image_grid(torch.zeros(10 * FRAMES, 3, SIZE, SIZE), nrow=FRAMES).shape[1::-1]
    parse_gin([str(root / "stage2" / "config.gin")], [])
    assert gin.query_parameter("Trainer.init_from") == str(root / "stage1")

    # The demo's quality script judges video runs frame by frame (a one-epoch judge: only the bookkeeping is tested).
    run = load_class_run(root / "stage2")
    judge = DigitsClassifier.train(resolution=12, channels=3, epochs=1)
    settings = demo_accuracy.guidance_settings(["none", "pdg"], [1.0])  # scale 1: the very same samples under both
    rows = demo_accuracy.guided_accuracy(run, judge, settings, per_class=1, steps=2, progress=False)
    assert rows[0]["accuracy"] == rows[1]["accuracy"] and rows[0]["frame_accuracy"] == rows[1]["frame_accuracy"]
    assert rows[0]["accuracy"] == pytest.approx(sum(rows[0]["per_class"]) / 10)
    assert 1 / FRAMES <= rows[0]["frame_agreement"] <= 1.0
    assert "frame agreement" in demo_accuracy.table_header(rows) and len(demo_accuracy.table_rows(rows)[0]) == 7


def test_demo_time_budget_is_split_three_to_one():
    stage1, stage2 = stage_budgets(8.0)
    assert stage1 == ["Trainer.time_budget_minutes = 6.0"] and stage2 == ["Trainer.time_budget_minutes = 2.0"]
    assert stage_budgets(None) == ([], [])
    with pytest.raises(ValueError, match="minutes must be > 0"):
        stage_budgets(0)


def test_mixed_image_and_video_batches_share_one_sprint_model():
    torch.manual_seed(0)
    backbone = BACKBONES.build("video_dit", hidden_size=32, depth=4, num_heads=2, input_size=(4, 8, 8),
                               patch_size=(1, 2, 2), in_channels=3, num_classes=4)
    model = randomize(Sprint(backbone, encoder_depth=1, decoder_depth=1))
    g = torch.Generator().manual_seed(1)
    images, video = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 4, 8, 8, generator=g)
    t, y = torch.rand(3, generator=g), torch.randint(0, 4, (3,), generator=g)

    # An image under a mask is exactly a one-frame video under the same mask.
    masker = TokenMasker("structured", 0.75)
    image_grid_shape = model.backbone.token_grid(tuple(images.shape))
    assert tuple(image_grid_shape) == (1, 4, 4)
    mask = masker(3, image_grid_shape, generator=torch.Generator().manual_seed(2))
    assert mask.num_kept == 4
    out = model(images, t, y, mask=mask)
    assert out.shape == images.shape
    torch.testing.assert_close(out, model(images[:, :, None], t, y, mask=mask).squeeze(2))

    # One training step on an image batch and a video batch: both losses finite, the middle blocks get gradients.
    objective = FlowMatching(masker=masker, path_drop=0.0)
    loss = objective.loss(model, images, y) + objective.loss(model, video, y)
    loss.backward()
    assert torch.isfinite(loss)
    middle_grads = [p.grad for block in model.middle_blocks for p in block.parameters()]
    assert all(grad is not None and grad.abs().sum() > 0 for grad in middle_grads)
