"""The backbone contract, runnable on any backbone: `check_backbone("my_name", **tiny_options)`.

It builds tiny SPRINT models around the backbone (perturbed, so zero-initialised gates hide no wiring) and checks
every property the seam promises, in order; the first one that fails raises `BackboneContractError` (an
AssertionError) naming the backbone, the property and the split. The properties:

- strict save and load: a saved state dict loads strictly into another instance and gives the same prediction;
- keep-all mask = no mask: a shuffled mask that keeps every token changes nothing (positions, per-token data and
  long-skip states follow the tokens);
- drop_condition replaces exactly the dropped rows, with a null condition that changes every row's prediction;
- skipped rows = mask-token path: a row that skips the middle gets exactly encoder, mask token (under
  `Sprint.fill = 'route'`: its encoder output), fusion, decoder, and the middle blocks' weights cannot change it; the
  other rows are as without skipping;
- identity fusion = dense forward: `Sprint(..., fusion_init='identity')` around the perturbed backbone computes the
  backbone's own dense forward (within 1e-6 relative) when no token is dropped, under both fills: a pretrained dense
  model converts to SPRINT exactly;
- PDG batch = two passes: PDG's doubled batch equals a strong and a middle-skipping weak pass run apart;
- gradient checkpointing gives the same gradients;
- image = one-frame video, where the backbone takes both;
- a box of the grid unembeds to its region, where the backbone declares `shards_sequence` (context parallelism; its
  attention must be sprint_mm.layers.Attention, which the two-process tests of tests/test_context_parallel.py hold).

The mask, PDG, skipped-row and identity properties run at every legal split with encoder and decoder blocks.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Union

import torch
from torch import nn

from sprint_mm.backbone import Backbone, run_stack
from sprint_mm.checkpoints import load_strict, read_state_dict, save_state_dict
from sprint_mm.context_parallel import SequenceShard
from sprint_mm.masking import TokenMasker, random_mask
from sprint_mm.models import build_backbone
from sprint_mm.sampling import Guidance, guided_velocity
from sprint_mm.sequence_split import candidate_splits
from sprint_mm.sprint import FILLS, Sprint, check_split
from sprint_mm.tokens import select_rows

BATCH = 3
TOLERANCE = dict(atol=1e-5, rtol=1e-5)
EXACT = 1e-6  # identity conversion: largest deviation from the dense forward, relative to its largest value
Split = tuple[int, int]  # (encoder_depth, decoder_depth)


class BackboneContractError(AssertionError):
    """A backbone breaks a property of the seam."""


def randomize(model: nn.Module, seed: int = 1, std: float = 0.05) -> nn.Module:
    """Perturb every parameter so that zero-initialised adaLN gates and outputs do not hide wiring errors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


class ContractCase:
    """A backbone under test: how to build it, and its legal splits."""

    def __init__(self, backbone: Union[str, Callable[..., Backbone]], options: dict[str, Any]) -> None:
        self.label = backbone if isinstance(backbone, str) else getattr(backbone, "__name__", repr(backbone))
        self.factory = backbone
        self.options = options
        probe = self.backbone()
        if not isinstance(probe, Backbone):
            raise TypeError(f"{self.label!r} built a {type(probe).__name__}, not a sprint_mm.backbone.Backbone")
        self.splits = legal_splits(probe)

    def backbone(self) -> Backbone:
        if isinstance(self.factory, str):
            return build_backbone(self.factory, **self.options)
        return self.factory(**self.options)

    def model(self, split: Split, seed: int = 0, **sprint_options: Any) -> Sprint:
        """A tiny SPRINT model in eval mode, its parameters perturbed; the same seed gives the same model."""
        torch.manual_seed(seed)
        return randomize(Sprint(self.backbone(), *split, **sprint_options), seed + 1).eval()


