"""The command lines behind train.py (a configured run), sample.py, merge_lora.py and datasets/write_shards.py, and
the two pieces the demos share with them: `run_training` (parse gin, train) and `report_training` (a training
command's exit status).

Flags are spelled in kebab-case (`--gin-file`); the snake_case spellings of earlier versions (`--gin_file`) stay
accepted as aliases.
"""
from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import gin
import torch
from tqdm.auto import tqdm

from sprint_mm.checkpoints import atomic_write, load_strict, save_state_dict
from sprint_mm.conditioning import check_labels
from sprint_mm.data.shard_writer import FLOAT_DTYPES, WriteReport, items_per_shard_for, write_shards
from sprint_mm.configs import ConfigError, parse_gin
from sprint_mm.errors import check_number, check_writable_folder, final_line, report_mistakes
from sprint_mm.locks import lock_for_all
from sprint_mm.lora import adapted_layers, lora_of, merge_adapters
from sprint_mm.media import pack_uint8, save_image_grid, save_npz, save_video, save_video_preview, unpack_uint8
from sprint_mm.models import build_model
from sprint_mm.parallelize import set_threads
from sprint_mm.preemption import EXIT_PREEMPTED, Preempted
from sprint_mm.checkpointer import CheckpointWriteError, NonFiniteTraining
from sprint_mm.density import MiddleDensity
from sprint_mm.parallelize import ProcessLayout, process_layout, spread_model
from sprint_mm.sampling import GUIDANCES, SOLVERS, Guidance
from sprint_mm.sequence_split import choose
from sprint_mm.sharded import WEIGHTS
from sprint_mm.trained import TrainedRun, load_run
from sprint_mm.training import Trainer

FORCE_TOKENS = 16  # sample shapes beyond this many times the trained tokens per sample need --force
SAMPLES_KEPT = ("the shards finished so far are kept (in a hidden folder beside --out); the same command continues "
                "from them")

DEFAULT_SHARD_SIZE = "256M"


def add_gin_param_option(parser: argparse.ArgumentParser,
                         help_text: str = "a gin binding (repeatable, applied in order)") -> None:
    """`--gin-param` (alias `--gin_param`): the one spelling of a binding on every command line."""
    parser.add_argument("--gin-param", "--gin_param", action="append", default=[], help=help_text)


def add_import_option(parser: argparse.ArgumentParser) -> None:
    """`--import MODULE`: a module the run's config.gin may import (a backbone of your own), imported first."""
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="a module of your own that the run's config.gin imports (e.g. your backbones; on the "
                             "Python path): trusted and imported (repeatable). A run's config.gin may import only "
                             "sprint_mm's modules, installed backbone plugins and these")


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a diffusion transformer with SPRINT from gin files "
                                                 "(`python train.py` with no arguments runs the digits demo).")
    parser.add_argument("--gin-file", "--gin_file", action="append", default=[],
                        help="a .gin file (repeatable, applied in order)")
    add_gin_param_option(parser, "a gin binding, e.g. 'Trainer.max_steps = 10' (repeatable, applied after the files)")
    parser.add_argument("--run-dir", "--run_dir", help="shorthand for --gin-param \"Trainer.run_dir = '...'\"")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume a run with bindings that differ from its config.gin beyond the step budget, "
                             "logging and checkpoint cadence (the earlier config.gin is kept in config_history/)")
    return parser


def run_training(gin_files: Sequence[str], gin_params: Sequence[str], allow_config_change: bool = False) -> Path:
    """Parse the files, then the bindings, and train; returns the run folder. A resume that changes the run's
    configuration beyond `run_config.FREE_ON_RESUME` is refused unless `allow_config_change`."""
    parse_gin(gin_files, gin_params)
    return Trainer().run(allow_config_change)


