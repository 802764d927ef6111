"""Merge a LoRA run's adapters into its weights: `python merge_lora.py runs/my_lora_run --out merged.safetensors`.

Writes a plain full checkpoint (the run's EMA by default, `--weights model` for the trained weights, `--step N` for
another checkpoint) that loads strictly into the same model built without LoRA (`build_model.lora = None`).
"""
import sys

from sprint_mm.cli import merge_main

if __name__ == "__main__":
    sys.exit(merge_main())
