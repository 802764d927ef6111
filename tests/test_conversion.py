"""From a pretrained dense model to SPRINT: the identity fusion makes the converted model compute the dense one
exactly (every backbone: `check_backbone`'s "identity fusion = dense forward"), a run starts from a dense run or a
converted official SiT file through `Trainer.init_from`, the routing fill, and the one-line errors."""
from __future__ import annotations

import gin
import pytest
import torch
from safetensors.torch import load_file

import convert_checkpoint
import tests.test_backbone_contract as contract
from sprint_mm.checkpoints import load_dense_into_sprint, load_strict, save_state_dict
from sprint_mm.configs import parse_gin
from sprint_mm.masking import TokenMasker
from sprint_mm.models import build_model
from sprint_mm.runs import list_checkpoints
from sprint_mm.sprint import Sprint
from sprint_mm.testing import ContractCase, check_backbone, identity_fusion_equals_the_dense_forward, randomize
from sprint_mm.time_reversed import TimeReversed
from tests.helpers import tiny_sit
from tests.test_checkpoints import CHANNELS, PATCH, SIDE, dense_state, direct_sit_forward
from tests.test_training import TINY, train

DENSE = "gin/image/digits_dense.gin"
BATCH = 3


def inputs(channels: int = 1, side: int = 8, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(BATCH, channels, side, side, generator=g), torch.rand(BATCH, generator=g),
            torch.randint(0, classes, (BATCH,), generator=g))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ----------------------------------------------------------------------------------------------- exactness


def test_the_identity_property_fails_for_a_fusion_that_is_not_the_identity(monkeypatch):
    """The contract's exactness check has teeth: with SPRINT's default (xavier) fusion it fails."""
    case = ContractCase("sit", contract.TINY["sit"]["rope"])
    original = Sprint.__init__

    def xavier_instead(self, *args, fusion_init="xavier", **kwargs):
        original(self, *args, **kwargs)

    monkeypatch.setattr(Sprint, "__init__", xavier_instead)
    with pytest.raises(AssertionError, match="deviates from the dense forward"):
        identity_fusion_equals_the_dense_forward(case, (1, 1))


@pytest.mark.parametrize("backbone", ["sit", "uvit"])
def test_every_property_holds_under_the_routing_fill(backbone):
    gin.bind_parameter("Sprint.fill", "route")  # every model check_backbone builds routes its dropped tokens
    options = next(iter(contract.TINY[backbone].values()))
    assert "skipped rows = mask-token path" in check_backbone(backbone, **options)


