"""The video demo: `python video_demo.py` writes moving-digit mp4s, trains a small VideoDiT with SPRINT (stage 1, then
stage 2) and writes class-conditional PDG videos to runs/moving_digits/samples_pdg.mp4 (+ .png), on the CPU in minutes.
"""
import sys

from sprint_mm.video_demo import video_demo_main

if __name__ == "__main__":
    sys.exit(video_demo_main())
