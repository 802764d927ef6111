"""Every shipped .gin file parses; the paper's configurations build the paper's model."""
from __future__ import annotations

from pathlib import Path

import gin
import pytest
import torch

from sprint_mm.configs import GIN_FOLDER, ConfigError, parse_gin
from sprint_mm.flops import forward_flops
from sprint_mm.models import build_model
from sprint_mm.sprint import Sprint
from tests.families import without_folder

GIN_FILES = sorted(str(p.relative_to(GIN_FOLDER.parent)) for p in GIN_FOLDER.rglob("*.gin"))


@pytest.mark.parametrize("path", GIN_FILES)
def test_every_gin_file_parses_and_builds_its_model(path):
    parse_gin([path], without_folder([path]))  # a diffusers family: its published config stands in for its folder
    with torch.device("meta"):
        model = build_model()
    assert sum(p.numel() for p in model.parameters()) > 0


def test_sit_xl2_stage1_is_the_reference_model():
    parse_gin(["gin/image/sit_xl2_256_stage1.gin"], [])
    with torch.device("meta"):
        model = build_model()
    assert isinstance(model, Sprint)
    assert (len(model.encoder_blocks), len(model.middle_blocks), len(model.decoder_blocks)) == (2, 24, 2)
    # The reference SPRINT SiT-XL/2 has 677,476,816 parameters including its frozen mask token (REFERENCE_NOTES §1.5).
    assert sum(p.numel() for p in model.parameters()) == 677_476_816
    assert gin.query_parameter("TokenMasker.ratio") == 0.75
    tokens = 256
    assert forward_flops(model.flop_shape(), tokens, 64) / 1e9 == pytest.approx(85.0, abs=0.1)


def test_stage2_turns_the_drop_off_and_names_stage1():
    parse_gin(["gin/image/sit_xl2_256_stage2.gin"], [])
    assert gin.query_parameter("TokenMasker.ratio") == 0.0
    assert gin.query_parameter("Trainer.init_from") == "runs/sit_xl2_256_stage1"
    assert gin.query_parameter("Trainer.batch_size") == 1024


def test_presets_set_depth():
    for path, depth in (("gin/image/sit_s2_256_stage1.gin", 12), ("gin/image/sit_b2_256_stage1.gin", 12)):
        parse_gin([path], [])
        with torch.device("meta"):
            assert len(build_model().backbone.blocks) == depth


def test_unknown_binding_is_one_clear_error():
    with pytest.raises(ConfigError, match="sit.hiden_size|hiden_size"):
        parse_gin(["gin/image/digits_stage1.gin"], ["sit.hiden_size = 3"])
