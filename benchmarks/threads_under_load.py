"""The main job on a busy machine: training steps per second of the digits demo's stage 1 beside other processes,
for several CPU thread settings.

    python benchmarks/threads_under_load.py [--loads none torch torch-nice python-nice]
                                            [--settings auto threads2 threads1 passive] [--steps 60]

Every cell starts the load processes (`LOADS`), waits for them to spin up, runs `train.py --gin-file
gin/image/digits_stage1.gin` for `--warmup` + `--steps` steps in a fresh process with one thread setting
(`SETTINGS`: bindings and environment variables), and stops the load. The rate is measured over the last `--steps`
steps from the run's own log (`metrics.jsonl`, windows of `--every` steps), so start-up and the first steps are not in
it. Load processes and training runs get the environment of this script without OMP_NUM_THREADS, so "torch's default"
means one thread per core. Run it alone on the machine (`/work/tools/cpu-run --exclusive` here): its point is what
the load does, and any other process is load too.

Prints one markdown table (a row per load, a column per setting, steps/s) and writes
benchmarks/results/threads_under_load.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from benchmarks.harness import RESULTS, add_out_option, markdown_table, write_result

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGE1 = "gin/image/digits_stage1.gin"
MATMUL = ("import torch\n"
          "a = torch.randn(1024, 1024)\n"
          "while True:\n"
          "    a = torch.tanh(a @ a)\n")  # one-per-core threads, as any torch job that does not set them
BUSY = "while True:\n    pass\n"


@dataclass(frozen=True)
class Load:
    """Processes that run beside the measured job: (command, niceness) each."""

    description: str
    processes: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Setting:
    """A thread setting of the measured job: gin bindings and environment variables."""

    description: str
    bindings: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


LOADS = {
    "none": Load("nothing", ()),
    "torch": Load("a torch job (matmul loop, one thread per core), same priority", ((MATMUL, 0),)),
    "torch-nice": Load("a torch job at `nice -n 19`", ((MATMUL, 19),)),
    "python-nice": Load("two Python busy loops at `nice -n 19`", ((BUSY, 19), (BUSY, 19))),
}
SETTINGS = {
    "auto": Setting("the default (`Trainer.num_threads` unset)"),
    "threads2": Setting("2 threads (torch's one per core)", ("Trainer.num_threads = 2",)),
    "threads1": Setting("`Trainer.num_threads = 1`", ("Trainer.num_threads = 1",)),
    "passive": Setting("2 threads, `OMP_WAIT_POLICY=PASSIVE`", ("Trainer.num_threads = 2",),
                       (("OMP_WAIT_POLICY", "PASSIVE"),)),
    **{f"spin{count // 1000}k": Setting(f"2 threads, `GOMP_SPINCOUNT={count}`", ("Trainer.num_threads = 2",),
                                        (("GOMP_SPINCOUNT", str(count)),)) for count in (1000, 10000, 100000)},
    "spin300": Setting("2 threads, `GOMP_SPINCOUNT=300`", ("Trainer.num_threads = 2",), (("GOMP_SPINCOUNT", "300"),)),
}


def clean_env(extra: Sequence[tuple[str, str]] = ()) -> dict[str, str]:
    """This process's environment without thread settings (torch's defaults apply), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY",
                                                            "GOMP_SPINCOUNT")}
    return {**env, "ACCELERATE_USE_CPU": "1", **dict(extra)}


def start_load(load: Load) -> list[subprocess.Popen]:
    processes = []
    for code, niceness in load.processes:
        command = [sys.executable, "-c", code]
        if niceness:
            command = ["nice", "-n", str(niceness), *command]
        processes.append(subprocess.Popen(command, env=clean_env(), start_new_session=True))
    return processes


def stop_load(processes: Sequence[subprocess.Popen]) -> None:
    for process in processes:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def steps_per_second(metrics: Path, steps: int, every: int) -> float:
    """Steps per second over the last `steps` steps, from the run's log windows of `every` steps."""
    windows = [json.loads(line) for line in metrics.read_text().splitlines()][-(steps // every):]
    return sum(every for _ in windows) / sum(every / window["steps_per_s"] for window in windows)


def measure(setting: Setting, load: Load, run_dir: Path, warmup: int, steps: int, every: int,
            settle: float) -> dict:
    """One cell: the load started, the run trained, the load stopped."""
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "train.py", "--gin-file", STAGE1, "--run-dir", str(run_dir)]
    for binding in (*setting.bindings, f"Trainer.max_steps = {warmup + steps}", f"Trainer.log_every = {every}",
                    "Trainer.time_budget_minutes = None", "Trainer.preview_every = 0", "Trainer.progress = False",
                    f"Trainer.checkpoint_every = {warmup + steps}"):
        command += ["--gin-param", binding]
    processes = start_load(load)
    try:
        time.sleep(settle)
        started = time.perf_counter()
        done = subprocess.run(command, cwd=REPO_ROOT, env=clean_env(setting.env), capture_output=True, text=True)
        seconds = time.perf_counter() - started
    finally:
        stop_load(processes)
    if done.returncode:
        raise RuntimeError(f"the run failed ({' '.join(command)}): {done.stderr[-2000:]}")
    return {"steps_per_s": steps_per_second(run_dir / "metrics.jsonl", steps, every), "process_s": seconds}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", nargs="+", choices=list(LOADS), default=list(LOADS))
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=["auto", "threads2", "threads1",
                                                                                   "passive"])
    parser.add_argument("--steps", type=int, default=60, help="measured steps per cell")
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured steps first")
    parser.add_argument("--every", type=int, default=10, help="log window (steps); divides --steps and --warmup")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds the load runs before the job starts")
    parser.add_argument("--root", default="runs/threads_under_load")
    add_out_option(parser, RESULTS / "threads_under_load.json")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.every < 1 or args.steps % args.every or args.warmup % args.every:
        parser.error(f"--every ({args.every}) must divide --steps ({args.steps}) and --warmup ({args.warmup})")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    cells = []
    for load_name in args.loads:
        for setting_name in args.settings:
            cell = measure(SETTINGS[setting_name], LOADS[load_name], Path(args.root) / f"{load_name}_{setting_name}",
                           args.warmup, args.steps, args.every, args.settle)
            cells.append({"load": load_name, "setting": setting_name, **cell})
            print(f"{LOADS[load_name].description} | {SETTINGS[setting_name].description}: "
                  f"{cell['steps_per_s']:.2f} steps/s", flush=True)
    rate = {(cell["load"], cell["setting"]): cell["steps_per_s"] for cell in cells}
    header = ["beside", *(SETTINGS[name].description for name in args.settings)]
    rows = [[LOADS[load].description, *(rate[load, setting] for setting in args.settings)] for load in args.loads]
    print(markdown_table(header, rows))
    result = {"cpu_count": os.cpu_count(), "steps": args.steps, "warmup": args.warmup, "every": args.every,
              "loads": {name: LOADS[name].description for name in args.loads},
              "settings": {name: SETTINGS[name].description for name in args.settings}, "cells": cells}
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
