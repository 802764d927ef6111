"""The two-stage trainer on accelerate: AdamW, warm-up, clipping, fp32 EMA, atomic checkpoints and exact resume.

`Trainer.run` is the loop; `sprint_mm.train_state.TrainState` is everything a run resumes from.
"""
from __future__ import annotations

import json
import math
import time
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import gin
import torch
from accelerate import Accelerator
from torch.distributed.checkpoint import CheckpointException
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from sprint_mm.backbone import compile_blocks
from sprint_mm.conditioning import build_conditioning
from sprint_mm.data.bucket_sampler import BucketBatchSampler
from sprint_mm.data.buckets import BucketedDataset, BucketTable
from sprint_mm.data.faults import BAD_ITEMS, SkippingDataset
from sprint_mm.data.stream import IndexStream
from sprint_mm.errors import check_number
from sprint_mm.flops import sprint_step_ratio
from sprint_mm.flow import FlowMatching
from sprint_mm.generation import Previewer
from sprint_mm.latents import build_codec
from sprint_mm.models import build_model
from sprint_mm.preemption import DEFAULT_SIGNALS, Preempted, StopSignals, signal_numbers
from sprint_mm.repa import RepaAlignment
from sprint_mm.sharded import STRATEGIES, ensure_process_group, precision_policy, shard
from sprint_mm.runs import (
    DamagedCheckpoint,
    list_checkpoints,
    newest_intact_checkpoint,
    publish_checkpoint,
    resolve_weights,
    staging_folder,
    write_manifest,
)
from sprint_mm.sprint import Sprint
from sprint_mm.train_state import (
    NonFiniteTraining,
    TrainState,
    check_finite,
    ema_decay_at,
    frozen_copy,
    process_seed,
    set_rng_state,
    update_ema,
)

PRECISIONS = ("no", "fp16", "bf16")
# What the time budget and `elapsed_s` count: wall-clock, or this process's CPU time (with one thread on an otherwise
# idle core the two agree; on a shared machine CPU time is not inflated by the other jobs).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class Replicated(DistributedDataParallel):
    """DDP over the trained module that still names its backbone, as every model does (the loss reads it)."""

    @property
    def backbone(self) -> torch.nn.Module:
        return self.module.backbone


