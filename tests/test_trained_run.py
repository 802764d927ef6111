"""Loading a trained run (`sprint_mm.trained.load_run`) and sampling it with what training fixed: the cosine path's
score in the SDE sampler, through sample.py and in previews; verified, strict and sharded checkpoints."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.harness import load_class_run
from sprint_mm import generation
from sprint_mm.checkpoints import CheckpointMismatch
from sprint_mm.cli import sample_main
from sprint_mm.flow import TimeShift
from sprint_mm.generation import Previewer
from sprint_mm.media import pack_uint8
from sprint_mm.runs import DamagedCheckpoint, list_checkpoints
from sprint_mm.sampling import Guidance, SamplingDefaults, sample
from sprint_mm.sharded import read_sharded_weights
from sprint_mm.trained import load_run
from tests.fsdp_worker import FSDP
from tests.test_fsdp import own_process_group
from tests.test_training import train

COSINE = "FlowMatching.path = 'cosine'"
LABELS = [0, 3, 5, 9]
STEPS = 6  # the SDE's first step sits at t = 1, where both paths' scores agree; later ones differ


@pytest.fixture(scope="module")
def cosine_run(tmp_path_factory) -> Path:
    """A tiny digits run trained for 3 steps on the cosine path."""
    run = tmp_path_factory.mktemp("cosine") / "run"
    assert train(run, 3, COSINE) == 0
    return run


def direct_sde_samples(run: Path, path: str, seed: int) -> torch.Tensor:
    """What sample.py must write for LABELS with --solver sde --seed SEED (one shard), integrated here directly with
    the score of `path`: the same noise and sampler generator, then decoded and packed to uint8."""
    loaded = load_run(run)
    shard_seed = seed * 1_000_003  # shard 0
    noise = torch.randn((len(LABELS), *loaded.model.backbone.sample_shape),
                        generator=torch.Generator().manual_seed(shard_seed))
    latents = sample(loaded.model, noise, torch.tensor(LABELS), steps=STEPS, solver="sde",
                     guidance=Guidance("pdg", 1.5), path=path, generator=torch.Generator().manual_seed(shard_seed))
    return pack_uint8(loaded.codec.decode(latents).clamp(-1, 1))


def test_sde_sampling_of_a_cosine_run_uses_the_cosine_score(cosine_run, tmp_path):
    out = tmp_path / "samples.npz"
    assert sample_main(["--run", str(cosine_run), "--labels", *map(str, LABELS), "--solver", "sde", "--steps",
                        str(STEPS), "--guidance", "pdg", "--seed", "2", "--out", str(out)]) == 0
    written = torch.from_numpy(np.load(out)["arr_0"])
    cosine, linear = direct_sde_samples(cosine_run, "cosine", 2), direct_sde_samples(cosine_run, "linear", 2)
    assert torch.equal(written, cosine)
    assert (cosine.int() - linear.int()).abs().float().mean() > 1.0  # the linear score draws other pictures


def test_load_run_gives_the_trained_path_and_time_shift(cosine_run, tmp_path):
    assert load_run(cosine_run).sampling == SamplingDefaults("cosine", None)
    shifted = tmp_path / "shifted"
    assert train(shifted, 1, "FlowMatching.time_shift = @TimeShift()", "TimeShift.base_tokens = 4") == 0
    assert load_run(shifted).sampling == SamplingDefaults("linear", TimeShift(base_tokens=4))


def test_previews_sample_with_the_trained_path_and_time_shift(cosine_run, monkeypatch, tmp_path):
    loaded = load_run(cosine_run, gin_params=["FlowMatching.time_shift = @TimeShift()"])
    previewer = Previewer(tmp_path, loaded.conditioning, loaded.codec, dataset=None, count=2, steps=2, solver="sde")
    assert previewer.sampling == SamplingDefaults("cosine", TimeShift())
    asked = []
    real = generation.generate
    monkeypatch.setattr(generation, "generate", lambda *args, **kwargs: asked.append(kwargs) or real(*args, **kwargs))
    assert len(previewer.save(loaded.model, step=1)) == 2  # CFG and PDG grids
    assert [(kw["path"], kw["time_shift"]) for kw in asked] == [("cosine", TimeShift())] * 2


def test_load_run_verifies_the_checkpoint_and_loads_strictly(tmp_path):
    run = tmp_path / "run"
    assert train(run, 3) == 0  # checkpoint at step 3 only
    with pytest.raises(ValueError, match="unknown weights 'best'; allowed: model, ema"):
        load_run(run, weights="best")
    with pytest.raises(CheckpointMismatch, match="shape mismatches"):
        load_run(run, gin_params=["sit.hidden_size = 64"])
    ema = list_checkpoints(run)[-1] / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:100])
    for load in (load_run, load_class_run):  # the benchmarks' loading verifies too
        with pytest.raises(DamagedCheckpoint, match="ema.safetensors has 100 bytes"):
            load(run)


def test_load_run_reads_a_sharded_checkpoint(tmp_path):
    run = tmp_path / "sharded"
    with own_process_group():
        assert train(run, 1, *FSDP) == 0
    checkpoint = list_checkpoints(run)[-1]
    assert not (checkpoint / "ema.safetensors").exists()
    for load in (load_run, load_class_run):
        loaded = load(run)
        expected = read_sharded_weights(checkpoint, "ema")
        assert loaded.model.state_dict().keys() == expected.keys()
        assert all(torch.equal(loaded.model.state_dict()[key], value) for key, value in expected.items())
