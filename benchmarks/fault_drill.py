"""The fault drill: every fault a long run meets, against short CPU runs of the tiny digits model.

    python benchmarks/fault_drill.py [--steps 30] [--every 10] [--root runs/fault_drill]

Each row starts runs of `--steps` steps with a checkpoint every `--every` steps (as separate `train.py` processes,
so signals and kills are real), injects one fault, resumes where the program allows it, and compares the final
weights with an uninterrupted run of the same configuration. The run-folder rows (`RUN_FOLDER_ROWS`) add crafted
run folders, resume and stage-2 mistakes, two commands into one folder, a real full disk (a small tmpfs) and a
read-only file system (where this process may mount one: root), and signals and mistakes under torchrun and under
`python -m sprint_mm.launch`. Prints one markdown table (fault, what the program did,
exit status, work lost in steps, weights identical after resume) and writes benchmarks/results/fault_drill.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from benchmarks.harness import RESULTS, add_out_option, markdown_table, write_result

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "sit.hidden_size = 32", "sit.depth = 4", "sit.num_heads = 2", "sit.input_size = 8", "DigitsDataset.resolution = 8",
    "Trainer.batch_size = 8", "Trainer.log_every = 1", "Trainer.preview_every = 0",
    "Trainer.time_budget_minutes = None", "Trainer.progress = False", "Sprint.encoder_depth = 1",
    "Sprint.decoder_depth = 1",
]
STAGE1 = "gin/image/digits_stage1.gin"
STAGE2 = "gin/image/digits_stage2.gin"
# how each launcher starts N processes (N appended)
LAUNCHERS = {"torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node"],
             "sprint_mm.launch": ["-m", "sprint_mm.launch", "--nproc-per-node"]}


class Drill:
    """Runs train.py on the tiny model under one root folder."""

    def __init__(self, root: Path, steps: int, every: int) -> None:
        self.root, self.steps, self.every = root, steps, every
        self.env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1")

    def command(self, run: str, extra: Sequence[str], processes: int = 1, launcher: str = "torchrun",
                gin_file: str = STAGE1) -> list[str]:
        start = [sys.executable]
        if processes > 1:
            start += LAUNCHERS[launcher] + [str(processes)]
        argv = [*start, "train.py", "--gin-file", gin_file, "--run-dir", str(self.root / run)]
        for binding in (*TINY, f"Trainer.max_steps = {self.steps}", f"Trainer.checkpoint_every = {self.every}", *extra):
            argv += ["--gin-param", binding]
        return argv

    def train(self, run: str, *extra: str, processes: int = 1, launcher: str = "torchrun",
              gin_file: str = STAGE1, env: Optional[dict] = None) -> subprocess.CompletedProcess:
        return self.run(self.command(run, extra, processes, launcher, gin_file), env=env or self.env)

    def run(self, argv: Sequence[str], **options) -> subprocess.CompletedProcess:
        """A command of this repository (train.py, sample.py, ...) as a user runs it; `options` go to subprocess."""
        return subprocess.run(list(argv), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                              **{"env": self.env, **options})

    def start(self, run: str, *extra: str, processes: int = 1, launcher: str = "torchrun") -> subprocess.Popen:
        return subprocess.Popen(self.command(run, extra, processes, launcher), cwd=REPO_ROOT, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def logged_step(self, run: str) -> int:
        path = self.root / run / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        return json.loads(lines[-1])["step"] if lines else 0

    def wait_for_step(self, run: str, step: int, process: subprocess.Popen) -> None:
        deadline = time.monotonic() + 300
        while self.logged_step(run) < step:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{run} stopped before step {step}: {process.communicate()[1][-2000:]}")
            time.sleep(0.02)

    def checkpoints(self, run: str) -> list[Path]:
        from sprint_mm.runs import list_checkpoints

        return list_checkpoints(self.root / run)

    def newest_step(self, run: str) -> int:
        found = self.checkpoints(run)
        return int(found[-1].name.split("_")[1]) if found else 0

    def same_weights(self, run: str, reference: str) -> bool:
        a, b = (self.checkpoints(name)[-1] for name in (run, reference))
        for name in ("model.safetensors", "ema.safetensors"):
            x, y = load_file(str(a / name)), load_file(str(b / name))
            if x.keys() != y.keys() or any(not torch.equal(x[k], y[k]) for k in x):
                return False
        return True


def row(fault: str, action: str, status: str, lost: int | str, identical: str) -> dict:
    return {"fault": fault, "what the program did": action, "exit status": status, "work lost (steps)": lost,
            "weights identical after resume": identical}


def interrupt(drill: Drill, run: str, at: int, send: Callable[[subprocess.Popen], None],
              processes: int = 1) -> tuple[subprocess.Popen, int]:
    """Start a run, let it reach step `at`, apply `send`, wait for the end; returns the process and the last step
    it logged."""
    process = drill.start(run, processes=processes)
    drill.wait_for_step(run, at, process)
    send(process)
    process.communicate(timeout=300)
    return process, drill.logged_step(run)


def signal_row(drill: Drill, name: str, twice: bool = False) -> dict:
    run = f"signal_{name}{'_twice' if twice else ''}"

    def send(process: subprocess.Popen) -> None:
        process.send_signal(getattr(signal, name))
        if twice:  # a moment later: the same signal sent at once is merged into one by the kernel
            time.sleep(0.02)
            process.send_signal(getattr(signal, name))

    process, reached = interrupt(drill, run, drill.every + 2, send)
    saved = drill.newest_step(run)
    resumed = drill.train(run)
    action = (f"checkpoint at step {saved}, exited" if saved == reached else
              f"exited at once; previous checkpoint step {saved} intact")
    return row(f"{name}{' twice' if twice else ''} at step {reached}", action + "; resumed", str(process.returncode),
               reached - saved, "yes" if resumed.returncode == 0 and drill.same_weights(run, "reference") else "no")


def kill_row(drill: Drill, processes: int = 1) -> dict:
    run = f"sigkill_{processes}p"
    reference = "reference" if processes == 1 else "reference_2p"
    if processes > 1 and not drill.checkpoints(reference):
        drill.train(reference, processes=2)

    def kill_one_worker(process: subprocess.Popen) -> None:
        if processes == 1:
            process.kill()
            return
        workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        os.kill(int(workers[-1]), signal.SIGKILL)  # one rank dies; torchrun tears the other one down

    process, reached = interrupt(drill, run, drill.every + 3, kill_one_worker, processes)
    saved = drill.newest_step(run)
    resumed = drill.train(run, processes=processes)
    fault = "SIGKILL (node dies)" if processes == 1 else "2 processes, one rank SIGKILLed"
    return row(f"{fault} at step {reached}", f"resumed from checkpoint step {saved}", str(process.returncode),
               reached - saved, "yes" if resumed.returncode == 0 and drill.same_weights(run, reference) else "no")


def damaged_row(drill: Drill, file: str, how: str) -> dict:
    run = f"damaged_{file.split('.')[0]}"
    drill.train(run, f"Trainer.max_steps = {2 * drill.every}")
    newest = drill.checkpoints(run)[-1]
    target = newest / file
    if how == "missing":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    resumed = drill.train(run)
    fell_back = "is damaged" in resumed.stdout + resumed.stderr
    action = "found it damaged, fell back to the previous checkpoint" if fell_back else "did not notice"
    return row(f"newest {file} {how}", action, str(resumed.returncode), drill.every,
               "yes" if resumed.returncode == 0 and drill.same_weights(run, "reference") else "no")


def staging_row(drill: Drill) -> dict:
    """A kill in the middle of a checkpoint write leaves a hidden staging folder with half a file."""
    run = "killed_while_writing"
    drill.train(run, f"Trainer.max_steps = {drill.every}")
    staging = drill.root / run / "checkpoints" / f".step_{2 * drill.every:07d}.partial"
    shutil.copytree(drill.checkpoints(run)[-1], staging)
    model = staging / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])
    resumed = drill.train(run)
    return row(f"killed at step {2 * drill.every} while writing its checkpoint (a half-written staging folder)",
               f"ignored the staging folder, resumed from step {drill.every}", str(resumed.returncode), drill.every,
               "yes" if resumed.returncode == 0 and drill.same_weights(run, "reference") else "no")


def in_process(argv: list[str]) -> tuple[int, str]:
    """train_main in this process (for faults injected by patching), with its stderr."""
    import contextlib
    import io

    from sprint_mm.cli import train_main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = train_main(argv[2:])  # without the interpreter and train.py
    return code, err.getvalue()


def nan_row(drill: Drill) -> dict:
    from sprint_mm.flow import FlowMatching

    run, real, calls = "nan_loss", FlowMatching.loss, [0]

    def loss(self, *args, **kwargs):
        calls[0] += 1
        value = real(self, *args, **kwargs)
        return value * float("nan") if calls[0] == drill.every + 1 else value

    FlowMatching.loss = loss
    try:
        code, _ = in_process(drill.command(run, []))
    finally:
        FlowMatching.loss = real
    logged = [json.loads(line) for line in (drill.root / run / "metrics.jsonl").read_text().splitlines()]
    skipped = [m["step"] for m in logged if m["skipped_steps"]]
    finite = all(torch.isfinite(t).all() for t in load_file(str(drill.checkpoints(run)[-1] / "model.safetensors")).values())
    return row(f"loss NaN at step {drill.every + 1}", f"skipped step(s) {skipped}, trained on; weights finite: "
               f"{'yes' if finite else 'no'}", str(code), 0, "n/a (no resume)")


def diverging_row(drill: Drill) -> dict:
    run = "lr_1e6"
    done = drill.train(run, "Trainer.lr = 1e6", "Trainer.grad_clip = 0.0", "Trainer.max_bad_steps = 3")
    message = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    logged = drill.logged_step(run)
    finite = all(torch.isfinite(t).all() for folder in drill.checkpoints(run)
                 for t in load_file(str(folder / "model.safetensors")).values())
    action = ("stopped: " + message.split(";")[0].removeprefix("error: ")) if done.returncode else "trained to the end"
    return row("Trainer.lr = 1e6", f"{action}; every checkpoint finite: {'yes' if finite else 'no'}",
               str(done.returncode), logged - drill.newest_step(run), "n/a")


def disk_full_row(drill: Drill) -> dict:
    import sprint_mm.checkpointer as checkpointer

    run, real, calls = "disk_full", checkpointer.save_state_dict, []

    def failing(state, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 2:
            raise OSError(28, "No space left on device")
        return real(state, path, *args, **kwargs)

    checkpointer.save_state_dict = failing
    try:
        code, err = in_process(drill.command(run, []))
    finally:
        checkpointer.save_state_dict = real
    intact = [p.name for p in drill.checkpoints(run)]
    resumed = drill.train(run)
    return row("disk full while writing the second checkpoint",
               f"stopped with one line ({err.strip()[:60]}...); intact: {intact}; resumed", str(code), drill.every,
               "yes" if resumed.returncode == 0 and drill.same_weights(run, "reference") else "no")


def image_folder(root: Path) -> Path:
    """60 real digits as PNGs in class folders, plus an empty and a truncated file."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(60):
        path = root / str(digits.target[i]) / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).convert("RGB").save(path)
    (root / "3" / "empty.png").write_bytes(b"")
    good = next((root / "5").glob("*.png"))
    (root / "5" / "truncated.png").write_bytes(good.read_bytes()[:30])
    return root


