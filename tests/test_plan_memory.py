"""The memory planner (benchmarks/plan_memory.py): its shapes table, its parameter counts against built models, its
law of saved activations against blocks it did not fit, its estimate against a measured CPU peak, and what it says
cannot run."""
from __future__ import annotations

from dataclasses import replace

import pytest

from benchmarks import plan_memory
from benchmarks.plan_memory import CHECK_SHAPE, Plan, block_law, build_model, estimate, features, load_shapes, measure

TINY = replace(CHECK_SHAPE, hidden=64, depth=4, heads=2, mlp_hidden=256, text_length=8, text_dim=16)
TINY_CLIP = dict(frames=4, height=16, width=16)  # latent units: a 4x8x8 grid, 256 tokens


def test_the_shapes_table_and_its_parameter_counts(tmp_path):
    shapes = load_shapes()
    assert {"sit-xl2", "wan2.1-1.3b", "wan2.1-14b"} <= set(shapes)
    # the published sizes: SiT-XL/2 675 M (README), Wan2.1 "1.3B" and "14B" (Wan's shared modulation)
    assert shapes["sit-xl2"].parameters(False) == pytest.approx(675e6, rel=0.01)
    assert shapes["wan2.1-1.3b"].parameters(False) / 1e9 == pytest.approx(1.4, abs=0.1)
    assert shapes["wan2.1-14b"].parameters(False) / 1e9 == pytest.approx(14.3, abs=0.3)
    for sprint in (False, True):  # the formula counts the model sprint_mm builds
        model = build_model(Plan(TINY, **TINY_CLIP, sprint=sprint, encoder_depth=1, decoder_depth=1))
        assert sum(p.numel() for p in model.parameters()) == TINY.parameters(sprint)
    bad = tmp_path / "shapes.csv"
    bad.write_text((plan_memory.SHAPES.read_text()).replace(",gelu,", ",relu,", 1))
    with pytest.raises(ValueError, match="mlp must be gelu or swiglu"):
        load_shapes(bad)


@pytest.mark.parametrize("precision, text", [("no", False), ("bf16", True)])
def test_the_law_of_saved_activations_is_exact_on_unseen_blocks(precision, text):
    law = block_law(precision, "gelu", text)
    for d, f, h, n, length in [(96, 264, 6, 70, 11), (160, 640, 10, 33, 3)]:
        length = length if text else 0
        counted = plan_memory.saved_bytes(d, f, h, n, length, precision, "gelu")
        assert sum(c * v for c, v in zip(law, features(d, f, h, n, length))) == pytest.approx(counted, rel=1e-6)


@pytest.mark.parametrize("sprint, checkpointing", [(False, False), (True, True)])
def test_the_estimate_is_close_to_a_measured_cpu_peak(sprint, checkpointing):
    plan = Plan(TINY, **TINY_CLIP, processes=1, strategy="ddp", precision="no", sprint=sprint,
                checkpointing=checkpointing, encoder_depth=1, decoder_depth=1)
    assert estimate(plan)["total"] / measure(plan) == pytest.approx(1.0, abs=0.15)


def test_what_cannot_run_is_named_and_what_runs_is_costed():
    wan = load_shapes()["wan2.1-14b"]
    clip = Plan(wan, 81, 480, 832, processes=8, context=4)
    assert clip.grid == (21, 30, 52) and clip.tokens == 32760
    assert plan_memory.cell(clip, 80) == "kept tokens do not balance"  # 8190 kept tokens over 4 processes
    assert plan_memory.cell(replace(clip, sprint=False), 80).endswith(("yes", "no"))  # dense: 32760 / 4 tokens
    assert plan_memory.cell(Plan(wan, 1, 8 * 3 * 2, 8 * 5 * 2, processes=2, context=2, sprint=False), 80) == \
        "grid does not split"  # a 1x3x5 grid
    spread, whole = (estimate(replace(clip, context=c)) for c in (2, 1))
    assert spread["activations"] < whole["activations"] and spread["weights, AdamW, EMA"] == whole["weights, AdamW, EMA"]


def test_the_command_line(capsys):
    result = plan_memory.main(["--model", "wan2.1-1.3b", "--context", "2", "--frames", "17", "--size", "240", "416"])
    assert result["parts_gib"]["total"] > result["parts_gib"]["weights, AdamW, EMA"] > 0
    assert "fits a 80 GB card" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown model 'wan9'"):
        plan_memory.main(["--model", "wan9"])
