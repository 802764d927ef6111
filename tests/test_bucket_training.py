"""Training over mixed buckets: images and clips of two shapes in one run, exact resume (also after a kill with two
processes), refusal to resume on changed data, and sampling at every bucket's shape."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from demos.buckets import BUCKET_STAGES, bucket_shapes, write_still_digits
from sprint_mm.cli import sample_main, train_main
from sprint_mm.configs import ConfigError
from sprint_mm.data.bucket_sampler import BucketBatchSampler
from sprint_mm.data.buckets import BucketedDataset, BucketTable
from sprint_mm.data.images import ImageFolderDataset
from sprint_mm.data.joint import JointDataset
from sprint_mm.data.video import VideoFolderDataset
from sprint_mm.runs import list_checkpoints
from sprint_mm.data.moving_digits import write_moving_digits
from tests.test_faults import assert_same_weights, metrics
from tests.test_training import weights

REPO = Path(__file__).resolve().parents[1]
STAGE1 = "gin/video/moving_digits_buckets_stage1.gin"
TABLE = [(4, 16, 16, 4, 1.0), (2, 24, 24, 4, 1.0), (1, 16, 16, 8, 1.0), (1, 24, 24, 8, 1.0)]
TINY_VIDEO = [
    "video_dit.hidden_size = 32",
    "video_dit.depth = 4",
    "video_dit.num_heads = 2",
    "video_dit.input_size = (4, 16, 16)",
    "video_dit.patch_size = (1, 8, 8)",
    "Sprint.encoder_depth = 1",
    "Sprint.decoder_depth = 1",
    f"BucketTable.buckets = {TABLE}",
    "Trainer.time_budget_minutes = None",
    "Trainer.progress = False",
    "Trainer.log_every = 1",
    "Trainer.checkpoint_every = 3",
    "Trainer.num_threads = 1",
]


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """8 clips of 4 frames at 16 px, 8 of 2 frames at 24 px, 16 stills at each of 16 and 24 px (real mp4 and png)."""
    root = tmp_path_factory.mktemp("buckets")
    write_moving_digits(root / "clips_a", 8, frames=4, size=16, seed=0)
    write_moving_digits(root / "clips_b", 8, frames=2, size=24, seed=1)
    write_still_digits(root / "images", sizes=(16, 24), per_size=16)
    return root


def data_bindings(media: Path) -> list[str]:
    return [f"videos_8f/VideoFolderDataset.root = {str(media / 'clips_a')!r}",
            f"videos_4f/VideoFolderDataset.root = {str(media / 'clips_b')!r}",
            f"ImageFolderDataset.root = {str(media / 'images')!r}"]


def train(run: Path, media: Path, steps: int, *extra: str) -> int:
    argv = ["--gin_file", STAGE1, "--run_dir", str(run)]
    for binding in (*TINY_VIDEO, *data_bindings(media), f"Trainer.max_steps = {steps}", *extra):
        argv += ["--gin_param", binding]
    return train_main(argv)


def test_joint_image_and_video_training_follows_the_sampler_and_resumes_exactly(media, tmp_path):
    steps = 8  # one epoch: 2 batches per bucket
    assert train(tmp_path / "straight", media, steps) == 0
    # the epoch visited every bucket twice, images and clips alike
    assert sorted(trained_buckets(tmp_path / "straight")) == sorted(f"{f}x{h}x{w}" for f, h, w, *_ in TABLE for _ in range(2))
    assert json.loads((tmp_path / "straight" / "config.json").read_text())["buckets"] == [list(b) for b in TABLE]
    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "straight").values())

    assert train(tmp_path / "resumed", media, 5) == 0  # checkpoints at 3 and 5
    assert train(tmp_path / "resumed", media, steps) == 0
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed")
    assert [line["step"] for line in metrics(tmp_path / "resumed")] == list(range(1, steps + 1))


def trained_buckets(run: Path) -> list[str]:
    """The bucket each logged step trained on (its per-bucket loss key)."""
    return [next(key.split("/")[1] for key in line if key.startswith("loss/")) for line in metrics(run)]


def test_each_step_trains_the_bucket_the_sampler_schedules(media, tmp_path):
    assert train(tmp_path / "run", media, 6) == 0
    data = JointDataset([VideoFolderDataset(media / "clips_a", reader="pyav", fallback_reader=None),
                         VideoFolderDataset(media / "clips_b", reader="pyav", fallback_reader=None),
                         ImageFolderDataset(media / "images", resolution=16)])
    table = BucketTable(TABLE)
    sampler = BucketBatchSampler(BucketedDataset(data, table).bucket_of, table, seed=0)
    assert trained_buckets(tmp_path / "run") == ["x".join(map(str, table[sampler.bucket_at(s)].shape)) for s in range(6)]


def test_resume_refuses_a_changed_dataset_or_table(media, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, media, 3) == 0
    changed = [f"BucketTable.buckets = {TABLE[:3] + [(1, 24, 24, 4, 1.0)]}"]
    assert train(run, media, 6, *changed) == 2
    assert "changed" in capsys.readouterr().err
    assert train(run, media, 6, "Trainer.buckets = None", "VideoFolderDataset.clip_length = 4",
                 "Trainer.dataset = @videos_8f/VideoFolderDataset()", "Trainer.batch_size = 4") == 2
    assert "buckets" in capsys.readouterr().err


def test_sampling_at_every_bucket_shape(media, tmp_path):
    assert train(tmp_path / "run", media, 2) == 0
    # the bucket demo samples the shapes the run's config.gin records (here the test's table, not the gin file's)
    assert bucket_shapes([str(tmp_path / "run" / "config.gin")]) == tuple(tuple(b[:3]) for b in TABLE)
    for frames, height, width, *_ in TABLE:
        out = tmp_path / f"s_{frames}_{height}.mp4"
        argv = ["--run", str(tmp_path / "run"), "--out", str(out), "--guidance", "pdg", "--scale", "2", "--steps", "2",
                "--frames", str(frames), "--size", str(height), str(width), "--labels", "0", "1"]
        assert sample_main(argv) == 0
        assert out.is_file() and out.with_suffix(".png").is_file()


# ------------------------------------------------------------------------------------------ two processes, killed
def torchrun_training(run: Path, media: Path, steps: int) -> subprocess.Popen:
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
            "--gin_file", "gin/image/digits_stage1.gin", "--run_dir", str(run)]
    bindings = ["sit.hidden_size = 32", "sit.depth = 4", "sit.num_heads = 2", "sit.input_size = 16", "sit.in_channels = 3",
                "IdentityCodec.channels = 3", "Sprint.encoder_depth = 1", "Sprint.decoder_depth = 1",
                f"ImageFolderDataset.root = {str(media / 'images')!r}", "ImageFolderDataset.resolution = 16",
                "Trainer.dataset = @ImageFolderDataset()", "BucketTable.buckets = [(1, 16, 16, 4), (1, 24, 24, 4)]",
                "Trainer.buckets = @BucketTable()", "Trainer.time_budget_minutes = None", "Trainer.progress = False",
                "Trainer.log_every = 1", "Trainer.checkpoint_every = 4", "Trainer.preview_every = 0",
                f"Trainer.max_steps = {steps}"]
    for binding in bindings:
        argv += ["--gin_param", binding]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed support")
def test_two_processes_over_mixed_buckets_killed_and_resumed_end_bit_identical(media, tmp_path):
    steps = 12
    straight = torchrun_training(tmp_path / "straight", media, steps)
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err[-3000:]

    killed = torchrun_training(tmp_path / "killed", media, steps)
    deadline = time.monotonic() + 240
    while not [c for c in list_checkpoints(tmp_path / "killed") if c.name.endswith("0004")]:
        assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()[1][-3000:]
        time.sleep(0.1)
    os.killpg(killed.pid, signal.SIGKILL)  # every process of the run, mid-way, without warning
    killed.wait(timeout=60)
    assert int(list_checkpoints(tmp_path / "killed")[-1].name.split("_")[1]) < steps

    resumed = torchrun_training(tmp_path / "killed", media, steps)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "resumed" in out + err
    assert_same_weights(tmp_path / "straight", tmp_path / "killed")


def test_the_bucket_demo_samples_the_buckets_of_the_configuration_it_trained_with():
    assert bucket_shapes([BUCKET_STAGES[0]]) == ((8, 16, 16), (4, 24, 24), (1, 16, 16), (1, 24, 24))
    assert bucket_shapes([BUCKET_STAGES[1]]) == bucket_shapes([BUCKET_STAGES[0]])  # stage 2 keeps stage 1's table
    changed = bucket_shapes([BUCKET_STAGES[0]], ["BucketTable.buckets = [(2, 24, 16, 4), (1, 8, 8, 16)]"])
    assert changed == ((2, 24, 16), (1, 8, 8))
    with pytest.raises(ConfigError, match="digits_stage1.gin binds no BucketTable.buckets"):
        bucket_shapes(["gin/image/digits_stage1.gin"])


def test_a_bucket_run_counts_items_left_out_for_an_unreadable_size_as_bad_data(media, tmp_path, capsys):
    # 3 unreadable stills among 51 items (5.9 %): a plain run stops past 1 % of bad data, and so does a bucket run,
    # at start; with the limit raised it trains and logs them.
    import shutil

    images = tmp_path / "images"
    shutil.copytree(media / "images", images)
    for number in range(3):
        (images / "3" / f"unreadable_{number}.png").write_bytes(b"")
    folders = [*data_bindings(media)[:2], f"ImageFolderDataset.root = {str(images)!r}"]
    assert train(tmp_path / "strict", media, 2, *folders) == 2
    err = capsys.readouterr().err
    assert "too much bad data: 3 of 51 items were left out before training, their size unreadable (image 3)" in err
    assert not list_checkpoints(tmp_path / "strict")  # refused before the first step
    assert train(tmp_path / "lenient", media, 2, *folders, "BadDataLedger.max_bad_fraction = 0.1") == 0
    logged = metrics(tmp_path / "lenient")
    assert logged[-1]["bad_image"] == 3 and logged[-1]["bad_fraction"] == pytest.approx(3 / 51)