def report_training(work: Callable[..., object], *args: Any) -> int:
    """The exit status of a command that trains: 0 done, 2 a user's mistake (one `error:` line), 1 a fault that
    stopped the run (one `error:` line; the previous checkpoint is intact), EXIT_PREEMPTED after a stop signal."""
    try:
        return report_mistakes(work, *args)
    except Preempted as stop:
        final_line(f"[sprint_mm] {stop}")
        return EXIT_PREEMPTED
    except (NonFiniteTraining, CheckpointWriteError) as err:
        final_line(f"error: {err}")
        return 1


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """A configured run: the gin files and bindings of the command line."""
    args = train_parser().parse_args(argv)
    params = list(args.gin_param) + ([f"Trainer.run_dir = {args.run_dir!r}"] if args.run_dir is not None else [])
    return report_training(train_configured, args.gin_file, params, args.allow_config_change)


def train_configured(gin_files: Sequence[str], gin_params: Sequence[str], allow_config_change: bool = False) -> Path:
    if not gin_files:
        raise ConfigError("give --gin-file (a configured run starts from at least one .gin file; `python train.py` "
                          "with no arguments runs the digits demo)")
    return run_training(gin_files, gin_params, allow_config_change)


def write_shards_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write the items of the dataset a gin configuration trains on (Trainer.dataset) into a shard set "
                    "that Trainer.dataset = @ShardDataset() reads: shards of a chosen size, an index of every item's "
                    "size and checksum, corrupt source items skipped and listed. Rerun the same command to resume; "
                    "--shard i --num-shards n splits the work between n writers.")
    parser.add_argument("out", help="the shard set's folder (resumes what is already there)")
    parser.add_argument("--gin-file", "--gin_file", action="append", default=[],
                        help="a .gin file that binds Trainer.dataset (repeatable, applied in order)")
    add_gin_param_option(parser)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--items-per-shard", "--items_per_shard", type=int, help="items in every shard")
    size.add_argument("--shard-size", "--shard_size", default=DEFAULT_SHARD_SIZE,
                      help=f"bytes per shard, about (K, M, G suffixes; default {DEFAULT_SHARD_SIZE}): the items per "
                           "shard come from the mean size of the first items")
    parser.add_argument("--shard", type=int, default=0, help="which writer this is (0 .. --num-shards - 1)")
    parser.add_argument("--num-shards", "--num_shards", type=int, default=1, help="how many writers share the work")
    parser.add_argument("--dtype", choices=FLOAT_DTYPES, help="store floating tensors in this type (default: as the "
                                                               "dataset gives them)")
    parser.add_argument("--seed", type=int, default=0, help="items with random augmentations are read under a seed "
                                                           "of (seed, item)")
    return parser


