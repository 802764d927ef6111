"""Smoke tests of the benchmark scripts' core functions on tiny settings, and the digits judge's accuracy."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from sprint_mm.flops import TransformerShape
from sprint_mm.sprint import Sprint
from sprint_mm.video_demo import load_moving_digits_maker
from tests.helpers import BENCHMARKS, load_script

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
def classifier_script():
    return load_script("digits_classifier")


@pytest.fixture(scope="module")
def judge(classifier_script):
    return classifier_script.DigitsClassifier.train(resolution=16, channels=1)


# ----------------------------------------------------------------------------------------------
# digits_classifier.py
# ----------------------------------------------------------------------------------------------


def test_judge_reads_the_real_test_digits(classifier_script, judge):
    images, labels = classifier_script.digits_tensors("test", 16, 1)
    predictions = judge.predict(images)
    assert predictions.shape == labels.shape
    accuracy = classifier_script.test_split_accuracy(judge)
    assert accuracy == pytest.approx((predictions == labels).float().mean().item())
    assert accuracy >= 0.9
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    assert judge.score(images, shuffled) < 0.3  # it reads the images, not the label prior


def test_judge_rejects_images_of_another_shape(judge):
    with pytest.raises(ValueError, match="resolution=8"):
        judge.predict(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="one label per sample"):
        judge.score(torch.zeros(2, 1, 16, 16), [0, 1, 2])


def test_digit_crops_find_the_sprite_in_every_frame(classifier_script):
    sprites = torch.rand(2, 3, 2, 5, 5) * 1.5 - 0.5  # (video, frame, channel, 5, 5), all brighter than the background
    videos = torch.full((2, 2, 3, 9, 11), -1.0)
    places = [[(0, 0), (4, 6), (2, 3)], [(4, 0), (0, 6), (3, 1)]]
    for n, frames in enumerate(places):
        for t, (top, left) in enumerate(frames):
            videos[n, :, t, top : top + 5, left : left + 5] = sprites[n, t]
    crops = classifier_script.digit_crops(videos, 5)
    assert crops.shape == (6, 2, 5, 5)
    for n in range(2):
        for t in range(3):
            torch.testing.assert_close(crops[n * 3 + t], sprites[n, t])
    with pytest.raises(ValueError, match="crop side"):
        classifier_script.digit_crops(videos, 10)
    with pytest.raises(ValueError, match="N, C, T, H, W"):
        classifier_script.digit_crops(videos[0], 5)


def test_judge_reads_real_moving_digit_videos(classifier_script, judge):
    """Moving-digit videos whose digit is 16 px (the judge's resolution): every frame's crop is read correctly."""
    make = load_moving_digits_maker()
    size, fraction = 21, 0.75
    assert make.digit_side(size, fraction) == judge.resolution
    pairs = list(make.moving_digit_videos(30, 6, size, 5, fraction))
    labels = torch.tensor([digit for digit, _ in pairs])
    videos = torch.stack([torch.from_numpy(video) for _, video in pairs])[:, None] * 2 - 1  # (N, 1, T, S, S)
    reads = classifier_script.read_videos(judge, videos)
    assert reads.shape == (30, 6)
    assert (reads == labels[:, None]).float().mean() >= 0.9
    shuffled = torch.roll(videos, 1, dims=0)  # the same frames asked as other classes
    assert (classifier_script.read_videos(judge, shuffled) == labels[:, None]).float().mean() < 0.3


def test_markdown_table_and_result_file(classifier_script, tmp_path):
    table = classifier_script.markdown_table(["a", "b"], [[1, 0.12345], ["x", "y"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.123 |", "| x | y |"]
    path = classifier_script.write_result({"k": [1, 2]}, tmp_path / "new" / "r.json")
    assert path.read_text().strip().startswith("{") and '"k"' in path.read_text()


# ----------------------------------------------------------------------------------------------
# train_speed.py
# ----------------------------------------------------------------------------------------------


def test_time_interleaved_alternates_after_untimed_warmup():
    speed = load_script("train_speed")
    calls = []
    variants = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = speed.time_interleaved(variants, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert [len(times["a"]), len(times["b"])] == [3, 3]
    assert speed.median_seconds({"a": [3.0, 1.0, 2.0]}) == {"a": 2.0}
    with pytest.raises(ValueError, match="repeats"):
        speed.time_interleaved(variants, repeats=0)


def test_saved_activation_bytes_counts_what_autograd_keeps():
    speed = load_script("train_speed")
    linear = torch.nn.Linear(4, 8)
    x = torch.randn(5, 4)
    # addmm keeps its input x (weight and bias are parameters); relu keeps its output (5, 8)
    measured = speed.saved_activation_bytes(lambda: torch.relu(linear(x)).sum(), linear.parameters())
    assert measured == (5 * 4 + 5 * 8) * 4


def test_sprint_training_step_keeps_fewer_activations_and_costs_fewer_flops():
    speed = load_script("train_speed")
    dense, sprint = speed.build_pair(latent=8, hidden=32, depth=6, heads=2, encoder=1, decoder=1, num_classes=4)
    assert isinstance(sprint, Sprint) and not isinstance(dense, Sprint)
    for a, b in zip(dense.state_dict().values(), sprint.backbone.state_dict().values()):
        assert torch.equal(a, b)  # the same backbone weights
    x, labels = torch.randn(4, 4, 8, 8), torch.tensor([0, 1, 2, 3])
    steps = {"dense": speed.TrainingStep(dense, x, labels), "sprint": speed.TrainingStep(sprint, x, labels)}
    before = [p.clone() for p in sprint.parameters() if p.requires_grad]
    steps["sprint"]()
    assert any(not torch.equal(p0, p1) for p0, p1 in zip(before, [p for p in sprint.parameters() if p.requires_grad]))
    activations = {name: speed.saved_activation_bytes(step.loss, step.model.parameters()) for name, step in steps.items()}
    assert 0 < activations["sprint"] < activations["dense"]
    assert speed.flop_ratio(dense, sprint, x) > 1.5  # 4 of 6 blocks on a quarter of the tokens


def test_train_speed_row_reports_timings_and_checkpointed_memory():
    speed = load_script("train_speed")
    args = speed.parse_args(["--hidden", "32", "--depth", "6", "--heads", "2", "--repeats", "1", "--warmup", "0"])
    row = speed.measure_size(8, 2, args, torch.device("cpu"))
    assert row["tokens"] == 16 and row["dense_s"] > 0 and row["sprint_s"] > 0
    for name in ("dense", "sprint"):
        assert 0 < row[f"{name}_checkpointed_activation_bytes"] < row[f"{name}_activation_bytes"]


# ----------------------------------------------------------------------------------------------
# guidance_speed.py
# ----------------------------------------------------------------------------------------------


def test_pdg_flop_ratio_is_the_papers_for_sit_xl():
    guidance = load_script("guidance_speed")
    xl = TransformerShape(hidden=1152, depth=(2, 24, 2), mlp_hidden=4608, patch_dim=16)
    assert guidance.pdg_flop_ratio(xl, 256) == pytest.approx(0.574, abs=0.002)


def test_guidance_steps_run_the_middle_on_the_right_rows():
    guidance = load_script("guidance_speed")
    row = guidance.measure_model("tiny", (32, 4, 2, 1, 1), latent=8, batch=3, repeats=1, warmup=0,
                                 device=torch.device("cpu"))
    assert row["split"] == [1, 2, 1] and row["tokens"] == 16 and row["cfg_s"] > 0 and row["pdg_s"] > 0
    assert 0.5 < row["flop_ratio"] < 1
    speed = load_script("train_speed")
    _, model = speed.build_pair(8, 32, 4, 2, 1, 1)
    middle_rows = []
    model.middle_blocks[0].register_forward_hook(lambda module, args, out: middle_rows.append(out.shape[0]))
    x, labels = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3])
    for kind in guidance.KINDS:
        guidance.guidance_step(model.eval(), x, labels, kind)()
    assert middle_rows == [6, 3]  # CFG: conditional and null halves; PDG: the conditional half only


# ----------------------------------------------------------------------------------------------
# demo_accuracy.py and equal_wallclock.py
# ----------------------------------------------------------------------------------------------


def test_budget_schedule_gives_both_arms_the_same_time_every_round():
    wallclock = load_script("equal_wallclock")
    schedule = wallclock.budget_schedule(4.0, 4)
    assert [round(r["dense"], 9) for r in schedule] == [1.0, 2.0, 3.0, 4.0]
    for r in schedule:
        assert r["stage1"] + r["stage2"] == pytest.approx(r["dense"])
    assert schedule[-1]["stage1"] == pytest.approx(3.0) and schedule[-1]["stage2"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="rounds"):
        wallclock.budget_schedule(4.0, 0)


def test_guidance_settings_and_labels():
    demo = load_script("demo_accuracy")
    settings = demo.guidance_settings(["none", "cfg", "pdg"], [1.5, 2.0])
    assert [(g.kind, g.scale) for g in settings][1:] == [("cfg", 1.5), ("cfg", 2.0), ("pdg", 1.5), ("pdg", 2.0)]
    assert settings[0].kind == "none"
    assert demo.class_major_labels(3, 2).tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(FileNotFoundError):
        demo.load_run("/nonexistent/run")


def test_equal_wallclock_arms_train_and_are_judged_with_the_same_noise(tmp_path, judge):
    wallclock = load_script("equal_wallclock")
    demo = load_script("demo_accuracy")
    finals = wallclock.train_arms(tmp_path, minutes=0.004, rounds=2, extra=TINY)
    records = {name: wallclock.training_record(path) for name, path in
               [("dense", finals["dense"]), ("stage1", tmp_path / "sprint_stage1"), ("stage2", finals["sprint"])]}
    assert all(r["steps"] >= 1 for r in records.values())
    assert records["stage1"]["train_s"] + records["stage2"]["train_s"] >= 0.004 * 60
    dense, sprint = demo.load_run(finals["dense"]), demo.load_run(finals["sprint"])
    assert not isinstance(dense.model, Sprint) and isinstance(sprint.model, Sprint)
    # scale 1 switches guidance off: every kind must then give the very same samples, hence the same accuracy
    settings = demo.guidance_settings(["none", "cfg", "pdg"], [1.0])
    rows = demo.guided_accuracy(sprint, judge, settings, per_class=1, steps=2, progress=False)
    assert len({row["accuracy"] for row in rows}) == 1 and len(rows[0]["per_class"]) == 10
    assert rows[0]["accuracy"] == pytest.approx(sum(rows[0]["per_class"]) / 10)
    dense_rows = demo.guided_accuracy(dense, judge, settings[2:], per_class=1, steps=2, progress=False)
    assert "skipped" in dense_rows[0]


def test_load_run_rejects_a_run_with_no_checkpoint(tmp_path):
    demo = load_script("demo_accuracy")
    (tmp_path / "run").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        demo.load_run(tmp_path / "run")


def test_fault_drill_rows_report_what_happened_and_compare_weights(tmp_path):
    drill_script = load_script("fault_drill")
    drill = drill_script.Drill(tmp_path, steps=7, every=3)
    assert drill.train("reference").returncode == 0
    damaged = drill_script.damaged_row(drill, "model.safetensors", "truncated")
    assert damaged["what the program did"].startswith("found it damaged, fell back")
    assert damaged["exit status"] == "0" and damaged["work lost (steps)"] == 3
    assert damaged["weights identical after resume"] == "yes"
    # The comparison can fail: a run with another seed does not have the reference's weights.
    assert drill.train("other_seed", "Trainer.seed = 1").returncode == 0
    assert not drill.same_weights("other_seed", "reference")


# ----------------------------------------------------------------------------------------------
# gpu_suite.sh
# ----------------------------------------------------------------------------------------------


def test_gpu_suite_tiny_prints_one_table_of_training_and_sampling_steps(tmp_path):
    out = tmp_path / "suite.json"
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_suite.sh"), "--tiny", "--repeats", "1", "--warmup", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    table = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ")]
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
