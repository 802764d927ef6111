"""Datasets: images, latents, video, captions, and the toy sets used by demos and tests."""
