"""The trainer: one training stage as a short loop over its parts.

    data stream (data.stream)      the micro-batches from the position of any step; bad items counted
    objective (flow, repa)         what trains (`attach`) and its losses; REPA's alignment is part of it
    parallelize                    activation checkpointing, compilation, FSDP2 or DDP, in one place
    optimization                   AdamW, warm-up, clipping, the fp32 EMA
    checkpointer                   what a run resumes from: written, verified, restored, resharded
    metrics log                    progress bar, metrics.jsonl, TensorBoard
    schedule                       when to stop, log, preview and checkpoint
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import gin
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from sprint_mm.checkpointer import Checkpointer, NonFiniteTraining, TrainingParts
from sprint_mm.conditioning import build_conditioning
from sprint_mm.data.buckets import BucketTable
from sprint_mm.data.stream import Batching, DataShare, open_stream
from sprint_mm.errors import check_writable_folder
from sprint_mm.flow import FlowMatching
from sprint_mm.generation import Previewer
from sprint_mm.latents import build_codec
from sprint_mm.locks import FolderLock, lock_for_all
from sprint_mm.lora import adapter_parts, lora_of
from sprint_mm.metrics_log import MetricsLog, StepResult, flops_saved
from sprint_mm.models import build_model
from sprint_mm.optimization import Optimization, frozen_copy, update_ema
from sprint_mm.parallelize import Parallelism, agreed, fused_optimizer, parallelize, process_layout, start_processes
from sprint_mm.preemption import DEFAULT_SIGNALS, Preempted, StopSignals
from sprint_mm.repa import AlignedObjective, RepaAlignment
from sprint_mm.run_config import check_resume_config, refuse_dynamic_registration
from sprint_mm.runs import archive_config, list_checkpoints, write_run_configs
from sprint_mm.schedule import Schedule
from sprint_mm.trackers import check_trackers


LOCK_FILE = ".lock"  # in the run folder: held while a process trains it (sprint_mm.locks)
STAGES = {1: "masked pre-training", 2: "a full-token fine-tune of a stage-1 run (gin/base/stage2.gin sets it)"}


def announce(line: str) -> None:
    tqdm.write(f"[sprint_mm] {line}")


def check_stage(run_dir: str, init_from: Optional[str], stage: int) -> None:
    """The run folder and the stage are what a run needs: a folder (not '') and, for stage 2, the stage-1 run to
    start from, outside the run's own folder."""
    if not str(run_dir).strip():
        raise ValueError("Trainer.run_dir is empty: name a folder for the run, e.g. --run-dir runs/my_run")
    if stage not in STAGES:
        raise ValueError(f"Trainer.stage must be one of {', '.join(map(str, STAGES))} ("
                         f"{'; '.join(f'{k}: {v}' for k, v in STAGES.items())}), got {stage!r}")
    if stage == 2 and not init_from:
        raise ValueError("this configuration is a stage 2 (Trainer.stage = 2: a full-token fine-tune) but binds no "
                         "Trainer.init_from: give the stage-1 run to start from, e.g. --gin-param "
                         "\"Trainer.init_from = 'runs/my_stage1'\" (a run folder, a checkpoint folder or an "
                         "ema.safetensors file)")
    if init_from:
        own, source = Path(run_dir).resolve(), Path(init_from).resolve()
        if source == own or own in source.parents:
            raise ValueError(f"Trainer.init_from {init_from!r} lies in this run's own folder {str(run_dir)!r}: a "
                             "stage 2 trains into a folder of its own; set Trainer.run_dir (--run-dir) to a new folder")


