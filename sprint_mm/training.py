"""The two-stage trainer on accelerate: AdamW, warm-up, clipping, fp32 EMA, atomic checkpoints and exact resume."""
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
from accelerate import Accelerator, DistributedDataParallelKwargs
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from sprint_mm.checkpoints import PROJECTOR_PREFIX, load_strict, read_state_dict, save_state_dict, split_projector
from sprint_mm.conditioning import build_conditioning
from sprint_mm.data.stream import IndexStream
from sprint_mm.flops import forward_flops
from sprint_mm.flow import FlowMatching
from sprint_mm.latents import build_codec, codec_is_identity
from sprint_mm.masking import TokenMask
from sprint_mm.generation import Previewer
from sprint_mm.repa import RepaAlignment
from sprint_mm.runs import list_checkpoints, publish_checkpoint, resolve_weights, staging_folder
from sprint_mm.sprint import Sprint, build_model

PRECISIONS = ("no", "fp16", "bf16")
PROJECTOR_FILE = "projector.safetensors"  # the REPA projector, beside model.safetensors, which stays loadable alone


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


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


@gin.configurable
class Trainer:
    """One training stage. Stage 1: masked pre-training; stage 2: `init_from` a stage-1 run, drop ratio 0.

    `batch_size` is global (split over processes and accumulation steps). Training stops at `max_steps` or when the
    time budget (summed over resumes) is spent, whichever comes first, and always ends with a checkpoint.

    `ema_warmup` ramps the EMA decay up from 0.1 (see `ema_decay_at`); `num_threads` sets torch's CPU threads for the
    run (on a shared CPU, 1 thread can be many times faster than one per core). A dataset with a `collate` method
    (e.g. CaptionDataset, whose caption cache may be partly filled) batches its own items.

    `alignment` (e.g. `@RepaAlignment()`) adds the REPA term: its projector trains with the model and is checkpointed
    in `projector.safetensors` (not in the EMA), so stage 2 and sampling load the model without it. A stage 2 with
    alignment starts its projector from the stage-1 checkpoint's projector file when there is one.
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
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        self.accelerator = Accelerator(
            mixed_precision=self.precision,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        acc = self.accelerator
        world = acc.num_processes
        if self.batch_size % (world * self.grad_accum):
            raise ValueError(
                f"batch_size {self.batch_size} must be divisible by processes ({world}) x grad_accum ({self.grad_accum})"
            )
        self.micro_batch = self.batch_size // (world * self.grad_accum)
        torch.manual_seed(self.seed)  # identical initialisation on every process
        self.model = build_model()
        self.conditioning = build_conditioning()
        self.conditioning.prepare(self.model)
        # Only previews decode during training: a run without previews needs no VAE folder.
        self.codec = build_codec() if self.preview_every else None
        if self.objective.uses_middle_path and not isinstance(self.model, Sprint):
            raise ValueError(
                "the objective drops tokens or paths but the model is a dense backbone: "
                "set `build_model.sprint = True`, or `FlowMatching.path_drop = 0.0` and `FlowMatching.masker = None`"
            )
        # What the optimizer trains and DDP wraps: the model, or the model paired with the REPA projector.
        self.trained = self.model if self.alignment is None else self.alignment.attach(self.model)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.trained.parameters() if p.requires_grad],
            lr=self.lr, betas=self.betas, eps=self.adam_eps, weight_decay=self.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._warmup_factor)
        self.step, self.elapsed = 0, 0.0
        self._restore()
        self.ema = copy.deepcopy(self.model).float().eval().requires_grad_(False) if self.ema is None else self.ema
        self.trained.to(acc.device)
        self.ema.to(acc.device)
        if self.alignment is not None:
            self.alignment.encoder.to(acc.device)
        self.ddp_model, self.optimizer = acc.prepare(self.trained, self.optimizer)
        if self.step > 0:
            set_rng_state(self._resumed_rng)
        else:  # each process draws its own noise, masks and drops
            torch.manual_seed(self.seed * 7919 + acc.process_index + 1)
        self.loader = iter(
            DataLoader(
                self.dataset,
                batch_size=self.micro_batch,
                sampler=IndexStream(len(self.dataset), self.seed, acc.process_index, world, start=self._data_position()),
                num_workers=self.num_workers,
                collate_fn=getattr(self.dataset, "collate", None),
                drop_last=True,
                generator=torch.Generator().manual_seed(self.seed),  # keeps the global RNG untouched
                persistent_workers=self.num_workers > 0,
            )
        )
        if acc.is_main_process:
            self._write_configs()
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "logs"))
            self.previewer = Previewer(self.run_dir / "samples", self.conditioning, self.codec, self.dataset)

    def _warmup_factor(self, step: int) -> float:
        if self.warmup_steps <= 0 or step >= self.warmup_steps:
            return 1.0
        return self.warmup_start_factor + (1.0 - self.warmup_start_factor) * step / self.warmup_steps

    def _data_position(self) -> int:
        """Dataset indices this process has consumed."""
        return self.step * self.grad_accum * self.micro_batch

    def _restore(self) -> None:
        """Resume this run from its newest checkpoint, else start stage 2 from `init_from`, else start fresh."""
        self.ema = None
        checkpoints = list_checkpoints(self.run_dir)
        if checkpoints:
            folder = checkpoints[-1]
            load_strict(self.model, read_state_dict(folder / "model.safetensors"), f"checkpoint {folder}/model.safetensors")
            self.ema = copy.deepcopy(self.model).float().eval().requires_grad_(False)
            load_strict(self.ema, read_state_dict(folder / "ema.safetensors"), f"checkpoint {folder}/ema.safetensors")
            self._restore_projector(folder, resuming=True)
            state = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=False)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step, self.elapsed = state["step"], state["elapsed"]
            rank_file = folder / f"rng_rank{self.accelerator.process_index}.pt"
            self._resumed_rng = torch.load(rank_file, map_location="cpu", weights_only=False)
            self._log(f"resumed from {folder} at step {self.step}")
        elif self.init_from:
            weights = resolve_weights(self.init_from, "ema.safetensors")
            load_strict(self.model, read_state_dict(weights), f"stage-1 weights {weights}")
            self._log(f"initialised model and EMA from {weights} (fresh optimizer)")
            self._restore_projector(weights.parent, resuming=False)

    def _restore_projector(self, folder: Path, resuming: bool) -> None:
        """Load the REPA projector saved in `folder`. Resuming, the file must exist exactly when alignment is on;
        starting stage 2, it is used when present and alignment is on, else the projector stays fresh."""
        path = folder / PROJECTOR_FILE
        if self.alignment is None:
            if resuming and path.is_file():
                raise ValueError(f"checkpoint {folder} was trained with REPA alignment ({PROJECTOR_FILE}); "
                                 "bind Trainer.alignment = @RepaAlignment() to resume it")
            return
        if not path.is_file():
            if resuming:
                raise FileNotFoundError(f"checkpoint {folder} has no {PROJECTOR_FILE}: it was trained without REPA "
                                        "alignment, so it cannot be resumed with Trainer.alignment set")
            self._log(f"no {PROJECTOR_FILE} beside {folder}: the REPA projector starts fresh")
            return
        _, projector = split_projector(read_state_dict(path))
        load_strict(self.alignment.projector, projector, f"REPA projector {path}")

    def _write_configs(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.gin").write_text(gin.config_str())
        plain = {
            "gin_bindings": gin.config_str().splitlines(),
            "model": type(self.model).__name__,
            "backbone": type(getattr(self.model, "backbone", self.model)).__name__,
            "parameters": sum(p.numel() for p in self.model.parameters()),
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
        acc = self.accelerator
        acc.wait_for_everyone()
        staging = self.run_dir / "checkpoints" / f".step_{self.step:07d}.partial"
        if acc.is_main_process:
            staging = staging_folder(self.run_dir, self.step)
        acc.wait_for_everyone()
        torch.save(rng_state(), staging / f"rng_rank{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_state_dict(self.model.state_dict(), staging / "model.safetensors")
            save_state_dict(self.ema.state_dict(), staging / "ema.safetensors")
            if self.alignment is not None:
                projector = {PROJECTOR_PREFIX + k: v for k, v in self.alignment.projector.state_dict().items()}
                save_state_dict(projector, staging / PROJECTOR_FILE)
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "step": self.step,
                    "elapsed": self.elapsed,
                    "data_position": self._data_position(),
                },
                staging / "training_state.pt",
            )
            publish_checkpoint(staging, self.step, self.keep_checkpoints)
        acc.wait_for_everyone()

    # ------------------------------------------------------------------ the loop
    def _alignment_images(self, batch: dict[str, Any]) -> Optional[torch.Tensor]:
        """The images REPA's encoder reads: the batch's `image`, or in pixel space the batch's `x` itself."""
        if self.alignment is None:
            return None
        if "image" in batch:
            return batch["image"]
        if codec_is_identity():
            return batch["x"]
        raise ValueError("REPA alignment needs the images of a latent dataset: set `LatentDataset.with_images = True`")

    def _train_step(self) -> tuple[dict[str, float], float, int]:
        """One optimizer step over grad_accum micro-batches: (losses, grad norm, tokens seen by this process)."""
        acc, core = self.accelerator, self.model
        totals: dict[str, float] = {}
        tokens = 0
        for micro in range(self.grad_accum):
            batch = next(self.loader)
            x0 = batch["x"].to(acc.device, non_blocking=True)
            images = self._alignment_images(batch)
            cond = self.conditioning.from_batch(batch, acc.device)
            sync = nullcontext() if micro == self.grad_accum - 1 else acc.no_sync(self.ddp_model)
            with sync, acc.autocast():
                losses = self.objective.losses(self.ddp_model, x0, cond, core=core, alignment=self.alignment,
                                               images=None if images is None else images.to(acc.device))
                acc.backward(losses["loss"] / self.grad_accum)
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + value.item() / self.grad_accum
            tokens += x0.shape[0] * math.prod(core.token_grid(tuple(x0.shape)))
        grad_norm = (acc.clip_grad_norm_(self.trained.parameters(), self.grad_clip) if self.grad_clip > 0
                     else torch.tensor(0.0))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_ema(self.ema, self.model, ema_decay_at(self.step, self.ema_decay, self.ema_warmup))
        return totals, float(grad_norm), tokens

    def _flop_saving(self, input_shape: tuple[int, ...]) -> Optional[float]:
        """Fraction of forward FLOPs SPRINT saves per training step against the same backbone dense."""
        if not isinstance(self.model, Sprint):
            return None
        grid = self.model.token_grid(input_shape)
        tokens = math.prod(grid)
        masker = self.objective.masker
        mask: Optional[TokenMask] = None if masker is None else masker(1, grid, generator=torch.Generator())
        kept = mask.num_kept if mask is not None else tokens
        sprint = forward_flops(self.model.flop_shape(), tokens, kept)
        dense = forward_flops(self.model.backbone.flop_shape(), tokens)
        return 1.0 - sprint / dense

    def run(self) -> Path:
        """Train until max_steps or the time budget; returns the run folder."""
        self._setup()
        acc = self.accelerator
        saving = self._flop_saving((1, *self.model.sample_shape))
        if self.step >= self.max_steps:
            self._log(f"run already at step {self.step} >= max_steps {self.max_steps}; nothing to do")
            return self.run_dir
        bar = tqdm(total=self.max_steps, initial=self.step, disable=not (self.progress and acc.is_main_process),
                   desc=self.run_dir.name, dynamic_ncols=True)
        window_losses: dict[str, float] = {}
        window_steps, window_tokens, window_start = 0, 0, time.perf_counter()
        last_saved = -1
        self.model.train()
        while self.step < self.max_steps:
            started = time.perf_counter()
            losses, grad_norm, tokens = self._train_step()
            self.step += 1
            self.elapsed += time.perf_counter() - started
            for name, value in losses.items():
                window_losses[name] = window_losses.get(name, 0.0) + value
            window_steps, window_tokens = window_steps + 1, window_tokens + tokens
            bar.update(1)
            if self.step % self.log_every == 0 or self.step == self.max_steps:
                seconds = time.perf_counter() - window_start
                metrics = {
                    "step": self.step,
                    **{name: total / window_steps for name, total in window_losses.items()},
                    "grad_norm": grad_norm,
                    "lr": self.scheduler.get_last_lr()[0],
                    "steps_per_s": window_steps / seconds,
                    "tokens_per_s": window_tokens * acc.num_processes / seconds,
                    "elapsed_s": self.elapsed,
                }
                postfix = {"loss": f"{metrics['loss']:.4f}", "it/s": f"{metrics['steps_per_s']:.2f}",
                           "tok/s": f"{metrics['tokens_per_s']:.0f}"}
                if saving is not None and saving > 0:  # stage 2 (no drop) saves nothing
                    postfix["flops saved"] = f"{100 * saving:.0f}%"
                bar.set_postfix(postfix)
                self._record(metrics)
                window_losses, window_steps, window_tokens, window_start = {}, 0, 0, time.perf_counter()
            if self.preview_every and self.step % self.preview_every == 0 and acc.is_main_process:
                self.previewer.save(self.ema, self.step)
            if self.step % self.checkpoint_every == 0:
                self.save_checkpoint()
                last_saved = self.step
            if self.time_budget is not None and self._budget_spent():
                self._log(f"time budget of {self.time_budget / 60:.1f} min spent at step {self.step}")
                break
        bar.close()
        if last_saved != self.step:
            self.save_checkpoint()
        if acc.is_main_process:
            if self.preview_every:
                self.previewer.save(self.ema, self.step)
            self.writer.close()
        acc.wait_for_everyone()
        return self.run_dir

    def _budget_spent(self) -> bool:
        """Every process stops at the same step: the main process's clock decides."""
        spent = torch.tensor([float(self.elapsed >= self.time_budget)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(spent, reduction="max").item())

    def _record(self, metrics: dict[str, float]) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        for key, value in metrics.items():
            if key != "step":
                self.writer.add_scalar(f"train/{key}", value, self.step)
