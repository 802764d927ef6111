"""The two-process side of tests/test_context_parallel.py, in one torchrun launch (starting processes is the slow part):

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/context_worker.py ROOT

1. Module checks: tiny models run on both processes whole and then spread over the two (context parallel 2); the
   prediction, the gradients (each process's summed over the group and divided by 2, as FSDP and DDP reduce them)
   and the guided velocities are written to ROOT/checks.json with their largest differences.
2. Training runs of tests/test_context_parallel.py (text-to-video, context parallel 2) and the resume of a
   one-process run on two.
3. sample.py with --context-parallel 2 and with --cfg-parallel.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from sprint_mm.cli import sample_main
from sprint_mm.masking import TokenMasker
from sprint_mm.models import build_backbone
from sprint_mm.parallelize import end_processes, process_layout, spread_model
from sprint_mm.sampling import Guidance, guided_velocity
from sprint_mm.sprint import Sprint
from sprint_mm.testing import randomize
from tests import my_dit
from tests.families import CONFIGS as FAMILY_CONFIGS, SAMPLES as FAMILY_SAMPLES

BATCH = 3
TEXT = dict(conditioning="text", text_dim=16, text_length=5)
CASES: dict[str, dict[str, Any]] = {  # name -> backbone, its options, SPRINT split (None: dense), mask kind
    "text video SPRINT": dict(backbone="text_dit", options=dict(input_size=(8, 8, 8), patch_size=(2, 2, 2), **TEXT),
                              split=(1, 1), mask="structured"),
    "text video dense": dict(backbone="text_dit", options=dict(input_size=(8, 8, 8), patch_size=(2, 2, 2), **TEXT),
                             split=None, mask=None),
    "text video SPRINT, activation checkpointing": dict(
        backbone="text_dit", options=dict(input_size=(8, 8, 8), patch_size=(2, 2, 2), **TEXT), split=(1, 1),
        mask="structured", checkpointing=True),
    # a 3x4 grid cut along W (its rows of 3 are not divisible): the boxes are not runs of the raster order, and the
    # last row of mask groups is cut by the grid's edge
    "image SPRINT": dict(backbone="sit", options=dict(input_size=(6, 8), patch_size=2, num_classes=10), split=(1, 1),
                         mask="structured"),
    "image dense, absolute positions": dict(backbone="sit", options=dict(input_size=8, patch_size=2, num_classes=10,
                                                                         position="absolute"), split=None, mask=None),
    # 3 frames: cut along H, so frames and cells are regrouped from the gathered coordinates
    "factorised video SPRINT, tube mask": dict(
        backbone="video_dit", options=dict(input_size=(3, 8, 8), patch_size=(1, 2, 2), num_classes=10,
                                           attention="factorised"), split=(1, 1), mask="tube"),
    "U-ViT SPRINT (long skips)": dict(backbone="uvit", options=dict(input_size=8, patch_size=2, num_classes=10, depth=5),
                                      split=(2, 2), mask="structured"),
    # diffusers families: their own blocks, attention through `SpreadSelfAttention` (SD3: `SpreadJointAttention`, Flux:
    # `JointRotaryAttention`, HunyuanVideo: `VideoTextAttention`, with the captions' padding left out)
    **{f"{family} SPRINT": dict(backbone=family, options=dict(config=FAMILY_CONFIGS[family], **FAMILY_SAMPLES[family]),
                                split=(1, 1), mask="structured", family=True)
       for family in ("wan", "ltx_video", "sd3", "flux", "hunyuan_video")},
    "wan dense": dict(backbone="wan", options=dict(config=FAMILY_CONFIGS["wan"], **FAMILY_SAMPLES["wan"]), split=None,
                      mask=None, family=True),
}
TINY = dict(hidden_size=32, depth=3, num_heads=2, in_channels=1)


def build(case: dict[str, Any]) -> torch.nn.Module:
    torch.manual_seed(0)
    backbone = build_backbone(case["backbone"], **{**({} if case.get("family") else TINY), **case["options"]})
    backbone.gradient_checkpointing = case.get("checkpointing", False)
    model = backbone if case["split"] is None else Sprint(backbone, *case["split"])
    return randomize(model)


def inputs(model: torch.nn.Module, case: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, Any, dict]:
    g = torch.Generator().manual_seed(1)
    backbone = model.backbone
    x = torch.randn(BATCH, *backbone.sample_shape, generator=g)
    t = torch.rand(BATCH, generator=g)
    spec = backbone.condition
    if spec.kind == "class":
        cond = torch.randint(0, spec.num_classes, (BATCH,), generator=g)
    else:
        cond = {"text_tokens": torch.randn(BATCH, spec.text_length, spec.text_dim, generator=g),
                "text_mask": torch.arange(spec.text_length)[None] < torch.tensor([[2], [5], [1]])}
        if spec.pooled_dim:
            cond["pooled"] = torch.randn(BATCH, spec.pooled_dim, generator=g)
    extra = {}
    if case["mask"] is not None:
        grid = backbone.token_grid(tuple(x.shape))
        extra["mask"] = TokenMasker(case["mask"], 0.75)(BATCH, grid, generator=g)
        extra["skip_middle"] = torch.tensor([False, True, False])
    return x, t, cond, extra


def largest(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[key] - b[key]).abs().max()) for key in a)


def check(case: dict[str, Any], group: Any) -> dict[str, Any]:
    """Whole vs spread: the prediction and the gradients of a fixed linear function of it."""
    model = build(case)
    x, t, cond, extra = inputs(model, case)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))

    def run(spread: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        spread_model(model, spread, "context parallel")
        out = model(x, t, cond, **extra)
        (out * weights).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole, whole_grads = run(None)
    spread, spread_grads = run(group)
    for grad in spread_grads.values():  # each process holds 2 x its share: the mean over the group is the gradient
        dist.all_reduce(grad)
        grad /= dist.get_world_size(group)
    other = torch.empty_like(spread)
    dist.broadcast(other.copy_(spread), src=1)
    return {"output": float((whole - spread).abs().max()), "output_scale": float(whole.abs().max()),
            "gradients": largest(whole_grads, spread_grads) if whole_grads.keys() == spread_grads.keys() else None,
            "gradient_scale": max(float(g.abs().max()) for g in whole_grads.values()),
            "parameters_with_gradients": len(whole_grads), "processes_agree": bool(torch.equal(other, spread))}


@torch.no_grad()
def guidance_checks(group: Any) -> dict[str, float]:
    """PDG and CFG velocities: spread over the context group, and with the two branches on the two processes."""
    case = CASES["text video SPRINT"]
    model = build(case).eval()
    x, _, cond, _ = inputs(model, case)
    results = {}
    for kind in ("pdg", "cfg"):
        guidance = Guidance(kind, 2.5)
        spread_model(model, None, "context parallel")
        whole = guided_velocity(model, x, 0.6, cond, guidance)
        branched = guided_velocity(model, x, 0.6, cond, guidance, branches=group)
        spread_model(model, group, "context parallel")
        spread = guided_velocity(model, x, 0.6, cond, guidance)
        results[f"{kind} spread"] = float((whole - spread).abs().max())
        results[f"{kind} branches"] = float((whole - branched).abs().max())
        results[f"{kind} scale"] = float(whole.abs().max())
    return results


def refusals(group: Any) -> dict[str, str]:
    """The one-line errors of models that cannot be spread over two processes."""
    cases: dict[str, Callable[[], torch.nn.Module]] = {
        "backbone": lambda: my_dit.MyDiT(),
        "heads": lambda: build_backbone("sit", hidden_size=48, depth=3, num_heads=3, input_size=8, in_channels=1),
    }
    messages = {}
    for name, make in cases.items():
        try:
            spread_model(make(), group, "Trainer.context_parallel")
            messages[name] = "accepted"
        except ValueError as err:
            messages[name] = str(err)
    return messages


def main(root: Path) -> None:
    from tests import test_context_parallel as runs  # the configurations, shared with the test

    dist.init_process_group("gloo")
    layout = process_layout(dist.get_world_size(), 2, torch.device("cpu"), "context parallel")
    checks = {name: check(case, layout.context) for name, case in CASES.items()}
    result = {"checks": checks, "guidance": guidance_checks(layout.context), "refusals": refusals(layout.context)}
    if dist.get_rank() == 0:
        (root / "checks.json").write_text(json.dumps(result, indent=1))
    assert runs.train(root / "sprint_two", 3, *runs.SPREAD) == 0
    assert runs.train(root / "dense_two", 2, "Trainer.context_parallel = 2", gin_file=runs.DENSE) == 0
    assert runs.train(root / "halfway", 2, *runs.SPREAD) == 0  # resumed on one process by the test
    assert runs.train(root / "grown", 3, *runs.SPREAD) == 0  # the test's one-process run of step 2, resumed on two
    for name, flag in (("spread", "--context-parallel"), ("branches", "--cfg-parallel")):
        extra = ["2"] if flag == "--context-parallel" else []
        assert sample_main([*runs.sample_args(root / "sprint_two", root / f"{name}.npz"), flag, *extra]) == 0


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    end_processes(0)