def bad_image_row(drill: Drill, max_bad_fraction: float) -> dict:
    """An image folder with 2 bad files among 62, under a bad-data limit above and below their share."""
    folder = drill.root / "image_folder"
    if not folder.is_dir():
        image_folder(folder)
    run = f"bad_images_{max_bad_fraction:g}"
    done = drill.train(run, f"ImageFolderDataset.root = '{folder}'", "ImageFolderDataset.resolution = 8",
                       "Trainer.dataset = @ImageFolderDataset()", "sit.in_channels = 3", "IdentityCodec.channels = 3",
                       f"BadDataLedger.max_bad_fraction = {max_bad_fraction}")
    if done.returncode == 0:
        last = json.loads((drill.root / run / "metrics.jsonl").read_text().splitlines()[-1])
        action = f"skipped and counted them (bad_image = {last['bad_image']} of the items read), trained on"
    else:
        action = "stopped: " + done.stderr.strip().splitlines()[-1].removeprefix("error: ").split(", each")[0]
        action += ", naming both files and the setting to raise"
    return row(f"2 corrupt images among 62, max_bad_fraction {max_bad_fraction:g}", action, str(done.returncode), 0,
               "n/a")


# ---------------------------------------------------------------------------- run folders (issue 21)
def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.strip()]


