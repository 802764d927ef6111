"""The two-stage trainer on accelerate: AdamW, warm-up, clipping, fp32 EMA, atomic checkpoints and exact resume.

`TrainState` is everything a run resumes from, saved and restored in one place; `Trainer.run` is the loop.
"""
from __future__ import annotations

import copy
import json
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import gin
import numpy as np
import torch
from accelerate import Accelerator
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from sprint_mm.checkpoints import load_strict, read_state_dict, save_state_dict
from sprint_mm.conditioning import build_conditioning
from sprint_mm.data.stream import IndexStream
from sprint_mm.flops import forward_flops
from sprint_mm.flow import FlowMatching
from sprint_mm.generation import Previewer
from sprint_mm.latents import build_codec
from sprint_mm.models import build_model
from sprint_mm.repa import RepaAlignment, check_no_projector
from sprint_mm.runs import list_checkpoints, publish_checkpoint, resolve_weights, staging_folder
from sprint_mm.sprint import Sprint

PRECISIONS = ("no", "fp16", "bf16")


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The EMA decay of update number `step` (0-based). With warm-up it is min(decay, (1 + step) / (10 + step)), so a
    short run's EMA follows the model early instead of holding its random initial weights."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().float(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An fp32 copy that never trains: the EMA."""
    return copy.deepcopy(model).float().eval().requires_grad_(False)


class Replicated(DistributedDataParallel):
    """DDP over the trained module that still names its backbone, as every model does (the loss reads it)."""

    @property
    def backbone(self) -> torch.nn.Module:
        return self.module.backbone


class TrainState:
    """What a run resumes from: model, EMA, optimizer, scheduler, step, elapsed time and the REPA projector (the
    data position follows from the step); with every process's RNG, saved in one checkpoint folder.

        step_NNNNNNN/model.safetensors, ema.safetensors, [projector.safetensors], training_state.pt, rng_rank{r}.pt
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, alignment: Optional[RepaAlignment]) -> None:
        self.model, self.optimizer, self.scheduler, self.alignment = model, optimizer, scheduler, alignment
        self.ema = frozen_copy(model)
        self.step, self.elapsed = 0, 0.0

    def save(self, staging: Path, data_position: int, process_index: int) -> None:
        """Write this process's RNG and, from the main process, everything else into the staging folder."""
        torch.save(rng_state(), staging / f"rng_rank{process_index}.pt")
        if process_index != 0:
            return
        save_state_dict(self.model.state_dict(), staging / "model.safetensors")
        save_state_dict(self.ema.state_dict(), staging / "ema.safetensors")
        if self.alignment is not None:
            self.alignment.save(staging)
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "step": self.step, "elapsed": self.elapsed, "data_position": data_position},
                   staging / "training_state.pt")

    def restore(self, folder: Path, process_index: int) -> dict[str, Any]:
        """Load a checkpoint of this run; returns this process's RNG state to set once training starts."""
        load_strict(self.model, read_state_dict(folder / "model.safetensors"), f"checkpoint {folder}/model.safetensors")
        load_strict(self.ema, read_state_dict(folder / "ema.safetensors"), f"checkpoint {folder}/ema.safetensors")
        if self.alignment is None:
            check_no_projector(folder)
        else:
            self.alignment.restore(folder, resuming=True)
        state = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        return torch.load(folder / f"rng_rank{process_index}.pt", map_location="cpu", weights_only=False)

    def start_from(self, weights: Path) -> Optional[str]:
        """Stage 2: model and EMA from a stage-1 EMA file (strictly), the projector from beside it when there is one;
        returns a line for the log about the projector, or None."""
        load_strict(self.model, read_state_dict(weights), f"stage-1 weights {weights}")
        self.ema.load_state_dict(self.model.state_dict())
        return None if self.alignment is None else self.alignment.restore(weights.parent, resuming=False)


