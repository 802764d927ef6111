"""Sharded training (Trainer.strategy = 'fsdp') on two and one real CPU processes: the step, resume on the same and
on another process count, sharded checkpoints, consolidation and sampling. The runs are in tests/fsdp_worker.py."""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import filesystem

import consolidate_checkpoint
from sprint_mm.checkpoints import load_strict
from sprint_mm.cli import sample_main
from sprint_mm.configs import parse_gin
from sprint_mm.models import build_model
from sprint_mm.preemption import EXIT_PREEMPTED
from sprint_mm.runs import checkpoint_problems, list_checkpoints, newest_intact_checkpoint
from sprint_mm.sharded import read_sharded_weights
from sprint_mm.training import Trainer
from tests import fsdp_worker
from tests.test_distributed import torchrun
from tests.test_training import STAGE2, train, weights

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed support")


@contextmanager
def own_process_group() -> Iterator[None]:
    """Sharded runs in this process: the trainer starts a one-process group, which must not outlive them."""
    try:
        yield
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    with own_process_group():  # `grown`: two steps on one process; the copy `grown_two` resumes on two, `grown` here
        fsdp_worker.train(root / "grown", 2, fsdp_worker.KeyedFlow())
        shutil.copytree(root / "grown", root / "grown_two")
        fsdp_worker.train(root / "grown", 3, fsdp_worker.KeyedFlow())
        assert train(root / "stage2_fsdp", 1, f"Trainer.init_from = '{root / 'grown'}'", "Trainer.lr = 0.0",
                     *fsdp_worker.FSDP, gin_file=STAGE2) == 0
    for processes, mode in (("2", "two"), ("1", "one")):
        done = torchrun("tests/fsdp_worker.py", mode, str(root), processes=processes)
        assert done.returncode == 0, done.stderr[-3000:]
        (root / f"{mode}.log").write_text(done.stdout + done.stderr)
    return root


def final(run: Path, name: str = "model") -> dict[str, torch.Tensor]:
    return read_sharded_weights(list_checkpoints(run)[-1], name)


