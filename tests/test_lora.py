"""LoRA through peft: what trains and what stays frozen, the EMA over the trained tensors only, the adapters as a peft
folder in each checkpoint, the merge command, bit-identical resume, FSDP with a frozen base, a base held in bf16, the
one-line errors, and the README's recipe end to end: a dense digits run converted to SPRINT, both stages with LoRA,
sampled with PDG."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from peft import PeftModel
from safetensors.torch import load_file

from sprint_mm.checkpoints import load_strict, save_state_dict
from sprint_mm.cli import merge_main, sample_main
from sprint_mm.configs import parse_gin
from sprint_mm.conversion import starting_state
from sprint_mm.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRA, adapter_keys
from sprint_mm.models import build_model
from sprint_mm.optimization import Optimization, frozen_copy, update_ema
from sprint_mm.runs import list_checkpoints
from sprint_mm.sharded import read_sharded_weights
from sprint_mm.testing import randomize
from sprint_mm.trained import load_run
from tests.test_distributed import torchrun
from tests.test_fsdp import own_process_group
from tests.test_training import TINY, train, weights

STAGE1 = "gin/image/digits_convert_lora_stage1.gin"
STAGE2 = "gin/image/digits_convert_lora_stage2.gin"
SMALL_LORA = ["LoRA.rank = 4", "LoRA.dropout = 0.1"]
LORA = ["build_model.lora = @LoRA()", *SMALL_LORA]


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 1, 8, 8, generator=g), torch.rand(3, generator=g), torch.tensor([1, 5, 9])


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """The README's recipe on the tiny model: a dense run, SPRINT + LoRA stage 1 from it, stage 2 from that."""
    root = tmp_path_factory.mktemp("lora")
    assert train(root / "dense", 3, "Trainer.lr = 3e-3", gin_file="gin/image/digits_dense.gin") == 0
    assert train(root / "stage1", 3, f"Trainer.init_from = '{root / 'dense'}'", *SMALL_LORA, gin_file=STAGE1) == 0
    assert train(root / "stage2", 2, f"Trainer.init_from = '{root / 'stage1'}'", *SMALL_LORA, gin_file=STAGE2) == 0
    return root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> list[str]:
    """Bindings that start a LoRA run from a perturbed dense digits model (a LoRA over a freshly initialised DiT
    learns nothing: its frozen adaLN gates are zero, so no gradient reaches the adapted layers)."""
    path = tmp_path_factory.mktemp("pretrained") / "dense.safetensors"
    parse_gin(["gin/image/digits_dense.gin"], TINY)
    save_state_dict(randomize(build_model(), seed=4).state_dict(), path)
    return [*LORA, f"Trainer.init_from = '{path}'", "Sprint.fusion_init = 'identity'"]


def test_only_adapters_fusion_and_full_modules_train(recipe):
    dense = weights(recipe / "dense", "ema")
    for name in ("model", "ema"):
        state = weights(recipe / "stage2", name)
        base = {key: value for key, value in state.items() if key.startswith("backbone.") and not adapter_keys([key])
                and ".y_embedder." not in key}
        assert base and all(torch.equal(value, dense[key.replace("backbone.", "", 1).replace(".base_layer", "")])
                            for key, value in base.items()), f"{name}: the frozen base moved"
        assert not torch.equal(state["backbone.y_embedder.embedding_table.weight"],
                               dense["y_embedder.embedding_table.weight"])
        assert any(state[key].abs().sum() > 0 for key in adapter_keys(state) if "lora_B" in key)
        assert not torch.equal(state["fusion.weight"][:, :32], torch.eye(32))


