"""The text-to-image demo: `python text_demo.py` trains a small TextDiT on captioned digits (MiniLM captions, stage 1
then stage 2) and writes CFG and PDG grids of prompts to runs/text_demo/samples_{cfg,pdg}.png, on the CPU in minutes.
"""
import sys

from sprint_mm.text_demo import text_demo_main

if __name__ == "__main__":
    sys.exit(text_demo_main())
