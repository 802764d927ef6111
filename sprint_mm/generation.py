"""Turning a trained model into pictures and videos: batched guided sampling, decoding, and training previews."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import gin
import torch

from sprint_mm.density import DENSE, MiddleDensity
from sprint_mm.flow import Shift
from sprint_mm.latents import LatentCodec
from sprint_mm.media import save_image_grid, save_video_preview
from sprint_mm.sampling import Guidance, sample, trained_sampling
from sprint_mm.sprint import Sprint
from sprint_mm.tokens import select_rows


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    cond: Any,
    codec: LatentCodec,
    noise: torch.Tensor,
    steps: int = 50,
    solver: str = "euler",
    guidance: Guidance = Guidance(kind="none"),
    batch_size: int = 64,
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
    time_shift: Optional[Shift] = None,
    path: str = "linear",
    density: MiddleDensity = DENSE,
    branches: Any = None,
) -> torch.Tensor:
    """Samples for `cond` from the given noise, decoded to [-1, 1], in batches of `batch_size`. `path` and
    `time_shift` are the ones the model trained with (`TrainedRun.sampling`; see `sampling.sample`); `density` thins
    the middle blocks at the noisy steps (`sprint_mm.density`); `branches`: a pair of processes that computes the
    guidance branches apart (CFG-parallel)."""
    check_needs_sprint(model, guidance, density)
    outputs = []
    for start in range(0, noise.shape[0], batch_size):
        rows = torch.arange(start, min(start + batch_size, noise.shape[0]), device=noise.device)
        latents = sample(model, noise[rows], select_rows(cond, rows), steps=steps, solver=solver,
                         guidance=guidance, path=path, generator=generator, progress=progress, time_shift=time_shift,
                         density=density, branches=branches)
        outputs.append(codec.decode(latents).clamp(-1, 1).cpu())
    return torch.cat(outputs)


def check_needs_sprint(model: torch.nn.Module, guidance: Guidance, density: MiddleDensity) -> None:
    """PDG, sparse guidance and a middle keep below 1 act on SPRINT's middle path: a dense backbone is refused."""
    if isinstance(model, Sprint):
        return
    if guidance.kind == "pdg":
        raise ValueError("PDG needs a SPRINT model (a middle path to drop); this model is a dense backbone: use cfg")
    if guidance.kind == "sparse":
        raise ValueError("sparse guidance needs a SPRINT model (a middle to run on fewer tokens); this model is a "
                         "dense backbone: use cfg")
    if density.keep < 1.0:
        raise ValueError(f"a middle keep of {density.keep:g} needs a SPRINT model (a middle to run on fewer tokens); "
                         "this model is a dense backbone: use a middle keep of 1")


def save_samples(samples: torch.Tensor, path: Path, nrow: Optional[int] = None) -> Path:
    """A PNG grid for images, a PNG strip (frames left to right) for videos."""
    if samples.dim() == 5:
        return save_video_preview(samples, path)
    return save_image_grid(samples, path, nrow=nrow)


@gin.configurable
class Previewer:
    """Periodic sample grids from the EMA with fixed noise and conditions: CFG and PDG side by side (any of
    `sampling.GUIDANCES`), sampled with the path and time shift of the configuration parsed when it is made (the
    run's own) and `density` (e.g. `Previewer.density = @MiddleDensity()` with `MiddleDensity.keep = 0.25`)."""

    def __init__(
        self,
        folder: Path,
        conditioning: Any,
        codec: LatentCodec,
        dataset: Any,
        count: int = 20,
        steps: int = 25,
        solver: str = "euler",
        scale: float = 2.0,
        guidances: Sequence[str] = ("cfg", "pdg"),
        prompts: Optional[Sequence[str]] = None,
        seed: int = 0,
        density: Optional[MiddleDensity] = None,
    ) -> None:
        self.folder = Path(folder)
        self.conditioning, self.codec, self.dataset = conditioning, codec, dataset
        self.count, self.steps, self.solver, self.scale = count, steps, solver, scale
        self.guidances, self.prompts, self.seed = tuple(guidances), prompts, seed
        self.density = density or DENSE
        self.sampling = trained_sampling()

    def _request(self, model: torch.nn.Module) -> tuple[Optional[list[int]], Optional[list[str]]]:
        if self.conditioning.kind == "class":
            classes = model.backbone.condition.num_classes
            return [i % classes for i in range(self.count)], None
        prompts = list(self.prompts or getattr(self.dataset, "captions", [])[: self.count])
        if not prompts:
            raise ValueError("text previews need `Previewer.prompts` (the dataset exposes no `captions`)")
        return None, prompts

    @torch.no_grad()
    def save(self, model: torch.nn.Module, step: int) -> list[Path]:
        """Write one grid per guidance kind; the global RNG is left exactly as it was."""
        device = next(model.parameters()).device
        labels, prompts = self._request(model)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            cond = self.conditioning.from_request(labels, prompts, device)
            n = len(labels or prompts)
            generator = torch.Generator(device=device).manual_seed(self.seed)
            noise = torch.randn((n, *model.backbone.sample_shape), generator=generator, device=device)
            paths = []
            density = self.density if isinstance(model, Sprint) else DENSE
            for kind in self.guidances:
                if kind in ("pdg", "sparse") and not isinstance(model, Sprint):
                    continue
                samples = generate(model, cond, self.codec.to(device), noise, self.steps, self.solver,
                                   Guidance(kind, self.scale), time_shift=self.sampling.time_shift,
                                   path=self.sampling.path, density=density)
                nrow = 10 if labels is not None else None
                paths.append(save_samples(samples, self.folder / f"step_{step:07d}_{kind}.png", nrow=nrow))
        return paths
