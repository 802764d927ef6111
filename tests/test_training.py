"""The trainer and the command lines end to end on a tiny digits model (CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import gin
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sprint_mm.cli import sample_main, train_main
from sprint_mm.checkpoints import CheckpointMismatch
from sprint_mm.configs import ConfigError, parse_gin
from sprint_mm.runs import list_checkpoints

TINY = [
    "sit.hidden_size = 32",
    "sit.depth = 4",
    "sit.num_heads = 2",
    "sit.input_size = 8",
    "DigitsDataset.resolution = 8",
    "Trainer.batch_size = 8",
    "Trainer.log_every = 2",
    "Trainer.checkpoint_every = 3",
    "Trainer.preview_every = 0",
    "Trainer.time_budget_minutes = None",
    "Trainer.progress = False",
    "Sprint.encoder_depth = 1",
    "Sprint.decoder_depth = 1",
]
STAGE1 = "gin/image/digits_stage1.gin"
STAGE2 = "gin/image/digits_stage2.gin"


def train(run_dir: Path, steps: int, *extra: str, gin_file: str = STAGE1, allow_config_change: bool = False) -> int:
    params = TINY + [f"Trainer.max_steps = {steps}"] + list(extra)
    argv = ["--gin_file", gin_file, "--run_dir", str(run_dir)] + ["--allow-config-change"] * allow_config_change
    for p in params:
        argv += ["--gin_param", p]
    return train_main(argv)


def weights(run_dir: Path, name: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(run_dir)[-1] / f"{name}.safetensors"))


def test_resumed_run_matches_uninterrupted_run(tmp_path):
    assert train(tmp_path / "straight", 7) == 0
    assert train(tmp_path / "resumed", 4) == 0
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step_0000003", "step_0000004"]
    assert train(tmp_path / "resumed", 7) == 0
    for name in ("model", "ema"):
        a, b = weights(tmp_path / "straight", name), weights(tmp_path / "resumed", name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key} differs after resume"
    metrics = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 7 and np.isfinite(metrics[-1]["loss"])


def test_training_reduces_loss_and_writes_run_files(tmp_path):
    run = tmp_path / "run"
    assert train(run, 24, "Trainer.lr = 3e-3", "Trainer.log_every = 8", "Trainer.keep_checkpoints = 2") == 0
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    assert len(list_checkpoints(run)) == 2  # retention
    assert (run / "config.gin").read_text().count("sit.hidden_size = 32") == 1
    assert json.loads((run / "config.json").read_text())["backbone"] == "DiT"
    assert list((run / "logs").glob("events.out.tfevents.*"))
    assert not list((run / "checkpoints").glob(".*"))  # no partial folders left


def test_stage2_starts_from_stage1_ema_strictly(tmp_path):
    stage1, stage2 = tmp_path / "s1", tmp_path / "s2"
    assert train(stage1, 3) == 0
    assert train(stage2, 1, f"Trainer.init_from = '{stage1}'", "Trainer.lr = 0.0", "Trainer.warmup_steps = 0",
                 gin_file=STAGE2) == 0
    ema1 = weights(stage1, "ema")
    # lr 0: the one step changes nothing, so both the model and the new EMA equal the stage-1 EMA.
    for name in ("model", "ema"):
        w = weights(stage2, name)
        for key in ema1:
            torch.testing.assert_close(w[key], ema1[key], rtol=0, atol=1e-6)
    state = torch.load(list_checkpoints(stage2)[-1] / "training_state.pt", weights_only=False)
    assert state["step"] == 1  # fresh step count, fresh optimizer
    # A stage-1 run of another shape is refused with a readable report.
    with pytest.raises(CheckpointMismatch, match="shape mismatches"):
        from sprint_mm.cli import run_training

        run_training([STAGE2], TINY + ["sit.hidden_size = 64", f"Trainer.init_from = '{stage1}'",
                                       f"Trainer.run_dir = '{tmp_path / 's2b'}'", "Trainer.max_steps = 1"])


def test_sample_command_writes_png_and_npz(tmp_path):
    run = tmp_path / "run"
    assert train(run, 2) == 0
    png, npz = tmp_path / "grid.png", tmp_path / "s.npz"
    assert sample_main(["--run", str(run), "--out", str(png), "--labels", "3", "7", "--num", "4", "--steps", "2",
                        "--guidance", "pdg", "--scale", "2.0"]) == 0
    assert Image.open(png).size[0] > 8
    assert sample_main(["--run", str(run), "--out", str(npz), "--num", "5", "--steps", "2", "--guidance", "cfg",
                        "--solver", "heun", "--interval", "0.1", "0.9"]) == 0
    arr = np.load(npz)["arr_0"]
    assert arr.shape == (5, 8, 8, 3) and arr.dtype == np.uint8
    # The same seed reproduces the same samples; the named step is honoured.
    again = tmp_path / "again.npz"
    assert sample_main(["--run", str(run), "--step", "2", "--out", str(again), "--num", "5", "--steps", "2",
                        "--guidance", "cfg", "--solver", "heun", "--interval", "0.1", "0.9"]) == 0
    assert np.array_equal(np.load(again)["arr_0"], arr)
    # Another size than trained: positions extend; the sample shape follows --size (H W).
    wide = tmp_path / "wide.npz"
    assert sample_main(["--run", str(run), "--out", str(wide), "--num", "2", "--steps", "2", "--size", "12", "16"]) == 0
    assert np.load(wide)["arr_0"].shape == (2, 12, 16, 3)


def test_clear_errors(tmp_path, capsys):
    assert train_main(["--gin_file", STAGE1, "--gin_param", "Trainer.not_a_knob = 3"]) == 2
    assert "not_a_knob" in capsys.readouterr().err
    assert train_main(["--gin_file", STAGE1, "--gin_param", "Trainr.max_steps = 3"]) == 2
    assert "Trainer" in capsys.readouterr().err  # the close match is suggested
    assert train_main(["--gin_file", "gin/image/digits_stage9.gin"]) == 2
    assert "digits_stage1.gin" in capsys.readouterr().err
    assert sample_main(["--run", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    run = tmp_path / "run"
    assert train(run, 1) == 0
    assert sample_main(["--run", str(run), "--out", str(tmp_path / "x.jpg")]) == 2
    assert "allowed: .png, .npz" in capsys.readouterr().err
    assert sample_main(["--run", str(run), "--prompt", "a seven"]) == 2
    assert "class-conditional" in capsys.readouterr().err
    assert sample_main(["--run", str(run), "--size", "10"]) == 2
    assert "(10, 10) is not divisible by the patch size (4, 4)" in capsys.readouterr().err
    assert sample_main(["--run", str(run), "--frames", "4"]) == 2
    assert "needs a video run" in capsys.readouterr().err
    # A checkpoint of another shape is refused by the sampler too.
    assert sample_main(["--run", str(run), "--gin_param", "sit.hidden_size = 64"]) == 2
    assert "shape mismatches" in capsys.readouterr().err


def test_dense_model_with_token_drop_is_refused():
    parse_gin([STAGE1], TINY + ["build_model.sprint = False"])
    from sprint_mm.training import Trainer

    with pytest.raises(ValueError, match="dense backbone"):
        Trainer()._setup()
    with pytest.raises(ConfigError):
        parse_gin([STAGE1], ["Trainer.max_steps = = 3"])


def test_sampling_resumes_after_a_stop_and_is_class_balanced(tmp_path, monkeypatch):
    import argparse

    import sprint_mm.generation as generation
    from sprint_mm.cli import sample_requests
    from sprint_mm.errors import EXIT_INTERRUPTED

    run = tmp_path / "run"
    assert train(run, 1) == 0
    args = ["--run", str(run), "--num", "5", "--batch_size", "2", "--steps", "2", "--guidance", "cfg"]
    whole = tmp_path / "whole.npz"
    assert sample_main(args + ["--out", str(whole)]) == 0

    real, calls = generation.generate, []

    def stopping(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a stop in the middle of the second shard
        return real(*a, **k)

    monkeypatch.setattr(generation, "generate", stopping)
    resumed = tmp_path / "resumed.npz"
    assert sample_main(args + ["--out", str(resumed)]) == EXIT_INTERRUPTED  # one line, no traceback
    assert len(list((tmp_path / ".resumed.npz.shards").glob("*.pt"))) == 1
    calls.clear()
    monkeypatch.setattr(generation, "generate", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert sample_main(args + ["--out", str(resumed)]) == 0
    assert len(calls) == 2  # only the two missing shards were sampled
    assert np.array_equal(np.load(resumed)["arr_0"], np.load(whole)["arr_0"])
    assert not (tmp_path / ".resumed.npz.shards").exists()

    request = argparse.Namespace(prompt=[], prompts=None, labels=None, num=50)
    labels, _ = sample_requests(request, "class", 10)
    assert np.bincount(labels).tolist() == [5] * 10


def test_ema_warmup_follows_the_model_early(tmp_path):
    from sprint_mm.models import build_model
    from sprint_mm.optimization import ema_decay_at

    assert ema_decay_at(0, 0.9999, warmup=True) == pytest.approx(0.1)
    ramp = [ema_decay_at(step, 0.99, warmup=True) for step in range(2000)]
    assert all(a <= b for a, b in zip(ramp, ramp[1:])) and ramp[-1] == 0.99
    assert ema_decay_at(0, 0.99, warmup=False) == 0.99

    run = tmp_path / "run"
    assert train(run, 1, "Trainer.ema_decay = 0.9999", "Trainer.ema_warmup = True") == 0
    parse_gin([str(run / "config.gin")], [])
    torch.manual_seed(0)  # the trainer's seed: its initial weights
    initial = build_model().state_dict()
    model, ema = weights(run, "model"), weights(run, "ema")
    # adaLN-Zero: after one step only the zero-initialised output layers have moved, which is enough to tell
    moved = [key for key, value in initial.items() if value.is_floating_point() and not torch.equal(model[key], value)]
    assert moved
    for key in moved:
        torch.testing.assert_close(ema[key], initial[key].lerp(model[key], 0.9))  # decay 0.1 on the first update
        assert not torch.allclose(ema[key], initial[key].lerp(model[key], 1e-4))  # what no warm-up would give


def test_num_threads_sets_torch_threads_and_is_checked(tmp_path):
    previous = torch.get_num_threads()
    try:
        assert train(tmp_path / "run", 1, "Trainer.num_threads = 1") == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
    assert train(tmp_path / "bad", 1, "Trainer.num_threads = 0") == 2


def test_the_cpu_clock_does_not_count_time_the_process_spends_waiting(tmp_path, monkeypatch):
    """Trainer.clock 'cpu' times steps by process CPU time: a step that also waits 0.2 s (another job holding the
    core, here a sleep) adds the wait to the wall clock's elapsed time and not to the CPU clock's."""
    import time

    from sprint_mm.training import Trainer

    step = Trainer._train_step

    def waiting_step(self):
        result = step(self)
        time.sleep(0.2)
        return result

    monkeypatch.setattr(Trainer, "_train_step", waiting_step)
    elapsed = {}
    for clock in ("wall", "cpu"):
        assert train(tmp_path / clock, 3, f"Trainer.clock = {clock!r}", "Trainer.log_every = 3") == 0
        elapsed[clock] = json.loads((tmp_path / clock / "metrics.jsonl").read_text().splitlines()[-1])["elapsed_s"]
    assert elapsed["wall"] >= 0.6  # the three waits count on the wall clock
    assert elapsed["cpu"] < elapsed["wall"] - 0.5  # and not on the CPU clock


def test_digits_demo_trains_both_stages_and_writes_five_rows_of_digits(tmp_path):
    from demos.digits import ROWS, run_digits_demo
    from sprint_mm.media import image_grid

    root = tmp_path / "demo"
    out = run_digits_demo(str(root), [*TINY, "Trainer.max_steps = 2", "Trainer.preview_every = 0"])
    assert out == root / "samples_pdg.png"
    assert Image.open(out).size == image_grid(torch.zeros(10 * ROWS, 1, 8, 8), nrow=10).shape[1::-1]
    assert [p.name for p in list_checkpoints(root / "stage1")] == ["step_0000002"]
    parse_gin([str(root / "stage2" / "config.gin")], [])
    assert gin.query_parameter("Trainer.init_from") == str(root / "stage1")  # stage 2 from stage 1
    assert gin.query_parameter("TokenMasker.ratio") == 0.0  # with every token
