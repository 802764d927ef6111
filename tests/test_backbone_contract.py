"""The seam between SPRINT and its backbones, held for every registered backbone (including the one-file example in
tests/my_dit.py). A new backbone adds its tiny options to TINY; these tests then say what it still lacks."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tests.my_dit  # noqa: F401  registers 'my_dit', the README's "Add a backbone" example
from registry import BACKBONES
from sprint_mm.backbone import run_blocks
from sprint_mm.checkpoints import load_strict, read_state_dict, save_state_dict
from sprint_mm.cli import sample_main, train_main
from sprint_mm.masking import TokenMasker, random_mask
from sprint_mm.sampling import Guidance, guided_velocity
from sprint_mm.sprint import Sprint
from tests.helpers import randomize

SMALL = dict(hidden_size=48, depth=4, num_heads=2)
TEXT = dict(text_dim=8, text_length=5)
# backbone -> variant -> tiny options; the variants cover the options that change the data path
TINY = {
    "sit": {"rope": dict(SMALL, input_size=8, in_channels=3, num_classes=4),
            "absolute": dict(SMALL, input_size=8, in_channels=3, num_classes=4, position="absolute")},
    "video_dit": {"full": dict(SMALL, input_size=(2, 8, 8), in_channels=3, num_classes=4),
                  "factorised": dict(SMALL, input_size=(2, 8, 8), in_channels=3, num_classes=4, attention="factorised"),
                  "absolute": dict(SMALL, input_size=(2, 8, 8), in_channels=3, num_classes=4, position="absolute")},
    "text_dit": {"image": dict(SMALL, input_size=8, in_channels=3, **TEXT),
                 "factorised video": dict(SMALL, input_size=(2, 8, 8), in_channels=3, attention="factorised", **TEXT)},
    "my_dit": {"image": dict(SMALL, image_size=8, channels=3, num_classes=4)},
}
BATCH = 3


def variants() -> list:
    """(backbone, variant) for every registered backbone; one without tiny options fails and says where to add them."""
    return [pytest.param((name, variant), id=f"{name}-{variant}") for name in BACKBONES.list()
            for variant in TINY.get(name, {None: None})]


def tiny_model(name: str, variant: str | None, seed: int = 0) -> Sprint:
    if variant is None:
        pytest.fail(f"backbone {name!r} has no tiny options: add them to TINY in {__file__}")
    torch.manual_seed(seed)
    backbone = BACKBONES.build(name, **TINY[name][variant])
    return randomize(Sprint(backbone, encoder_depth=1, decoder_depth=1), seed + 1).eval()


def tube_mask(model: Sprint, x: torch.Tensor, seed: int):
    """A 0.75 tube mask (one spatial pattern in every frame): every attention kind takes it."""
    return TokenMasker("tube", 0.75)(BATCH, model.backbone.token_grid(tuple(x.shape)),
                                     generator=torch.Generator().manual_seed(seed))


def condition(model: Sprint, seed: int = 0):
    """A batch of conditions of the kind the backbone declares."""
    spec, g = model.backbone.condition, torch.Generator().manual_seed(seed)
    if spec.kind == "class":
        return torch.randint(0, spec.num_classes, (BATCH,), generator=g)
    mask = torch.arange(spec.text_length)[None] < torch.tensor([[2], [spec.text_length], [1]])
    return {"text_tokens": torch.randn(BATCH, spec.text_length, spec.text_dim, generator=g), "text_mask": mask}


def inputs(model: Sprint, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, *model.backbone.sample_shape, generator=g)
    return x, torch.rand(BATCH, generator=g), condition(model, seed)


@pytest.fixture(params=variants())
def case(request) -> tuple[str, str | None]:
    return request.param


@pytest.fixture
def model(case) -> Sprint:
    return tiny_model(*case)


def test_keep_everything_mask_equals_no_mask(model):
    x, t, cond = inputs(model)
    grid = model.backbone.token_grid(tuple(x.shape))
    mask = random_mask(BATCH, grid, 0.0, generator=torch.Generator().manual_seed(3))
    n = mask.num_kept
    assert not torch.equal(mask.ids_keep[0], torch.arange(n))  # every token, shuffled
    torch.testing.assert_close(model(x, t, cond, mask=mask), model(x, t, cond), atol=1e-5, rtol=1e-5)


def test_pdg_batch_equals_two_separate_passes(model):
    x, _, cond = inputs(model)
    t = torch.full((BATCH,), 0.6)
    guided = guided_velocity(model, x, 0.6, cond, Guidance("pdg", 2.5))
    strong = model(x, t, cond)
    weak = model(x, t, model.backbone.null_condition(cond), skip_middle=torch.ones(BATCH, dtype=torch.bool))
    torch.testing.assert_close(guided, weak + 2.5 * (strong - weak), atol=1e-5, rtol=1e-5)


def test_skipped_rows_equal_the_mask_token_path(model):
    x, t, cond = inputs(model)
    skip = torch.tensor([True, False, True])
    mask = tube_mask(model, x, seed=2)
    out = model(x, t, cond, mask=mask, skip_middle=skip)
    # By hand: encoder, the mask token in place of the whole middle output, fusion, decoder.
    emb = model.backbone.embed(x, t, cond)
    dense = run_blocks(model.encoder_blocks, emb)
    fused = model.fusion(torch.cat([model.mask_token.expand_as(dense), dense], dim=-1))
    by_hand = model.backbone.unembed(run_blocks(model.decoder_blocks, emb.with_tokens(fused)), emb)
    torch.testing.assert_close(out[skip], by_hand[skip], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[~skip], model(x, t, cond, mask=mask)[~skip], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the middle never runs on skipped rows: its weights cannot change them
        for block in model.middle_blocks:
            for p in block.parameters():
                p.add_(1.0)
    torch.testing.assert_close(model(x, t, cond, mask=mask, skip_middle=skip)[skip], out[skip])


def test_gradient_checkpointing_gives_the_same_gradients(case):
    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = tiny_model(*case).train()
        model.backbone.gradient_checkpointing = checkpointing
        x, t, cond = inputs(model)
        mask = tube_mask(model, x, seed=1)
        model(x, t, cond, mask=mask, skip_middle=torch.tensor([False, True, False])).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, recomputed = gradients(False), gradients(True)
    assert plain.keys() == recomputed.keys() and plain
    for key in plain:
        torch.testing.assert_close(recomputed[key], plain[key], atol=1e-6, rtol=1e-5)


def test_strict_save_and_load_round_trip(case, tmp_path):
    model = tiny_model(*case, seed=0)
    path = save_state_dict(model.state_dict(), tmp_path / "model.safetensors")
    other = tiny_model(*case, seed=5)
    x, t, cond = inputs(model)
    assert not torch.allclose(other(x, t, cond), model(x, t, cond))
    load_strict(other, read_state_dict(path))
    torch.testing.assert_close(other(x, t, cond), model(x, t, cond), atol=0, rtol=0)


def test_image_equals_a_one_frame_video_where_the_backbone_takes_both(model):
    x, t, cond = inputs(model)
    image = x if x.dim() == 4 else x[:, :, 0]
    try:
        model.backbone.token_grid((BATCH, image.shape[1], 1, *image.shape[2:]))
        model.backbone.token_grid(tuple(image.shape))
    except ValueError:
        pytest.skip(f"{type(model.backbone).__name__} does not take both images and one-frame videos")
    torch.testing.assert_close(model(image, t, cond), model(image.unsqueeze(2), t, cond).squeeze(2),
                               atol=1e-5, rtol=1e-5)


def test_a_backbone_in_one_file_trains_both_stages_and_samples_with_pdg(tmp_path):
    common = ["build_model.backbone = 'my_dit'", "my_dit.image_size = 8", "my_dit.channels = 1", "my_dit.depth = 4",
              "DigitsDataset.resolution = 8", "Trainer.batch_size = 8", "Trainer.max_steps = 2",
              "Trainer.preview_every = 0", "Trainer.time_budget_minutes = None", "Trainer.progress = False",
              "Sprint.encoder_depth = 1", "Sprint.decoder_depth = 1"]

    def train(gin_file: str, run: Path, *extra: str) -> int:
        argv = ["--gin_file", gin_file, "--run_dir", str(run)]
        for binding in (*common, *extra):
            argv += ["--gin_param", binding]
        return train_main(argv)

    assert train("gin/image/digits_stage1.gin", tmp_path / "stage1") == 0
    assert train("gin/image/digits_stage2.gin", tmp_path / "stage2", f"Trainer.init_from = '{tmp_path / 'stage1'}'") == 0
    out = tmp_path / "pdg.npz"
    assert sample_main(["--run", str(tmp_path / "stage2"), "--labels", "3", "7", "--steps", "2", "--guidance", "pdg",
                        "--out", str(out)]) == 0
    samples = np.load(out)["arr_0"]
    assert samples.shape == (2, 8, 8, 3) and samples.dtype == np.uint8


def test_sprint_mm_never_imports_the_registry():
    """Imports run one way: registry, demos and benchmarks -> sprint_mm. Every sprint_mm module imports without them."""
    script = (
        "import importlib, pkgutil, sys, sprint_mm\n"
        "for m in pkgutil.walk_packages(sprint_mm.__path__, prefix='sprint_mm.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] in ('registry', 'demos', 'benchmarks')))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "[]"
