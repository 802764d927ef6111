"""Run folders as a user meets them: a config.gin from someone else read as data, resume and stage-2 mistakes
refused with the bindings that differ, one command per folder (locks), a damaged newest checkpoint without its
manifest passed over, a full disk and read-only folders in every command answered with one line."""
from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

import consolidate_checkpoint
from sprint_mm.cli import sample_main, train_main
from sprint_mm.conditioning import build_conditioning
from sprint_mm.configs import parse_gin
from sprint_mm.run_config import UnsafeRunConfig, config_changes
from sprint_mm.runs import MANIFEST, checkpoint_problems, list_checkpoints
from sprint_mm.trained import load_run
from tests import fsdp_worker
from tests.helpers import script_module
from tests.test_faults import assert_same_weights
from tests.test_fsdp import own_process_group
from tests.test_training import STAGE1, STAGE2, TINY, train

REPO = Path(__file__).resolve().parents[1]
EVALUATE = script_module("evaluate.py", "evaluate_for_run_folders").main


def one_line(capsys) -> str:
    """The single stderr line a refused command printed (asserting there is exactly one, and no traceback)."""
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out + err, err
    return lines[0]


def train_argv(run: Path, steps: int, *bindings: str, gin_file: str = STAGE1) -> list[str]:
    argv = [sys.executable, "train.py", "--gin-file", gin_file, "--run-dir", str(run)]
    for binding in (*TINY, f"Trainer.max_steps = {steps}", *bindings):
        argv += ["--gin-param", binding]
    return argv


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny run of 3 steps (one checkpoint), made once."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert train(run, 3) == 0
    return run


# ------------------------------------------------------------------------------ config.gin is data
def crafted_run(trained: Path, folder: Path, statements: str, at_end: bool = True) -> Path:
    """A copy of the trained run with `statements` added to its config.gin (at the end: its bindings win)."""
    run = folder / "crafted"
    shutil.copytree(trained, run)
    config = run / "config.gin"
    text = config.read_text()
    config.write_text(text + statements if at_end else statements + text)
    return run


def payloads(folder: Path, marker: Path) -> dict[str, str]:
    """config.gin statements that create `marker` when gin applies them and the run is loaded: an include of a file
    that registers dynamically and binds `subprocess.check_call` into the conditioning, the same inline, and the
    import of a module (on the path) whose import creates it."""
    dynamic = ("from __gin__ import dynamic_registration\nimport subprocess\nimport sprint_mm.conditioning\n"
               f"subprocess.check_call.args = ['touch', '{marker}']\n"
               "sprint_mm.conditioning.build_conditioning.kind = @subprocess.check_call()\n")
    (folder / "evil.gin").write_text(dynamic)
    (folder / "evil_module_for_sprint_mm.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    return {"include": f"include '{folder / 'evil.gin'}'\n", "dynamic registration": dynamic,
            "untrusted import": "import evil_module_for_sprint_mm\n"}


@pytest.mark.parametrize("path", ["include", "dynamic registration", "untrusted import"])
def test_a_crafted_config_gin_is_refused_with_one_line_and_never_runs(trained, tmp_path, capsys, monkeypatch, path):
    marker = tmp_path / "marker"
    monkeypatch.syspath_prepend(str(tmp_path))
    run = crafted_run(trained, tmp_path, payloads(tmp_path, marker)[path])
    config = run / "config.gin"
    first_line = len((trained / "config.gin").read_text().splitlines()) + 1
    assert sample_main(["--run", str(run), "--num", "1", "--steps", "1", "--out", str(tmp_path / "s.png")]) == 2
    line = one_line(capsys)
    statement = {"include": "include", "dynamic registration": "from __gin__ import dynamic_registration",
                 "untrusted import": "import evil_module_for_sprint_mm"}[path]
    assert f"{config} line {first_line}: `{statement}" in line, line
    with pytest.raises(UnsafeRunConfig):
        load_run(run)
    assert not marker.exists()
    # The control: gin itself, applying the same file, runs the payload (at its import, or once the run's
    # conditioning is built).
    monkeypatch.delitem(sys.modules, "evil_module_for_sprint_mm", raising=False)
    parse_gin([str(config)], [])
    with contextlib.suppress(ValueError):
        build_conditioning()
    assert marker.exists()