def test_the_ema_averages_only_what_trains_and_shares_the_frozen_base():
    parse_gin(["gin/image/digits_stage1.gin"], TINY + LORA)
    model = build_model()
    ema = frozen_copy(model)
    optimizer, _ = Optimization(lr=0.1).build(model.parameters(), fused=False)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert len(optimizer.param_groups[0]["params"]) == len(trained)
    assert trained == {k for k in adapter_keys(trained)} | {"fusion.weight", "fusion.bias"}
    pairs = list(zip(ema.named_parameters(), model.named_parameters()))
    assert all((e.data_ptr() == p.data_ptr()) == (name not in trained) for (name, e), (_, p) in pairs)
    before = {name: e.clone() for name, e in ema.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the frozen ones too: shared, so the EMA follows them; it averages only the trained ones
    update_ema(ema, model, 0.5)
    for (name, e), (_, p) in zip(ema.named_parameters(), model.named_parameters()):
        expected = before[name] + 0.5 if name in trained else p
        torch.testing.assert_close(e, expected)


def test_each_checkpoint_is_a_peft_adapter_folder(recipe):
    folder = list_checkpoints(recipe / "stage2")[-1]
    assert (folder / ADAPTER_CONFIG).is_file() and (folder / ADAPTER_WEIGHTS).is_file()
    lora_run = load_run(recipe / "stage2")  # the EMA with its adapters
    # peft's own loader on the plain SPRINT model that stage 1 started from (the dense EMA; new fusion and mask token)
    parse_gin([str(recipe / "stage2" / "config.gin")], ["build_model.lora = None"])
    plain = build_model()
    state, fresh = starting_state(plain, weights(recipe / "dense", "ema"), "dense")
    load_strict(plain, {**state, **{key: plain.state_dict()[key] for key in fresh}})
    adapted = PeftModel.from_pretrained(plain, str(folder)).eval()
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(adapted(x, t, y), lora_run.model(x, t, y), atol=1e-6, rtol=1e-5)


def test_merge_writes_a_plain_checkpoint(recipe, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    assert merge_main([str(recipe / "stage2"), "--out", str(out)]) == 0
    lora_run = load_run(recipe / "stage2")
    parse_gin([str(recipe / "stage2" / "config.gin")], ["build_model.lora = None"])
    plain = build_model().eval()
    load_strict(plain, load_file(str(out)))
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(plain(x, t, y), lora_run.model(x, t, y), atol=1e-5, rtol=1e-5)
    capsys.readouterr()
    assert merge_main([str(recipe / "dense"), "--out", str(out)]) == 2
    assert "has no LoRA adapters" in capsys.readouterr().err


def test_sample_py_samples_a_lora_run_with_pdg(recipe, tmp_path):
    out = tmp_path / "pdg.npz"
    assert sample_main(["--run", str(recipe / "stage2"), "--labels", "3", "7", "--steps", "2", "--guidance", "pdg",
                        "--out", str(out)]) == 0
    assert np.load(out)["arr_0"].shape == (2, 8, 8, 3)


def test_lora_resume_is_bit_identical(tmp_path, pretrained):
    assert train(tmp_path / "straight", 5, *pretrained) == 0
    assert train(tmp_path / "resumed", 3, *pretrained) == 0
    assert train(tmp_path / "resumed", 5, *pretrained) == 0
    for name in ("model", "ema"):
        a, b = weights(tmp_path / "straight", name), weights(tmp_path / "resumed", name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = (load_file(str(list_checkpoints(tmp_path / run)[-1] / ADAPTER_WEIGHTS)) for run in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_mistakes_are_one_line(recipe, tmp_path, capsys):
    def one_line(*bindings: str, run: str = "run", allow_config_change: bool = False) -> str:
        assert train(tmp_path / run, 1, *bindings, allow_config_change=allow_config_change) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    assert "'attn.qvk' names no module of DiT; its linear layers: adaLN_modulation.1, attn.proj, attn.qkv" in one_line(
        *LORA, "LoRA.targets = ['attn.qvk']")
    assert "LoRA.rank 64 is above the width of blocks.0.attn.qkv (32 -> 96: rank at most 32)" in one_line(
        *LORA, "LoRA.rank = 64")
    assert "'mlp' names no Linear layer of DiT: it names Mlp, Sequential modules" in one_line(*LORA, "LoRA.targets = ['mlp']")
    assert "'cross_attn.q' names no module of DiT" in one_line(*LORA, "LoRA.targets = ['cross_attn.q']")
    assert "set Trainer.precision = 'bf16'" in one_line(*LORA, "LoRA.base_dtype = 'bfloat16'")
    assert "merge them first" in one_line(f"Trainer.init_from = '{recipe / 'stage1'}'", "Sprint.fusion_init = 'identity'")
    shutil.copytree(recipe / "stage1", tmp_path / "other")
    # resuming with another configuration is refused first, naming the bindings (run_config); allowed, the
    # checkpoint's own check names the adapters
    assert "build_model.lora" in one_line(run="other")
    assert "trained with LoRA adapters: bind build_model.lora" in one_line(run="other", allow_config_change=True)
    assert "other LoRA adapters than this run's" in one_line(*LORA, "LoRA.alpha = 2.0", run="other",
                                                              allow_config_change=True)


@pytest.fixture
def fresh_accelerator_state():
    """A test that trains with another precision than the process's earlier runs: accelerate keeps one state per
    process, set by the first Accelerator; start from none and leave none."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_a_base_held_in_bf16_trains_and_samples(tmp_path, fresh_accelerator_state):
    assert train(tmp_path / "run", 2, *LORA, "LoRA.base_dtype = 'bfloat16'", "Trainer.precision = 'bf16'") == 0
    state = weights(tmp_path / "run")
    assert state["backbone.blocks.0.attn.qkv.base_layer.weight"].dtype == torch.bfloat16
    assert state["backbone.blocks.0.attn.qkv.lora_A.default.weight"].dtype == torch.float32
    assert sample_main(["--run", str(tmp_path / "run"), "--labels", "1", "--steps", "2", "--out",
                        str(tmp_path / "x.npz")]) == 0


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed support")
def test_fsdp_trains_adapters_over_a_frozen_base(tmp_path, pretrained):
    fsdp = [*pretrained, "Trainer.strategy = 'fsdp'", "Trainer.num_threads = 1"]
    args = ["train.py", "--gin_file", "gin/image/digits_stage1.gin", "--run_dir", str(tmp_path / "run")]
    for binding in [*TINY, "Trainer.max_steps = 2", *fsdp]:
        args += ["--gin_param", binding]
    done = torchrun(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    with own_process_group():  # resumed on one process, resharded
        assert train(tmp_path / "run", 3, *fsdp) == 0
    first, last = (read_sharded_weights(folder, "ema") for folder in list_checkpoints(tmp_path / "run"))
    moved = {key for key in first if not torch.equal(first[key], last[key])}
    assert moved == {key for key in first if adapter_keys([key]) or key.startswith("fusion.")}
    peft_file = load_file(str(list_checkpoints(tmp_path / "run")[-1] / ADAPTER_WEIGHTS))
    assert all(torch.equal(peft_file["base_model.model." + key.replace(".default", "")], last[key])
               for key in adapter_keys(last))


def test_lora_options_are_checked():
    for options, message in ((dict(rank=0), "LoRA.rank must be an integer >= 1"),
                             (dict(dropout=1.0), r"LoRA.dropout must be a number in \[0, 1\)"),
                             (dict(targets="attn.qkv"), "LoRA.targets must be a list"),
                             (dict(targets=[]), "LoRA.targets is empty"),
                             (dict(base_dtype="fp8"), "unknown LoRA.base_dtype 'fp8'")):
        with pytest.raises(ValueError, match=message):
            LoRA(**options)