def outcome(done: subprocess.CompletedProcess, width: int = 150) -> str:
    """How a command ended for its user: how many lines it printed on stderr, whether a traceback, its last line."""
    lines = error_lines(done)
    last = lines[-1] if lines else "(nothing)"
    last = last if len(last) <= width else last[: width - 3] + "..."
    tracebacks = done.stderr.count("Traceback")
    return (f"{len(lines)} line{'s' if len(lines) != 1 else ''}"
            f"{f', {tracebacks} traceback(s)' if tracebacks else ''}: `{last}`")


def sample_argv(run: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "sample.py", "--run", str(run), "--num", "2", "--steps", "2", "--out", str(out), *extra]


def crafted_config_row(drill: Drill, path: str) -> dict:
    """A run folder whose config.gin was crafted to run a command when sample.py reads it."""
    run = f"crafted_{path.split()[0]}"
    drill.train(run, f"Trainer.max_steps = {drill.every}")
    marker = drill.root / f"{run}.marker"
    dynamic = ("from __gin__ import dynamic_registration\nimport subprocess\nimport sprint_mm.conditioning\n"
               f"subprocess.check_call.args = ['touch', '{marker}']\n"
               "sprint_mm.conditioning.build_conditioning.kind = @subprocess.check_call()\n")
    (drill.root / "evil.gin").write_text(dynamic)
    (drill.root / "evil_module_for_the_drill.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    statements = {"an include of a file that registers dynamically": f"include '{drill.root / 'evil.gin'}'\n",
                  "dynamic registration binding subprocess.check_call": dynamic,
                  "an import of a module that runs code": "import evil_module_for_the_drill\n"}[path]
    config = drill.root / run / "config.gin"
    config.write_text(config.read_text() + statements)
    done = drill.run(sample_argv(drill.root / run, drill.root / f"{run}.png"),
                     env=dict(drill.env, PYTHONPATH=str(drill.root)))
    ran = "RAN THE PAYLOAD" if marker.exists() else "refused it, the payload never ran"
    return row(f"sample.py on a crafted run folder: config.gin with {path}", f"{ran}; {outcome(done)}",
               str(done.returncode), 0, "n/a")


