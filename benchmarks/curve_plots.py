"""Figures and TensorBoard curves of quality_curves.py and guidance_pareto.py, and the curve arithmetic they share.

`draw_quality_figures` reads quality_curves_<tokens>.json files and writes quality_curves.png (one column per token
count: judge accuracy and Frechet distance against training CPU seconds, dense vs SPRINT) plus TensorBoard scalars
under <folder>/tensorboard/quality; `draw_guidance_figure` writes guidance_pareto*.png (accuracy and Frechet distance
against GFLOPs per sample and sampling CPU seconds, CFG, PDG and sparse guidance, filled markers on every token,
hollow ones with a sparse middle at the noisy steps, Pareto points ringed) plus <folder>/tensorboard/guidance*. Each
call rewrites its TensorBoard folder, so a redraw never duplicates curves.

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
GUIDANCE_COLOURS = {"none": "black", "cfg": "tab:blue", "pdg": "tab:orange", "sparse": "tab:green"}
COSTS = {"gflops": "matmul GFLOPs per sample", "sample_cpu_s": "sampling CPU seconds"}  # guidance_pareto's costs


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


def pareto_front(points: Sequence[dict], metric: str, higher_is_better: bool, cost: str = "sample_cpu_s") -> list[dict]:
    """The settings no other setting beats on both `cost` and `metric` (cost ascending)."""
    sign = 1.0 if higher_is_better else -1.0
    front, best = [], -float("inf")
    for point in sorted(points, key=lambda p: (p[cost], -sign * p[metric])):
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
    """'pdg 2 [0.25,0.75] keep 0.25>0.5': guidance, scale, interval (unless [0, 1]), middle density (unless every
    token), sparse guidance's weak keep."""
    low, high = point["interval"]
    label = "none" if point["guidance"] == "none" else f"{point['guidance']} {point['scale']:g}"
    if point["guidance"] != "none" and (low, high) != (0.0, 1.0):
        label += f" [{low:g},{high:g}]"
    if point.get("middle_keep", 1.0) < 1.0:
        label += f" keep {point['middle_keep']:g}>{point['keep_above']:g}"
    if point["guidance"] == "sparse":
        label += f" weak {point['sparse_keep']:g}"
    return label


def _scatter_costs(ax, points: Sequence[dict], metric: str, higher_is_better: bool, cost: str) -> None:
    """Every setting by guidance kind (hollow markers: a sparse middle at the noisy steps), the Pareto front ringed."""
    for kind, colour in GUIDANCE_COLOURS.items():
        for thinned in (False, True):
            mine = [p for p in points if p["guidance"] == kind and (p.get("middle_keep", 1.0) < 1.0) == thinned]
            if mine:
                name = (kind.upper() if kind != "none" else "no guidance") + (", sparse middle" if thinned else "")
                ax.scatter([p[cost] for p in mine], [p[metric] for p in mine], s=24, label=name,
                           color=colour if not thinned else "none", edgecolors=colour)
    front = pareto_front(points, metric, higher_is_better, cost)
    ax.plot([p[cost] for p in front], [p[metric] for p in front], color="black", linewidth=0.8, label="Pareto front")
    for point in front:
        ax.scatter(point[cost], point[metric], s=110, facecolors="none", edgecolors="black")
        ax.annotate(guidance_label(point), (point[cost], point[metric]), fontsize=6, textcoords="offset points",
                    xytext=(4, 4))


def draw_guidance_figure(result: dict, folder: Path, stem: str = "guidance_pareto") -> Path:
    """<stem>.png and TensorBoard scalars (under tensorboard/guidance<stem's rest>) from a guidance_pareto.py result:
    accuracy and Frechet distance against GFLOPs per sample (when the result has them) and sampling CPU seconds."""
    points = result["settings"]
    costs = [cost for cost in COSTS if all(cost in p for p in points)]
    figure, axes = plt.subplots(len(costs), 2, figsize=(13, 5 * len(costs)), squeeze=False)
    tensorboard = _fresh_writer_root(folder / "tensorboard" / ("guidance" + stem[len("guidance_pareto"):]))
    sampler = f"{result.get('solver', 'euler')} {result['steps']} steps"
    for row, cost in enumerate(costs):
        for ax, (metric, label, higher_is_better) in zip(axes[row], METRICS):
            _scatter_costs(ax, points, metric, higher_is_better, cost)
            ax.set_xlabel(f"{COSTS[cost]} ({result['samples']} samples, {sampler}{', 1 thread' * (cost != 'gflops')})")
            ax.set_ylabel(label)
            if metric == "frechet":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    for kind in GUIDANCE_COLOURS:
        mine = sorted((p for p in points if p["guidance"] == kind), key=lambda p: p["sample_cpu_s"])
        if not mine:
            continue
        with SummaryWriter(str(tensorboard / kind)) as writer:
            for metric, _, _ in METRICS:  # x: sampling milliseconds (TensorBoard steps are integers)
                for point in mine:
                    writer.add_scalar(f"{metric}_vs_sampling_ms", point[metric], round(1000 * point["sample_cpu_s"]))
    axes[0][0].set_title(f"guidance vs cost: {result['run']}")
    figure.tight_layout()
    path = folder / f"{stem}.png"
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
    for path in sorted(folder.glob("guidance_pareto*.json")):
        drawn.append(draw_guidance_figure(json.loads(path.read_text()), folder, path.stem))
    print("\n".join(str(p) for p in drawn) or f"nothing to draw in {folder}")
    return drawn


if __name__ == "__main__":
    main()
