"""U-ViT: the class-conditional U-ViT (in-blocks, a mid block, out-blocks fed by long skips from their mirror in-blocks)
with adaLN conditioning and SiT's 2D RoPE (or absolute sin-cos positions). SPRINT splits it with encoder_depth >=
decoder_depth; `size` picks U-ViT's S/M/L/H."""
from registry import BACKBONES
from sprint_mm.uvit import UViT

uvit = BACKBONES.specialise("uvit", UViT, __doc__, input_size=32, patch_size=2, rope_axes="spatial")
