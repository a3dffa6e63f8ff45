"""The fit monitors of :mod:`pyro_natgrad.diagnostics` on constructed gradient sequences,
whose answer is known by construction: the fits in test_optim.py exercise them only
where their draws happen to reach a threshold."""

import warnings

import pytest
import torch

from pyro_natgrad import NaturalGradientWarning
from pyro_natgrad.diagnostics import GROWTH_MIN_SAMPLE, GrowthMonitor


def feed(monitor, factor, steps, sample=64, key="w"):
    """Feed ``w_t = factor^t v`` (``v`` a fixed vector of ``sample`` elements) as the
    sums a step passes: ``<w_t, w_{t-1}>``, ``|w_t|^2``, ``|w_{t-1}|^2``. Returns the
    warnings and the step (1-based) of the first."""
    v = torch.randn(sample, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    previous = torch.zeros_like(v)
    first = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(1, steps + 1):
            w = factor ** t * v
            monitor.note(key, float(w @ previous), float(w @ w), float(previous @ previous),
                         sample=sample)
            previous = w
            if caught and first is None:
                first = t
    return [str(c.message) for c in caught if c.category is NaturalGradientWarning], first


def test_growing_oscillation_warns_once_and_names_the_hessian():
    """Each step flips the gradient and doubles it (a Jacobi step with rho lam = 3 along
    one direction): the running average of log |w|^2 rises 200-fold within a few steps
    of its lag, and the warning names the remedy; a second group diverging later does
    not warn again."""
    monitor = GrowthMonitor(256)
    messages, first = feed(monitor, -2.0, 30)
    assert len(messages) == 1 and "diverging" in messages[0]
    assert "curvature='hessian'" in messages[0] and "256" in messages[0]
    assert first <= 15
    assert not feed(monitor, -2.0, 30, key="other")[0]


@pytest.mark.parametrize("factor,sample", [
    (2.0, 64),     # grows, but successive gradients agree: a long approach, not a flip
    (-1.0, 64),    # flips without growing: noise along a shared direction
    (-1.02, 64),   # flips and grows 2% a step: a 200-fold rise takes 134 steps
    (-2.0, GROWTH_MIN_SAMPLE - 1),  # too few elements to judge a direction
])
def test_growth_alone_flips_alone_or_a_small_sample_do_not_warn(factor, sample):
    """Each condition alone warned falsely on real fits (see GrowthMonitor.note)."""
    messages, _ = feed(GrowthMonitor(256), factor, 100, sample=sample)
    assert not messages