def parse_bytes(text: str) -> int:
    """'256M', '1G', '64MB', '1000': a count of bytes (K, M, G, T are powers of 1024)."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    spelled = text.strip().upper().removesuffix("B")
    number, unit = (spelled[:-1], spelled[-1]) if spelled[-1:] in units else (spelled, "")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise ValueError(f"--shard-size {text!r} is not a size in bytes such as 256M, 1G or 1000000") from None
    check_number("--shard-size", value, low=1)
    return int(value)


def configured_dataset() -> Any:
    """The dataset the parsed gin configuration binds to Trainer.dataset."""
    try:
        reference = gin.query_parameter("Trainer.dataset")
    except ValueError:
        raise ConfigError("Trainer.dataset is not bound: bind it in a .gin file, e.g. `Trainer.dataset = "
                          "@DigitsDataset()`") from None
    if not isinstance(reference, gin.config.ConfigurableReference) or not reference.evaluate:
        raise ConfigError(f"Trainer.dataset must be bound to a dataset, e.g. `@DigitsDataset()`, got {reference!r}")
    return reference.scoped_configurable_fn()


def write_configured_shards(args: argparse.Namespace) -> WriteReport:
    """The shard writer's command line: parse gin, build the dataset, write this writer's shards."""
    parse_gin(args.gin_file, args.gin_param)
    dataset = configured_dataset()
    per_shard = args.items_per_shard or items_per_shard_for(dataset, parse_bytes(args.shard_size), args.seed,
                                                            args.dtype)
    source = {"gin_files": list(args.gin_file), "gin_params": list(args.gin_param)}
    report = write_shards(dataset, args.out, per_shard, args.shard, args.num_shards, args.seed, args.dtype, source)
    bad = f"; {report.bad_items} corrupt source item(s) skipped (listed above)" if report.bad_items else ""
    print(f"[sprint_mm] wrote {report.written} shard(s) of {per_shard} items into {args.out} ({report.already_done} "
          f"already there){bad}; " + ("the set is complete: Trainer.dataset = @ShardDataset(), ShardDataset.root = "
                                      f"{str(args.out)!r}" if report.complete else
                                      "the set is complete once the other writers finish"))
    return report


def write_shards_main(argv: Optional[Sequence[str]] = None) -> int:
    return report_mistakes(write_configured_shards, write_shards_parser().parse_args(argv))


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
                             "--middle-keep-above (t = 1 is noise), all below; 1 (default): every token at every step. "
                             "With a 2/8/2 or deeper split, --interval 0.25 0.75 --middle-keep 0.25 "
                             "--middle-keep-above 0.25 matched PDG's quality at 41-42%% fewer FLOPs (README, Results)")
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
    parser.add_argument("--force", action="store_true",
                        help=f"sample even when --frames/--size give more than {FORCE_TOKENS}x the tokens per sample "
                             "the model trained on (the estimated memory is printed)")
    add_gin_param_option(parser, "a gin binding applied after the run's config.gin (repeatable)")
    add_import_option(parser)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each transformer block (one graph per token count; the first batch pays the "
                             "compilation)")
    parser.add_argument("--context-parallel", type=int, default=1, metavar="N",
                        help="under torchrun / accelerate launch: spread each sample's tokens over N processes (long "
                             "clips); the processes of a group sample the same batch")
    parser.add_argument("--cfg-parallel", action="store_true",
                        help="under torchrun / accelerate launch: run the two branches of CFG / PDG on two (groups of) "
                             "processes")
    return parser


def read_prompts(path: str) -> list[str]:
    """The non-blank lines of a --prompts file (UTF-8), one prompt each."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--prompts file {path!r} does not exist")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"--prompts file {path!r} is not UTF-8 text (byte {error.start}: {error.reason}); save it as "
                         "UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts file {path!r} is empty: it needs one prompt per line")
    return prompts


def say_cut_prompts(conditioning: Any, prompts: Sequence[str]) -> None:
    """A note for every prompt longer than the text encoder reads (its `max_length` tokens): the rest is cut. Encoders
    of several lengths (SD3's CLIP and T5) count none, and get no note."""
    encoder = getattr(getattr(conditioning, "conditioner", None), "encoder", None)
    distinct = list(dict.fromkeys(prompts))
    if not hasattr(encoder, "token_counts") or not distinct:
        return
    for prompt, count in zip(distinct, encoder.token_counts(distinct)):
        if count > encoder.max_length:
            shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            print(f"[sprint_mm] note: the prompt {shown!r} is {count} tokens long; the text encoder reads the first "
                  f"{encoder.max_length} (TextEncoder.max_length, as in training) and the rest is cut")


def sample_requests(args: argparse.Namespace, kind: str, num_classes: Optional[int]) -> tuple[list, list]:
    """(labels, prompts) of length --num."""
    prompts = list(args.prompt)
    if args.prompts:
        prompts += read_prompts(args.prompts)
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


def check_sample_size(model: torch.nn.Module, shape: Sequence[int], rows: int, force: bool) -> None:
    """Refuse, unless `force`, a sample shape of more than FORCE_TOKENS times the tokens per sample the model trained
    on (memory grows with them: --size 4096 on a 16 px model grew past 5 GB); say the estimated memory either way."""
    backbone = model.backbone
    trained = math.prod(backbone.token_grid((1, *backbone.sample_shape)))
    tokens = math.prod(backbone.token_grid((1, *shape)))
    if tokens <= FORCE_TOKENS * trained:
        return
    flops = backbone.flop_shape()
    activations = rows * tokens * (8 * flops.hidden + flops.mlp_hidden) * 4  # a block's live float32 tensors
    estimate = (f"{tokens} tokens per sample, {tokens / trained:.0f}x the {trained} the model trained on; about "
                f"{activations / 2**30:.1f} GiB of activations per batch of {rows} rows (--batch-size, doubled by "
                "guidance)")
    if not force:
        raise ValueError(f"the sample shape {tuple(shape)} gives {estimate}: pass --force to sample it anyway, or "
                         "ask for a smaller --size / --frames or --batch-size")
    print(f"[sprint_mm] --force: sampling {estimate}")


