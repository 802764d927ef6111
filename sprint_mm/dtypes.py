"""The floating-point dtypes a frozen encoder (text encoder, VAE) can be loaded in, by the name configs use."""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str, setting: str = "dtype") -> torch.dtype:
    """The torch dtype called `name`; a ValueError names `setting` and the allowed names otherwise."""
    if name not in DTYPES:
        raise ValueError(f"{setting} {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]
