"""Every user mistake in a configuration or a command line is one `error:` line naming the value, exit status 2, and
no traceback: train.py, sample.py, evaluate.py and convert_checkpoint.py, one table row per mistake."""
from __future__ import annotations

import pickle
import re
from collections import Counter
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import pytest
import torch

import convert_checkpoint
from sprint_mm.backbone import ConditionSpec
from sprint_mm.cli import sample_main, train_main
from sprint_mm.conditioning import ClassConditioning
from sprint_mm.errors import check_number
from sprint_mm.runs import list_checkpoints
from tests.helpers import script_module
from tests.test_text_e2e import STAGE1 as TEXT_STAGE1
from tests.test_text_e2e import TINY_IMAGES as TEXT_TINY
from tests.test_training import STAGE1, STAGE2, TINY

COMMANDS = {"train": train_main, "sample": sample_main,
            "evaluate": script_module("evaluate.py", "evaluate_command").main,
            "convert": convert_checkpoint.main}


def train(*bindings: str, gin_file: str = STAGE1, tiny: Sequence[str] = TINY) -> list[str]:
    """A tiny one-step training command with extra bindings; {tmp} is the test's own folder."""
    argv = ["--gin_file", gin_file, "--run_dir", "{tmp}/run"]
    for binding in (*tiny, "Trainer.max_steps = 1", *bindings):
        argv += ["--gin_param", binding]
    return argv


def sample(*options: str) -> list[str]:
    """A two-step sampling command on the tiny trained run {run}, writing into the test's folder."""
    return ["--run", "{run}", "--steps", "2", "--out", "{tmp}/samples.png", *options]


def evaluate(samples: str, *options: str) -> list[str]:
    return ["--samples", samples, "--metric", "fid", "--weights", "{files}/inception.pth", *options]


def convert(source: str, path: str, *options: str) -> list[str]:
    return ["--from", source, "--to", "ours", "--input", path, "--output", "{tmp}/out.safetensors", *options]


GOOD_REFERENCE = ("--reference", "{files}/good.npz")