def sample_main(argv: Optional[Sequence[str]] = None) -> int:
    return report_mistakes(write_samples, sample_parser().parse_args(argv), interrupted=SAMPLES_KEPT)


def check_sample_counts(args: argparse.Namespace) -> None:
    """The counts of the command line, checked before anything loads: --num (when given), --batch-size, --steps,
    --context-parallel."""
    for option in ("num", "batch_size", "steps", "context_parallel"):
        value = getattr(args, option)
        if value is not None:
            check_number(f"--{option.replace('_', '-')}", value, low=1, integer=True)


def write_samples(args: argparse.Namespace) -> Path:
    """Load the run (`load_run`: its config.gin read as data, the newest intact checkpoint unless --step), check the
    request, lock the output (one command per output) and sample into it (`sample_into`)."""
    from accelerate import Accelerator

    from sprint_mm.backbone import compile_blocks

    check_sample_counts(args)
    guidance = Guidance(args.guidance, args.scale, tuple(args.interval), args.sparse_keep)
    density = MiddleDensity(args.middle_keep, args.middle_keep_above)
    set_threads()  # as training chooses them (one on a machine of a few cores)
    accelerator = Accelerator()
    layout = sampling_layout(args, guidance, accelerator)

    def requests(model: torch.nn.Module) -> tuple[list, list]:  # checked before a text encoder or a VAE loads
        return sample_requests(args, model.backbone.condition.kind, model.backbone.condition.num_classes)

    run = load_run(args.run, args.step, args.weights, args.gin_param, check=requests, imports=args.imports,
                   say=print if accelerator.is_main_process else None).to(accelerator.device)
    labels, prompts = requests(run.model)
    say_cut_prompts(run.conditioning, prompts)
    if args.compile:
        compile_blocks(run.model)
    out = Path(args.out or Path(args.run) / "samples" / f"samples_{args.guidance}.png")
    shape = sample_shape(run, args, out)
    spread_model(run.model, layout.context, "--context-parallel")
    if layout.context is not None:  # the sample's grid must cut into equal boxes
        choose(run.model.backbone.token_grid((1, *shape)), layout.context_size)
    check_writable_folder(out.parent, "the folder of --out" if args.out else "the run's samples folder")
    lock = lock_for_all(accelerator, out.with_name(f".{out.name}.lock"), f"sample output {str(out)!r}")
    try:
        sample_into(out, run, args, (guidance, density), (labels, prompts), shape, accelerator, layout)
    finally:
        lock.release()
    return out


