"""A trained run, loaded to sample from: the model its `config.gin` describes with a verified checkpoint's weights
(full or sharded) loaded strictly, its codec and conditioning, and the sampling settings training fixed.

Sampling must integrate the flow the model learned: the interpolation path decides the score the SDE sampler
derives from the predicted velocity, and the time shift warps the time grid. Both come from the run's configuration
(`sampling.trained_sampling`) into `TrainedRun.sampling`, and `TrainedRun.generate` samples with them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from sprint_mm import generation
from sprint_mm.checkpoints import load_strict
from sprint_mm.conditioning import build_conditioning, check_kind
from sprint_mm.density import DENSE, MiddleDensity
from sprint_mm.latents import LatentCodec, build_codec
from sprint_mm.models import build_model
from sprint_mm.run_config import parse_run_config
from sprint_mm.runs import DamagedCheckpoint, checkpoint_step, find_checkpoint, newest_intact_checkpoint, verify_checkpoint
from sprint_mm.sampling import Guidance, SamplingDefaults, sampling_flops, trained_sampling
from sprint_mm.sharded import WEIGHTS, read_weights


@dataclass
class TrainedRun:
    """A run's model in eval mode with the weights of one checkpoint, and what sampling from it needs."""

    model: nn.Module
    codec: LatentCodec
    conditioning: Any
    sampling: SamplingDefaults
    checkpoint: Path
    weights: str

    @property
    def step(self) -> int:
        return checkpoint_step(self.checkpoint)

    @property
    def kind(self) -> str:
        """What the model is conditioned on: 'class' or 'text'."""
        return self.model.backbone.condition.kind

    @property
    def num_classes(self) -> Optional[int]:
        return self.model.backbone.condition.num_classes

    def to(self, device: torch.device | str) -> TrainedRun:
        """Move the model and the codec to `device` (in place); returns the run."""
        self.model.to(device)
        self.codec.to(device)
        return self

    def generate(
        self,
        cond: Any,
        noise: torch.Tensor,
        steps: int = 50,
        solver: str = "euler",
        guidance: Guidance = Guidance(kind="none"),
        batch_size: int = 64,
        generator: Optional[torch.Generator] = None,
        progress: bool = False,
        density: MiddleDensity = DENSE,
        branches: Any = None,
    ) -> torch.Tensor:
        """Decoded samples in [-1, 1] for `cond` from `noise` (`generation.generate`), integrated along the path and
        time shift this run trained with; `density` thins the middle at the noisy steps; `branches`: CFG-parallel over
        that pair of processes."""
        return generation.generate(self.model, cond, self.codec, noise, steps, solver, guidance, batch_size, generator,
                                   progress, time_shift=self.sampling.time_shift, path=self.sampling.path,
                                   density=density, branches=branches)

    def sampling_flops(self, sample_shape: tuple[int, ...], steps: int = 50, solver: str = "euler",
                       guidance: Guidance = Guidance(kind="none"), density: MiddleDensity = DENSE) -> float:
        """Matmul FLOPs per sample of `generate` with these settings (`sampling.sampling_flops`)."""
        generation.check_needs_sprint(self.model, guidance, density)
        return sampling_flops(self.model, sample_shape, steps, solver, guidance, density, self.sampling.time_shift)


def load_run(
    run: str | os.PathLike,
    step: Optional[int] = None,
    weights: str = "ema",
    gin_params: Sequence[str] = (),
    check: Optional[Callable[[nn.Module], object]] = None,
    imports: Sequence[str] = (),
    say: Optional[Callable[[str], object]] = print,
) -> TrainedRun:
    """Rebuild a run from its config.gin (then `gin_params`) and load a checkpoint strictly: the one at `step`, which
    must be intact, or the newest intact one (a damaged newer one is passed over, and `say` tells why). The
    parsed configuration stays active.

    The config.gin is read as data (`run_config.parse_run_config`): it may import only sprint_mm's modules, installed
    backbone plugins and the modules named in `imports`, and may not include files or register dynamically.
    `check(model)` runs once the weights are in, before the conditioning (a text run's encoder) and the codec (a VAE)
    load: a request the model cannot serve fails without loading them.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; allowed: {', '.join(WEIGHTS)}")
    run = Path(run)
    checkpoint = pick_checkpoint(run, step, say)
    parse_run_config(run / "config.gin", gin_params, imports)
    model = build_model()
    file = checkpoint / f"{weights}.safetensors"
    load_strict(model, read_weights(file), str(file))
    model.float()  # a LoRA run may hold its frozen base in bf16 for training; sampling computes in fp32
    if check is not None:
        check(model)
    conditioning = build_conditioning()
    check_kind(model, conditioning.kind)
    return TrainedRun(model.eval(), build_codec(), conditioning, trained_sampling(), checkpoint, weights)


def pick_checkpoint(run: Path, step: Optional[int], say: Optional[Callable[[str], object]]) -> Path:
    """The checkpoint at `step` if it is intact, else (step None) the newest intact one, saying which damaged ones
    were passed over; a run without an intact one is one DamagedCheckpoint error naming why."""
    if step is not None:
        return verify_checkpoint(find_checkpoint(run, step))
    newest = find_checkpoint(run)  # a run without checkpoints is its own error
    folder, damaged = newest_intact_checkpoint(run)
    if folder is None:
        raise DamagedCheckpoint(f"run {str(run)!r} has no intact checkpoint: {'; '.join(damaged)}")
    if damaged and say is not None:
        say(f"[sprint_mm] {'; '.join(damaged)}: using {folder.name}, the newest intact checkpoint (newest: "
            f"{newest.name})")
    return folder