def legal_splits(backbone: Backbone) -> list[Split]:
    """Every (encoder_depth, decoder_depth) >= 1 that leaves a middle block and that Sprint accepts."""
    depth, splits = len(backbone.blocks), []
    for encoder in range(1, depth - 1):
        for decoder in range(1, depth - encoder):
            try:
                check_split(backbone, encoder, decoder)
            except ValueError:
                continue
            splits.append((encoder, decoder))
    if not splits:
        raise ValueError(f"{type(backbone).__name__} with {depth} blocks has no SPRINT split with an encoder, a middle "
                         "and a decoder block; build it with at least 3 blocks (and long skips that allow a split)")
    return splits


def condition(backbone: Backbone, seed: int = 0) -> Any:
    """A batch of conditions of the kind the backbone declares (never the null condition)."""
    spec, g = backbone.condition, torch.Generator().manual_seed(seed)
    if spec.kind == "class":
        return torch.randint(0, spec.num_classes, (BATCH,), generator=g)
    lengths = torch.tensor([[min(2, spec.text_length)], [spec.text_length], [1]])
    cond = {"text_tokens": torch.randn(BATCH, spec.text_length, spec.text_dim, generator=g),
            "text_mask": torch.arange(spec.text_length)[None] < lengths}
    if spec.pooled_dim:
        cond["pooled"] = torch.randn(BATCH, spec.pooled_dim, generator=g)
    return cond


def inputs(model: Sprint, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, Any]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, *model.backbone.sample_shape, generator=g)
    return x, torch.rand(BATCH, generator=g), condition(model.backbone, seed)


def tube_mask(model: Sprint, x: torch.Tensor, seed: int):
    """A 0.75 tube mask (one spatial pattern in every frame): every attention kind takes it."""
    grid = model.backbone.token_grid(tuple(x.shape))
    return TokenMasker("tube", 0.75)(BATCH, grid, generator=torch.Generator().manual_seed(seed))


def require(condition_holds: bool, message: str) -> None:
    """An AssertionError with `message` unless the condition holds (kept under `python -O`, unlike assert)."""
    if not condition_holds:
        raise AssertionError(message)


