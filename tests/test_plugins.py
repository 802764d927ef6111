"""Backbones from outside the tree. An installed package names a module under the `sprint_mm.backbones` entry point,
and its backbones are registered, configurable from gin, buildable and held to the seam by `check_backbone`; a
backbone in the user's own folder is imported by a gin `import` line, in training and again in sample.py.

The installed package is faked as an installer leaves one: a folder with the module and a `NAME-0.1.dist-info/`
(METADATA, entry_points.txt), put on the path of a fresh interpreter, where importlib.metadata finds it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from sprint_mm import models
from sprint_mm.models import PLUGIN_GROUP, load_backbone_plugins

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=48, depth=4, num_heads=2, image_size=8, channels=3, num_classes=4)
SCRIPT = f"""
import json, sys
from registry import BACKBONES
from sprint_mm.configs import parse_gin
from sprint_mm.models import build_model
from sprint_mm.testing import check_backbone

found = {{"listed_before_gin": "plugin_dit" in BACKBONES.list()}}
parse_gin(["gin/image/digits_stage1.gin"], ["build_model.backbone = 'plugin_dit'", "plugin_dit.image_size = 16",
                                            "plugin_dit.channels = 1", "plugin_dit.hidden_size = 24", "plugin_dit.depth = 6"])
model = build_model()
found.update(module=type(model.backbone).__module__, hidden=model.backbone.hidden_size, split=model.encoder_depth,
             checked=check_backbone("plugin_dit", **{TINY!r}))
print(json.dumps(found))
"""


def write_backbone_module(folder: Path, name: str) -> None:
    """my_backbones.py: tests/my_dit.py's backbone (the README's example), registered as `name`."""
    source = (ROOT / "tests" / "my_dit.py").read_text()
    assert '@BACKBONES.register("my_dit")' in source
    (folder / "my_backbones.py").write_text(source.replace('@BACKBONES.register("my_dit")', f'@BACKBONES.register("{name}")'))


def install_fake_package(folder: Path) -> None:
    """A distribution 'my-backbones' whose module registers tests/my_dit.py's backbone as 'plugin_dit'."""
    write_backbone_module(folder, "plugin_dit")
    dist_info = folder / "my_backbones-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-backbones\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(f"[{PLUGIN_GROUP}]\nmy_backbones = my_backbones\n")


def run_python(script: str, path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(path), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_an_installed_package_adds_a_backbone_that_gin_builds_and_the_contract_checks(tmp_path):
    install_fake_package(tmp_path)
    result = run_python(SCRIPT, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["listed_before_gin"] is False  # the plugin is loaded by gin's set-up, not by importing the registry
    assert found["module"] == "my_backbones" and found["hidden"] == 24 and found["split"] == 2
    assert "PDG batch = two passes" in found["checked"]


def test_without_the_package_the_backbone_is_unknown(tmp_path):
    (tmp_path / "my_backbones.py").write_text("raise AssertionError('never imported without its dist-info')\n")
    result = run_python(SCRIPT, tmp_path)
    assert result.returncode != 0
    assert "plugin_dit" in result.stderr and "never imported" not in result.stderr


def test_a_plugin_that_fails_to_import_is_one_error_naming_it(monkeypatch):
    broken = EntryPoint(name="broken", value="no_such_module_for_sprint_mm", group=PLUGIN_GROUP)
    monkeypatch.setattr(models, "entry_points", lambda group: [broken] if group == PLUGIN_GROUP else [])
    load_backbone_plugins.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="backbone plugin broken = 'no_such_module_for_sprint_mm'.*failed to "
                                               "import: ModuleNotFoundError"):
            load_backbone_plugins()
    finally:
        load_backbone_plugins.cache_clear()


def test_a_backbone_in_the_users_folder_is_imported_by_gin_in_training_and_in_sample(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    write_backbone_module(folder, "user_dit")
    (folder / "user.gin").write_text(
        "import my_backbones\n"
        "include 'gin/image/digits_stage1.gin'\n"
        "build_model.backbone = 'user_dit'\n"
        "user_dit.image_size = 16\nuser_dit.channels = 1\nuser_dit.depth = 6\n"
        "Trainer.max_steps = 2\nTrainer.time_budget_minutes = None\nTrainer.preview_every = 0\nTrainer.progress = False\n"
    )
    run, out = tmp_path / "run", tmp_path / "pdg.npz"

    def sample(*extra: str) -> str:
        argv = ["--run", str(run), "--labels", "3", "--steps", "2", "--out", str(out), *extra]
        return f"import sys\nfrom sprint_mm.cli import sample_main\nsys.exit(sample_main({argv!r}))\n"

    script = (f"from sprint_mm.cli import train_main\n"
              f"assert train_main(['--gin_file', {str(folder / 'user.gin')!r}, '--run_dir', {str(run)!r}]) == 0\n")
    result = run_python(script + sample("--import", "my_backbones"), folder)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "config.gin").read_text().startswith("import my_backbones")
    assert out.is_file()
    # sample.py without --import: the run's import line is refused (a run folder's config does not run code
    # nobody trusted), naming the flag that trusts it
    result = run_python(sample(), folder)
    assert result.returncode == 2
    assert "`import my_backbones`" in result.stderr and "pass --import my_backbones" in result.stderr
    # with --import but without the folder on its path: one error that says what the module needs
    result = run_python(sample("--import", "my_backbones"), tmp_path)
    assert result.returncode == 2
    assert "No module named 'my_backbones'" in result.stderr and "PYTHONPATH" in result.stderr
