"""The video demo: `python video_demo.py` writes moving-digit mp4s, trains a small VideoDiT with SPRINT (stage 1, then
stage 2) and writes class-conditional PDG videos to runs/moving_digits/samples_pdg.mp4 (+ .png), on a CPU in minutes;
`python video_demo.py --buckets` runs the bucket demo. The demos live in `demos/video.py` and `demos/buckets.py`.
"""
import sys

from demos.video import video_demo_main
from sprint_mm.parallelize import end_processes

if __name__ == "__main__":
    sys.exit(end_processes(video_demo_main()))
