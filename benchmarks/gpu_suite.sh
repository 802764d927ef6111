#!/usr/bin/env bash
# The GPU suite on one GPU in about 10 minutes (estimated; see benchmarks/gpu_suite.py): SiT-XL/2 256 px bf16 batch
# 32, dense vs SPRINT training step (eager and compiled), CFG vs PDG sampling step, peak memory, TFLOP/s against the
# peak; then Wan 2.1 1.3B (81 frames, 480p) and SD3-medium (1024 px) training steps, dense vs SPRINT, FSDP2 + bf16 +
# activation checkpointing, at their real shapes with random weights.
#
#   bash benchmarks/gpu_suite.sh [--peak-tflops 989] [--repeats 5] [--warmup 2] [--families NAME ...]
#   bash benchmarks/gpu_suite.sh --tiny          # a tiny model on the CPU, seconds
#
# Runs with the repository's .venv when there is one, else $PYTHON or python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" -m benchmarks.gpu_suite "$@"
