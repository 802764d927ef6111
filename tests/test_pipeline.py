"""A trained run to an ADM .npz through sample.py, then evaluate.py on it (FDD with a tiny local DINOv2)."""
from __future__ import annotations

import json

import numpy as np
import torch

from sprint_mm.cli import sample_main
from tests.helpers import script_module
from tests.test_training import train


def test_sample_to_npz_to_evaluate(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    dino = tmp_path / "dinov2"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=28, patch_size=14)).save_pretrained(dino)
    run = tmp_path / "run"
    assert train(run, 2) == 0
    samples, reference = tmp_path / "samples.npz", tmp_path / "reference.npz"
    assert sample_main(["--run", str(run), "--num", "20", "--steps", "2", "--out", str(samples)]) == 0
    real = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    np.savez(reference, arr_0=real)

    cli = script_module("evaluate.py", "evaluate_command")
    out = tmp_path / "result.json"
    assert cli.main(["--samples", str(samples), "--reference", str(reference), "--metric", "fdd",
                     "--weights", str(dino), "--batch-size", "8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_samples"] == 20 and np.isfinite(result["fdd"]) and result["fdd"] > 0
