"""Sample from a run: `python sample.py --run runs/digits_demo/stage2 --labels 3 7 --num 20 --out samples.png`."""
import sys

from sprint_mm.cli import sample_main
from sprint_mm.parallelize import end_processes

if __name__ == "__main__":
    sys.exit(end_processes(sample_main()))
