"""benchmarks/trajectory_band.py: the bf16 noise band of the lever and fused trajectory checks (issue 20)."""

import sys

import numpy as np

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from trajectory_band import band  # noqa: E402


def _losses(rng, n=60):
    eager = 0.7 * np.exp(-np.arange(n) / 30) + 0.05
    padded = eager + rng.normal(0, 0.01, n)  # same math on other shapes: bf16-sized noise
    return eager, padded


def test_a_small_loss_step_fails_the_relative_reading_only():
    """The LoRA trajectory of the H200 lever run: one step where eager's loss is small (0.06) gives the largest
    relative difference while every absolute difference stays within what the padded run shows."""
    rng = np.random.default_rng(0)
    eager, padded = _losses(rng)
    eager[42] = padded[42] = 0.02  # a small loss: the same absolute noise is a large relative one
    levers = eager + rng.normal(0, 0.005, len(eager))
    levers[42] = eager[42] + 0.018
    b = band({"levers": levers, "eager": eager, "eager_padded": padded})
    assert b["ks"] == [1, 5, 10, 20, 50, 60]  # (the prefixes, and the whole run)
    assert not b["relative"]["within"] and b["absolute"]["within"] and b["argmax_relative"] == 42


def test_a_diverging_trajectory_fails_both_readings():
    rng = np.random.default_rng(1)
    eager, padded = _losses(rng)
    fused = eager + np.linspace(0, 0.3, len(eager))  # drifts away: not noise
    b = band({"fused": fused, "eager": eager, "eager_padded": padded})
    assert not b["relative"]["within"] and not b["absolute"]["within"]
    assert b["absolute"]["candidate"][50] > 2 * b["absolute"]["padded"][50]


def test_the_end_of_a_run_between_prefixes_is_checked():
    """A 150-step run that jumps away after step 120: the fixed prefixes stop at 100, the whole run must count."""
    rng = np.random.default_rng(2)
    eager, padded = _losses(rng, n=150)
    levers = eager + rng.normal(0, 0.002, 150)
    levers[120:] = 5.0
    b = band({"levers": levers, "eager": eager, "eager_padded": padded})
    assert b["ks"][-1] == 150 and not b["absolute"]["within"] and not b["relative"]["within"]
