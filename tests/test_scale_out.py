"""Scaling out: compiled blocks (one graph, no breaks, same numbers, same checkpoint keys), the SDPA kernel option, the
trainer's compile option and the per-process memory of DDP vs FSDP."""
from __future__ import annotations

import copy

import gin
import pytest
import torch
import torch.nn.functional as F

from benchmarks import train_speed as speed
from registry import BACKBONES
from sprint_mm.backbone import compile_blocks
from sprint_mm.configs import parse_gin
from sprint_mm.layers import DiTBlock, RotaryEmbedding, attention, grid_coordinates
from sprint_mm.masking import TokenMasker
from sprint_mm.tokens import TokenPositions
from tests.helpers import randomize, tiny_sprint


class GraphRecorder:
    """A torch.compile backend that keeps every graph dynamo captures and runs it as traced."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> torch.fx.GraphModule:
        self.graphs.append(graph)
        return graph.forward


def rope_inputs(batch: int = 2, grid: tuple[int, int, int] = (1, 4, 4), dim: int = 32, heads: int = 2):
    """Tokens, conditioning and RoPE positions for a block of width `dim`."""
    coords = grid_coordinates(grid)
    cos, sin = RotaryEmbedding(dim // heads, (0, 8, 8))(coords)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, coords.shape[0], dim, generator=generator)
    return x, torch.randn(batch, dim, generator=generator), TokenPositions(coords[None], cos, sin)


def test_dit_block_with_rope_positions_compiles_to_one_graph():
    torch._dynamo.reset()
    block = randomize(DiTBlock(32, 2)).eval()
    x, c, positions = rope_inputs()
    recorder = GraphRecorder()
    compiled = torch.compile(block, fullgraph=True, backend=recorder)  # a graph break would raise
    torch.testing.assert_close(compiled(x, c, positions, None), block(x, c, positions, None), rtol=0, atol=0)
    assert len(recorder.graphs) == 1
    targets = {node.target for node in recorder.graphs[0].graph.nodes}
    assert F.scaled_dot_product_attention in targets  # attention, RoPE included, is inside the one graph


def test_compiled_sprint_matches_eager_and_keeps_checkpoint_keys():
    torch._dynamo.reset()
    model = tiny_sprint()
    x, t, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 0.7]), torch.tensor([1, 2])
    compiled = copy.deepcopy(model)
    compile_blocks(compiled)
    assert list(compiled.state_dict()) == list(model.state_dict())  # no `_orig_mod.`: checkpoints unchanged
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, labels), model(x, t, labels), rtol=0, atol=1e-5)


def test_one_compiled_graph_serves_every_block_of_a_shape():
    """Five blocks of a SPRINT model with a token mask: all tokens (encoder, decoder) and the kept quarter (middle)
    need two graphs, not five."""
    torch._dynamo.reset()
    model = tiny_sprint()
    x, t, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 0.7]), torch.tensor([1, 2])
    mask = TokenMasker("structured", 0.75)(2, model.backbone.token_grid(tuple(x.shape)), generator=torch.Generator())
    eager = model(x, t, labels, mask)
    recorder = GraphRecorder()
    compile_blocks(model, backend=recorder)
    torch.testing.assert_close(model(x, t, labels, mask), eager, rtol=0, atol=0)
    assert len(recorder.graphs) == 2 < len(model.backbone.blocks)


def test_trainer_compile_option_compiles_every_block_and_keeps_keys(tmp_path):
    from sprint_mm.training import Trainer

    options = ["sit.hidden_size = 32", "sit.depth = 3", "sit.num_heads = 2", "sit.input_size = 8",
               "DigitsDataset.resolution = 8", "Trainer.batch_size = 4", "Sprint.encoder_depth = 1",
               "Sprint.decoder_depth = 1"]
    models = {}
    for compiled in (False, True):  # each in its own run folder: a set-up trainer holds its folder's lock
        parse_gin(["gin/image/digits_stage1.gin"], options + [f"Trainer.compile = {compiled}",
                                                             f"Trainer.run_dir = '{tmp_path / str(compiled)}'"])
        trainer = Trainer()
        trainer._setup()
        models[compiled] = trainer.parts.model
    assert all(block._compiled_call_impl is not None for block in models[True].backbone.blocks)
    assert all(block._compiled_call_impl is None for block in models[False].backbone.blocks)
    assert list(models[True].state_dict()) == list(models[False].state_dict())


def test_attention_kernel_option_changes_nothing_on_the_cpu_and_names_the_allowed_kernels():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=generator) for _ in range(3))
    reference = attention(q, k, v)
    for kernel in ("flash", "efficient", "math"):
        assert torch.equal(attention(q, k, v, kernel=kernel), reference)
    with pytest.raises(ValueError, match="unknown attention kernel 'fast'; allowed: auto, flash, efficient, math"):
        DiTBlock(32, 2, attention_kernel="fast")


def test_attention_kernel_is_a_backbone_option_that_reaches_every_attention():
    gin.parse_config(["text_dit.attention_kernel = 'efficient'"])
    model = BACKBONES.build("text_dit", hidden_size=32, depth=2, num_heads=2, input_size=8, patch_size=2,
                            in_channels=3, text_dim=8, text_length=4)
    kernels = [attn.kernel for block in model.blocks for attn in (block.attn, block.cross_attn)]
    assert kernels == ["efficient"] * 4


def test_fsdp_holds_a_world_size_share_of_the_training_state():
    ddp, fsdp = speed.strategy_memory(["ddp", "fsdp"], world_size=2)
    assert 670e6 < ddp["parameter_count"] < 680e6  # SiT-XL/2
    assert ddp["total"] == 20 * ddp["parameter_count"]  # fp32 parameters, gradients, two AdamW moments, EMA
    assert fsdp["total"] == ddp["total"] // 2
    assert speed.strategy_memory(["fsdp"], world_size=8)[0]["adamw"] == ddp["adamw"] // 8
