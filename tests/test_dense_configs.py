"""Every SPRINT stage-1 config has a dense twin: the same settings without SPRINT, and a backbone of the same shape.

A twin of `X_stage1.gin` (or of a stage-1 file not named so, `X.gin`) is `X_dense.gin` in the same folder: its
bindings must be exactly those of the stage-1 file plus gin/base/dense.gin, with its own run folder.
"""
from __future__ import annotations

from pathlib import Path

import gin
import pytest
import torch

from sprint_mm.configs import GIN_FOLDER, parse_gin
from sprint_mm.models import build_model
from sprint_mm.sprint import Sprint
from tests.families import without_folder

DENSE = "gin/base/dense.gin"
CONFIG_FOLDERS = [folder for folder in sorted(GIN_FOLDER.iterdir()) if folder.is_dir() and folder.name != "base"]


def bound(name: str, default):
    """A parameter's bound value, or `default` when no file binds it."""
    try:
        return gin.query_parameter(name)
    except ValueError:
        return default


def is_sprint_stage1(path: str) -> bool:
    """SPRINT (build_model.sprint, True unless bound otherwise) with a token drop: not a dense or stage-2 file."""
    parse_gin([path], [])
    try:
        return bound("build_model.sprint", True) and bound("TokenMasker.ratio", 0.0) > 0
    finally:
        gin.clear_config()  # runs at collection, outside the per-test clean-up: leave no binding behind


def twin_of(path: str) -> str:
    file = Path(path)
    return str(file.with_name(file.stem.removesuffix("_stage1") + "_dense.gin"))


def relative(path: Path) -> str:
    return str(path.relative_to(GIN_FOLDER.parent))


STAGE1_FILES = [relative(p) for folder in CONFIG_FOLDERS for p in sorted(folder.glob("*.gin"))
                if not p.stem.endswith("_dense") and is_sprint_stage1(relative(p))]


def test_the_stage1_files_are_found():
    # the shipped SPRINT configs every user reaches for: if discovery missed them the other tests would pass vacuously
    for expected in ("gin/image/digits_stage1.gin", "gin/image/sit_xl2_256_stage1.gin",
                     "gin/video/moving_digits_stage1.gin", "gin/text/digits_minilm_stage1.gin"):
        assert expected in STAGE1_FILES
    assert not any("stage2" in path for path in STAGE1_FILES)


@pytest.mark.parametrize("stage1", STAGE1_FILES)
def test_twin_is_the_stage1_config_plus_dense(stage1):
    twin = twin_of(stage1)
    assert (GIN_FOLDER.parent / twin).is_file(), f"{stage1} has no dense twin {twin}"
    parse_gin([twin], [])
    run_dir = gin.query_parameter("Trainer.run_dir")
    twin_config = gin.config_str()
    assert gin.query_parameter("build_model.sprint") is False
    assert gin.query_parameter("FlowMatching.masker") is None
    assert gin.query_parameter("FlowMatching.path_drop") == 0.0
    parse_gin([stage1], [])
    assert gin.query_parameter("Trainer.run_dir") != run_dir, "the dense twin would write into the SPRINT run folder"
    parse_gin([stage1, DENSE], [f"Trainer.run_dir = {run_dir!r}"])
    assert gin.config_str() == twin_config


@pytest.mark.parametrize("stage1", STAGE1_FILES)
def test_twin_builds_the_same_backbone_dense(stage1):
    shapes = {}
    for path in (stage1, twin_of(stage1)):
        parse_gin([path], without_folder([path]))  # a diffusers family: its published config stands in
        with torch.device("meta"):
            shapes[path] = build_model()
    sprint, dense = shapes[stage1], shapes[twin_of(stage1)]
    assert isinstance(sprint, Sprint) and not isinstance(dense, Sprint)
    expected = {name: tuple(t.shape) for name, t in sprint.backbone.state_dict().items()}
    assert {name: tuple(t.shape) for name, t in dense.state_dict().items()} == expected
