"""Train with SPRINT:

    python train.py --gin-file gin/image/sit_xl2_256_stage1.gin --gin-param 'Trainer.max_steps = 10'

With no arguments it runs the digits demo (`demos/digits.py`: stage 1, stage 2, then PDG samples) on a CPU in minutes.
"""
import sys
from typing import Sequence

from demos.digits import digits_demo_main
from sprint_mm.cli import train_main
from sprint_mm.parallelize import end_processes


def main(argv: Sequence[str]) -> int:
    """No arguments: the digits demo; otherwise a configured run (`sprint_mm.cli.train_main`)."""
    return train_main(argv) if argv else digits_demo_main()


if __name__ == "__main__":
    sys.exit(end_processes(main(sys.argv[1:])))
