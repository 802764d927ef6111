"""The seam between SPRINT and its backbones, held for every registered backbone (including the one-file example in
tests/my_dit.py) by the public contract suite, `sprint_mm.testing.check_backbone`. A new backbone adds its tiny options
to TINY; this test then says what it still lacks."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tests.my_dit  # noqa: F401  registers 'my_dit', the README's "Add a backbone" example
from registry import BACKBONES
from sprint_mm.cli import sample_main, train_main
from sprint_mm.testing import PROPERTIES, check_backbone
from tests.families import CONFIGS, SAMPLES

SMALL = dict(hidden_size=48, depth=4, num_heads=2)
TEXT = dict(text_dim=8, text_length=5)
# backbone -> variant -> tiny options; the variants cover the options that change the data path
TINY = {
    "sit": {"rope": dict(SMALL, input_size=8, in_channels=3, num_classes=4),
            "absolute": dict(SMALL, input_size=8, in_channels=3, num_classes=4, position="absolute")},
    "video_dit": {"full": dict(SMALL, input_size=(2, 8, 8), in_channels=3, num_classes=4),
                  "factorised": dict(SMALL, input_size=(2, 8, 8), in_channels=3, num_classes=4, attention="factorised"),
                  "absolute": dict(SMALL, input_size=(2, 8, 8), in_channels=3, num_classes=4, position="absolute")},
    "text_dit": {"image": dict(SMALL, input_size=8, in_channels=3, **TEXT),
                 "factorised video": dict(SMALL, input_size=(2, 8, 8), in_channels=3, attention="factorised", **TEXT)},
    "uvit": {"rope": dict(SMALL, depth=5, input_size=8, in_channels=3, num_classes=4),
             "absolute video": dict(SMALL, depth=7, input_size=(2, 8, 8), in_channels=3, num_classes=4,
                                    position="absolute")},
    "my_dit": {"image": dict(SMALL, image_size=8, channels=3, num_classes=4)},
    **{family: {"tiny": dict(config=CONFIGS[family], **SAMPLES[family])} for family in CONFIGS},
}
IMAGE_ONLY = {"my_dit", "sd3", "flux"}  # backbones that do not take one-frame videos
WHOLE_SEQUENCE = {"my_dit"}  # backbones that do not declare shards_sequence (no context parallelism)


def variants() -> list:
    """(backbone, variant) for every registered backbone; one without tiny options fails and says where to add them."""
    return [pytest.param((name, variant), id=f"{name}-{variant}") for name in BACKBONES.list()
            for variant in TINY.get(name, {None: None})]


@pytest.mark.parametrize("case", variants())
def test_backbone_keeps_the_seam(case):
    name, variant = case
    if variant is None:
        pytest.fail(f"backbone {name!r} has no tiny options: add them to TINY in {__file__}")
    checked = check_backbone(name, **TINY[name][variant])
    expected = [p for p in PROPERTIES if not (p == "image = one-frame video" and name in IMAGE_ONLY)
                and not (p == "a box of the grid unembeds to its region" and name in WHOLE_SEQUENCE)]
    assert checked == expected


def test_a_backbone_in_one_file_trains_both_stages_and_samples_with_pdg(tmp_path):
    common = ["build_model.backbone = 'my_dit'", "my_dit.image_size = 8", "my_dit.channels = 1", "my_dit.depth = 4",
              "DigitsDataset.resolution = 8", "Trainer.batch_size = 8", "Trainer.max_steps = 2",
              "Trainer.preview_every = 0", "Trainer.time_budget_minutes = None", "Trainer.progress = False",
              "Sprint.encoder_depth = 1", "Sprint.decoder_depth = 1"]

    def train(gin_file: str, run: Path, *extra: str) -> int:
        argv = ["--gin_file", gin_file, "--run_dir", str(run)]
        for binding in (*common, *extra):
            argv += ["--gin_param", binding]
        return train_main(argv)

    assert train("gin/image/digits_stage1.gin", tmp_path / "stage1") == 0
    assert train("gin/image/digits_stage2.gin", tmp_path / "stage2", f"Trainer.init_from = '{tmp_path / 'stage1'}'") == 0
    out = tmp_path / "pdg.npz"
    assert sample_main(["--run", str(tmp_path / "stage2"), "--labels", "3", "7", "--steps", "2", "--guidance", "pdg",
                        "--out", str(out)]) == 0
    samples = np.load(out)["arr_0"]
    assert samples.shape == (2, 8, 8, 3) and samples.dtype == np.uint8


def test_sprint_mm_never_imports_the_registry():
    """Imports run one way: registry, demos and benchmarks -> sprint_mm. Every sprint_mm module imports without them."""
    script = (
        "import importlib, pkgutil, sys, sprint_mm\n"
        "for m in pkgutil.walk_packages(sprint_mm.__path__, prefix='sprint_mm.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] in ('registry', 'demos', 'benchmarks')))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "[]"
