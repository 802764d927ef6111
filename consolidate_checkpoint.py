"""Write the full `model.safetensors` and `ema.safetensors` of a sharded (Trainer.strategy = 'fsdp') checkpoint, for
conversion and other tools that read those files (sample.py and stage 2 also read a sharded checkpoint directly).

    python consolidate_checkpoint.py runs/big/stage1              # the newest checkpoint
    python consolidate_checkpoint.py runs/big/stage1 --step 20000
    python consolidate_checkpoint.py runs/big/stage1/checkpoints/step_0020000
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from sprint_mm.errors import report_mistakes
from sprint_mm.sharded import consolidate


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Consolidate a sharded checkpoint into full safetensors files.")
    parser.add_argument("run", help="a run folder or one of its sharded checkpoint folders")
    parser.add_argument("--step", type=int, help="checkpoint step of a run folder (default: newest)")
    args = parser.parse_args(argv)
    return report_mistakes(lambda: print(f"[sprint_mm] wrote model.safetensors and ema.safetensors in "
                                         f"{consolidate(args.run, args.step)}"))


if __name__ == "__main__":
    sys.exit(main())
