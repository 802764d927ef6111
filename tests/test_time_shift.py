"""The token-count time shift: its map, its use in training times and in the sampler's grid."""
import math

import pytest
import torch

from sprint_mm.flow import FlowMatching, TimeShift
from sprint_mm.sampling import sample, time_grid
from tests.helpers import tiny_sit


def test_shift_fixes_the_ends_is_monotone_and_neutral_at_the_base():
    shift = TimeShift(base_tokens=64)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for tokens in (16, 64, 256, 1024):
        s = shift(t, tokens)
        assert s[0] == 0 and s[-1] == 1
        assert torch.all(s[1:] > s[:-1])
    torch.testing.assert_close(shift(t, 64), t)
    # more tokens: every interior time moves toward noise (t = 1), fewer: toward data
    assert torch.all(shift(t, 256)[1:-1] > t[1:-1]) and torch.all(shift(t, 16)[1:-1] < t[1:-1])
    assert shift.factor(256) == pytest.approx(2.0)  # sqrt(256 / 64)


def test_shift_is_the_sd3_formula():
    shift = TimeShift(base_tokens=100, exponent=0.5)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    s = math.sqrt(400 / 100)
    torch.testing.assert_close(shift(t, 400), s * t / (1 + (s - 1) * t))


@pytest.mark.parametrize("bad", [dict(base_tokens=0), dict(base_tokens=1.5), dict(exponent=-1)])
def test_bad_shift_settings_name_the_value(bad):
    with pytest.raises(ValueError, match="TimeShift"):
        TimeShift(**bad)


class Recorder(torch.nn.Module):
    """A model that records the times it is asked about and predicts zero velocity."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone, self.times = backbone, []

    def forward(self, x, t, cond, **_):
        self.times.append(t.clone())
        return torch.zeros_like(x)


def test_training_times_are_shifted_by_the_batch_token_count():
    backbone = tiny_sit(input_size=16, patch_size=2)  # 64 tokens
    model = Recorder(backbone)
    x0 = torch.zeros(4, *backbone.sample_shape)
    shift = TimeShift(base_tokens=16)
    plain = FlowMatching(path_drop=0.0, label_dropout=0.0)
    shifted = FlowMatching(path_drop=0.0, label_dropout=0.0, time_shift=shift)
    cond = torch.zeros(4, dtype=torch.long)
    plain.loss(model, x0, cond, generator=torch.Generator().manual_seed(3))
    shifted.loss(model, x0, cond, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model.times[1], shift(model.times[0], 64))


def test_sampler_visits_the_shifted_grid():
    backbone = tiny_sit(input_size=16, patch_size=4)  # 16 tokens
    model = Recorder(backbone)
    shift = TimeShift(base_tokens=4)
    noise = torch.randn(2, *backbone.sample_shape)
    sample(model, noise, torch.zeros(2, dtype=torch.long), steps=5, time_shift=shift)
    visited = [float(t[0]) for t in model.times]
    expected = shift(torch.tensor(time_grid("euler", 5), dtype=torch.float64), 16)[:-1].tolist()
    assert visited == pytest.approx(expected)