def changed_resume_row(drill: Drill, binding: str) -> dict:
    """A resume whose configuration changes what a step computes: refused, then resumed with the flag."""
    run = "changed_" + binding.split(".")[1].split()[0]
    drill.train(run, f"Trainer.max_steps = {drill.every}")
    config, before = (drill.root / run / "config.gin").read_text(), drill.checkpoints(run)
    refused = drill.train(run, binding)
    kept = (drill.root / run / "config.gin").read_text() == config and drill.checkpoints(run) == before
    allowed = drill.run(drill.command(run, [binding]) + ["--allow-config-change"])
    history = (drill.root / run / "config_history" / f"until_step_{drill.every:07d}.gin").is_file()
    return row(f"resume with `{binding}`", f"{outcome(refused)}; config.gin and checkpoints untouched: "
               f"{'yes' if kept else 'no'}; with --allow-config-change: status {allowed.returncode}, earlier config "
               f"kept in config_history/: {'yes' if history else 'no'}", str(refused.returncode), 0, "n/a")


def stage2_row(drill: Drill, case: str) -> dict:
    """Stage-2 mistakes: into its own stage-1 folder, without init_from, into another stage-1 run's folder."""
    run, source = f"stage2_{case.split()[0]}", "stage2_source"
    if not drill.checkpoints(source):
        drill.train(source, f"Trainer.max_steps = {drill.every}")
    drill.train(run, f"Trainer.max_steps = {drill.every}")
    before = (drill.root / run / "config.gin").read_text()
    bindings = {"into its own stage-1 run folder": [f"Trainer.init_from = '{drill.root / run}'"],
                "without Trainer.init_from": [],
                "into the folder of another stage-1 run": [f"Trainer.init_from = '{drill.root / source}'"]}[case]
    done = drill.train(run, *bindings, gin_file=STAGE2)
    kept = (drill.root / run / "config.gin").read_text() == before
    return row(f"stage-2 gin {case}", f"{outcome(done)}; the stage-1 run untouched: {'yes' if kept else 'no'}",
               str(done.returncode), 0, "n/a")


def run_dir_row(drill: Drill, case: str) -> dict:
    (drill.root / "a_file").write_text("not a folder")
    run_dir = {"Trainer.run_dir = ''": "", "a run dir that is a file": str(drill.root / "a_file")}[case]
    argv = [sys.executable, "train.py", "--gin-file", STAGE1, "--run-dir", run_dir]
    for binding in (*TINY, "Trainer.max_steps = 1"):
        argv += ["--gin-param", binding]
    before = set(Path(REPO_ROOT).iterdir())
    done = drill.run(argv)
    littered = sorted(p.name for p in set(Path(REPO_ROOT).iterdir()) - before)
    return row(case, f"{outcome(done)}; new files in the working folder: {littered or 'none'}", str(done.returncode),
               0, "n/a")


@contextlib.contextmanager
def paused(process: subprocess.Popen) -> Iterator[None]:
    """SIGSTOP a process for the duration of a `with` block (it holds its locks meanwhile)."""
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


