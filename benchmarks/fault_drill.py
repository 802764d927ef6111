"""The fault drill: every fault a long run meets, against short CPU runs of the tiny digits model.

    python benchmarks/fault_drill.py [--steps 30] [--every 10] [--root runs/fault_drill]

Each row starts runs of `--steps` steps with a checkpoint every `--every` steps (as separate `train.py` processes,
so signals and kills are real), injects one fault, resumes where the program allows it, and compares the final
weights with an uninterrupted run of the same configuration. Prints one markdown table (fault, what the program did,
exit status, work lost in steps, weights identical after resume) and writes benchmarks/results/fault_drill.json.
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
from pathlib import Path
from typing import Callable, Optional, Sequence

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


class Drill:
    """Runs train.py on the tiny model under one root folder."""

    def __init__(self, root: Path, steps: int, every: int) -> None:
        self.root, self.steps, self.every = root, steps, every
        self.env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1")

    def command(self, run: str, extra: Sequence[str], processes: int = 1, gin_file: str = STAGE1) -> list[str]:
        launcher = [sys.executable]
        if processes > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        argv = [*launcher, "train.py", "--gin-file", gin_file, "--run-dir", str(self.root / run)]
        for binding in (*TINY, f"Trainer.max_steps = {self.steps}", f"Trainer.checkpoint_every = {self.every}", *extra):
            argv += ["--gin-param", binding]
        return argv

    def train(self, run: str, *extra: str, processes: int = 1, env: Optional[dict] = None,
              gin_file: str = STAGE1) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(run, extra, processes, gin_file), cwd=REPO_ROOT, env=env or self.env,
                              capture_output=True, text=True, timeout=600)

    def start(self, run: str, *extra: str, processes: int = 1) -> subprocess.Popen:
        return subprocess.Popen(self.command(run, extra, processes), cwd=REPO_ROOT, env=self.env,
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
    header = list(rows[0])
    print(markdown_table(header, [[r[h] for h in header] for r in rows]))
    write_result({"steps": args.steps, "checkpoint_every": args.every, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