def test_an_official_sit_checkpoint_converts_exactly_through_the_loader(tmp_path):
    source, converted = tmp_path / "SiT.pt", tmp_path / "sit_ours.safetensors"
    state = dense_state("sit")
    torch.save(state, source)
    assert convert_checkpoint.main(["--from", "sit", "--to", "ours", "--input", str(source), "--output",
                                    str(converted), "--encoder-depth", "2", "--decoder-depth", "1"]) == 0
    backbone = tiny_sit(3, position="absolute", qk_norm="none", in_channels=CHANNELS)
    model = Sprint(backbone, encoder_depth=2, decoder_depth=1, fusion_init="identity").eval()
    load_dense_into_sprint(model, load_file(str(converted)))
    x, t, y = inputs(CHANNELS, SIDE, 4)
    with torch.no_grad():
        dense, sprint = TimeReversed(model.backbone)(x, t, y), TimeReversed(model)(x, t, y)
        assert relative_error(sprint, dense) <= 1e-6
        torch.testing.assert_close(sprint, -direct_sit_forward(state, x, 1 - t, y), atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- runs


def dense_weights(path, **overrides):
    """A perturbed dense digits backbone (the TINY run's shape) saved under its own keys, as a dense run's EMA."""
    parse_gin([DENSE], TINY + [f"{k} = {v!r}" for k, v in overrides.items()])
    backbone = randomize(build_model(), seed=4)
    save_state_dict(backbone.state_dict(), path)
    return backbone.eval()


def started_model(run, *bindings):
    """The model of `run`'s first checkpoint (trained with lr 0: the weights it started from)."""
    parse_gin([str(run / "config.gin")], bindings)
    model = build_model()
    load_strict(model, load_file(str(list_checkpoints(run)[0] / "model.safetensors")))
    return model.eval()


@pytest.mark.parametrize("fill", ["mask", "route"])
def test_a_run_starts_from_dense_weights_as_the_same_model(tmp_path, capsys, fill):
    dense = dense_weights(tmp_path / "dense.safetensors")
    assert train(tmp_path / "sprint", 1, f"Trainer.init_from = '{tmp_path / 'dense.safetensors'}'", "Trainer.lr = 0.0",
                 "Sprint.fusion_init = 'identity'", f"Sprint.fill = '{fill}'") == 0
    captured = capsys.readouterr()
    line = [line for line in (captured.out + captured.err).splitlines() if "initialised model and EMA" in line]
    assert len(line) == 1 and "new here: mask_token, fusion.weight, fusion.bias (fusion [I | 0]" in line[0]
    model = started_model(tmp_path / "sprint")
    x, t, y = inputs()
    with torch.no_grad():
        assert relative_error(model(x, t, y), dense(x, t, y)) <= 1e-6
        # with tokens dropped, what a dropped token carries into the fusion is the fill
        grid = model.backbone.token_grid(tuple(x.shape))
        mask = TokenMasker("structured", 0.75)(BATCH, grid, generator=torch.Generator().manual_seed(0))
        seen = {}
        model.fusion.register_forward_hook(lambda module, args, out: seen.update(sparse=args[0][..., :32],
                                                                                  dense=args[0][..., 32:]))
        model(x, t, y, mask=mask, skip_middle=torch.tensor([False, True, False]))
    dropped = mask.dropped.clone()
    dropped[1] = True  # the row that skips the middle carries the fill at every token
    fill_value = seen["dense"] if fill == "route" else model.mask_token.expand_as(seen["dense"])
    assert torch.equal(seen["sparse"][dropped], fill_value[dropped])
    assert not torch.isclose(seen["sparse"][~dropped], fill_value[~dropped]).all(-1).any()


def test_a_run_starts_from_a_dense_run_and_from_a_converted_sit_file(tmp_path, capsys):
    assert train(tmp_path / "dense", 2, gin_file=DENSE) == 0
    assert train(tmp_path / "from_run", 2, f"Trainer.init_from = '{tmp_path / 'dense'}'") == 0
    assert "fusion not the identity: bind Sprint.fusion_init = 'identity'" in capsys.readouterr().out

    # An official SiT file of the digits model's shape (absolute positions, no q/k norm), converted, then started from.
    sit = ["sit.position = 'absolute'", "sit.qk_norm = 'none'"]
    dense = dense_weights(tmp_path / "ours.safetensors", **{"sit.position": "absolute", "sit.qk_norm": "none"})
    official = to_sit_layout(dense)
    torch.save(official, tmp_path / "SiT-digits.pt")
    assert convert_checkpoint.main(["--from", "sit", "--to", "ours", "--input", str(tmp_path / "SiT-digits.pt"),
                                    "--output", str(tmp_path / "sit.safetensors"), "--encoder-depth", "1",
                                    "--decoder-depth", "1"]) == 0
    assert train(tmp_path / "from_sit", 1, f"Trainer.init_from = '{tmp_path / 'sit.safetensors'}'", "Trainer.lr = 0.0",
                 "Sprint.fusion_init = 'identity'", *sit) == 0
    x, t, y = inputs()
    with torch.no_grad():
        assert relative_error(started_model(tmp_path / "from_sit")(x, t, y), dense(x, t, y)) <= 1e-6


def to_sit_layout(backbone) -> dict[str, torch.Tensor]:
    """Our dense SiT (absolute positions) under the official SiT keys: Conv2d patch embed, the stored sin-cos table,
    final-layer rows ordered (i, j, c)."""
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    hidden, (_, ph, pw), channels = backbone.hidden_size, backbone.patch, backbone.in_channels
    state["x_embedder.proj.weight"] = state["x_embedder.proj.weight"].reshape(hidden, channels, ph, pw)
    for name in ("final_layer.linear.weight", "final_layer.linear.bias"):
        rows = state[name]
        state[name] = rows.unflatten(0, (channels, ph, pw)).permute(1, 2, 0, *range(3, rows.dim() + 2)).flatten(0, 2)
    grid = backbone.token_grid((1, channels, *backbone.input_size))
    state["pos_embed"] = backbone._absolute_positions(grid, torch.device("cpu"))[None]
    return state


def test_starting_errors_are_one_line(tmp_path, capsys):
    dense_weights(tmp_path / "dense.safetensors")  # 4 blocks
    torch.save(dense_state("sit"), tmp_path / "SiT.pt")

    def one_line(*bindings: str, run: str = "run") -> str:
        assert train(tmp_path / run, 1, *bindings) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        return lines[0]

    deep = ["sit.depth = 6", "Sprint.encoder_depth = 2", "Sprint.decoder_depth = 2"]
    assert "the checkpoint's 4 blocks" in one_line(f"Trainer.init_from = '{tmp_path / 'dense.safetensors'}'", *deep)
    assert "has 4 blocks but the model is built with 5" in one_line(
        f"Trainer.init_from = '{tmp_path / 'dense.safetensors'}'", "sit.depth = 5")
    assert "convert it first" in one_line(f"Trainer.init_from = '{tmp_path / 'SiT.pt'}'")
    assert convert_checkpoint.main(["--from", "sit", "--to", "ours", "--input", str(tmp_path / "SiT.pt"), "--output",
                                    str(tmp_path / "x.safetensors"), "--encoder-depth", "3", "--decoder-depth", "2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "must leave at least one middle block of the checkpoint's 5 blocks" in lines[0]


def test_bad_sprint_options_are_one_line():
    backbone = tiny_sit()
    for options, message in ((dict(fill="carry"), "unknown Sprint.fill 'carry'; allowed: mask, route"),
                             (dict(fusion_init="zeros"), "unknown Sprint.fusion_init 'zeros'; allowed: xavier, identity"),
                             (dict(fusion="none", fusion_init="identity"), "has none"),
                             (dict(fill="route", learnable_mask_token=True), "never uses the mask token")):
        with pytest.raises(ValueError, match=message):
            Sprint(backbone, **options)
