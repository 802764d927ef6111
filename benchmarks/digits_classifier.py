"""The judge of the digits benchmarks: a small CNN trained here on the real scikit-learn digits.

It trains on the train split of `DigitsDataset` at the resolution and channels of the samples it will judge (every
image resized to 16 px inside; random rotations, scalings and shifts as augmentation), then `score(samples, labels)` is the fraction of generated
samples it reads as the class they were asked for. Training is seeded and single-threaded, so the same settings give
the same judge on any machine (and the run is not slowed by other processes fighting over OpenMP threads).

    python benchmarks/digits_classifier.py [--resolution 16] [--channels 1] [--epochs 10]

prints the accuracy on the held-out test split and writes benchmarks/results/digits_classifier.json.
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from benchmarks.harness import RESULTS, add_out_option, markdown_table, torch_threads, write_result
from sprint_mm.data.digits import DigitsDataset

MAX_ROTATION_DEGREES = 12.0
MAX_SCALE_CHANGE = 0.1
MAX_SHIFT_PIXELS_8PX = 0.75  # in pixels of the native 8x8 digits
WORKING_RESOLUTION = 16  # every input is resized to this: the digits hold 8x8 pixels of information


# ----------------------------------------------------------------------------------------------
# The classifier
# ----------------------------------------------------------------------------------------------


def digits_tensors(split: str, resolution: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (N, C, H, W) in [-1, 1] and labels (N,) of a `DigitsDataset` split."""
    dataset = DigitsDataset(resolution=resolution, split=split, channels=channels)
    images = torch.stack([dataset[i]["x"] for i in range(len(dataset))])
    return images, dataset.labels.clone()


def to_working_resolution(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, 16, 16), so one network design (and its tested accuracy) serves every resolution."""
    if images.shape[-1] == WORKING_RESOLUTION:
        return images
    return F.interpolate(images, size=(WORKING_RESOLUTION, WORKING_RESOLUTION), mode="bilinear", antialias=True)


def conv_unit(inputs: int, outputs: int) -> list[nn.Module]:
    return [nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU()]


def build_network(channels: int, width: int) -> nn.Module:
    """Two conv units at full resolution, a 2x pool, two more, global average pool, linear to 10 classes."""
    return nn.Sequential(
        *conv_unit(channels, width), *conv_unit(width, width), nn.MaxPool2d(2),
        *conv_unit(width, 2 * width), *conv_unit(2 * width, 2 * width),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, DigitsDataset.num_classes),
    )


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random rotation, scaling and shift per image; the background (-1) fills what moves in."""
    n, resolution = images.shape[0], images.shape[-1]  # square images
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(MAX_ROTATION_DEGREES)
    scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * MAX_SCALE_CHANGE
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * MAX_SHIFT_PIXELS_8PX * 2 / 8  # normalised coordinates
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, [n, images.shape[1], resolution, resolution], align_corners=False)
    return F.grid_sample(images + 1, grid, align_corners=False) - 1