@gin.configurable
class Trainer:
    """One training stage. Stage 1: masked pre-training; stage 2: `init_from` a stage-1 run, drop ratio 0.

    `batch_size` is global (split over processes and accumulation steps). Training stops at `max_steps` or when the
    time budget (summed over resumes) is spent, whichever comes first, and always ends with a checkpoint.

    `ema_warmup` ramps the EMA decay up from 0.1 (see `ema_decay_at`); `num_threads` sets torch's CPU threads for the
    run (on a shared CPU, 1 thread can be many times faster than one per core). A dataset with a `collate` method
    (e.g. CaptionDataset, whose caption cache may be partly filled) batches its own items. An item a dataset cannot
    read (`BadItem`) is replaced by the next good one, counted per kind in the metrics, and past
    `BadDataLedger.max_bad_fraction` it stops the run naming examples.

    `alignment` (e.g. `@RepaAlignment()`) adds the REPA auxiliary loss, which owns its projector and its file
    (`projector.safetensors` beside the weights, not in the EMA). A stage 2 with alignment starts its projector from
    the stage-1 checkpoint's projector file when there is one.

    `clock` 'wall' times the steps (for `time_budget_minutes` and `elapsed_s`) by wall-clock, 'cpu' by this process's
    CPU time: comparisons of training time on a shared machine.

    Faults: a step whose loss or gradient norm is not finite is skipped (optimizer, scheduler and EMA untouched) and
    logged; `max_bad_steps` of them in a row stop the run with the last good checkpoint intact. One of
    `stop_signals` finishes the step, writes a checkpoint and exits with status 75 (`preemption.EXIT_PREEMPTED`).
    Resume verifies the newest checkpoint against its manifest and falls back to the previous intact one.

    `buckets` (a `BucketTable`) trains on mixed sizes and durations: every item goes to its nearest bucket (resized
    and cropped to it), every step is one bucket's global batch (`Bucket.batch_size`, which replaces `batch_size`),
    and the sequence of batches depends only on (seed, step), so resume is exact on any number of processes; a run
    whose dataset or table changed since its checkpoint refuses to resume. Images are one-frame items: a video model
    whose temporal patch is 1 trains on image and video buckets in one run.

    `strategy` 'ddp' replicates the model (DDP); 'fsdp' shards model, EMA and optimizer over the processes (FSDP2, per
    block and at the root; bf16 compute with fp32 reduction under precision 'bf16', `fsdp_cpu_offload` keeps the
    shards in CPU memory) and writes sharded checkpoints that resume on any number of processes.
    """

    def __init__(
        self,
        run_dir: str = "runs/default",
        dataset: Optional[Dataset] = None,
        objective: Optional[FlowMatching] = None,
        batch_size: int = 256,
        max_steps: int = 1000,
        time_budget_minutes: Optional[float] = None,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        warmup_start_factor: float = 0.01,
        grad_clip: float = 1.0,
        ema_decay: float = 0.9999,
        ema_warmup: bool = False,
        grad_accum: int = 1,
        precision: str = "no",
        seed: int = 0,
        num_workers: int = 0,
        num_threads: Optional[int] = None,
        checkpoint_every: int = 1000,
        keep_checkpoints: int = 3,
        log_every: int = 50,
        preview_every: int = 0,
        init_from: Optional[str] = None,
        progress: bool = True,
        alignment: Optional[RepaAlignment] = None,
        max_bad_steps: int = 10,
        stop_signals: Sequence[str] = DEFAULT_SIGNALS,
        compile: bool = False,
        strategy: str = "ddp",
        fsdp_cpu_offload: bool = False,
        buckets: Optional[BucketTable] = None,
        clock: str = "wall",
    ) -> None:
        if dataset is None:
            raise ValueError("Trainer.dataset is not bound: bind it in a .gin file, e.g. `Trainer.dataset = @DigitsDataset()`")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown Trainer.strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
        if strategy == "fsdp":
            for unsupported, what in ((precision == "fp16", "Trainer.precision = 'fp16' (use 'bf16')"),
                                      (alignment is not None, "Trainer.alignment (REPA)"),
                                      (preview_every > 0, "Trainer.preview_every > 0 (previews from a sharded EMA; "
                                                          "set it to 0 and sample from the checkpoints)")):
                if unsupported:
                    raise ValueError(f"Trainer.strategy = 'fsdp' does not support {what} yet")
        if buckets is not None and alignment is not None:
            raise ValueError("Trainer.buckets with Trainer.alignment (REPA) is not supported yet: the alignment "
                             "targets are computed for one image size; train REPA runs at one size")
        if clock not in CLOCKS:
            raise ValueError(f"unknown Trainer.clock {clock!r}; allowed: {', '.join(CLOCKS)}")
        if fsdp_cpu_offload and strategy != "fsdp":
            raise ValueError("Trainer.fsdp_cpu_offload = True needs Trainer.strategy = 'fsdp'")
        for name, value, low in (
            ("batch_size", batch_size, 1), ("grad_accum", grad_accum, 1), ("max_steps", max_steps, 1),
            ("checkpoint_every", checkpoint_every, 1), ("log_every", log_every, 1),
            ("num_threads", 1 if num_threads is None else num_threads, 1), ("warmup_steps", warmup_steps, 0),
            ("keep_checkpoints", keep_checkpoints, 0), ("preview_every", preview_every, 0),
            ("num_workers", num_workers, 0), ("seed", seed, None), ("max_bad_steps", max_bad_steps, 1),
        ):
            check_number(f"Trainer.{name}", value, low=low, integer=True)
        for name, value in (("lr", lr), ("adam_eps", adam_eps), ("weight_decay", weight_decay),
                            ("grad_clip", grad_clip), ("time_budget_minutes", time_budget_minutes or 0)):
            check_number(f"Trainer.{name}", value, low=0)
        check_number("Trainer.ema_decay", ema_decay, 0, 1, below_high=True)
        check_number("Trainer.warmup_start_factor", warmup_start_factor, 0, 1)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Trainer.betas must be a pair (beta1, beta2), got {betas!r}")
        for beta in betas:
            check_number("Trainer.betas", beta, 0, 1, below_high=True)
        self.run_dir = Path(run_dir)
        self.dataset = dataset
        self.data = dataset  # what training reads: with buckets, `_index_data` wraps the dataset
        self.objective = objective or FlowMatching()
        self.batch_size = batch_size
        self.max_steps = max_steps
        self.time_budget = None if time_budget_minutes is None else 60.0 * time_budget_minutes
        self.lr, self.betas, self.adam_eps, self.weight_decay = lr, tuple(betas), adam_eps, weight_decay
        self.warmup_steps, self.warmup_start_factor = warmup_steps, warmup_start_factor
        self.grad_clip, self.ema_decay, self.ema_warmup, self.grad_accum = grad_clip, ema_decay, ema_warmup, grad_accum
        self.precision, self.seed, self.num_workers, self.num_threads = precision, seed, num_workers, num_threads
        self.checkpoint_every, self.keep_checkpoints, self.log_every = checkpoint_every, keep_checkpoints, log_every
        self.preview_every, self.init_from, self.progress = preview_every, init_from, progress
        self.alignment = alignment
        self.max_bad_steps = max_bad_steps
        signal_numbers(stop_signals)  # an unknown name fails now, not when the signal comes
        self.stop_signals = tuple(stop_signals)
        self.strategy, self.fsdp_cpu_offload = strategy, fsdp_cpu_offload
        self.compile = compile  # torch.compile each transformer block (regional compilation, see compile_blocks)
        self.buckets = buckets
        self.clock = CLOCKS[clock]

    # ------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        """Processes, the train state (resumed, or stage 2's start), the data stream and the logs."""
        self._start_processes()
        self._index_data()
        self._build_state()
        resumed_rng = self._restore()
        self._check_data_unchanged()
        self._distribute()
        if resumed_rng is not None:
            set_rng_state(resumed_rng)
        else:  # each process draws its own noise, masks and drops
            torch.manual_seed(process_seed(self.seed, self.state.step, self.accelerator.process_index))
        self.loader = self._batches()
        if self.accelerator.is_main_process:
            self._open_logs()

    def _start_processes(self) -> None:
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        acc = self.accelerator = Accelerator(mixed_precision=self.precision)
        if self.strategy == "fsdp":
            ensure_process_group(acc.device)
        if self.buckets is not None:  # each bucket has its own batch size (the sampler checks it divides)
            self.micro_batch = None
            return
        if self.batch_size % (acc.num_processes * self.grad_accum):
            raise ValueError(f"batch_size {self.batch_size} must be divisible by processes ({acc.num_processes}) x "
                             f"grad_accum ({self.grad_accum})")
        self.micro_batch = self.batch_size // (acc.num_processes * self.grad_accum)

    def _index_data(self) -> None:
        """The data training reads: the dataset, or with buckets the dataset bucketed (the main process builds the
        cached bucket index first, the others then read it) and the sampler's view of it."""
        if self.buckets is None:
            return
        with self.accelerator.main_process_first():
            self.data = BucketedDataset(self.dataset, self.buckets)
        acc = self.accelerator
        self.sampler = BucketBatchSampler(self.data.bucket_of, self.buckets, self.seed, acc.process_index,
                                          acc.num_processes, self.grad_accum)

    def _build_state(self) -> None:
        """The model the configuration names, its conditioning, the optimizer and a fresh train state."""
        torch.manual_seed(self.seed)  # identical initialisation on every process
        model = build_model()
        if self.objective.uses_middle_path and not isinstance(model, Sprint):
            raise ValueError(
                "the objective drops tokens or paths but the model is a dense backbone: "
                "set `build_model.sprint = True`, or `FlowMatching.path_drop = 0.0` and `FlowMatching.masker = None`"
            )
        self._check_data_fits(model)
        self.conditioning = build_conditioning()
        self.conditioning.prepare(model)
        # What the optimizer trains and DDP wraps: the model, or the model paired with the REPA projector.
        self.trained = model if self.alignment is None else self.alignment.attach(model)
        ema = frozen_copy(model)
        if self.compile:  # after the EMA's copy: the EMA runs only for previews and stays eager
            compile_blocks(model)
        if self.strategy == "fsdp":  # before the optimizer, which must hold the sharded parameters
            for module, precision in ((model, self.precision), (ema, "no")):
                shard(module, self.accelerator.device, precision_policy(precision), self.fsdp_cpu_offload)
        cuda = self.accelerator.device.type == "cuda"
        if cuda:  # TF32 matmuls and convolutions for what runs in float32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        # The fused kernel also runs on CPU (3x faster there than the per-parameter loop); FSDP's sharded parameters
        # and fp16's loss scaler keep the default implementation off CUDA.
        fused = cuda or (self.strategy != "fsdp" and self.precision != "fp16")
        optimizer = torch.optim.AdamW([p for p in self.trained.parameters() if p.requires_grad], lr=self.lr,
                                      betas=self.betas, eps=self.adam_eps, weight_decay=self.weight_decay,
                                      fused=fused or None)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._warmup_factor)
        self.state = TrainState(model, ema, optimizer, scheduler, self.alignment, sharded=self.strategy == "fsdp")

    def _check_data_fits(self, model: torch.nn.Module) -> None:
        """Refuse data the model is not built for: items of another shape than the model samples (it would train at
        one size and sample at another) and more classes than the model has (the extra ids would train as the null
        class). The first good item is read as training reads it, leaving the RNG as it was."""
        backbone = model.backbone
        classes = getattr(self.data, "num_classes", None)
        if backbone.condition.kind == "class" and classes is not None and classes > backbone.condition.num_classes:
            raise ValueError(f"the dataset has {classes} classes but the model {backbone.condition.num_classes} "
                             f"(the backbone's num_classes), whose labels lie in [0, {backbone.condition.num_classes}): "
                             f"set num_classes to at least {classes}")
        if self.buckets is not None:
            self._check_buckets_fit(backbone)
            return
        with torch.random.fork_rng(devices=[]):
            item = tuple(SkippingDataset(self.dataset)[0]["x"].shape)
        if item != tuple(backbone.sample_shape):
            raise ValueError(f"the dataset's items have shape {item} but the model takes {tuple(backbone.sample_shape)} "
                             "(C, [T,] H, W): make the dataset's size and channels match the backbone's input_size "
                             "and in_channels")

    def _check_buckets_fit(self, backbone: torch.nn.Module) -> None:
        """Every bucket that has items must be a shape the backbone takes: its patch divides it, an image model gets
        one-frame buckets only, and the first item of the bucket reads at the bucket's shape with the model's
        channels."""
        channels, image_model = backbone.sample_shape[0], len(backbone.sample_shape) == 3
        for number, (bucket, members) in enumerate(zip(self.buckets, self.data.members)):
            if not members:
                continue
            if image_model and bucket.frames != 1:
                raise ValueError(f"bucket {number} {bucket.shape} has {bucket.frames} frames but the model takes images "
                                 f"{tuple(backbone.sample_shape)}: use a video backbone or one-frame buckets")
            shape = (channels, *bucket.shape[1:]) if bucket.frames == 1 else (channels, *bucket.shape)
            backbone.token_grid((1, *shape))  # a size the patch does not divide is refused here, naming the patch
            with torch.random.fork_rng(devices=[]):
                item = tuple(SkippingDataset(self.data)[members[0]]["x"].shape)
            if item not in (shape, (channels, *bucket.shape)):
                raise ValueError(f"bucket {number} {bucket.shape} gives items of shape {item}, but the model takes "
                                 f"{shape} (C, [T,] H, W) there: make the dataset's channels match the backbone's "
                                 f"in_channels ({channels})")

    def _distribute(self) -> None:
        """Move everything to this process's device; with several processes, DDP over the trained module. Sharded
        modules are already placed (and not wrapped: FSDP reduces the gradients itself)."""
        acc = self.accelerator
        if not self.state.sharded:
            self.trained.to(acc.device)
            self.state.ema.to(acc.device)
        if self.alignment is not None:
            self.alignment.to(acc.device)
        self.optimizer = acc.prepare(self.state.optimizer)
        if acc.num_processes > 1 and not self.state.sharded:
            device_ids = [acc.local_process_index] if acc.device.type == "cuda" else None
            # Every trained parameter is in every graph (see Sprint._middle): no scan for unused parameters.
            self.trained = Replicated(self.trained, device_ids=device_ids, static_graph=True)

    def _open_logs(self) -> None:
        """Config files, TensorBoard and the preview writer (main process)."""
        from torch.utils.tensorboard import SummaryWriter

        self._write_configs()
        self.writer = SummaryWriter(str(self.run_dir / "logs"))
        # Only previews decode during training: a run without previews needs no VAE folder.
        codec = build_codec() if self.preview_every else None
        self.previewer = Previewer(self.run_dir / "samples", self.conditioning, codec, self.dataset)

    def _warmup_factor(self, step: int) -> float:
        if self.warmup_steps <= 0 or step >= self.warmup_steps:
            return 1.0
        return self.warmup_start_factor + (1.0 - self.warmup_start_factor) * step / self.warmup_steps

    def _data_position(self) -> int:
        """Dataset indices this process has consumed. Times the process count it is the global position, step x
        batch_size, so a run resumed on another number of processes reads the same global sequence of samples (each
        global batch split anew among the processes); the noise, times and masks differ, being drawn per process."""
        if self.buckets is not None:
            return self.state.step  # global batches consumed: one per step
        return self.state.step * self.grad_accum * self.micro_batch

    def _restore(self) -> Optional[dict[str, Any]]:
        """Resume this run from its newest intact checkpoint (returns this process's RNG state), else start stage 2
        from `init_from`, else start fresh."""
        folder, damaged = newest_intact_checkpoint(self.run_dir)
        for line in damaged:
            self._log(f"{line}: falling back to the previous checkpoint")
        if folder is not None:
            rank = self.accelerator.process_index
            rng = self.state.restore(folder, rank)
            self._log(f"resumed from {folder} at step {self.state.step}")
            if rng is None:  # this process says so itself: the main process may have its file
                tqdm.write(f"[sprint_mm] process {rank}: {folder.name} has no rng_rank{rank}.pt (written by fewer "
                           f"processes); its random stream starts from the seed of (seed {self.seed}, step "
                           f"{self.state.step}, rank {rank})")
            if self.accelerator.is_main_process:
                self._forget_metrics_after(self.state.step)
            return rng
        if damaged:
            raise DamagedCheckpoint(f"run {self.run_dir} has no intact checkpoint to resume: {'; '.join(damaged)}")
        if self.init_from:
            weights = resolve_weights(self.init_from, "ema.safetensors")
            note = self.state.start_from(weights)
            self._log(f"initialised model and EMA from {weights} (fresh optimizer)")
            if note:
                self._log(note)
        return None

    def _check_data_unchanged(self) -> None:
        """A resumed run's data position counts batches of the bucketed data it was written with: refuse to resume on
        another dataset or bucket table (or with buckets switched on or off), where it would point at other items."""
        saved = self.state.data_fingerprint if self.state.step > 0 else None
        now = None if self.buckets is None else self.sampler.fingerprint()
        if self.state.step > 0 and (saved is None) != (now is None):
            was, is_ = ("without", "with") if saved is None else ("with", "without")
            raise ValueError(f"run {self.run_dir} was trained {was} Trainer.buckets up to step {self.state.step} and "
                             f"now resumes {is_} them, which would read other items: keep its configuration, or start a "
                             f"new run with Trainer.init_from = {str(self.run_dir)!r}")
        if saved is not None:
            self.sampler.check_resumable(saved)
        self.state.data_fingerprint = now

    def _forget_metrics_after(self, step: int) -> None:
        """metrics.jsonl keeps the lines up to the resumed step: the steps after it are trained again."""
        path = self.run_dir / "metrics.jsonl"
        if path.is_file():
            lines = path.read_text().splitlines(keepends=True)
            path.write_text("".join(line for line in lines if json.loads(line)["step"] <= step))

    def _batches(self):
        """The endless stream of micro-batches of this process, from the data position of the current step."""
        acc = self.accelerator
        data = SkippingDataset(self.data)  # a bad item is replaced by the next good one, and reported
        if self.buckets is not None:
            self.sampler.start = self._data_position()
            batching = {"batch_sampler": self.sampler}
        else:
            batching = {"batch_size": self.micro_batch, "drop_last": True, "sampler": IndexStream(
                len(data), self.seed, acc.process_index, acc.num_processes, start=self._data_position())}
        return iter(DataLoader(
            data, **batching, num_workers=self.num_workers, collate_fn=data.collate,
            generator=torch.Generator().manual_seed(self.seed),  # keeps the global RNG untouched
            persistent_workers=self.num_workers > 0,
            pin_memory=acc.device.type == "cuda",
        ))

    def _write_configs(self) -> None:
        model = self.state.model
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.gin").write_text(gin.config_str())
        plain = {
            "gin_bindings": gin.config_str().splitlines(),
            "model": type(model).__name__,
            "backbone": type(model.backbone).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "batch_size": self.batch_size if self.buckets is None else None,
            "micro_batch": self.micro_batch,
            "buckets": None if self.buckets is None else self.buckets.to_list(),
            "processes": self.accelerator.num_processes,
            "max_steps": self.max_steps,
            "lr": self.lr,
            "precision": self.precision,
            "objective": {k: repr(v) for k, v in vars(self.objective).items()},
        }
        (self.run_dir / "config.json").write_text(json.dumps(plain, indent=2))

    def _log(self, message: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(f"[sprint_mm] {message}")

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        """Every process writes into a hidden staging folder; the main process (sharded: every process, its shards)
        checks that every tensor is finite, the main process adds the manifest and renames the folder into place. A
        failing write (DCP reports a process's failed write as a CheckpointException) stops the run and leaves the
        previous checkpoint as it was."""
        acc, step = self.accelerator, self.state.step
        acc.wait_for_everyone()
        staging = self.run_dir / "checkpoints" / f".step_{step:07d}.partial"
        if acc.is_main_process or self.state.sharded:  # each process checks its own shards
            check_finite(self.state, step)
        if acc.is_main_process:
            staging = staging_folder(self.run_dir, step)
        acc.wait_for_everyone()
        try:
            self.state.save(staging, self._data_position(), acc.process_index)
            acc.wait_for_everyone()
            if acc.is_main_process:
                write_manifest(staging, step, acc.num_processes, (self.run_dir / "config.gin").read_text())
                publish_checkpoint(staging, step, self.keep_checkpoints)
        except (OSError, CheckpointException) as err:
            shutil.rmtree(staging, ignore_errors=True)
            intact = [p.name for p in list_checkpoints(self.run_dir)]
            raise CheckpointWriteError(f"could not write the checkpoint of step {step} in {staging.parent} ({err}); "
                                       f"the previous checkpoints are intact: {intact or 'none'}") from err
        acc.wait_for_everyone()

    # ------------------------------------------------------------------ the loop
    def _train_step(self) -> StepResult:
        """One optimizer step over grad_accum micro-batches. A step whose loss or gradient norm is not finite (on any
        process) leaves the optimizer, scheduler and EMA untouched."""
        acc, state = self.accelerator, self.state
        totals: dict[str, float] = {}
        tokens = 0
        for micro in range(self.grad_accum):
            batch = next(self.loader)
            x0 = batch["x"].to(acc.device, non_blocking=True)
            state.ledger.add(batch.pop(BAD_ITEMS), x0.shape[0])
            state.ledger.check()
            cond = self.conditioning.from_batch(batch, acc.device)
            grid = state.model.backbone.token_grid(tuple(x0.shape))
            sync = nullcontext() if micro == self.grad_accum - 1 else acc.no_sync(self.trained)
            with sync, acc.autocast():
                losses = {"loss": self.objective.loss(self.trained, x0, cond)}
                if self.alignment is not None:
                    losses["denoise_loss"] = losses["loss"]
                    losses["repa_loss"] = self.alignment.loss(self.alignment.images(batch), grid)
                    losses["loss"] = losses["denoise_loss"] + self.alignment.coeff * losses["repa_loss"]
                acc.backward(losses["loss"] / self.grad_accum)
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + value.item() / self.grad_accum
            tokens += x0.shape[0] * math.prod(grid)
        # clip_grad_norm_ with an infinite bound measures without clipping
        grad_norm = float(acc.clip_grad_norm_(self.trained.parameters(), self.grad_clip if self.grad_clip > 0 else math.inf))
        # Under fp16 an infinite gradient is the loss scaler's business: it skips the step and lowers its scale.
        grad_checked = self.precision != "fp16"
        problem = self._agreed_problem(totals["loss"], grad_norm if grad_checked else 0.0)
        if problem is None:
            self.optimizer.step()
            state.scheduler.step()
            update_ema(state.ema, state.model, ema_decay_at(state.step, self.ema_decay, self.ema_warmup))
        self.optimizer.zero_grad(set_to_none=True)
        scaler_skipped = problem is None and self.precision == "fp16" and acc.optimizer_step_was_skipped
        bucket = None if self.buckets is None else "x".join(map(str, self.buckets[self.sampler.bucket_at(state.step)].shape))
        return StepResult(totals, grad_norm, tokens, problem, scaler_skipped, bucket)

    def _agreed_problem(self, loss: float, grad_norm: float) -> Optional[str]:
        """What was not finite in this step on any process (every process takes the same decision), or None."""
        flags = torch.tensor([float(not math.isfinite(loss)), float(not math.isfinite(grad_norm))],
                             device=self.accelerator.device)
        loss_bad, grad_bad = self.accelerator.reduce(flags, reduction="max").tolist()
        parts = [f"loss {loss}" if loss_bad else "", f"gradient norm {grad_norm}" if grad_bad else ""]
        return " and ".join(p for p in parts if p) or None

    def _flop_saving(self) -> Optional[float]:
        """Fraction of forward FLOPs SPRINT saves per training step against the same backbone dense."""
        model = self.state.model
        if not isinstance(model, Sprint):
            return None
        grid = model.backbone.token_grid((1, *model.backbone.sample_shape))
        mask = None if self.objective.masker is None else self.objective.masker(1, grid, generator=torch.Generator())
        kept = math.prod(grid) if mask is None else mask.num_kept
        return 1.0 - 1.0 / sprint_step_ratio(model.backbone.flop_shape(), model.flop_shape(), math.prod(grid), kept)

    def run(self) -> Path:
        """Train until max_steps, the time budget or a stop signal; returns the run folder."""
        self._setup()
        acc, state = self.accelerator, self.state
        if state.step >= self.max_steps:
            self._log(f"run already at step {state.step} >= max_steps {self.max_steps}; nothing to do")
            return self.run_dir
        saving = self._flop_saving()
        bar = tqdm(total=self.max_steps, initial=state.step, disable=not (self.progress and acc.is_main_process),
                   desc=self.run_dir.name, dynamic_ncols=True)
        window, bad_in_a_row, last_saved, stopped = Window(), 0, -1, False
        reported_bad = state.ledger.bad.copy()
        state.model.train()
        with StopSignals(self.stop_signals, self._log) as signals:
            while state.step < self.max_steps:
                started = self.clock()
                result = self._train_step()
                state.step += 1
                state.elapsed += self.clock() - started
                window.add(result)
                bar.update(1)
                bad_in_a_row = bad_in_a_row + 1 if result.problem else 0
                if result.problem:
                    self._log(f"step {state.step} skipped: non-finite {result.problem} "
                              f"({bad_in_a_row} in a row, the run stops at {self.max_bad_steps})")
                    if bad_in_a_row >= self.max_bad_steps:
                        raise NonFiniteTraining(
                            f"{bad_in_a_row} steps in a row had a non-finite loss or gradient norm (last: step "
                            f"{state.step}, {result.problem}); the run stops with its last good checkpoint "
                            f"{(list_checkpoints(self.run_dir) or [Path('none')])[-1].name} intact. Lower "
                            f"Trainer.lr, check the data, or raise Trainer.max_bad_steps")
                if state.step % self.log_every == 0 or state.step == self.max_steps:
                    metrics = {"step": state.step, **window.means(acc.num_processes), "grad_norm": result.grad_norm,
                               "lr": state.scheduler.get_last_lr()[0], "elapsed_s": state.elapsed,
                               **state.ledger.metrics()}
                    if state.ledger.bad != reported_bad:
                        self._log(state.ledger.summary())
                        reported_bad = state.ledger.bad.copy()
                    postfix = {"loss": f"{metrics.get('loss', math.nan):.4f}", "it/s": f"{metrics['steps_per_s']:.2f}",
                               "tok/s": f"{metrics['tokens_per_s']:.0f}"}
                    if saving is not None and saving > 0:  # stage 2 (no drop) saves nothing
                        postfix["flops saved"] = f"{100 * saving:.0f}%"
                    bar.set_postfix(postfix)
                    self._record(metrics)
                    window = Window()
                if self.preview_every and state.step % self.preview_every == 0 and acc.is_main_process:
                    self.previewer.save(state.ema, state.step)
                if state.step % self.checkpoint_every == 0:
                    self.save_checkpoint()
                    last_saved = state.step
                budget_spent, stopped = self._agreed_stop(signals.received is not None)
                if stopped:
                    break
                if budget_spent:
                    self._log(f"time budget of {self.time_budget / 60:.1f} min spent at step {state.step}")
                    break
            bar.close()
            if last_saved != state.step:
                self.save_checkpoint()
        if acc.is_main_process:
            if self.preview_every and not stopped:
                self.previewer.save(state.ema, state.step)
            self.writer.close()
        acc.wait_for_everyone()
        if stopped:
            raise Preempted(signals.received or "a stop signal to another process", state.step)
        return self.run_dir

    def _agreed_stop(self, signalled: bool) -> tuple[bool, bool]:
        """(time budget spent, a stop signal came) agreed by every process, so all stop at the same step: the main
        process's clock decides the budget, a signal to any process stops all."""
        spent = self.time_budget is not None and self.state.elapsed >= self.time_budget
        flags = torch.tensor([float(spent), float(signalled)], device=self.accelerator.device)
        budget, signal_flag = self.accelerator.reduce(flags, reduction="max").tolist()
        return bool(budget), bool(signal_flag)

    def _record(self, metrics: dict[str, float]) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        for key, value in metrics.items():
            if key != "step":
                self.writer.add_scalar(f"train/{key}", value, self.state.step)


class Window:
    """Losses (also per bucket), steps, skipped steps and tokens since the last log line."""

    def __init__(self) -> None:
        self.losses: dict[str, float] = {}
        self.steps, self.good_steps, self.tokens, self.start = 0, 0, 0, time.perf_counter()
        self.skipped, self.scaler_skipped = 0, 0
        self.bucket_losses: dict[str, list[float]] = {}

    def add(self, result: StepResult) -> None:
        self.steps, self.tokens = self.steps + 1, self.tokens + result.tokens
        self.skipped += result.problem is not None
        self.scaler_skipped += result.scaler_skipped
        if result.problem is None:
            self.good_steps += 1
            for name, value in result.losses.items():
                self.losses[name] = self.losses.get(name, 0.0) + value
            if result.bucket is not None:
                self.bucket_losses.setdefault(result.bucket, []).append(result.losses["loss"])

    def means(self, processes: int) -> dict[str, float]:
        """Mean losses of the steps that trained, the rates of the window (tokens over all processes) and the
        counts of skipped steps (non-finite; fp16 loss-scaler skips)."""
        seconds = time.perf_counter() - self.start
        return {**{name: total / self.good_steps for name, total in self.losses.items()},
                **{f"loss/{bucket}": sum(losses) / len(losses) for bucket, losses in self.bucket_losses.items()},
                "steps_per_s": self.steps / seconds, "tokens_per_s": self.tokens * processes / seconds,
                "skipped_steps": self.skipped, "fp16_skipped_steps": self.scaler_skipped}


@dataclass
class StepResult:
    """What one optimizer step reports: mean losses, gradient norm, tokens of this process, what was not finite
    (None: the step trained), whether fp16's loss scaler skipped it and the bucket it trained on."""

    losses: dict[str, float]
    grad_norm: float
    tokens: int
    problem: Optional[str] = None
    scaler_skipped: bool = False
    bucket: Optional[str] = None  # the bucket of the step's batch (runs with buckets)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); the previous ones are intact."""
