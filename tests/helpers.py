"""Tiny models shared by the tests."""
from __future__ import annotations

import torch

from registry import BACKBONES
from sprint_mm.sprint import Sprint


def tiny_sit(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    options = dict(hidden_size=32, depth=5, num_heads=2, input_size=8, patch_size=2, in_channels=3, num_classes=4)
    options.update(overrides)
    return BACKBONES.build("sit", **options)


def randomize(model: torch.nn.Module, seed: int = 1, std: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter so that zero-initialised adaLN gates and outputs do not hide wiring errors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_sprint(seed: int = 0, encoder_depth: int = 1, decoder_depth: int = 1, **overrides) -> Sprint:
    model = Sprint(tiny_sit(seed, **overrides), encoder_depth=encoder_depth, decoder_depth=decoder_depth)
    return randomize(model, seed + 1).eval()
