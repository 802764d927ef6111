"""REPA alignment: where the state is taken, target features and gathering, the loss, gradients, training end to end."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from sprint_mm.cli import sample_main, train_main
from sprint_mm.dinov2 import IMAGENET_MEAN, IMAGENET_STD
from sprint_mm.flow import FlowMatching
from sprint_mm.masking import TokenMasker, structured_mask
from sprint_mm.repa import AlignedModel, RepaAlignment
from sprint_mm.runs import list_checkpoints
from tests.helpers import randomize, tiny_sit, tiny_sprint

ENCODER = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=2,
               image_size=8)


def save_encoder(folder: Path, registers: int = 0) -> str:
    torch.manual_seed(0)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **ENCODER))
    else:
        model = Dinov2Model(Dinov2Config(**ENCODER))
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> str:
    return save_encoder(tmp_path_factory.mktemp("dinov2"))


def inputs(batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(batch, 3, 8, 8, generator=g), torch.rand(batch, generator=g)
    return x, t, torch.randint(0, 4, (batch,), generator=g)


def model_6_blocks() -> nn.Module:
    """Blocks 0 | 1 2 3 | 4 5: encoder 1, middle 3, decoder 2."""
    return tiny_sprint(depth=6, encoder_depth=1, decoder_depth=2)


def middle_by_hand(model, x, t, y, depth, mask, skip) -> torch.Tensor:
    """The state after `depth` blocks (a middle one), row by row, for the rows that do not skip: (R, M, D)."""
    bb = model.backbone
    emb = bb.embed(x, t, y)
    blocks = list(bb.blocks)
    dense = blocks[0](emb.tokens, emb.c, emb.positions)
    rows = []
    for i in (~skip).nonzero()[:, 0].tolist():
        keep = mask.ids_keep[i]
        h = dense[i : i + 1, keep]
        for block in blocks[1:depth]:
            h = block(h, emb.c[i : i + 1], emb.positions.gather(keep[None]))
        rows.append(h)
    return torch.cat(rows)


# ------------------------------------------------------------------------------------------ where the state is taken
def test_state_after_depth_blocks_in_encoder_middle_and_decoder():
    model = model_6_blocks()
    bb = model.backbone
    x, t, y = inputs()
    mask = structured_mask(4, (1, 4, 4), (1, 2, 2), 1, generator=torch.Generator().manual_seed(0))
    skip = torch.tensor([False, True, False, False])
    emb = bb.embed(x, t, y)
    with torch.no_grad():
        # encoder: all rows and tokens, exactly one block
        aligned = AlignedModel(model, nn.Identity(), 1)
        pred = aligned(x, t, y, mask=mask, skip_middle=skip)
        state = aligned.state
        assert state.rows is None and state.ids is None
        torch.testing.assert_close(state.features, bb.blocks[0](emb.tokens, emb.c, emb.positions))
        torch.testing.assert_close(pred, model(x, t, y, mask=mask, skip_middle=skip))
        # middle: after block 3 = the 2nd middle block, kept tokens of the rows that ran the middle
        aligned = AlignedModel(model, nn.Identity(), 3)
        aligned(x, t, y, mask=mask, skip_middle=skip)
        state = aligned.state
        assert state.rows.tolist() == [0, 2, 3]
        assert torch.equal(state.ids, mask.ids_keep[[0, 2, 3]])
        torch.testing.assert_close(state.features, middle_by_hand(model, x, t, y, 3, mask, skip), atol=1e-5, rtol=1e-5)
        # decoder: after block 5 (of 6), all tokens; the last block and the final layer turn it into the prediction
        aligned = AlignedModel(model, nn.Identity(), 5)
        pred = aligned(x, t, y, mask=mask, skip_middle=skip)
        state = aligned.state
        assert state.rows is None and state.ids is None and state.features.shape == (4, 16, 32)
        torch.testing.assert_close(bb.unembed(bb.blocks[5](state.features, emb.c, emb.positions), emb), pred)
    assert not any(block._forward_hooks for block in bb.blocks)  # the capture leaves no hook behind


def test_dense_backbone_state_and_every_row_path_dropped():
    dense = randomize(tiny_sit(depth=3)).eval()
    x, t, y = inputs()
    with torch.no_grad():
        aligned = AlignedModel(dense, nn.Identity(), 2)
        aligned(x, t, y)
        state = aligned.state
        emb = dense.embed(x, t, y)
        h = dense.blocks[1](dense.blocks[0](emb.tokens, emb.c, emb.positions), emb.c, emb.positions)
        torch.testing.assert_close(state.features, h)
        # A middle point that no row reached: an empty state and a zero alignment term, still in the graph.
        everyone = torch.ones(4, dtype=torch.bool)
        aligned = AlignedModel(model_6_blocks(), nn.Identity(), 2)
        aligned(x, t, y, skip_middle=everyone)
        state = aligned.state
    assert state.features.shape == (0, 16, 32) and state.rows.numel() == 0


# ------------------------------------------------------------------------------------------ targets and the loss
@pytest.mark.parametrize("registers", [0, 2])
def test_one_target_per_token_at_any_grid(tmp_path, registers):
    alignment = RepaAlignment(save_encoder(tmp_path, registers), depth=1)
    images = torch.randint(0, 256, (2, 3, 37, 23), dtype=torch.uint8)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    for grid in [(1, 4, 6), (1, 5, 3), (1, 7, 7)]:  # non-square; 7x7 is no power-of-two (256 px) equivalent
        targets = alignment.targets(images, grid)
        pixels = F.interpolate((images.float() / 255 - mean) / std, size=(2 * grid[1], 2 * grid[2]), mode="bicubic")
        expected = alignment.encoder(pixel_values=pixels).last_hidden_state[:, 1 + registers :]
        assert targets.shape == (2, grid[1] * grid[2], 16)
        torch.testing.assert_close(targets, expected)
    # [-1, 1] grey floats read as the same picture as uint8 RGB
    grey = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(alignment.targets(grey.float() / 127.5 - 1, (1, 4, 4)),
                               alignment.targets(grey.expand(-1, 3, -1, -1), (1, 4, 4)), atol=1e-5, rtol=1e-5)


def test_loss_gathers_targets_with_ids_keep_and_matches_direct_computation(encoder_dir):
    alignment = RepaAlignment(encoder_dir, depth=3, projector_dim=8)
    model = model_6_blocks()
    aligned = alignment.attach(model)
    x, t, y = inputs()
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    mask = structured_mask(4, (1, 4, 4), (1, 2, 2), 1, generator=torch.Generator().manual_seed(1))
    skip = torch.tensor([True, False, False, True])
    with torch.no_grad():
        aligned(x, t, y, mask=mask, skip_middle=skip)
        loss = alignment.loss(images, (1, 4, 4))
        projected = alignment.projector(middle_by_hand(model, x, t, y, 3, mask, skip))  # rows 1, 2
        full = alignment.targets(images, (1, 4, 4))
        cosines = [F.cosine_similarity(projected[r], full[i, mask.ids_keep[i]], dim=-1) for r, i in enumerate((1, 2))]
    torch.testing.assert_close(loss, -torch.cat(cosines).mean(), atol=1e-5, rtol=1e-5)


def test_alignment_follows_the_flow_loss_forward_and_gradients_stop_at_depth(encoder_dir):
    alignment = RepaAlignment(encoder_dir, depth=2, coeff=0.7, projector_dim=8)
    model = model_6_blocks().train()
    aligned = alignment.attach(model)
    objective = FlowMatching(label_dropout=0.0, path_drop=0.0, masker=TokenMasker("structured", 0.75))
    x, _, y = inputs()
    denoise = objective.loss(aligned, x, y, generator=torch.Generator().manual_seed(0))
    # The projector changes no prediction: the flow loss through the aligned model is the model's own.
    torch.testing.assert_close(denoise, objective.loss(model, x, y, generator=torch.Generator().manual_seed(0)))
    repa = alignment.loss(x.clamp(-1, 1), (1, 4, 4))
    assert -1.0 <= repa.item() <= 1.0
    repa.backward()
    blocks = model.backbone.blocks
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in alignment.projector.parameters())
    assert all(blocks[i].attn.qkv.weight.grad.abs().sum() > 0 for i in range(2))
    assert all(p.grad is None for block in blocks[2:] for p in block.parameters())
    assert all(not p.requires_grad and p.grad is None for p in alignment.encoder.parameters())


def test_clear_errors(encoder_dir, tmp_path):
    with pytest.raises(ValueError, match="depth must be >= 1"):
        RepaAlignment(encoder_dir, depth=0)
    with pytest.raises(ValueError, match=r"depth 7 is out of range.*allowed 1\.\.6"):
        RepaAlignment(encoder_dir, depth=7).attach(model_6_blocks())
    with pytest.raises(FileNotFoundError, match="no DINOv2 model"):
        RepaAlignment(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="frames"):
        RepaAlignment(encoder_dir).targets(torch.zeros(1, 3, 8, 8), (2, 4, 4))


# ------------------------------------------------------------------------------------------ training end to end
TINY = [
    "sit.hidden_size = 32", "sit.depth = 4", "sit.num_heads = 2", "sit.input_size = 8", "DigitsDataset.resolution = 8",
    "Sprint.encoder_depth = 1", "Sprint.decoder_depth = 1", "Trainer.batch_size = 8", "Trainer.log_every = 1",
    "Trainer.checkpoint_every = 1", "Trainer.preview_every = 0", "Trainer.time_budget_minutes = None",
    "Trainer.progress = False", "RepaAlignment.depth = 2", "RepaAlignment.projector_dim = 16",
]


def train(run: Path, steps: int, *extra: str, gin_file: str = "gin/image/digits_stage1.gin",
          allow_config_change: bool = False) -> int:
    argv = ["--gin_file", gin_file, "--run_dir", str(run)] + ["--allow-config-change"] * allow_config_change
    for param in TINY + [f"Trainer.max_steps = {steps}", *extra]:
        argv += ["--gin_param", param]
    return train_main(argv)


def test_training_logs_three_losses_resumes_and_samples_without_the_encoder(tmp_path, capsys):
    encoder = save_encoder(tmp_path / "dinov2")
    repa = ["Trainer.alignment = @RepaAlignment()", f"RepaAlignment.encoder_path = '{encoder}'"]
    assert train(tmp_path / "straight", 2, *repa) == 0
    assert train(tmp_path / "resumed", 1, *repa) == 0
    assert train(tmp_path / "resumed", 2, *repa) == 0
    for name in ("model.safetensors", "ema.safetensors", "projector.safetensors"):
        a, b = (load_file(str(list_checkpoints(tmp_path / run)[-1] / name)) for run in ("straight", "resumed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    last = list_checkpoints(tmp_path / "straight")[-1]
    assert sorted(load_file(str(last / "projector.safetensors"))) == [f"projectors.{i}.{p}" for i in (0, 2, 4)
                                                                        for p in ("bias", "weight")]
    assert not any("projector" in key for key in load_file(str(last / "model.safetensors")))
    metrics = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    for m in metrics:
        assert m["loss"] == pytest.approx(m["denoise_loss"] + 0.5 * m["repa_loss"], rel=1e-5)
        assert -1.0 <= m["repa_loss"] <= 1.0
    # Resuming a REPA run without alignment is refused (as another configuration, and with the change allowed, by the
    # checkpoint's projector); sampling needs neither the projector nor the encoder.
    assert train(tmp_path / "straight", 3) == 2
    assert "Trainer.alignment" in capsys.readouterr().err
    assert train(tmp_path / "straight", 3, allow_config_change=True) == 2
    assert "trained with REPA alignment" in capsys.readouterr().err
    shutil.rmtree(encoder)
    out = tmp_path / "s.npz"
    assert sample_main(["--run", str(tmp_path / "straight"), "--out", str(out), "--num", "2", "--steps", "2"]) == 0
    # A REPA stage 2 starts its projector from the stage-1 one (lr 0: the step changes nothing).
    encoder = save_encoder(tmp_path / "dinov2")
    assert train(tmp_path / "stage2", 1, *repa, f"Trainer.init_from = '{tmp_path / 'straight'}'", "Trainer.lr = 0.0",
                 gin_file="gin/image/digits_stage2.gin") == 0
    stage1 = load_file(str(last / "projector.safetensors"))
    stage2 = load_file(str(list_checkpoints(tmp_path / "stage2")[-1] / "projector.safetensors"))
    assert all(torch.equal(stage1[k], stage2[k]) for k in stage1)


def test_a_batch_where_every_row_skips_the_state_gives_zero_loss_with_the_projector_in_the_graph(encoder_dir):
    alignment = RepaAlignment(encoder_dir, depth=3, projector_dim=8)
    aligned = alignment.attach(model_6_blocks().train())
    x, t, y = inputs()
    aligned(x, t, y, skip_middle=torch.ones(4, dtype=torch.bool))
    loss = alignment.loss(x.clamp(-1, 1), (1, 4, 4))
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in alignment.projector.parameters())
