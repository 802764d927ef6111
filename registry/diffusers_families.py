"""The diffusers families as backbones: `wan` (Wan 2.x text-to-video), `ltx_video` (LTX-Video), `sd3` (SD3 / 3.5
MMDiT), `flux` (FLUX.1 dev / schnell), `hunyuan_video` (HunyuanVideo text-to-video), each loaded from a local diffusers
folder (`<family>.path`) or built from a transformer config; see sprint_mm/families/."""
from registry import BACKBONES
from sprint_mm.families.flux import Flux
from sprint_mm.families.hunyuan_video import HunyuanVideo
from sprint_mm.families.ltx_video import LTXVideo
from sprint_mm.families.sd3 import SD3
from sprint_mm.families.wan import Wan

wan = BACKBONES.register(Wan.family)(Wan)
ltx_video = BACKBONES.register(LTXVideo.family)(LTXVideo)
sd3 = BACKBONES.register(SD3.family)(SD3)
flux = BACKBONES.register(Flux.family)(Flux)
hunyuan_video = BACKBONES.register(HunyuanVideo.family)(HunyuanVideo)
