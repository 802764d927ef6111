"""`Trainer.trackers`: the scalars of metrics.jsonl also go to TensorBoard and wandb; a wandb run continues across
resumes; unknown trackers and a missing wandb package are one line each."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from sprint_mm.trackers import WANDB_ID_FILE, check_trackers
from tests.test_training import train


class RecordingWandb(types.ModuleType):
    """A stand-in for the wandb package that records what a run sends it."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits: list[dict] = []
        self.logged: list[tuple[int, dict]] = []
        self.finished = 0

    def init(self, **settings):
        self.inits.append(settings)
        module = self

        class Run:
            def log(self, values: dict, step: int) -> None:
                module.logged.append((step, values))

            def finish(self) -> None:
                module.finished += 1

        return Run()


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_wandb_gets_every_logged_line_and_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    wandb = RecordingWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    run = tmp_path / "run"
    trackers = "Trainer.trackers = ['tensorboard', 'wandb']"
    assert train(run, 3, "Trainer.log_every = 1", trackers) == 0
    assert train(run, 5, "Trainer.log_every = 1", trackers) == 0  # resumes from its step-3 checkpoint
    lines = metrics(run)
    assert [step for step, _ in wandb.logged] == [line["step"] for line in lines] == [1, 2, 3, 4, 5]
    for (step, values), line in zip(wandb.logged, lines):
        assert values == {f"train/{key}": value for key, value in line.items() if key != "step"}
    run_id = (run / WANDB_ID_FILE).read_text().strip()
    assert [settings["id"] for settings in wandb.inits] == [run_id, run_id] and wandb.finished == 2
    first = wandb.inits[0]
    assert first["resume"] == "allow" and first["name"] == "run" and first["dir"] == str(run)
    assert first["config"]["backbone"] == "DiT" and first["config"]["max_steps"] == 3
    assert "Trainer.max_steps = 3" in first["config"]["gin"]
    assert list((run / "logs").glob("events.out.tfevents.*"))  # TensorBoard still writes


def test_without_tensorboard_no_event_files_are_written(tmp_path):
    run = tmp_path / "run"
    assert train(run, 2, "Trainer.trackers = []") == 0
    assert metrics(run) and not list(run.glob("logs/events.out.tfevents.*"))


@pytest.mark.parametrize("value, message", [
    (["tensorboard", "mlflow"], "Trainer.trackers has 'mlflow'; allowed: tensorboard, wandb"),
    ("wandb", "Trainer.trackers must be a list of tracker names from tensorboard, wandb; got 'wandb'"),
])
def test_an_unknown_tracker_is_one_line(value, message):
    with pytest.raises(ValueError) as err:
        check_trackers(value)
    assert str(err.value) == message


def test_wandb_asked_for_and_not_installed_is_one_line_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    assert train(tmp_path / "run", 2, "Trainer.trackers = ['wandb']") == 2
    assert capsys.readouterr().err.strip() == (
        "error: Trainer.trackers has 'wandb', but the wandb package is not installed: pip install wandb "
        "(WANDB_MODE=offline logs without a network)")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_real_wandb_run_logs_offline_into_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # not a dependency: checked where it is installed
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    assert train(run, 2, "Trainer.log_every = 1", "Trainer.trackers = ['wandb']") == 0
    run_id = (run / WANDB_ID_FILE).read_text().strip()
    assert list(run.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