def grad_norms(run: Path) -> list[float]:
    return [json.loads(line)["grad_norm"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_two_process_step_matches_one_process_step(runs):
    # The same global batch, time and noise (KeyedFlow): the gradient is averaged over the processes, not summed.
    (two,), (one,) = grad_norms(runs / "step_two"), grad_norms(runs / "step_one")
    assert two == pytest.approx(one, rel=1e-5)
    assert_close(final(runs / "step_two"), final(runs / "step_one"))
    assert_close(final(runs / "step_two", "ema"), final(runs / "step_one", "ema"))


def test_sharded_resume_is_bit_identical(runs):
    folder = list_checkpoints(runs / "resumed")[-1]
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in folder.iterdir()}
    assert not (folder / "model.safetensors").exists()
    for name in ("model", "ema"):
        a, b = final(runs / "straight", name), final(runs / "resumed", name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_on_one_process_continues_the_two_process_run(runs):
    # keyed_one: the two-process run's checkpoint of step 4, resumed on one process to step 6; DCP reshards model,
    # EMA and optimizer, the data position covers the same global samples. Reduction order differs: close, not equal.
    manifest = json.loads((list_checkpoints(runs / "keyed_one")[-1] / "manifest.json").read_text())
    assert manifest["step"] == 6 and manifest["world_size"] == 1
    assert grad_norms(runs / "keyed_one") == pytest.approx(grad_norms(runs / "keyed"), rel=1e-5)
    for name in ("model", "ema"):
        assert_close(final(runs / "keyed", name), final(runs / "keyed_one", name))


def test_resume_on_two_processes_continues_the_one_process_run(runs):
    assert ("process 1: step_0000002 has no rng_rank1.pt (written by fewer processes); its random stream starts from "
            "the seed of (seed 0, step 2, rank 1)") in (runs / "two.log").read_text()
    folder = list_checkpoints(runs / "grown_two")[-1]
    assert json.loads((folder / "manifest.json").read_text())["world_size"] == 2
    assert grad_norms(runs / "grown_two") == pytest.approx(grad_norms(runs / "grown"), rel=1e-5)
    for name in ("model", "ema"):
        assert_close(final(runs / "grown", name), final(runs / "grown_two", name))


def test_consolidated_weights_load_strictly_and_sample(runs, tmp_path):
    run = runs / "straight"
    assert consolidate_checkpoint.main([str(run)]) == 0
    folder = list_checkpoints(run)[-1]
    assert checkpoint_problems(folder) == []  # the new files are in the manifest
    parse_gin([str(run / "config.gin")], [])
    for name in ("model", "ema"):
        state = load_file(str(folder / f"{name}.safetensors"))
        assert all(torch.equal(state[k], v) for k, v in final(run, name).items())
        load_strict(build_model(), state, name)
    common = ["--num", "2", "--steps", "2", "--guidance", "pdg"]
    assert sample_main(["--run", str(run), *common, "--out", str(tmp_path / "consolidated.png")]) == 0
    # a sharded checkpoint without consolidated files is consolidated in memory
    assert sample_main(["--run", str(runs / "resumed"), *common, "--out", str(tmp_path / "sharded.png")]) == 0
    assert (tmp_path / "consolidated.png").is_file() and (tmp_path / "sharded.png").is_file()


def test_stage2_starts_from_a_sharded_run(runs, tmp_path):
    # The stage-1 EMA is consolidated in memory; lr 0 keeps the stage-2 weights where they started. Both a DDP stage 2
    # and a sharded one (run in the fixture, on one process) start from it.
    stage1 = runs / "resumed"
    assert train(tmp_path / "s2", 1, f"Trainer.init_from = '{stage1}'", "Trainer.lr = 0.0", gin_file=STAGE2) == 0
    model = weights(tmp_path / "s2")
    assert all(torch.equal(model[k], v) for k, v in final(stage1, "ema").items())
    start = final(runs / "grown", "ema")
    for name in ("model", "ema"):
        sharded = final(runs / "stage2_fsdp", name)
        assert all(torch.equal(sharded[k], v) for k, v in start.items()), name


def test_damaged_sharded_checkpoint_is_passed_over(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "resumed", run)
    (list_checkpoints(run)[-1] / "__1_0.distcp").unlink()
    folder, passed_over = newest_intact_checkpoint(run)
    assert folder == list_checkpoints(run)[-2]
    assert "__1_0.distcp is missing" in passed_over[0]


def test_a_failing_sharded_write_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    real = filesystem._write_item

    def disk_full(transforms, stream, *args, **kwargs):
        if "step_0000006" in str(getattr(stream, "name", "")):
            raise OSError(28, "No space left on device")
        return real(transforms, stream, *args, **kwargs)

    monkeypatch.setattr(filesystem, "_write_item", disk_full)
    with own_process_group():
        assert train(tmp_path / "run", 7, *fsdp_worker.FSDP) == 1
    err = capsys.readouterr().err
    assert "could not write the checkpoint of step 6" in err and "No space left" in err and "step_0000003" in err
    checkpoints = list_checkpoints(tmp_path / "run")
    assert [p.name for p in checkpoints] == ["step_0000003"] and checkpoint_problems(checkpoints[0]) == []
    assert not list((tmp_path / "run" / "checkpoints").glob(".*"))  # no staging folder left behind


def test_consolidation_mistakes_are_one_line(tmp_path, capsys):
    assert consolidate_checkpoint.main([str(tmp_path / "none")]) == 2
    assert train(tmp_path / "ddp", 1) == 0
    assert consolidate_checkpoint.main([str(tmp_path / "ddp")]) == 2
    assert "is not sharded" in capsys.readouterr().err


def test_strategy_is_validated():
    with pytest.raises(ValueError, match="unknown Trainer.strategy 'zero'; allowed: ddp, fsdp"):
        Trainer(dataset=[0], strategy="zero")
    with pytest.raises(ValueError, match="does not support Trainer.precision = 'fp16'"):
        Trainer(dataset=[0], strategy="fsdp", precision="fp16")


def test_a_sharded_model_gives_the_gradients_of_the_unsharded_one_without_the_view_warning():
    # The root module's output is a view (unpatchify, and the image squeeze): FSDP2 warned "returned a view tensor ...
    # wrong gradients" on every forward until `parallelize.own_output` gave it a tensor of its own.
    import copy
    import warnings

    from sprint_mm.parallelize import ensure_process_group, precision_policy, shard
    from tests.test_training import STAGE1, TINY

    parse_gin([STAGE1], TINY + ["sit.in_channels = 1"])
    torch.manual_seed(0)
    plain = build_model()
    sharded = copy.deepcopy(plain)
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 3, 5, 9])
    plain(x, t, y).square().mean().backward()
    with own_process_group(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ensure_process_group(torch.device("cpu"))
        shard(sharded, torch.device("cpu"), precision_policy("no"), cpu_offload=False)
        sharded(x, t, y).square().mean().backward()
        gradients = {name: None if p.grad is None else p.grad.full_tensor() for name, p in sharded.named_parameters()}
    assert not [w for w in caught if "view tensor" in str(w.message)]
    assert sum(p.grad is not None for p in plain.parameters()) > 10
    for name, p in plain.named_parameters():
        if p.grad is None:
            assert gradients[name] is None or not gradients[name].any(), name
        else:
            torch.testing.assert_close(gradients[name], p.grad, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("processes, status, ends", [
    (2, 0, True), (2, EXIT_PREEMPTED, True), (2, 1, False), (2, 2, False),  # a failure among several: left alone
    (1, 1, True), (1, 2, True),  # a group of one: no other process can wait in a collective
])
def test_a_command_ends_its_process_group_when_no_other_process_can_still_need_it(processes, status, ends,
                                                                                   monkeypatch):
    # Left to the interpreter's exit, gloo's threads aborted a stopped launch worker (status 134 instead of 75).
    from sprint_mm.parallelize import end_processes, ensure_process_group

    with own_process_group():
        ensure_process_group(torch.device("cpu"))
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: processes)
        assert end_processes(status) == status
        assert torch.distributed.is_initialized() is not ends
