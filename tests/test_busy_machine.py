"""The main job on a busy machine: the CPU threads a run takes by default (a function of the machine, never of its
load), bit-identical weights beside a busy process, and the one log line a run says when its steps slow down."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.threads_under_load import BUSY, clean_env
from sprint_mm import parallelize
from sprint_mm.data.faults import BadDataLedger
from sprint_mm.metrics_log import MetricsLog, SlowdownWatch, StepResult
from sprint_mm.runs import list_checkpoints
from tests.test_training import TINY

REPO = Path(__file__).resolve().parents[1]


def test_one_thread_on_a_small_machine_and_torch_s_choice_above():
    assert [parallelize.default_threads(cores) for cores in (1, 2, 4, 5, 64)] == [1, 1, 1, None, None]


def test_set_threads_follows_the_setting_then_the_environment_then_the_machine(monkeypatch):
    previous = torch.get_num_threads()
    try:
        monkeypatch.setattr(parallelize, "usable_cores", lambda: 2)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        assert parallelize.set_threads() == 1  # a 2-core machine: one thread
        assert parallelize.set_threads(2) == 2  # Trainer.num_threads wins
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert parallelize.set_threads() == 2  # the user's environment is left as torch read it
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(parallelize, "usable_cores", lambda: 16)
        torch.set_num_threads(3)
        assert parallelize.set_threads() == 3  # a big machine: torch's own choice stays
    finally:
        torch.set_num_threads(previous)


def train_process(run: Path) -> subprocess.CompletedProcess:
    """train.py on the tiny digits model with the default thread setting (no OMP_NUM_THREADS)."""
    argv = [sys.executable, "train.py", "--gin-file", "gin/image/digits_stage1.gin", "--run-dir", str(run)]
    for binding in (*TINY, "Trainer.max_steps = 6"):
        argv += ["--gin-param", binding]
    return subprocess.run(argv, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)


def test_a_run_beside_a_busy_process_gives_the_weights_of_a_run_alone(tmp_path):
    alone = train_process(tmp_path / "alone")
    assert alone.returncode == 0, alone.stderr[-2000:]
    busy = [subprocess.Popen([sys.executable, "-c", BUSY], env=clean_env(), start_new_session=True)
            for _ in range(os.cpu_count() or 2)]
    try:
        time.sleep(0.5)
        beside = train_process(tmp_path / "beside")
    finally:
        for process in busy:
            process.kill()
            process.wait()
    assert beside.returncode == 0, beside.stderr[-2000:]
    for name in ("model", "ema"):
        a, b = (load_file(str(list_checkpoints(tmp_path / run)[-1] / f"{name}.safetensors")) for run in ("alone", "beside"))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), name


def test_the_slowdown_watch_speaks_once_when_steps_become_far_slower_than_at_the_start():
    watch = SlowdownWatch(factor=4.0, skip=5, reference=20, recent=20)
    said = [watch.add(seconds) for seconds in [1.0] * 5 + [0.1] * 20]  # start-up, then the reference: 0.1 s
    said += [watch.add(0.9) for _ in range(3)] + [watch.add(0.1) for _ in range(20)]  # a few slow steps: nothing
    assert not any(said)
    said = [watch.add(0.5) for _ in range(40)]  # 5x slower for 20 steps in a row
    messages = [message for message in said if message]
    assert len(messages) == 1 and said.index(messages[0]) == 10  # the median of the last 20 passed 0.4 at the 11th
    assert "0.5 s, 5.0x the 0.1 s of the run's start" in messages[0]


@pytest.mark.parametrize("threads, setting", [(2, "Set Trainer.num_threads = 1"), (1, "this run uses one CPU thread")])
def test_the_log_names_the_thread_setting_once(tmp_path, capsys, threads, setting):
    accelerator = SimpleNamespace(is_main_process=True, num_processes=1)
    log = MetricsLog(tmp_path, accelerator, max_steps=200, log_every=1000, progress=False, ledger=BadDataLedger())
    log.open(0, None)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for step in range(1, 101):
            log.step(step, StepResult({"loss": 1.0}, 1.0, 16, seconds=0.01 if step <= 40 else 0.2), dict)
    finally:
        torch.set_num_threads(previous)
        log.close()
    lines = [line for line in capsys.readouterr().out.splitlines() if "training steps now take" in line]
    assert len(lines) == 1 and setting in lines[0] and "now take 0.105 s, 10.5x the 0.01 s" in lines[0]  # at 10 of 20
