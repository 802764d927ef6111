"""The shape of the house around the library: the command lines (one flag spelling, older spellings kept, runnable
from any folder), the demos and benchmarks as installed packages beside `sprint_mm`, and imports without a circle."""
from __future__ import annotations

import argparse
import ast
import importlib
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Callable

import pytest
from setuptools import find_packages

import benchmarks
import consolidate_checkpoint
import convert_checkpoint
import demos
from demos.text import text_demo_main
from demos.video import video_demo_main
from sprint_mm.cli import merge_main, sample_main, train_main, write_shards_main
from tests.helpers import dataset_script, script_module

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sprint_mm", "registry", "demos", "benchmarks")


# ------------------------------------------------------------------------------------------------ imports


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the repository's packages."""
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The repository modules `name` imports anywhere in its file (function-level imports included). Importing a name
    from its own package's __init__ is left out: that is how registrations reach their registry (registry/sit.py
    imports BACKBONES from registry/__init__.py, which imports registry.sit), not a circle of two concepts."""

    def known(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {known(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package upwards
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            targets |= {known(f"{base}.{alias.name}") or known(base) for alias in node.names}
    return {t for t in targets if t and t != name and not name.startswith(f"{t}.")}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_house_has_no_import_circle():
    modules = module_files()
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert graph["demos.video"] >= {"demos.buckets", "demos.two_stages", "sprint_mm.cli"}  # the parser sees imports
    assert circles(graph) == []
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # and it finds one


def test_sprint_mm_imports_no_demo_benchmark_or_dataset_script():
    modules = module_files()
    outside = {(name, target) for name, path in modules.items() if name.startswith("sprint_mm")
               for target in imported_modules(name, path, modules) if not target.startswith("sprint_mm")}
    assert outside == set()
    library = [path.read_text() for name, path in modules.items() if name.startswith("sprint_mm")]
    assert not [text for text in library if "datasets/" in text and "spec_from_file_location" in text]


def test_demos_and_benchmarks_are_packages_the_project_installs():
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    installed = set(find_packages(where=str(REPO), include=include))
    assert {"sprint_mm", "registry", "demos", "benchmarks"} <= installed
    assert not installed & {"gin", "datasets", "tests"}  # gin/ and datasets/ would shadow gin-config and HF datasets


@pytest.mark.parametrize("package", [demos, benchmarks])
def test_every_demo_and_benchmark_module_imports_by_its_package_name(package):
    """A script that imported a sibling by its bare name (`from harness import ...`) would only import with its own
    folder on sys.path, as `python benchmarks/NAME.py` puts it: here it must import as a module of the package."""
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")


# ------------------------------------------------------------------------------------------------ flags


class Parsed(Exception):
    """Raised in place of parsing: carries the parser a command built."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__()
        self.parser = parser


def parser_of(main: Callable[[list[str]], object]) -> argparse.ArgumentParser:
    """The parser a command's `main` builds, caught when it parses (nothing past that runs)."""

    def caught(parser: argparse.ArgumentParser, *args, **kwargs):
        raise Parsed(parser)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", caught)
        try:
            main([])
        except Parsed as parsed:
            return parsed.parser
    raise AssertionError(f"{main} parsed no command line")


def command_mains() -> dict[str, Callable[[list[str]], object]]:
    """Every command of the repository by its path: the top-level scripts, the demos, datasets/ and benchmarks/."""
    mains = {"train.py": train_main, "sample.py": sample_main, "video_demo.py": video_demo_main,
             "text_demo.py": text_demo_main, "evaluate.py": script_module("evaluate.py", "evaluate_command").main,
             "convert_checkpoint.py": convert_checkpoint.main, "consolidate_checkpoint.py": consolidate_checkpoint.main,
             "merge_lora.py": merge_main}
    for name in ("make_moving_digits", "encode_images", "encode_videos", "cache_text_embeddings"):  # encode_videos
        mains[f"datasets/{name}.py"] = dataset_script(name).main  # imports encode_images: load that first
    mains["datasets/write_shards.py"] = write_shards_main
    for module in pkgutil.iter_modules(benchmarks.__path__):
        script = importlib.import_module(f"benchmarks.{module.name}")
        if hasattr(script, "main"):
            mains[f"benchmarks/{module.name}.py"] = script.main
    return mains


COMMANDS = command_mains()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_is_spelled_in_kebab_case(command):
    """The spelling a command shows first is kebab-case; a snake_case spelling is only the alias of its kebab twin."""
    actions = parser_of(COMMANDS[command])._actions
    assert any(action.option_strings and action.dest != "help" for action in actions)
    for action in actions:
        options = [option for option in action.option_strings if option.startswith("--")]
        if options:
            assert "_" not in options[0] and options[0] == options[0].lower(), f"{command}: {options[0]}"
            for older in (option for option in options if "_" in option):
                assert older.replace("_", "-") in options, f"{command}: {older} is no alias of a kebab-case flag"


# (command, argv in kebab-case, the same argv as earlier versions spelled it)
SPELLINGS = [
    ("train.py", ["--gin-file", "a.gin", "--gin-param", "x = 1", "--run-dir", "runs/r"],
     ["--gin_file", "a.gin", "--gin_param", "x = 1", "--run_dir", "runs/r"]),
    ("sample.py", ["--run-dir", "runs/r", "--num-samples", "8", "--batch-size", "4", "--gin-param", "x = 1"],
     ["--run_dir", "runs/r", "--num_samples", "8", "--batch_size", "4", "--gin_param", "x = 1"]),
    ("video_demo.py", ["--gin-param", "x = 1"], ["--gin_param", "x = 1"]),
    ("datasets/write_shards.py", ["out", "--gin-file", "a.gin", "--items-per-shard", "3", "--num-shards", "2"],
     ["out", "--gin_file", "a.gin", "--items_per_shard", "3", "--num_shards", "2"]),
    ("text_demo.py", ["--run-root", "runs/t", "--gin-param", "x = 1"],
     ["--run_root", "runs/t", "--gin_param", "x = 1"]),
    ("datasets/make_moving_digits.py", ["--out", "d", "--digit-fraction", "0.5"],
     ["--out", "d", "--digit_fraction", "0.5"]),
    ("benchmarks/video_speed.py", ["--encoder-depth", "3", "--decoder-depth", "1"],
     ["--encoder_depth", "3", "--decoder_depth", "1"]),
    ("benchmarks/bucket_speed.py", ["--encoder-depth", "3"], ["--encoder_depth", "3"]),
    ("benchmarks/prompt_accuracy.py", ["--per-prompt", "2"], ["--per_prompt", "2"]),
    ("benchmarks/equal_wallclock.py", ["--gin-param", "x = 1"], ["--gin_param", "x = 1"]),
    ("benchmarks/quality_curves.py", ["--gin-param", "x = 1"], ["--gin_param", "x = 1"]),
]


@pytest.mark.parametrize("command, kebab, older", SPELLINGS, ids=[row[0] for row in SPELLINGS])
def test_the_older_spellings_still_work(command, kebab, older):
    parser = parser_of(COMMANDS[command])
    assert parser.parse_args(kebab) == parser.parse_args(older)


# ------------------------------------------------------------------------------------------------ from any folder


@pytest.mark.parametrize("script", ["train.py", "sample.py", "video_demo.py", "text_demo.py"])
def test_commands_run_from_another_folder(script, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {script}") and "--gin-param" in done.stdout
