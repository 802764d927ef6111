"""The demos: small end-to-end runs that train both SPRINT stages and sample on a CPU in minutes. They are users of
the library (`sprint_mm`), not part of it.

- `demos.digits`: `python train.py` with no arguments, the class-conditional digits demo;
- `demos.video`: `python video_demo.py`, moving digits written as mp4 files, and `--buckets`, the bucket demo of
  `demos.buckets` (clips of two shapes and stills of two sizes in one run);
- `demos.text`: `python text_demo.py`, captioned digits with the MiniLM text encoder.

`demos.two_stages` holds what every demo does (stage 1, stage 2 from its EMA, samples through sample.py's command
line), `demos.clips` the moving-digit clips the video and bucket demos share.
"""
