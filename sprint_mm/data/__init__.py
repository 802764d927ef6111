"""Datasets: images, latents, video, captions, and the toy sets used by demos and tests; `index` and `transforms`
hold what several of them share (JSONL/CSV index files, the resize-and-centre-crop), `faults` what they do with bad
data (each raises `BadItem`; `SkippingDataset` replaces bad items and `BadDataLedger` counts them)."""
