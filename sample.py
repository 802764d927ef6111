"""Sample from a run: `python sample.py --run runs/digits_demo/stage2 --labels 3 7 --num 20 --out samples.png`."""
import sys

from sprint_mm.cli import sample_main

if __name__ == "__main__":
    sys.exit(sample_main())
