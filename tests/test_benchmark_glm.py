"""The exact (quadrature) ELBO of ``benchmarks/problems.py``'s ``GLMRegression``,
used by ``benchmarks/ggn_targets.py``, against Monte Carlo estimates."""

import math
import os
import sys

import pyro
import pytest
import torch
from pyro import poutine

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))

from problems import GLMRegression  # noqa: E402
from tests.seeding import generator  # noqa: E402


def _random_q(dim, scale, seed):
    g = generator(seed)
    m = 0.3 * torch.randn(dim, generator=g, dtype=torch.float64)
    A = torch.randn(dim, dim, generator=g, dtype=torch.float64) * scale / math.sqrt(dim)
    L = torch.linalg.cholesky(A @ A.T + scale ** 2 * torch.eye(dim, dtype=torch.float64))
    return m, L


def _mc_elbo(problem, m, L, draws, seed):
    """Mean and standard error of ``log p(y, w) - log q(w)``, ``log p`` from the Pyro
    model's trace (vectorised over draws by hand: one trace per draw is slow)."""
    g = generator(seed)
    z = m + torch.randn(draws, problem.dim, generator=g, dtype=m.dtype) @ L.T
    q = torch.distributions.MultivariateNormal(m, scale_tril=L)
    values = []
    for w in z[:200]:  # the model itself, on a subset
        tr = poutine.trace(poutine.condition(problem.model, {"w": w})).get_trace()
        values.append(float(tr.log_prob_sum()) - float(q.log_prob(w)))
    f = z @ problem.X.T
    if problem.likelihood == "logistic":
        ll = (problem.y * f - torch.nn.functional.softplus(f)).sum(-1)
    else:
        ll = (problem.y * f - f.exp() - torch.lgamma(problem.y + 1)).sum(-1)
    lp = torch.distributions.Normal(0.0, problem.prior_scale).log_prob(z).sum(-1)
    e = ll + lp - q.log_prob(z)
    # The vectorised formula is the model's log joint.
    assert torch.allclose(torch.tensor(values, dtype=e.dtype), e[:200], rtol=1e-10, atol=1e-8)
    return float(e.mean()), float(e.std() / math.sqrt(draws))


@pytest.mark.parametrize("make", [
    GLMRegression.german_credit,
    lambda: GLMRegression.synthetic(300, 5, "poisson", seed=1),
    lambda: GLMRegression.synthetic(300, 5, "logistic", seed=2),
])
@pytest.mark.parametrize("scale", [0.05, 0.5])
def test_quadrature_elbo_matches_monte_carlo(make, scale):
    pyro.clear_param_store()
    problem = make()
    m, L = _random_q(problem.dim, scale, seed=3)
    exact = problem.elbo(m, L)
    mc, se = _mc_elbo(problem, m, L, 20000, seed=4)
    assert abs(mc - exact) <= 4 * se + 1e-9 * abs(exact)


def test_optimum_is_stationary_and_beats_laplace():
    problem = GLMRegression.german_credit()
    value, m, L, info = problem.optimum()
    assert info["grad_norm"] < 1e-3
    assert info["gain_over_laplace"] >= 0
    for delta in (1e-3, -1e-3):  # a local maximum along a few directions
        assert problem.elbo(m + delta, L) < value
        assert problem.elbo(m, L * (1 + delta)) < value
