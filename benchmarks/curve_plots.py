"""Figures and TensorBoard curves of quality_curves.py and guidance_pareto.py, and the curve arithmetic they share.

`draw_quality_figures` reads quality_curves_<tokens>.json files and writes quality_curves.png (one column per token
count: judge accuracy and Frechet distance against training CPU seconds, dense vs SPRINT) plus TensorBoard scalars
under <folder>/tensorboard/quality; `draw_guidance_figure` writes guidance_pareto.png (accuracy and Frechet distance
against sampling CPU seconds, CFG vs PDG, Pareto points ringed) plus <folder>/tensorboard/guidance. Each call
rewrites its TensorBoard folder, so a redraw never duplicates curves.

    python benchmarks/curve_plots.py [--results benchmarks/results]     # redraw both from the JSON files
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen first)
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from benchmarks.harness import RESULTS  # noqa: E402

METRICS = (("accuracy", "judge accuracy", True), ("frechet", "Frechet distance (judge features)", False))
# (arm, guidance) -> (label, colour, line style)
QUALITY_LINES = {("dense", "cfg"): ("dense, CFG", "tab:gray", "-"),
                 ("sprint", "cfg"): ("SPRINT, CFG", "tab:blue", "-"),
                 ("sprint", "pdg"): ("SPRINT, PDG", "tab:orange", "--")}
GUIDANCE_COLOURS = {"none": "black", "cfg": "tab:blue", "pdg": "tab:orange"}


def time_to_reach(seconds: Sequence[float], values: Sequence[float], level: float,
                  higher_is_better: bool) -> Optional[float]:
    """The first time a piecewise-linear curve (seconds increasing) reaches `level`; None if it never does. A curve
    already at the level at its first point gives that point's time (an upper bound)."""
    if len(seconds) != len(values):
        raise ValueError(f"need one value per time, got {len(seconds)} times and {len(values)} values")
    sign = 1.0 if higher_is_better else -1.0
    previous = None
    for time, value in zip(seconds, values):
        if sign * (value - level) >= 0:
            if previous is None:
                return float(time)
            (t0, v0) = previous
            return float(t0 + (time - t0) * (level - v0) / (value - v0))
        previous = (time, value)
    return None


def curve(points: Sequence[dict], arm: str, guidance: str, metric: str) -> tuple[list[float], list[float]]:
    """Seed-mean (training seconds, metric) of quality_curves.py points at every budget an arm reached, in budget
    order."""
    by_budget: dict[float, list[tuple[float, float]]] = {}
    for point in points:
        if point["arm"] != arm:
            continue
        for quality in point["quality"]:
            if quality["guidance"] == guidance:
                by_budget.setdefault(point["budget_min"], []).append((point["train_s"], quality[metric]))
    budgets = sorted(by_budget)
    return ([statistics.fmean(s for s, _ in by_budget[b]) for b in budgets],
            [statistics.fmean(m for _, m in by_budget[b]) for b in budgets])


def pareto_front(points: Sequence[dict], metric: str, higher_is_better: bool) -> list[dict]:
    """The settings no other setting beats on both sampling cost and `metric` (cost ascending)."""
    sign = 1.0 if higher_is_better else -1.0
    front, best = [], -float("inf")
    for point in sorted(points, key=lambda p: (p["sample_cpu_s"], -sign * p[metric])):
        if sign * point[metric] > best:
            front.append(point)
            best = sign * point[metric]
    return front


