"""Smoke tests of the benchmark scripts' core functions on tiny settings, and the digits judge's accuracy."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import (
    curve_plots, data_speed, demo_accuracy, digits_classifier, equal_wallclock, fault_drill, gpu_suite,
    guidance_pareto, guidance_speed,
    harness, prompt_accuracy, quality_curves, train_speed, video_demo_variants,
)
from sprint_mm.data.moving_digits import digit_side, moving_digit_videos, write_moving_digits
from sprint_mm.flops import TransformerShape, forward_flops
from sprint_mm.sprint import Sprint

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# A SPRINT SiT small enough for seconds of CPU, at the judge's 16 px: 16 tokens, split 1/2/1.
TINY = [
    "sit.hidden_size = 32",
    "sit.depth = 4",
    "sit.num_heads = 2",
    "sit.patch_size = 4",
    "Sprint.encoder_depth = 1",
    "Sprint.decoder_depth = 1",
    "Trainer.batch_size = 8",
    "Trainer.log_every = 1",
    "Trainer.progress = False",
]


@pytest.fixture(scope="module")
def judge():
    return digits_classifier.DigitsClassifier.train(resolution=16, channels=1)


# ----------------------------------------------------------------------------------------------
# digits_classifier.py
# ----------------------------------------------------------------------------------------------


def test_judge_reads_the_real_test_digits(judge):
    images, labels = digits_classifier.digits_tensors("test", 16, 1)
    predictions = judge.predict(images)
    assert predictions.shape == labels.shape
    accuracy = digits_classifier.test_split_accuracy(judge)
    assert accuracy == pytest.approx((predictions == labels).float().mean().item())
    assert accuracy >= 0.9
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    assert judge.score(images, shuffled) < 0.3  # it reads the images, not the label prior


def test_judge_rejects_images_of_another_shape(judge):
    with pytest.raises(ValueError, match="resolution=8"):
        judge.predict(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="one label per sample"):
        judge.score(torch.zeros(2, 1, 16, 16), [0, 1, 2])


def test_digit_crops_find_the_sprite_in_every_frame():
    sprites = torch.rand(2, 3, 2, 5, 5) * 1.5 - 0.5  # (video, frame, channel, 5, 5), all brighter than the background
    videos = torch.full((2, 2, 3, 9, 11), -1.0)
    places = [[(0, 0), (4, 6), (2, 3)], [(4, 0), (0, 6), (3, 1)]]
    for n, frames in enumerate(places):
        for t, (top, left) in enumerate(frames):
            videos[n, :, t, top : top + 5, left : left + 5] = sprites[n, t]
    crops = digits_classifier.digit_crops(videos, 5)
    assert crops.shape == (6, 2, 5, 5)
    for n in range(2):
        for t in range(3):
            torch.testing.assert_close(crops[n * 3 + t], sprites[n, t])
    with pytest.raises(ValueError, match="crop side"):
        digits_classifier.digit_crops(videos, 10)
    with pytest.raises(ValueError, match="N, C, T, H, W"):
        digits_classifier.digit_crops(videos[0], 5)


def test_judge_reads_real_moving_digit_videos(judge):
    """Moving-digit videos whose digit is 16 px (the judge's resolution): every frame's crop is read correctly."""
    size, fraction = 21, 0.75
    assert digit_side(size, fraction) == judge.resolution
    pairs = list(moving_digit_videos(30, 6, size, 5, fraction))
    labels = torch.tensor([digit for digit, _ in pairs])
    videos = torch.stack([torch.from_numpy(video) for _, video in pairs])[:, None] * 2 - 1  # (N, 1, T, S, S)
    reads = digits_classifier.read_videos(judge, videos)
    assert reads.shape == (30, 6)
    assert (reads == labels[:, None]).float().mean() >= 0.9
    shuffled = torch.roll(videos, 1, dims=0)  # the same frames asked as other classes
    assert (digits_classifier.read_videos(judge, shuffled) == labels[:, None]).float().mean() < 0.3


def test_markdown_table_and_result_file(tmp_path):
    table = harness.markdown_table(["a", "b"], [[1, 0.12345], ["x", "y"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.123 |", "| x | y |"]
    path = harness.write_result({"k": [1, 2]}, tmp_path / "new" / "r.json")
    assert path.read_text().strip().startswith("{") and '"k"' in path.read_text()


# ----------------------------------------------------------------------------------------------
# harness.py and train_speed.py
# ----------------------------------------------------------------------------------------------


def test_time_interleaved_alternates_after_untimed_warmup():
    calls = []
    variants = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = harness.time_interleaved(variants, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert [len(times["a"]), len(times["b"])] == [3, 3]
    assert harness.median_seconds({"a": [3.0, 1.0, 2.0]}) == {"a": 2.0}
    with pytest.raises(ValueError, match="repeats"):
        harness.time_interleaved(variants, repeats=0)


def test_saved_activation_bytes_counts_what_autograd_keeps():
    linear = torch.nn.Linear(4, 8)
    x = torch.randn(5, 4)
    # addmm keeps its input x (weight and bias are parameters); relu keeps its output (5, 8)
    measured = train_speed.saved_activation_bytes(lambda: torch.relu(linear(x)).sum(), linear.parameters())
    assert measured == (5 * 4 + 5 * 8) * 4


def test_sprint_training_step_keeps_fewer_activations_and_costs_fewer_flops():
    dense, sprint = train_speed.build_pair(latent=8, hidden=32, depth=6, heads=2, encoder=1, decoder=1, num_classes=4)
    assert isinstance(sprint, Sprint) and not isinstance(dense, Sprint)
    for a, b in zip(dense.state_dict().values(), sprint.backbone.state_dict().values()):
        assert torch.equal(a, b)  # the same backbone weights
    x, labels = torch.randn(4, 4, 8, 8), torch.tensor([0, 1, 2, 3])
    steps = {"dense": train_speed.TrainingStep(dense, x, labels), "sprint": train_speed.TrainingStep(sprint, x, labels)}
    before = [p.clone() for p in sprint.parameters() if p.requires_grad]
    steps["sprint"]()
    assert any(not torch.equal(p0, p1) for p0, p1 in zip(before, [p for p in sprint.parameters() if p.requires_grad]))
    activations = {name: train_speed.saved_activation_bytes(step.loss, step.model.parameters())
                   for name, step in steps.items()}
    assert 0 < activations["sprint"] < activations["dense"]
    assert train_speed.flop_ratio(dense, sprint, x) > 1.5  # 4 of 6 blocks on a quarter of the tokens


def test_train_speed_row_reports_timings_and_checkpointed_memory():
    args = train_speed.parse_args(["--hidden", "32", "--depth", "6", "--heads", "2", "--repeats", "1", "--warmup", "0"])
    row = train_speed.measure_size(8, 2, args, torch.device("cpu"))
    assert row["tokens"] == 16 and row["dense_s"] > 0 and row["sprint_s"] > 0
    for name in ("dense", "sprint"):
        assert 0 < row[f"{name}_checkpointed_activation_bytes"] < row[f"{name}_activation_bytes"]


STAND_IN_OFFICIAL = {  # a stand-in for the official code's layout (none of its code): what train_speed calls of it
    "src/models/sit.py": """
import torch
from torch import nn

class SiT(nn.Module):
    def __init__(self, encoder_depth, middle_depth, decoder_depth, residual_type, hidden_size, **options):
        super().__init__()
        self.blocks = nn.Sequential(*(nn.Linear(4, 4) for _ in range(encoder_depth + middle_depth + decoder_depth)))
        self.depths, self.residual_type = (encoder_depth, middle_depth, decoder_depth), residual_type

    def forward(self, x, t, y, mask_dict=None):
        return self.blocks(x.transpose(1, -1)).transpose(1, -1), None
""",
    "src/scheduler/flow_matching.py": """
import torch

class FlowMatching:
    def __init__(self, accelerator, **options):
        self.accelerator, self.masked = accelerator, []

    def compute_loss(self, model, images, model_kwargs, zs, mask_config):
        self.masked.append(mask_config.mask_ratio)
        with self.accelerator.autocast():
            out, _ = model(images, torch.rand(images.shape[0]), **model_kwargs, mask_dict=None)
        return ((out - images) ** 2).mean(), torch.tensor(0.0)
""",
    "src/utils/utils.py": """
import torch

@torch.no_grad()
def update_ema(ema_model, model, decay=0.9999):
    for e, p in zip(ema_model.parameters(), model.parameters()):
        e.mul_(decay).add_(p, alpha=1 - decay)
""",
    "src/utils/parallelize.py": "def apply_compile(model, compile_config=None):\n    model.compiled = True\n",
}


def test_side_by_side_runs_both_steps_and_profiles_them_or_says_why_not(tmp_path, capsys):
    for name, text in STAND_IN_OFFICIAL.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    argv = ["--sizes", "--hidden", "32", "--depth", "4", "--heads", "2", "--encoder", "1", "--decoder", "1",
            "--side-by-side", "8:2", "--repeats", "2", "--warmup", "0", "--profile", "1"]
    result = train_speed.main([*argv, "--official", str(tmp_path), "--out", str(tmp_path / "r.json")])["side_by_side"]
    seconds, ratios = result["seconds"], result["ratios"]
    assert set(seconds) == {"ours_sprint", "ours_dense", "official_sprint", "official_dense"}
    assert ratios["ours_over_official_sprint"] == seconds["ours_sprint"] / seconds["official_sprint"]
    assert ratios["official_dense_over_sprint"] == seconds["official_dense"] / seconds["official_sprint"]
    for profile in result["profile"].values():
        assert set(profile) == {*(c for c, _ in train_speed.OP_CATEGORIES), train_speed.OTHER}
        assert profile["matrix products (Linear forward and backward)"] > 0
    floor = result["matmul_floor"]
    dense, sprint = train_speed.build_pair(8, 32, 4, 2, 1, 1)
    shape = dense.flop_shape()  # 16 tokens per sample, 4 kept by the 2x2 groups; forward + input and weight gradients
    assert floor["step_flops"]["dense"] == pytest.approx(3 * 2 * forward_flops(shape, 16))
    assert floor["step_flops"]["sprint"] == pytest.approx(3 * 2 * forward_flops(sprint.flop_shape(), 16, 4))
    assert floor["mm_shape"] == [32, 32, shape.mlp_hidden]
    for arm in ("sprint", "dense"):
        assert floor["seconds"][arm] == pytest.approx(floor["step_flops"][arm] / floor["flops_per_second"])
        assert floor["seconds"][arm] < seconds[f"ours_{arm}"]
    out = capsys.readouterr().out
    assert "| eager | sprint |" in out and "matrix products alone" in out
    assert train_speed.op_category("aten::addmm") == train_speed.op_category("aten::mm")
    assert train_speed.op_category("Optimizer.step#AdamW.step") == "optimizer, clipping and EMA"
    assert train_speed.op_category("aten::_scaled_dot_product_flash_attention_for_cpu").startswith("attention")
    missing = train_speed.main([*argv, "--official", str(tmp_path / "absent"), "--out", str(tmp_path / "m.json")])
    assert "no official SPRINT code at" in missing["side_by_side"]["skipped"]
    assert "side by side with the official code: skipped" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# guidance_speed.py
# ----------------------------------------------------------------------------------------------


def test_pdg_flop_ratio_is_the_papers_for_sit_xl():
    xl = TransformerShape(hidden=1152, depth=(2, 24, 2), mlp_hidden=4608, patch_dim=16)
    assert guidance_speed.pdg_flop_ratio(xl, 256) == pytest.approx(0.574, abs=0.002)


def test_guidance_steps_run_the_middle_on_the_right_rows():
    row = guidance_speed.measure_model("tiny", (32, 4, 2, 1, 1), latent=8, batch=3, repeats=1, warmup=0,
                                 device=torch.device("cpu"))
    assert row["split"] == [1, 2, 1] and row["tokens"] == 16 and row["cfg_s"] > 0 and row["pdg_s"] > 0
    assert 0.5 < row["flop_ratio"] < 1
    _, model = train_speed.build_pair(8, 32, 4, 2, 1, 1)
    middle_rows = []
    model.middle_blocks[0].register_forward_hook(lambda module, args, out: middle_rows.append(out.shape[0]))
    x, labels = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3])
    for kind in guidance_speed.KINDS:
        guidance_speed.guidance_step(model.eval(), x, labels, kind)()
    assert middle_rows == [6, 3]  # CFG: conditional and null halves; PDG: the conditional half only


# ----------------------------------------------------------------------------------------------
# demo_accuracy.py and equal_wallclock.py
# ----------------------------------------------------------------------------------------------


def test_budget_schedule_gives_both_arms_the_same_time_every_round():
    schedule = equal_wallclock.budget_schedule(4.0, 4)
    assert [round(r["dense"], 9) for r in schedule] == [1.0, 2.0, 3.0, 4.0]
    for r in schedule:
        assert r["stage1"] + r["stage2"] == pytest.approx(r["dense"])
    assert schedule[-1]["stage1"] == pytest.approx(3.0) and schedule[-1]["stage2"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="rounds"):
        equal_wallclock.budget_schedule(4.0, 0)


def test_guidance_settings_and_labels():
    settings = demo_accuracy.guidance_settings(["none", "cfg", "pdg"], [1.5, 2.0])
    assert [(g.kind, g.scale) for g in settings][1:] == [("cfg", 1.5), ("cfg", 2.0), ("pdg", 1.5), ("pdg", 2.0)]
    assert settings[0].kind == "none"
    assert demo_accuracy.class_major_labels(3, 2).tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(FileNotFoundError):
        harness.load_class_run("/nonexistent/run")


def test_a_video_counts_only_when_more_than_half_of_its_frames_read_as_asked():
    labels = torch.tensor([3, 3, 3, 7, 7])
    reads = torch.tensor([[3, 3, 3, 3, 3, 5, 5, 8],    # 5 of 8: a strict majority
                          [3, 3, 3, 3, 5, 5, 8, 8],    # 4 of 8: half is not more than half
                          [3, 3, 3, 5, 5, 8, 8, 1],    # 3 of 8 and the most common class: not correct
                          [7, 7, 7, 7, 7, 7, 7, 7],
                          [1, 1, 1, 1, 1, 7, 7, 7]])   # the most common class is wrong
    assert demo_accuracy.video_hits(reads, labels).tolist() == [True, False, False, True, False]
    assert demo_accuracy.video_hits(torch.tensor([[2, 2, 4]]), torch.tensor([2])).tolist() == [True]  # 2 of 3


def test_the_samples_sample_py_wrote_are_judged_with_the_labels_it_cycled(tmp_path):
    # Real moving-digit videos as sample.py writes them (uint8 RGB, --labels 0..9 cycled): read as asked; the same
    # files judged against labels shifted by one are not.
    import numpy as np

    from demos.clips import DIGIT_FRACTION

    videos = [video for _, video in moving_digit_videos(20, frames=8, size=16, seed=3, digit_fraction=DIGIT_FRACTION)]
    pixels = (np.stack(videos)[..., None].repeat(3, -1) * 255).round().astype(np.uint8)  # (20, 8, 16, 16, 3)
    np.savez(tmp_path / "videos.npz", arr_0=pixels)
    right = demo_accuracy.judge_file(str(tmp_path / "videos.npz"), list(range(10)))
    assert right["accuracy"] >= 0.9 and right["frame_accuracy"] >= 0.9 and right["samples"] == 20
    assert right["judge_resolution"] == digit_side(16, DIGIT_FRACTION) and len(right["per_class"]) == 10
    wrong = demo_accuracy.judge_file(str(tmp_path / "videos.npz"), [1, 2, 3, 4, 5, 6, 7, 8, 9, 0])
    assert wrong["accuracy"] <= 0.2
    stills = pixels[:, 0]  # (20, 16, 16, 3): images, judged whole
    np.savez(tmp_path / "stills.npz", arr_0=stills)
    assert demo_accuracy.judge_file(str(tmp_path / "stills.npz"), list(range(10)), None)["judge_resolution"] == 16


def test_equal_wallclock_arms_train_and_are_judged_with_the_same_noise(tmp_path, judge):
    finals = equal_wallclock.train_arms(tmp_path, minutes=0.004, rounds=2, extra=TINY)
    records = {name: harness.training_record(path) for name, path in
               [("dense", finals["dense"]), ("stage1", tmp_path / "sprint_stage1"), ("stage2", finals["sprint"])]}
    assert all(r["steps"] >= 1 for r in records.values())
    assert records["stage1"]["train_s"] + records["stage2"]["train_s"] >= 0.004 * 60
    dense, sprint = harness.load_class_run(finals["dense"]), harness.load_class_run(finals["sprint"])
    assert not isinstance(dense.model, Sprint) and isinstance(sprint.model, Sprint)
    # scale 1 switches guidance off: every kind must then give the very same samples, hence the same accuracy
    settings = demo_accuracy.guidance_settings(["none", "cfg", "pdg"], [1.0])
    rows = demo_accuracy.guided_accuracy(sprint, judge, settings, per_class=1, steps=2, progress=False)
    assert len({row["accuracy"] for row in rows}) == 1 and len(rows[0]["per_class"]) == 10
    assert rows[0]["accuracy"] == pytest.approx(sum(rows[0]["per_class"]) / 10)
    dense_rows = demo_accuracy.guided_accuracy(dense, judge, settings[2:], per_class=1, steps=2, progress=False)
    assert "skipped" in dense_rows[0]


def test_load_run_rejects_a_run_with_no_checkpoint(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        harness.load_class_run(tmp_path / "run")


def test_fault_drill_rows_report_what_happened_and_compare_weights(tmp_path):
    drill = fault_drill.Drill(tmp_path, steps=7, every=3)
    assert drill.train("reference").returncode == 0
    damaged = fault_drill.damaged_row(drill, "model.safetensors", "truncated")
    assert damaged["what the program did"].startswith("found it damaged, fell back")
    assert damaged["exit status"] == "0" and damaged["work lost (steps)"] == 3
    assert damaged["weights identical after resume"] == "yes"
    # The comparison can fail: a run with another seed does not have the reference's weights.
    assert drill.train("other_seed", "Trainer.seed = 1").returncode == 0
    assert not drill.same_weights("other_seed", "reference")


def test_fault_drill_rows_of_data_refused_before_the_first_step(tmp_path):
    drill = fault_drill.Drill(tmp_path, steps=7, every=3)
    buckets = fault_drill.bucket_unreadable_row(drill)
    assert buckets["exit status"] == "2" and buckets["work lost (steps)"] == 0
    assert buckets["what the program did"].startswith("stopped before the first step: too much bad data: 2 of 62 "
                                                      "items were left out before training")
    empty = fault_drill.caption_index_row(drill, "empty")
    assert empty["exit status"] == "2" and "every caption in" in empty["what the program did"]
    assert not (tmp_path / "bucket_unreadable" / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------
# gpu_suite.sh
# ----------------------------------------------------------------------------------------------


def test_gpu_suite_tiny_prints_one_table_of_training_and_sampling_steps(tmp_path):
    out = tmp_path / "suite.json"
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_suite.sh"), "--tiny", "--repeats", "1", "--warmup", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    lines = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ")]
    families = lines.index(next(cells for cells in lines if cells[0].strip() == "model"))
    table, family_table = lines[:families], lines[families:]
    assert [cells[0].strip() for cells in table] == ["step"] + ["training step"] * 4 + ["sampling step"] * 2
    assert [cells[1].strip() for cells in table[1:]] == ["dense", "sprint", "dense compiled", "sprint compiled",
                                                        "cfg", "pdg"]
    rows = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
    for row in rows.values():
        assert row["seconds"] > 0 and row["peak_bytes"] is None  # no CUDA peak on the CPU
        assert row["tflops"] == pytest.approx(row["tflop"] / row["seconds"])
        assert row["peak_fraction"] == pytest.approx(row["tflops"] / 989.0)
    assert rows["sprint"]["tflop"] < rows["dense"]["tflop"] == rows["dense compiled"]["tflop"]
    assert rows["pdg"]["tflop"] < rows["cfg"]["tflop"]
    # the families at their (here: tiny) shapes, dense then SPRINT, as the recipes train them
    assert [(cells[0].strip(), cells[2].strip()) for cells in family_table[1:]] == [
        (name, variant) for name in gpu_suite.DEFAULT_FAMILIES for variant in ("dense", "sprint")]
    family_rows = json.loads(out.read_text())["families"]
    for dense, sprint in zip(family_rows[::2], family_rows[1::2]):
        assert sprint["tflop"] < dense["tflop"] and sprint["parameters"] > dense["parameters"]  # + the fusion
        assert dense["tokens"] == sprint["tokens"] and dense["seconds"] > 0


# ----------------------------------------------------------------------------------------------
# quality_curves.py, guidance_pareto.py and curve_plots.py
# ----------------------------------------------------------------------------------------------


def test_time_to_reach_interpolates_the_first_crossing():
    seconds, accuracy = [10.0, 20.0, 40.0], [0.2, 0.6, 0.5]
    assert curve_plots.time_to_reach(seconds, accuracy, 0.4, True) == pytest.approx(15.0)
    assert curve_plots.time_to_reach(seconds, accuracy, 0.1, True) == 10.0  # already there at the first point
    assert curve_plots.time_to_reach(seconds, accuracy, 0.7, True) is None
    # lower is better: the first time the distance falls to the level
    assert curve_plots.time_to_reach(seconds, [30.0, 10.0, 5.0], 7.5, False) == pytest.approx(30.0)


def test_pareto_front_keeps_exactly_the_undominated_settings():
    generator = torch.Generator().manual_seed(0)
    points = [{"sample_cpu_s": float(c), "accuracy": float(a), "frechet": float(f)}
              for c, a, f in torch.rand(40, 3, generator=generator)]
    for metric, sign in (("accuracy", 1), ("frechet", -1)):
        front = curve_plots.pareto_front(points, metric, sign > 0)
        def dominated(p):  # another setting at most as costly and strictly better
            return any(q["sample_cpu_s"] <= p["sample_cpu_s"] and sign * q[metric] > sign * p[metric] for q in points)

        assert sorted(map(id, front)) == sorted(id(p) for p in points if not dominated(p))
        assert [p["sample_cpu_s"] for p in front] == sorted(p["sample_cpu_s"] for p in front)


def test_quality_point_trains_on_the_cpu_clock_and_judges_both_arms(tmp_path, judge):
    real, _ = digits_classifier.digits_tensors("test", 16, 1)
    stats = quality_curves.FeatureStats.from_features(quality_curves.judge_features(judge, real))
    quality_judge = quality_curves.Judge(judge, stats)
    assert quality_judge.frechet(real) == pytest.approx(0.0, abs=1e-6)  # the real digits against themselves
    args = quality_curves.parse_args(["--tokens", "16", "--budgets", "0.004", "--seeds", "0", "--per-class", "1",
                              "--steps", "2", "--root", str(tmp_path)])
    args.gin_param = TINY
    result = {"points": [], "summary": []}
    quality_curves.run_seed(0, tmp_path, quality_judge, args, result, tmp_path / "quality_curves_16.json")
    dense, sprint = result["points"]
    assert (dense["arm"], sprint["arm"]) == ("dense", "sprint")
    assert dense["train_s"] >= 0.004 * 60 and sprint["stage1_s"] >= 0.75 * 0.004 * 60
    assert sprint["train_s"] == pytest.approx(sprint["stage1_s"] + sprint["stage2_s"])
    assert [q["guidance"] for q in dense["quality"]] == ["cfg"]
    assert [q["guidance"] for q in sprint["quality"]] == ["cfg", "pdg"]
    assert all(0 <= q["accuracy"] <= 1 and q["frechet"] > 0 for q in dense["quality"] + sprint["quality"])
    out = tmp_path / "quality_curves_16.json"
    assert json.loads(out.read_text())["points"] == result["points"]
    # --extend keeps the measured points and skips them; it refuses a result measured with other settings
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"batch": 8, "points": []}))
    assert quality_curves.extended({"batch": 8}, other) == {"batch": 8, "points": []}
    with pytest.raises(ValueError, match="batch"):
        quality_curves.extended({"batch": 16}, other)
    quality_curves.run_seed(0, tmp_path, quality_judge, args, result, out)
    assert len(result["points"]) == 2
    with pytest.raises(ValueError, match="square"):
        quality_curves.patch_for(48, 16)


def test_guidance_interval_outside_the_solver_grid_is_no_guidance(tmp_path, judge):
    run_dir = equal_wallclock.train_arms(tmp_path, minutes=0.002, rounds=1, extra=TINY)["sprint"]
    run = harness.load_class_run(run_dir)
    real, _ = digits_classifier.digits_tensors("test", 16, 1)
    real_stats = quality_curves.FeatureStats.from_features(quality_curves.judge_features(judge, real))
    quality_judge = quality_curves.Judge(judge, real_stats)
    grid = guidance_pareto.settings(["pdg"], [3.0], [guidance_pareto.parse_interval("0:0"), (0.0, 1.0)])
    rows = [quality_curves.sample_quality(run, quality_judge, g, per_class=2, steps=2, density=d) for g, d in grid]
    # Euler evaluates t = 1 and 0.5 only: an interval [0, 0] never guides, so it draws the unguided samples
    assert (rows[1]["accuracy"], rows[1]["frechet"]) == (rows[0]["accuracy"], rows[0]["frechet"])
    assert rows[2]["frechet"] != rows[0]["frechet"]
    with pytest.raises(Exception, match="interval"):
        guidance_pareto.parse_interval("0.5")


def test_guidance_pareto_measures_every_setting_with_its_flops_and_tests_the_goal(tmp_path, monkeypatch, judge):
    run_dir = equal_wallclock.train_arms(tmp_path, minutes=0.002, rounds=1, extra=TINY)["sprint"]
    monkeypatch.setattr(guidance_pareto, "judge_for", lambda run: judge)
    out = tmp_path / "guidance_pareto_tiny.json"
    result = guidance_pareto.main(["--run", str(run_dir), "--kinds", "pdg", "sparse", "--scales", "2",
                                   "--intervals", "0:1", "--densities", "1", "0.25:0.5", "--per-class", "1",
                                   "--steps", "2", "--out", str(out)])
    labels = [curve_plots.guidance_label(row) for row in result["settings"]]
    assert labels == ["none", "none keep 0.25>0.5", "pdg 2", "pdg 2 keep 0.25>0.5", "sparse 2 weak 0.25",
                      "sparse 2 keep 0.25>0.5 weak 0.25"]
    run = harness.load_class_run(run_dir)
    for row in result["settings"]:  # each setting's FLOPs are those of its sampler (a 4x4 grid, the middle 2 blocks)
        guidance = guidance_pareto.Guidance(row["guidance"], row["scale"], tuple(row["interval"]), row["sparse_keep"])
        density = guidance_pareto.MiddleDensity(row["middle_keep"], row["keep_above"])
        assert row["gflops"] * 1e9 == run.sampling_flops((1, 16, 16), 2, "euler", guidance, density)
    by_label = dict(zip(labels, result["settings"]))
    assert by_label["pdg 2 keep 0.25>0.5"]["gflops"] < by_label["pdg 2"]["gflops"]
    assert by_label["sparse 2 keep 0.25>0.5 weak 0.25"]["gflops"] < by_label["sparse 2 weak 0.25"]["gflops"]
    [goal] = result["goal"]
    assert goal["pdg"] == "pdg 2" and goal["gflops"] <= goal["pdg_gflops"]
    assert goal["met"] == (goal["saving"] >= 0.4)
    assert (tmp_path / "guidance_pareto_tiny.png").stat().st_size > 10_000
    with pytest.raises(Exception, match="keep:above"):
        guidance_pareto.parse_density("0.25")
    with pytest.raises(Exception, match="keep:above"):
        guidance_pareto.parse_density("0.25:1.5")


def test_the_goal_is_the_cheapest_setting_as_good_as_each_pdg_setting():
    def row(kind, keep, gflops, accuracy, frechet):
        return {"guidance": kind, "scale": 2.0, "interval": [0.0, 1.0], "middle_keep": keep, "keep_above": 0.5,
                "sparse_keep": 0.25, "gflops": gflops, "accuracy": accuracy, "frechet": frechet}

    rows = [row("pdg", 1.0, 10.0, 0.90, 1.00), row("cfg", 0.25, 5.0, 0.95, 0.90),  # as good, half the FLOPs
            row("pdg", 0.25, 4.0, 0.895, 1.04),  # within the tolerance (0.01, 5 %): cheaper still
            row("none", 0.25, 2.0, 0.80, 0.90), row("pdg", 0.5, 3.0, 0.95, 1.10)]  # worse on one metric each
    [goal] = guidance_pareto.goal_rows(rows, (0.01, 0.05))
    assert (goal["cheapest"], goal["saving"], goal["met"]) == ("pdg 2 keep 0.25>0.5", pytest.approx(0.6), True)


def test_figures_and_tensorboard_curves_are_drawn_once(tmp_path):
    points = [{"arm": arm, "seed": seed, "budget_min": budget, "train_s": 60.0 * budget + seed,
               "quality": [{"guidance": g, "accuracy": 0.3 * budget + 0.01 * seed, "frechet": 10.0 / budget}
                           for g in (["cfg"] if arm == "dense" else ["cfg", "pdg"])]}
              for seed in (0, 1) for budget in (1.0, 2.0) for arm in ("dense", "sprint")]
    seconds, accuracy = curve_plots.curve(points, "sprint", "pdg", "accuracy")  # the mean over the seeds at each budget
    assert seconds == pytest.approx([60.5, 120.5]) and accuracy == pytest.approx([0.305, 0.605])
    result = {"tokens": 64, "patch": 2, "seeds": [0, 1], "frechet_floor": 1.0, "points": points}
    (tmp_path / "quality_curves_64.json").write_text(json.dumps(result))
    settings = [{"guidance": g, "scale": 2.0, "interval": [0.0, 1.0], "sample_cpu_s": c, "accuracy": a, "frechet": f}
                for g, c, a, f in (("none", 1.0, 0.5, 9.0), ("cfg", 2.0, 0.9, 4.0), ("pdg", 1.5, 0.8, 5.0))]
    (tmp_path / "guidance_pareto.json").write_text(json.dumps(
        {"run": "r", "samples": 200, "steps": 20, "settings": settings}))
    for _ in range(2):  # a redraw replaces the TensorBoard curves instead of adding to them
        drawn = curve_plots.main(["--results", str(tmp_path)])
    assert [p.name for p in drawn] == ["quality_curves.png", "guidance_pareto.png"]
    assert all(p.stat().st_size > 10_000 for p in drawn)
    events = sorted(p.parent.name for p in (tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert events == ["cfg", "dense_cfg", "none", "pdg", "sprint_cfg", "sprint_pdg"]


# ----------------------------------------------------------------------------------------------
# video_demo_variants.py
# ----------------------------------------------------------------------------------------------


def test_video_variant_spec_parses_steps_and_bindings():
    v = video_demo_variants.parse_variant("narrow:300:80:video_dit.mlp_ratio = 0.5; Trainer.lr = 1e-3")
    assert (v.name, v.stage1_steps, v.stage2_steps) == ("narrow", 300, 80)
    assert v.bindings == ("video_dit.mlp_ratio = 0.5", "Trainer.lr = 1e-3")
    assert video_demo_variants.parse_variant("base:10:5").bindings == ()
    for bad in ("base:10", "base:ten:5", ":10:5", "base:0:5"):
        with pytest.raises(ValueError, match="variant"):
            video_demo_variants.parse_variant(bad)


def test_video_variant_trains_both_stages_for_its_steps_with_its_bindings(tmp_path):
    videos = tmp_path / "videos"
    write_moving_digits(videos, 10, 8, 16, digit_fraction=0.75)
    variant = video_demo_variants.parse_variant("narrow:3:2:video_dit.mlp_ratio = 0.5; Trainer.batch_size = 4")
    stage2, seconds = video_demo_variants.train_variant(variant, videos, tmp_path / "runs")
    assert seconds > 0
    for stage, steps in (("stage1", 3), ("stage2", 2)):
        run = tmp_path / "runs" / "narrow" / stage
        assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == steps
    model = harness.load_class_run(stage2).model
    assert model.backbone.blocks[0].mlp.fc1.out_features == 64  # hidden 128 x ratio 0.5


# ----------------------------------------------------------------------------------------------
# data_speed.py
# ----------------------------------------------------------------------------------------------


def test_data_speed_reads_every_source_and_measures_the_index(tmp_path):
    result = data_speed.main(["--items", "8", "--batch", "4", "--items-per-shard", "5", "--repeats", "1",
                              "--index-items", "30", "--work", str(tmp_path / "work"),
                              "--out", str(tmp_path / "r.json")])
    readers = {(row["source"], row["reader"]) for row in result["reads"]}
    assert readers == {(source, reader) for source in ("mp4 clips", "video latents", "image latents")
                       for reader in ("files", "shards")} | {("video latents", "wids (tar shards)"),
                                                             ("video latents", "webdataset (streamed)")}
    assert all(row["items_per_s"] > 0 and row["first_batch_s"] > 0 for row in result["reads"])
    index = result["index"]
    assert (index["items"], index["shards"]) == (30, 1) and index["index_bytes"] > 30 * 44
    assert json.loads((tmp_path / "r.json").read_text())["index"] == index


def test_prompt_accuracy_has_a_column_for_every_guidance_the_sampler_offers():
    # its table walks sampling.GUIDANCES: a guidance without a header ended the command after all its sampling
    from sprint_mm.sampling import GUIDANCES

    assert set(prompt_accuracy.HEADERS) == set(GUIDANCES)
