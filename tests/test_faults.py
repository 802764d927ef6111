"""Faults during training: non-finite steps, stop signals, damaged checkpoints, failing writes."""
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
from safetensors.torch import load_file

import sprint_mm.checkpointer as checkpointer
import sprint_mm.training as training
from sprint_mm.cli import sample_main
from sprint_mm.flow import FlowMatching
from sprint_mm.preemption import EXIT_PREEMPTED, StopSignals
from sprint_mm.runs import checkpoint_problems, list_checkpoints
from tests.test_training import STAGE1, STAGE2, TINY, train, weights

REPO = Path(__file__).resolve().parents[1]


def assert_same_weights(a: Path, b: Path) -> None:
    for name in ("model", "ema"):
        first, second = weights(a, name), weights(b, name)
        assert first.keys() == second.keys()
        for key in first:
            assert torch.equal(first[key], second[key]), f"{name}:{key} differs"


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def nan_at_calls(monkeypatch, calls: set[int]) -> None:
    """FlowMatching.loss returns NaN on the given (1-based) calls: a batch that turns the loss NaN."""
    real, count = FlowMatching.loss, [0]

    def loss(self, *args, **kwargs):
        count[0] += 1
        value = real(self, *args, **kwargs)
        return value * float("nan") if count[0] in calls else value

    monkeypatch.setattr(FlowMatching, "loss", loss)


# ------------------------------------------------------------------------------------------ non-finite steps
def test_a_nan_step_is_skipped_and_leaves_optimizer_scheduler_and_ema_untouched(tmp_path, monkeypatch):
    assert train(tmp_path / "two", 2, "Trainer.log_every = 1") == 0
    nan_at_calls(monkeypatch, {3})
    assert train(tmp_path / "nan_third", 3, "Trainer.log_every = 1") == 0
    # The skipped third step changed nothing: weights, EMA, optimizer moments and schedule are those of step 2.
    assert_same_weights(tmp_path / "two", tmp_path / "nan_third")
    a, b = (torch.load(list_checkpoints(tmp_path / run)[-1] / "training_state.pt", weights_only=False)
            for run in ("two", "nan_third"))
    assert a["scheduler"] == b["scheduler"] and b["step"] == 3
    for key, value in a["optimizer"]["state"].items():
        assert torch.equal(value["exp_avg"], b["optimizer"]["state"][key]["exp_avg"])
    logged = metrics(tmp_path / "nan_third")
    assert [m["skipped_steps"] for m in logged] == [0, 0, 1] and "loss" not in logged[-1]
    # The run goes on after a skipped step, and its weights stay finite.
    nan_at_calls(monkeypatch, {2})
    assert train(tmp_path / "goes_on", 5) == 0
    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "goes_on").values())


def test_too_many_bad_steps_stop_the_run_with_the_last_good_checkpoint_intact(tmp_path, monkeypatch, capsys):
    nan_at_calls(monkeypatch, set(range(5, 100)))
    assert train(tmp_path / "run", 20, "Trainer.max_bad_steps = 3") == 1
    err = capsys.readouterr().err
    # Steps 5, 6 and 7 are skipped; the checkpoint of step 6 holds the (finite) weights of step 4.
    assert "3 steps in a row had a non-finite loss" in err and "checkpoint step_0000006 intact" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    checkpoints = list_checkpoints(tmp_path / "run")
    assert [p.name for p in checkpoints] == ["step_0000003", "step_0000006"]
    assert all(checkpoint_problems(folder) == [] for folder in checkpoints)


def test_a_diverging_learning_rate_never_publishes_non_finite_weights(tmp_path, capsys):
    code = train(tmp_path / "run", 30, "Trainer.lr = 1e6", "Trainer.max_bad_steps = 2", "Trainer.grad_clip = 0.0")
    assert code in (0, 1)
    for folder in list_checkpoints(tmp_path / "run"):
        assert checkpoint_problems(folder) == []
        for name in ("model", "ema"):
            assert all(torch.isfinite(t).all() for t in load_file(str(folder / f"{name}.safetensors")).values())


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch):
    real = training.update_ema

    def poisoned(ema, model, decay):
        real(ema, model, decay)
        next(ema.parameters()).data.fill_(float("nan"))

    monkeypatch.setattr(training, "update_ema", poisoned)
    assert train(tmp_path / "run", 2) == 1
    assert list_checkpoints(tmp_path / "run") == []