def _fresh_writer_root(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def draw_quality_figures(paths: Sequence[Path], folder: Path) -> Path:
    """quality_curves.png and TensorBoard scalars from quality_curves_<tokens>.json files."""
    results = sorted((json.loads(Path(p).read_text()) for p in paths), key=lambda r: r["tokens"])
    results = [r for r in results if r["points"]]
    if not results:
        raise ValueError(f"no measured points in {[str(p) for p in paths]}")
    figure, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 7.5), squeeze=False)
    tensorboard = _fresh_writer_root(folder / "tensorboard" / "quality")
    writers = {key: SummaryWriter(str(tensorboard / f"{key[0]}_{key[1]}")) for key in QUALITY_LINES}
    for column, result in enumerate(results):
        for row, (metric, label, _) in enumerate(METRICS):
            ax = axes[row][column]
            for (arm, guidance), (name, colour, style) in QUALITY_LINES.items():
                seconds, values = curve(result["points"], arm, guidance, metric)
                if not seconds:
                    continue
                ax.plot(seconds, values, style, marker="o", color=colour, label=name)
                for point in result["points"]:  # every seed, faint
                    for quality in point["quality"]:
                        if point["arm"] == arm and quality["guidance"] == guidance:
                            ax.plot(point["train_s"], quality[metric], ".", color=colour, alpha=0.35)
                for second, value in zip(seconds, values):
                    writers[(arm, guidance)].add_scalar(f"{metric}/{result['tokens']}_tokens", value, round(second))
            if metric == "frechet":
                floor = result["frechet_floor"]
                ax.axhline(floor, color="green", linewidth=0.8, linestyle=":", label=f"real digits ({floor:.2f})")
                ax.set_yscale("log")
            seeds = len(result["seeds"])
            ax.set_title(f"{result['tokens']} tokens (patch {result['patch']}), {seeds} seed{'s' * (seeds > 1)}")
            ax.set_xlabel("training CPU seconds (1 thread; SPRINT: stage 1 + stage 2)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    for writer in writers.values():
        writer.close()
    figure.tight_layout()
    path = folder / "quality_curves.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def guidance_label(point: dict) -> str:
    low, high = point["interval"]
    if point["guidance"] == "none":
        return "none"
    return f"{point['guidance']} {point['scale']:g}" + ("" if (low, high) == (0.0, 1.0) else f" [{low:g},{high:g}]")


def draw_guidance_figure(result: dict, folder: Path) -> Path:
    """guidance_pareto.png and TensorBoard scalars from a guidance_pareto.py result."""
    points = result["settings"]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    tensorboard = _fresh_writer_root(folder / "tensorboard" / "guidance")
    for ax, (metric, label, higher_is_better) in zip(axes, METRICS):
        for kind, colour in GUIDANCE_COLOURS.items():
            mine = [p for p in points if p["guidance"] == kind]
            ax.scatter([p["sample_cpu_s"] for p in mine], [p[metric] for p in mine], color=colour,
                       label=kind.upper() if kind != "none" else "no guidance", s=24)
        front = pareto_front(points, metric, higher_is_better)
        ax.plot([p["sample_cpu_s"] for p in front], [p[metric] for p in front], color="black", linewidth=0.8,
                label="Pareto front")
        for point in front:
            ax.scatter(point["sample_cpu_s"], point[metric], s=110, facecolors="none", edgecolors="black")
            ax.annotate(guidance_label(point), (point["sample_cpu_s"], point[metric]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel(f"sampling CPU seconds ({result['samples']} samples, euler {result['steps']} steps, 1 thread)")
        ax.set_ylabel(label)
        if metric == "frechet":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for kind in GUIDANCE_COLOURS:
        mine = sorted((p for p in points if p["guidance"] == kind), key=lambda p: p["sample_cpu_s"])
        if not mine:
            continue
        with SummaryWriter(str(tensorboard / kind)) as writer:
            for metric, _, _ in METRICS:  # x: sampling milliseconds (TensorBoard steps are integers)
                for point in mine:
                    writer.add_scalar(f"{metric}_vs_sampling_ms", point[metric], round(1000 * point["sample_cpu_s"]))
    axes[0].set_title(f"guidance vs cost: {result['run']}")
    figure.tight_layout()
    path = folder / "guidance_pareto.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    parser = argparse.ArgumentParser(description="Redraw the quality and guidance figures from their JSON results.")
    parser.add_argument("--results", default=str(RESULTS), help="folder of the JSON results; the figures go there")
    folder = Path(parser.parse_args(argv).results)
    drawn = []
    curves = sorted(folder.glob("quality_curves_*.json"))
    if curves:
        drawn.append(draw_quality_figures(curves, folder))
    if (folder / "guidance_pareto.json").is_file():
        drawn.append(draw_guidance_figure(json.loads((folder / "guidance_pareto.json").read_text()), folder))
    print("\n".join(str(p) for p in drawn) or f"nothing to draw in {folder}")
    return drawn


if __name__ == "__main__":
    main()
