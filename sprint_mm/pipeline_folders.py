"""Local diffusers folders: a pipeline folder (`model_index.json` and one subfolder per component: `transformer/`,
`text_encoder/`, `tokenizer/`, `vae/`, ...) as `save_pretrained` of a pipeline writes it, or one component's own folder.
Every part of a family (its transformer, text encoders, VAE) takes either, so one folder names the whole model.
"""
from __future__ import annotations

import json
from pathlib import Path

PIPELINE_INDEX = "model_index.json"
CONFIG = "config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def is_pipeline_folder(folder: Path) -> bool:
    return (folder / PIPELINE_INDEX).is_file()


def pipeline_component(folder: str | Path, component: str, what: str) -> Path:
    """The folder of `component` (e.g. 'transformer', 'vae') when `folder` is a pipeline folder, else `folder` itself
    (whose checks are its caller's); one line when the pipeline has no such component."""
    folder = Path(folder).expanduser()
    if not is_pipeline_folder(folder):
        return folder
    sub = folder / component
    if not sub.is_dir():
        present = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
        raise FileNotFoundError(f"the pipeline folder {str(folder)!r} has no {component}/ for its {what} (it has "
                                f"{', '.join(present) or 'no subfolders'})")
    return sub


def component_config(folder: Path, what: str, expected: str) -> dict:
    """The config.json of a diffusers component folder that must also hold weights; one line naming what is missing
    and what a folder of `expected` holds."""
    contents = (f"a diffusers pipeline folder ({PIPELINE_INDEX} and transformer/) or a {expected} folder ({CONFIG} "
                "and diffusion_pytorch_model*.safetensors, as save_pretrained writes them)")
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(folder)!r} does not exist; give {contents}")
    if not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"{str(folder)!r} holds no {what} config ({CONFIG}); give {contents}")
    if not any(entry.name.endswith(WEIGHT_SUFFIXES) for entry in folder.iterdir()):
        raise FileNotFoundError(f"{str(folder)!r} holds a {what} config but no weights; give {contents}")
    return json.loads((folder / CONFIG).read_text())
