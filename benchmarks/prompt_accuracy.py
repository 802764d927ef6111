"""Prompt accuracy of a text-conditioned digits run: do PDG and CFG samples show the digit the prompt names?

    python benchmarks/prompt_accuracy.py [--run runs/text_demo/stage2] [--per-prompt 4] [--scale 2.0]

Samples every training phrasing and every held-out phrasing (never seen in training) for the digits 0..9 through
sample.py's command line (unguided, CFG and PDG), reads them with the digits judge of benchmarks/digits_classifier.py
(a small CNN trained on the real training digits), prints a markdown table and writes
benchmarks/results/prompt_accuracy.json.
"""
from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.digits_classifier import DigitsClassifier, test_split_accuracy
from benchmarks.harness import RESULTS, add_out_option, markdown_table, write_result
from sprint_mm.cli import sample_main
from sprint_mm.data.captioned_digits import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES, prompts_for
from sprint_mm.sampling import GUIDANCES

HEADERS = {"none": "unguided", "cfg": "CFG", "pdg": "PDG", "sparse": "sparse guidance"}  # a column per sampling.GUIDANCES
TARGET = 0.70  # PDG accuracy over all prompts, held-out phrasings included


# ----------------------------------------------------------------------------------------------------------------
# Sampling through sample.py
# ----------------------------------------------------------------------------------------------------------------

def sample_prompts(run: str, prompts: list[str], per_prompt: int, guidance: str, scale: float, steps: int,
                   seed: int, folder: Path) -> torch.Tensor:
    """(len(prompts) * per_prompt, 1, H, W) samples in [-1, 1]; sample i answers prompts[i % len(prompts)]."""
    prompt_file = folder / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    out = folder / f"samples_{guidance}.npz"
    argv = ["--run", run, "--prompts", str(prompt_file), "--num", str(len(prompts) * per_prompt), "--guidance",
            guidance, "--scale", str(scale), "--steps", str(steps), "--seed", str(seed), "--out", str(out)]
    if sample_main(argv) != 0:
        raise ValueError(f"sampling failed: sample.py {' '.join(argv)}")
    grey = torch.from_numpy(np.load(out)["arr_0"][..., 0])  # (N, H, W) uint8: the packs are grey written as RGB
    return grey[:, None].float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------

def summarise(correct: dict[tuple[str, str], list[bool]]) -> list[dict]:
    """Accuracy per phrasing, then per group (seen, held-out, all), from {(guidance, template): [correct?]}."""
    groups = {"seen": TRAIN_TEMPLATES, "held-out": HELD_OUT_TEMPLATES}
    rows = [{"prompts": group, "phrasing": template, **{g: float(np.mean(correct[g, template])) for g in GUIDANCES}}
            for group, templates in groups.items() for template in templates]
    for name, templates in (*groups.items(), ("all", TRAIN_TEMPLATES + HELD_OUT_TEMPLATES)):
        rows.append({"prompts": f"**{name}**", "phrasing": f"{len(templates)} phrasings x 10 digits",
                     **{g: float(np.mean([c for t in templates for c in correct[g, t]])) for g in GUIDANCES}})
    return rows


def prompt_accuracy(run: str, per_prompt: int, scale: float, steps: int, seed: int) -> dict:
    """Sample every phrasing for every digit with each guidance, judge the samples with the digits classifier."""
    templates = TRAIN_TEMPLATES + HELD_OUT_TEMPLATES
    prompt_digits = prompts_for(templates)  # template by template, digits 0..9
    prompts = list(prompt_digits)
    template_of = [template for template in templates for _ in range(10)]
    with tempfile.TemporaryDirectory() as folder:
        samples = {guidance: sample_prompts(run, prompts, per_prompt, guidance, scale, steps, seed, Path(folder))
                   for guidance in tqdm(GUIDANCES, desc="guidances")}
    judge = DigitsClassifier.train(resolution=samples["pdg"].shape[-1], channels=1, progress=True)
    correct: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for guidance, images in samples.items():
        for i, digit in enumerate(judge.predict(images).tolist()):
            k = i % len(prompts)
            correct[guidance, template_of[k]].append(digit == prompt_digits[prompts[k]])
    return {
        "run": run, "per_prompt": per_prompt, "scale": scale, "steps": steps, "seed": seed,
        "judge": "benchmarks/digits_classifier.py (CNN on the real train digits)",
        "judge_test_accuracy": test_split_accuracy(judge),
        "rows": summarise(correct), "target_pdg_all": TARGET,
    }


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/text_demo/stage2", help="a text-conditioned digits run folder")
    parser.add_argument("--per-prompt", "--per_prompt", type=int, default=4, help="samples per prompt")
    parser.add_argument("--scale", type=float, default=2.0, help="guidance scale of CFG and PDG")
    parser.add_argument("--steps", type=int, default=50, help="Euler steps")
    parser.add_argument("--seed", type=int, default=0)
    add_out_option(parser, RESULTS / "prompt_accuracy.json")
    args = parser.parse_args(argv)
    if args.per_prompt < 1:
        raise ValueError(f"--per-prompt must be >= 1, got {args.per_prompt}")
    result = prompt_accuracy(args.run, args.per_prompt, args.scale, args.steps, args.seed)
    header = ["prompts", "phrasing", *(HEADERS[g] for g in GUIDANCES)]
    cells = [[row["prompts"], row["phrasing"], *(f"{100 * row[g]:.1f}%" for g in GUIDANCES)] for row in result["rows"]]
    table = markdown_table(header, cells)
    pdg_all = result["rows"][-1]["pdg"]
    print(f"\nprompt accuracy of {args.run} ({args.per_prompt} samples per prompt, scale {args.scale}, "
          f"{args.steps} Euler steps; judge: {result['judge']}, "
          f"{100 * result['judge_test_accuracy']:.1f}% on the real test digits)\n\n{table}\n\n"
          f"PDG over all prompts: {100 * pdg_all:.1f}% (target >= {100 * TARGET:.0f}%)")
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
