"""`python -m sprint_mm.launch`: the exit status and the signals a requeueing scheduler relies on, with real
processes: two CPU processes (gloo) training the tiny digits model, and small scripts for the status rules."""
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

from sprint_mm.preemption import EXIT_PREEMPTED
from sprint_mm.runs import list_checkpoints
from tests.test_training import TINY

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
LAUNCH = [sys.executable, "-m", "sprint_mm.launch"]


def launch_training(run: Path, steps: int, *bindings: str) -> list[str]:
    argv = [*LAUNCH, "--nproc-per-node", "2", "train.py", "--gin-file", "gin/image/digits_stage1.gin",
            "--run-dir", str(run)]
    for binding in (*TINY, f"Trainer.max_steps = {steps}", "Trainer.log_every = 1", *bindings):
        argv += ["--gin-param", binding]
    return argv


def logged_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1])["step"] if lines else 0


def children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(child) for child in found]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def stop_at_a_step(run: Path, number: signal.Signals) -> tuple[subprocess.CompletedProcess, list[int], int]:
    """Start two processes training, send the launcher `number` once both train; returns the launcher's result,
    the workers' pids and the step logged when the signal went."""
    launcher = subprocess.Popen(launch_training(run, 100000), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while logged_step(run) < 2:
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[1][-3000:]
        time.sleep(0.05)
    workers = children(launcher.pid)
    sent_at = logged_step(run)
    launcher.send_signal(number)
    out, err = launcher.communicate(timeout=300)
    return subprocess.CompletedProcess(launcher.args, launcher.returncode, out, err), workers, sent_at


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed support")
@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_to_the_launcher_checkpoints_every_process_and_exits_75(tmp_path, number):
    run = tmp_path / "run"
    done, workers, sent_at = stop_at_a_step(run, number)
    assert done.returncode == EXIT_PREEMPTED, done.stderr[-3000:]
    assert len(workers) == 2 and not any(alive(pid) for pid in workers)  # no orphan keeps training
    step = int(list_checkpoints(run)[-1].name.split("_")[1])
    assert step >= sent_at and step == logged_step(run)  # stopped at the step it was in, with its checkpoint
    assert sorted(p.name for p in list_checkpoints(run)[-1].glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]
    stops = [line for line in done.stderr.splitlines() if "stopped by" in line]
    assert stops == [f"[sprint_mm] stopped by {number.name} at step {step} after writing its checkpoint; run the same "
                     "command again to resume"], done.stderr[-3000:]
    if number == signal.SIGTERM:  # the requeued command resumes where it stopped
        again = subprocess.run(launch_training(run, step + 1), cwd=REPO, env=ENV, capture_output=True, text=True,
                               timeout=300)
        assert again.returncode == 0 and f"resumed from {list_checkpoints(run)[0]}" in again.stdout + again.stderr
        assert logged_step(run) == step + 1


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed support")
def test_a_configuration_mistake_is_printed_once_without_a_traceback(tmp_path):
    done = subprocess.run(launch_training(tmp_path / "run", 2, "Trainer.lr = 'fast'"), cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and lines == ["error: Trainer.lr must be a number >= 0, got 'fast'"], done.stderr


SCRIPT = """
import os, signal, sys, time
from sprint_mm.errors import final_line
rank = int(os.environ["RANK"])
behaviour = sys.argv[1].split(",")[rank]
if behaviour == "hang":
    time.sleep(600)
if behaviour == "killed":
    os.kill(os.getpid(), signal.SIGKILL)
if behaviour.startswith("say"):
    final_line("error: the same mistake")
    behaviour = behaviour[3:]
if behaviour == "late":
    time.sleep(1)
    behaviour = "1"
sys.exit(int(behaviour))
"""


@pytest.mark.parametrize("behaviours, status, lines", [
    ("0,0", 0, []),
    ("75,0", EXIT_PREEMPTED, []),
    ("say2,say2", 2, ["error: the same mistake"]),
    ("say2,0", 2, ["error: the same mistake (process 0)"]),
    ("late,killed", 128 + signal.SIGKILL, ["error: process 0 ended with status 1 (its own output is above)",
                                           "error: process 1 was killed by SIGKILL (its own output is above)"]),
    ("1,hang", 1, ["error: process 0 ended with status 1 (its own output is above)",
                   "error: process 1 was killed by the launcher 1 s after another one failed"]),
])
def test_the_launchers_exit_status_and_lines(tmp_path, behaviours, status, lines):
    """0 when all succeed, 75 when they stopped to be requeued, else the first failure's status; each final line
    once; the processes still running a grace time after a failure are killed."""
    script = tmp_path / "worker.py"
    script.write_text(SCRIPT)
    grace = "1" if "hang" in behaviours else "60"
    done = subprocess.run([*LAUNCH, "--nproc-per-node", "2", "--grace-s", grace, str(script), behaviours], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == status and done.stderr.splitlines() == lines, done.stderr