class DigitsClassifier:
    """Reads digits from images (N, C, H, W) in [-1, 1] at the resolution and channels it was trained for."""

    def __init__(self, network: nn.Module, resolution: int, channels: int) -> None:
        self.network = network.eval()
        self.resolution = resolution
        self.channels = channels

    @classmethod
    def train(
        cls,
        resolution: int = 16,
        channels: int = 1,
        epochs: int = 10,
        width: int = 16,
        batch_size: int = 128,
        seed: int = 0,
        progress: bool = False,
    ) -> DigitsClassifier:
        """Train on the train split (AdamW, one-cycle schedule, label smoothing); the global RNG is left untouched."""
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        images, labels = digits_tensors("train", resolution, channels)
        images = to_working_resolution(images)
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(), torch_threads(1):
            torch.manual_seed(seed)
            network = build_network(channels, width)
            optimizer = torch.optim.AdamW(network.parameters(), lr=3e-3, weight_decay=1e-4)
            steps_per_epoch = math.ceil(len(labels) / batch_size)
            schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=epochs * steps_per_epoch)
            network.train()
            for _ in tqdm(range(epochs), desc="digits classifier", disable=not progress, leave=False):
                order = torch.randperm(len(labels), generator=generator)
                for start in range(0, len(order), batch_size):
                    rows = order[start : start + batch_size]
                    logits = network(augment(images[rows], generator))
                    loss = F.cross_entropy(logits, labels[rows], label_smoothing=0.1)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
        return cls(network, resolution, channels)

    def _check(self, samples: torch.Tensor) -> torch.Tensor:
        expected = (self.channels, self.resolution, self.resolution)
        if samples.dim() != 4 or tuple(samples.shape[1:]) != expected:
            hint = f"; train one with resolution={samples.shape[-1]}, channels={samples.shape[1]}" if samples.dim() == 4 else ""
            raise ValueError(
                f"the classifier judges images (N, {', '.join(map(str, expected))}), got shape {tuple(samples.shape)}{hint}"
            )
        return to_working_resolution(samples.detach().float().cpu().clamp(-1, 1))

    @torch.no_grad()
    def predict(self, samples: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Class ids (N,) for images (N, C, H, W) in [-1, 1]."""
        samples = self._check(samples)
        with torch_threads(1):
            return torch.cat([self.network(chunk).argmax(1) for chunk in samples.split(batch_size)])

    @torch.no_grad()
    def features(self, samples: torch.Tensor) -> torch.Tensor:
        """(N, F) penultimate features (after global pooling, before the class layer) of images (N, C, H, W) in
        [-1, 1]: what a Frechet distance on the judge compares."""
        samples = self._check(samples)
        with torch_threads(1):
            return self.network[:-1](samples)

    def score(self, samples: torch.Tensor, labels: torch.Tensor | Sequence[int]) -> float:
        """Accuracy: the fraction of samples read as their label."""
        labels = torch.as_tensor(labels, dtype=torch.long).cpu()
        if labels.shape != (samples.shape[0],):
            raise ValueError(f"need one label per sample: {samples.shape[0]} samples, labels of shape {tuple(labels.shape)}")
        return float((self.predict(samples) == labels).float().mean())


def digit_crops(videos: torch.Tensor, side: int) -> torch.Tensor:
    """Videos (N, C, T, H, W) in [-1, 1] -> (N * T, C, side, side), frame-major per video: in every frame the
    side x side window that holds the most ink (the moving digit of the video demo), for the judge to read."""
    if videos.dim() != 5:
        raise ValueError(f"digit_crops takes videos (N, C, T, H, W), got shape {tuple(videos.shape)}")
    n, channels, frames, height, width = videos.shape
    if not 1 <= side <= min(height, width):
        raise ValueError(f"the crop side must be in [1, {min(height, width)}] for {height}x{width} frames, got {side}")
    images = videos.detach().float().cpu().transpose(1, 2).reshape(n * frames, channels, height, width)
    ink = F.avg_pool2d(images.mean(1, keepdim=True) + 1, side, stride=1).flatten(1)
    best = ink.argmax(1)
    positions_x = width - side + 1
    offsets = torch.arange(side)
    rows = (best // positions_x)[:, None] + offsets  # (N*T, side)
    cols = (best % positions_x)[:, None] + offsets
    frame = torch.arange(n * frames)[:, None, None, None]
    channel = torch.arange(channels)[None, :, None, None]
    return images[frame, channel, rows[:, None, :, None], cols[:, None, None, :]]


def read_videos(classifier: DigitsClassifier, videos: torch.Tensor) -> torch.Tensor:
    """(N, T) class ids: the judge's reading of every frame's digit crop (crops at the judge's resolution)."""
    crops = digit_crops(videos, classifier.resolution)
    return classifier.predict(crops).view(videos.shape[0], videos.shape[2])


def test_split_accuracy(classifier: DigitsClassifier) -> float:
    """Accuracy on the real held-out digits (the test split at the classifier's resolution and channels)."""
    images, labels = digits_tensors("test", classifier.resolution, classifier.channels)
    return classifier.score(images, labels)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the digits judge and report its accuracy on the test split.")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--channels", type=int, default=1, choices=(1, 3))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    add_out_option(parser, RESULTS / "digits_classifier.json")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    classifier = DigitsClassifier.train(args.resolution, args.channels, args.epochs, seed=args.seed, progress=True)
    seconds = time.perf_counter() - started
    accuracy = test_split_accuracy(classifier)
    result = {
        "resolution": args.resolution,
        "channels": args.channels,
        "epochs": args.epochs,
        "seed": args.seed,
        "train_images": len(DigitsDataset(args.resolution, "train", args.channels)),
        "test_images": len(DigitsDataset(args.resolution, "test", args.channels)),
        "test_accuracy": accuracy,
        "train_seconds": seconds,
    }
    header = ["resolution", "channels", "epochs", "train images", "test images", "test accuracy", "train s"]
    print(markdown_table(header, [[args.resolution, args.channels, args.epochs, result["train_images"],
                                   result["test_images"], accuracy, seconds]]))
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
