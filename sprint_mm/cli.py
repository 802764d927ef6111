"""The command lines behind train.py and sample.py."""
from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from sprint_mm.checkpoints import atomic_write, load_strict
from sprint_mm.conditioning import check_labels
from sprint_mm.configs import ConfigError, parse_gin
from sprint_mm.errors import check_number, report_mistakes
from sprint_mm.media import pack_uint8, save_image_grid, save_npz, save_video, save_video_preview, unpack_uint8
from sprint_mm.preemption import EXIT_PREEMPTED, Preempted
from sprint_mm.runs import find_checkpoint, verify_checkpoint
from sprint_mm.sharded import read_weights
from sprint_mm.checkpointer import CheckpointWriteError, NonFiniteTraining
from sprint_mm.training import Trainer

DEMO_STAGES = ("gin/image/digits_stage1.gin", "gin/image/digits_stage2.gin")
DEMO_RUN = "runs/digits_demo"


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a diffusion transformer with SPRINT (no arguments: the digits demo).")
    parser.add_argument("--gin_file", action="append", default=[], help="a .gin file (repeatable, applied in order)")
    parser.add_argument("--gin_param", action="append", default=[], help="a gin binding, e.g. 'Trainer.max_steps = 10'")
    parser.add_argument("--run_dir", help="shorthand for --gin_param \"Trainer.run_dir = '...'\"")
    return parser


def run_training(gin_files: Sequence[str], gin_params: Sequence[str]) -> Path:
    parse_gin(gin_files, gin_params)
    return Trainer().run()


def report_training(work: Callable[..., object], *args: Any) -> int:
    """The exit status of a command that trains: 0 done, 2 a user's mistake (one `error:` line), 1 a fault that
    stopped the run (one `error:` line; the previous checkpoint is intact), EXIT_PREEMPTED after a stop signal."""
    try:
        return report_mistakes(work, *args)
    except Preempted as stop:
        print(f"[sprint_mm] {stop}", file=sys.stderr)
        return EXIT_PREEMPTED
    except (NonFiniteTraining, CheckpointWriteError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    args = train_parser().parse_args(argv)
    params = list(args.gin_param) + ([f"Trainer.run_dir = {args.run_dir!r}"] if args.run_dir else [])
    return report_training(train_or_demo, args.gin_file, params)


def train_or_demo(gin_files: Sequence[str], gin_params: Sequence[str]) -> None:
    """Train the configuration the files and bindings give; without files, run the digits demo."""
    if gin_files:
        run_training(gin_files, gin_params)
    elif gin_params:
        raise ConfigError("give --gin_file with --gin_param (no files means: run the digits demo)")
    else:
        run_demo()


def train_two_stages(
    stage_files: Sequence[str],
    run_root: str | Path,
    shared: Sequence[str] = (),
    per_stage: tuple[Sequence[str], Sequence[str]] = ((), ()),
) -> str:
    """Stage 1 into RUN_ROOT/stage1, then stage 2 into RUN_ROOT/stage2 from stage 1's EMA: the demos' two runs.

    `shared` bindings apply to both stages, `per_stage` to each; returns the stage-2 run folder.
    """
    stage1, stage2 = str(Path(run_root) / "stage1"), str(Path(run_root) / "stage2")
    run_training([stage_files[0]], [f"Trainer.run_dir = {stage1!r}", *per_stage[0], *shared])
    run_training([stage_files[1]], [f"Trainer.run_dir = {stage2!r}", f"Trainer.init_from = {stage1!r}",
                                    *per_stage[1], *shared])
    return stage2


def run_demo(run_root: str = DEMO_RUN) -> Path:
    """Stage 1 (0.75 structured drop), stage 2 (full tokens) from stage 1, then class-conditional PDG samples."""
    stage2 = train_two_stages(DEMO_STAGES, run_root)
    out = Path(run_root) / "samples_pdg.png"
    labels = [str(i % 10) for i in range(50)]
    sample_main(["--run", stage2, "--out", str(out), "--guidance", "pdg", "--labels", *labels])
    print(f"[sprint_mm] demo done: samples in {out} (rows of 0-9)")
    return out


def sample_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Sample from a trained run.")
    parser.add_argument("--run", "--run_dir", dest="run", required=True,
                        help="run folder (reads its config.gin and checkpoints); under torchrun spell it --run_dir")
    parser.add_argument("--step", type=int, help="checkpoint step (default: newest)")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema")
    parser.add_argument("--out", help=".png grid, .npz (ADM: arr_0 uint8 N,H,W,3), .mp4 / .gif for video runs")
    parser.add_argument("--labels", type=int, nargs="+", help="class ids (cycled to --num)")
    parser.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    parser.add_argument("--prompts", help="a file with one prompt per line")
    parser.add_argument("--num", "--num_samples", dest="num", type=int,
                        help="number of samples (default: one per label/prompt, or 16); under torchrun or accelerate "
                             "launch spell it --num_samples")
    parser.add_argument("--guidance", choices=("none", "cfg", "pdg"), default="pdg")
    parser.add_argument("--scale", type=float, default=1.5)
    parser.add_argument("--interval", type=float, nargs=2, metavar=("LOW", "HIGH"), default=(0.0, 1.0))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--solver", choices=("euler", "heun", "sde"), default="euler")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--frames", type=int, help="video runs: frames per sample in the model's input units (latent "
                                                   "frames for a latent run; default: as trained)")
    parser.add_argument("--size", type=int, nargs="+", metavar=("H", "W"),
                        help="spatial size in the model's input units (latent pixels for a latent run; default: as "
                             "trained); positions extend (RoPE / sin-cos), quality beyond the trained size is untested")
    parser.add_argument("--gin_param", action="append", default=[])
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each transformer block (one graph per token count; the first batch pays the "
                             "compilation)")
    return parser


