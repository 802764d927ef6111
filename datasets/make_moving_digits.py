"""Write the "moving digits" toy video set (`sprint_mm.data.moving_digits`): real mp4 files in DIR/<digit>/<index>.mp4.

    python datasets/make_moving_digits.py --out data/moving_digits --num 1000 --frames 16 --size 32

Each video shows one of scikit-learn's bundled 8x8 handwritten digits (no download), upsampled to `--digit-fraction`
of the canvas side, gliding in a straight line across a black square canvas and bouncing off the walls.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from sprint_mm.data.moving_digits import DIGIT_FRACTION, write_moving_digits


def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder (gets one sub-folder per digit)")
    parser.add_argument("--num", type=int, default=1000, help="number of videos")
    parser.add_argument("--frames", type=int, default=16, help="frames per video")
    parser.add_argument("--size", type=int, default=32, help="canvas side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--digit-fraction", "--digit_fraction", type=float, default=DIGIT_FRACTION,
                        help="digit side / canvas side")
    args = parser.parse_args(argv)
    paths = write_moving_digits(args.out, args.num, args.frames, args.size, args.seed, args.digit_fraction)
    print(f"wrote {len(paths)} videos to {args.out}")
    return paths


if __name__ == "__main__":
    main()
