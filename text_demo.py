"""The text-to-image demo: `python text_demo.py` trains a small TextDiT on captioned digits (MiniLM captions, stage 1
then stage 2) and writes CFG and PDG grids of prompts to runs/text_demo/samples_{cfg,pdg}.png, on a CPU in minutes.
The demo lives in `demos/text.py`.
"""
import sys

from demos.text import text_demo_main
from sprint_mm.parallelize import end_processes

if __name__ == "__main__":
    sys.exit(end_processes(text_demo_main()))