# (command, argv, what the one stderr line must match); every row must exit with status 2.
MISTAKES = [
    # training: data against the model
    ("train", train("DigitsDataset.resolution = 12"),
     r"items have shape \(1, 12, 12\) but the model takes \(1, 8, 8\)"),
    ("train", train("sit.in_channels = 3"), r"items have shape \(1, 8, 8\) but the model takes \(3, 8, 8\)"),
    ("train", train("sit.num_classes = 9"),
     r"dataset has 10 classes but the model 9 .*\[0, 9\): set num_classes to at least 10$"),
    ("train", train("Trainer.dataset = None"), r"Trainer\.dataset is not bound"),
    # training: buckets (the digits are 8 x 8 images; TINY trains with patch 2 on 8 x 8)
    ("train", train("Trainer.buckets = @BucketTable()", "BucketTable.buckets = [(1, 9, 9, 8)]"),
     r"patch"),
    ("train", train("Trainer.buckets = @BucketTable()", "BucketTable.buckets = [(1, 8, 8, 8)]", "Trainer.grad_accum = 3"),
     r"batch_size 8 does not split over 1 process\(es\) x 3 accumulation step\(s\)"),
    ("train", train("Trainer.buckets = @BucketTable()", "BucketTable.buckets = [(1, 8, 8, 100000)]"),
     r"an epoch would have zero batches"),
    ("train", train("Trainer.buckets = @BucketTable()", "BucketTable.buckets = [(4, 8, 8, 8)]"),
     r"no item of the \d+ fits a bucket"),
    ("train", train("Trainer.buckets = @BucketTable()", "BucketTable.buckets = [(1, 8)]"), r"bucket"),
    ("train", train("Trainer.clock = 'gpu'"), r"unknown Trainer\.clock 'gpu'; allowed: wall, cpu"),
    ("train", train("FlowMatching.time_shift = @TimeShift()", "TimeShift.base_tokens = 0"),
     r"TimeShift\.base_tokens must be an integer >= 1, got 0"),
    ("train", train("Trainer.dataset = @ImageFolderDataset()"),
     r"ImageFolderDataset has no value for .*root: bind .*`ImageFolderDataset\.root = \.\.\.`"),
    ("train", train("DigitsDataset.resolution = 0"), r"resolution must be a positive int, got 0 \(in DigitsDataset\)"),
    ("train", train("DigitsDataset.split = 'val'"),
     r"unknown split 'val'; allowed: all, train, test \(in DigitsDataset\)"),
    ("train", train("DigitsDataset.channels = 2"), r"channels must be 1 or 3, got 2"),
    # training: the Trainer's numbers
    ("train", train("Trainer.checkpoint_every = 0"), r"Trainer\.checkpoint_every must be an integer >= 1, got 0$"),
    ("train", train("Trainer.log_every = 0"), r"Trainer\.log_every must be an integer >= 1, got 0$"),
    ("train", train("Trainer.lr = 'fast'"), r"Trainer\.lr must be a number >= 0, got 'fast'$"),
    ("train", train("Trainer.grad_accum = 0"), r"Trainer\.grad_accum must be an integer >= 1, got 0$"),
    ("train", train("Trainer.batch_size = 0"), r"Trainer\.batch_size must be an integer >= 1, got 0$"),
    ("train", train("Trainer.max_steps = 2.5"), r"Trainer\.max_steps must be an integer >= 1, got 2\.5$"),
    ("train", train("Trainer.ema_decay = 1.5"), r"Trainer\.ema_decay must be a number in \[0, 1\), got 1\.5$"),
    ("train", train("Trainer.warmup_steps = -5"), r"Trainer\.warmup_steps must be an integer >= 0, got -5$"),
    ("train", train("Trainer.keep_checkpoints = -1"), r"Trainer\.keep_checkpoints must be an integer >= 0, got -1$"),
    ("train", train("Trainer.time_budget_minutes = -1"),
     r"Trainer\.time_budget_minutes must be a number >= 0, got -1$"),
    ("train", train("Trainer.seed = 'abc'"), r"Trainer\.seed must be an integer, got 'abc'$"),
    ("train", train("Trainer.betas = (0.9,)"), r"Trainer\.betas must be a pair \(beta1, beta2\), got \(0\.9,\)"),
    ("train", train("Trainer.betas = (0.9, 1.0)"), r"Trainer\.betas must be a number in \[0, 1\), got 1\.0$"),
    ("train", train("Trainer.precision = 'fp8'"), r"unknown precision 'fp8'; allowed: no, fp16, bf16"),
    ("train", train("Trainer.batch_size = 8", "Trainer.grad_accum = 3"),
     r"batch_size 8 must be divisible by processes \(1\) x grad_accum \(3\)"),
    ("train", train("Trainer.init_from = '{tmp}/no_stage1'"), r"'[^']*no_stage1' is neither a run folder"),
    ("train", train("sit.hidden_size = 64", "Trainer.init_from = '{run}'", gin_file=STAGE2),
     r"init_from weights .* does not fit the model: shape mismatches \(\d+\): backbone\.\S+: checkpoint \(.*\) vs model"),
    # gin files and bindings
    ("train", ["--gin_file", "gin/image/digits_stage9.gin"],
     r"gin file 'gin/image/digits_stage9\.gin' not found\. Did you mean .*digits_stage1\.gin"),
    ("train", train("Trainer.max_steps = = 3"),
     r"bad gin configuration: Unable to parse value in the binding: `Trainer\.max_steps = = 3`\.$"),
    ("train", train("Trainr.max_steps = 3"), r"Trainr.*Close configurable names: Trainer"),
    ("train", train("Trainer.max_step = 3"), r"max_step.*Close parameter names of Trainer: max_steps"),
    ("train", ["--gin_param", "Trainer.max_steps = 3"], r"give --gin-file \(a configured run starts from at least one"),
    # the model
    ("train", train("build_model.backbone = 'vit'"), r"^error: unknown backbone 'vit'.*Known: .*sit"),
    ("train", train("sit.num_heads = 3"), r"hidden size 32 is not divisible by 3 heads \(in sit\)"),
    ("train", train("sit.num_heads = 0"), r"num_heads must be an integer >= 1, got 0 \(in sit\)"),
    ("train", train("sit.size = 'XXL'"), r"unknown size preset 'XXL'; allowed: S, B, L, XL"),
    ("train", train("sit.position = 'learned'"), r"unknown position 'learned'; allowed: rope, absolute \(in sit\)$"),
    ("train", train("sit.attention = 'sparse'"), r"unknown attention 'sparse'; allowed: full, factorised"),
    ("train", train("sit.rope_axes = 'radial'"), r"rope_axes must be one of 'wan', 'spatial' .* got 'radial'"),
    ("train", train("sit.rope_axes = (2, 4, 4)"),
     r"RoPE axis channel split \(2, 4, 4\) must be .* summing to the head dim 16"),
    ("train", train("sit.qk_norm = 'batchnorm'"),
     r"unknown qk_norm 'batchnorm'; allowed: rmsnorm, layernorm, none \(in sit\)"),
    ("train", train("sit.mlp = 'relu'"), r"unknown mlp 'relu'; allowed: gelu, swiglu"),
    ("train", train("sit.attention_backend = 'flash'"), r"unknown attention backend 'flash'; allowed: sdpa, xformers"),
    ("train", train("sit.patch_size = 3"), r"input size \(8, 8\) is not divisible by the patch size \(3, 3\)"),
    ("train", train("Sprint.encoder_depth = 2", "Sprint.decoder_depth = 2"),
     r"encoder_depth 2 \+ decoder_depth 2 must leave at least one middle block of the backbone's 4 blocks"),
    ("train", train("Sprint.fusion = 'add'"), r"unknown fusion 'add'; allowed: concat_linear, none"),
    ("train", train("build_model.sprint = False"),
     r"the objective drops tokens or paths but the model is a dense backbone"),
    # the objective and the mask
    ("train", train("TokenMasker.ratio = 0.3"), r"drop ratio 0\.3 is not 1 - k/\|g\| for any group"),
    ("train", train("TokenMasker.ratio = 1.0"), r"drop ratio 1\.0 must lie in \[0, 1\)"),
    ("train", train("TokenMasker.kind = 'checkerboard'"),
     r"mask kind 'checkerboard' is unknown; choose one of random, structured, tube"),
    ("train", train("TokenMasker.group = (1, 2, 2)", "TokenMasker.keep = 2"),
     r"group 1x2x2 keep 2 drops 0\.5, not the drop ratio 0\.75"),
    ("train", train("FlowMatching.path = 'quadratic'"), r"unknown path 'quadratic'; allowed: linear, cosine"),
    ("train", train("FlowMatching.label_dropout = 1.5"), r"label_dropout must be a probability in \[0, 1\], got 1\.5"),
    ("train", train("build_conditioning.kind = 'audio'"), r"unknown conditioning 'audio'; allowed: class, text"),
    # sampling
    ("sample", sample("--labels", "3", "10"), r"--labels 10 is outside \[0, 10\): .*id 10 is the null class"),
    ("sample", sample("--labels", "-1"), r"--labels -1 is outside \[0, 10\)"),
    ("sample", sample("--num", "0"), r"--num must be an integer >= 1, got 0$"),
    ("sample", sample("--num", "-3"), r"--num must be an integer >= 1, got -3$"),
    ("sample", sample("--batch_size", "0"), r"--batch-size must be an integer >= 1, got 0$"),
    ("sample", sample("--batch-size", "-2"), r"--batch-size must be an integer >= 1, got -2$"),
    ("sample", sample("--steps", "0"), r"--steps must be an integer >= 1, got 0$"),
    ("sample", sample("--scale", "-1"), r"guidance scale must be a number >= 0, got -1\.0$"),
    ("sample", sample("--interval", "0.5", "1.5"), r"0 <= low <= high <= 1, got \(0\.5, 1\.5\)"),
    ("sample", sample("--interval", "0.8", "0.2"), r"0 <= low <= high <= 1, got \(0\.8, 0\.2\)"),
    ("sample", sample("--middle-keep", "0"), r"middle keep must be > 0 \(the fraction of tokens the middle blocks see\)"),
    ("sample", sample("--middle-keep", "0.3"), r"drop ratio 0\.7 is not 1 - k/\|g\| for any group"),
    ("sample", sample("--middle-keep-above", "2"), r"middle keep threshold .* must be a number in \[0, 1\], got 2\.0"),
    ("sample", sample("--guidance", "sparse", "--sparse-keep", "1.5"), r"sparse guidance keep must be a number in \[0, 1\]"),
    ("sample", sample("--frames", "4"), r"--frames 4 needs a video run"),
    ("sample", sample("--size", "10"), r"\(10, 10\) is not divisible by the patch size \(4, 4\)"),
    ("sample", sample("--size", "8", "8", "8"), r"--size takes H or H W, positive, got 8 8 8"),
    ("sample", sample("--prompt", "a seven"), r"this run is class-conditional: pass --labels"),
    ("sample", sample("--prompts", "{tmp}/absent.txt"), r"--prompts file '[^']*absent\.txt' does not exist"),
    ("sample", sample("--step", "99"), r"has no checkpoint at step 99; available: \[2\]"),
    ("sample", ["--run", "{tmp}/absent_run"], r"run folder '[^']*absent_run' does not exist"),
    ("sample", ["--run", "{run}", "--out", "{tmp}/samples.jpg"],
     r"unknown output suffix '\.jpg' for image samples; allowed: \.png, \.npz"),
    ("sample", sample("--gin_param", "build_codec.kind = 'vae'"),
     r"VAECodec has no value for path: bind `VAECodec\.path = \.\.\.`$"),
    ("sample", sample("--gin_param", "build_codec.kind = 'vae'", "--gin_param", "VAECodec.path = '{tmp}/vae'"),
     r"no diffusers AutoencoderKL at '[^']*vae'"),
    ("sample", sample("--gin_param", "sit.hidden_size = 64"), r"does not fit the model: shape mismatches"),
    ("sample", sample("--gin_param", "sit.hiden_size = 64"), r"hiden_size.*Close parameter names of sit: hidden_size"),
    ("sample", ["--run", "{text_run}", "--labels", "3", "--out", "{tmp}/t.png"],
     r"this run is text-conditional: pass --prompt/--prompts, not --labels$"),
    ("sample", ["--run", "{text_run}", "--out", "{tmp}/t.png"], r"this run is text-conditional: give --prompt TEXT"),
    ("sample", ["--run", "{text_run}", "--prompts", "{files}/latin1.txt", "--out", "{tmp}/t.png"],
     r"--prompts file '[^']*latin1\.txt' is not UTF-8 text \(byte 5: invalid continuation byte\)"),
    ("sample", ["--run", "{text_run}", "--prompts", "{files}/blank.txt", "--out", "{tmp}/t.png"],
     r"--prompts file '[^']*blank\.txt' is empty: it needs one prompt per line$"),
    ("sample", sample("--size", "4096"),
     r"shape \(1, 4096, 4096\) gives 1048576 tokens per sample, 262144x the 4 the model trained on; about \d+\.\d "
     r"GiB of activations .*: pass --force"),
    # evaluate.py
    ("evaluate", evaluate("{files}/channels_first.npz", *GOOD_REFERENCE),
     r"shape \(2, 3, 8, 8\) is neither images \(N, H, W, 3\) nor videos"),
    ("evaluate", evaluate("{files}/float.npz", *GOOD_REFERENCE), r"dtype float32; samples must be uint8 RGB"),
    ("evaluate", evaluate("{files}/images_key.npz", *GOOD_REFERENCE),
     r"^error: \S+ has keys \['images'\]; samples must be stored under 'arr_0'"),
    ("evaluate", evaluate("{files}/absent.npz", *GOOD_REFERENCE), r"samples not found: \S*absent\.npz"),
    ("evaluate", evaluate("{files}/good.npz", "--reference", "{files}/absent_ref.npz"),
     r"--reference '[^']*absent_ref\.npz' does not exist"),
    ("evaluate", evaluate("{files}/good.npz", *GOOD_REFERENCE), r"weights not found: \S*inception\.pth"),
    ("evaluate", evaluate("{files}/good.npz", *GOOD_REFERENCE, "--batch-size", "0"),
     r"--batch-size must be an integer >= 1, got 0$"),
    ("evaluate", evaluate("{files}/good.npz", "--write-reference", "{tmp}/stats.txt"),
     r"statistics are written to an \.npz file"),
    ("evaluate", evaluate("{files}/good.npz", *GOOD_REFERENCE, "--weights", "{files}"),
     r"--weights \S+ is a folder, but Inception .* loads a state dict file"),
    ("evaluate", evaluate("{files}/good.npz", "--reference", "{files}/nan_stats.npz"),
     r"statistics file \S*nan_stats\.npz: mu and sigma hold 1 NaN or infinite value"),
    # convert_checkpoint.py
    ("convert", convert("sit", "{files}/absent.pt"), r"checkpoint file '[^']*absent\.pt' does not exist$"),
    ("convert", convert("sit", "{checkpoint}/ema.safetensors"),
     r"^error: '[^']*ema\.safetensors' has no Conv2d patch embed .* not a sit checkpoint"),
    ("convert", convert("ours", "{checkpoint}/ema.safetensors", "--entry", "ema"),
     r"has no entry 'ema'; its top-level keys"),
    ("convert", convert("sit", "{files}/objects.pt"),
     r"'[^']*objects\.pt' cannot be read as a torch \(weights only: .*\) file \(UnpicklingError: .*\): it is damaged"),
    ("convert", convert("sit", "{files}/random.pt"), r"'[^']*random\.pt' cannot be read as a torch"),
    ("convert", convert("ours", "{files}/truncated.safetensors"),
     r"'[^']*truncated\.safetensors' cannot be read as a safetensors file \(SafetensorError: "),
    ("convert", convert("ours", "{files}/sharded"),
     r"is a sharded checkpoint folder \(FSDP\): write its full weights first with `python consolidate_checkpoint\.py"),
    ("convert", convert("ours", "{checkpoint}"), r"is a checkpoint folder: give one of its files, e\.g\. '[^']*ema"),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    """The tiny trained runs (an image run of 2 steps, a text run of 1) and the sample files the rows name, made once
    for the module."""
    root = tmp_path_factory.mktemp("mistakes")
    assert train_main([arg.format(tmp=root) for arg in train("Trainer.max_steps = 2")]) == 0
    run = root / "run"
    text_root = root / "text"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        text = train(f"TextConditioner.cache_dir = '{text_root}/cache'", gin_file=TEXT_STAGE1, tiny=TEXT_TINY)
        assert train_main([arg.format(tmp=text_root) for arg in text]) == 0
    files = root / "files"
    files.mkdir()
    np.savez(files / "good.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    np.savez(files / "channels_first.npz", arr_0=np.zeros((2, 3, 8, 8), np.uint8))
    np.savez(files / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    np.savez(files / "images_key.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    sigma = np.eye(4)
    sigma[0, 1] = np.nan
    np.savez(files / "nan_stats.npz", mu=np.zeros(4), sigma=sigma)
    (files / "latin1.txt").write_bytes("a caf\u00e9 on a chair\n".encode("latin-1"))
    (files / "blank.txt").write_text("\n   \n")
    with open(files / "objects.pt", "wb") as file:
        pickle.dump({"weight": Counter(a=1)}, file)  # a pickle of other objects than tensors
    (files / "random.pt").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    good = (list_checkpoints(run)[-1] / "ema.safetensors").read_bytes()
    (files / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (files / "sharded").mkdir()
    (files / "sharded" / ".metadata").write_bytes(b"")
    (files / "sharded" / "__0_0.distcp").write_bytes(b"")
    return {"run": str(run), "checkpoint": str(list_checkpoints(run)[-1]), "files": str(files),
            "text_run": str(text_root / "run")}


@pytest.mark.parametrize("command, argv, expected", MISTAKES, ids=[f"{c}: {' '.join(a[-2:])}" for c, a, _ in MISTAKES])
def test_a_mistake_is_one_clear_line_and_exit_status_2(command, argv, expected, places, tmp_path, capsys):
    names = {**places, "tmp": str(tmp_path)}
    code = COMMANDS[command]([arg.format(**names) for arg in argv])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    assert re.search(expected, lines[0]), lines[0]
    assert not list(tmp_path.glob(".*.shards"))  # a failed sampling command leaves no shard folder behind


def test_sampling_that_fails_at_its_first_shard_leaves_no_shard_folder(places, tmp_path, capsys, monkeypatch):
    import sprint_mm.generation as generation

    def failing(*args, **kwargs):
        raise ValueError("the model refused the batch")

    monkeypatch.setattr(generation, "generate", failing)
    assert sample_main(["--run", places["run"], "--steps", "2", "--out", str(tmp_path / "s.png")]) == 2
    assert capsys.readouterr().err == "error: the model refused the batch\n"
    assert not (tmp_path / ".s.png.shards").exists()


def test_a_label_beyond_the_model_classes_stops_training_at_its_batch():
    conditioning = ClassConditioning()
    conditioning.prepare(SimpleNamespace(backbone=SimpleNamespace(condition=ConditionSpec("class", num_classes=9))))
    assert conditioning.from_batch({"label": torch.tensor([0, 8])}, torch.device("cpu")).tolist() == [0, 8]
    with pytest.raises(ValueError, match=r"dataset label 9 is outside \[0, 9\)"):
        conditioning.from_batch({"label": torch.tensor([3, 9])}, torch.device("cpu"))


@pytest.mark.parametrize("value, bounds, allowed", [
    (True, {"integer": True}, "an integer"), (2.0, {"integer": True}, "an integer"), ("3", {}, "a number"),
    (float("nan"), {"low": 0}, "a number >= 0"), (1, {"low": 0, "high": 1, "below_high": True}, "a number in [0, 1)"),
    (0.5, {"high": 0}, "a number <= 0"),
])
def test_check_number_says_what_is_allowed(value, bounds, allowed):
    with pytest.raises(ValueError, match=re.escape(f"x must be {allowed}, got {value!r}")):
        check_number("x", value, **bounds)


def test_check_number_accepts_the_bounds():
    check_number("x", 0, low=0, high=1)
    check_number("x", 1.0, low=0, high=1)
    check_number("x", 5, integer=True)


def test_ctrl_c_while_sampling_is_one_line_and_keeps_the_finished_shards(places, tmp_path, capsys, monkeypatch):
    import sprint_mm.cli as cli

    real, calls = cli.sample_shard, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "sample_shard", interrupted)
    out = tmp_path / "s.png"
    argv = ["--run", places["run"], "--steps", "2", "--num", "4", "--batch-size", "2", "--out", str(out)]
    assert sample_main(argv) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("interrupted: the shards finished so far are kept")
    assert "Traceback" not in err and len(list((tmp_path / ".s.png.shards").glob("*.pt"))) == 1
    monkeypatch.setattr(cli, "sample_shard", real)
    assert sample_main(argv) == 0 and out.is_file()


def test_a_size_far_beyond_training_samples_with_force_and_says_its_memory(places, tmp_path, capsys):
    argv = ["--run", places["run"], "--steps", "1", "--num", "1", "--size", "64", "--out", str(tmp_path / "big.png")]
    assert sample_main(argv) == 2
    assert "256 tokens per sample, 64x the 4 the model trained on" in capsys.readouterr().err  # patch 4 on 8 px
    assert sample_main([*argv, "--force"]) == 0
    assert "--force: sampling 256 tokens per sample, 64x the 4 the model trained on; about" in capsys.readouterr().out
    assert sample_main([*argv[:-4], "--size", "32", *argv[-2:]]) == 0  # 16x the tokens: no --force needed


def test_a_prompt_longer_than_the_text_encoder_reads_is_cut_with_a_note(places, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    long = "a handwritten seven " + "drawn with a thick black pen on white paper " * 12
    argv = ["--run", places["text_run"], "--prompt", long, "--prompt", "a seven", "--steps", "1",
            "--out", str(tmp_path / "t.png")]
    assert sample_main(argv) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "note:" in line]
    assert len(notes) == 1 and "tokens long; the text encoder reads the first" in notes[0]
    assert "the prompt 'a handwritten seven drawn with a thick black pen on white...' is" in notes[0]


def test_a_crafted_pickle_given_to_convert_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "marker"

    class Crafted:
        def __reduce__(self):
            return (eval, (f"open({str(marker)!r}, 'w').close()",))

    path = tmp_path / "crafted.pt"
    torch.save({"weight": Crafted()}, path)
    assert convert_checkpoint.main(["--from", "sit", "--to", "ours", "--input", str(path), "--output",
                                    str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert not marker.exists() and err.count("\n") == 1
    assert err.startswith(f"error: checkpoint file {str(path)!r} cannot be read as a torch (weights only")
    assert "Unsupported global" in err