@gin.configurable
class Trainer:
    """One training stage. Stage 1: masked pre-training; stage 2: `init_from` a stage-1 run, drop ratio 0.

    Its inputs are its arguments: the data (`dataset`, batched by `batch_size`, `grad_accum`, `num_workers`, `seed`,
    or by the `buckets` of a `BucketTable`), the objective (`FlowMatching`, plus REPA's `alignment`), the factories of
    the model, its conditioning and its codec (gin configures them), the optimization (`lr` ... `ema_warmup`, see
    `Optimization`), the devices (`precision` ... `activation_checkpointing`, `context_parallel`, see `Parallelism`;
    the processes of a context group read the same samples and spread their tokens) and the schedule
    (`max_steps` ... `stop_signals`, see `Schedule`). `stage` 2 marks a full-token fine-tune (gin/base/stage2.gin),
    which needs `init_from`. `run` trains until the schedule says stop and returns the run folder; every step's
    data, noise and masks are a function of the seed and the step, so resume is exact. The run folder is locked while
    a process trains it.
    """

    def __init__(
        self, run_dir: str = "runs/default", dataset: Optional[Dataset] = None,
        objective: Optional[FlowMatching] = None, batch_size: int = 256, max_steps: int = 1000,
        time_budget_minutes: Optional[float] = None, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8, weight_decay: float = 0.0, warmup_steps: int = 0, warmup_start_factor: float = 0.01,
        grad_clip: float = 1.0, ema_decay: float = 0.9999, ema_warmup: bool = False, grad_accum: int = 1,
        precision: str = "no", seed: int = 0, num_workers: int = 0, num_threads: Optional[int] = None,
        checkpoint_every: int = 1000, keep_checkpoints: int = 3, log_every: int = 50, preview_every: int = 0,
        init_from: Optional[str] = None, progress: bool = True, alignment: Optional[RepaAlignment] = None,
        max_bad_steps: int = 10, stop_signals: Sequence[str] = DEFAULT_SIGNALS, compile: bool = False,
        strategy: str = "ddp", fsdp_cpu_offload: bool = False, buckets: Optional[BucketTable] = None,
        clock: str = "wall", activation_checkpointing: bool = False, model: Callable[[], torch.nn.Module] = build_model,
        conditioning: Callable[[], Any] = build_conditioning, codec: Callable[[], Any] = build_codec, stage: int = 1,
        context_parallel: int = 1, trackers: Sequence[str] = ("tensorboard",),
    ) -> None:
        if dataset is None:
            raise ValueError("Trainer.dataset is not bound: bind it in a .gin file, e.g. `Trainer.dataset = @DigitsDataset()`")
        check_stage(run_dir, init_from, stage)
        self.run_dir, self.dataset, self.buckets, self.init_from = Path(run_dir), dataset, buckets, init_from
        self.batching = Batching(batch_size, grad_accum, num_workers, seed)
        self.optimization = Optimization(lr, betas, adam_eps, weight_decay, warmup_steps, warmup_start_factor,
                                         grad_clip, ema_decay, ema_warmup)
        self.parallelism = Parallelism(precision, strategy, num_threads, compile, fsdp_cpu_offload,
                                       activation_checkpointing, context_parallel)
        self.schedule = Schedule(max_steps, time_budget_minutes, checkpoint_every, keep_checkpoints, log_every,
                                 preview_every, max_bad_steps, clock, tuple(stop_signals))
        self.progress, self.trackers = progress, check_trackers(trackers)
        self.parallelism.refuse_with_fsdp(alignment is not None, "Trainer.alignment (REPA)")
        self.parallelism.refuse_with_fsdp(preview_every > 0, "Trainer.preview_every > 0 (previews from a sharded "
                                                             "EMA; set it to 0 and sample from the checkpoints)")
        if context_parallel > 1 and alignment is not None:
            raise ValueError("Trainer.context_parallel > 1 does not support Trainer.alignment (REPA) yet: its targets "
                             "are per token of the whole image")
        if buckets is not None and alignment is not None:
            raise ValueError("Trainer.buckets with Trainer.alignment (REPA) is not supported yet: the alignment "
                             "targets are computed for one image size; train REPA runs at one size")
        self.flow = objective or FlowMatching()
        self.objective = self.flow if alignment is None else AlignedObjective(self.flow, alignment)
        self.build_model, self.build_conditioning, self.build_codec = model, conditioning, codec

    # ------------------------------------------------------------------ set-up
    def _setup(self, allow_config_change: bool = False) -> None:
        """Processes, data stream, model, conditioning, parallelism, optimizer, then the run folder (made, locked, its
        configuration compared with this one), the resumed (or stage-2, or fresh) state, and the logs."""
        acc = self.accelerator = start_processes(self.parallelism)
        layout = self.layout = process_layout(acc.num_processes, self.parallelism.context_parallel, acc.device,
                                              "Trainer.context_parallel")
        data = open_stream(self.dataset, self.batching, acc, self.buckets,
                           DataShare(layout.data_rank, layout.data_size))
        torch.manual_seed(self.batching.seed)  # identical initialisation on every process
        model = self.build_model()
        self._check_precision(model)
        data.check_fits(model.backbone)
        for shape in data.sample_shapes(model.backbone) if layout.context is not None else ():
            self.flow.check_spread(model.backbone.token_grid((1, *shape)), layout.context_size)
        self.conditioning = self.build_conditioning()
        self.conditioning.prepare(model)
        trained = self.objective.attach(model, acc.device)
        ema = frozen_copy(model)  # before compilation: the EMA only samples previews and stays eager
        self.trained = parallelize(model, ema, trained, acc, self.parallelism, layout)
        optimizer, scheduler = self.optimization.build(self.trained.parameters(), fused_optimizer(acc, self.parallelism))
        self.optimizer = acc.prepare(optimizer)
        self.parts = TrainingParts(model, ema, optimizer, scheduler, data,
                                   extras={**self.objective.checkpoint_parts(), **adapter_parts(model, ema)})
        check_writable_folder(self.run_dir, "Trainer.run_dir")
        changes = self._claim_run_folder(allow_config_change)
        self.log = MetricsLog(self.run_dir, acc, self.schedule.max_steps, self.schedule.log_every, self.progress,
                              data.ledger, self.trackers)
        self.checkpointer = Checkpointer(self.run_dir, self.parts, acc, self.parallelism.sharded,
                                         self.schedule.keep_checkpoints, self.log.say, layout.context_size)
        self.checkpointer.resume(self.init_from, self.batching.seed)
        data.start(self.parts.progress.step)
        described = {
            "model": type(model).__name__, "backbone": type(model.backbone).__name__,
            "parameters": sum(p.numel() for p in model.parameters()), **data.describe(),
            "processes": acc.num_processes, "context_parallel": layout.context_size,
            "max_steps": self.schedule.max_steps, "lr": self.optimization.lr,
            "precision": self.parallelism.precision, "objective": {k: repr(v) for k, v in vars(self.flow).items()}}
        if acc.is_main_process:
            if changes and self.parts.progress.step > 0:
                kept = archive_config(self.run_dir, self.parts.progress.step)
                self.log.say(f"resuming with changed bindings ({'; '.join(changes)}); the earlier config.gin is kept "
                             f"as {kept}")
            write_run_configs(self.run_dir, described)
            codec = self.build_codec() if self.schedule.preview_every else None  # only previews decode
            self.previewer = Previewer(self.run_dir / "samples", self.conditioning, codec, self.dataset)
        self.log.open(self.parts.progress.step, flops_saved(model, self.objective), described)

    def _check_precision(self, model: torch.nn.Module) -> None:
        """A LoRA base held in bf16 computes only under bf16 autocast."""
        lora = lora_of(model)
        if lora is not None and lora.base_dtype == "bfloat16" and self.parallelism.precision != "bf16":
            raise ValueError(f"LoRA.base_dtype = 'bfloat16' holds the frozen base in bf16, which computes under bf16 "
                             f"autocast only: set Trainer.precision = 'bf16' (it is {self.parallelism.precision!r})")

    def _claim_run_folder(self, allow_config_change: bool) -> list[str]:
        """Lock the run folder; when it holds checkpoints, compare the configuration that trained them (its
        config.gin) with this one (see `run_config.check_resume_config`). Returns the bindings that changed."""
        self.lock = lock_for_all(self.accelerator, self.run_dir / LOCK_FILE, f"run folder {str(self.run_dir)!r}",
                                 announce)
        config = gin.config_str()
        refuse_dynamic_registration(config, "this configuration")
        saved = self.run_dir / "config.gin"
        if not (list_checkpoints(self.run_dir) and saved.is_file()):
            return []
        return check_resume_config(saved, config, allow_config_change)

    # ------------------------------------------------------------------ the loop
    def run(self, allow_config_change: bool = False) -> Path:
        """Train until max_steps, the time budget or a stop signal; returns the run folder. A resume whose
        configuration differs from the run's in more than `run_config.FREE_ON_RESUME` is refused unless
        `allow_config_change`."""
        self.lock: Optional[FolderLock] = None
        try:
            self._setup(allow_config_change)
            return self._train()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _train(self) -> Path:
        schedule, parts, progress = self.schedule, self.parts, self.parts.progress
        if progress.step >= schedule.max_steps:
            self.log.say(f"run already at step {progress.step} >= max_steps {schedule.max_steps}; nothing to do")
            return self.run_dir
        bad_in_a_row, last_saved, stopped, budget_spent = 0, -1, False, False
        parts.model.train()
        with StopSignals(schedule.stop_signals, self.log.say) as signals:
            while progress.step < schedule.max_steps and not (stopped or budget_spent):
                started = schedule.time()
                result = self._train_step()
                progress.step, progress.elapsed = progress.step + 1, progress.elapsed + schedule.time() - started
                self.log.step(progress.step, result, lambda: {"lr": parts.scheduler.get_last_lr()[0],
                                                              "elapsed_s": progress.elapsed})
                bad_in_a_row = self._count_bad(result, bad_in_a_row)
                if schedule.preview_due(progress.step) and self.accelerator.is_main_process:
                    self._preview()
                if schedule.checkpoint_due(progress.step):
                    self.checkpointer.save()
                    last_saved = progress.step
                budget_spent, stopped = self._agreed(schedule.budget_spent(progress.elapsed),
                                                     signals.received is not None)
            if budget_spent and not stopped:
                self.log.say(f"time budget of {schedule.time_budget_minutes:.1f} min spent at step {progress.step}")
            if last_saved != progress.step:
                self.checkpointer.save()
        self.log.close()
        if schedule.preview_every and not stopped and self.accelerator.is_main_process:
            self._preview()
        self.accelerator.wait_for_everyone()
        if stopped:
            raise Preempted(signals.received or "a stop signal to another process", progress.step)
        return self.run_dir

    def _preview(self) -> None:
        """Sample grids from the EMA, under the run's autocast (a LoRA base held in bf16 computes only there)."""
        with self.accelerator.autocast():
            self.previewer.save(self.parts.ema, self.parts.progress.step)

    def _train_step(self) -> StepResult:
        """One optimizer step over grad_accum micro-batches. A step whose loss or gradient norm is not finite (on any
        process) leaves the optimizer, scheduler and EMA untouched."""
        acc, parts, accumulate = self.accelerator, self.parts, self.batching.grad_accum
        started = time.perf_counter()
        totals: dict[str, float] = {}
        tokens = 0
        for micro in range(accumulate):
            batch = parts.data.next_batch()
            x0 = batch["x"].to(acc.device, non_blocking=True)
            cond = self.conditioning.from_batch(batch, acc.device)
            with nullcontext() if micro == accumulate - 1 else acc.no_sync(self.trained), acc.autocast():
                losses = self.objective.losses(self.trained, x0, cond, batch)
                acc.backward(losses["loss"] / accumulate)
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + value.item() / accumulate
            # a context group shares its samples: each process counts its share of their tokens
            grid = parts.model.backbone.token_grid(tuple(x0.shape))
            tokens += x0.shape[0] * math.prod(grid) // self.layout.context_size
        grad_norm = float(acc.clip_grad_norm_(self.trained.parameters(), self.optimization.clip_norm))
        # Under fp16 an infinite gradient is the loss scaler's business: it skips the step and lowers its scale.
        fp16 = self.parallelism.precision == "fp16"
        loss_bad, grad_bad = self._agreed(not math.isfinite(totals["loss"]), not fp16 and not math.isfinite(grad_norm))
        problem = " and ".join(part for part, bad in ((f"loss {totals['loss']}", loss_bad),
                                                      (f"gradient norm {grad_norm}", grad_bad)) if bad) or None
        if problem is None:
            self.optimizer.step()
            parts.scheduler.step()
            update_ema(parts.ema, parts.model, self.optimization.ema_decay_at(parts.progress.step))
        self.optimizer.zero_grad(set_to_none=True)
        scaler_skipped = problem is None and fp16 and acc.optimizer_step_was_skipped
        return StepResult(totals, grad_norm, tokens, problem, scaler_skipped, parts.data.label(parts.progress.step),
                          time.perf_counter() - started)

    def _count_bad(self, result: StepResult, in_a_row: int) -> int:
        """Non-finite steps in a row, counting this one; too many stop the run with its last good checkpoint."""
        if result.problem is None:
            return 0
        in_a_row, step, limit = in_a_row + 1, self.parts.progress.step, self.schedule.max_bad_steps
        self.log.say(f"step {step} skipped: non-finite {result.problem} ({in_a_row} in a row, the run stops at {limit})")
        if in_a_row >= limit:
            last = (list_checkpoints(self.run_dir) or [Path("none")])[-1].name
            raise NonFiniteTraining(f"{in_a_row} steps in a row had a non-finite loss or gradient norm (last: step "
                                    f"{step}, {result.problem}); the run stops with its last good checkpoint {last} "
                                    "intact. Lower Trainer.lr, check the data, or raise Trainer.max_bad_steps")
        return in_a_row

    def _agreed(self, *flags: bool) -> list[bool]:
        """Each flag true on any process, so that every process takes the same decision."""
        return agreed(self.accelerator, *flags)
