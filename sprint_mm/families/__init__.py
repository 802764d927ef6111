"""Bring your model: the transformers that people fine-tune through diffusers, as SPRINT backbones.

- `adapter`: `DiffusersBackbone`, a diffusers transformer (loaded strictly from a local folder, or built from a config)
  mapped onto the seam without copying a weight: its embedders in `embed`, its blocks as the blocks (each answering
  the seam's call), its output layer in `unembed`, its rotary table as gatherable positions;
- `wan` (WanTransformer3DModel), `ltx_video` (LTXVideoTransformer3DModel), `sd3` (SD3Transformer2DModel), `flux`
  (FluxTransformer2DModel), `hunyuan_video` (HunyuanVideoTransformer3DModel): the families, each its conventions
  (time, patches, rotary layout, text inputs and masks, pooled vectors, guidance embedding, output layout);
- `text`: SD3's three text encoders as one (CLIP-L, CLIP-G, T5), Flux's two (CLIP-L's pooled vector, T5),
  HunyuanVideo's two (Llama in its prompt template, CLIP-L's pooled vector); Wan's umT5 and LTX's T5 are
  `sprint_mm.text`'s `TextEncoder` on the pipeline folder;
- `folders`: pipeline folders and component folders.

diffusers is imported when a family is built, so this package (and gin's registry of it) loads without it.
"""
