"""Train with SPRINT: `python train.py --gin_file gin/image/sit_xl2_256_stage1.gin --gin_param 'Trainer.max_steps = 10'`.

With no arguments it runs the digits demo (stage 1, stage 2, then PDG samples) on the CPU in minutes.
"""
import sys

from sprint_mm.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