def two_trainings_row(drill: Drill) -> dict:
    """A second train.py into a run folder while the first trains (paused, holding its lock, meanwhile)."""
    run = "two_at_once"
    first = drill.start(run)
    drill.wait_for_step(run, 2, first)
    with paused(first):
        second = drill.train(run)
    first.communicate(timeout=300)
    same = first.returncode == 0 and drill.same_weights(run, "reference")
    return row("a second train.py into a run folder while the first trains",
               f"second: {outcome(second)}; the first trained to the end", f"{second.returncode} (first: "
               f"{first.returncode})", 0, "yes" if same else "no")


def two_samplings_row(drill: Drill) -> dict:
    out = drill.root / "two_samplings.npz"
    argv = sample_argv(drill.root / "reference", out)
    argv[argv.index("--steps") + 1] = "200"
    first = subprocess.Popen(argv, cwd=REPO_ROOT, env=drill.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    shards = out.with_name(f".{out.name}.shards")
    deadline = time.monotonic() + 300
    while not shards.is_dir() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    with paused(first):
        second = drill.run(argv)
    first.communicate(timeout=300)
    complete = out.is_file() and np.load(out)["arr_0"].shape[0] == 2
    return row("a second sample.py with the same --out while the first samples",
               f"second: {outcome(second)}; the first wrote its output: {'yes' if complete else 'no'}",
               f"{second.returncode} (first: {first.returncode})", 0, "n/a")


def manifest_missing_row(drill: Drill) -> dict:
    run = "manifest_missing"
    drill.train(run, f"Trainer.max_steps = {2 * drill.every}")
    newest = drill.checkpoints(run)[-1]
    (newest / "manifest.json").unlink()
    model = newest / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    sampled = drill.run(sample_argv(drill.root / run, drill.root / "manifest_missing.png"))
    used = "used the previous checkpoint" if "the newest intact checkpoint" in sampled.stdout else "did not fall back"
    resumed = drill.train(run)
    fell_back = "is damaged (manifest.json is missing" in resumed.stdout + resumed.stderr
    return row("newest checkpoint without manifest.json (and its model.safetensors truncated)",
               f"sample.py {used} (status {sampled.returncode}); resume "
               f"{'fell back to the previous checkpoint' if fell_back else 'did not notice'}",
               str(resumed.returncode), drill.every,
               "yes" if resumed.returncode == 0 and drill.same_weights(run, "reference") else "no")


def mount(folder: Path, options: str) -> bool:
    """Mount a tmpfs at `folder` (False where this process may not)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def full_disk_row(drill: Drill) -> dict:
    """A real tmpfs that holds the run and one checkpoint but not a second: the write fails, and the rerun fails the
    same clean way (nothing left holding space); freed, the run resumes where it stood."""
    source, disk = "full_disk_source", drill.root / "tmpfs"
    drill.train(source, f"Trainer.max_steps = {drill.every}")
    checkpoint = folder_bytes(drill.checkpoints(source)[-1])
    size = folder_bytes(drill.root / source) + checkpoint + 256 * 1024
    if not mount(disk, f"size={size}"):
        return row("a real full disk (tmpfs)", "not run: this machine does not let the drill mount a file system",
                   "-", "-", "-")
    try:
        shutil.copytree(drill.root / source, disk / "run")
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (checkpoint // 2 + 256 * 1024))
        first, again = drill.train("tmpfs/run"), drill.train("tmpfs/run")
        partial = [p.name for p in (disk / "run" / "checkpoints").glob(".*")]
        intact = [p.name for p in drill.checkpoints("tmpfs/run")]
        filler.unlink()  # space freed: the filler goes and the file system grows to hold the checkpoints still to come
        subprocess.run(["mount", "-o", f"remount,size={4 * size}", str(disk)], check=True)
        resumed = drill.train("tmpfs/run")
        same = resumed.returncode == 0 and drill.same_weights("tmpfs/run", "reference")
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)
    return row(f"a real full disk ({size / 1e6:.1f} MB tmpfs: the run and one checkpoint fit, a second does not)",
               f"{outcome(first)}; rerun: status {again.returncode}, {outcome(again).split(':')[0]}; partial folders "
               f"left: {partial or 'none'}; intact: {intact}; space freed: resumed", str(first.returncode),
               drill.every, "yes" if same else "no")


def file_size_limit_row(drill: Drill) -> dict:
    """A write that fails midway (the process may not write a file past half a checkpoint file: ulimit -f)."""
    import resource

    run = "file_size_limit"
    drill.train(run, f"Trainer.max_steps = {drill.every}")
    limit = (drill.checkpoints(run)[-1] / "model.safetensors").stat().st_size // 2

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    failed = drill.run(drill.command(run, []), preexec_fn=limited)
    partial = [p.name for p in (drill.root / run / "checkpoints").glob(".*")]
    resumed = drill.train(run)
    return row("a file-size limit hit while writing a checkpoint (ulimit -f)",
               f"{outcome(failed)}; partial folders left: {partial or 'none'}; without the limit: resumed",
               str(failed.returncode), drill.every,
               "yes" if resumed.returncode == 0 and drill.same_weights(run, "reference") else "no")


def read_only_rows(drill: Drill) -> list[dict]:
    """Every command against a read-only file system (a tmpfs remounted read-only with a copy of two runs)."""
    folder = drill.root / "read_only"
    drill.train("sharded", "Trainer.strategy = 'fsdp'", "Trainer.num_threads = 1", "Trainer.max_steps = 2")
    np.savez(drill.root / "samples.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    if not mount(folder, "size=64m"):
        return [row("read-only folders", "not run: this machine does not let the drill mount a file system",
                    "-", "-", "-")]
    try:
        for name in ("reference", "sharded", "samples.npz"):
            copy = shutil.copytree if (drill.root / name).is_dir() else shutil.copy
            copy(drill.root / name, folder / name)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        evaluate = [sys.executable, "evaluate.py", "--samples", str(folder / "samples.npz"), "--metric", "fid",
                    "--weights", "inception.pth"]
        commands = {
            "train.py into a new run folder on it": drill.command("read_only/new_run", []),
            "train.py resuming a run on it": drill.command("read_only/reference", []),
            "sample.py writing into the run's samples/": sample_argv(folder / "reference", folder / "reference"
                                                                     / "samples" / "s.png"),
            "consolidate_checkpoint.py on a sharded run on it": [sys.executable, "consolidate_checkpoint.py",
                                                                 str(folder / "sharded")],
            "evaluate.py --write-reference on it": [*evaluate, "--write-reference", str(folder / "stats.npz")],
        }
        rows = []
        for what, argv in commands.items():
            done = drill.run(argv)
            rows.append(row(f"read-only file system: {what}", outcome(done), str(done.returncode), 0, "n/a"))
        return rows
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def worker_pids(launcher: subprocess.Popen) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def launcher_signal_row(drill: Drill, launcher: str, name: str) -> dict:
    """A stop signal to the launcher of a 2-process run: the status a requeue script sees, orphans, the resume."""
    run, reference = f"{launcher.split('.')[-1]}_{name}", "reference_2p"
    if not drill.checkpoints(reference):
        drill.train(reference, processes=2)
    process = drill.start(run, processes=2, launcher=launcher)
    drill.wait_for_step(run, drill.every + 2, process)
    workers = worker_pids(process)
    process.send_signal(getattr(signal, name))
    process.communicate(timeout=300)
    orphans = [pid for pid in workers if alive(pid)]
    for pid in orphans:  # they would race the resume
        os.kill(pid, signal.SIGKILL)
    reached, saved = drill.logged_step(run), drill.newest_step(run)
    resumed = drill.train(run, processes=2, launcher=launcher)
    return row(f"{name} to {launcher} (2 processes) at step {reached}",
               f"checkpoint at step {saved}; worker processes left running: {len(orphans)} of {len(workers)}; resumed",
               str(process.returncode), reached - saved,
               "yes" if resumed.returncode == 0 and drill.same_weights(run, reference) else "no")


def launcher_mistake_row(drill: Drill, launcher: str) -> dict:
    done = drill.train(f"mistake_{launcher.split('.')[-1]}", "Trainer.lr = 'fast'", processes=2, launcher=launcher)
    errors = [line for line in error_lines(done) if line.startswith("error:")]
    return row(f"a configuration mistake under {launcher} (2 processes)",
               f"{len(errors)} `error:` line(s), {done.stderr.count('Traceback')} traceback(s), "
               f"{len(error_lines(done))} stderr lines in all", str(done.returncode), 0, "n/a")


RUN_FOLDER_ROWS = [
    *(lambda drill, path=path: crafted_config_row(drill, path)
      for path in ("an include of a file that registers dynamically", "dynamic registration binding "
                   "subprocess.check_call", "an import of a module that runs code")),
    *(lambda drill, binding=binding: changed_resume_row(drill, binding)
      for binding in ("DigitsDataset.split = 'all'", "Trainer.batch_size = 16")),
    *(lambda drill, case=case: stage2_row(drill, case)
      for case in ("into its own stage-1 run folder", "without Trainer.init_from",
                   "into the folder of another stage-1 run")),
    *(lambda drill, case=case: run_dir_row(drill, case) for case in ("Trainer.run_dir = ''", "a run dir that is a file")),
    two_trainings_row,
    two_samplings_row,
    manifest_missing_row,
    full_disk_row,
    file_size_limit_row,
    read_only_rows,
    *(lambda drill, launcher=launcher, name=name: launcher_signal_row(drill, launcher, name)
      for launcher in ("torchrun", "sprint_mm.launch") for name in ("SIGTERM", "SIGUSR1")),
    *(lambda drill, launcher=launcher: launcher_mistake_row(drill, launcher)
      for launcher in ("torchrun", "sprint_mm.launch")),
]


def last_error(done: subprocess.CompletedProcess) -> str:
    """The run's `error:` line, without the prefix (the first such line: every process of a launch prints it)."""
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    return lines[0].removeprefix("error: ") if lines else "(no error line)"


def busy_row(drill: Drill) -> dict:
    """The run beside a torch job that wants every core, with the default thread setting (no OMP_NUM_THREADS): the
    same weights as the same run alone, at a rate that does not collapse."""
    from benchmarks.threads_under_load import LOADS, clean_env, start_load, stop_load

    env, steps = clean_env(), ("Trainer.max_steps = 200", "Trainer.checkpoint_every = 200", "Trainer.log_every = 50")
    started = time.perf_counter()
    alone = drill.train("busy_alone", *steps, env=env)
    alone_s = time.perf_counter() - started
    load = start_load(LOADS["torch"])
    try:
        time.sleep(2.0)
        started = time.perf_counter()
        beside = drill.train("busy_beside", *steps, env=env)
        beside_s = time.perf_counter() - started
    finally:
        stop_load(load)
    same = alone.returncode == beside.returncode == 0 and drill.same_weights("busy_beside", "busy_alone")
    return row("a torch job using every core runs beside the run (default threads, 200 steps)",
               f"trained to the end in {beside_s:.1f} s, {beside_s / alone_s:.1f}x the {alone_s:.1f} s alone",
               str(beside.returncode), 0, "yes (bit-identical to the run alone)" if same else "no")


def bucket_unreadable_row(drill: Drill) -> dict:
    """Buckets over an image folder in which 2 of 62 files have no readable size: counted as bad data at start."""
    folder = drill.root / "image_folder"
    if not folder.is_dir():
        image_folder(folder)
    done = drill.train("bucket_unreadable", f"ImageFolderDataset.root = '{folder}'", "ImageFolderDataset.resolution = 8",
                       "Trainer.dataset = @ImageFolderDataset()", "sit.in_channels = 3", "IdentityCodec.channels = 3",
                       "BucketTable.buckets = [(1, 8, 8, 8)]", "Trainer.buckets = @BucketTable()")
    action = "stopped before the first step: " + last_error(done).split(": e.g.")[0]
    return row("buckets, 2 images of 62 with no readable size, max_bad_fraction 0.01", action, str(done.returncode), 0,
               "n/a")


def ledger_two_processes_row(drill: Drill) -> dict:
    """Bad data seen by two processes: both judge the global fraction and stop at the same step as one process."""
    folder = drill.root / "image_folder"
    if not folder.is_dir():
        image_folder(folder)
    data = (f"ImageFolderDataset.root = '{folder}'", "ImageFolderDataset.resolution = 8",
            "Trainer.dataset = @ImageFolderDataset()", "sit.in_channels = 3", "IdentityCodec.channels = 3",
            "BadDataLedger.min_items = 8", "BadDataLedger.max_bad_fraction = 0.02")
    one = drill.train("ledger_one", *data)
    two = drill.train("ledger_two", *data, processes=2)
    said = {line.split("too much bad data: ")[1].split(", each")[0] for line in two.stderr.splitlines()
            if "too much bad data: " in line}
    same = said == {last_error(one).removeprefix("too much bad data: ").split(", each")[0]}
    return row("2 corrupt images among 62 read by 2 processes, max_bad_fraction 0.02",
               f"both processes stopped at step {drill.logged_step('ledger_two') + 1} on the global count "
               f"({' / '.join(sorted(said))}){', as one process does' if same else ', unlike one process'}",
               str(two.returncode), 0, "n/a")


def video_size_row(drill: Drill) -> dict:
    """A video folder without a resolution in which one clip has another frame size: a bad item, not a crash."""
    from sprint_mm.data.moving_digits import write_moving_digits

    folder = drill.root / "videos"
    write_moving_digits(folder, 20, frames=4, size=16, seed=0)
    write_moving_digits(drill.root / "other_size", 1, frames=4, size=24, seed=1)
    odd = next((drill.root / "other_size").rglob("*.mp4"))
    odd.rename(folder / odd.parent.name / "other_size.mp4")
    done = drill.train("video_other_size", "build_model.backbone = 'video_dit'", "video_dit.hidden_size = 32",
                       "video_dit.depth = 4", "video_dit.num_heads = 2", "video_dit.input_size = (4, 16, 16)",
                       "video_dit.patch_size = (2, 4, 4)", "video_dit.num_classes = 10", "video_dit.in_channels = 3",
                       f"VideoFolderDataset.root = '{folder}'", "VideoFolderDataset.clip_length = 4",
                       "VideoFolderDataset.reader = 'pyav'", "VideoFolderDataset.fallback_reader = None",
                       "Trainer.dataset = @VideoFolderDataset()", "IdentityCodec.channels = 3",
                       "BadDataLedger.max_bad_fraction = 0.1", "Trainer.batch_size = 4",
                       gin_file="gin/video/moving_digits_stage1.gin")
    last = json.loads((drill.root / "video_other_size" / "metrics.jsonl").read_text().splitlines()[-1]) \
        if done.returncode == 0 else {}
    action = (f"skipped and counted the clip (bad_video = {last.get('bad_video')}), trained on" if done.returncode == 0
              else "stopped: " + last_error(done))
    return row("VideoFolderDataset.resolution = None, 1 clip of 24 px among 21 of 16 px", action,
               str(done.returncode), 0, "n/a")


def caption_index_row(drill: Drill, fault: str) -> dict:
    """A caption index that lists a missing image, or whose captions are all empty: refused before the first step."""
    folder = drill.root / "captions"
    if not folder.is_dir():
        image_folder(folder)
    images = sorted(folder.rglob("[0-9]*.png"))
    rows = [{"path": str(path.relative_to(folder)), "caption": f"the digit {path.parent.name}"} for path in images]
    if fault == "missing":
        rows.insert(7, {"path": "gone/7.png", "caption": "the digit 7"})
    else:
        rows = [{**entry, "caption": ""} for entry in rows]
    index = folder / f"index_{fault}.jsonl"
    index.write_text("".join(json.dumps(entry) + "\n" for entry in rows))
    done = drill.train(f"captions_{fault}", "text_dit.hidden_size = 32", "text_dit.depth = 4", "text_dit.num_heads = 2",
                       "text_dit.input_size = 8", "text_dit.in_channels = 3", "IdentityCodec.channels = 3",
                       f"CaptionDataset.index = '{index}'", "CaptionDataset.resolution = 8",
                       "Trainer.dataset = @CaptionDataset()", f"TextConditioner.cache_dir = '{drill.root / 'text_cache'}'",
                       gin_file="gin/text/digits_minilm_stage1.gin")
    what = "a caption index lists a missing image (line 8)" if fault == "missing" else "every caption is empty"
    return row(what, "refused before the first step: " + last_error(done)[:110] + "...", str(done.returncode), 0,
               "n/a")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--root", default="runs/fault_drill")
    add_out_option(parser, RESULTS / "fault_drill.json")
    args = parser.parse_args(argv)
    if not 2 * args.every < args.steps:
        parser.error(f"--steps must exceed two checkpoints (2 x --every = {2 * args.every}), got {args.steps}")
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    drill = Drill(root, args.steps, args.every)
    reference = drill.train("reference")
    if reference.returncode:
        raise SystemExit(f"the reference run failed: {reference.stderr[-2000:]}")
    rows = [
        nan_row(drill),
        diverging_row(drill),
        signal_row(drill, "SIGTERM"),
        signal_row(drill, "SIGINT"),
        signal_row(drill, "SIGUSR1"),
        signal_row(drill, "SIGTERM", twice=True),
        kill_row(drill),
        staging_row(drill),
        damaged_row(drill, "model.safetensors", "truncated"),
        damaged_row(drill, "ema.safetensors", "truncated"),
        damaged_row(drill, "training_state.pt", "truncated"),
        damaged_row(drill, "rng_rank0.pt", "missing"),
        disk_full_row(drill),
        bad_image_row(drill, 0.05),
        bad_image_row(drill, 0.01),
        kill_row(drill, processes=2),
        busy_row(drill),
        bucket_unreadable_row(drill),
        ledger_two_processes_row(drill),
        video_size_row(drill),
        caption_index_row(drill, "missing"),
        caption_index_row(drill, "empty"),
    ]
    for make in RUN_FOLDER_ROWS:
        made = make(drill)
        rows += made if isinstance(made, list) else [made]
    header = list(rows[0])
    print(markdown_table(header, [[r[h] for h in header] for r in rows]))
    write_result({"steps": args.steps, "checkpoint_every": args.every, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
