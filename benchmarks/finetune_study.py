"""From a pretrained dense model to new classes, under equal CPU training time: does converting to SPRINT pay?

1. Pretrain (once, shared by every arm and seed): the dense digits SiT at 256 tokens (16 px, patch 1) on digits 0-4
   only, for `--pretrain-minutes` of step CPU time. Its class table has rows for all ten digits; 5-9 never trained.
2. Adapt it to all ten digits, each arm for every budget point B (CPU minutes of training steps, resumed between
   points as quality_curves.py does), all from the pretrained run's EMA (`Trainer.init_from`):
     dense         full fine-tune for B
     dense_lora    LoRA (rank 8 on the attention and MLP layers, the class table in full) for B
     sprint_mask   converted to SPRINT (identity fusion: the dense model exactly), stage 1 (0.75 structured drop, path
                   drop) for 0.75 B, then its own stage 2 (full tokens) of 0.25 B from that point's stage-1 checkpoint
     sprint_route  sprint_mask with the routing fill (dropped tokens carry their encoder output, TREAD's idea)
     sprint_lora   sprint_mask with the dense_lora adapters in both stages
3. Judge every point alike: `--per-class` samples of every digit from one fixed noise batch (Euler `--steps`), CFG at
   `--scale` for every arm and PDG for the SPRINT arms: the digits judge's accuracy on the new digits (5-9), on the old
   ones (0-4: forgetting, against the pretrained model's own score) and on all, and the Frechet distance of the judge's
   features to the real test digits.
4. The loss at the first steps (the spike TREAD users report): each arm's starting model under its own stage-1
   objective on fixed batches of all ten digits (step 0), and the training loss of its first `--first-steps` steps
   (logged every step).

    python benchmarks/finetune_study.py --pretrain-only                  # step 1 (the root must not hold it yet)
    python benchmarks/finetune_study.py --seeds 0 [--budgets 1.5 3]      # steps 2-4 for a seed (seeds may run side by
    python benchmarks/finetune_study.py --seeds 1                        # side, one thread each)
    python benchmarks/finetune_study.py --report                         # the table, levels and figure of all seeds

Every seed writes <results>/finetune_study/seed<s>.json (rewritten after each point); the report combines
them into <results>/finetune_study.json and finetune_study.png (`--results`, default benchmarks/results). Training time is the CPU time of the
training steps on one thread (`Trainer.clock = 'cpu'`), so other jobs on the machine do not change the budgets.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen first)
import torch  # noqa: E402

from benchmarks.curve_plots import curve, time_to_reach  # noqa: E402
from benchmarks.demo_accuracy import class_major_labels  # noqa: E402
from benchmarks.equal_wallclock import DENSE, STAGE1, STAGE2, training_record  # noqa: E402
from benchmarks.harness import RESULTS, load_class_run, markdown_table, write_result  # noqa: E402
from benchmarks.quality_curves import Judge, model_bindings, train_until  # noqa: E402
from sprint_mm.configs import parse_gin  # noqa: E402
from sprint_mm.conversion import starting_state  # noqa: E402
from sprint_mm.data.digits import DigitsDataset  # noqa: E402
from sprint_mm.flow import FlowMatching  # noqa: E402
from sprint_mm.models import build_model  # noqa: E402
from sprint_mm.runs import find_checkpoint, resolve_weights  # noqa: E402
from sprint_mm.sampling import Guidance  # noqa: E402
from sprint_mm.sharded import read_weights  # noqa: E402
from sprint_mm.trained import TrainedRun  # noqa: E402

OLD, NEW = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
CONVERT, LORA = "gin/base/convert.gin", "gin/base/lora.gin"
LORA_BINDINGS = ["LoRA.rank = 8", "LoRA.alpha = 8.0", "LoRA.full = ['y_embedder']"]
STAGE2_SHARE = 0.25
TOKENS, RESOLUTION = 256, 16


@dataclass(frozen=True)
class Arm:
    """How an arm adapts the pretrained model: its gin files and bindings; SPRINT arms train two stages."""

    files: tuple[str, ...]
    bindings: tuple[str, ...] = ()
    sprint: bool = field(default=False)


ARMS = {
    "dense": Arm((STAGE1, DENSE)),
    "dense_lora": Arm((STAGE1, DENSE, LORA), tuple(LORA_BINDINGS)),
    "sprint_mask": Arm((STAGE1, CONVERT), sprint=True),
    "sprint_route": Arm((STAGE1, CONVERT), ("Sprint.fill = 'route'",), sprint=True),
    "sprint_lora": Arm((STAGE1, CONVERT, LORA), tuple(LORA_BINDINGS), sprint=True),
}


def study_bindings(args: argparse.Namespace, seed: int, classes: Sequence[int] = (*OLD, *NEW)) -> list[str]:
    """The digits model at 256 tokens on one thread, every step logged, `classes` in the data."""
    return model_bindings(TOKENS, RESOLUTION, args.batch, seed, [
        f"DigitsDataset.classes = {list(classes)}", "Trainer.log_every = 1",
        f"Trainer.warmup_steps = {args.warmup}", *args.gin_param])


# ----------------------------------------------------------------------------------------------
# Judging
# ----------------------------------------------------------------------------------------------


def judge_run(run: TrainedRun, judge: Judge, guidance: Guidance, args: argparse.Namespace) -> dict:
    """Accuracy on all, old and new digits, Frechet distance and sampling CPU seconds of one guidance setting."""
    labels = class_major_labels(run.num_classes, args.per_class)
    noise = torch.randn((len(labels), *run.model.backbone.sample_shape),
                        generator=torch.Generator().manual_seed(args.sample_seed))
    started = time.process_time()
    samples = run.generate(labels, noise, args.steps, "euler", guidance, batch_size=len(labels))
    seconds = time.process_time() - started
    right = judge.classifier.predict(samples) == labels
    old = torch.isin(labels, torch.tensor(OLD))
    return {"guidance": guidance.kind, "accuracy": float(right.float().mean()),
            "accuracy_old": float(right[old].float().mean()), "accuracy_new": float(right[~old].float().mean()),
            "frechet": judge.frechet(samples), "sample_cpu_s": seconds}


def judge_point(run_dir: Path, judge: Judge, args: argparse.Namespace, sprint: bool) -> list[dict]:
    run = load_class_run(run_dir)
    return [judge_run(run, judge, Guidance(kind, args.scale), args) for kind in (("cfg", "pdg") if sprint else ("cfg",))]


# ----------------------------------------------------------------------------------------------
# The loss at the first steps
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def starting_loss(arm: Arm, pretrained: Path, args: argparse.Namespace, batches: int = 8) -> float:
    """The arm's starting model (the pretrained EMA as the trainer loads it) under its stage-1 objective, on `batches`
    fixed batches of all ten digits with fixed times, noise, masks and path drops."""
    parse_gin(list(arm.files), [*study_bindings(args, 0), *arm.bindings])
    model = build_model().eval()
    state, fresh = starting_state(model, read_weights(resolve_weights(pretrained)), str(pretrained))
    model.load_state_dict({**state, **{key: model.state_dict()[key] for key in fresh}})
    data = DigitsDataset(resolution=RESOLUTION, split="train")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    objective, losses = FlowMatching(), []
    for b in range(batches):  # a generator per batch: every arm draws the same times, noise and label drops
        items = [data[int(i)] for i in order[b * args.batch:(b + 1) * args.batch]]
        x0, labels = torch.stack([item["x"] for item in items]), torch.tensor([item["label"] for item in items])
        losses.append(float(objective.loss(model, x0, labels, torch.Generator().manual_seed(1000 + b))))
    return statistics.fmean(losses)


def first_losses(run_dir: Path, count: int) -> list[float]:
    """The training loss of a run's first `count` steps (metrics.jsonl, logged every step)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line][:count]


