"""Guidance (CFG, PDG, interval) and the ODE/SDE samplers."""
from __future__ import annotations

import pytest
import torch

from sprint_mm.flow import path_coefficients, score_from_velocity
from sprint_mm.sampling import Guidance, guided_velocity, sample, time_grid
from tests.helpers import tiny_sprint


def setup(batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tiny_sprint(), torch.randn(batch, 3, 8, 8, generator=g), torch.randint(0, 4, (batch,), generator=g)


def test_pdg_equals_two_pass_computation():
    model, x, y = setup()
    t = 0.6
    tt = torch.full((3,), t)
    guided = guided_velocity(model, x, t, y, Guidance("pdg", 2.5))
    strong = model(x, tt, y)
    null = torch.full_like(y, 4)
    weak = model(x, tt, null, skip_middle=torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(guided, weak + 2.5 * (strong - weak), atol=1e-5, rtol=1e-5)


def test_pdg_runs_middle_on_half_of_the_doubled_batch_and_cfg_on_all():
    model, x, y = setup()
    calls = []
    for block in model.middle_blocks:
        block.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    encoder_calls = []
    model.encoder_blocks[0].register_forward_hook(lambda m, args, out: encoder_calls.append(args[0].shape[0]))
    guided_velocity(model, x, 0.5, y, Guidance("pdg", 2.0))
    assert calls == [3] * len(model.middle_blocks) and encoder_calls == [6]
    calls.clear()
    guided_velocity(model, x, 0.5, y, Guidance("cfg", 2.0))
    assert calls == [6] * len(model.middle_blocks)


def test_cfg_equals_two_pass_and_scale_one_equals_no_guidance():
    model, x, y = setup()
    tt = torch.full((3,), 0.3)
    strong, weak = model(x, tt, y), model(x, tt, torch.full_like(y, 4))
    torch.testing.assert_close(guided_velocity(model, x, 0.3, y, Guidance("cfg", 3.0)), weak + 3.0 * (strong - weak), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided_velocity(model, x, 0.3, y, Guidance("cfg", 1.0)), strong)
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    a = sample(model, noise, y, steps=4, guidance=Guidance("cfg", 1.0))
    b = sample(model, noise, y, steps=4, guidance=Guidance("none"))
    torch.testing.assert_close(a, b)


def test_pdg_never_splits_an_undoubled_batch():
    """Outside the interval (or at scale 1) PDG must give the plain conditional output, with the middle on every row."""
    model, x, y = setup(batch=4)
    tt = torch.full((4,), 0.9)
    guidance = Guidance("pdg", 4.0, interval=(0.0, 0.5))
    torch.testing.assert_close(guided_velocity(model, x, 0.9, y, guidance), model(x, tt, y))
    torch.testing.assert_close(guided_velocity(model, x, 0.9, y, Guidance("pdg", 1.0)), model(x, tt, y))
    inside = guided_velocity(model, x, 0.4, y, guidance)
    assert (inside - model(x, torch.full((4,), 0.4), y)).abs().max() > 1e-4


def test_time_grids():
    assert time_grid("euler", 4) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    sde = time_grid("sde", 5)
    assert sde[0] == 1.0 and sde[-2] == pytest.approx(0.04) and sde[-1] == 0.0 and len(sde) == 6


class Affine(torch.nn.Module):
    """A velocity field v = a x + b with a known exact flow, for checking the solvers' order."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.a, self.b = a, b
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, cond, **kwargs):
        return self.a * x + self.b

    def null_condition(self, cond):
        return cond


def test_euler_and_heun_converge_at_their_orders():
    model = Affine(0.7, 0.3)
    x1 = torch.ones(1, 1)
    cond = torch.zeros(1)
    # dx/dt = a x + b from t=1 to t=0: x(0) = (x1 + b/a) e^{-a} - b/a
    exact = (x1 + 0.3 / 0.7) * torch.exp(torch.tensor(-0.7)) - 0.3 / 0.7

    def error(solver, steps):
        return (sample(model, x1, cond, steps=steps, solver=solver) - exact).abs().item()

    assert error("euler", 20) / error("euler", 40) == pytest.approx(2.0, rel=0.1)
    assert error("heun", 20) < error("euler", 20) / 20
    # Heun's last step is Euler (t_next = 0), so the global error is dominated by one O(h^2) step: order >= 2 overall.
    assert error("heun", 20) / error("heun", 40) > 3.5


def test_score_from_velocity_recovers_noise():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    t = torch.rand(5, generator=g) * 0.9 + 0.05
    for path in ("linear", "cosine"):
        k = path_coefficients(path, t[:, None])
        xt, v = k.alpha * x0 + k.sigma * eps, k.d_alpha * x0 + k.d_sigma * eps
        torch.testing.assert_close(score_from_velocity(path, xt, v, t), -eps / k.sigma)


def test_sde_is_exact_in_distribution_for_gaussian_data():
    """With data N(0, s^2) the exact velocity is known; SDE samples must have std close to s."""
    s = 0.5

    class GaussianVelocity(Affine):
        def forward(self, x, t, cond, **kwargs):
            t = t.double()[:, None]
            var = (1 - t) ** 2 * s**2 + t**2
            # E[eps - x0 | x_t] for x0 ~ N(0, s^2), eps ~ N(0, 1)
            return x * (t - (1 - t) * s**2) / var

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4000, 1, generator=g, dtype=torch.float64)
    out = sample(GaussianVelocity(0, 0), noise, torch.zeros(4000), steps=200, solver="sde", generator=g)
    assert out.std().item() == pytest.approx(s, rel=0.06)
    ode = sample(GaussianVelocity(0, 0), noise, torch.zeros(4000), steps=100, solver="euler")
    assert ode.std().item() == pytest.approx(s, rel=0.03)


def test_errors():
    model, x, y = setup()
    with pytest.raises(ValueError, match="unknown guidance 'cfgg'"):
        Guidance("cfgg")
    with pytest.raises(ValueError, match="interval"):
        Guidance("cfg", 2.0, interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="unknown solver 'rk4'"):
        sample(model, x, y, solver="rk4")
    with pytest.raises(ValueError, match="condition batch 2"):
        sample(model, x, y[:2])