def same(a: Any, b: Any) -> bool:
    """Equal conditions: tensors equal, or dicts / tuples of them equal entry by entry."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return False


# ----------------------------------------------------------------------------------------------------- properties
@torch.no_grad()
def strict_save_and_load(case: ContractCase, split: Split) -> bool:
    model, other = case.model(split, seed=0), case.model(split, seed=5)
    x, t, cond = inputs(model)
    require(not torch.allclose(other(x, t, cond), model(x, t, cond)), "two seeds built the same model")
    with tempfile.TemporaryDirectory() as folder:
        load_strict(other, read_state_dict(save_state_dict(model.state_dict(), Path(folder) / "model.safetensors")))
    torch.testing.assert_close(other(x, t, cond), model(x, t, cond), atol=0, rtol=0)
    return True


@torch.no_grad()
def keep_all_mask_equals_no_mask(case: ContractCase, split: Split) -> bool:
    model = case.model(split)
    x, t, cond = inputs(model)
    mask = random_mask(BATCH, model.backbone.token_grid(tuple(x.shape)), 0.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model(x, t, cond, mask=mask), model(x, t, cond), **TOLERANCE)
    return True


@torch.no_grad()
def drop_condition_replaces_the_dropped_rows(case: ContractCase, split: Split) -> bool:
    model = case.model(split)
    backbone, (x, t, cond) = model.backbone, inputs(model)
    drop = torch.tensor([True, False, True])
    null, dropped = backbone.null_condition(cond), backbone.drop_condition(cond, drop)
    for row in range(BATCH):
        pick = torch.tensor([row])
        require(not same(select_rows(null, pick), select_rows(cond, pick)), f"row {row}'s null condition is its condition")
        expected = select_rows(null if drop[row] else cond, pick)
        require(same(select_rows(dropped, pick), expected),
                f"drop_condition(cond, drop={drop.tolist()}) row {row} is not the {'null' if drop[row] else 'given'} condition")
    changed = (model(x, t, null) - model(x, t, cond)).flatten(1).abs().amax(dim=1)
    require(bool((changed > 1e-6).all()), f"the null condition leaves rows {(changed <= 1e-6).nonzero().flatten().tolist()} unchanged")
    return True


@torch.no_grad()
def skipped_rows_equal_the_mask_token_path(case: ContractCase, split: Split) -> bool:
    model = case.model(split)
    x, t, cond = inputs(model)
    skip, mask = torch.tensor([True, False, True]), tube_mask(model, x, seed=2)
    out = model(x, t, cond, mask=mask, skip_middle=skip)
    # By hand: encoder, the mask token in place of the whole middle output, fusion, decoder.
    backbone = model.backbone
    encoded = run_stack(backbone, backbone.embed(x, t, cond), 0, model.encoder_depth)
    fill = encoded.tokens if model.fill == "route" else model.mask_token.expand_as(encoded.tokens)
    fused = model.fusion(torch.cat([fill, encoded.tokens], dim=-1))
    by_hand = backbone.unembed(run_stack(backbone, encoded.with_tokens(fused), model.decoder_start).tokens, encoded)
    torch.testing.assert_close(out[skip], by_hand[skip], **TOLERANCE)
    torch.testing.assert_close(out[~skip], model(x, t, cond, mask=mask)[~skip], **TOLERANCE)
    for block in model.middle_blocks:  # the middle never runs on skipped rows: its weights cannot change them
        for p in block.parameters():
            p.add_(1.0)
    torch.testing.assert_close(model(x, t, cond, mask=mask, skip_middle=skip)[skip], out[skip])
    return True


@torch.no_grad()
def identity_fusion_equals_the_dense_forward(case: ContractCase, split: Split) -> bool:
    for fill in FILLS:
        torch.manual_seed(0)
        backbone = randomize(case.backbone(), seed=1)  # every backbone weight perturbed; the wrapper's fusion is [I | 0]
        model = Sprint(backbone, *split, fusion_init="identity", fill=fill).eval()
        x, t, cond = inputs(model)
        dense, converted = backbone(x, t, cond), model(x, t, cond)
        error = float((converted - dense).abs().max() / dense.abs().max())
        require(error <= EXACT, f"with fill {fill!r} the converted model deviates from the dense forward by {error:.2e} "
                                f"of its largest value (allowed {EXACT:.0e})")
    return True


@torch.no_grad()
def pdg_batch_equals_two_passes(case: ContractCase, split: Split) -> bool:
    model = case.model(split)
    x, _, cond = inputs(model)
    t = torch.full((BATCH,), 0.6)
    guided = guided_velocity(model, x, 0.6, cond, Guidance("pdg", 2.5))
    strong = model(x, t, cond)
    weak = model(x, t, model.backbone.null_condition(cond), skip_middle=torch.ones(BATCH, dtype=torch.bool))
    torch.testing.assert_close(guided, weak + 2.5 * (strong - weak), **TOLERANCE)
    return True


def checkpointing_gives_the_same_gradients(case: ContractCase, split: Split) -> bool:
    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = case.model(split).train()
        model.backbone.gradient_checkpointing = checkpointing
        x, t, cond = inputs(model)
        mask = tube_mask(model, x, seed=1)
        model(x, t, cond, mask=mask, skip_middle=torch.tensor([False, True, False])).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, recomputed = gradients(False), gradients(True)
    require(bool(plain), "no parameter got a gradient")
    require(plain.keys() == recomputed.keys(), f"parameters with gradients differ: {sorted(plain.keys() ^ recomputed.keys())}")
    for key in plain:
        torch.testing.assert_close(recomputed[key], plain[key], atol=1e-6, rtol=1e-5, msg=lambda m: f"{key}: {m}")
    return True


@torch.no_grad()
def image_equals_a_one_frame_video(case: ContractCase, split: Split) -> bool:
    """False where the backbone does not take both images and one-frame videos."""
    model = case.model(split)
    x, t, cond = inputs(model)
    image = x if x.dim() == 4 else x[:, :, 0]
    try:
        model.backbone.token_grid((BATCH, image.shape[1], 1, *image.shape[2:]))
        model.backbone.token_grid(tuple(image.shape))
    except ValueError:
        return False
    torch.testing.assert_close(model(image, t, cond), model(image.unsqueeze(2), t, cond).squeeze(2), **TOLERANCE)
    return True


@torch.no_grad()
def boxes_unembed_to_their_regions(case: ContractCase, split: Split) -> bool:
    """False where the backbone does not declare `shards_sequence` or its grid has no box to cut (too small)."""
    model = case.model(split)
    backbone, (x, t, cond) = model.backbone, inputs(model)
    embedded = backbone.embed(x, t, cond)
    cuts = candidate_splits(embedded.grid, 2)
    if not backbone.shards_sequence or not cuts:
        return False
    hidden = run_stack(backbone, embedded).tokens
    whole = backbone.unembed(hidden, embedded)
    for cut in cuts:  # each box's tokens, unembedded alone, fill that box's region of the output
        shards = [SequenceShard(cut, part, None) for part in range(cut.parts)]
        boxes = [backbone.unembed(hidden[:, shard.token_ids(x.device)], embedded.take(shard)) for shard in shards]
        torch.testing.assert_close(cut.assemble(torch.stack(boxes), embedded.image), whole, atol=0, rtol=0,
                                   msg=lambda m: f"boxes {cut.describe()}: {m}")
    return True


# name -> (check, whether it runs at every legal split or at the first, what a backbone must do to hold it); in order
PROPERTIES: dict[str, tuple[Callable[[ContractCase, Split], bool], bool, str]] = {
    "strict save and load": (
        strict_save_and_load, False, "every tensor the prediction reads must be a parameter or a buffer"),
    "keep-all mask = no mask": (
        keep_all_mask_equals_no_mask, True,
        "per-token data must travel as tokens, positions or long skips (gathered with the tokens), not in context"),
    "drop_condition replaces the dropped rows": (
        drop_condition_replaces_the_dropped_rows, False,
        "drop_condition(cond, drop) must put the null condition exactly in the rows where drop is True"),
    "skipped rows = mask-token path": (
        skipped_rows_equal_the_mask_token_path, True,
        "no state may pass from the middle blocks to the decoder outside the seam"),
    "identity fusion = dense forward": (
        identity_fusion_equals_the_dense_forward, True,
        "with every token kept the middle must see the encoder's output of every token, and the decoder (with its "
        "long skips) what follows the middle, as in the dense forward"),
    "PDG batch = two passes": (
        pdg_batch_equals_two_passes, True, "a row's prediction must not depend on the other rows of its batch"),
    "gradient checkpointing gives the same gradients": (
        checkpointing_gives_the_same_gradients, False,
        "a block recomputed in the backward pass must compute the same (randomness from torch's global generator)"),
    "image = one-frame video": (
        image_equals_a_one_frame_video, False,
        "an image (B, C, H, W) must give what the one-frame video (B, C, 1, H, W) gives"),
    "a box of the grid unembeds to its region": (
        boxes_unembed_to_their_regions, False,
        "a backbone that declares shards_sequence must unembed the tokens of a box of its token grid (with the box's "
        "Embedded, `Embedded.take`) to that box's region of the output (B, C, [T,] H, W)"),
}


def check_backbone(backbone: Union[str, Callable[..., Backbone]], **options: Any) -> list[str]:
    """Hold a backbone to the seam: `backbone` is a registered name (the registry's or a plugin's, built with
    `options` over its gin bindings) or a Backbone class / factory called with `options`; keep the options tiny
    (a few blocks, a few tokens). Returns the properties checked (a property that does not apply, such as image =
    one-frame video for an image-only backbone, is left out); raises BackboneContractError at the first that fails."""
    case = ContractCase(backbone, options)
    checked = []
    for name, (check, every_split, rule) in PROPERTIES.items():
        applies = False
        for split in case.splits if every_split else case.splits[:1]:
            try:
                applies = check(case, split)
            except Exception as err:
                raise BackboneContractError(
                    f"backbone {case.label!r} fails {name!r} (Sprint encoder_depth {split[0]}, decoder_depth "
                    f"{split[1]}): {rule}.\n{type(err).__name__}: {err}"
                ) from err
        if applies:
            checked.append(name)
    return checked
