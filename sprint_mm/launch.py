"""Start the processes of a multi-process run, with the exit status and signals a cluster scheduler relies on.

    python -m sprint_mm.launch --nproc-per-node 8 train.py --gin-file gin/image/sit_xl2_256_stage1.gin
    python -m sprint_mm.launch --nnodes 4 --node-rank "$SLURM_NODEID" --master-addr "$head" --nproc-per-node 8 train.py ...
    python -m sprint_mm.launch --nproc-per-node 2 -m some.module ARGS...

Each process gets the environment torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
GROUP_RANK, MASTER_ADDR, MASTER_PORT), which accelerate and torch.distributed read. What differs from torchrun:

- SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 are forwarded to every process, once per signal the launcher gets
  (torchrun dies on SIGUSR1 and leaves its workers training; on SIGTERM it tears them down itself and exits 1);
- the exit status is the processes': 0 when all succeed, 75 (EXIT_PREEMPTED, "requeue me") when they stopped on a
  signal after their checkpoint, else the status of the first process that failed (a signal's as 128 + its number);
- the line each process ends with (`errors.final_line`: a configuration mistake, a stop) is printed once, not once
  per process, and no launcher traceback follows it;
- when a process fails, the others get `--grace-s` seconds to end on their own (they usually fail at their next
  collective) and are then killed; when the launcher is killed, so are they (Linux).

It does not restart failed processes or let nodes join late (torchrun's elastic rendezvous): a node's processes have
fixed ranks, `node_rank * nproc_per_node + local_rank`.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Callable, Optional, Sequence

from sprint_mm.errors import LAUNCH_REPORTS
from sprint_mm.preemption import EXIT_PREEMPTED

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent dies


@dataclass
class Worker:
    rank: int
    process: subprocess.Popen
    ended_at: Optional[float] = None
    killed: bool = False  # by the launcher, after another process failed

    @property
    def code(self) -> Optional[int]:
        return self.process.returncode

    def failed(self) -> bool:
        return self.code is not None and self.code not in (0, EXIT_PREEMPTED)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sprint_mm.launch",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=1, help="processes on this node")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--node-rank", "--node_rank", type=int, default=0)
    parser.add_argument("--master-addr", "--master_addr", default="127.0.0.1",
                        help="address of node 0 (where process 0 listens)")
    parser.add_argument("--master-port", "--master_port", type=int, default=0,
                        help="its port (default: a free one; several nodes must name one)")
    parser.add_argument("--grace-s", type=float, default=30.0,
                        help="seconds the other processes get to end after one fails, before they are killed")
    parser.add_argument("-m", "--module", action="store_true", help="run SCRIPT as a module (python -m SCRIPT)")
    parser.add_argument("script", help="the script (or, with -m, the module) every process runs")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    args = parser.parse_args(argv)
    for name in ("nproc_per_node", "nnodes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.node_rank < args.nnodes:
        parser.error(f"--node-rank must lie in [0, {args.nnodes}), got {args.node_rank}")
    if args.nnodes > 1 and not args.master_port:
        parser.error("several nodes meet at one address: give --master-addr and --master-port")
    return args


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def die_with_launcher() -> Optional[Callable[[], object]]:
    """What a child runs before its program so that the kernel kills it when the launcher dies (Linux; None
    elsewhere). prctl is looked up here, in the launcher, not between fork and exec."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def start_workers(args: argparse.Namespace, port: int, reports: Path) -> list[Worker]:
    """One process per local rank, each in its own session (a terminal's Ctrl-C reaches the launcher, which
    forwards it once)."""
    command = [sys.executable, *(["-m"] if args.module else []), args.script, *args.args]
    world = args.nnodes * args.nproc_per_node
    before_start = die_with_launcher()
    workers = []
    for local in range(args.nproc_per_node):
        rank = args.node_rank * args.nproc_per_node + local
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(local), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(args.nproc_per_node), GROUP_RANK=str(args.node_rank),
                   MASTER_ADDR=args.master_addr, MASTER_PORT=str(port), **{LAUNCH_REPORTS: str(reports)})
        process = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=before_start)
        workers.append(Worker(rank, process))
    return workers


class Launch:
    """The workers of one node, the signals it forwards to them, and what it reports when they have ended."""

    def __init__(self, workers: list[Worker], grace_s: float) -> None:
        self.workers, self.grace_s = workers, grace_s

    def forward(self, number: int, _frame: Optional[FrameType]) -> None:
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.send_signal(number)

    def wait(self) -> None:
        """Until every worker has ended; after a failure, the others are killed once the grace time is over."""
        previous = {number: signal.signal(number, self.forward) for number in FORWARDED}
        try:
            deadline = None
            while [worker.process.poll() for worker in self.workers].count(None):
                now = time.monotonic()
                for worker in self.workers:
                    if worker.code is not None and worker.ended_at is None:
                        worker.ended_at = now
                if deadline is None and any(worker.failed() for worker in self.workers):
                    deadline = now + self.grace_s
                if deadline is not None and now > deadline:
                    self.kill_the_rest()
                time.sleep(0.05)
            for worker in self.workers:
                worker.ended_at = worker.ended_at or time.monotonic()
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def kill_the_rest(self) -> None:
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait()
                worker.killed = True

    def first_failure(self) -> Optional[Worker]:
        failed = [worker for worker in self.workers if worker.failed() and not worker.killed]
        return min(failed, key=lambda worker: (worker.ended_at, worker.rank)) if failed else None

    def exit_status(self) -> int:
        first = self.first_failure()
        if first is not None:
            return 128 - first.code if first.code < 0 else first.code
        return EXIT_PREEMPTED if any(worker.code == EXIT_PREEMPTED for worker in self.workers) else 0


def status_words(code: int) -> str:
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"ended with status {code}"


def report_lines(launch: Launch, reports: Path) -> list[str]:
    """Each distinct final line of the workers once (naming the processes when not all said it), then a line for
    each worker that failed without one."""
    said: dict[str, list[int]] = {}
    for worker in launch.workers:
        path = reports / f"rank{worker.rank}.txt"
        for line in (path.read_text().splitlines() if path.is_file() else []):
            said.setdefault(line, []).append(worker.rank)
    everyone = [worker.rank for worker in launch.workers]
    lines = [line if ranks == everyone or len(everyone) == 1 else f"{line} (process {', '.join(map(str, ranks))})"
             for line, ranks in said.items()]
    spoke = {rank for ranks in said.values() for rank in ranks}
    for worker in launch.workers:
        if worker.killed:
            lines.append(f"error: process {worker.rank} was killed by the launcher {launch.grace_s:g} s after "
                         "another one failed")
        elif worker.failed() and worker.rank not in spoke:
            lines.append(f"error: process {worker.rank} {status_words(worker.code)} (its own output is above)")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    port = args.master_port or free_port()
    reports = Path(tempfile.mkdtemp(prefix="sprint_mm_launch_"))
    try:
        launch = Launch(start_workers(args, port, reports), args.grace_s)
        launch.wait()
        for line in report_lines(launch, reports):
            print(line, file=sys.stderr)
        return launch.exit_status()
    finally:
        shutil.rmtree(reports, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
