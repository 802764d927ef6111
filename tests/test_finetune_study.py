"""benchmarks/finetune_study.py on a tiny model: every arm starts from the pretrained model as the same network, the
loss at step 0 tells the fills apart, and the report's arithmetic (seed means, levels, table)."""
from __future__ import annotations

import pytest

from benchmarks import finetune_study as study
from benchmarks.quality_curves import train_until

TINY = ["sit.hidden_size = 32", "sit.depth = 4", "sit.num_heads = 2", "Sprint.encoder_depth = 1",
        "Sprint.decoder_depth = 1"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    args = study.parse_args(["--root", str(root), "--batch", "4", *sum((["--gin-param", b] for b in TINY), [])])
    train_until([study.STAGE1, study.DENSE], root / "pretrain", 0.02, study.study_bindings(args, 0, study.OLD))
    return root / "pretrain", args


def test_every_arm_starts_as_the_pretrained_model(pretrained):
    path, args = pretrained
    dense = study.starting_loss(study.ARMS["dense"], path, args, batches=2)
    args.gin_param = [*args.gin_param, "FlowMatching.masker = None", "FlowMatching.path_drop = 0.0"]
    for name, arm in study.ARMS.items():  # no token or path dropped: the converted and adapted models are the dense one
        assert study.starting_loss(arm, path, args, batches=2) == pytest.approx(dense, rel=1e-6), name
    args.gin_param = args.gin_param[:-2]
    mask, route = (study.starting_loss(study.ARMS[name], path, args, batches=2) for name in ("sprint_mask", "sprint_route"))
    assert len({round(dense, 6), round(mask, 6), round(route, 6)}) == 3  # dropping tokens changes the start


def point(arm: str, seed: int, budget: float, seconds: float, new: float, frechet: float, **steps) -> dict:
    quality = [{"guidance": guidance, "accuracy_new": new, "accuracy_old": 0.9, "accuracy": (new + 0.9) / 2,
                "frechet": frechet} for guidance in (("cfg", "pdg") if arm.startswith("sprint") else ("cfg",))]
    return {"arm": arm, "seed": seed, "budget_min": budget, "train_s": seconds, "quality": quality, **steps}


def test_levels_and_table_use_the_seed_means():
    points = [point("dense", 0, 1.0, 60, 0.2, 8.0, steps=100), point("dense", 1, 1.0, 62, 0.4, 6.0, steps=104),
              point("dense", 0, 2.0, 120, 0.6, 3.0, steps=200), point("dense", 1, 2.0, 122, 0.8, 1.0, steps=206),
              point("sprint_mask", 0, 1.0, 60, 0.5, 4.0, stage1_steps=90, stage2_steps=20)]
    rows = {(r["metric"], r["level"], r["arm"], r["guidance"]): r["seconds"]
            for r in study.levels(points, [0.5], [2.0])}
    assert rows[("accuracy_new", 0.5, "dense", "cfg")] == pytest.approx(61 + 60 * (0.5 - 0.3) / 0.4)
    assert rows[("frechet", 2.0, "dense", "cfg")] == pytest.approx(121)
    assert rows[("accuracy_new", 0.5, "sprint_mask", "pdg")] == pytest.approx(60)  # at its first point: an upper bound
    assert rows[("frechet", 2.0, "sprint_mask", "cfg")] is None
    table = study.table_rows(points)
    assert table[0] == ["dense", "cfg", 1.0, "100/104", "0.30 (0.20/0.40)", "0.90 (0.90/0.90)", "0.60 (0.55/0.65)",
                        "7.00 (8.00/6.00)"]
    assert [row[:4] for row in table[2:]] == [["sprint_mask", "cfg", 1.0, "90+20"], ["sprint_mask", "pdg", 1.0, "90+20"]]
    assert study.mean_curve([[1.0, 2.0, 3.0], [3.0, 4.0]]) == [2.0, 3.0]
