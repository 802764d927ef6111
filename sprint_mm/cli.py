"""The command lines behind train.py (a configured run) and sample.py, and the two pieces the demos share with them:
`run_training` (parse gin, train) and `report_training` (a training command's exit status).

Flags are spelled in kebab-case (`--gin-file`); the snake_case spellings of earlier versions (`--gin_file`) stay
accepted as aliases.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from sprint_mm.checkpoints import atomic_write
from sprint_mm.conditioning import check_labels
from sprint_mm.configs import ConfigError, parse_gin
from sprint_mm.errors import check_number, report_mistakes
from sprint_mm.media import pack_uint8, save_image_grid, save_npz, save_video, save_video_preview, unpack_uint8
from sprint_mm.preemption import EXIT_PREEMPTED, Preempted
from sprint_mm.checkpointer import CheckpointWriteError, NonFiniteTraining
from sprint_mm.density import MiddleDensity
from sprint_mm.sampling import GUIDANCES, SOLVERS, Guidance
from sprint_mm.sharded import WEIGHTS
from sprint_mm.trained import TrainedRun, load_run
from sprint_mm.training import Trainer


def add_gin_param_option(parser: argparse.ArgumentParser,
                         help_text: str = "a gin binding (repeatable, applied in order)") -> None:
    """`--gin-param` (alias `--gin_param`): the one spelling of a binding on every command line."""
    parser.add_argument("--gin-param", "--gin_param", action="append", default=[], help=help_text)


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a diffusion transformer with SPRINT from gin files "
                                                 "(`python train.py` with no arguments runs the digits demo).")
    parser.add_argument("--gin-file", "--gin_file", action="append", default=[],
                        help="a .gin file (repeatable, applied in order)")
    add_gin_param_option(parser, "a gin binding, e.g. 'Trainer.max_steps = 10' (repeatable, applied after the files)")
    parser.add_argument("--run-dir", "--run_dir", help="shorthand for --gin-param \"Trainer.run_dir = '...'\"")
    return parser


def run_training(gin_files: Sequence[str], gin_params: Sequence[str]) -> Path:
    """Parse the files, then the bindings, and train; returns the run folder."""
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
    """A configured run: the gin files and bindings of the command line."""
    args = train_parser().parse_args(argv)
    params = list(args.gin_param) + ([f"Trainer.run_dir = {args.run_dir!r}"] if args.run_dir else [])
    return report_training(train_configured, args.gin_file, params)


def train_configured(gin_files: Sequence[str], gin_params: Sequence[str]) -> Path:
    if not gin_files:
        raise ConfigError("give --gin-file (a configured run starts from at least one .gin file; `python train.py` "
                          "with no arguments runs the digits demo)")
    return run_training(gin_files, gin_params)


def sample_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Sample from a trained run.")
    parser.add_argument("--run", "--run-dir", "--run_dir", dest="run", required=True,
                        help="run folder (reads its config.gin and checkpoints); under torchrun spell it --run-dir")
    parser.add_argument("--step", type=int, help="checkpoint step (default: newest)")
    parser.add_argument("--weights", choices=WEIGHTS, default="ema")
    parser.add_argument("--out", help=".png grid, .npz (ADM: arr_0 uint8 N,H,W,3), .mp4 / .gif for video runs")
    parser.add_argument("--labels", type=int, nargs="+", help="class ids (cycled to --num)")
    parser.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    parser.add_argument("--prompts", help="a file with one prompt per line")
    parser.add_argument("--num", "--num-samples", "--num_samples", dest="num", type=int,
                        help="number of samples (default: one per label/prompt, or 16); under torchrun or accelerate "
                             "launch spell it --num-samples")
    parser.add_argument("--guidance", choices=GUIDANCES, default="pdg")
    parser.add_argument("--scale", type=float, default=1.5)
    parser.add_argument("--interval", type=float, nargs=2, metavar=("LOW", "HIGH"), default=(0.0, 1.0))
    parser.add_argument("--sparse-keep", type=float, default=0.25,
                        help="--guidance sparse: the fraction of the strong branch's middle tokens its weak branch's "
                             "middle sees")
    parser.add_argument("--middle-keep", type=float, default=1.0, metavar="R",
                        help="SPRINT runs: the middle blocks see a structured fraction R of the tokens while t > "
                             "--middle-keep-above (t = 1 is noise), all below; 1 (default): every token at every step")
    parser.add_argument("--middle-keep-above", type=float, default=0.5, metavar="T",
                        help="the time above which --middle-keep applies")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--solver", choices=SOLVERS, default="euler")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", "--batch_size", type=int, default=64)
    parser.add_argument("--frames", type=int, help="video runs: frames per sample in the model's input units (latent "
                                                   "frames for a latent run; default: as trained)")
    parser.add_argument("--size", type=int, nargs="+", metavar=("H", "W"),
                        help="spatial size in the model's input units (latent pixels for a latent run; default: as "
                             "trained); positions extend (RoPE / sin-cos), quality beyond the trained size is untested")
    add_gin_param_option(parser, "a gin binding applied after the run's config.gin (repeatable)")
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
    """The counts of the command line, checked before anything loads: --num (when given), --batch-size, --steps."""
    for option in ("num", "batch_size", "steps"):
        value = getattr(args, option)
        if value is not None:
            check_number(f"--{option.replace('_', '-')}", value, low=1, integer=True)


def write_samples(args: argparse.Namespace) -> Path:
    """Sample in shards of --batch-size: shard s gets noise seeded by (seed, s) and is written atomically, processes
    take shards round-robin, and a restarted command skips finished shards; the main process then packs the output.
    The run's own path and time shift (`TrainedRun.sampling`) drive the sampler."""
    from accelerate import Accelerator

    from sprint_mm.backbone import compile_blocks

    check_sample_counts(args)
    guidance = Guidance(args.guidance, args.scale, tuple(args.interval), args.sparse_keep)
    density = MiddleDensity(args.middle_keep, args.middle_keep_above)
    accelerator = Accelerator()

    def requests(model: torch.nn.Module) -> tuple[list, list]:  # checked before a text encoder or a VAE loads
        return sample_requests(args, model.backbone.condition.kind, model.backbone.condition.num_classes)

    run = load_run(args.run, args.step, args.weights, args.gin_param, check=requests).to(accelerator.device)
    labels, prompts = requests(run.model)
    if args.compile:
        compile_blocks(run.model)
    out = Path(args.out or Path(args.run) / "samples" / f"samples_{args.guidance}.png")
    shape = sample_shape(run, args, out)
    total = len(labels or prompts)
    shards = out.with_name(f".{out.name}.shards")
    flops = run.sampling_flops(shape, args.steps, args.solver, guidance, density)  # checks the keeps on the grid
    settings = (f"{run.checkpoint.name}/{args.weights} {args.guidance} {args.scale} {tuple(args.interval)} "
                f"{args.solver} {args.steps} seed {args.seed} n {total} bs {args.batch_size} {args.gin_param} "
                f"shape {shape}" + sparse_settings(guidance, density))
    if accelerator.is_main_process:
        prepare_shard_folder(shards, settings)
    accelerator.wait_for_everyone()
    count = math.ceil(total / args.batch_size)
    mine = [s for s in range(accelerator.process_index, count, accelerator.num_processes)
            if not (shards / f"{s:06d}.pt").is_file()]
    try:
        for s in tqdm(mine, desc="shards", disable=not accelerator.is_main_process or len(mine) < 2):
            rows = range(s * args.batch_size, min((s + 1) * args.batch_size, total))
            cond = run.conditioning.from_request([labels[i] for i in rows] if labels else None,
                                                 [prompts[i] for i in rows] if prompts else None, accelerator.device)
            packed = pack_uint8(sample_shard(run, args, guidance, density, cond, (len(rows), *shape), s))
            atomic_write(shards / f"{s:06d}.pt", lambda tmp: torch.save(packed, tmp))
    except BaseException:
        if accelerator.is_main_process:
            discard_if_empty(shards)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_output(torch.cat([torch.load(shards / f"{s:06d}.pt", weights_only=True) for s in range(count)]), out)
        shutil.rmtree(shards)
        print(f"[sprint_mm] wrote {total} samples ({args.guidance}, scale {args.scale}, {args.solver} {args.steps} "
              f"steps{sparse_settings(guidance, density)}; {flops / 1e9:.4g} GFLOPs per sample) to {out}")
    accelerator.wait_for_everyone()
    return out