def sample_into(out: Path, run: TrainedRun, args: argparse.Namespace, sampler: tuple[Guidance, MiddleDensity],
                requested: tuple[list, list], shape: tuple[int, ...], accelerator: Any,
                layout: ProcessLayout) -> None:
    """Sample in shards of --batch-size: shard s gets noise seeded by (seed, s) and is written atomically, data groups
    (single processes, or the processes that spread a sample's tokens and the guidance branches) take shards
    round-robin, and a restarted command skips finished shards; the main process then packs the output. The run's
    own path and time shift (`TrainedRun.sampling`) drive the sampler."""
    (guidance, density), (labels, prompts) = sampler, requested
    total = len(labels or prompts)
    check_sample_size(run.model, shape, min(args.batch_size, total) * (1 if args.guidance == "none" else 2), args.force)
    shards = out.with_name(f".{out.name}.shards")
    flops = run.sampling_flops(shape, args.steps, args.solver, guidance, density)  # checks the keeps on the grid
    settings = (f"{run.checkpoint.name}/{args.weights} {args.guidance} {args.scale} {tuple(args.interval)} "
                f"{args.solver} {args.steps} seed {args.seed} n {total} bs {args.batch_size} {args.gin_param} "
                f"shape {shape}" + sparse_settings(guidance, density))
    if accelerator.is_main_process:
        prepare_shard_folder(shards, settings)
    accelerator.wait_for_everyone()
    count = math.ceil(total / args.batch_size)
    # each data group takes shards round-robin; the processes of a group sample the same shard, its lead writes it
    mine = [s for s in range(layout.data_rank, count, layout.data_size) if not (shards / f"{s:06d}.pt").is_file()]
    try:
        for s in tqdm(mine, desc="shards", disable=not accelerator.is_main_process or len(mine) < 2):
            rows = range(s * args.batch_size, min((s + 1) * args.batch_size, total))
            cond = run.conditioning.from_request([labels[i] for i in rows] if labels else None,
                                                 [prompts[i] for i in rows] if prompts else None, accelerator.device)
            packed = pack_uint8(sample_shard(run, args, guidance, density, cond, (len(rows), *shape), s, layout.branches))
            if layout.leads:
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


def sampling_layout(args: argparse.Namespace, guidance: Guidance, accelerator: Any) -> ProcessLayout:
    """The processes in data groups of --context-parallel processes, twice as many with --cfg-parallel (one group per
    guidance branch); one line for a size that does not divide the processes."""
    if args.cfg_parallel and guidance.kind not in ("cfg", "pdg"):
        raise ValueError(f"--cfg-parallel runs the two guidance branches apart: give --guidance cfg or pdg (got "
                         f"{guidance.kind!r})")
    return process_layout(accelerator.num_processes, args.context_parallel, accelerator.device, "--context-parallel",
                          branches=2 if args.cfg_parallel else 1)


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
                 shape: Sequence[int], shard: int, branches: Any = None) -> torch.Tensor:
    """The decoded samples of shard `shard`: noise and sampler randomness seeded by (--seed, shard); `branches`: the
    CFG-parallel pair of processes."""
    seed = args.seed * 1_000_003 + shard
    device = next(run.model.parameters()).device
    noise = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))
    return run.generate(cond, noise.to(device), args.steps, args.solver, guidance, batch_size=args.batch_size,
                        generator=torch.Generator(device).manual_seed(seed), density=density, branches=branches)


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


def merge_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Fold a LoRA run's adapters into its weights: a plain full checkpoint "
                                                 "that loads strictly into the model without LoRA.")
    parser.add_argument("run", help="run folder of a LoRA run (config.gin + checkpoints)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--step", type=int, help="checkpoint step (default: newest)")
    parser.add_argument("--weights", choices=WEIGHTS, default="ema")
    return parser


def merge_main(argv: Optional[Sequence[str]] = None) -> int:
    return report_mistakes(merge_lora, merge_parser().parse_args(argv))


def merge_lora(args: argparse.Namespace) -> Path:
    """Load the run's checkpoint, merge every adapter into its layer, check that the result loads strictly into the
    run's model built without LoRA (`build_model.lora = None`), write it."""
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must end in .safetensors, got {args.out!r}")
    run = load_run(args.run, args.step, args.weights)
    if lora_of(run.model) is None:
        raise ValueError(f"run {args.run!r} has no LoRA adapters (its config.gin binds no build_model.lora): its "
                         f"{args.weights}.safetensors is a plain checkpoint already")
    layers = len(adapted_layers(run.model))
    state = merge_adapters(run.model).state_dict()
    gin.bind_parameter("build_model.lora", None)
    load_strict(build_model(), state, "the merged weights")
    save_state_dict(state, out)
    print(f"[sprint_mm] merged the adapters of {layers} layers of {run.checkpoint} ({args.weights}) into {out}: it "
          f"loads strictly into the model without LoRA; start a run from it with Trainer.init_from = '{out}'")
    return out
