"""REPA: align a hidden state of the diffusion model with the patch features of a frozen DINOv2 (SPEC section 3).

Where: after `depth` blocks, counted over the backbone's blocks in order (REPA's convention: depth 8 is the output of
the 8th block). In a SPRINT model a point in the encoder or decoder covers all N tokens; a point in the middle covers
only the kept tokens of the rows that ran the middle, and the targets are gathered with the same rows and `ids_keep`.
Rows whose middle was path-dropped never compute that state, so they contribute no alignment term (a batch in which
every row was path-dropped has a zero alignment loss).

Targets: the encoder sees each image resized to exactly (patch * h, patch * w) pixels, where (h, w) is the diffusion
model's token grid, so it gives one feature per model token at any resolution and aspect ratio.

Loss: mean over (rows, tokens) of -cos(target, projector(h)); the trainer adds `coeff` times it to the flow loss.
The projector trains with the model and is saved in `projector.safetensors` beside each checkpoint's weights (not in
them, so stage 2 and sampling load the model alone); sampling never needs it nor the encoder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import gin
import torch
import torch.nn.functional as F
from torch import nn

from sprint_mm.backbone import Grid
from sprint_mm.checkpoints import PROJECTOR_PREFIX, load_strict, read_state_dict, save_state_dict, split_projector
from sprint_mm.dinov2 import IMAGENET_MEAN, IMAGENET_STD, load_dinov2
from sprint_mm.latents import codec_is_identity
from sprint_mm.masking import TokenMask
from sprint_mm.sprint import Sprint, middle_rows
from sprint_mm.tokens import gather_tokens

PROJECTOR_FILE = "projector.safetensors"


def build_projector(hidden_size: int, projector_dim: int, feature_dim: int) -> nn.Sequential:
    """Linear(D, P) - SiLU - Linear(P, P) - SiLU - Linear(P, z): keys 0/2/4 as SPRINT and REPA store them."""
    projector = nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, feature_dim),
    )
    for layer in projector:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return projector


@dataclass
class AlignedState:
    """The projected hidden state and the part of the batch it covers."""

    features: torch.Tensor  # (R, M, z)
    rows: Optional[torch.Tensor] = None  # (R,) batch rows; None = every row
    ids: Optional[torch.Tensor] = None  # (R, M) token indices of the full grid; None = every token


class AlignedModel(nn.Module):
    """The diffusion model and the projector as one module (what DDP wraps in training, so one graph holds every
    trained parameter). forward returns the model's prediction and keeps the projected state after `depth` blocks in
    `state` for the alignment loss (None when no row computed it: every row path-dropped with the point in the
    middle)."""

    def __init__(self, model: nn.Module, projector: nn.Sequential, depth: int) -> None:
        super().__init__()
        self.model = model
        self.projector = projector
        self.depth = depth
        self.state: Optional[AlignedState] = None
        blocks = len(model.backbone.blocks)
        self.sparse = isinstance(model, Sprint) and model.encoder_depth < depth <= blocks - model.decoder_depth

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any, **flags: Any) -> torch.Tensor:
        """The model's prediction; flags (a SPRINT model's `mask` and `skip_middle`) pass through."""
        mask: Optional[TokenMask] = flags.get("mask")
        skip_middle: Optional[torch.Tensor] = flags.get("skip_middle")
        captured: list[torch.Tensor] = []
        block = self.backbone.blocks[self.depth - 1]
        handle = block.register_forward_hook(lambda _module, _args, output: captured.append(output))
        try:
            pred = self.model(x, t, cond, **flags)
        finally:
            handle.remove()
        self.state = None
        if captured:
            self.state = AlignedState(self.projector(captured[0]))  # (R, M, z)
            if self.sparse:
                self.state.rows = middle_rows(x.shape[0], skip_middle, x.device)
                self.state.ids = None if mask is None else mask.ids_keep.to(x.device)[self.state.rows]
        return pred


@gin.configurable
class RepaAlignment:
    """The REPA auxiliary loss: a frozen DINOv2 loaded from `encoder_path` and, once `attach`ed to a model, the
    projector of its hidden state after `depth` blocks to the DINOv2 feature size, trained with the model and kept in
    its own file beside a checkpoint's weights. `coeff` weighs the alignment loss against the flow loss."""

    def __init__(self, encoder_path: str, depth: int = 8, coeff: float = 0.5, projector_dim: int = 2048) -> None:
        if depth < 1:
            raise ValueError(f"RepaAlignment.depth must be >= 1 (the state after that many blocks), got {depth}")
        if projector_dim < 1:
            raise ValueError(f"RepaAlignment.projector_dim must be >= 1, got {projector_dim}")
        self.depth, self.coeff, self.projector_dim = depth, coeff, projector_dim
        self.encoder = load_dinov2(encoder_path)
        self.aligned: Optional[AlignedModel] = None

    @property
    def feature_dim(self) -> int:
        return self.encoder.config.hidden_size

    @property
    def projector(self) -> nn.Sequential:
        if self.aligned is None:
            raise RuntimeError("RepaAlignment has no projector before it is attached to a model")
        return self.aligned.projector

    def attach(self, model: nn.Module) -> AlignedModel:
        """Build a fresh projector for `model` (a Sprint or a dense backbone) and pair the two."""
        backbone = model.backbone
        blocks = len(backbone.blocks)
        if not 1 <= self.depth <= blocks:
            raise ValueError(
                f"RepaAlignment.depth {self.depth} is out of range: the state is taken after `depth` blocks and the "
                f"model has {blocks}; allowed 1..{blocks}"
            )
        projector = build_projector(backbone.hidden_size, self.projector_dim, self.feature_dim)
        self.aligned = AlignedModel(model, projector, self.depth)
        return self.aligned

    # ---------------------------------------------------------------- the projector's file (a checkpoint part)
    files = (PROJECTOR_FILE,)

    def save(self, folder: Path) -> None:
        """Write the projector as `projector.safetensors` in a checkpoint folder (in SPRINT's key layout)."""
        state = {PROJECTOR_PREFIX + k: v for k, v in self.projector.state_dict().items()}
        save_state_dict(state, folder / PROJECTOR_FILE)

    def load(self, folder: Path) -> None:
        """Load the projector saved in a checkpoint folder (strictly)."""
        path = folder / PROJECTOR_FILE
        _, projector = split_projector(read_state_dict(path))
        load_strict(self.projector, projector, f"REPA projector {path}")

    def start_from(self, folder: Path) -> Optional[str]:
        """Stage 2: the stage-1 projector when the checkpoint has one, else a fresh projector (and a line saying so)."""
        if not (folder / PROJECTOR_FILE).is_file():
            return f"no {PROJECTOR_FILE} beside {folder}: the REPA projector starts fresh"
        self.load(folder)
        return None

    # ---------------------------------------------------------------- the loss
    def images(self, batch: dict[str, Any]) -> torch.Tensor:
        """The images the encoder reads: the batch's `image`, or in pixel space the batch's `x` itself."""
        if "image" in batch:
            return batch["image"]
        if codec_is_identity():
            return batch["x"]
        raise ValueError("REPA alignment needs the images of a latent dataset: set `LatentDataset.with_images = True`")

    @torch.no_grad()
    def targets(self, images: torch.Tensor, grid: Grid) -> torch.Tensor:
        """Encoder patch features (B, h * w, z), one per token of the (1, h, w) grid; images (B, 1 or 3, H, W) are
        uint8 or floats in [-1, 1]."""
        if grid[0] != 1:
            raise ValueError(f"REPA alignment is for images; the model's token grid {grid} has {grid[0]} frames")
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"REPA alignment takes images (B, 1 or 3, H, W), got shape {tuple(images.shape)}")
        pixels = images.float() / 255 if images.dtype == torch.uint8 else (images.float() + 1) / 2  # [0, 1]
        pixels = pixels.expand(-1, 3, -1, -1)  # grey -> RGB
        mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=pixels.device).view(1, 3, 1, 1)
        patch = self.encoder.config.patch_size
        size = (patch * grid[1], patch * grid[2])
        pixels = F.interpolate((pixels - mean) / std, size=size, mode="bicubic", align_corners=False)
        dtype = next(self.encoder.parameters()).dtype
        tokens = self.encoder(pixel_values=pixels.to(dtype)).last_hidden_state  # layer-normed: CLS, registers, patches
        return tokens[:, 1 + getattr(self.encoder.config, "num_register_tokens", 0) :]

    def loss(self, images: torch.Tensor, grid: Grid) -> torch.Tensor:
        """Mean over the (rows, tokens) the last forward covered of -cos(target, projected state); zero when no row
        computed the state (still a function of the projector, so that every trained parameter is in the graph)."""
        state = None if self.aligned is None else self.aligned.state
        if state is None:
            return torch.zeros((), device=images.device)
        if state.features.shape[0] == 0:  # every row skipped the middle blocks that hold the state
            return state.features.sum()
        targets = self.targets(images.to(state.features.device), grid)  # (B, N, z)
        if state.rows is not None:
            targets = targets[state.rows]
        if state.ids is not None:
            targets = gather_tokens(targets, state.ids)
        return -F.cosine_similarity(state.features.float(), targets.float(), dim=-1).mean()


class AlignedObjective:
    """An objective with REPA's alignment term: loss = denoise_loss + coeff * repa_loss. What trains is the model
    paired with the projector (one module, so DDP sees one graph); the projector is a checkpoint part of its own."""

    def __init__(self, objective: Any, alignment: RepaAlignment) -> None:
        self.objective, self.alignment = objective, alignment

    def attach(self, model: nn.Module, device: torch.device) -> AlignedModel:
        self.alignment.encoder.to(device)
        return self.alignment.attach(self.objective.attach(model, device))

    def losses(self, trained: nn.Module, x0: torch.Tensor, cond: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        denoise = self.objective.losses(trained, x0, cond, batch)["loss"]
        grid = trained.backbone.token_grid(tuple(x0.shape))
        repa = self.alignment.loss(self.alignment.images(batch), grid)
        return {"loss": denoise + self.alignment.coeff * repa, "denoise_loss": denoise, "repa_loss": repa}

    def kept_tokens(self, grid: Grid) -> int:
        return self.objective.kept_tokens(grid)

    def checkpoint_parts(self) -> dict[str, RepaAlignment]:
        return {"REPA alignment": self.alignment}
