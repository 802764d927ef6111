"""Checkpoint interop: SPRINT layout round trips, prefix clean-up, strict errors, SiT/REPA conversion against a direct
implementation of the published SiT forward, the time reversal of original SiT, and the command line."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import convert_checkpoint
from sprint_mm.checkpoints import (
    CheckpointMismatch,
    clean_key,
    from_sit_keys,
    from_sprint_keys,
    load_dense_into_sprint,
    load_sprint_checkpoint,
    save_state_dict,
    split_projector,
    to_sprint_keys,
)
from sprint_mm.layers import grid_coordinates, sincos_position_embedding
from sprint_mm.masking import structured_mask
from sprint_mm.sampling import Guidance, sample
from sprint_mm.sprint import Sprint
from sprint_mm.time_reversed import TimeReversed
from tests.helpers import tiny_sit, tiny_sprint

E, L = 2, 1  # asymmetric on a depth-5 backbone (middle 2), so a wrong offset cannot pass
HIDDEN, HEADS, DEPTH, CHANNELS, PATCH, SIDE, CLASSES = 32, 2, 5, 4, 2, 8, 4
BLOCK_SUBKEYS = [f"{name}.{p}" for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
                 for p in ("weight", "bias")] + ["attn.q_norm.weight", "attn.k_norm.weight"]


def inputs(batch: int = 3, channels: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, SIDE, SIDE, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, CLASSES, (batch,), generator=g)
    return x, t, y


def sprint_model(seed: int) -> Sprint:
    return tiny_sprint(seed, encoder_depth=E, decoder_depth=L)


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- SPRINT layout


def test_sprint_export_has_the_official_keys_and_loads_back_identically(tmp_path):
    model = sprint_model(0)
    exported = to_sprint_keys(model)
    stacks = {"encoder_blocks": E, "middle_blocks": DEPTH - E - L, "decoder_blocks": L}
    expected = {f"{s}.{i}.{sub}" for s, n in stacks.items() for i in range(n) for sub in BLOCK_SUBKEYS}
    expected |= {"mask_token", "renoise_linear.weight", "renoise_linear.bias", "x_embedder.proj.weight",
                 "x_embedder.proj.bias", "y_embedder.embedding_table.weight", "final_layer.linear.weight",
                 "final_layer.linear.bias", "final_layer.adaLN_modulation.1.weight",
                 "final_layer.adaLN_modulation.1.bias"}
    expected |= {f"t_embedder.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert set(exported) == expected
    torch.testing.assert_close(exported["middle_blocks.1.attn.qkv.weight"], model.backbone.blocks[3].attn.qkv.weight)
    torch.testing.assert_close(exported["decoder_blocks.0.mlp.fc1.bias"], model.backbone.blocks[4].mlp.fc1.bias)
    torch.testing.assert_close(exported["renoise_linear.weight"], model.fusion.weight)

    path = save_state_dict(exported, tmp_path / "sprint.safetensors")
    fresh = sprint_model(7)
    assert not torch.equal(fresh.mask_token, model.mask_token)
    report = load_sprint_checkpoint(fresh, path)
    assert "sprint layout" in report
    assert same_tensors(fresh.state_dict(), model.state_dict())
    x, t, y = inputs()
    mask = structured_mask(3, (1, 4, 4), (1, 2, 2), 1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fresh(x, t, y, mask=mask), model(x, t, y, mask=mask), atol=0, rtol=0)


def test_training_wrapper_prefixes_are_stripped_anywhere(tmp_path):
    model = sprint_model(0)
    wrapped = {}
    for key, value in to_sprint_keys(model).items():
        parts = key.split(".")
        if parts[0].endswith("_blocks"):  # per-block compile puts _orig_mod after the block index
            parts.insert(2, "_orig_mod")
        wrapped["module." + ".".join(parts)] = value
    assert "module.middle_blocks.0._orig_mod.attn.qkv.weight" in wrapped
    assert clean_key("module._orig_mod.blocks.0.attn.qkv.weight") == "blocks.0.attn.qkv.weight"

    in_memory = from_sprint_keys(wrapped, E, L)
    assert set(in_memory) == set(model.state_dict())
    fresh = sprint_model(3)
    load_sprint_checkpoint(fresh, save_state_dict(wrapped, tmp_path / "model.safetensors"))
    assert same_tensors(fresh.state_dict(), model.state_dict())


def test_missing_or_misshapen_tensors_raise_naming_the_keys(tmp_path):
    exported = to_sprint_keys(sprint_model(0))
    fresh = sprint_model(5)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}

    missing = dict(exported)
    del missing["middle_blocks.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointMismatch, match=r"backbone\.blocks\.3\.mlp\.fc2\.bias"):
        load_sprint_checkpoint(fresh, save_state_dict(missing, tmp_path / "missing.safetensors"))

    misshapen = dict(exported, **{"x_embedder.proj.weight": torch.zeros(HIDDEN, 13)})
    with pytest.raises(CheckpointMismatch, match=r"backbone\.x_embedder\.proj\.weight: checkpoint \(32, 13\)"):
        load_sprint_checkpoint(fresh, save_state_dict(misshapen, tmp_path / "shape.safetensors"))

    with pytest.raises(ValueError, match=r"encoder/middle/decoder depths \(2, 2, 1\)"):
        from_sprint_keys(exported, 1, 1)
    assert same_tensors(fresh.state_dict(), before)  # a failed load leaves the model untouched


# ----------------------------------------------------------------------------- SiT / REPA


def mae_sincos_table(dim: int, side: int) -> torch.Tensor:
    """MAE's 2D table as SiT stores it: meshgrid(w, h), so the first half of the channels encodes the column."""
    col, row = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32))

    def axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return torch.from_numpy(np.concatenate([axis(dim // 2, col), axis(dim // 2, row)], axis=1)).float()


def test_our_sincos_table_is_the_sit_table():
    side = 4
    ours = sincos_position_embedding(HIDDEN, grid_coordinates((side, side)))
    torch.testing.assert_close(ours, mae_sincos_table(HIDDEN, side), atol=1e-6, rtol=0)


def dense_state(layout: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under SiT's (learn_sigma, no q/k norm) or REPA's (LayerNorm q/k norm, projector) names and shapes."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    d, head = HIDDEN, HIDDEN // HEADS
    out_channels = 2 * CHANNELS if layout == "sit" else CHANNELS
    state = {
        "x_embedder.proj.weight": rnd(d, CHANNELS, PATCH, PATCH, std=0.3),
        "x_embedder.proj.bias": rnd(d),
        "pos_embed": mae_sincos_table(d, SIDE // PATCH)[None],
        "t_embedder.mlp.0.weight": rnd(d, 256, std=0.2),
        "t_embedder.mlp.0.bias": rnd(d),
        "t_embedder.mlp.2.weight": rnd(d, d, std=0.2),
        "t_embedder.mlp.2.bias": rnd(d),
        "y_embedder.embedding_table.weight": rnd(CLASSES + 1, d, std=0.5),
        "final_layer.linear.weight": rnd(PATCH * PATCH * out_channels, d, std=0.3),
        "final_layer.linear.bias": rnd(PATCH * PATCH * out_channels),
        "final_layer.adaLN_modulation.1.weight": rnd(2 * d, d),
        "final_layer.adaLN_modulation.1.bias": rnd(2 * d),
    }
    for i in range(DEPTH):
        shapes = {"attn.qkv": (3 * d, d), "attn.proj": (d, d), "mlp.fc1": (4 * d, d), "mlp.fc2": (d, 4 * d),
                  "adaLN_modulation.1": (6 * d, d)}
        for name, (rows, cols) in shapes.items():
            state[f"blocks.{i}.{name}.weight"] = rnd(rows, cols, std=0.15)
            state[f"blocks.{i}.{name}.bias"] = rnd(rows)
        if layout == "repa":
            for norm in ("q_norm", "k_norm"):
                state[f"blocks.{i}.attn.{norm}.weight"] = 1 + rnd(head)
                state[f"blocks.{i}.attn.{norm}.bias"] = rnd(head)
    if layout == "repa":
        for index, (rows, cols) in zip((0, 2, 4), ((48, d), (48, 48), (16, 48))):
            state[f"projectors.0.{index}.weight"] = rnd(rows, cols)
            state[f"projectors.0.{index}.bias"] = rnd(rows)
    return state


def direct_sit_forward(state: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SiT's published forward written out: Conv2d patch embed + pos_embed, t in [0, 1] straight into the sinusoidal
    features (no x1000, as willisma/SiT and REPA do), adaLN-Zero blocks (q/k LayerNorm only where the keys exist),
    final layer with (i, j, c) unpatchify; the first C channels are the prediction."""
    w = state
    b, channels = x.shape[:2]
    p = w["x_embedder.proj.weight"].shape[-1]
    h = F.conv2d(x, w["x_embedder.proj.weight"], w["x_embedder.proj.bias"], stride=p)  # (B, D, gh, gw)
    _, d, gh, gw = h.shape
    n, dh = gh * gw, d // HEADS
    h = h.flatten(2).transpose(1, 2) + w["pos_embed"]  # (B, N, D)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float32) / 128)
    angles = t[:, None] * freqs[None]
    t_freq = torch.cat([angles.cos(), angles.sin()], dim=-1)
    t_emb = F.linear(F.silu(F.linear(t_freq, w["t_embedder.mlp.0.weight"], w["t_embedder.mlp.0.bias"])),
                     w["t_embedder.mlp.2.weight"], w["t_embedder.mlp.2.bias"])
    c = t_emb + w["y_embedder.embedding_table.weight"][y]

    def lin(z, name):
        return F.linear(z, w[name + ".weight"], w[name + ".bias"])

    def modulated(z, shift, scale):
        return F.layer_norm(z, (d,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    for i in range(DEPTH):
        pre = f"blocks.{i}."
        shift1, scale1, gate1, shift2, scale2, gate2 = lin(F.silu(c), pre + "adaLN_modulation.1").chunk(6, dim=-1)
        q, k, v = lin(modulated(h, shift1, scale1), pre + "attn.qkv").reshape(b, n, 3, HEADS, dh).permute(2, 0, 3, 1, 4)
        if pre + "attn.q_norm.weight" in w:
            q = F.layer_norm(q, (dh,), w[pre + "attn.q_norm.weight"], w[pre + "attn.q_norm.bias"], eps=1e-5)
            k = F.layer_norm(k, (dh,), w[pre + "attn.k_norm.weight"], w[pre + "attn.k_norm.bias"], eps=1e-5)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1) @ v  # (B, h, N, dh)
        h = h + gate1[:, None] * lin(attn.transpose(1, 2).reshape(b, n, d), pre + "attn.proj")
        mlp = lin(F.gelu(lin(modulated(h, shift2, scale2), pre + "mlp.fc1"), approximate="tanh"), pre + "mlp.fc2")
        h = h + gate2[:, None] * mlp
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=-1)
    out = lin(modulated(h, shift, scale), "final_layer.linear")  # (B, N, p*p*C_out), rows (i, j, c)
    out_channels = out.shape[-1] // (p * p)
    out = out.reshape(b, gh, gw, p, p, out_channels).permute(0, 5, 1, 3, 2, 4).reshape(b, out_channels, gh * p, gw * p)
    return out[:, :channels]


def dense_sprint(qk_norm: str, seed: int = 11) -> Sprint:
    backbone = tiny_sit(seed, position="absolute", qk_norm=qk_norm, in_channels=CHANNELS)
    return Sprint(backbone, encoder_depth=E, decoder_depth=L).eval()


def pass_sparse_path_through(model: Sprint) -> None:
    """fusion = [I | 0]: with every token kept the SPRINT-ized model then computes exactly the dense network."""
    with torch.no_grad():
        model.fusion.weight.copy_(torch.cat([torch.eye(HIDDEN), torch.zeros(HIDDEN, HIDDEN)], dim=1))
        model.fusion.bias.zero_()


def test_sit_checkpoint_converts_and_runs_in_our_time_direction():
    state = dense_state("sit")
    converted = from_sit_keys(state, E, L, CHANNELS, PATCH, layout="sit")
    assert "backbone.pos_embed" not in converted and converted["backbone.final_layer.linear.weight"].shape == (16, HIDDEN)
    model = dense_sprint("none")
    fresh = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    assert load_dense_into_sprint(model, converted) == ["mask_token", "fusion.weight", "fusion.bias"]
    assert same_tensors({k: model.state_dict()[k] for k in fresh}, fresh)

    x, t, y = inputs(channels=CHANNELS)
    with torch.no_grad():
        expected = -direct_sit_forward(state, x, 1 - t, y)
        torch.testing.assert_close(TimeReversed(model.backbone)(x, t, y), expected, atol=2e-5, rtol=1e-4)
        pass_sparse_path_through(model)
        torch.testing.assert_close(TimeReversed(model)(x, t, y), expected, atol=2e-5, rtol=1e-4)

    # The sampler drives the wrapped model in our convention; two CFG Euler steps written out by hand agree.
    null = torch.full_like(y, CLASSES)
    state_x = x.double()
    for t_cur, t_next in ((1.0, 0.5), (0.5, 0.0)):
        tt = torch.full((3,), t_cur)
        cond, uncond = (-direct_sit_forward(state, state_x.float(), 1 - tt, labels) for labels in (y, null))
        state_x = state_x + (t_next - t_cur) * (uncond + 2.0 * (cond - uncond)).double()
    sampled = sample(TimeReversed(model), x, y, steps=2, guidance=Guidance(kind="cfg", scale=2.0))
    torch.testing.assert_close(sampled, state_x.float(), atol=1e-4, rtol=1e-4)


def test_sit_conversion_rejects_a_learned_position_table():
    state = dense_state("sit")
    state["pos_embed"] = state["pos_embed"] + 0.01
    with pytest.raises(ValueError, match="not the fixed 2D sin-cos table"):
        from_sit_keys(state, E, L, CHANNELS, PATCH, layout="sit")


def test_repa_checkpoint_with_layernorm_qk_and_projector_converts():
    state = dense_state("repa")
    with pytest.raises(ValueError, match="projector"):
        from_sit_keys(state, E, L, CHANNELS, PATCH, layout="repa")
    rest, projector_state = split_projector(state)
    assert sorted(projector_state) == sorted(f"{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias"))
    projector = nn.Sequential(nn.Linear(HIDDEN, 48), nn.SiLU(), nn.Linear(48, 48), nn.SiLU(), nn.Linear(48, 16))
    projector.load_state_dict(projector_state, strict=True)

    converted = from_sit_keys(rest, E, L, CHANNELS, PATCH, layout="repa")
    assert same_tensors(converted, from_sit_keys(state, E, L, CHANNELS, PATCH, layout="repa", ignore_projector=True))
    model = dense_sprint("layernorm")
    load_dense_into_sprint(model, converted)
    x, t, y = inputs(channels=CHANNELS)
    with torch.no_grad():
        pass_sparse_path_through(model)
        torch.testing.assert_close(model(x, t, y), direct_sit_forward(state, x, t, y), atol=2e-5, rtol=1e-4)

    # REPA's legacy files call the blocks after the alignment depth (here 3) decoder_blocks.0.. : not SPRINT's decoder.
    legacy = {}
    for key, value in rest.items():
        parts = key.split(".")
        if parts[0] == "blocks" and int(parts[1]) >= 3:
            key = ".".join(["decoder_blocks", str(int(parts[1]) - 3), *parts[2:]])
        legacy[key] = value
    assert "decoder_blocks.1.attn.qkv.weight" in legacy
    from_legacy = from_sit_keys(legacy, E, L, CHANNELS, PATCH, layout="repa")
    assert same_tensors(from_legacy, converted)
    with pytest.raises(ValueError, match="decoder_blocks"):
        from_sit_keys(legacy, E, L, CHANNELS, PATCH, layout="sit")


# ----------------------------------------------------------------------------- command line


def test_command_line_round_trips(tmp_path, capsys):
    # SiT training checkpoint (dict with an "ema" entry) -> ours, then loaded as a dense checkpoint.
    sit_state = dense_state("sit")
    torch.save({"ema": sit_state, "model": {k: v * 0 for k, v in sit_state.items()}}, tmp_path / "sit.pt")
    out = tmp_path / "sit_ours.safetensors"
    depth_args = ["--encoder-depth", str(E), "--decoder-depth", str(L)]
    convert_checkpoint.main(["--from", "sit", "--to", "ours", "--input", str(tmp_path / "sit.pt"),
                             "--output", str(out), "--entry", "ema", *depth_args])
    printed = capsys.readouterr().out
    assert "TimeReversed" in printed and "pos_embed" in printed
    model = dense_sprint("none")
    with pytest.raises(CheckpointMismatch, match="from_dense=True"):
        load_sprint_checkpoint(model, out)
    assert "mask_token" in load_sprint_checkpoint(model, out, from_dense=True)
    x, t, y = inputs(channels=CHANNELS)
    with torch.no_grad():
        pass_sparse_path_through(model)
        torch.testing.assert_close(TimeReversed(model)(x, t, y), -direct_sit_forward(sit_state, x, 1 - t, y),
                                   atol=2e-5, rtol=1e-4)
    with pytest.raises(SystemExit):
        convert_checkpoint.main(["--from", "sit", "--to", "sprint", "--input", str(tmp_path / "sit.pt"),
                                 "--output", str(tmp_path / "x.safetensors")])

    # SPRINT (with training prefixes) -> ours -> sprint again.
    sprint = sprint_model(0)
    official = to_sprint_keys(sprint)
    save_state_dict({"module." + k: v for k, v in official.items()}, tmp_path / "official.safetensors")
    ours = tmp_path / "ours.safetensors"
    convert_checkpoint.main(["--from", "sprint", "--to", "ours", "--input", str(tmp_path / "official.safetensors"),
                             "--output", str(ours), *depth_args])
    fresh = sprint_model(9)
    load_sprint_checkpoint(fresh, ours)
    torch.testing.assert_close(fresh(*inputs()), sprint(*inputs()), atol=0, rtol=0)
    back = tmp_path / "back.safetensors"
    convert_checkpoint.main(["--from", "ours", "--to", "sprint", "--input", str(ours), "--output", str(back), *depth_args])
    again = load_file(str(back))
    assert same_tensors(again, official)

    # REPA with a projector: the projector travels in the file and is routed, never dropped silently.
    repa_state = dense_state("repa")
    torch.save(repa_state, tmp_path / "repa.pt")
    repa_out = tmp_path / "repa.safetensors"
    convert_checkpoint.main(["--from", "repa", "--to", "ours", "--input", str(tmp_path / "repa.pt"),
                             "--output", str(repa_out), *depth_args])
    model = dense_sprint("layernorm")
    with pytest.raises(ValueError, match="projector"):
        load_sprint_checkpoint(model, repa_out, from_dense=True)
    projector = nn.Sequential(nn.Linear(HIDDEN, 48), nn.SiLU(), nn.Linear(48, 48), nn.SiLU(), nn.Linear(48, 16))
    report = load_sprint_checkpoint(model, repa_out, projector=projector, from_dense=True)
    assert "6 projector tensors" in report
    torch.testing.assert_close(projector[4].weight, repa_state["projectors.0.4.weight"], atol=0, rtol=0)


def test_command_line_errors_are_one_line_with_exit_status_2(tmp_path, capsys):
    missing = tmp_path / "absent.pt"
    depth_args = ["--encoder-depth", str(E), "--decoder-depth", str(L)]
    out_args = ["--output", str(tmp_path / "out.safetensors"), *depth_args]
    assert convert_checkpoint.main(["--from", "sit", "--to", "ours", "--input", str(missing), *out_args]) == 2
    assert capsys.readouterr().err == f"error: checkpoint file {str(missing)!r} does not exist\n"

    # A SPRINT file given as SiT (KeyError) and a SiT file given as SPRINT (ValueError): the message says which.
    official = save_state_dict(to_sprint_keys(sprint_model(0)), tmp_path / "official.safetensors")
    torch.save(dense_state("sit"), tmp_path / "sit.pt")
    for source, path, names in (("sit", official, [repr(str(official)), "not a sit checkpoint"]),
                                ("sprint", tmp_path / "sit.pt", ["blocks.*", "--from sit|repa"])):
        assert convert_checkpoint.main(["--from", source, "--to", "ours", "--input", str(path), *out_args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
        assert all(name in err for name in names), err
    assert not (tmp_path / "out.safetensors").exists()
