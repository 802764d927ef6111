"""Image SiT: the class-conditional DiT over 2D patch grids, with SiT's 2D RoPE (or absolute sin-cos positions)."""
from registry import BACKBONES
from sprint_mm.dit import TEXT_OPTIONS, DiT

sit = BACKBONES.specialise(
    "sit", DiT, __doc__, fixed=("conditioning", *TEXT_OPTIONS),
    input_size=32, patch_size=2, conditioning="class", rope_axes="spatial",
)