def sample_requests(args: argparse.Namespace, kind: str, num_classes: Optional[int]) -> tuple[list, list]:
    """(labels, prompts) of length --num."""
    prompts = list(args.prompt)
    if args.prompts:
        if not Path(args.prompts).is_file():
            raise FileNotFoundError(f"--prompts file {args.prompts!r} does not exist")
        prompts += [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    if kind == "class":
        if prompts:
            raise ValueError("this run is class-conditional: pass --labels, not --prompt/--prompts")
        if args.labels:
            check_labels(torch.tensor(args.labels), num_classes, "--labels")
        labels = list(args.labels) if args.labels else list(range(num_classes or 1))
        num = args.num or (len(labels) if args.labels else 16)
        return [labels[i % len(labels)] for i in range(num)], []
    if args.labels:
        raise ValueError("this run is text-conditional: pass --prompt/--prompts, not --labels")
    if not prompts:
        raise ValueError("this run is text-conditional: give --prompt TEXT (repeatable) or --prompts FILE")
    num = args.num or len(prompts)
    return [], [prompts[i % len(prompts)] for i in range(num)]


def requested_sample_shape(model: torch.nn.Module, frames: Optional[int], size: Optional[Sequence[int]]) -> tuple[int, ...]:
    """The model's trained sample shape (C, [T,] H, W) with --frames / --size applied, checked against its patch."""
    shape = list(model.backbone.sample_shape)
    if frames is not None:
        if len(shape) != 4:
            raise ValueError(f"--frames {frames} needs a video run; this run samples images of shape {tuple(shape)}")
        if frames < 1:
            raise ValueError(f"--frames must be >= 1, got {frames}")
        shape[1] = frames
    if size is not None:
        if len(size) not in (1, 2) or min(size) < 1:
            raise ValueError(f"--size takes H or H W, positive, got {' '.join(map(str, size))}")
        shape[-2:] = [size[0], size[-1]]
    model.backbone.token_grid((1, *shape))  # a size the patch does not divide is refused here, naming the patch
    return tuple(shape)


def sample_main(argv: Optional[Sequence[str]] = None) -> int:
    return report_mistakes(write_samples, sample_parser().parse_args(argv))


def check_sample_counts(args: argparse.Namespace) -> None:
    """The counts of the command line, checked before anything loads: --num (when given), --batch_size, --steps."""
    for option in ("num", "batch_size", "steps"):
        value = getattr(args, option)
        if value is not None:
            check_number(f"--{option}", value, low=1, integer=True)


def write_samples(args: argparse.Namespace) -> Path:
    """Sample in shards of --batch_size: shard s gets noise seeded by (seed, s) and is written atomically, processes
    take shards round-robin, and a restarted command skips finished shards; the main process then packs the output."""
    from accelerate import Accelerator

    from sprint_mm.backbone import compile_blocks
    from sprint_mm.conditioning import build_conditioning, check_kind
    from sprint_mm.flow import trained_time_shift
    from sprint_mm.generation import generate
    from sprint_mm.latents import build_codec
    from sprint_mm.models import build_model
    from sprint_mm.sampling import Guidance

    check_sample_counts(args)
    run = Path(args.run)
    checkpoint = verify_checkpoint(find_checkpoint(run, args.step))
    config = run / "config.gin"
    if not config.is_file():
        raise FileNotFoundError(f"run folder {str(run)!r} has no config.gin")
    parse_gin([str(config)], args.gin_param)
    guidance = Guidance(args.guidance, args.scale, tuple(args.interval))
    time_shift = trained_time_shift()
    accelerator = Accelerator()
    device = accelerator.device
    model = build_model()
    load_strict(model, read_weights(checkpoint / f"{args.weights}.safetensors"), f"{checkpoint}/{args.weights}.safetensors")
    model.to(device).eval()
    if args.compile:
        compile_blocks(model)
    condition = model.backbone.condition
    labels, prompts = sample_requests(args, condition.kind, condition.num_classes)  # before a text encoder loads
    conditioning = build_conditioning()
    codec = build_codec().to(device)
    check_kind(model, conditioning.kind)
    total = len(labels or prompts)
    out = Path(args.out or run / "samples" / f"samples_{args.guidance}.png")
    trained_shape = tuple(model.backbone.sample_shape)
    check_output_suffix(out, is_video=len(trained_shape) == 4)
    shape = requested_sample_shape(model, args.frames, args.size)
    if shape != trained_shape:
        print(f"[sprint_mm] sampling at {shape}; its configured input_size gives {trained_shape}")
    shards = out.with_name(f".{out.name}.shards")
    settings = f"{checkpoint.name}/{args.weights} {args.guidance} {args.scale} {tuple(args.interval)} {args.solver} {args.steps} seed {args.seed} n {total} bs {args.batch_size} {args.gin_param} shape {shape}"
    if accelerator.is_main_process:
        prepare_shard_folder(shards, settings)
    accelerator.wait_for_everyone()
    count = math.ceil(total / args.batch_size)
    mine = [s for s in range(accelerator.process_index, count, accelerator.num_processes)
            if not (shards / f"{s:06d}.pt").is_file()]
    try:
        for s in tqdm(mine, desc="shards", disable=not accelerator.is_main_process or len(mine) < 2):
            rows = list(range(s * args.batch_size, min((s + 1) * args.batch_size, total)))
            noise = torch.randn((len(rows), *shape), generator=torch.Generator().manual_seed(args.seed * 1_000_003 + s))
            cond = conditioning.from_request([labels[i] for i in rows] if labels else None,
                                             [prompts[i] for i in rows] if prompts else None, device)
            samples = generate(model, cond, codec, noise.to(device), args.steps, args.solver, guidance,
                               batch_size=args.batch_size, generator=torch.Generator(device).manual_seed(args.seed * 1_000_003 + s),
                               time_shift=time_shift)
            packed = pack_uint8(samples)
            atomic_write(shards / f"{s:06d}.pt", lambda tmp: torch.save(packed, tmp))
    except BaseException:
        if accelerator.is_main_process:
            discard_if_empty(shards)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        packed = torch.cat([torch.load(shards / f"{s:06d}.pt", weights_only=True) for s in range(count)])
        write_output(packed, out)
        shutil.rmtree(shards)
        print(f"[sprint_mm] wrote {total} samples ({args.guidance}, scale {args.scale}, {args.solver} {args.steps} steps) to {out}")
    accelerator.wait_for_everyone()
    return out


def prepare_shard_folder(shards: Path, settings: str) -> None:
    """Keep the finished shards of an interrupted identical command; start over if the settings changed."""
    recorded = shards / "settings.txt"
    if shards.is_dir() and (not recorded.is_file() or recorded.read_text() != settings):
        shutil.rmtree(shards)
    shards.mkdir(parents=True, exist_ok=True)
    recorded.write_text(settings)


def discard_if_empty(shards: Path) -> None:
    """Remove the shard folder of a command that stopped before finishing a shard: it holds nothing to resume."""
    if shards.is_dir() and not any(shards.glob("*.pt")):
        shutil.rmtree(shards)


IMAGE_OUTPUTS = (".png", ".npz")
VIDEO_OUTPUTS = (".mp4", ".gif", ".png", ".npz")


def check_output_suffix(out: Path, is_video: bool) -> None:
    allowed = VIDEO_OUTPUTS if is_video else IMAGE_OUTPUTS
    if out.suffix.lower() not in allowed:
        kind = "video" if is_video else "image"
        raise ValueError(f"unknown output suffix {out.suffix!r} for {kind} samples; allowed: {', '.join(allowed)}")


def write_output(packed: torch.Tensor, out: Path) -> None:
    """Write packed uint8 samples (N, [T,] H, W, 3) with the writer the suffix names."""
    suffix = out.suffix.lower()
    is_video = packed.dim() == 5
    if suffix == ".npz":
        save_npz(packed, out)
        return
    samples = unpack_uint8(packed)
    if is_video and suffix == ".mp4":
        save_video(samples, out)
        save_video_preview(samples, out.with_suffix(".png"))
    elif is_video and suffix in (".png", ".gif"):
        save_video_preview(samples, out)
    else:
        save_image_grid(samples, out, nrow=10 if samples.shape[0] % 10 == 0 else None)
