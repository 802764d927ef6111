#!/usr/bin/env bash
# The GPU suite: SiT-XL/2 256 px bf16 batch 32 on one GPU in under 8 minutes, one table (see benchmarks/gpu_suite.py):
# dense vs SPRINT training step (eager and compiled), CFG vs PDG sampling step, peak memory, TFLOP/s against the peak.
#
#   bash benchmarks/gpu_suite.sh [--peak-tflops 989] [--repeats 5] [--warmup 2]
#   bash benchmarks/gpu_suite.sh --tiny          # a tiny model on the CPU, seconds
#
# Runs with the repository's .venv when there is one, else $PYTHON or python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" -m benchmarks.gpu_suite "$@"