# ------------------------------------------------------------------------------------------ stop signals
def start_training(run: Path, steps: int, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "train.py", "--gin_file", STAGE1, "--run_dir", str(run)]
    for binding in (*TINY, f"Trainer.max_steps = {steps}", "Trainer.log_every = 1", *extra):
        argv += ["--gin_param", binding]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(run: Path, step: int, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= step:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{run} did not reach step {step}")


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_writes_a_checkpoint_exits_75_and_resumes_bit_identically(tmp_path, stop):
    steps = 40
    straight = start_training(tmp_path / "straight", steps, "Trainer.checkpoint_every = 1000")
    interrupted = start_training(tmp_path / "stopped", steps, "Trainer.checkpoint_every = 1000")
    wait_for_step(tmp_path / "stopped", 5, interrupted)
    interrupted.send_signal(getattr(signal, stop))
    _, err = interrupted.communicate(timeout=120)
    assert interrupted.returncode == EXIT_PREEMPTED, err
    assert f"stopped by {stop}" in err and "Traceback" not in err
    saved = list_checkpoints(tmp_path / "stopped")
    assert len(saved) == 1 and 5 <= int(saved[0].name.split("_")[1]) < steps  # no work lost: saved at the stop
    assert straight.wait(timeout=300) == 0
    resumed = start_training(tmp_path / "stopped", steps, "Trainer.checkpoint_every = 1000")
    assert resumed.wait(timeout=300) == 0
    assert_same_weights(tmp_path / "straight", tmp_path / "stopped")
    logged = [m["step"] for m in metrics(tmp_path / "stopped")]
    assert logged == list(range(1, steps + 1))  # no step logged twice after the resume


def test_a_second_signal_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", lambda status: exits.append(status))
    lines = []
    with StopSignals(["SIGUSR1"], lines.append) as signals:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.received == "SIGUSR1" and exits == [] and "SIGUSR1" in lines[0]
        os.kill(os.getpid(), signal.SIGUSR1)
        assert exits == [128 + signal.SIGUSR1]
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # the previous handler is back


def test_unknown_stop_signal_is_a_clear_error(tmp_path, capsys):
    assert train(tmp_path / "run", 1, "Trainer.stop_signals = ['SIGTERM', 'SIGSTOPP']") == 2
    assert "unknown signal 'SIGSTOPP'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ damaged checkpoints
@pytest.mark.parametrize("damage", ["model.safetensors", "ema.safetensors", "training_state.pt", "rng_rank0.pt"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, damage):
    assert train(tmp_path / "straight", 7) == 0
    assert train(tmp_path / "damaged", 6) == 0  # checkpoints at 3 and 6
    newest = list_checkpoints(tmp_path / "damaged")[-1]
    path = newest / damage
    if damage == "rng_rank0.pt":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert checkpoint_problems(newest)
    assert train(tmp_path / "damaged", 7) == 0
    captured = capsys.readouterr()
    assert "checkpoint step_0000006 is damaged" in captured.out + captured.err
    assert_same_weights(tmp_path / "straight", tmp_path / "damaged")


def test_sampling_and_stage2_refuse_a_damaged_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, 3) == 0
    model_file = list_checkpoints(run)[-1] / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:100])
    assert sample_main(["--run", str(run), "--num", "2", "--steps", "1", "--weights", "model"]) == 2
    err = capsys.readouterr().err
    assert "is damaged (model.safetensors has 100 bytes" in err and len(err.strip().splitlines()) == 1
    assert train(tmp_path / "stage2", 1, f"Trainer.init_from = '{run}'", gin_file=STAGE2) == 2
    assert "is damaged" in capsys.readouterr().err


def test_a_failing_write_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    real, calls = checkpointer.save_state_dict, []

    def disk_full(state, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 2:  # the second checkpoint's first file
            raise OSError(28, "No space left on device")
        return real(state, path, *args, **kwargs)

    monkeypatch.setattr(checkpointer, "save_state_dict", disk_full)
    assert train(tmp_path / "run", 7) == 1
    err = capsys.readouterr().err
    assert "could not write the checkpoint of step 6" in err and "No space left" in err and "step_0000003" in err
    checkpoints = list_checkpoints(tmp_path / "run")
    assert [p.name for p in checkpoints] == ["step_0000003"] and checkpoint_problems(checkpoints[0]) == []
    assert not list((tmp_path / "run" / "checkpoints").glob(".*"))  # no staging folder left behind


# ------------------------------------------------------------------------------------------ shards
def test_a_run_on_three_shards_killed_mid_epoch_and_restarted_ends_bit_identical(tmp_path):
    from sprint_mm.data.digits import DigitsDataset
    from sprint_mm.data.shard_writer import write_shards

    shards = tmp_path / "shards"  # 359 digits in shards of 120, 119: an epoch is 44 steps of 8
    assert write_shards(DigitsDataset(resolution=8, split="test"), shards, 120, progress=False).complete
    steps, data = 60, ["Trainer.dataset = @ShardDataset()", f"ShardDataset.root = '{shards}'",
                       "ShardDataset.shuffle_window = 2", "Trainer.checkpoint_every = 10"]
    straight = start_training(tmp_path / "straight", steps, *data)
    killed = start_training(tmp_path / "killed", steps, *data)
    wait_for_step(tmp_path / "killed", 23, killed)
    killed.kill()  # SIGKILL: no handler runs, the newest checkpoint (every 10 steps) is where it resumes
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    last = int(list_checkpoints(tmp_path / "killed")[-1].name.split("_")[1])
    assert 20 <= last < steps and last % 44  # mid-epoch
    restarted = start_training(tmp_path / "killed", steps, *data)
    _, err = restarted.communicate(timeout=300)
    assert restarted.returncode == 0, err
    assert straight.wait(timeout=300) == 0
    assert_same_weights(tmp_path / "straight", tmp_path / "killed")
    state = torch.load(list_checkpoints(tmp_path / "killed")[-1] / "training_state.pt", weights_only=True)
    assert state["data_position"] == steps * 8 and state["data"]["stream"] == "shards"  # past the first epoch
