"""Video DiT: the class-conditional DiT over (t, h, w) patch grids with 3D RoPE (Wan's channel split); full or
factorised (Latte) attention. Images (B, C, H, W) are one-frame videos, so image and video batches share one model."""
from registry import BACKBONES
from sprint_mm.dit import TEXT_OPTIONS, DiT

video_dit = BACKBONES.specialise(
    "video_dit", DiT, __doc__, fixed=("conditioning", *TEXT_OPTIONS),
    input_size=(16, 32, 32), patch_size=(1, 2, 2), conditioning="class", rope_axes="wan",
)