@gin.configurable
class Trainer:
    """One training stage. Stage 1: masked pre-training; stage 2: `init_from` a stage-1 run, drop ratio 0.

    `batch_size` is global (split over processes and accumulation steps). Training stops at `max_steps` or when the
    time budget (summed over resumes) is spent, whichever comes first, and always ends with a checkpoint.

    `ema_warmup` ramps the EMA decay up from 0.1 (see `ema_decay_at`); `num_threads` sets torch's CPU threads for the
    run (on a shared CPU, 1 thread can be many times faster than one per core). A dataset with a `collate` method
    (e.g. CaptionDataset, whose caption cache may be partly filled) batches its own items.

    `alignment` (e.g. `@RepaAlignment()`) adds the REPA auxiliary loss, which owns its projector and its file
    (`projector.safetensors` beside the weights, not in the EMA). A stage 2 with alignment starts its projector from
    the stage-1 checkpoint's projector file when there is one.
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
    ) -> None:
        if dataset is None:
            raise ValueError("Trainer.dataset is not bound: bind it in a .gin file, e.g. `Trainer.dataset = @DigitsDataset()`")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
        for name, value in (("batch_size", batch_size), ("grad_accum", grad_accum), ("max_steps", max_steps),
                            ("num_threads", 1 if num_threads is None else num_threads)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.run_dir = Path(run_dir)
        self.dataset = dataset
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

    # ------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        """Processes, the train state (resumed, or stage 2's start), the data stream and the logs."""
        self._start_processes()
        self._build_state()
        resumed_rng = self._restore()
        self._distribute()
        if resumed_rng is not None:
            set_rng_state(resumed_rng)
        else:  # each process draws its own noise, masks and drops
            torch.manual_seed(self.seed * 7919 + self.accelerator.process_index + 1)
        self.loader = self._batches()
        if self.accelerator.is_main_process:
            self._open_logs()

    def _start_processes(self) -> None:
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        acc = self.accelerator = Accelerator(mixed_precision=self.precision)
        if self.batch_size % (acc.num_processes * self.grad_accum):
            raise ValueError(f"batch_size {self.batch_size} must be divisible by processes ({acc.num_processes}) x "
                             f"grad_accum ({self.grad_accum})")
        self.micro_batch = self.batch_size // (acc.num_processes * self.grad_accum)

    def _build_state(self) -> None:
        """The model the configuration names, its conditioning, the optimizer and a fresh train state."""
        torch.manual_seed(self.seed)  # identical initialisation on every process
        model = build_model()
        if self.objective.uses_middle_path and not isinstance(model, Sprint):
            raise ValueError(
                "the objective drops tokens or paths but the model is a dense backbone: "
                "set `build_model.sprint = True`, or `FlowMatching.path_drop = 0.0` and `FlowMatching.masker = None`"
            )
        self.conditioning = build_conditioning()
        self.conditioning.prepare(model)
        # What the optimizer trains and DDP wraps: the model, or the model paired with the REPA projector.
        self.trained = model if self.alignment is None else self.alignment.attach(model)
        optimizer = torch.optim.AdamW([p for p in self.trained.parameters() if p.requires_grad], lr=self.lr,
                                      betas=self.betas, eps=self.adam_eps, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._warmup_factor)
        self.state = TrainState(model, optimizer, scheduler, self.alignment)

    def _distribute(self) -> None:
        """Move everything to this process's device; with several processes, DDP over the trained module."""
        acc = self.accelerator
        self.trained.to(acc.device)
        self.state.ema.to(acc.device)
        if self.alignment is not None:
            self.alignment.to(acc.device)
        self.optimizer = acc.prepare(self.state.optimizer)
        if acc.num_processes > 1:
            device_ids = [acc.local_process_index] if acc.device.type == "cuda" else None
            self.trained = Replicated(self.trained, device_ids=device_ids, find_unused_parameters=True)

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
        """Dataset indices this process has consumed."""
        return self.state.step * self.grad_accum * self.micro_batch

    def _restore(self) -> Optional[dict[str, Any]]:
        """Resume this run from its newest checkpoint (returns this process's RNG state), else start stage 2 from
        `init_from`, else start fresh."""
        checkpoints = list_checkpoints(self.run_dir)
        if checkpoints:
            rng = self.state.restore(checkpoints[-1], self.accelerator.process_index)
            self._log(f"resumed from {checkpoints[-1]} at step {self.state.step}")
            return rng
        if self.init_from:
            weights = resolve_weights(self.init_from, "ema.safetensors")
            note = self.state.start_from(weights)
            self._log(f"initialised model and EMA from {weights} (fresh optimizer)")
            if note:
                self._log(note)
        return None

    def _batches(self):
        """The endless stream of micro-batches of this process, from the data position of the current step."""
        acc = self.accelerator
        sampler = IndexStream(len(self.dataset), self.seed, acc.process_index, acc.num_processes,
                              start=self._data_position())
        return iter(DataLoader(
            self.dataset, batch_size=self.micro_batch, sampler=sampler, num_workers=self.num_workers,
            collate_fn=getattr(self.dataset, "collate", None), drop_last=True,
            generator=torch.Generator().manual_seed(self.seed),  # keeps the global RNG untouched
            persistent_workers=self.num_workers > 0,
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
            "batch_size": self.batch_size,
            "micro_batch": self.micro_batch,
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
        """Every process writes into a hidden staging folder, which the main process then renames into place."""
        acc = self.accelerator
        acc.wait_for_everyone()
        staging = self.run_dir / "checkpoints" / f".step_{self.state.step:07d}.partial"
        if acc.is_main_process:
            staging = staging_folder(self.run_dir, self.state.step)
        acc.wait_for_everyone()
        self.state.save(staging, self._data_position(), acc.process_index)
        acc.wait_for_everyone()
        if acc.is_main_process:
            publish_checkpoint(staging, self.state.step, self.keep_checkpoints)
        acc.wait_for_everyone()

    # ------------------------------------------------------------------ the loop
    def _train_step(self) -> tuple[dict[str, float], float, int]:
        """One optimizer step over grad_accum micro-batches: (mean losses, grad norm, tokens seen by this process)."""
        acc, state = self.accelerator, self.state
        totals: dict[str, float] = {}
        tokens = 0
        for micro in range(self.grad_accum):
            batch = next(self.loader)
            x0 = batch["x"].to(acc.device, non_blocking=True)
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
        grad_norm = (acc.clip_grad_norm_(self.trained.parameters(), self.grad_clip) if self.grad_clip > 0
                     else torch.tensor(0.0))
        self.optimizer.step()
        state.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_ema(state.ema, state.model, ema_decay_at(state.step, self.ema_decay, self.ema_warmup))
        return totals, float(grad_norm), tokens

    def _flop_saving(self) -> Optional[float]:
        """Fraction of forward FLOPs SPRINT saves per training step against the same backbone dense."""
        model = self.state.model
        if not isinstance(model, Sprint):
            return None
        grid = model.backbone.token_grid((1, *model.backbone.sample_shape))
        tokens = math.prod(grid)
        masker = self.objective.masker
        mask = None if masker is None else masker(1, grid, generator=torch.Generator())
        kept = tokens if mask is None else mask.num_kept
        return 1.0 - forward_flops(model.flop_shape(), tokens, kept) / forward_flops(model.backbone.flop_shape(), tokens)

    def run(self) -> Path:
        """Train until max_steps or the time budget; returns the run folder."""
        self._setup()
        acc, state = self.accelerator, self.state
        if state.step >= self.max_steps:
            self._log(f"run already at step {state.step} >= max_steps {self.max_steps}; nothing to do")
            return self.run_dir
        saving = self._flop_saving()
        bar = tqdm(total=self.max_steps, initial=state.step, disable=not (self.progress and acc.is_main_process),
                   desc=self.run_dir.name, dynamic_ncols=True)
        window = Window()
        last_saved = -1
        state.model.train()
        while state.step < self.max_steps:
            started = time.perf_counter()
            losses, grad_norm, tokens = self._train_step()
            state.step += 1
            state.elapsed += time.perf_counter() - started
            window.add(losses, tokens)
            bar.update(1)
            if state.step % self.log_every == 0 or state.step == self.max_steps:
                metrics = {"step": state.step, **window.means(acc.num_processes), "grad_norm": grad_norm,
                           "lr": state.scheduler.get_last_lr()[0], "elapsed_s": state.elapsed}
                postfix = {"loss": f"{metrics['loss']:.4f}", "it/s": f"{metrics['steps_per_s']:.2f}",
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
            if self.time_budget is not None and self._budget_spent():
                self._log(f"time budget of {self.time_budget / 60:.1f} min spent at step {state.step}")
                break
        bar.close()
        if last_saved != state.step:
            self.save_checkpoint()
        if acc.is_main_process:
            if self.preview_every:
                self.previewer.save(state.ema, state.step)
            self.writer.close()
        acc.wait_for_everyone()
        return self.run_dir

    def _budget_spent(self) -> bool:
        """Every process stops at the same step: the main process's clock decides."""
        spent = torch.tensor([float(self.state.elapsed >= self.time_budget)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(spent, reduction="max").item())

    def _record(self, metrics: dict[str, float]) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        for key, value in metrics.items():
            if key != "step":
                self.writer.add_scalar(f"train/{key}", value, self.state.step)


class Window:
    """Losses, steps and tokens since the last log line."""

    def __init__(self) -> None:
        self.losses: dict[str, float] = {}
        self.steps, self.tokens, self.start = 0, 0, time.perf_counter()

    def add(self, losses: dict[str, float], tokens: int) -> None:
        for name, value in losses.items():
            self.losses[name] = self.losses.get(name, 0.0) + value
        self.steps, self.tokens = self.steps + 1, self.tokens + tokens

    def means(self, processes: int) -> dict[str, float]:
        """Mean losses and the rates of the window (tokens over all processes)."""
        seconds = time.perf_counter() - self.start
        return {**{name: total / self.steps for name, total in self.losses.items()},
                "steps_per_s": self.steps / seconds, "tokens_per_s": self.tokens * processes / seconds}
