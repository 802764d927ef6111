"""Condition modules: each kind checks, embeds and drops its conditions; DiTs keep their initial weights and load
checkpoints written before the text condition's tensors moved into its module."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from torch.distributed.checkpoint.state_dict import get_state_dict
import torch.nn.functional as F

from registry import BACKBONES
from sprint_mm.backbone import CONDITION_KINDS, ConditionSpec
from sprint_mm.checkpoints import CheckpointMismatch, check_fits, load_strict, save_state_dict, upgrade_keys
from sprint_mm.conditioning import build_conditioning
from sprint_mm.conditions import ClassCondition, TextCondition
from sprint_mm.dit import DiT
from sprint_mm.sprint import Sprint
from sprint_mm.checkpointer import Checkpointer, TrainingParts
from sprint_mm.sharded import load_sharded
from sprint_mm.optimization import frozen_copy
from tests.helpers import randomize

SMALL = dict(hidden_size=32, depth=2, num_heads=2, input_size=8, in_channels=3)
LENGTH, TEXT_DIM = 6, 12
TEXT = dict(text_dim=TEXT_DIM, text_length=LENGTH)
# The keys a text DiT had before its condition module, and where they live now.
EARLIER_TEXT_KEYS = {
    "text_embedder.0.weight": "y_embedder.token_proj.0.weight",
    "text_embedder.0.bias": "y_embedder.token_proj.0.bias",
    "text_embedder.2.weight": "y_embedder.token_proj.2.weight",
    "text_embedder.2.bias": "y_embedder.token_proj.2.bias",
    "pooled_embedder.weight": "y_embedder.pooled_proj.weight",
    "pooled_embedder.bias": "y_embedder.pooled_proj.bias",
    "null_text_tokens": "y_embedder.null_tokens",
    "null_text_mask": "y_embedder.null_mask",
}


def text_condition(real_tokens=(2, 6, 1), seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(LENGTH)[None] < torch.tensor(real_tokens)[:, None]  # (B, L)
    tokens = torch.randn(len(real_tokens), LENGTH, TEXT_DIM, generator=g).masked_fill(~mask[..., None], 0.0)
    return {"text_tokens": tokens, "text_mask": mask}


def fingerprint(state: dict[str, torch.Tensor]) -> float:
    """One number that moves with every float value, its position and its key: sum over the sorted keys k_i of the
    tensor's dot product with cos(n + 1000 i)."""
    total = 0.0
    floats = sorted(key for key, tensor in state.items() if tensor.is_floating_point())
    for i, key in enumerate(floats):
        values = state[key].double().flatten()
        total += float(values @ torch.cos(torch.arange(values.numel(), dtype=torch.float64) + 1000.0 * i))
    return total