# ----------------------------------------------------------------------------------------------
# Pretraining and the arms
# ----------------------------------------------------------------------------------------------


def pretrain(args: argparse.Namespace) -> Path:
    """The dense model on digits 0-4 (seed 0), trained (or resumed) to its budget."""
    folder = Path(args.root) / "pretrain"
    record = train_until([STAGE1, DENSE], folder, args.pretrain_minutes, study_bindings(args, 0, OLD))
    print(f"[finetune study] pretrained on digits 0-4: {record['steps']} steps, {record['train_s']:.0f} CPU s",
          flush=True)
    return folder


def run_seed(seed: int, pretrained: Path, judge: Judge, args: argparse.Namespace) -> dict:
    """Every arm at every budget point for one seed; the seed's result file is rewritten after each point."""
    out = Path(args.results) / "finetune_study" / f"seed{seed}.json"
    result = json.loads(out.read_text()) if out.is_file() else {"seed": seed, "points": []}
    result.setdefault("first_losses", {})
    bindings, folder = study_bindings(args, seed), Path(args.root) / f"seed{seed}"
    done = {(point["arm"], point["budget_min"]) for point in result["points"]}
    for budget in args.budgets:
        for name, arm in ARMS.items():
            if (name, budget) in done:
                continue
            extra = [*bindings, *arm.bindings]
            if arm.sprint:
                stage1 = train_until(list(arm.files), folder / name / "stage1", (1 - STAGE2_SHARE) * budget, extra,
                                     init_from=pretrained)
                judged = folder / name / f"stage2_at_{budget:g}min"
                stage2 = train_until([STAGE2, *arm.files[2:]], judged, STAGE2_SHARE * budget, extra,
                                     init_from=find_checkpoint(folder / name / "stage1"))
                point = {"train_s": stage1["train_s"] + stage2["train_s"], "stage1_steps": stage1["steps"],
                         "stage2_steps": stage2["steps"]}
                first = folder / name / "stage1"
            else:
                judged = first = folder / name
                record = train_until(list(arm.files), judged, budget, extra, init_from=pretrained)
                point = {"train_s": record["train_s"], "steps": record["steps"]}
            point.update(arm=name, seed=seed, budget_min=budget, quality=judge_point(judged, judge, args, arm.sprint))
            result["points"].append(point)
            result["first_losses"][name] = first_losses(first, args.first_steps)
            write_result(result, out)
            cells = ", ".join(f"{q['guidance']} new {q['accuracy_new']:.2f} old {q['accuracy_old']:.2f} "
                              f"fd {q['frechet']:.2f}" for q in point["quality"])
            print(f"[finetune study] seed {seed} {name} at {budget:g} min ({point['train_s']:.0f} CPU s): {cells}",
                  flush=True)
    return result


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


