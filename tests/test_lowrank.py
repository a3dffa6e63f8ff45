"""NaturalGradient with AutoLowRankMultivariateNormal, checked against the closed-form
posterior of a Bayesian linear regression (y ~ N(X w, sigma^2), w ~ N(0, I))."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoLowRankMultivariateNormal

from pyro_natgrad import NaturalGradient, NaturalGradientWarning

F64 = torch.float64
SIGMA = 0.5


@pytest.fixture(autouse=True)
def _clean():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()
    torch.set_num_threads(old)


def data(n=30, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=F64)
    y = X @ torch.linspace(-1, 1, d, dtype=F64) + SIGMA * torch.randn(n, generator=g, dtype=F64)
    return X, y


def model(X, y):
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("n", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w, SIGMA), obs=y)


def posterior(X, y):
    prec = X.T @ X / SIGMA ** 2 + torch.eye(X.shape[1], dtype=F64)
    cov = torch.linalg.inv(prec)
    return cov @ X.T @ y / SIGMA ** 2, cov, prec


def exact_loc_gradient(loc, X, y):
    """d(-ELBO)/dloc for a Gaussian q: Lambda loc - X^T y / sigma^2."""
    _, _, prec = posterior(X, y)
    return prec @ loc - X.T @ y / SIGMA ** 2


def set_covariance(guide, cov, eps=1e-3):
    """Make the guide's covariance exactly ``cov``: W W^T + eps I with W = chol(cov - eps I)."""
    d = cov.shape[0]
    W = torch.linalg.cholesky(cov - eps * torch.eye(d, dtype=F64))
    s = torch.full((d,), math.sqrt(eps), dtype=F64)
    with torch.no_grad():
        guide.scale = s
        guide.cov_factor.copy_(W / s.unsqueeze(-1))
    post = guide.get_posterior()
    torch.testing.assert_close(post.covariance_matrix.detach(), cov, rtol=1e-12, atol=1e-14)


def test_routing():
    X, y = data()
    guide = AutoLowRankMultivariateNormal(model, rank=2)
    guide(X, y)
    opt = NaturalGradient(guide)
    routes = opt.routing()
    assert routes["loc"].startswith("natural gradient (low-rank Gaussian")
    assert routes["cov_factor"].startswith("base optimizer")
    assert routes["scale_unconstrained"].startswith("base optimizer")
    svi = SVI(model, guide, opt, Trace_ELBO())
    with pytest.warns(NaturalGradientWarning, match="2 parameter"):
        svi.step(X, y)


def test_exact_mean_step_lands_on_posterior_mean():
    """With the posterior covariance and the exact gradient, rho = 1 is Newton's step."""
    X, y = data()
    mean, cov, _ = posterior(X, y)
    guide = AutoLowRankMultivariateNormal(model, rank=4)
    guide(X, y)
    set_covariance(guide, cov)
    with torch.no_grad():
        guide.loc.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64))
    opt = NaturalGradient(guide, step_size=1.0, max_kl=None, control_variate=False)
    params = list(guide.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    guide.loc.grad = exact_loc_gradient(guide.loc.detach(), X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NaturalGradientWarning)
        opt([guide.loc])
    torch.testing.assert_close(guide.loc.detach(), mean, rtol=1e-10, atol=1e-12)


def test_control_variate_cancels_noise_at_the_posterior():
    """At q = posterior, every single-draw gradient of the mean is pure score noise; the
    control variate removes it, so the mean does not move (without it, it does)."""
    X, y = data()
    mean, cov, _ = posterior(X, y)
    moved = {}
    for cv in (True, False):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoLowRankMultivariateNormal(model, rank=4)
        guide(X, y)
        set_covariance(guide, cov)
        with torch.no_grad():
            guide.loc.copy_(mean)
        svi = SVI(model, guide, NaturalGradient(guide, control_variate=cv), Trace_ELBO())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NaturalGradientWarning)
            svi.step(X, y)
        moved[cv] = float((guide.loc.detach() - mean).abs().max())
    assert moved[True] < 1e-10
    assert moved[False] > 1e-3


def test_svi_reaches_posterior_mean():
    X, y = data()
    mean, cov, _ = posterior(X, y)
    pyro.set_rng_seed(1)
    guide = AutoLowRankMultivariateNormal(model, rank=2)
    svi = SVI(model, guide, NaturalGradient(guide), Trace_ELBO())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NaturalGradientWarning)
        for _ in range(400):
            assert math.isfinite(svi.step(X, y))
    sd = cov.diagonal().sqrt()
    err = ((guide.loc.detach() - mean).abs() / sd).max()
    assert float(err) < 0.3, err