def test_a_module_the_user_names_with_import_is_trusted(trained, tmp_path, capsys, monkeypatch):
    (tmp_path / "harmless_module_for_sprint_mm.py").write_text("IMPORTED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run = crafted_run(trained, tmp_path, "import harmless_module_for_sprint_mm\n", at_end=False)
    argv = ["--run", str(run), "--num", "1", "--steps", "1", "--out", str(tmp_path / "s.png")]
    assert sample_main(argv) == 2
    assert "pass --import harmless_module_for_sprint_mm" in one_line(capsys)
    assert sample_main([*argv, "--import", "harmless_module_for_sprint_mm"]) == 0
    assert sys.modules["harmless_module_for_sprint_mm"].IMPORTED


# ------------------------------------------------------------------------------ resume and stage-2 mistakes
@pytest.mark.parametrize("binding, change", [
    ("DigitsDataset.split = 'all'", "DigitsDataset.split: 'train' -> 'all'"),
    ("Trainer.batch_size = 16", "Trainer.batch_size: 8 -> 16"),
])
def test_a_resume_with_another_configuration_is_refused_listing_the_changes(tmp_path, capsys, binding, change):
    run = tmp_path / "run"
    assert train(run, 3) == 0
    config, checkpoints = (run / "config.gin").read_text(), list_checkpoints(run)
    capsys.readouterr()
    assert train(run, 6, binding) == 2
    line = one_line(capsys)
    assert change in line and "--allow-config-change" in line and "max_steps" not in line, line
    assert (run / "config.gin").read_text() == config and list_checkpoints(run) == checkpoints
    # Meant: with the flag it resumes, and the configuration that trained steps 1-3 is kept.
    argv = ["--gin-file", STAGE1, "--run-dir", str(run), "--allow-config-change"]
    for extra in (*TINY, "Trainer.max_steps = 6", binding):
        argv += ["--gin-param", extra]
    assert train_main(argv) == 0
    assert (run / "config_history" / "until_step_0000003.gin").read_text() == config
    assert binding in (run / "config.gin").read_text()
    assert "resumed from" in capsys.readouterr().out


def test_the_step_budget_logging_and_cadence_change_without_the_flag(tmp_path):
    run = tmp_path / "run"
    assert train(run, 3) == 0
    assert train(run, 5, "Trainer.log_every = 1", "Trainer.checkpoint_every = 5", "Trainer.keep_checkpoints = 4") == 0
    assert [p.name for p in list_checkpoints(run)] == ["step_0000003", "step_0000005"]


def test_config_changes_compare_bindings_not_text():
    before = "# Parameters for Trainer:\nTrainer.lr = 0.001\nTrainer.max_steps = 3\nsit.depth = 4\n"
    after = "sit.depth = 4\nTrainer.max_steps = 9\nTrainer.lr = 1e-3\nTokenMasker.ratio = 0.0\n"
    assert config_changes(before, after, "x") == ["TokenMasker.ratio: (not bound) -> 0.0", "Trainer.max_steps: 3 -> 9"]


def test_stage2_into_its_stage1_folder_or_without_init_from_is_refused(trained, tmp_path, capsys):
    config = (trained / "config.gin").read_text()
    assert train(trained, 1, f"Trainer.init_from = '{trained}'", gin_file=STAGE2) == 2
    assert "lies in this run's own folder" in one_line(capsys)
    assert train(tmp_path / "stage2", 1, gin_file=STAGE2) == 2
    assert "is a stage 2 (Trainer.stage = 2" in one_line(capsys)
    assert not (tmp_path / "stage2").exists()
    # Stage 2 into the folder of another stage-1 run: the configurations differ, so it is refused.
    other = tmp_path / "other_stage1"
    assert train(other, 3) == 0
    capsys.readouterr()
    assert train(other, 4, f"Trainer.init_from = '{trained}'", gin_file=STAGE2) == 2
    line = one_line(capsys)
    assert "TokenMasker.ratio: 0.75 -> 0.0" in line and "Trainer.stage: (not bound) -> 2" in line, line
    assert (trained / "config.gin").read_text() == config


@pytest.mark.parametrize("run_dir, expected", [
    ("", "Trainer.run_dir is empty"), ("{file}", "is a file, not a folder"),
])
def test_an_empty_or_file_run_dir_is_refused(tmp_path, capsys, run_dir, expected):
    (tmp_path / "file").write_text("not a folder")
    assert train_main(["--gin-file", STAGE1, "--run-dir", run_dir.format(file=tmp_path / "file"),
                       "--gin-param", "Trainer.max_steps = 1"]) == 2
    assert expected in one_line(capsys)
    assert sample_main(["--run", str(tmp_path / "file")]) == 2
    assert "is a file, not a run folder" in one_line(capsys)


# ------------------------------------------------------------------------------ one command per folder
def wait_until(condition, process: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{what} did not happen: {process.communicate()[1][-2000:]}")
        time.sleep(0.05)


def test_two_trainings_into_one_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(train_argv(run, 100000, "Trainer.log_every = 1"), cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: list_checkpoints(run), first, "the first run's checkpoint")
        assert train(run, 100000) == 2
        line = one_line(capsys)
        assert f"pid {first.pid} on " in line and "train.py --gin-file" in line and "is in use" in line, line
    finally:
        first.kill()
        first.communicate()
    assert (run / ".lock").is_file()  # what the killed process left does not block
    step = int(list_checkpoints(run)[-1].name.split("_")[1])
    assert train(run, step + 1) == 0
    assert not (run / ".lock").exists()  # released and removed at the end


def test_two_samplings_into_one_output(trained, tmp_path, capsys):
    out = tmp_path / "samples.npz"
    argv = [sys.executable, "sample.py", "--run", str(trained), "--num", "1", "--out", str(out)]
    first = subprocess.Popen([*argv, "--steps", "1000000"], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: (tmp_path / ".samples.npz.shards").is_dir(), first, "the first sampling")
        assert sample_main(argv[2:] + ["--steps", "1"]) == 2
        line = one_line(capsys)
        assert f"sample output '{out}' is in use" in line and f"pid {first.pid}" in line, line
    finally:
        first.kill()
        first.communicate()
    assert sample_main(argv[2:] + ["--steps", "1"]) == 0
    assert np.load(out)["arr_0"].shape == (1, 8, 8, 3)


# ------------------------------------------------------------------------------ a damaged newest checkpoint
def test_a_newest_checkpoint_without_its_manifest_is_passed_over(tmp_path, capsys):
    assert train(tmp_path / "straight", 7) == 0
    run = tmp_path / "damaged"
    assert train(run, 6) == 0  # checkpoints at 3 and 6
    older, newest = list_checkpoints(run)
    (newest / MANIFEST).unlink()
    (newest / "model.safetensors").write_bytes(b"truncated")
    assert checkpoint_problems(newest) == [f"{MANIFEST} is missing, though the run's other checkpoints "
                                           "(step_0000003) have one"]
    capsys.readouterr()
    out = tmp_path / "s.npz"
    assert sample_main(["--run", str(run), "--num", "2", "--steps", "1", "--out", str(out)]) == 0
    assert "using step_0000003, the newest intact checkpoint" in capsys.readouterr().out
    assert sample_main(["--run", str(run), "--step", "6", "--num", "2", "--steps", "1", "--out", str(out)]) == 2
    assert "is damaged (manifest.json is missing" in one_line(capsys)
    assert train(run, 7) == 0
    captured = capsys.readouterr()
    assert "checkpoint step_0000006 is damaged (manifest.json is missing" in captured.out + captured.err
    assert_same_weights(tmp_path / "straight", run)


def test_a_checkpoint_from_before_manifests_is_still_accepted(tmp_path):
    run = tmp_path / "run"
    assert train(run, 3) == 0
    (folder,) = list_checkpoints(run)
    (folder / MANIFEST).unlink()
    assert checkpoint_problems(folder) == []  # every file of that time, no sibling with a manifest
    (folder / "rng_rank0.pt").unlink()
    assert checkpoint_problems(folder) == [f"{MANIFEST} is missing and so is rng_rank0.pt"]


# ------------------------------------------------------------------------------ a full disk
@contextlib.contextmanager
def small_filesystem(folder: Path, size: int) -> Iterator[Path]:
    """A real tmpfs of `size` bytes mounted at `folder` (skips where this process may not mount one)."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True) if shutil.which("mount") and os.geteuid() == 0 else None
    if mounted is None or mounted.returncode:
        pytest.skip("this machine does not let the tests mount a small file system")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def assert_write_refused(run: Path, line: str, cause: str) -> None:
    assert line.startswith("error: could not write the checkpoint of step 6 in ") and cause in line, line
    assert "needs at least" in line and "previous checkpoints are intact: ['step_0000003']" in line, line
    (intact,) = list_checkpoints(run)
    assert checkpoint_problems(intact) == [] and not list((run / "checkpoints").glob(".*"))


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_survives(tmp_path, capsys):
    """A tmpfs that holds the run and its first checkpoint but not a second: the write is refused with one line,
    twice (nothing is left holding space), and once space is freed the run resumes where it stood."""
    run = tmp_path / "run"
    assert train(run, 3) == 0
    checkpoint = folder_bytes(list_checkpoints(run)[-1])
    with small_filesystem(tmp_path / "disk", folder_bytes(run) + checkpoint + 256 * 1024) as disk:
        shutil.copytree(run, disk / "run")
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (checkpoint // 2 + 256 * 1024))
        for _ in range(2):
            capsys.readouterr()
            assert train(disk / "run", 6) == 1
            assert_write_refused(disk / "run", one_line(capsys), "the disk is full")
        filler.unlink()
        assert train(disk / "run", 6) == 0
        assert [p.name for p in list_checkpoints(disk / "run")] == ["step_0000003", "step_0000006"]


def limit_file_size(limit: int):
    def apply() -> None:  # in the child: writes beyond the limit fail with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_file_size_limit_mid_write_is_one_line_and_the_previous_checkpoint_survives(tmp_path):
    run = tmp_path / "run"
    assert train(run, 3) == 0
    limit = (list_checkpoints(run)[-1] / "model.safetensors").stat().st_size // 2
    done = subprocess.run(train_argv(run, 6), cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600, preexec_fn=limit_file_size(limit))
    lines = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert done.returncode == 1 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert_write_refused(run, lines[0], "largest file this process may write (ulimit -f)")


# ------------------------------------------------------------------------------ read-only folders
@contextlib.contextmanager
def read_only(folder: Path, content: Path) -> Iterator[Path]:
    """`folder` holding a copy of `content`, read-only: a read-only tmpfs where this process may mount one, else
    the permissions (which bind only a user other than root)."""
    folder.mkdir()
    if os.geteuid() != 0:
        shutil.copytree(content, folder / content.name)
        subprocess.run(["chmod", "-R", "a-w", str(folder)], check=True)
        try:
            yield folder
        finally:
            subprocess.run(["chmod", "-R", "u+w", str(folder)], check=True)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("root ignores permissions, and this machine does not let the tests mount a file system")
    try:
        shutil.copytree(content, folder / content.name)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def sharded_run(folder: Path) -> Path:
    with own_process_group():
        fsdp_worker.train(folder / "sharded", 1)
    return folder / "sharded"


def test_read_only_folders_are_one_line_in_every_command(trained, tmp_path, capsys):
    source = tmp_path / "source"
    shutil.copytree(trained, source / "run")
    sharded_run(source)
    np.savez(source / "samples.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with read_only(tmp_path / "ro", source) as ro:
        run, checks = ro / "source" / "run", []
        commands = [
            (train_main, ["--gin-file", STAGE1, "--run-dir", str(ro / "new_run")], str(ro)),
            (train_main, ["--gin-file", STAGE1, "--run-dir", str(run), *sum((["--gin-param", b] for b in TINY), [])],
             str(run)),
            (sample_main, ["--run", str(run), "--num", "1", "--steps", "1"], str(run / "samples")),
            (sample_main, ["--run", str(run), "--num", "1", "--steps", "1", "--out", str(ro / "s.png")], str(ro)),
            (consolidate_checkpoint.main, [str(ro / "source" / "sharded")], "step_0000001"),
            (EVALUATE, ["--samples", str(ro / "source" / "samples.npz"), "--metric", "fid", "--weights", "absent.pth",
                        "--write-reference", str(ro / "stats.npz")], str(ro)),
            (EVALUATE, ["--samples", str(ro / "source" / "samples.npz"), "--metric", "fid", "--weights", "absent.pth",
                        "--reference", str(ro / "source" / "samples.npz"), "--out", str(ro / "fid.json")], str(ro)),
        ]
        for command, argv, named in commands:
            capsys.readouterr()
            code = command(argv)
            checks.append((code, one_line(capsys), named))
    for code, line, named in checks:
        assert code == 2 and line.startswith("error: ") and named in line, line
        assert "Read-only file system" in line or "Permission denied" in line, line