def report(args: argparse.Namespace, judge: Judge) -> dict:
    """Combine every seed's file: seed means, times to each level, the starting losses, the figure."""
    folder = Path(args.results)
    seeds = [json.loads(path.read_text()) for path in sorted((folder / "finetune_study").glob("seed*.json"))]
    if not seeds:
        raise FileNotFoundError(f"no seed results under {folder / 'finetune_study'}: run the study for a seed first")
    pretrained = Path(args.root) / "pretrain"
    points = [point for seed in seeds for point in seed["points"]]
    result = {
        "tokens": TOKENS, "resolution": RESOLUTION, "batch": args.batch, "warmup_steps": args.warmup,
        "stage2_share": STAGE2_SHARE, "lora": LORA_BINDINGS, "per_class": args.per_class, "steps": args.steps,
        "scale": args.scale, "clock": "process CPU time of the training steps, 1 thread",
        "pretrained": {**training_record(pretrained),
                       "quality": judge_point(pretrained, judge, args, sprint=False)},
        "seeds": [seed["seed"] for seed in seeds], "points": points,
        "first_losses": {name: mean_curve([seed["first_losses"][name] for seed in seeds
                                           if name in seed["first_losses"]]) for name in ARMS},
        "starting_loss": {name: starting_loss(arm, pretrained, args) for name, arm in ARMS.items()},
        "frechet_floor": judge.frechet_floor(10 * args.per_class),
    }
    result["levels"] = levels(points, args.accuracy_levels, args.frechet_levels)
    write_result(result, folder / "finetune_study.json")
    draw(result, folder / "finetune_study.png")
    print(markdown_table(["arm", "guidance", "budget min", "steps", "new", "old", "all", "FD"], table_rows(points)))
    return result


def mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    """The step-by-step mean of loss curves (as long as the shortest)."""
    length = min((len(c) for c in curves), default=0)
    return [statistics.fmean(c[i] for c in curves) for i in range(length)]


def lines_of(points: Sequence[dict]) -> list[tuple[str, str]]:
    """(arm, guidance) of every curve the points hold, in the order of ARMS."""
    found = {(point["arm"], quality["guidance"]) for point in points for quality in point["quality"]}
    return [(arm, guidance) for arm in ARMS for guidance in ("cfg", "pdg") if (arm, guidance) in found]


def levels(points: Sequence[dict], accuracy_levels: Sequence[float], frechet_levels: Sequence[float]) -> list[dict]:
    """Training CPU seconds each curve needs to reach each level of new-digit accuracy and of FD (seed means,
    linear between budget points; None: not reached)."""
    rows = []
    for metric, targets, higher in (("accuracy_new", accuracy_levels, True), ("frechet", frechet_levels, False)):
        for level in targets:
            for arm, guidance in lines_of(points):
                seconds = time_to_reach(*curve(points, arm, guidance, metric), level, higher)
                rows.append({"metric": metric, "level": level, "arm": arm, "guidance": guidance, "seconds": seconds})
    return rows