def sample_shape(run: TrainedRun, args: argparse.Namespace, out: Path) -> tuple[int, ...]:
    """The shape of one sample, --frames / --size applied, after checking that `out` suits the run's kind of data."""
    trained = tuple(run.model.backbone.sample_shape)
    check_output_suffix(out, is_video=len(trained) == 4)
    shape = requested_sample_shape(run.model, args.frames, args.size)
    if shape != trained:
        print(f"[sprint_mm] sampling at {shape}; its configured input_size gives {trained}")
    return shape


def sparse_settings(guidance: Guidance, density: MiddleDensity) -> str:
    """The middle keep (and sparse guidance's keep) in words; empty for the dense sampler."""
    words = f", middle keep {density.keep:g} above t = {density.above:g}" if density.keep < 1 else ""
    return words + (f", sparse keep {guidance.sparse_keep:g}" if guidance.kind == "sparse" else "")


def sample_shard(run: TrainedRun, args: argparse.Namespace, guidance: Guidance, density: MiddleDensity, cond: Any,
                 shape: Sequence[int], shard: int) -> torch.Tensor:
    """The decoded samples of shard `shard`: noise and sampler randomness seeded by (--seed, shard)."""
    seed = args.seed * 1_000_003 + shard
    device = next(run.model.parameters()).device
    noise = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))
    return run.generate(cond, noise.to(device), args.steps, args.solver, guidance, batch_size=args.batch_size,
                        generator=torch.Generator(device).manual_seed(seed), density=density)


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