# Computed with the DiT of commit f8f8a38 (condition branches inside DiT, its keys renamed by EARLIER_TEXT_KEYS):
# `torch.manual_seed(0)` then the build. The text demo's README figures come from weights drawn in this order.
@pytest.mark.parametrize("name, options, expected", [
    ("sit", dict(num_classes=4), -2.129877265197925),
    ("video_dit", dict(input_size=(2, 8, 8), num_classes=4), -2.129877265197925),
    ("text_dit", TEXT, -8.154859047407541),
    ("text_dit", dict(TEXT, pooled_text=True, learned_null=True), 16.299727852239407),
])
def test_a_seed_gives_the_initial_weights_it_gave_before_condition_modules(name, options, expected):
    torch.manual_seed(0)
    model = BACKBONES.build(name, **{**SMALL, **options})
    assert fingerprint(model.state_dict()) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_class_condition_embeds_drops_and_checks_ids():
    torch.manual_seed(0)
    condition = ClassCondition(5, 16)
    assert condition.spec == ConditionSpec("class", num_classes=5)
    assert list(condition.state_dict()) == ["embedding_table.weight"]  # official checkpoints' y_embedder table
    labels = torch.tensor([0, 4, 2])
    term, context = condition.embed(labels)
    assert context is None and torch.equal(term, condition.embedding_table.weight[labels])
    dropped = condition.drop(labels, torch.tensor([True, False, True]))
    assert torch.equal(dropped, torch.tensor([5, 4, 5]))  # id 5: the null class, the table's extra row
    assert torch.equal(condition.null(labels), torch.full((3,), 5))
    torch.testing.assert_close(condition.embed(condition.null(labels))[0], condition.embedding_table.weight[[5] * 3])
    with pytest.raises(ValueError, match=r"in \[0, 5\].*got values in \[-1, 4\]"):
        condition.embed(torch.tensor([-1, 4]))
    with pytest.raises(ValueError, match=r"in \[0, 5\].*got values in \[0, 6\]"):
        condition.embed(torch.tensor([0, 6]))
    with pytest.raises(TypeError, match="integer tensor"):
        condition.embed(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\(B,\) tensor of class ids, got shape \(3, 1\)"):
        condition.drop(labels[:, None], torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(B,\) tensor of class ids, got dict"):
        condition.embed(text_condition())


@pytest.mark.parametrize("pooled_text", [False, True])
def test_text_condition_embedding_equals_the_formula_written_out(pooled_text):
    torch.manual_seed(0)
    condition = randomize(TextCondition(16, TEXT_DIM, LENGTH, pooled_text=pooled_text))
    cond = text_condition()
    term, (context, mask) = condition.embed(cond)
    w = condition.state_dict()
    tokens = cond["text_tokens"]
    hidden = F.gelu(F.linear(tokens, w["token_proj.0.weight"], w["token_proj.0.bias"]), approximate="tanh")
    torch.testing.assert_close(context, F.linear(hidden, w["token_proj.2.weight"], w["token_proj.2.bias"]))
    assert torch.equal(mask, cond["text_mask"])
    if not pooled_text:
        assert term is None
        return
    means = torch.stack([row[:real].mean(dim=0) for row, real in zip(tokens, (2, 6, 1))])  # the real tokens only
    torch.testing.assert_close(term, F.linear(means, w["pooled_proj.weight"], w["pooled_proj.bias"]))


def test_text_condition_null_caption_drop_and_learned_null():
    condition = TextCondition(16, TEXT_DIM, LENGTH)
    cond = dict(text_condition(), caption=["a", "b", "c"])  # other keys ride along
    null = condition.null(cond)
    assert null["caption"] == cond["caption"]
    assert torch.equal(null["text_tokens"], torch.zeros(3, LENGTH, TEXT_DIM))  # one zero token until set_null_text
    assert torch.equal(null["text_mask"], torch.tensor([[True] + [False] * (LENGTH - 1)] * 3))
    empty = text_condition(real_tokens=(2,), seed=3)
    condition.set_null_text(empty["text_tokens"][0], empty["text_mask"][0])
    dropped = condition.drop(cond, torch.tensor([False, True, False]))
    for key in ("text_tokens", "text_mask"):
        assert torch.equal(dropped[key][1], empty[key][0])
        assert torch.equal(dropped[key][[0, 2]], cond[key][[0, 2]])

    learned = TextCondition(16, TEXT_DIM, LENGTH, learned_null=True)
    torch.manual_seed(4)
    learned.draw_learned_null()
    torch.manual_seed(4)
    torch.testing.assert_close(learned.null_tokens.detach(), torch.randn(LENGTH, TEXT_DIM) * TEXT_DIM**-0.5)
    assert learned.spec.learned_null and isinstance(learned.null_tokens, torch.nn.Parameter)
    null = learned.null(text_condition())
    assert null["text_mask"].all()  # a learned null attends to all of its tokens
    learned.embed(null)[1][0].sum().backward()
    assert learned.null_tokens.grad.abs().sum(dim=-1).gt(0).all()


def test_text_condition_errors():
    condition = TextCondition(16, TEXT_DIM, LENGTH)
    cond = text_condition()
    keys = r"condition dict with keys \('text_tokens', 'text_mask'\), got \['text_tokens'\]"
    with pytest.raises(ValueError, match=keys):
        condition.drop({"text_tokens": cond["text_tokens"]}, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=rf"\(B, {LENGTH}, {TEXT_DIM}\).*got \(3, {LENGTH}, 5\)"):
        condition.embed(dict(cond, text_tokens=cond["text_tokens"][..., :5]))
    with pytest.raises(ValueError, match="text_mask must be bool"):
        condition.embed(dict(cond, text_mask=cond["text_mask"].long()))
    with pytest.raises(ValueError, match="at least one True"):
        condition.embed(dict(cond, text_mask=cond["text_mask"] & torch.tensor([[True], [False], [True]])))
    with pytest.raises(ValueError, match=r"text_dim and text_length must be >= 1, got 0 and 6"):
        TextCondition(16, 0, LENGTH)
    with pytest.raises(ValueError, match="learned_null=True"):
        TextCondition(16, TEXT_DIM, LENGTH, learned_null=True).set_null_text(cond["text_tokens"][0],
                                                                             cond["text_mask"][0])


def test_condition_kinds_have_one_list_and_one_error():
    message = r"unknown conditioning 'audio'; allowed: class, text"
    with pytest.raises(ValueError, match=message):
        ConditionSpec("audio")
    with pytest.raises(ValueError, match=message):
        build_conditioning("audio")
    with pytest.raises(ValueError, match=message):  # before, any kind but 'class' built a text model
        DiT(**SMALL, conditioning="audio")
    assert [DiT(**SMALL, conditioning=kind).condition.kind for kind in CONDITION_KINDS] == list(CONDITION_KINDS)


def tiny_text_sprint(seed: int, **options) -> Sprint:
    torch.manual_seed(seed)
    backbone = BACKBONES.build("text_dit", **{**SMALL, "depth": 3, **TEXT, **options})
    return randomize(Sprint(backbone, encoder_depth=1, decoder_depth=1), seed + 1).eval()


def in_earlier_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with the condition's keys as text DiTs wrote them before condition modules."""
    return {earlier_name(key): tensor for key, tensor in state.items()}


def earlier_name(key: str, prefix: str = "backbone.") -> str:
    """`key` as text DiTs named it before condition modules."""
    return next((prefix + then + key[len(prefix + now):] for then, now in EARLIER_TEXT_KEYS.items()
                 if key.startswith(prefix + now)), key)


def outputs(model: Sprint) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x, t, cond = torch.randn(3, 3, 8, 8, generator=g), torch.rand(3, generator=g), text_condition()
    with torch.no_grad():
        return model(x, t, cond), model(x, t, model.backbone.null_condition(cond))


@pytest.mark.parametrize("options", [dict(), dict(pooled_text=True), dict(pooled_text=True, learned_null=True)])
def test_text_checkpoints_in_the_earlier_layout_load_strictly_and_give_the_same_outputs(options, tmp_path):
    model = tiny_text_sprint(0, **options)
    if not options.get("learned_null"):
        empty = text_condition(real_tokens=(2,), seed=3)
        model.backbone.set_null_text(empty["text_tokens"][0], empty["text_mask"][0])
    earlier = in_earlier_layout(model.state_dict())
    assert "backbone.text_embedder.0.weight" in earlier and "backbone.null_text_tokens" in earlier
    assert not any(".y_embedder." in key for key in earlier)
    expected = outputs(model)

    fresh = tiny_text_sprint(7, **options)
    check_fits(fresh, earlier, "earlier layout")
    load_strict(fresh, earlier, "earlier layout")
    assert all(torch.equal(a, b) for a, b in zip(outputs(fresh), expected))

    direct = tiny_text_sprint(8, **options)
    direct.load_state_dict(earlier, strict=True)  # the DiT's load pre-hook renames the keys
    assert all(torch.equal(a, b) for a, b in zip(outputs(direct), expected))

    save_state_dict(earlier, tmp_path / "ema.safetensors")  # stage 2 starts from a stage-1 EMA file
    trained = tiny_text_sprint(9, **options)
    optimizer = torch.optim.AdamW(trained.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    parts = TrainingParts(trained, frozen_copy(trained), optimizer, scheduler, data=None)
    Checkpointer(tmp_path / "stage2", parts, Accelerator(cpu=True), sharded=False, keep=1, say=print).resume(
        init_from=str(tmp_path / "ema.safetensors"), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(outputs(trained), expected))
    assert all(torch.equal(a, b) for a, b in zip(outputs(parts.ema), expected))


def test_upgrading_keys_renames_only_the_earlier_layout():
    model = tiny_text_sprint(0, pooled_text=True)
    state = model.state_dict()
    assert upgrade_keys(model, state) == state  # the current layout stays as it is
    earlier = in_earlier_layout(state)
    assert upgrade_keys(model, earlier).keys() == state.keys() and set(earlier) != set(state)
    both = {**state, "backbone.null_text_mask": state["backbone.y_embedder.null_mask"]}
    with pytest.raises(CheckpointMismatch, match=r"unexpected in the checkpoint \(1\):\s+backbone.null_text_mask"):
        load_strict(model, both)
    incomplete = {key: value for key, value in earlier.items() if key != "backbone.null_text_mask"}
    with pytest.raises(CheckpointMismatch, match=r"missing from the checkpoint \(1\):\s+backbone.y_embedder.null_mask"):
        check_fits(model, incomplete)
    torch.manual_seed(0)
    sit = BACKBONES.build("sit", **SMALL, num_classes=4)
    assert "y_embedder.embedding_table.weight" in sit.state_dict()
    sit_state = sit.state_dict()
    assert upgrade_keys(sit, sit_state) == sit_state


def test_a_sharded_text_run_in_the_earlier_layout_resumes_model_ema_and_optimizer(tmp_path):
    """A sharded (DCP) checkpoint written before condition modules: model, EMA and the optimizer's moments (keyed
    by parameter name) load under their new names; a tensor the checkpoint lacks is one CheckpointMismatch."""
    model = tiny_text_sprint(0, pooled_text=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        sum((p * p).sum() for p in model.parameters()).backward()
        optimizer.step()
    ema = randomize(frozen_copy(model), 3)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    assert any(key != earlier_name(key) for key in optimizer_state["state"])
    earlier_optimizer = {
        "state": {earlier_name(key): value for key, value in optimizer_state["state"].items()},
        "param_groups": [dict(group, params=[earlier_name(key) for key in group["params"]])
                         for group in optimizer_state["param_groups"]]}
    with warnings.catch_warnings():  # DCP without a process group says that it assumes one process: so it is
        warnings.simplefilter("ignore")
        dcp.save({"model": in_earlier_layout(model_state), "ema": in_earlier_layout(ema.state_dict()),
                  "optimizer": earlier_optimizer}, checkpoint_id=tmp_path / "earlier")
        fresh = tiny_text_sprint(5, pooled_text=True)
        fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
        fresh_ema = frozen_copy(fresh)
        load_sharded(tmp_path / "earlier", fresh, fresh_ema, fresh_optimizer)
        for loaded, saved in ((fresh, model), (fresh_ema, ema)):
            assert loaded.state_dict().keys() == saved.state_dict().keys()
            assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.state_dict().items())
        moments = {name: optimizer.state[p] for name, p in model.named_parameters() if optimizer.state[p]}
        loaded_moments = {name: fresh_optimizer.state[p] for name, p in fresh.named_parameters()
                          if fresh_optimizer.state[p]}
        assert loaded_moments.keys() == moments.keys() and "backbone.y_embedder.token_proj.0.weight" in moments
        for name, state in moments.items():
            for moment in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(loaded_moments[name][moment], state[moment]), (name, moment)

        lacking = {k: v for k, v in in_earlier_layout(model_state).items() if "text_embedder.0." not in k}
        dcp.save({"model": lacking, "ema": in_earlier_layout(ema.state_dict()), "optimizer": earlier_optimizer},
                 checkpoint_id=tmp_path / "lacking")
        with pytest.raises(CheckpointMismatch, match=r"lacking does not fit the model:\n  missing from the checkpoint "
                                                     r"\(2\):\n    backbone\.y_embedder\.token_proj\.0\.bias"):
            load_sharded(tmp_path / "lacking", fresh, fresh_ema, fresh_optimizer)