def table_rows(points: Sequence[dict]) -> list[list]:
    """Seed means (and the seeds' range) per arm, guidance and budget."""
    rows = []
    for arm, guidance in lines_of(points):
        for budget in sorted({p["budget_min"] for p in points if p["arm"] == arm}):
            chosen = [p for p in points if p["arm"] == arm and p["budget_min"] == budget]
            steps = "/".join(str(p.get("steps") or f"{p['stage1_steps']}+{p['stage2_steps']}") for p in chosen)
            cells = []
            for metric in ("accuracy_new", "accuracy_old", "accuracy", "frechet"):
                values = [q[metric] for p in chosen for q in p["quality"] if q["guidance"] == guidance]
                cells.append(f"{statistics.fmean(values):.2f} ({'/'.join(f'{v:.2f}' for v in values)})")
            rows.append([arm, guidance, budget, steps, *cells])
    return rows


def draw(result: dict, path: Path) -> Path:
    """New-digit accuracy, old-digit accuracy and FD against training CPU seconds, and the first steps' losses."""
    figure, axes = plt.subplots(1, 4, figsize=(21, 4.6))
    colours = dict(zip(ARMS, ("tab:gray", "tab:brown", "tab:blue", "tab:orange", "tab:green")))
    for ax, (metric, label) in zip(axes, (("accuracy_new", "accuracy on the new digits 5-9"),
                                         ("accuracy_old", "accuracy on the old digits 0-4"),
                                         ("frechet", "Frechet distance (judge features)"))):
        for arm, guidance in lines_of(result["points"]):
            seconds, values = curve(result["points"], arm, guidance, metric)
            ax.plot(seconds, values, "-" if guidance == "cfg" else "--", marker="o", color=colours[arm],
                    label=f"{arm}, {guidance.upper()}")
        start = result["pretrained"]["quality"][0][metric]
        ax.axhline(start, color="black", linewidth=0.8, linestyle=":", label=f"pretrained on 0-4 ({start:.2f})")
        ax.set_xlabel("training CPU seconds (1 thread; SPRINT: stage 1 + stage 2)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    for arm, losses in result["first_losses"].items():
        axes[3].plot(range(1, len(losses) + 1), losses, color=colours[arm], label=arm)
        axes[3].plot(0, result["starting_loss"][arm], "o", color=colours[arm])
    axes[3].set_xlabel("step (0: the starting model on fixed batches)")
    axes[3].set_ylabel("training loss (stage 1), seed mean")
    axes[3].grid(alpha=0.3)
    axes[3].legend(fontsize=7)
    figure.suptitle(f"Adapting a dense digits model (pretrained on 0-4) to all ten digits, {TOKENS} tokens, "
                    f"{len(result['seeds'])} seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fine-tuning a pretrained dense digits model to new digits: dense, "
                                                 "LoRA, SPRINT conversion (mask / routing fill), SPRINT + LoRA.")
    parser.add_argument("--pretrain-only", action="store_true", help="only pretrain the dense model on digits 0-4")
    parser.add_argument("--report", action="store_true", help="only combine the seeds' results")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.5, 3.0],
                        help="training CPU minutes of each point (every arm)")
    parser.add_argument("--pretrain-minutes", type=float, default=6.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=20, help="warm-up steps of every fine-tune (and the pretraining)")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10, help="Euler sampling steps")
    parser.add_argument("--scale", type=float, default=1.5, help="CFG and PDG scale")
    parser.add_argument("--sample-seed", type=int, default=0)
    parser.add_argument("--first-steps", type=int, default=40, help="steps whose training loss the study keeps")
    parser.add_argument("--accuracy-levels", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--frechet-levels", type=float, nargs="+", default=[5.0, 2.0, 1.0])
    parser.add_argument("--root", default="runs/finetune_study")
    parser.add_argument("--results", default=str(RESULTS), help="folder of the result files")
    parser.add_argument("--gin-param", action="append", default=[], help="extra binding for every run (repeatable)")
    args = parser.parse_args(argv)
    if sorted(args.budgets) != args.budgets or args.budgets[0] <= 0:
        parser.error(f"--budgets must be positive and increasing, got {args.budgets}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    args = parse_args(argv)
    pretrained = Path(args.root) / "pretrain"
    if args.pretrain_only:
        pretrain(args)
        return None
    judge = Judge.train(RESOLUTION)
    if args.report:
        return report(args, judge)
    if not (pretrained / "checkpoints").is_dir():
        raise FileNotFoundError(f"no pretrained model under {pretrained}: run with --pretrain-only first")
    for seed in args.seeds:
        run_seed(seed, pretrained, judge, args)
    return None


if __name__ == "__main__":
    main()
