"""The official SPRINT code's training step, for train_speed.py's side-by-side measurement only.

Nothing of the official code is in this repository (its licence is non-commercial): the user points `--official` at
a local copy of it (the repository's root, holding `src/models/sit.py`), and this module imports its SiT, its flow
matching loss, its EMA update and its per-block compilation from there, and takes a step the way its train.py does:
`FlowMatching.compute_loss` (log-normal times, its structured masks), backward, `clip_grad_norm_` at 1, AdamW as
train.py builds it (torch's default implementation for CPU tensors), `zero_grad`, `update_ema`.

Two imports of the official code need what a CPU machine may lack: timm (its Mlp; `pip install timm`) and triton
(its norms module imports it but the RMSNorm it builds never calls it). Without triton installed, an empty stand-in
module is put in its place for that import, and the result records that it was.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import nn

DROP_RATIO = 0.75  # train_speed.py's; the official masks support it as 2x2 groups keeping 1


class OfficialCodeMissing(RuntimeError):
    """The path given for the official code does not hold it (or its imports fail)."""


def load_official(path: str | Path) -> SimpleNamespace:
    """The official SiT, FlowMatching, update_ema and apply_compile imported from the copy at `path`."""
    root = Path(path)
    if not (root / "src" / "models" / "sit.py").is_file():
        raise OfficialCodeMissing(f"no official SPRINT code at {str(root)!r} (expected src/models/sit.py there); "
                                  "the side-by-side measurement is skipped")
    stand_in = _stand_in_for_triton()
    sys.path.insert(0, str(root))
    try:
        sit = importlib.import_module("src.models.sit")
        flow = importlib.import_module("src.scheduler.flow_matching")
        utils = importlib.import_module("src.utils.utils")
        parallelize = importlib.import_module("src.utils.parallelize")
    except ImportError as err:
        raise OfficialCodeMissing(f"the official code at {str(root)!r} does not import: {err} (it needs timm: "
                                  "`pip install timm`)") from err
    finally:
        sys.path.remove(str(root))
    return SimpleNamespace(SiT=sit.SiT, FlowMatching=flow.FlowMatching, update_ema=utils.update_ema,
                           apply_compile=parallelize.apply_compile, root=str(root), triton_stand_in=stand_in)


def _stand_in_for_triton() -> bool:
    """Put an empty `triton` module in place when triton is not installed; whether it did."""
    try:
        importlib.import_module("triton")
        return False
    except ImportError:
        triton = types.ModuleType("triton")
        triton.language = types.ModuleType("triton.language")
        sys.modules.setdefault("triton", triton)
        sys.modules.setdefault("triton.language", triton.language)
        return True


def official_model(official: SimpleNamespace, sprint: bool, hidden: int, heads: int, depth: int, encoder: int,
                   decoder: int, latent: int, seed: int = 0) -> nn.Module:
    """The official SiT at our sizes: SPRINT E / M / L with the concat-linear fusion, or dense (all blocks in its
    middle stack, no fusion); q/k RMSNorm, 2D RoPE, GELU MLP of ratio 4, patch 2, 4 channels, 1000 classes, as ours;
    `cfg_mask_prob` 0: no path-dropped rows."""
    options = dict(context_size=latent, patch_size=2, in_channels=4, hidden_size=hidden, num_heads=heads,
                   num_classes=1000, q_norm="rmsnorm", k_norm="rmsnorm", cfg_mask_prob=0.0, class_dropout_prob=0.1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if sprint:
            return official.SiT(encoder_depth=encoder, middle_depth=depth - encoder - decoder, decoder_depth=decoder,
                                residual_type="concat_linear", **options)
        return official.SiT(encoder_depth=0, middle_depth=depth, decoder_depth=0, residual_type="baseline", **options)


class _NoAutocast:
    """The accelerator stand-in compute_loss asks for an autocast context (fp32 here)."""

    @staticmethod
    def autocast() -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class OfficialStep:
    """One step of the official train.py on a fixed batch (see the module docstring)."""

    def __init__(self, official: SimpleNamespace, model: nn.Module, x: torch.Tensor, labels: torch.Tensor,
                 sprint: bool, compile_blocks: bool = False) -> None:
        self.official, self.model = official, model.train()
        self.ema = copy.deepcopy(model).requires_grad_(False)
        if compile_blocks:
            official.apply_compile(model, SimpleNamespace(backend="inductor"))
        self.loss_fn = official.FlowMatching(prediction="v", path_type="linear", weighting="lognormal",
                                             encoders=None, accelerator=_NoAutocast())
        self.mask_config = SimpleNamespace(mask_ratio=DROP_RATIO if sprint else 0.0,
                                           mask_type="structured_with_random_offset")
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0,
                                           eps=1e-8)
        self.x, self.labels = x, labels

    def loss(self) -> torch.Tensor:
        loss, projection = self.loss_fn.compute_loss(self.model, self.x, dict(y=self.labels), zs=None,
                                                     mask_config=self.mask_config)
        return loss + 0.5 * projection

    def __call__(self) -> None:
        self.loss().backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.official.update_ema(self.ema, self.model, decay=0.9999)


def official_steps(official: SimpleNamespace, args: Any, latent: int, x: torch.Tensor, labels: torch.Tensor,
                   compiled: bool) -> dict[str, Callable[[], None]]:
    """'official_sprint' and 'official_dense' (with a '_compiled' suffix when `compiled`) steps on the batch."""
    suffix = "_compiled" if compiled else ""
    return {f"official_{arm}{suffix}": OfficialStep(
        official, official_model(official, arm == "sprint", args.hidden, args.heads, args.depth, args.encoder,
                                 args.decoder, latent).to(x.device), x, labels, arm == "sprint", compiled)
            for arm in ("sprint", "dense")}
