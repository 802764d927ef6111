"""Frechet distances, streamed statistics, sample files and extractors (tiny random networks), and the CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch import nn

from sprint_mm.evaluation import (
    DinoV2Extractor,
    FeatureAccumulator,
    FeatureStats,
    InceptionExtractor,
    VideoExtractor,
    build_extractor,
    evaluate,
    frechet,
    frechet_distance,
    load_samples,
    open_samples,
    write_reference_stats,
)
from tests.helpers import script_module

# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


def tiny_cnn(seed: int = 0) -> nn.Module:
    """A random feature network mapping (N, 3, 299, 299) to (N, 16)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=4),
        nn.ReLU(),
        nn.Conv2d(8, 16, 5, stride=4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def images(seed: int, n: int, low: int = 0, high: int = 256, size: int = 16, frames: int | None = None) -> np.ndarray:
    """uint8 noise images (or clips) whose pixel distribution is uniform in [low, high)."""
    shape = (n, size, size, 3) if frames is None else (n, frames, size, size, 3)
    return np.random.default_rng(seed).integers(low, high, size=shape, dtype=np.uint8)


def save_npz(path: Path, samples: np.ndarray) -> Path:
    np.savez(path, arr_0=samples)
    return path


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(sigma1 sigma2) via the symmetric form sqrt(s1) s2 sqrt(s1), an independent route to the trace."""
    eigenvalues, vectors = np.linalg.eigh(sigma1)
    root = (vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ vectors.T
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(root @ sigma2 @ root), 0.0, None)).sum())


def closed_form_distance(mu1, sigma1, mu2, sigma2) -> float:
    traces = np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
    return float(np.sum((mu1 - mu2) ** 2) + traces)


@pytest.fixture(scope="module")
def dinov2_folder(tmp_path_factory) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=224, patch_size=14
    )
    folder = tmp_path_factory.mktemp("dinov2")
    Dinov2Model(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cli():
    """evaluate.py loaded from its path (the repository root need not be on sys.path)."""
    return script_module("evaluate.py", "evaluate_command")


# --------------------------------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------------------------------


def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    s1, s2 = rng.uniform(0.1, 3.0, size=12), rng.uniform(0.1, 3.0, size=12)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_closed_form_for_commuting_full_covariances():
    rng = np.random.default_rng(1)
    basis, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    a, b = rng.uniform(0.05, 2.0, size=10), rng.uniform(0.05, 2.0, size=10)
    sigma1, sigma2 = basis @ np.diag(a) @ basis.T, basis @ np.diag(b) @ basis.T
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_is_zero_for_identical_stats_and_symmetric():
    rng = np.random.default_rng(2)
    first = FeatureStats.from_features(rng.normal(size=(200, 16)))
    second = FeatureStats.from_features(rng.normal(size=(150, 16)) @ rng.normal(size=(16, 16)) + 0.3)
    assert frechet_distance(first.mu, first.sigma, first.mu, first.sigma) == pytest.approx(0.0, abs=1e-9)
    forward = frechet_distance(first.mu, first.sigma, second.mu, second.sigma)
    backward = frechet_distance(second.mu, second.sigma, first.mu, first.sigma)
    assert forward == pytest.approx(backward, rel=1e-9)
    assert forward == pytest.approx(closed_form_distance(first.mu, first.sigma, second.mu, second.sigma), rel=1e-8)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_rank_deficient_features_give_a_finite_distance():
    rng = np.random.default_rng(3)
    first = rng.normal(size=(10, 48))  # 10 samples in 48 dimensions: rank 9 covariances
    second = rng.normal(size=(12, 48)) + 0.5
    first[:, :4] = 0.0  # dead features, as ReLU networks produce
    second[:, :4] = 1.0
    a, b = FeatureStats.from_features(first), FeatureStats.from_features(second)
    distance = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    assert np.isfinite(distance)
    assert distance == pytest.approx(closed_form_distance(a.mu, a.sigma, b.mu, b.sigma), abs=1e-2)


def test_singular_product_is_retried_with_an_offset(monkeypatch):
    real_sqrtm = scipy.linalg.sqrtm
    calls = []

    def failing_once(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(frechet.scipy.linalg, "sqrtm", failing_once)
    rng = np.random.default_rng(4)
    s1, s2 = np.diag(rng.uniform(0.5, 1.0, 5)), np.diag(rng.uniform(0.5, 1.0, 5))
    with pytest.warns(RuntimeWarning, match="retrying"):
        distance = frechet_distance(np.zeros(5), s1, np.zeros(5), s2)
    offset = np.eye(5) * frechet.SQRTM_OFFSET
    np.testing.assert_allclose(calls[1], (s1 + offset) @ (s2 + offset))
    offset_root = np.sqrt(np.diag(s1 + offset) * np.diag(s2 + offset))
    assert distance == pytest.approx(np.sum(np.diag(s1) + np.diag(s2) - 2 * offset_root))


def test_large_imaginary_square_root_is_an_error(monkeypatch):
    monkeypatch.setattr(frechet.scipy.linalg, "sqrtm", lambda matrix: matrix + 0.5j * np.eye(len(matrix)))
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3))


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"\(F, F\)"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))


# --------------------------------------------------------------------------------------------------------------------
# Feature statistics
# --------------------------------------------------------------------------------------------------------------------


def test_streamed_stats_equal_numpy_mean_and_cov():
    rng = np.random.default_rng(5)
    features = rng.normal(size=(203, 9)) @ rng.normal(size=(9, 9)) + 1000.0  # large mean: tests the pivot
    accumulator = FeatureAccumulator()
    for start, stop in [(0, 1), (1, 50), (50, 50), (50, 177), (177, 203)]:
        accumulator.add(features[start:stop])
    stats = accumulator.stats()
    assert stats.count == 203
    np.testing.assert_allclose(stats.mu, np.mean(features, axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(features, rowvar=False, ddof=1), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(FeatureStats.from_features(features).sigma, stats.sigma, rtol=1e-8, atol=1e-10)


def test_stats_roundtrip_and_adm_reference_files(tmp_path):
    rng = np.random.default_rng(6)
    stats = FeatureAccumulator().add(rng.normal(size=(30, 4))).stats(extractor="net; sha256:x", sample_shape=(8, 8, 3))
    stats.save(tmp_path / "ours.npz")
    loaded = FeatureStats.load(tmp_path / "ours.npz")
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert (loaded.count, loaded.extractor, loaded.sample_shape) == (30, "net; sha256:x", (8, 8, 3))

    np.savez(tmp_path / "adm.npz", arr_0=images(0, 2), mu=stats.mu.astype(np.float32), sigma=stats.sigma)
    adm = FeatureStats.load(tmp_path / "adm.npz")
    np.testing.assert_allclose(adm.mu, stats.mu, rtol=1e-6)
    assert adm.count is None and adm.extractor is None

    with pytest.raises(KeyError, match="'mu' and 'sigma'"):
        FeatureStats.load(save_npz(tmp_path / "samples.npz", images(0, 2)))
    with pytest.raises(ValueError, match=".npz"):
        stats.save(tmp_path / "stats.txt")
    with pytest.raises(ValueError, match="at least 2 samples"):
        FeatureStats.from_features(np.zeros((1, 4)))


# --------------------------------------------------------------------------------------------------------------------
# Sample files
# --------------------------------------------------------------------------------------------------------------------


def test_load_samples_reads_npz_images_videos_and_png_folders(tmp_path):
    pictures, clips = images(1, 5), images(2, 3, frames=4)
    np.testing.assert_array_equal(load_samples(save_npz(tmp_path / "images.npz", pictures)), pictures)
    np.savez_compressed(tmp_path / "clips.npz", arr_0=clips)
    np.testing.assert_array_equal(load_samples(tmp_path / "clips.npz"), clips)
    streamed = list(open_samples(tmp_path / "clips.npz").batches(2))
    assert [len(batch) for batch in streamed] == [2, 1]
    np.testing.assert_array_equal(np.concatenate(streamed), clips)

    folder = tmp_path / "pngs"
    folder.mkdir()
    for index, picture in enumerate(pictures):
        Image.fromarray(picture).save(folder / f"{index:06d}.png")
    np.testing.assert_array_equal(load_samples(folder), pictures)


def test_load_samples_rejects_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        load_samples(save_npz(tmp_path / "float.npz", images(0, 2).astype(np.float32)))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        load_samples(save_npz(tmp_path / "gray.npz", images(0, 2)[..., 0]))
    with pytest.raises(KeyError, match="arr_0"):
        np.savez(tmp_path / "other.npz", samples=images(0, 2))
        load_samples(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_samples(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="no .png"):
        (tmp_path / "empty").mkdir()
        load_samples(tmp_path / "empty")
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(images(0, 1)[0]).save(folder / "a.png")
    Image.fromarray(images(0, 1, size=8)[0]).save(folder / "b.png")
    with pytest.raises(ValueError, match="b.png"):
        load_samples(folder)


# --------------------------------------------------------------------------------------------------------------------
# Extractors and evaluation, end to end with tiny random networks
# --------------------------------------------------------------------------------------------------------------------


def test_extractor_accepts_uint8_and_unit_floats_only():
    extractor = InceptionExtractor.from_module(tiny_cnn(), device="cpu")
    batch = images(3, 4)
    features = extractor(batch)
    assert features.shape == (4, 16) and features.dtype == np.float64
    np.testing.assert_allclose(extractor(batch.astype(np.float32) / 255.0), features, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        extractor(batch.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        extractor(batch[..., :2])


def test_fid_through_evaluate_matches_direct_computation(tmp_path):
    extractor = InceptionExtractor.from_module(tiny_cnn(), device="cpu")
    samples, reference = images(10, 19, 0, 200), images(11, 22, 30, 256)
    samples_path = save_npz(tmp_path / "samples.npz", samples)
    reference_path = save_npz(tmp_path / "reference.npz", reference)

    result = evaluate(samples_path, reference_path, extractor, batch_size=8)
    direct_samples = FeatureStats.from_features(extractor(samples))
    direct_reference = FeatureStats.from_features(extractor(reference))
    expected = frechet_distance(direct_samples.mu, direct_samples.sigma, direct_reference.mu, direct_reference.sigma)
    assert result["metric"] == "fid"
    assert result["fid"] == pytest.approx(expected, rel=1e-6)
    assert (result["num_samples"], result["num_reference"], result["sample_shape"]) == (19, 22, [16, 16, 3])
    assert result["extractor"] == extractor.description

    write_reference_stats(reference_path, extractor, tmp_path / "reference_stats.npz", batch_size=16)
    from_stats = evaluate(samples_path, tmp_path / "reference_stats.npz", extractor, batch_size=8)
    assert from_stats["fid"] == pytest.approx(result["fid"], rel=1e-9)


def test_reference_stats_must_come_from_the_same_extractor(tmp_path):
    extractor = InceptionExtractor.from_module(tiny_cnn(0), device="cpu")
    other = InceptionExtractor.from_module(tiny_cnn(1), device="cpu")
    samples_path = save_npz(tmp_path / "samples.npz", images(0, 6))
    write_reference_stats(samples_path, other, tmp_path / "other.npz")
    with pytest.raises(ValueError, match="were computed with"):
        evaluate(samples_path, tmp_path / "other.npz", extractor)

    FeatureStats(np.zeros(16), np.eye(16)).save(tmp_path / "untagged.npz")
    with pytest.warns(UserWarning, match="do not say which extractor"):
        result = evaluate(samples_path, tmp_path / "untagged.npz", extractor)
    assert result["num_reference"] is None


@pytest.mark.parametrize("kind", ["inception", "dinov2"])
def test_same_distribution_is_closer_than_a_different_one(kind, dinov2_folder):
    extractor = (
        InceptionExtractor.from_module(tiny_cnn(), device="cpu")
        if kind == "inception"
        else DinoV2Extractor(dinov2_folder, device="cpu")
    )
    first = FeatureStats.from_features(extractor(images(20, 24, 0, 160)))
    same = FeatureStats.from_features(extractor(images(21, 24, 0, 160)))
    different = FeatureStats.from_features(extractor(images(22, 24, 96, 256)))
    assert frechet_distance(first.mu, first.sigma, same.mu, same.sigma) < frechet_distance(
        first.mu, first.sigma, different.mu, different.sigma
    )


def test_dinov2_by_path_uses_the_layernormed_cls_token(dinov2_folder):
    from torchvision.transforms.v2 import functional as TF
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(dinov2_folder, local_files_only=True).eval()
    extractor = build_extractor("dinov2", dinov2_folder, device="cpu")
    batch = images(30, 3)
    pixels = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
    pixels = TF.resize(pixels, [224, 224], interpolation=TF.InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
    pixels = TF.normalize(pixels, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state  # already after the final layernorm
    np.testing.assert_allclose(extractor(batch), hidden[:, 0].double().numpy(), rtol=1e-5, atol=1e-6)
    assert extractor.description == DinoV2Extractor.from_module(model, device="cpu").description


def test_video_proxy_is_mean_and_std_of_frame_features(tmp_path):
    frames = InceptionExtractor.from_module(tiny_cnn(), device="cpu")
    extractor = VideoExtractor(frames)
    clips = images(40, 5, frames=3)
    per_frame = np.stack([frames(clip) for clip in clips])  # (N, T, F)
    expected = np.concatenate([per_frame.mean(axis=1), per_frame.std(axis=1)], axis=1)
    np.testing.assert_allclose(extractor(clips), expected, rtol=1e-6, atol=1e-9)

    samples_path = save_npz(tmp_path / "clips.npz", clips)
    result = evaluate(samples_path, save_npz(tmp_path / "reference.npz", images(41, 6, frames=3)), extractor, 4)
    assert result["metric"] == "fvd_proxy" and np.isfinite(result["fvd_proxy"])
    assert result["sample_shape"] == [3, 16, 16, 3]
    with pytest.raises(ValueError, match=r"\(N, T, H, W, 3\)"):
        evaluate(samples_path, samples_path, frames)


def test_build_extractor_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown extractor kind 'clip'"):
        build_extractor("clip", tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_extractor("inception", tmp_path / "nowhere.pth")
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_extractor("video-dinov2", tmp_path)
    torch.save(tiny_cnn().state_dict(), tmp_path / "cnn.pth")
    with pytest.raises(ValueError, match="not a torchvision inception_v3"):
        build_extractor("inception", tmp_path / "cnn.pth")


def test_inception_preprocessing_is_bilinear_299_with_imagenet_normalisation():
    extractor = InceptionExtractor.from_module(nn.Flatten(), device="cpu")  # features = the network's input
    batch = images(50, 2, size=20)
    pixels = torch.from_numpy(batch).permute(0, 3, 1, 2).double() / 255
    pixels = torch.nn.functional.interpolate(pixels, size=(299, 299), mode="bilinear", align_corners=False)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (pixels - mean.view(1, 3, 1, 1).double()) / std.view(1, 3, 1, 1).double()
    np.testing.assert_allclose(extractor(batch), expected.flatten(1).numpy(), rtol=1e-5, atol=1e-5)


def test_inception_state_dict_loads_through_the_path_route(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import inception_v3

    started = time.perf_counter()
    model = inception_v3(weights=None, aux_logits=True, init_weights=False).eval()
    save_file(model.state_dict(), tmp_path / "inception.safetensors")
    if time.perf_counter() - started > 10:
        pytest.skip("building a full Inception-v3 took more than 10 s on this machine")
    extractor = InceptionExtractor(tmp_path / "inception.safetensors", device="cpu")

    # compare the networks at Inception's smallest input (75 px): a full 299 px pass is slow on a busy CPU
    model.fc, model.transform_input = nn.Identity(), True
    pixels = torch.randn(1, 3, 75, 75, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features, expected = extractor.network(pixels), model(pixels)
    assert features.shape == (1, 2048)
    torch.testing.assert_close(features, expected)


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def test_cli_fdd_writes_json_and_reference_stats(cli, dinov2_folder, tmp_path, capsys):
    samples_path = save_npz(tmp_path / "samples.npz", images(60, 20, 0, 200))
    reference_path = save_npz(tmp_path / "reference.npz", images(61, 24, 40, 256))
    common = ["--samples", str(samples_path), "--metric", "fdd", "--weights", str(dinov2_folder), "--device", "cpu"]

    assert cli.main([*common, "--reference", str(reference_path), "--out", str(tmp_path / "fdd.json")]) == 0
    written = json.loads((tmp_path / "fdd.json").read_text())
    expected = evaluate(samples_path, reference_path, DinoV2Extractor(dinov2_folder, device="cpu"), batch_size=50)
    assert written["fdd"] == pytest.approx(expected["fdd"], rel=1e-9)
    assert written["num_samples"] == 20 and "dinov2" in written["extractor"]
    assert f"fdd = {written['fdd']:.4f}" in capsys.readouterr().out

    stats_args = ["--samples", str(reference_path), *common[2:], "--write-reference", str(tmp_path / "ref.npz")]
    assert cli.main(stats_args) == 0
    assert cli.main([*common, "--reference", str(tmp_path / "ref.npz"), "--out", str(tmp_path / "again.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["fdd"] == pytest.approx(written["fdd"], rel=1e-9)


def test_cli_fid_and_video_proxy(cli, dinov2_folder, tmp_path, monkeypatch):
    def tiny_inception(kind, path, device):  # stands in for a real Inception weights file
        frames = InceptionExtractor.from_module(tiny_cnn(), device=device)
        return VideoExtractor(frames) if kind.startswith("video-") else frames

    def run(metric: str, samples: Path, reference: Path, *options: str) -> dict:
        out = tmp_path / f"{metric}.json"
        arguments = ["--samples", str(samples), "--reference", str(reference), "--metric", metric, "--out", str(out)]
        assert cli.main([*arguments, "--device", "cpu", "--batch-size", "5", *options]) == 0
        return json.loads(out.read_text())

    pictures = save_npz(tmp_path / "pictures.npz", images(70, 12, 0, 200))
    pictures_reference = save_npz(tmp_path / "pictures_reference.npz", images(71, 14, 50, 256))
    clips = save_npz(tmp_path / "clips.npz", images(72, 6, 0, 200, frames=2))
    clips_reference = save_npz(tmp_path / "clips_reference.npz", images(73, 7, 50, 256, frames=2))
    frames = InceptionExtractor.from_module(tiny_cnn(), device="cpu")
    with monkeypatch.context() as patch:
        patch.setattr(cli, "build_extractor", tiny_inception)
        fid = run("fid", pictures, pictures_reference, "--weights", "unused.pth")
        fvd = run("fvd", clips, clips_reference, "--weights", "unused.pth")
    assert fid["fid"] == pytest.approx(evaluate(pictures, pictures_reference, frames)["fid"], rel=1e-9)
    expected_fvd = evaluate(clips, clips_reference, VideoExtractor(frames))["fvd_proxy"]
    assert fvd["fvd_proxy"] == pytest.approx(expected_fvd, rel=1e-9) and fvd["sample_shape"] == [2, 16, 16, 3]

    fvd_dinov2 = run("fvd", clips, clips_reference, "--frame-features", "dinov2", "--weights", str(dinov2_folder))
    expected = evaluate(clips, clips_reference, VideoExtractor(DinoV2Extractor(dinov2_folder, device="cpu")))
    assert fvd_dinov2["fvd_proxy"] == pytest.approx(expected["fvd_proxy"], rel=1e-9)
    assert fvd_dinov2["extractor"] == expected["extractor"] != fvd["extractor"]


def test_cli_reports_one_clear_error(cli, tmp_path, capsys):
    samples_path = str(save_npz(tmp_path / "samples.npz", images(0, 4)))
    with pytest.raises(SystemExit):
        cli.main(["--samples", samples_path, "--reference", samples_path, "--metric", "kid", "--weights", "w.pth"])
    assert "invalid choice: 'kid'" in capsys.readouterr().err
    assert cli.main(["--samples", samples_path, "--reference", samples_path, "--metric", "fid", "--weights", "w.pth"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: weights not found: w.pth") and error.count("\n") == 1 and "Traceback" not in error


def test_non_finite_statistics_are_refused_before_the_matrix_square_root(tmp_path, cli, capsys, monkeypatch):
    # scipy's sqrtm never returned on a covariance holding NaN (killed after 11 minutes): refused before it.
    mu, sigma = np.zeros(3), np.eye(3)
    broken = sigma.copy()
    broken[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"second statistics: mu and sigma hold 1 NaN or infinite value"):
        frechet_distance(mu, sigma, mu, broken)
    with pytest.raises(ValueError, match=r"first statistics: mu and sigma hold 2 NaN"):
        frechet_distance(np.array([np.inf, 0, -np.inf]), sigma, mu, sigma)
    path = tmp_path / "ref.npz"
    np.savez(path, mu=mu, sigma=broken)
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda *args: pytest.fail("sqrtm was reached"))
    samples = str(save_npz(tmp_path / "samples.npz", images(0, 4)))
    monkeypatch.setattr(cli, "build_extractor", lambda *args: None)  # refused before any feature is computed
    assert cli.main(["--samples", samples, "--reference", str(path), "--metric", "fid", "--weights", "w.pth"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: statistics file {path}: mu and sigma hold 1 NaN") and error.count("\n") == 1


def test_a_corrupt_png_in_a_sample_folder_and_a_weights_folder_for_fid_are_one_line(tmp_path, cli, capsys):
    folder = tmp_path / "samples"
    folder.mkdir()
    for index, image in enumerate(images(0, 3)):
        Image.fromarray(image).save(folder / f"{index:03d}.png")
    (folder / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    weights = tmp_path / "weights"
    weights.mkdir()
    assert cli.main(["--samples", str(folder), "--write-reference", str(tmp_path / "r.npz"), "--metric", "fid",
                     "--weights", str(weights)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: --weights {weights} is a folder, but Inception") and "not found" not in error
    assert cli.main(["--samples", str(folder), "--write-reference", str(tmp_path / "r.npz"), "--metric", "fdd",
                     "--weights", str(weights)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: no DINOv2 model at {str(weights)!r}") and error.count("\n") == 1
    with pytest.raises(ValueError, match=r"001.png cannot be read as an image \(UnidentifiedImageError"):
        load_samples(folder)
