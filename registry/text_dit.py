"""Text DiT: the DiT with cross-attention to caption tokens, on images or videos, with 3D RoPE.

The condition is `{"text_tokens": (B, L, Dt) float, "text_mask": (B, L) bool}` (True = real token), as sprint_mm.text
writes it; the SPRINT wrapper never drops the text tokens, so the sparse middle blocks still read every caption token.
"""
from registry import BACKBONES
from sprint_mm.dit import DiT

text_dit = BACKBONES.specialise(
    "text_dit", DiT, __doc__, fixed=("conditioning", "num_classes"),
    input_size=32, patch_size=2, conditioning="text", rope_axes="wan",
)
