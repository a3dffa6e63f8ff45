"""Tests of :class:`pyro_natgrad.NaturalGradient`, checked against independent routes.

The reference problem is Bayesian linear regression with known noise,

    w ~ N(0, tau_w^2 I),  b ~ N(0, tau_b^2),  y ~ N(X w + b, sigma^2),

whose posterior over theta = (w, b) is Gaussian with precision
``Lam = Z^T Z / sigma^2 + diag(1/tau^2)`` (``Z = [X, 1]``) and mean ``Lam^{-1} Z^T y / sigma^2``.
Everything the optimizer should reach is computed here in closed form, never by the
library: the exact posterior, the exact mean-field optimum (mean = posterior mean,
variances ``1/Lam_ii``), the exact ELBO of ``q = N(m, L L^T)`` and its gradients
(autograd through that closed form, not through Pyro's ELBO estimators).

Data: scikit-learn's diabetes set (shipped with scikit-learn, no download), standardised,
which has strongly correlated features, so a mean-field Jacobi step and a full Newton step
differ visibly.
"""

import copy
import functools
import math
import re
import statistics
import warnings

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from pyro import poutine
from pyro.infer import (
    SVI, JitTrace_ELBO, Predictive, Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO,
)
from pyro.infer.autoguide import (
    AutoDelta, AutoDiagonalNormal, AutoGuideList, AutoLowRankMultivariateNormal,
    AutoMultivariateNormal, AutoNormal, AutoNormalMessenger, init_to_median, init_to_value,
)

from pyro_natgrad import NaturalGradient, NaturalGradientWarning, StepSize
from pyro_natgrad.optim import _cut_to_bound
from pyro_natgrad.datasets import load_reference
from tests.seeding import CPUDraws, generator, rng_state as rng_state_now, set_rng_state

F64 = torch.float64
SIGMA, TAU_W, TAU_B = 0.7, 1.0, 2.0
GAUSSIAN_GUIDES = [AutoMultivariateNormal, AutoNormal, AutoDiagonalNormal]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add synchronisation (on a busy 2-core machine
    torch.tril of an 11x11 matrix took 16 ms with 2 threads, 3 us with 1)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _clean_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


# ----------------------------------------------------------------------------------------
# problem, exact answers
# ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _diabetes():
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    X = torch.as_tensor(X, dtype=F64)
    y = torch.as_tensor(y, dtype=F64)
    X = (X - X.mean(0)) / X.std(0)
    y = (y - y.mean()) / y.std() + 1.0  # non-zero intercept, so b is tested too
    return X, y


def diabetes(dtype=F64):
    X, y = _diabetes()
    return X.to(dtype).clone(), y.to(dtype).clone()


def blr_model(X, y):
    """Broadcasts over a particle plate at dim -2 (``max_plate_nesting=1``)."""
    d = X.shape[-1]
    w = pyro.sample("w", dist.Normal(X.new_zeros(d), TAU_W).to_event(1))
    b = pyro.sample("b", dist.Normal(X.new_zeros(()), TAU_B))
    # w: batch (P, 1) + event (d,) under a particle plate at dim -2; b: (P, 1)
    mean = (X * w).sum(-1) + b
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(mean, SIGMA), obs=y)


def design(X):
    return torch.cat([X, X.new_ones(X.shape[0], 1)], -1)


def prior_precision(X):
    d = X.shape[1]
    return torch.cat([X.new_full((d,), TAU_W ** -2), X.new_full((1,), TAU_B ** -2)])


def exact_posterior(X, y):
    """(mean, covariance, precision, h) of the exact posterior over (w, b)."""
    Z = design(X)
    Lam = Z.T @ Z / SIGMA ** 2 + torch.diag(prior_precision(X))
    h = Z.T @ y / SIGMA ** 2
    mean = torch.linalg.solve(Lam, h)
    cov = torch.linalg.inv(Lam)
    return mean, 0.5 * (cov + cov.T), Lam, h


def exact_elbo(m, L, X, y):
    """ELBO of q = N(m, L L^T) (L lower triangular), in closed form."""
    Z = design(X)
    n, D = Z.shape
    S = L @ L.T
    r = y - Z @ m
    tau2 = prior_precision(X).reciprocal()
    loglik = -0.5 * n * math.log(2 * math.pi * SIGMA ** 2) \
        - 0.5 * (r @ r + ((Z.T @ Z) * S).sum()) / SIGMA ** 2
    logprior = -0.5 * torch.log(2 * math.pi * tau2).sum() \
        - 0.5 * ((m.square() + S.diagonal()) / tau2).sum()
    entropy = 0.5 * D * (1 + math.log(2 * math.pi)) \
        + torch.log(L.diagonal().abs()).sum()
    return loglik + logprior + entropy


def guide_moments(guide):
    """(m, L) of the guide's q over (w, b), differentiable w.r.t. the guide's leaves."""
    if isinstance(guide, AutoNormal):
        m = torch.cat([guide.locs.w, guide.locs.b.reshape(1)])
        s = torch.cat([guide.scales.w, guide.scales.b.reshape(1)])
        return m, torch.diag(s)
    post = guide.get_posterior()
    if isinstance(post, dist.MultivariateNormal):
        return post.loc, post.scale_tril
    return post.base_dist.loc, torch.diag(post.base_dist.scale)


def store_params():
    return [p for _, p in pyro.get_param_store().named_parameters()]


def store_snapshot():
    return {k: p.detach().clone() for k, p in pyro.get_param_store().named_parameters()}


def perturb(guide, seed, size=0.3):
    """Move every guide parameter away from Pyro's default init (e.g. U = I)."""
    gen = generator(seed)
    with torch.no_grad():
        for _, p in guide.named_parameters():
            p.add_(size * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def assert_mean_field_optimum(m, L, X, y, rtol=1e-6):
    mu, _, Lam, _ = exact_posterior(X, y)
    torch.testing.assert_close(m, mu, rtol=rtol, atol=rtol * mu.abs().max())
    torch.testing.assert_close(L.diagonal().square(), Lam.diagonal().reciprocal(),
                               rtol=rtol, atol=0.0)


def assert_full_posterior(m, L, X, y, rtol=1e-6):
    mu, Sigma, _, _ = exact_posterior(X, y)
    torch.testing.assert_close(m, mu, rtol=rtol, atol=rtol * mu.abs().max())
    torch.testing.assert_close(L @ L.T, Sigma, rtol=rtol, atol=rtol * Sigma.abs().max())


def assert_reached(guide, X, y, rtol=1e-6):
    with torch.no_grad():
        m, L = guide_moments(guide)
    if isinstance(guide, AutoMultivariateNormal):
        assert_full_posterior(m, L, X, y, rtol)
    else:
        assert_mean_field_optimum(m, L, X, y, rtol)


def fresh(guide_cls, model=blr_model, **kwargs):
    pyro.clear_param_store()
    return guide_cls(model, **kwargs)


# ----------------------------------------------------------------------------------------
# 1. one step with exact gradients
# ----------------------------------------------------------------------------------------
def test_exact_elbo_formula_self_check(float64):
    """The test's own ELBO: its gradient in m is Lam m - h and it peaks at the posterior."""
    X, y = diabetes()
    mu, Sigma, Lam, h = exact_posterior(X, y)
    m = torch.randn(mu.shape, dtype=F64, requires_grad=True)
    L = torch.linalg.cholesky(Sigma) * 1.3
    (g,) = torch.autograd.grad(-exact_elbo(m, L, X, y), m)
    torch.testing.assert_close(g, Lam @ m.detach() - h)
    best = exact_elbo(mu, torch.linalg.cholesky(Sigma), X, y)
    assert best > exact_elbo(mu, L, X, y)
    assert best > exact_elbo(mu + 0.01, torch.linalg.cholesky(Sigma), X, y)


def _exact_gradient_step(guide_cls, seed):
    X, y = diabetes()
    guide = fresh(guide_cls)
    guide(X, y)
    perturb(guide, seed)
    opt = NaturalGradient(guide, step_size=1.0, max_kl=None, control_variate=False,
                          curvature="none")
    params = store_params()
    assert {id(p) for p in params} == {id(p) for p in guide.parameters()}
    m0, L0 = guide_moments(guide)
    loss = -exact_elbo(m0, L0, X, y)
    for p, g in zip(params, torch.autograd.grad(loss, params)):
        p.grad = g
    m0, L0 = m0.detach().clone(), L0.detach().clone()  # loc may be the parameter itself
    with warnings.catch_warnings():
        warnings.simplefilter("error", NaturalGradientWarning)  # nothing goes to Adam
        opt(params)
    with torch.no_grad():
        m1, L1 = guide_moments(guide)
    return X, y, m0, L0, m1, L1


@pytest.mark.parametrize("seed", [0, 1])
def test_full_rank_one_exact_step_lands_on_posterior(float64, seed):
    X, y, m0, L0, m1, L1 = _exact_gradient_step(AutoMultivariateNormal, seed)
    mu, Sigma, _, _ = exact_posterior(X, y)
    assert (m0 - mu).abs().max() > 0.1  # it had somewhere to go
    assert_full_posterior(m1, L1, X, y, rtol=1e-6)


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoDiagonalNormal])
def test_mean_field_one_exact_step_is_jacobi(float64, guide_cls):
    X, y, m0, L0, m1, L1 = _exact_gradient_step(guide_cls, 2)
    mu, _, Lam, h = exact_posterior(X, y)
    diag = Lam.diagonal()
    # variances: exactly the mean-field optimum 1/Lam_ii
    torch.testing.assert_close(L1.diagonal().square(), diag.reciprocal(), rtol=1e-9, atol=0.0)
    # mean: one Jacobi step mu' = mu - Lam_ii^{-1} d(-ELBO)/dmu_i
    expected = m0 - (Lam @ m0 - h) / diag
    torch.testing.assert_close(m1, expected, rtol=1e-9, atol=1e-12)
    # correlated features: a Jacobi step is not the Newton step to the posterior mean
    assert (m1 - mu).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------
# 2. SVI on the conjugate model
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("guide_cls", [
    AutoMultivariateNormal, AutoNormal,
    AutoDiagonalNormal,
])
def test_svi_default_settings_reach_exact_optimum(float64, rng, guide_cls):
    X, y = diabetes()
    guide = fresh(guide_cls)
    svi = SVI(blr_model, guide, NaturalGradient(guide), Trace_ELBO())
    for _ in range(30):
        assert math.isfinite(svi.step(X, y))
    assert_reached(guide, X, y, rtol=1e-6)


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal])
def test_svi_from_a_far_too_narrow_start_reaches_exact_optimum(float64, rng, guide_cls):
    """From ``init_scale=1e-5``, about 1e-3 of the posterior sds, the variances may grow
    only about 1.5-fold a step (each step at most doubles them, and the running precision
    at most halves). The step-size clock used to run meanwhile, so the decay slowed the
    rest: after 200 steps the sds were 20% short and the mean 0.6 sds off (mean-field;
    the full-rank mean was still 0.5 sds off after 300). It holds while the variances'
    changes (for the full-rank guide, ``diag(L^T T L) - 1``) agree from step to step and
    are not yet small (rms above 0.1); from there the decay runs, and the last digits
    come more slowly."""
    X, y = diabetes()
    guide = fresh(guide_cls, init_scale=1e-5)
    svi = SVI(blr_model, guide, NaturalGradient(guide), Trace_ELBO())
    for _ in range(100):
        svi.step(X, y)
    assert_reached(guide, X, y, rtol=1e-4)


def test_the_clock_runs_once_the_variances_are_at_their_targets(float64, rng):
    """At the optimum of a Gaussian model the variances' changes are rounding (1e-15),
    whose pattern repeats from step to step: read as agreement it held the step size at 1
    for good, and mean steps without the control variate (JIT with other randomness
    between steps) kept their noise (1.2 sds after 30 steps against 0.39). The clock
    holds only while those changes are not small, so after 100 steps from Pyro's
    default start it has run nearly all of them."""
    X, y = diabetes()
    guide = fresh(AutoNormal)
    opt = NaturalGradient(guide)
    svi = SVI(blr_model, guide, opt, Trace_ELBO())
    for _ in range(100):
        svi.step(X, y)
    assert_reached(guide, X, y, rtol=1e-6)
    assert opt.get_state()["natural_gradient"]["curvature"]["t"] > 80


@pytest.mark.parametrize("guide_cls", GAUSSIAN_GUIDES)
def test_svi_without_trust_region_reaches_exact_optimum(float64, rng, guide_cls):
    """Default curvature ('auto' -> model Hessian) and control variate, single-particle
    Trace_ELBO: the steps are noise-free for a linear-Gaussian model."""
    X, y = diabetes()
    guide = fresh(guide_cls)
    svi = SVI(blr_model, guide, NaturalGradient(guide, max_kl=None), Trace_ELBO())
    for _ in range(30):
        assert math.isfinite(svi.step(X, y))
    assert_reached(guide, X, y, rtol=1e-6)

@pytest.mark.parametrize("guide_cls", [AutoMultivariateNormal, AutoNormal])
def test_validation_loss_between_steps_does_not_disturb_the_steps(float64, rng, guide_cls):
    """``Trace_ELBO().loss`` runs the guide with grad enabled but differentiates nothing:
    its draws must not stand in for a step's (they did, and the full-rank guide ended
    6.5e-3 nats of KL from the posterior instead of 1e-15)."""
    X, y = diabetes()
    guide = fresh(guide_cls)
    svi = SVI(blr_model, guide, NaturalGradient(guide), Trace_ELBO())
    for _ in range(30):
        svi.step(X, y)
        Trace_ELBO().loss(blr_model, guide, X, y)
    assert_reached(guide, X, y, rtol=1e-6)


def _uncentred_line():
    """y = a + b t + noise with t = the years 1952..2013 (uncentred, as in posteriordb's
    kilpisjarvi): the posterior of (a, b) has correlation -0.99999, so its mean-field
    sds are about 1/200 of its marginal sds, and the intercept starts hundreds of
    mean-field sds from the optimum. Returns (model, t, y, prior sds)."""
    t = torch.arange(1952.0, 2014.0, dtype=F64)
    g = generator(3)
    y = -60.0 + 0.035 * t + torch.randn(t.shape, generator=g, dtype=F64)
    prior = torch.tensor([100.0, 1.0], dtype=F64)

    def model(t, y):
        a = pyro.sample("a", dist.Normal(t.new_zeros(()), prior[0]))
        b = pyro.sample("b", dist.Normal(t.new_zeros(()), prior[1]))
        with pyro.plate("data", t.shape[0]):
            pyro.sample("y", dist.Normal(a + b * t, 1.0), obs=y)

    return model, t, y, prior


def test_mean_field_on_strongly_correlated_posterior(float64, rng):
    """Default settings, AutoNormal: the exact mean-field optimum (the posterior mean
    and variances 1 / Lam_ii, computed here in closed form) within 40 steps. A trust
    region measured only in the mean-field guide's own sds needed over 1,000."""
    model, t, y, prior = _uncentred_line()
    Z = torch.stack([torch.ones_like(t), t], -1)
    Lam = Z.T @ Z + torch.diag(prior.pow(-2))
    mu = torch.linalg.solve(Lam, Z.T @ y)
    corr = torch.linalg.inv(Lam)
    assert corr[0, 1] / (corr[0, 0] * corr[1, 1]).sqrt() < -0.9999  # the premise
    guide = AutoNormal(model)
    svi = SVI(model, guide, NaturalGradient(guide), Trace_ELBO())
    for _ in range(40):
        svi.step(t, y)
    m = torch.stack([guide.locs.a, guide.locs.b]).detach()
    s = torch.stack([guide.scales.a, guide.scales.b]).detach()
    mf_sd = Lam.diagonal().rsqrt()
    assert ((m - mu).abs() / mf_sd).max() < 1e-3, (m, mu)
    torch.testing.assert_close(s, mf_sd, rtol=1e-6, atol=0.0)



@pytest.mark.slow
@pytest.mark.parametrize("guide_cls", [
    AutoMultivariateNormal,
    AutoNormal,
    AutoDiagonalNormal,
])
def test_svi_gradient_only_improves_elbo(float64, rng, guide_cls):
    X, y = diabetes()
    guide = fresh(guide_cls)
    svi = SVI(blr_model, guide, NaturalGradient(guide, curvature="none"), Trace_ELBO())
    guide(X, y)  # create the parameters at their init
    with torch.no_grad():
        elbo0 = exact_elbo(*guide_moments(guide), X, y)
    for _ in range(200):
        assert math.isfinite(svi.step(X, y))
    assert all(bool(torch.isfinite(p).all()) for p in store_params())
    with torch.no_grad():
        elbo1 = exact_elbo(*guide_moments(guide), X, y)
    assert torch.isfinite(elbo1)
    assert elbo1 > elbo0, (elbo0, elbo1)


def test_near_singular_step_is_bounded(float64):
    """Minimal form of the bug above: one diagonal step whose precision factor
    1 + rho S is 1e-3 (just positive) vs -1e-3 (just negative, retracted). The two steps
    must be close; the variance may not grow by more than what the trust region allows
    (here KL(q'||q) <= max_kl = 10 means a variance ratio below ~25)."""
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    scales = {}
    for S in (-0.999, -1.001):
        guide = fresh(AutoNormal, model)
        guide()
        opt = NaturalGradient(guide, step_size=1.0, max_kl=10.0, control_variate=False,
                              curvature="none")
        loc, raw = guide.locs.z_unconstrained, guide.scales.z_unconstrained
        scale = guide.scales.z  # the guide's own constraint transform of raw
        (dscale,) = torch.autograd.grad(scale, raw)
        scale = scale.detach()
        loc.grad = torch.zeros_like(loc)
        raw.grad = (S / scale) * dscale  # d(-ELBO)/dscale = S / scale, chained to raw
        opt([loc, raw])
        with torch.no_grad():
            scales[S] = float(guide.scales.z / scale)
    assert scales[-0.999] ** 2 < 25, scales
    assert abs(math.log(scales[-0.999] / scales[-1.001])) < 1.0, scales


def test_mean_field_trust_region_bounds_the_actual_move():
    """``step_limit`` against a grid search over rho of its two conditions, and the
    steps of :func:`diagonal_gaussian_step` against the region itself: the mean moves at
    most sqrt(max_kl) current sds (the old bound, which took the variance as fixed, let
    a growing variance carry it up to twice that), and rho S at most sqrt(2 max_kl)."""
    from pyro_natgrad import gaussian

    gen = generator(11)
    n, max_kl = 400, 2.0
    w = 5 * torch.randn(n, generator=gen, dtype=F64)
    S = 3 * torch.randn(n, generator=gen, dtype=F64)
    limit = gaussian.step_limit(w, S, max_kl)
    grid = torch.linspace(0, 1, 20001, dtype=F64)[:, None]
    ok = ((grid * w.abs() * (1 + grid * S.abs())).square() <= max_kl) & (
        (grid * S).square() <= 2 * max_kl)
    best = (grid * ok).amax(0)  # the conditions are monotone in rho
    torch.testing.assert_close(torch.minimum(limit, torch.ones_like(limit)), best,
                               atol=1e-4, rtol=0)
    # the actual step, where the guide's sds are 1: move and precision change
    loc, scale = torch.zeros(n, dtype=F64), torch.ones(n, dtype=F64)
    step = gaussian.diagonal_gaussian_step(loc, scale, w, S, 1.0, None, max_kl)
    move = (step.loc - loc).abs()
    assert float(move.max()) <= max_kl ** 0.5 * (1 + 1e-12)
    assert float((step.rho * S).abs().max()) <= (2 * max_kl) ** 0.5 * (1 + 1e-12)
    grown = step.scale_tril > 1
    assert bool(grown.any()) and float(move[grown].max()) > 0.5 * max_kl ** 0.5


def test_mean_field_variance_step_is_monotone_and_odd():
    """The mean-field variance update ``scale'^2 = scale^2 / B(rho S)`` with a trust
    region, from gradients alone: ``B = 1 + x`` for ``x`` in [0, F - 1] and
    ``B(-x) = 1 / B(x)`` everywhere (symmetric noise in S has no drift in log variance),
    monotone, and no variance changes more than F-fold either way (the iBLR form
    1 + x + x^2/2 turned back below -1; the rule before this one let the precision grow
    (1 + x)-fold but shrink only 2-fold, a ratchet under noise). With the model's
    curvature as the precision target the precision may grow more than F-fold in a
    step, and no variance more than doubles."""
    from pyro_natgrad import gaussian

    F = gaussian.NOISY_VARIANCE_FACTOR
    assert F > 1
    x = torch.linspace(-6, 6, 1201, dtype=F64)
    ones = torch.ones_like(x)
    # a region so large that it does not cut the step, and no mean gradient
    step = gaussian.diagonal_gaussian_step(0 * x, ones, 0 * x, x, 1.0, None, 1e6)
    assert bool((step.rho == 1).all())
    B = step.scale_tril.square().reciprocal()
    torch.testing.assert_close(B, (1 + x.clamp(0, F - 1)) / (1 - x.clamp(1 - F, 0)))
    torch.testing.assert_close(B * B.flip(0), torch.ones_like(B))
    assert bool((B.diff() >= 0).all())
    assert abs(float(B.min()) - 1 / F) < 1e-12 and abs(float(B.max()) - F) < 1e-12
    # precision target 1 + x: the same S, without the symmetric cap
    step = gaussian.diagonal_gaussian_step(0 * x, ones, 0 * x, 0 * x, 1.0, None, 1e6,
                                           precision_target=1 + x)
    B = step.scale_tril.square().reciprocal()
    torch.testing.assert_close(B[x >= 0], 1 + x[x >= 0])
    assert abs(float(B.min()) - 0.5) < 1e-12


def test_leave_one_out_cv_matches_cv_coefficient_of_the_others():
    """Each element's coefficient is :func:`cv_coefficient` of the other elements'
    draws (and, with a subsample, of the other drawn ones), computed one by one."""
    from pyro_natgrad import gaussian

    gen = generator(12)
    a = torch.randn(30, generator=gen, dtype=F64)
    e2 = torch.rand(30, generator=gen, dtype=F64)
    seen = torch.rand(30, generator=gen) < 0.7
    c = gaussian.leave_one_out_cv(a, e2)
    c_seen = gaussian.leave_one_out_cv(a, e2, seen)
    for i in range(30):
        rest = torch.arange(30) != i
        expected = gaussian.cv_coefficient(float(a[rest].sum()), 29, float(e2[rest].sum()))
        assert abs(float(c[i]) - expected) < 1e-12
        rest = rest & seen
        expected = gaussian.cv_coefficient(float(a[rest].sum()), int(rest.sum()),
                                           float(e2[rest].sum()))
        if seen[i]:
            assert abs(float(c_seen[i]) - expected) < 1e-12


def _weighted_median(values, weights):
    """The smallest value whose weights, with those of the values below it, reach half
    the total: by enumeration, for the check below."""
    total = float(weights.sum())
    for v in sorted(values.tolist()):
        if float(weights[values <= v].sum()) >= 0.5 * total:
            return v


@pytest.mark.parametrize("sample", [1000, 7])
def test_leave_one_out_median_cv_is_the_median_of_the_others(monkeypatch, sample):
    """Each element's coefficient is the ``eps^2``-weighted median of the other elements'
    ``(a + 1) / eps^2`` (of the drawn ones only, with a subsample), by enumeration. With
    a sample of every 5th element (``CV_SAMPLE`` 7 of 31), those get the median of the
    other sampled ones and the rest the sample's median. Ties and a zero draw included."""
    from pyro_natgrad import gaussian

    monkeypatch.setattr(gaussian, "CV_SAMPLE", sample)

    gen = generator(13)
    n = 31
    a = torch.randn(n, generator=gen, dtype=F64) * 3
    e2 = torch.rand(n, generator=gen, dtype=F64)
    e2[4] = 0.0  # no ratio
    a[7], e2[7] = a[9], e2[9]  # a tie
    seen = torch.rand(n, generator=gen) < 0.7
    for mask in (None, seen):
        c = gaussian.leave_one_out_median_cv(a, e2, mask)
        sampled = torch.zeros(n, dtype=torch.bool)
        sampled[::1 if sample >= n else 5] = True
        usable = sampled & (e2 > 0) & (mask if mask is not None else True)
        ratio = (a + 1) / e2.clamp_min(1e-300)
        for i in range(n):
            others = usable & (torch.arange(n) != i)
            expected = _weighted_median(ratio[others], e2[others])
            assert float(c[i]) == expected, (i, float(c[i]), expected)


# ----------------------------------------------------------------------------------------
# 3. guide kinds, validity, routing and the base optimizer
# ----------------------------------------------------------------------------------------
def noise_model(X, y):
    """Non-conjugate: unknown positive noise scale."""
    d = X.shape[-1]
    w = pyro.sample("w", dist.Normal(X.new_zeros(d), 1.0).to_event(1))
    s = pyro.sample("s", dist.LogNormal(X.new_zeros(()), 0.5))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal((X * w).sum(-1), s), obs=y)


def _small_data(n=40, d=3, seed=3):
    gen = generator(seed)
    X = torch.randn(n, d, generator=gen, dtype=F64)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=F64)[:d]
    y = X @ w + 0.5 * torch.randn(n, generator=gen, dtype=F64)
    return X, y


def _guide_list(first, second):
    guide = AutoGuideList(noise_model)
    guide.append(first(poutine.block(noise_model, expose=["w"])))
    guide.append(second(poutine.block(noise_model, expose=["s"])))
    return guide


GUIDE_KINDS = {
    "AutoNormal": lambda: AutoNormal(noise_model),
    "AutoDiagonalNormal": lambda: AutoDiagonalNormal(noise_model),
    "AutoMultivariateNormal": lambda: AutoMultivariateNormal(noise_model),
    "AutoLowRankMultivariateNormal": lambda: AutoLowRankMultivariateNormal(noise_model, rank=2),
    "List[AutoMultivariateNormal, AutoNormal]":
        lambda: _guide_list(AutoMultivariateNormal, AutoNormal),
    "List[AutoNormal, AutoDiagonalNormal]": lambda: _guide_list(AutoNormal, AutoDiagonalNormal),
}


def _check_valid(guide):
    parts = list(guide) if isinstance(guide, AutoGuideList) else [guide]
    for p in guide.parameters():
        assert bool(torch.isfinite(p).all())
    for part in parts:
        with torch.no_grad():
            if isinstance(part, AutoNormal):
                for name, _ in part.prototype_trace.iter_stochastic_nodes():
                    assert bool((getattr(part.scales, name) > 0).all())
            elif isinstance(part, (AutoMultivariateNormal, AutoLowRankMultivariateNormal)):
                L = torch.linalg.cholesky(part.get_posterior().covariance_matrix)
                assert bool((L.diagonal() > 0).all())
                _, info = torch.linalg.cholesky_ex(L @ L.T)
                assert int(info) == 0
            else:
                assert bool((part.get_posterior().base_dist.scale > 0).all())


@pytest.mark.parametrize("kind", [
    k for k in GUIDE_KINDS])
def test_every_guide_kind_steps_and_stays_valid(float64, rng, kind):
    X, y = _small_data()
    pyro.clear_param_store()
    guide = GUIDE_KINDS[kind]()
    opt = NaturalGradient(guide)
    svi = SVI(noise_model, guide, opt, Trace_ELBO())
    guide(X, y)
    routes = opt.routing()
    assert routes and all(v.startswith("natural gradient") for v in routes.values()), routes
    assert len(routes) == len(list(guide.parameters()))
    estimator = Trace_ELBO(num_particles=400, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        before = estimator.loss(noise_model, guide, X, y)
    start = store_snapshot()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NaturalGradientWarning)
        for _ in range(25):
            assert math.isfinite(svi.step(X, y))
            _check_valid(guide)
    assert all(not torch.equal(start[k], v) for k, v in store_snapshot().items())
    with torch.no_grad():
        after = estimator.loss(noise_model, guide, X, y)
    assert after < before - 10.0, (before, after)


def _delta_guide():
    guide = AutoGuideList(noise_model)
    guide.append(AutoNormal(poutine.block(noise_model, expose=["w"])))
    guide.append(AutoDelta(poutine.block(noise_model, expose=["s"])))
    return guide


def _route(routes, module_name, store_name):
    hits = [v for k, v in routes.items() if k in (module_name, store_name)]
    assert len(hits) == 1, (module_name, store_name, routes)
    return hits[0]


def test_guide_list_with_delta_routing(float64):
    X, y = _small_data()
    pyro.clear_param_store()
    guide = _delta_guide()
    guide(X, y)
    opt = NaturalGradient(guide)
    routes = opt.routing()
    store = pyro.get_param_store()
    for module_name, p in guide.named_parameters():
        where = _route(routes, module_name, store.param_name(p))
        if module_name.startswith("1."):
            assert where.startswith("base optimizer"), (module_name, where)
            assert "part 1 of the AutoGuideList, AutoDelta: not a guide" in where, where
        else:
            assert where.startswith("natural gradient"), (module_name, where)


def test_fallback_warning_names_parameters_as_routing_does(float64, rng):
    """The one warning names each base-optimizer parameter by its key in routing() (it
    named the AutoDelta part's by the param store's names, which routing() does not use)
    and says why; a model parameter is named as such."""
    X, y = _small_data()
    pyro.clear_param_store()
    guide = _delta_guide()

    def model(X, y):
        pyro.param("offset", torch.tensor(0.0))
        noise_model(X, y)

    opt = NaturalGradient(guide)
    with pytest.warns(NaturalGradientWarning, match="take Adam steps") as record:
        SVI(model, guide, opt, Trace_ELBO()).step(X, y)
    message = str(record[0].message)
    routes = opt.routing()
    base = [k for k, v in routes.items() if v.startswith("base optimizer")]
    assert sorted(base) == ["1.s_unconstrained", "offset"], routes
    assert "1.s_unconstrained (part 1 of the AutoGuideList, AutoDelta: not a guide" in message
    assert "offset (not the guide's: expected for model parameters)" in message, message


def test_lowrank_covariance_routing_says_why(float64):
    """Without the model's Hessian an AutoLowRankMultivariateNormal's covariance goes to
    the base optimizer, and routing() says why (it gave no reason); with it, the
    projection step owns it."""
    X, y = _small_data()
    for curvature, owned in (("none", False), ("auto", True)):
        pyro.clear_param_store()
        guide = AutoLowRankMultivariateNormal(noise_model, rank=2)
        guide(X, y)
        opt = NaturalGradient(guide, curvature=curvature)
        routes = opt.routing()
        for name in ("cov_factor", "scale_unconstrained"):
            if owned:
                assert routes[name] == "natural gradient (low-rank Gaussian, latent)", routes
            else:
                assert routes[name].startswith("base optimizer (Adam): site 'latent': a "
                                               "low-rank covariance"), routes


@pytest.mark.parametrize("base", ["default", "explicit"])
def test_guide_list_delta_params_take_adam_steps(float64, rng, base):
    X, y = _small_data()
    pyro.clear_param_store()
    guide = _delta_guide()
    guide(X, y)
    lr = 0.01 if base == "default" else 0.05
    kw = {} if base == "default" else {"base_optimizer": pyro.optim.Adam({"lr": lr})}
    opt = NaturalGradient(guide, **kw)
    reference = pyro.optim.Adam({"lr": lr})
    delta = {n: p for n, p in guide.named_parameters() if n.startswith("1.")}
    normal = {n: p for n, p in guide.named_parameters() if n.startswith("0.")}
    assert delta and normal
    shadow = {n: p.detach().clone().requires_grad_() for n, p in delta.items()}
    elbo = Trace_ELBO()
    for step in range(6):
        params = list(guide.parameters())
        for p in params:
            p.grad = None
        elbo.differentiable_loss(noise_model, guide, X, y).backward()
        for n in delta:
            shadow[n].grad = delta[n].grad.clone()
        before_normal = {n: p.detach().clone() for n, p in normal.items()}
        if step == 0:
            with pytest.warns(NaturalGradientWarning, match="1 parameter"):
                opt(params)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error", NaturalGradientWarning)  # warned once only
                opt(params)
        reference(list(shadow.values()))
        for n in delta:
            torch.testing.assert_close(delta[n].detach(), shadow[n].detach(), rtol=0, atol=1e-15)
        # the Gaussian part did take (natural-gradient) steps
        assert all(not torch.equal(before_normal[n], normal[n]) for n in normal)


def test_guide_without_supported_sites_is_adam_with_one_warning(float64, rng):
    """``AutoNormalMessenger`` samples ``TransformedDistribution`` sites, which have no
    closed-form Fisher here: every parameter takes the base optimizer's steps, exactly as
    ``pyro.optim.Adam`` on a copy takes them, and the one warning says why. (A second
    warning, that no draws were recorded, used to follow: true, but about groups that
    did not exist.)"""
    X, y = _small_data()
    pyro.clear_param_store()
    guide = AutoNormalMessenger(noise_model)
    guide(X, y)
    opt = NaturalGradient(guide)
    opt.read_guide(X, y)  # a messenger guide is read like a hand-written one
    reference = pyro.optim.Adam({"lr": 0.01})
    params = dict(guide.named_parameters())
    assert params
    shadow = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    elbo = Trace_ELBO()
    for step in range(4):
        for p in params.values():
            p.grad = None
        elbo.differentiable_loss(noise_model, guide, X, y).backward()
        for n, p in params.items():
            shadow[n].grad = p.grad.clone()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt(list(params.values()))
        ours = [str(w.message) for w in caught if issubclass(w.category, NaturalGradientWarning)]
        if step == 0:
            assert len(ours) == 1, ours
            assert "TransformedDistribution" in ours[0] and f"{len(params)} parameter" in ours[0]
        else:
            assert ours == []
        reference(list(shadow.values()))
        for n, p in params.items():
            torch.testing.assert_close(p.detach(), shadow[n].detach(), rtol=0, atol=1e-15)
    assert all(v.startswith("base optimizer") for v in opt.routing().values())


class _ShiftedAutoNormal(AutoNormal):
    """Samples ``Normal(loc + 1, 2 scale)``: not the distribution of its parameters."""

    def _get_loc_and_scale(self, name):
        loc, scale = super()._get_loc_and_scale(name)
        return loc + 1.0, 2.0 * scale


class _PositiveAutoNormal(AutoNormal):
    """Changes only the scale's constraint (``exp``), which the steps read."""

    scale_constraint = dist.constraints.positive


def test_autonormal_subclass_that_changes_its_distribution_is_not_stepped(float64, rng):
    """A subclass of ``AutoNormal`` whose ``_get_loc_and_scale`` shifts and widens the
    distribution used to take ``Normal(locs, scales)`` steps silently (100 steps ended 13
    sds off); its parameters take the base optimizer's steps after one warning that names
    the override. A subclass that changes only ``scale_constraint`` keeps its steps and
    reaches the exact mean-field optimum."""
    X, y = diabetes()
    guide = fresh(_ShiftedAutoNormal)
    opt = NaturalGradient(guide)
    svi = SVI(blr_model, guide, opt, Trace_ELBO())
    with pytest.warns(NaturalGradientWarning, match="overrides _get_loc_and_scale"):
        svi.step(X, y)
    routes = opt.routing()
    assert routes and all(v.startswith("base optimizer") for v in routes.values()), routes

    guide = fresh(_PositiveAutoNormal)
    svi = SVI(blr_model, guide, NaturalGradient(guide), Trace_ELBO())
    for _ in range(30):
        svi.step(X, y)
    assert_mean_field_optimum(*guide_moments(guide), X, y, rtol=1e-6)


# ----------------------------------------------------------------------------------------
# 4. non-finite gradients
# ----------------------------------------------------------------------------------------
def _loss_backward(model, guide, *args):
    for p in guide.parameters():
        p.grad = None
    Trace_ELBO().differentiable_loss(model, guide, *args).backward()


def test_unfactorisable_precision_update_is_skipped(float64, rng):
    """A curvature estimate so extreme that no precision update factorises in floating
    point (the iBLR retraction squares 1e300): the step function raises StepError,
    and the optimizer skips the step with a counting warning, parameters unchanged."""
    from pyro_natgrad import gaussian

    L = torch.eye(2, dtype=F64)
    target = torch.diag(torch.tensor([1e300, -1e300], dtype=F64))
    with pytest.raises(gaussian.StepError, match="not positive definite"):
        gaussian.full_gaussian_step(torch.zeros(2, dtype=F64), L, torch.ones(2, dtype=F64),
                                    None, 1.0, max_kl=None, precision_target=target)
    X, y = diabetes()
    guide = fresh(AutoMultivariateNormal)
    guide(X, y)
    opt = NaturalGradient(guide, curvature="none", max_kl=None)
    store = pyro.get_param_store()
    _loss_backward(blr_model, guide, X, y)
    dict(store.named_parameters())["AutoMultivariateNormal.scale"].grad.fill_(-1e300)
    before = store_snapshot()
    with pytest.warns(NaturalGradientWarning, match="1 skipped so far"):
        opt(store_params())
    after = store_snapshot()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_nan_gradient_skips_group_and_counts(float64, rng):
    X, y = diabetes()
    guide = fresh(AutoNormal)
    guide(X, y)
    opt = NaturalGradient(guide, curvature="none")
    store = pyro.get_param_store()
    w_names = {"AutoNormal.locs.w", "AutoNormal.scales.w"}
    b_names = {"AutoNormal.locs.b", "AutoNormal.scales.b"}
    assert w_names | b_names == set(store.keys())
    for count in (1, 2):
        _loss_backward(blr_model, guide, X, y)
        dict(store.named_parameters())["AutoNormal.locs.w"].grad[1] = float("nan")
        before = store_snapshot()
        with pytest.warns(NaturalGradientWarning) as record:
            opt(store_params())
        messages = [str(r.message) for r in record]
        assert any(re.search(rf"\b{count} skipped", m) for m in messages), messages
        after = store_snapshot()
        for k in w_names:
            assert torch.equal(before[k], after[k])  # bitwise unchanged
        for k in b_names:
            assert not torch.equal(before[k], after[k])  # the healthy group still steps
        assert opt.get_state()["skipped"] == count


def test_persistent_nan_gradients_warn_at_doubling_counts_and_name_every_group(float64, rng):
    """Gradients that stay non-finite (both AutoNormal groups, w and b, every step) once
    warned at every skip, 2 warnings a step for as long as the run lasted: the count in
    the text defeats Python's once-per-message filter. Now each group is named at its
    first skip and later skips warn only when the count reaches a power of two."""
    X, y = diabetes()
    guide = fresh(AutoNormal)
    guide(X, y)
    opt = NaturalGradient(guide, curvature="none")
    steps = 20
    messages = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")  # Python's own filter, as a user's script has it
        for _ in range(steps):
            _loss_backward(blr_model, guide, X, y)
            for p in guide.parameters():
                p.grad.view(-1)[0] = float("nan")
            opt(store_params())
        messages = [str(r.message) for r in record
                    if issubclass(r.category, NaturalGradientWarning) and "skipped" in str(r)]
    assert opt.get_state()["skipped"] == 2 * steps
    counts = [int(re.search(r"\b(\d+) skipped so far", m).group(1)) for m in messages]
    # both groups at their first skip (counts 1, 2), then 4, 8, 16, 32
    assert counts == [1, 2, 4, 8, 16, 32], messages
    assert {m.split(":")[0] for m in messages[:2]} == {
        "non-finite gradient for w", "non-finite gradient for b"}, messages


def test_nan_gradient_of_base_optimizer_params_never_reaches_the_store(float64, rng):
    """Parameters that the base optimizer steps (a model parameter; a low-rank guide's
    covariance factors without model curvature) once took Adam steps with a non-finite
    gradient, writing NaN into the param store under a warning that said nothing changed."""
    X, y = _small_data()
    guide = fresh(AutoLowRankMultivariateNormal, ckpt_model)
    opt = NaturalGradient(guide, curvature="none")
    svi = SVI(ckpt_model, guide, opt, Trace_ELBO())
    _run(svi, 2, X, y)
    _loss_backward(ckpt_model, guide, X, y)
    named = dict(pyro.get_param_store().named_parameters())
    bad = ["b", "AutoLowRankMultivariateNormal.cov_factor"]
    for name in bad:
        named[name].grad.view(-1)[0] = float("nan")
    before = store_snapshot()
    with pytest.warns(NaturalGradientWarning, match=r"non-finite gradient for 2 parameter\(s\) "
                                                    r"of Adam: .*1 skipped so far"):
        opt(store_params())
    after = store_snapshot()
    for name in bad:
        assert torch.equal(before[name], after[name]), name
    assert all(bool(torch.isfinite(v).all()) for v in after.values())
    # the healthy ones still step
    assert not torch.equal(before["AutoLowRankMultivariateNormal.scale"],
                           after["AutoLowRankMultivariateNormal.scale"])
    assert opt.get_state()["skipped"] == 1


@pytest.mark.parametrize("guide_cls", [AutoMultivariateNormal, AutoNormal,
                                       AutoLowRankMultivariateNormal])
def test_nan_gradient_default_curvature(float64, rng, guide_cls):
    X, y = diabetes()
    guide = fresh(guide_cls)
    opt = NaturalGradient(guide)
    svi = SVI(blr_model, guide, opt, Trace_ELBO())
    svi.step(X, y)
    for count in (1, 2):
        _loss_backward(blr_model, guide, X, y)
        p = store_params()[-1]
        p.grad.view(-1)[0] = float("inf")
        before = store_snapshot()
        with pytest.warns(NaturalGradientWarning) as record:
            opt(store_params())
        messages = [str(r.message) for r in record]
        assert any(re.search(rf"\b{count} skipped", m) for m in messages), messages
        after = store_snapshot()
        # the group with the bad gradient is unchanged, bit for bit
        name = pyro.get_param_store().param_name(p)
        assert torch.equal(before[name], after[name])
        for k in before:
            assert bool(torch.isfinite(after[k]).all())
    # and the optimizer still works afterwards, once the bad gradients are gone (SVI
    # zeroes gradients only after its own steps)
    for q in store_params():
        q.grad = None
    before = store_snapshot()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NaturalGradientWarning)
        svi.step(X, y)
    after = store_snapshot()
    assert all(bool(torch.isfinite(v).all()) for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert opt.get_state()["skipped"] == 2


# ----------------------------------------------------------------------------------------
# 5. checkpoint / resume
# ----------------------------------------------------------------------------------------
def ckpt_model(X, y):
    """Non-conjugate (unknown noise) plus a model parameter (goes to Adam), so that the
    optimizer's state (step counts, running precision, Adam moments) matters."""
    d = X.shape[-1]
    w = pyro.sample("w", dist.Normal(X.new_zeros(d), 1.0).to_event(1))
    s = pyro.sample("s", dist.LogNormal(X.new_zeros(()), 0.5))
    b = pyro.param("b", X.new_zeros(()))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal((X * w).sum(-1) + b, s), obs=y)


def _run(svi, n, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NaturalGradientWarning)  # b goes to Adam
        for _ in range(n):
            svi.step(X, y)


def _mean_field_list(model, first=AutoNormal):
    guide = AutoGuideList(model)
    guide.append(first(poutine.block(model, expose=["w"])))
    guide.append(AutoDiagonalNormal(poutine.block(model, expose=["s"])))
    return guide


def _resume(guide_cls, X, y, param_state, optim_state, rng_state, model=ckpt_model,
            **options):
    """What a user does in a new process. The param store is restored *before* the guide
    is set up: Pyro's AutoContinuous guides keep ``loc`` as a plain nn.Parameter that only
    reads the store when it is created, so restoring afterwards would not reach it."""
    pyro.clear_param_store()
    # a copy: Pyro's param store takes over the given tensors and steps change them
    pyro.get_param_store().set_state(copy.deepcopy(param_state))
    guide = guide_cls(model)
    guide(X, y)  # set up the guide's structure (uses the RNG: before restoring it)
    opt = NaturalGradient(guide, **options)
    if optim_state is not None:
        opt.set_state(optim_state)
    set_rng_state(rng_state)
    return guide, SVI(model, guide, opt, Trace_ELBO())


def ckpt_model_log_concave(X, y):
    """As :func:`ckpt_model` with the noise known: ``curvature="hvp"`` falls back to
    gradient-only steps where the Hessian is indefinite, as it is for the unknown noise
    far from the mode, and its state must be exercised."""
    d = X.shape[-1]
    w = pyro.sample("w", dist.Normal(X.new_zeros(d), 1.0).to_event(1))
    b = pyro.param("b", X.new_zeros(()))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal((X * w).sum(-1) + b, 0.5), obs=y)


@pytest.mark.parametrize("guide_cls, options, model", [
    (AutoNormal, {}, ckpt_model), (AutoMultivariateNormal, {}, ckpt_model),
    (AutoLowRankMultivariateNormal, {}, ckpt_model),
    (AutoNormal, {"curvature": "hvp"}, ckpt_model_log_concave),
    # the fused step from gradients alone, whose first resumed step once computed the
    # guide's scale itself (not yet recorded) and rounded differently
    (AutoNormal, {"curvature": "none"}, ckpt_model),
    # the joint Hessian step over a list's parts (their draws merged per call)
    (lambda model: _mean_field_list(model), {}, ckpt_model),
    (lambda model: _mean_field_list(model, AutoMultivariateNormal), {}, ckpt_model),
], ids=["AutoNormal", "AutoMultivariateNormal", "AutoLowRankMultivariateNormal", "hvp",
        "AutoNormal-none", "AutoGuideList", "AutoGuideList-full-rank"])
def test_checkpoint_resume_bitwise(float64, rng, tmp_path, guide_cls, options, model):
    """Resumed from a checkpoint, in memory (twice from one snapshot: set_state took
    over its tensors, which steps change in place) and via files, the run continues
    bit for bit."""
    X, y = _small_data()
    guide = fresh(guide_cls, model)
    opt = NaturalGradient(guide, **options)
    svi = SVI(model, guide, opt, Trace_ELBO())
    _run(svi, 10, X, y)
    param_state = copy.deepcopy(pyro.get_param_store().get_state())
    optim_state = copy.deepcopy(opt.get_state())
    if options.get("curvature") == "hvp":  # its Newton steps' state is in the checkpoint
        assert "hessian_weight" in optim_state["natural_gradient"]["curvature"]
    if isinstance(guide, AutoGuideList):  # the running precision of the Hessian steps
        assert "precision" in optim_state["natural_gradient"]["curvature"]
    rng_state = rng_state_now()
    pyro.get_param_store().save(tmp_path / "params.pt")
    opt.save(tmp_path / "optim.pt")
    torch.save(rng_state, tmp_path / "rng.pt")
    _run(svi, 10, X, y)
    expected = store_snapshot()
    assert all(bool(torch.isfinite(v).all()) for v in expected.values())

    # in memory, twice from the same snapshot
    snapshot = copy.deepcopy(optim_state)
    for _ in range(2):
        guide, svi = _resume(guide_cls, X, y, param_state, optim_state, rng_state, model,
                             **options)
        _run(svi, 10, X, y)
        got = store_snapshot()
        assert got.keys() == expected.keys()
        for k in expected:
            assert torch.equal(got[k], expected[k]), k
    for key, value in snapshot["natural_gradient"].items():
        for k, v in value.items():
            same = torch.equal(v, optim_state["natural_gradient"][key][k]) \
                if torch.is_tensor(v) else v == optim_state["natural_gradient"][key][k]
            assert same, (key, k)

    # via files, and with the optimizer built before the guide's set-up call, whose draws
    # it records (they once took the place of the first resumed step's own)
    pyro.clear_param_store()
    pyro.get_param_store().load(tmp_path / "params.pt")
    guide = guide_cls(model)
    opt = NaturalGradient(guide, **options)
    opt.load(tmp_path / "optim.pt")
    guide(X, y)
    set_rng_state(torch.load(tmp_path / "rng.pt"))
    svi = SVI(model, guide, opt, Trace_ELBO())
    _run(svi, 10, X, y)
    got = store_snapshot()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k

    # the test can fail: without the optimizer's state the continuation differs
    guide, svi = _resume(guide_cls, X, y, param_state, None, rng_state, model, **options)
    _run(svi, 10, X, y)
    got = store_snapshot()
    assert any(not torch.equal(got[k], expected[k]) for k in expected)


def test_routing_lists_model_parameters_and_checkpoints_are_copies(float64, rng):
    """routing() names the model's parameters that go to the base optimizer (they were
    missing), and get_state() is a snapshot: the base optimizer's moments in it do not
    change with later steps (they were its live tensors)."""
    X, y = _small_data()
    guide = fresh(AutoNormal, ckpt_model)
    opt = NaturalGradient(guide)
    svi = SVI(ckpt_model, guide, opt, Trace_ELBO())
    _run(svi, 2, X, y)
    assert opt.routing()["b"] == "base optimizer (Adam)"
    state = opt.get_state()
    frozen = copy.deepcopy(state)
    _run(svi, 2, X, y)
    adam_b = state["base"]["b"]["state"][0]
    assert torch.equal(adam_b["exp_avg"], frozen["base"]["b"]["state"][0]["exp_avg"])
    assert not torch.equal(adam_b["exp_avg"], opt.get_state()["base"]["b"]["state"][0]["exp_avg"])


def test_second_optimizer_on_the_same_guide(float64, rng):
    """A new optimizer for a guide that an earlier one hooked: both recorders trace each
    call (this raised "This Messenger is not on the bottom of the stack" when their
    traces closed in the order they opened), and a discarded optimizer's hooks go."""
    import gc

    X, y = diabetes()
    guide = fresh(AutoMultivariateNormal)
    first = NaturalGradient(guide)
    SVI(blr_model, guide, first, Trace_ELBO()).step(X, y)
    svi = SVI(blr_model, guide, NaturalGradient(guide), Trace_ELBO())
    for _ in range(30):
        assert math.isfinite(svi.step(X, y))
    assert_reached(guide, X, y, rtol=1e-6)
    hooks = len(guide._forward_hooks)
    del first
    gc.collect()
    svi.step(X, y)
    assert len(guide._forward_hooks) == hooks - 1


@pytest.mark.parametrize("source,target", [
    (AutoNormal, AutoNormal), (AutoMultivariateNormal, AutoMultivariateNormal),
    (AutoNormal, AutoMultivariateNormal)])
@pytest.mark.parametrize("when", ["after the first step", "before the first step"])
def test_a_checkpoint_of_another_guide_is_refused(float64, rng, source, target, when):
    """A checkpoint made for a 10-weight guide, loaded into the optimizer of a 4-weight
    one. It used to be taken as it was: a shape error deep inside a later step, or, for a
    full-rank guide, no error and a foreign step clock (the mean 1.6 sds off where a fresh
    optimizer is exact). Refused with a ValueError naming the difference, here or at the
    first step, and nothing of it is used: the optimizer's state (or the parameters, at
    the first step) stay as they were."""
    X, y = diabetes()
    guide = fresh(source)
    opt = NaturalGradient(guide)
    _run(SVI(ckpt_model, guide, opt, Trace_ELBO()), 5, X, y)
    checkpoint = opt.get_state()

    X, y = X[:, :4], y
    guide = fresh(target)
    opt = NaturalGradient(guide)
    svi = SVI(ckpt_model, guide, opt, Trace_ELBO())
    if when == "after the first step":
        _run(svi, 1, X, y)
        before = opt.get_state()
        with pytest.raises(ValueError, match="made for another guide"):
            opt.set_state(checkpoint)
        after = opt.get_state()
        assert after["natural_gradient"].keys() == before["natural_gradient"].keys()
        for key, value in before["natural_gradient"].items():
            for k, v in value.items():
                assert torch.equal(torch.as_tensor(after["natural_gradient"][key][k]),
                                   torch.as_tensor(v)), (key, k)
    else:
        guide(X, y)  # the parameters exist, the optimizer has not read the guide
        params = store_snapshot()
        opt.set_state(checkpoint)
        with pytest.raises(ValueError, match="made for another guide"):
            svi.step(X, y)
        now = store_snapshot()
        for name, value in params.items():
            assert torch.equal(now[name], value), name


def test_set_state_in_place_restores_running_precision(float64, rng):
    """Roll back by copying saved values into the same parameter tensors (nothing for
    the optimizer to rediscover) and set_state: the continuation equals the first one,
    so the curvature state (the running precision of the mean-field Newton step) is
    restored too, not only the groups' step counts."""
    X, y = diabetes()
    guide = fresh(AutoNormal)
    opt = NaturalGradient(guide)
    svi = SVI(blr_model, guide, opt, Trace_ELBO())
    for _ in range(3):
        svi.step(X, y)
    saved = {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}
    optim_state = copy.deepcopy(opt.get_state())
    assert "precision" in optim_state["natural_gradient"]["curvature"]
    rng_state = rng_state_now()
    for _ in range(3):
        svi.step(X, y)
    expected = store_snapshot()
    with torch.no_grad():
        for k, v in pyro.get_param_store().named_parameters():
            v.copy_(saved[k])
    opt.set_state(copy.deepcopy(optim_state))
    set_rng_state(rng_state)
    for _ in range(3):
        svi.step(X, y)
    got = store_snapshot()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def _checkpointed_run(before, after, X, y):
    """An AutoNormal run of ``ckpt_model``: ``before`` steps, a checkpoint, ``after``
    more. Returns ``(svi, param state, optimizer state, RNG state, parameters at the
    end)``."""
    guide = fresh(AutoNormal, ckpt_model)
    opt = NaturalGradient(guide)
    svi = SVI(ckpt_model, guide, opt, Trace_ELBO())
    _run(svi, before, X, y)
    param_state = copy.deepcopy(pyro.get_param_store().get_state())
    optim_state = copy.deepcopy(opt.get_state())
    rng_state = rng_state_now()
    _run(svi, after, X, y)
    return svi, param_state, optim_state, rng_state, store_snapshot()


@pytest.mark.parametrize("at", [0, 3])
def test_set_state_in_place_replaces_the_whole_state(float64, rng, at):
    """Roll back in place to a checkpoint of step ``at`` (0: before any step, when the
    optimizer's state is empty), with a model parameter ``b`` that takes Adam steps: the
    continuation equals the first one, bit for bit. ``set_state`` used to merge into the
    live state (the running precision and clocks of later steps survived a rollback to
    step 0) and Pyro's ``set_state`` reaches no parameter its optimizer has stepped (Adam
    kept ``b``'s live moments)."""
    X, y = _small_data()
    guide = fresh(AutoNormal, ckpt_model)
    guide(X, y)
    pyro.param("b", X.new_zeros(()))  # as the model makes it, so step 0 has it
    opt = NaturalGradient(guide)
    svi = SVI(ckpt_model, guide, opt, Trace_ELBO())
    _run(svi, at, X, y)
    saved = store_snapshot()
    optim_state = copy.deepcopy(opt.get_state())
    rng_state = rng_state_now()
    _run(svi, 3, X, y)
    expected = store_snapshot()
    with torch.no_grad():
        for k, v in pyro.get_param_store().named_parameters():
            v.copy_(saved[k])
    opt.set_state(optim_state)
    set_rng_state(rng_state)
    _run(svi, 3, X, y)
    got = store_snapshot()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_a_checkpoint_saved_before_its_first_use_is_the_same_checkpoint(float64, rng):
    """Resumed (``set_state`` before the first step), then saved again at once, as a loop
    that checkpoints at the top of each iteration does: the second checkpoint was empty
    (the state waiting for the guide to be read was left out), and a run resumed from it
    differed. Now it resumes bit for bit, like the first."""
    X, y = _small_data()
    _, param_state, optim_state, rng_state, expected = _checkpointed_run(4, 3, X, y)

    _, svi = _resume(AutoNormal, X, y, param_state, optim_state, rng_state)
    again = copy.deepcopy(svi.optim.get_state())  # before the first step
    assert again["natural_gradient"].keys() == optim_state["natural_gradient"].keys()
    assert again["base"].keys() == optim_state["base"].keys() == {"b"}
    _, svi = _resume(AutoNormal, X, y, param_state, again, rng_state)
    _run(svi, 3, X, y)
    got = store_snapshot()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_a_refused_checkpoint_leaves_a_working_optimizer(float64, rng):
    """A checkpoint of another guide, refused at the first step: the step after it used to
    raise a KeyError (the groups were kept, their states not). It now steps as a fresh
    optimizer does, bit for bit (the refused step's gradients dropped, which SVI, whose
    step raised, could not)."""
    X, y = diabetes()
    guide = fresh(AutoNormal, ckpt_model)
    opt = NaturalGradient(guide)
    _run(SVI(ckpt_model, guide, opt, Trace_ELBO()), 2, X, y)
    checkpoint = opt.get_state()
    X = X[:, :4]
    results = []
    for refused in (True, False):
        guide = fresh(AutoNormal, ckpt_model)
        guide(X, y)
        opt = NaturalGradient(guide)
        svi = SVI(ckpt_model, guide, opt, Trace_ELBO())
        if refused:
            opt.set_state(checkpoint)
            with pytest.raises(ValueError, match="made for another guide"):
                svi.step(X, y)
        pyro.set_rng_seed(7)
        _run(svi, 2, X, y)
        results.append(store_snapshot())
    for k in results[1]:
        assert torch.equal(results[0][k], results[1][k]), k


def test_a_base_optimizer_state_of_other_shapes_is_refused(float64, rng):
    """A checkpoint whose natural-gradient groups fit but whose Adam state is for a ``b``
    of another shape: accepted, then the next step raised inside Adam after the
    natural-gradient groups had been written. Refused now by ``set_state``, with nothing
    restored."""
    X, y = _small_data()

    def model_with(shape):
        def model(X, y):
            w = pyro.sample("w", dist.Normal(X.new_zeros(3), 1.0).to_event(1))
            b = pyro.param("b", X.new_zeros(shape))
            with pyro.plate("data", X.shape[0]):
                pyro.sample("y", dist.Normal((X * w).sum(-1) + b.sum(), 0.5), obs=y)
        return model

    checkpoints = []
    for shape in ((2,), ()):
        guide = fresh(AutoNormal, model_with(shape))
        opt = NaturalGradient(guide)
        _run(SVI(model_with(shape), guide, opt, Trace_ELBO()), 2, X, y)
        checkpoints.append(opt.get_state())
    assert checkpoints[0]["base_shapes"] == {"b": (2,)}
    before = copy.deepcopy(opt.get_state())
    with pytest.raises(ValueError, match=r"'b' has shape \(2,\) there and \(\) here"):
        opt.set_state(checkpoints[0])
    after = opt.get_state()
    assert after["base"]["b"]["state"][0]["exp_avg"].shape == ()
    assert after["natural_gradient"].keys() == before["natural_gradient"].keys()
    for key, value in before["natural_gradient"].items():
        for k, v in value.items():
            assert torch.equal(torch.as_tensor(after["natural_gradient"][key][k]),
                               torch.as_tensor(v)), (key, k)


def test_get_state_refuses_base_parameters_without_a_name(float64, rng):
    """Under ``module_local_params=True`` a ``PyroModule`` model's own parameters are not
    in the param store: Pyro's ``get_state`` keyed all their Adam states ``None``, one
    overwriting the other, and the resumed run failed inside Adam. ``get_state`` now
    refuses, saying why and what to do; without such parameters it works as before."""
    from pyro.nn import PyroModule, PyroParam

    X, y = _small_data()

    class Model(PyroModule):
        def __init__(self, with_params):
            super().__init__()
            if with_params:
                self.b = PyroParam(X.new_zeros(()))
                self.c = PyroParam(X.new_zeros(2))
            self.with_params = with_params

        def forward(self, X, y):
            w = pyro.sample("w", dist.Normal(X.new_zeros(3), 1.0).to_event(1))
            shift = self.b + self.c.sum() if self.with_params else 0.0
            with pyro.plate("data", X.shape[0]):
                pyro.sample("y", dist.Normal((X * w).sum(-1) + shift, 0.5), obs=y)

    with pyro.settings.context(module_local_params=True):
        for with_params in (True, False):
            model = Model(with_params)
            guide = AutoNormal(model)
            opt = NaturalGradient(guide)
            _run(SVI(model, guide, opt, Trace_ELBO()), 2, X, y)
            if with_params:
                with pytest.raises(ValueError, match="no name in the param store"):
                    opt.get_state()
            else:
                assert "w" in opt.get_state()["natural_gradient"]


def test_rollback_param_store_in_same_process(float64, rng):
    """Load a saved param store into the *same* AutoNormal guide and optimizer (roll
    back): the Gaussian params must keep natural-gradient steps and the continuation must
    equal the first continuation from the checkpoint. (It once did not: the running
    precision of the curvature state was not restored into a live optimizer.)"""
    X, y = _small_data()
    svi, param_state, optim_state, rng_state, expected = _checkpointed_run(5, 5, X, y)
    pyro.get_param_store().set_state(copy.deepcopy(param_state))
    svi.optim.set_state(copy.deepcopy(optim_state))
    set_rng_state(rng_state)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", NaturalGradientWarning)
        for _ in range(5):
            svi.step(X, y)
    fallbacks = [str(r.message) for r in record if "AutoNormal" in str(r.message)]
    assert not fallbacks, fallbacks
    got = store_snapshot()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


# ----------------------------------------------------------------------------------------
# 6. Pyro integration. max_kl=None: the exactness checks are then sharp (1e-6); the
# default trust region makes the comparison blunter.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_name", ["TraceGraph_ELBO", "TraceMeanField_ELBO", "particles4",
                                       "vectorized4"])
@pytest.mark.parametrize("guide_cls", [AutoMultivariateNormal, AutoNormal])
def test_other_elbos_reach_exact_optimum(float64, rng, loss_name, guide_cls):
    X, y = diabetes()
    loss = {
        "TraceGraph_ELBO": lambda: TraceGraph_ELBO(),
        # An autoguide's sites are Deltas at its draws, so Pyro estimates their KL from
        # the draw as Trace_ELBO does (test_handwritten has the closed-form KL).
        "TraceMeanField_ELBO": lambda: TraceMeanField_ELBO(),
        "particles4": lambda: Trace_ELBO(num_particles=4),
        "vectorized4": lambda: Trace_ELBO(num_particles=4, vectorize_particles=True,
                                          max_plate_nesting=1),
    }[loss_name]()
    guide = fresh(guide_cls)
    svi = SVI(blr_model, guide, NaturalGradient(guide, max_kl=None), loss)
    for _ in range(10):
        assert math.isfinite(svi.step(X, y))
    assert_reached(guide, X, y, rtol=1e-6)


def test_vectorized_particles_model_broadcasts(float64, rng):
    """Self-check of the test model: the vectorised and sequential ELBO estimates agree."""
    X, y = diabetes()
    guide = fresh(AutoNormal)
    guide(X, y)
    n = 2000
    with torch.no_grad():
        a = Trace_ELBO(num_particles=n, vectorize_particles=True,
                       max_plate_nesting=1).loss(blr_model, guide, X, y)
        m, L = guide_moments(guide)
        exact = -float(exact_elbo(m, L, X, y))
    assert abs(a - exact) < 0.05 * abs(exact), (a, exact)


@pytest.mark.parametrize("guide_cls", [AutoMultivariateNormal, AutoNormal, AutoDiagonalNormal])
def test_jit_elbo_reaches_the_exact_optimum_as_trace_elbo_does(float64, rng, guide_cls):
    """JitTrace_ELBO's compiled graph runs no hooks, so the optimizer replays the guide
    from the random state and the gradients confirm the draw: the steps keep the control
    variate and the model's Hessian, and land on the exact optimum as under Trace_ELBO
    (30 steps, as test_svi_default_settings_reach_exact_optimum). Without the replay the
    steps were gradient-only: the AutoMultivariateNormal mean was still 0.2 posterior sds
    off after 300 steps of a 3-weight regression."""
    X, y = diabetes()
    guide = fresh(guide_cls)
    svi = SVI(blr_model, guide, NaturalGradient(guide),
              JitTrace_ELBO(ignore_jit_warnings=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("error", NaturalGradientWarning)
        for _ in range(30):
            assert math.isfinite(svi.step(X, y))
    assert_reached(guide, X, y, rtol=1e-6)


def test_jit_elbo_with_draws_between_steps_keeps_the_curvature(float64, rng):
    """A random draw in the loop between steps makes the replayed draw another one than
    the gradients': the check rejects it (one warning), and the step takes the model's
    Hessian there without the control variate. The covariance is then exact (the Hessian
    is constant here) and the mean within the noise of a decaying step."""
    X, y = diabetes()
    guide = fresh(AutoMultivariateNormal)
    svi = SVI(blr_model, guide, NaturalGradient(guide),
              JitTrace_ELBO(ignore_jit_warnings=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("always", NaturalGradientWarning)
        for _ in range(100):
            torch.rand(())  # e.g. a minibatch index drawn by the training loop
            svi.step(X, y)
    ours = [w for w in caught if issubclass(w.category, NaturalGradientWarning)]
    assert len(ours) == 1 and "could not be recovered" in str(ours[0].message)
    mu, Sigma, _, _ = exact_posterior(X, y)
    with torch.no_grad():
        m, L = guide_moments(guide)
    torch.testing.assert_close(L @ L.T, Sigma, rtol=1e-6, atol=1e-6 * Sigma.abs().max())
    assert float(((m.detach() - mu) / Sigma.diagonal().sqrt()).abs().max()) < 0.5


def test_module_local_params_svi(float64, rng):
    """AutoNormal through SVI. (Pyro 1.9.2's SVI cannot run AutoContinuous guides with
    module-local params at all -- 'Parameter' object has no attribute 'unconstrained',
    with pyro.optim.Adam too -- so those are tested with a hand-written loop below.)"""
    X, y = diabetes()
    pyro.clear_param_store()
    with pyro.settings.context(module_local_params=True):
        guide = AutoNormal(blr_model)
        svi = SVI(blr_model, guide, NaturalGradient(guide, max_kl=None), Trace_ELBO())
        with warnings.catch_warnings():
            warnings.simplefilter("error", NaturalGradientWarning)
            for _ in range(10):
                assert math.isfinite(svi.step(X, y))
        assert len(pyro.get_param_store()) == 0
        assert_reached(guide, X, y, rtol=1e-6)


@pytest.mark.parametrize("guide_cls", [AutoMultivariateNormal, AutoDiagonalNormal])
def test_module_local_params_manual_loop(float64, rng, guide_cls):
    X, y = diabetes()
    pyro.clear_param_store()
    with pyro.settings.context(module_local_params=True):
        guide = guide_cls(blr_model)
        guide(X, y)
        opt = NaturalGradient(guide, max_kl=None)
        with warnings.catch_warnings():
            warnings.simplefilter("error", NaturalGradientWarning)
            for _ in range(10):
                _loss_backward(blr_model, guide, X, y)
                opt(list(guide.parameters()))
        assert len(pyro.get_param_store()) == 0
        assert_reached(guide, X, y, rtol=1e-6)


@pytest.mark.parametrize("guide_cls", [AutoMultivariateNormal, AutoNormal])
def test_a_validation_loss_before_the_step_does_not_change_its_curvature(float64, rng,
                                                                         guide_cls):
    """A custom loop: ``backward()``, a validation loss on other data, then the step. The
    model's Hessian is evaluated at the step's own draws, and must be of the model with
    the step's own arguments: it took those of the last guide call (the validation
    loss's), and the full-rank guide ended with its covariance 23-fold off the exact
    posterior's (no warning)."""
    X, y = diabetes()
    X_val, y_val = X[:40] * 2, y[:40]
    guide = fresh(guide_cls)
    opt = NaturalGradient(guide)
    elbo = Trace_ELBO()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NaturalGradientWarning)
        for _ in range(30):
            with poutine.trace(param_only=True) as tr:
                elbo.differentiable_loss(blr_model, guide, X, y).backward()
            elbo.loss(blr_model, guide, X_val, y_val)
            params = {site["value"].unconstrained() for site in tr.trace.nodes.values()}
            opt(params)
            pyro.infer.util.zero_grads(params)
    assert_reached(guide, X, y, rtol=1e-6)


def test_gradients_accumulated_over_batches_step_without_the_hessian(float64, rng):
    """Gradients accumulated over two batches before one step: each batch's draw has its
    own data, and one Hessian of one batch's model would be wrong for the other, so the
    step is taken from gradients alone, with one warning. Two calls with the same data
    (sequential particles) keep the Hessian, silently."""
    X, y = diabetes()
    halves = [(X[:221], y[:221]), (X[221:], y[221:])]
    guide = fresh(AutoMultivariateNormal)
    opt = NaturalGradient(guide)

    def step(batches, elbo=Trace_ELBO()):
        with poutine.trace(param_only=True) as tr:
            for Xb, yb in batches:
                elbo.differentiable_loss(blr_model, guide, Xb, yb).backward()
        params = {site["value"].unconstrained() for site in tr.trace.nodes.values()}
        opt(params)
        pyro.infer.util.zero_grads(params)

    with warnings.catch_warnings():
        warnings.simplefilter("error", NaturalGradientWarning)
        for _ in range(30):  # two guide calls with the same data: the Hessian's exact steps
            step([(X, y)], Trace_ELBO(num_particles=2))
    assert_reached(guide, X, y, rtol=1e-6)
    with pytest.warns(NaturalGradientWarning, match="different arguments"):
        step(halves)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NaturalGradientWarning)  # warned once
        step(halves)


# ---- minibatch SVI with local latents ---------------------------------------------------
N_LOCAL, BATCH, TAU_Z, SIGMA_Z, TAU_MU = 20, 5, 1.0, 0.5, 10.0


def hier_model(y, idx):
    mu = pyro.sample("mu", dist.Normal(y.new_zeros(()), TAU_MU))
    with pyro.plate("data", N_LOCAL, subsample=idx) as ind:
        z = pyro.sample("z", dist.Normal(mu, TAU_Z))
        pyro.sample("y", dist.Normal(z, SIGMA_Z), obs=y[ind])


def hier_plates(y, idx):
    return pyro.plate("data", N_LOCAL, subsample=idx)


def hier_exact(y):
    """Joint posterior precision and mean over theta = (mu, z_1..z_N)."""
    n = N_LOCAL
    Lam = torch.zeros(n + 1, n + 1, dtype=F64)
    Lam[0, 0] = TAU_MU ** -2 + n / TAU_Z ** 2
    Lam[0, 1:] = Lam[1:, 0] = -1 / TAU_Z ** 2
    Lam[1:, 1:] = torch.eye(n, dtype=F64) * (1 / TAU_Z ** 2 + 1 / SIGMA_Z ** 2)
    h = torch.cat([y.new_zeros(1), y / SIGMA_Z ** 2])
    return Lam, torch.linalg.solve(Lam, h)


def _hier_data():
    gen = generator(11)
    z = 2.0 + TAU_Z * torch.randn(N_LOCAL, generator=gen, dtype=F64)
    return z + SIGMA_Z * torch.randn(N_LOCAL, generator=gen, dtype=F64)


def test_hier_exact_self_check(float64):
    """The test's joint precision equals minus the autograd Hessian of the log joint."""
    y = _hier_data()

    def log_joint(theta):
        mu, z = theta[0], theta[1:]
        return (dist.Normal(0.0, TAU_MU).log_prob(mu) + dist.Normal(mu, TAU_Z).log_prob(z).sum()
                + dist.Normal(z, SIGMA_Z).log_prob(y).sum())

    Lam, mean = hier_exact(y)
    H = torch.autograd.functional.hessian(log_joint, torch.zeros(N_LOCAL + 1, dtype=F64))
    torch.testing.assert_close(-H, Lam)
    g = torch.autograd.functional.jacobian(log_joint, mean)
    assert float(g.abs().max()) < 1e-10


def test_minibatch_step_touches_only_subsample(float64, rng):
    y = _hier_data()
    pyro.clear_param_store()
    guide = AutoNormal(hier_model, create_plates=hier_plates)
    opt = NaturalGradient(guide)
    svi = SVI(hier_model, guide, opt, Trace_ELBO())
    store = pyro.get_param_store()
    svi.step(y, torch.arange(BATCH))
    assert set(store.keys()) == {"AutoNormal.locs.mu", "AutoNormal.scales.mu",
                                 "AutoNormal.locs.z", "AutoNormal.scales.z"}
    for step in range(4):
        idx = torch.randperm(N_LOCAL)[:BATCH]
        before = store_snapshot()
        svi.step(y, idx)
        after = store_snapshot()
        outside = torch.ones(N_LOCAL, dtype=torch.bool)
        outside[idx] = False
        for k in ("AutoNormal.locs.z", "AutoNormal.scales.z"):
            assert before[k].shape == (N_LOCAL,)
            assert torch.equal(before[k][outside], after[k][outside]), k
            assert bool((before[k][idx] != after[k][idx]).all()), (k, step)
        assert not torch.equal(before["AutoNormal.locs.mu"], after["AutoNormal.locs.mu"])


def test_minibatch_first_visit_exact_with_exact_gradients(float64):
    """Subsampled locals, exact gradients set by hand (Pyro scales the subsampled terms
    by N/B): a step with rho = 1 puts each visited z_i on its exact conditional optimum
    given q(mu): precision 1/tau^2 + 1/sigma^2, mean (m_mu/tau^2 + y_i/sigma^2)/that."""
    y = _hier_data()
    pyro.clear_param_store()
    guide = AutoNormal(hier_model, create_plates=hier_plates)
    idx = torch.tensor([3, 7, 8, 15, 19])
    guide(y, idx)
    perturb(guide, 5)
    opt = NaturalGradient(guide, step_size=1.0, max_kl=None, control_variate=False,
                          curvature="none")
    params = store_params()
    locs_z, scales_z = guide.locs.z, guide.scales.z
    m_mu, s_mu = guide.locs.mu, guide.scales.mu
    P = 1 / TAU_Z ** 2 + 1 / SIGMA_Z ** 2
    c = N_LOCAL / BATCH
    # -ELBO terms that involve z_idx (expectations in closed form), scaled by N/B
    mz, sz = locs_z[idx], scales_z[idx]
    e_prior = ((mz - m_mu).square() + sz.square() + s_mu.square()) / (2 * TAU_Z ** 2)
    e_lik = ((y[idx] - mz).square() + sz.square()) / (2 * SIGMA_Z ** 2)
    loss = c * (e_prior + e_lik - torch.log(sz)).sum()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for p, g in zip(params, grads):
        p.grad = torch.zeros_like(p) if g is None else g
    m_mu0 = m_mu.detach().clone()  # may be the parameter itself
    before = store_snapshot()
    opt(params)
    with torch.no_grad():
        target_mean = (m_mu0 / TAU_Z ** 2 + y[idx] / SIGMA_Z ** 2) / P
        torch.testing.assert_close(guide.scales.z[idx], torch.full((BATCH,), P ** -0.5),
                                   rtol=1e-9, atol=0)
        torch.testing.assert_close(guide.locs.z[idx], target_mean, rtol=1e-9, atol=1e-12)
    after = store_snapshot()
    out = torch.ones(N_LOCAL, dtype=torch.bool)
    out[idx] = False
    for k in ("AutoNormal.locs.z", "AutoNormal.scales.z"):
        assert torch.equal(before[k][out], after[k][out])


@pytest.mark.parametrize("particles", [1, 3])
def test_minibatch_curvature_on_a_plate_larger_than_the_limit(float64, rng, particles):
    """A plate of 1,000 (more than MAX_CURVATURE_DIM) subsampled 10 at a time: the limit
    applies to the step's latents (1 global, 10 locals), so the visited locals' variances
    land on their exact conditional variance 1 / (1/tau^2 + 1/sigma^2) in one visit
    (rho = 1, no trust region); gradient-only steps would not. Also with vectorised
    particles (one Hessian diagonal per particle; they fell back to gradient-only
    steps before)."""
    n, batch = 1000, 10
    y = 2.0 + torch.randn(n, generator=generator(5), dtype=F64)

    def model(y, idx):
        mu = pyro.sample("mu", dist.Normal(y.new_zeros(()), TAU_MU))
        with pyro.plate("data", n, subsample=idx) as ind:
            z = pyro.sample("z", dist.Normal(mu, TAU_Z))
            pyro.sample("y", dist.Normal(z, SIGMA_Z), obs=y[ind])

    guide = AutoNormal(model, init_scale=1.0,
                       create_plates=lambda y, idx: pyro.plate("data", n, subsample=idx))
    loss = Trace_ELBO() if particles == 1 else Trace_ELBO(
        num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, NaturalGradient(guide, max_kl=None), loss)
    idx = torch.arange(batch) * 7
    svi.step(y, idx)
    cond_sd = (TAU_Z ** -2 + SIGMA_Z ** -2) ** -0.5
    torch.testing.assert_close(guide.scales.z.detach()[idx],
                               torch.full((batch,), cond_sd, dtype=F64), rtol=1e-9, atol=0)


@pytest.mark.slow
def test_minibatch_fit_is_sensible(float64, rng):
    """Minibatch SVI (batch 5 of 20) with defaults: the variances move towards the
    diagonal of the model's Hessian over each subsample, so every local reaches its
    exact conditional optimum (closed form here) and the global mean follows. With
    gradient-only steps (the rank-one single-draw precision estimate) some locals were
    still 3.5 conditional sds away after 400 steps and some scales 25x too small."""
    y = _hier_data()
    pyro.clear_param_store()
    guide = AutoNormal(hier_model, create_plates=hier_plates)
    svi = SVI(hier_model, guide, NaturalGradient(guide), Trace_ELBO())
    for _ in range(400):
        assert math.isfinite(svi.step(y, torch.randperm(N_LOCAL)[:BATCH]))
    Lam, mean = hier_exact(y)
    sd = Lam.diagonal().rsqrt()  # exact mean-field optimum sds
    P = 1 / TAU_Z ** 2 + 1 / SIGMA_Z ** 2
    with torch.no_grad():
        m_mu = guide.locs.mu
        cond = (m_mu / TAU_Z ** 2 + y / SIGMA_Z ** 2) / P  # exact conditional optimum
        z_err = (guide.locs.z - cond) * P ** 0.5
        z_scale = guide.scales.z * P ** 0.5
    # the global mean within 0.5 (mean-field) sd of exact after 400 noisy steps
    assert abs(float((m_mu - mean[0]) / sd[0])) < 0.5
    # every local within 0.2 conditional sd of its conditional optimum, scale within 1%
    assert float(z_err.abs().max()) < 0.2, z_err
    assert float((z_scale - 1).abs().max()) < 0.01, z_scale


# ----------------------------------------------------------------------------------------
# guide evaluations between steps must not perturb the next step
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("guide_cls", [AutoMultivariateNormal, AutoNormal])
def test_predictive_between_steps_does_not_perturb(float64, rng, guide_cls):
    X, y = diabetes()
    guide = fresh(guide_cls)
    svi = SVI(blr_model, guide, NaturalGradient(guide, max_kl=None), Trace_ELBO())
    for _ in range(5):
        svi.step(X, y)
    assert_reached(guide, X, y, rtol=1e-6)
    with torch.no_grad():
        Predictive(blr_model, guide=guide, num_samples=50, return_sites=["w"])(X, None)
    svi.step(X, y)
    # at the optimum the control variate cancels the noise of this step's own draw
    assert_reached(guide, X, y, rtol=1e-6)


# ----------------------------------------------------------------------------------------
# 7. errors
# ----------------------------------------------------------------------------------------
def test_optim_before_guide_has_run():
    pyro.clear_param_store()
    guide = AutoNormal(blr_model)
    opt = NaturalGradient(guide)
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"svi\.step"):
        opt([p])
    with pytest.raises(RuntimeError, match=r"svi\.step"):
        opt.routing()


def test_bad_options():
    pyro.clear_param_store()
    guide = AutoNormal(blr_model)
    with pytest.raises(ValueError, match="curvature"):
        NaturalGradient(guide, curvature="foo")
    with pytest.raises(ValueError, match=r"initial.*\(0, 1\]"):
        StepSize(initial=2)
    with pytest.raises(ValueError, match="initial"):
        StepSize(initial=0.0)
    # decay=inf or NaN gave a step size of 0 at every step: a run that never moved
    for bad in (dict(decay=math.inf), dict(decay=math.nan), dict(warmup=math.nan),
                dict(initial=True), dict(floor=math.nan)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a finite number"):
            StepSize(**bad)
    with pytest.raises(ValueError, match="initial"):
        NaturalGradient(guide, step_size=2.0)
    with pytest.raises(TypeError, match="PyroOptim"):
        NaturalGradient(guide, base_optimizer=torch.optim.Adam)
    with pytest.raises(TypeError, match="PyroOptim"):
        NaturalGradient(guide, base_optimizer=torch.optim.SGD([torch.zeros(1,
                                                                            requires_grad=True)],
                                                              lr=0.1))
    # accepted once, failing (or misread) only at the first step
    with pytest.raises(TypeError, match="step_size must be a StepSize"):
        NaturalGradient(guide, step_size="1")
    with pytest.raises(ValueError, match="max_kl must be None or a positive finite number"):
        NaturalGradient(guide, max_kl=True)
    with pytest.raises(TypeError, match="control_variate must be True or False"):
        NaturalGradient(guide, control_variate="no")


@pytest.mark.parametrize("max_kl", [0.0, -1.0, float("nan")])
def test_bad_max_kl_rejected(max_kl):
    pyro.clear_param_store()
    guide = AutoNormal(blr_model)
    with pytest.raises(ValueError, match="max_kl"):
        NaturalGradient(guide, max_kl=max_kl)


# ----------------------------------------------------------------------------------------
# 9. float32
# ----------------------------------------------------------------------------------------
def _fit(dtype, steps, **kwargs):
    X, y = diabetes(dtype)
    torch.manual_seed(0)
    guide = fresh(AutoMultivariateNormal)
    svi = SVI(blr_model, guide, NaturalGradient(guide, **kwargs), Trace_ELBO())
    for _ in range(steps):
        assert math.isfinite(svi.step(X, y))
        _check_valid(guide)
    with torch.no_grad():
        m, L = guide_moments(guide)
    assert m.dtype == dtype and L.dtype == dtype
    return m.detach().to(F64), (L @ L.T).detach().to(F64)


def test_float32_close_to_float64():
    m32, S32 = _fit(torch.float32, 20, max_kl=None)
    _fit(torch.float32, 20)  # default settings: finite and valid throughout
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        m64, S64 = _fit(F64, 20, max_kl=None)
        mu, Sigma, _, _ = exact_posterior(*diabetes())
    finally:
        torch.set_default_dtype(old)
    torch.testing.assert_close(m64, mu, rtol=1e-6, atol=1e-8)
    # float32 with condition number ~1e2: means to 1e-3 of their scale, covariance to 1e-2
    torch.testing.assert_close(m32, m64, rtol=0, atol=1e-3 * float(m64.abs().max()))
    torch.testing.assert_close(S32, S64, rtol=0, atol=1e-2 * float(S64.abs().max()))


# ----------------------------------------------------------------------------------------
# 10. the fast routes of the step against dense formulas
# ----------------------------------------------------------------------------------------
def _full_problem(d, noise, seed=0, dtype=F64, draws=1):
    gen = generator(seed)
    A = torch.randn(d, d, generator=gen, dtype=dtype)
    L = torch.linalg.cholesky(A @ A.T / d + torch.eye(d, dtype=dtype))
    G = noise * torch.randn(d, d, generator=gen, dtype=dtype).tril()
    loc = torch.randn(d, generator=gen, dtype=dtype)
    g = torch.randn(d, generator=gen, dtype=dtype)
    eps = torch.randn(draws, d, generator=gen, dtype=dtype)
    return L, G, loc, g, eps


def _cv_c(L, G, eps):
    """The control variate's coefficient, ``(tr(L^T G) + d) / mean |eps|^2``, as the
    module docstring of :mod:`pyro_natgrad.gaussian` defines it (1 without draws)."""
    if eps is None:
        return 1.0
    d = L.shape[-1]
    return float((torch.trace(L.T @ G) + d) / (eps.square().sum() / eps.shape[0]))


def _dense_linear_B(L, G, eps, rho):
    """``I + rho S`` from dense products, as the module docstring of
    :mod:`pyro_natgrad.gaussian` writes it (``K = Phi(L^T G) - c Phi(E[eps eps^T] - I)``)."""
    eye = torch.eye(L.shape[-1], dtype=L.dtype)
    M = L.T @ G
    K = M.tril(-1) + 0.5 * torch.diag(M.diagonal())
    if eps is not None:
        E = eps.T @ eps / eps.shape[0] - eye
        K = K - _cv_c(L, G, eps) * (E.tril(-1) + 0.5 * torch.diag(E.diagonal()))
    return eye + rho * (K + K.T)


def _expected_step(L, B, loc, g, eps, rho, c=1.0):
    Sigma = L @ torch.linalg.inv(B) @ L.T
    if eps is not None:
        g = g - c * torch.linalg.solve_triangular(L.T, eps.mean(0).unsqueeze(-1),
                                                  upper=True).squeeze(-1)
    return loc - rho * Sigma @ g, Sigma


@pytest.mark.parametrize("unblocked", [False, True], ids=["blocked", "unblocked"])
@pytest.mark.parametrize("d", [7, 300])
def test_full_step_matches_dense_formula(float64, monkeypatch, d, unblocked):
    """The blocked triangular products and solves give the step of the dense formula;
    so do the unblocked ones that a GPU takes (here forced on the CPU)."""
    from pyro_natgrad import gaussian
    from pyro_natgrad.gaussian import full_gaussian_step, full_step

    if unblocked:
        monkeypatch.setattr(gaussian, "BLOCK", gaussian.DEVICE_BLOCK)

    L, G, loc, g, eps = _full_problem(d, noise=0.01, draws=50 * d)
    rho = 0.8
    B = _dense_linear_B(L, G, eps, rho)
    assert float(torch.linalg.eigvalsh(B).min()) > 0.5  # no retraction here
    mean, Sigma = _expected_step(L, B, loc, g, eps, rho, _cv_c(L, G, eps))
    M2 = eps.T @ eps / eps.shape[0]
    for step in (full_step(loc, L, g, G, rho, (eps.mean(0), None), eps),
                 full_gaussian_step(loc, L, g, G, rho, (eps.mean(0), M2)),
                 full_gaussian_step(loc.expand(2, d), L.expand(2, d, d), g.expand(2, d),
                                    G.expand(2, d, d), rho, (eps.mean(0).expand(2, d),
                                                             M2.expand(2, d, d)))):
        assert not bool(step.retracted.any())
        L_new = step.scale_tril
        assert float(L_new.triu(1).abs().max()) == 0.0
        torch.testing.assert_close(L_new @ L_new.mT, Sigma.expand_as(L_new), rtol=1e-9,
                                   atol=1e-12)
        torch.testing.assert_close(step.loc, mean.expand_as(step.loc), rtol=1e-9, atol=1e-12)


def test_full_step_control_variate_is_exact_for_isotropic_curvature(float64):
    """A guide far too narrow (whitened curvature M = L^T H L = m I, m = 0.02) at the
    posterior mean: with the scaled control variate one draw's gradient (by autograd of
    the single-sample loss, an independent route) gives S = (m - 1) I exactly, so the
    covariance grows in every direction alike. The unscaled variate (c = 1) left a
    rank-one error of size (1 - m)|eps|^2 along the draw."""
    from pyro_natgrad.gaussian import full_step

    d, m = 50, 0.02
    gen = generator(4)
    A = torch.randn(d, d, generator=gen, dtype=F64)
    L = torch.linalg.cholesky(A @ A.T / d + torch.eye(d, dtype=F64))
    H = m * torch.cholesky_inverse(L)  # m Sigma^{-1}
    mu = torch.randn(d, generator=gen, dtype=F64)
    eps = torch.randn(1, d, generator=gen, dtype=F64)
    loc, Lv = mu.clone().requires_grad_(), L.clone().requires_grad_()
    z = loc + Lv.tril() @ eps[0]
    log_p = -0.5 * (z - mu) @ H @ (z - mu)
    log_q = dist.MultivariateNormal(loc, scale_tril=Lv.tril()).log_prob(z)
    g, G = torch.autograd.grad(log_q - log_p, [loc, Lv])
    rho = 0.3
    step = full_step(mu, L, g, G.tril(), rho, (eps.mean(0), None), eps, max_kl=None)
    expected = L @ L.T / (1 + rho * (m - 1))
    L_new = step.scale_tril
    torch.testing.assert_close(L_new @ L_new.T, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(step.loc, mu, rtol=0, atol=1e-12)


def _vector_model(d, data):
    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(d, dtype=F64), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=data)
    return model


def test_auto_curvature_for_a_full_rank_guide_above_the_mean_field_limit(float64):
    """curvature="auto" computes the model's Hessian for an AutoMultivariateNormal of
    300 > MAX_CURVATURE_DIM dimensions (up to MAX_FULL_RANK_CURVATURE_DIM), warning
    once about its cost: the exact posterior N(x/2, I/2) in 25 steps. Above that
    limit it warns once that the steps use gradients alone."""
    from pyro_natgrad import optim

    assert optim.MAX_CURVATURE_DIM < 300 <= optim.MAX_FULL_RANK_CURVATURE_DIM
    d = 300
    data = torch.randn(d, generator=generator(0), dtype=F64)
    model = _vector_model(d, data)
    pyro.set_rng_seed(0)
    guide = AutoMultivariateNormal(model)
    svi = SVI(model, guide, NaturalGradient(guide), Trace_ELBO())
    with pytest.warns(NaturalGradientWarning, match="Hessian over 300 latent dimensions"):
        svi.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NaturalGradientWarning)  # once only
        for _ in range(24):  # the trust region (10 nats) paces the first 18
            svi.step()
    post = guide.get_posterior()
    torch.testing.assert_close(post.loc.detach(), data / 2, rtol=0, atol=1e-8)
    torch.testing.assert_close(post.covariance_matrix.detach(),
                               0.5 * torch.eye(d, dtype=F64), rtol=0, atol=1e-8)

    d = optim.MAX_FULL_RANK_CURVATURE_DIM + 1
    pyro.clear_param_store()
    model = _vector_model(d, torch.zeros(d, dtype=F64))
    guide = AutoMultivariateNormal(model)
    svi = SVI(model, guide, NaturalGradient(guide), Trace_ELBO())
    with pytest.warns(NaturalGradientWarning, match="gradient alone"):
        svi.step()


def _stiff_regression(d=32, seed=1):
    """A linear regression with correlated columns whose scales span two decades (the
    largest eigenvalue of the Jacobi-scaled precision is 2.3 > 2, so a mean-field
    natural gradient diverges at rho = 1). Returns (model, posterior mean, precision)."""
    gen = generator(seed)
    X = torch.randn(4 * d, d, generator=gen, dtype=F64)
    X = X @ (torch.eye(d, dtype=F64) + 0.3 * torch.randn(d, d, generator=gen, dtype=F64)
             / math.sqrt(d))
    X = X * torch.logspace(-1, 1, d, dtype=F64)
    y = X @ torch.randn(d, generator=gen, dtype=F64) + torch.randn(4 * d, generator=gen,
                                                                  dtype=F64)
    Lam = X.T @ X + torch.eye(d, dtype=F64)

    def model():
        w = pyro.sample("w", dist.Normal(torch.zeros(d, dtype=F64), 1.0).to_event(1))
        with pyro.plate("n", X.shape[0]):
            pyro.sample("y", dist.Normal(X @ w, 1.0), obs=y)

    return model, torch.linalg.solve(Lam, X.T @ y), Lam


@pytest.mark.slow
def test_gradient_only_full_rank_converges_on_a_stiff_posterior(float64):
    """AutoMultivariateNormal with ``curvature="none"`` (gradients only) on a linear
    regression whose posterior precision spans four decades (d = 32): the exact ELBO
    reaches the log evidence within 1 nat. Before the noisy-step limit and the scaled
    control variate, this run stayed 1.4e4 nats away with collapsed variances."""
    d = 32
    model, mean, Lam = _stiff_regression(d)

    def gap(guide):
        # KL(q || posterior): the ELBO's distance to the log evidence, exactly
        post = guide.get_posterior()
        m, S = post.loc.detach(), post.covariance_matrix.detach()
        r = m - mean
        return 0.5 * float(torch.trace(Lam @ S) + r @ Lam @ r - d
                           - torch.logdet(Lam @ S))

    pyro.set_rng_seed(0)
    guide = AutoMultivariateNormal(model)
    svi = SVI(model, guide, NaturalGradient(guide, curvature="none"), Trace_ELBO())
    for _ in range(1000):
        svi.step()
    assert gap(guide) < 1.0


@pytest.mark.parametrize("loss", ["RenyiELBO", "TraceTailAdaptive_ELBO"])
def test_losses_other_than_the_kl_elbo_are_refused_before_any_step(loss):
    """Their gradients weight the guide's draws, so the steps would go elsewhere than
    the loss's optimum: a ValueError names the loss at the first step, and the
    parameters are untouched."""
    import pyro.infer

    def model():
        pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    guide = AutoNormal(model)
    guide()
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    elbo = getattr(pyro.infer, loss)(num_particles=4, vectorize_particles=True)
    svi = SVI(model, guide, NaturalGradient(guide), elbo)
    with pytest.raises(ValueError, match=loss):
        svi.step()
    for k, v in pyro.get_param_store().items():
        assert torch.equal(v.detach(), before[k])


def test_svi_with_another_guide_than_the_optimizers_is_refused():
    """An optimizer built for one guide, reused in an SVI over a new guide: every
    parameter would take Adam's steps (with a warning that called them model
    parameters). A ValueError says so at the first step, before anything moves."""
    def model():
        pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    old, new = AutoNormal(model), AutoNormal(model)
    opt = NaturalGradient(old)
    SVI(model, old, opt, Trace_ELBO()).step()
    new()
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    with pytest.raises(ValueError, match="pass SVI's guide"):
        SVI(model, new, opt, Trace_ELBO()).step()
    for k, v in pyro.get_param_store().items():
        assert torch.equal(v.detach(), before[k])


@pytest.mark.parametrize("how", ["none", "guide-list"])
def test_one_dimensional_full_rank_guide_moves_its_mean(float64, how):
    """An AutoMultivariateNormal over one scalar, stepped from gradients alone
    (``curvature="none"``, alone or as a part of an AutoGuideList). The control
    variate's coefficient taken from the step's one draw cancelled the mean's gradient
    exactly, and the mean stayed where it started.
    Posterior of w: N(0.8, 0.2) (prior N(0, 1), one observation 1 with sd 0.5)."""
    def model():
        w = pyro.sample("w", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
        pyro.sample("y", dist.Normal(w, 0.5), obs=torch.tensor(1.0, dtype=F64))
        v = pyro.sample("v", dist.Normal(torch.zeros(3, dtype=F64), 1.0).to_event(1))
        pyro.sample("yv", dist.Normal(v, 0.5).to_event(1),
                    obs=torch.tensor([1.0, -1.0, 0.5], dtype=F64))

    pyro.set_rng_seed(0)
    far = init_to_value(values={"w": torch.tensor(-2.0, dtype=F64)})  # 6 sds from 0.8
    if how == "none":
        guide = AutoMultivariateNormal(poutine.block(model, hide=["v", "yv"]),
                                       init_loc_fn=far)
        opt = NaturalGradient(guide, curvature="none")
    else:
        guide = AutoGuideList(model)
        guide.append(AutoMultivariateNormal(poutine.block(model, expose=["w"]),
                                            init_loc_fn=far))
        guide.append(AutoMultivariateNormal(poutine.block(model, expose=["v"])))
        opt = NaturalGradient(guide, curvature="none")
    svi = SVI(model, guide, opt, Trace_ELBO())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NaturalGradientWarning)
        for _ in range(201):
            svi.step()
    sd = 0.2 ** 0.5
    # single-draw steps: within 0.1 sd for seed offsets 0-4, 0.13 for 5, within 0.25 for
    # 0-11 (PYRO_NATGRAD_TEST_SEED_OFFSET)
    assert abs(float(guide.median()["w"]) - 0.8) < 0.25 * sd


@pytest.mark.parametrize("max_kl", [None, 10.0])
@pytest.mark.parametrize("control", ["draws", "moments", "none"])
def test_full_step_retraction_is_iblr_and_never_doubles_variance(float64, max_kl, control):
    """Without a trust region, where I + rho S is not > 0 the step uses
    B = I + X + X^2/2, X = rho S: checked against eigendecompositions. With one, a step
    from gradients alone is shortened to rho |S|_F <= 1/2 instead, so I + rho S >= I/2
    needs no retraction. Either way no variance more than doubles."""
    from pyro_natgrad.gaussian import full_gaussian_step, full_step

    d = 300
    L, G, loc, g, eps = _full_problem(d, noise=0.3, seed=1)
    draws = eps if control == "draws" else None
    moments = {"draws": (eps.mean(0), None), "moments": (eps.mean(0), eps.T @ eps),
               "none": None}[control]
    if control == "none":
        eps = None
    step = full_step(loc, L, g, G, 0.9, moments, draws, max_kl)
    rho = float(step.rho)
    B_lin = _dense_linear_B(L, G, eps, rho)
    X = B_lin - torch.eye(d, dtype=F64)
    if max_kl is not None:
        assert not bool(step.retracted)
        # the limit binds here (the trust region alone would allow a longer step)
        assert rho * float(torch.linalg.matrix_norm(X / rho)) == pytest.approx(0.5, rel=1e-9)
        B = B_lin
    else:
        assert bool(step.retracted)
        assert float(torch.linalg.eigvalsh(B_lin).min()) < 0  # retraction was due
        lam, Q = torch.linalg.eigh(X)
        B = (Q * (1 + lam + 0.5 * lam.square())) @ Q.T
    assert float(torch.linalg.eigvalsh(B).min()) >= 0.5 - 1e-12
    mean, Sigma = _expected_step(L, B, loc, g, eps, rho, _cv_c(L, G, eps))
    L_new = step.scale_tril
    torch.testing.assert_close(L_new @ L_new.T, Sigma, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(step.loc, mean, rtol=1e-8, atol=1e-10)
    # no variance more than doubles: eig(L^{-1} Sigma' L^{-T}) = eig(B^{-1}) <= 2
    W = torch.linalg.solve_triangular(L, L_new, upper=False)
    assert float(torch.linalg.eigvalsh(W @ W.T).max()) <= 2 + 1e-9
    # the batched route (dense products) takes the same step
    batched = full_gaussian_step(loc.unsqueeze(0), L.unsqueeze(0), g.unsqueeze(0),
                                 G.unsqueeze(0), 0.9, None if eps is None else (
                                     eps.mean(0, keepdim=True), (eps.T @ eps).unsqueeze(0)),
                                 max_kl)
    torch.testing.assert_close(batched.scale_tril[0] @ batched.scale_tril[0].T, Sigma,
                               rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(batched.loc[0], mean, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("with_draw", [True, False])
@pytest.mark.parametrize("given_scale", [True, False])
@pytest.mark.parametrize("cv", [0.8, None, "per element"])
def test_fused_diagonal_step_matches_general(monkeypatch, dtype, with_draw, given_scale, cv):
    """The fused softplus step of large mean-field guides equals the general step
    (several passes of equal length), with the scale computed or given (the guide's
    own, recorded in its forward pass), and a fixed control-variate coefficient, the
    leave-one-out one of each pass, or one given per element (as the optimizer's
    leave-one-out median)."""
    from pyro.distributions.transforms import SoftplusTransform

    from pyro_natgrad import gaussian

    monkeypatch.setattr(gaussian, "CHUNK", 1000)
    monkeypatch.setattr(gaussian, "DEVICE_CHUNK", 1000)
    n = 2500
    gen = generator(3)
    raw = 2 * torch.randn(n, generator=gen, dtype=dtype) - 1
    loc = torch.randn(n, generator=gen, dtype=dtype)
    g_loc = 3 * torch.randn(n, generator=gen, dtype=dtype)
    g_raw = 3 * torch.randn(n, generator=gen, dtype=dtype)
    T = SoftplusTransform()
    scale = T(raw)
    eps = torch.randn(n, generator=gen, dtype=dtype)
    draw = loc + scale * eps if with_draw else None
    if cv == "per element":
        cv = 0.5 + torch.rand(n, generator=gen, dtype=dtype)
    # scale * g_scale regressed on eps^2 with slopes 0, 1 and 2 in the three passes
    # below: the leave-one-out coefficients differ by construction, not by the draw
    slope = torch.arange(n, dtype=dtype).div(n / 3).floor()
    g_raw = g_raw + slope * eps.square() * torch.sigmoid(raw) / scale
    out_loc, out_raw = torch.empty_like(loc), torch.empty_like(loc)
    work = [torch.empty(1000, dtype=dtype) for _ in range(6)]
    monkeypatch.setattr(gaussian, "HOLD_SAMPLE", 300)  # every 9th element, across chunks
    stride = gaussian.hold_stride(n)
    assert stride == 9
    previous = torch.randn(len(range(0, n, stride)), generator=gen, dtype=dtype)
    before = previous.clone()
    taken, check, agreement, norm2 = gaussian.softplus_diagonal_step(
        loc, raw, g_loc, g_raw, draw, 0.7, 2.0, out_loc, out_raw, work,
        scale=scale if given_scale else None, cv=cv, previous=previous)
    moments = None
    g_scale = g_raw / torch.sigmoid(raw)
    c = cv if torch.is_tensor(cv) else 0.8
    if with_draw:
        eps = (draw - loc) / scale  # as the step computes it
        moments = (eps, eps.square())
        if cv is None:  # three passes of 833 or 834
            bounds = [0, 833, 1666, 2500]
            assert gaussian.passes(n, 1000) == list(zip(bounds[:-1], bounds[1:]))
            c = torch.cat([gaussian.leave_one_out_cv((scale * g_scale)[a:b], eps[a:b] ** 2)
                           for a, b in zip(bounds[:-1], bounds[1:])])
            assert float(c.std()) > 0.1  # a test of the per-element coefficients
    ref = gaussian.diagonal_gaussian_step(loc, scale, g_loc, g_scale, 0.7, moments, 2.0, cv=c)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert bool((ref.rho < 0.7).any()) and bool((ref.rho == 0.7).any())  # both cases
    torch.testing.assert_close(out_loc, ref.loc, **tol)
    torch.testing.assert_close(T(out_raw), ref.scale_tril, **tol)
    torch.testing.assert_close(taken, ref.rho.sum(), **tol)
    torch.testing.assert_close(check, out_loc.sum() + out_raw.sum(), **tol)
    # the whitened mean gradient's sample, compared with the previous one and stored in
    # its place
    w = (scale * g_loc - (c * eps if with_draw else 0))[::stride]
    torch.testing.assert_close(previous, w, **tol)
    torch.testing.assert_close(agreement, (w @ before).to(torch.float64), **tol)
    torch.testing.assert_close(norm2, (w @ w).to(torch.float64), **tol)


def test_unsubsampled_plate_steps_like_an_event(float64):
    """A plate that is never subsampled takes the same steps as the event dimension."""
    data = torch.linspace(-1, 1, 6)

    def plate_model():
        with pyro.plate("N", 6):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=data)

    def event_model():
        z = pyro.sample("z", dist.Normal(torch.zeros(6), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=data)

    out = []
    for model in (plate_model, event_model):
        guide = fresh(AutoNormal, model)
        pyro.set_rng_seed(5)
        svi = SVI(model, guide, NaturalGradient(guide, curvature="none"), Trace_ELBO())
        for _ in range(15):
            svi.step()
        out.append((guide.locs.z.detach().clone(), guide.scales.z.detach().clone()))
    torch.testing.assert_close(out[0], out[1], rtol=1e-12, atol=1e-12)


def _large_mean_field(seed, n=1000):
    """An AutoNormal over a plate of ``n`` > MAX_CURVATURE_DIM (the gradient-only, fused
    path) after one SVI step: ``(model, guide, optimizer, svi)``."""
    data = torch.randn(n, generator=generator(seed), dtype=F64)

    def model():
        with pyro.plate("N", n):
            z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=F64), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=data)

    guide = AutoNormal(model)
    opt = NaturalGradient(guide)
    svi = SVI(model, guide, opt, Trace_ELBO())
    svi.step()
    return model, guide, opt, svi


def _observed_plate(data, noise):
    """A plate of latents ``z_i ~ N(0, 1)``, each observed once as ``N(z_i, noise)``:
    ``(model, posterior mean, posterior sd)``, the posterior in closed form."""
    def model():
        with pyro.plate("N", data.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=data.dtype), 1.0))
            pyro.sample("x", dist.Normal(z, noise), obs=data)

    precision = 1 + noise ** -2
    return model, data / noise ** 2 / precision, precision ** -0.5


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("start", ["narrow", "wide"])
def test_mean_field_control_variate_scales_with_the_curvature(float64, monkeypatch, fused,
                                                              start):
    """A plate of 2,000 latents (gradient-only steps), N(0, 1) prior, one observation
    each. "narrow": noise sd 1, so the posterior sd is sqrt(1/2) and the guide starts
    seven times too narrow (s^2 H = 0.02); "wide": noise sd 0.01, posterior sd 0.01,
    the guide ten times too wide (s^2 H = 100), with the data drawn from the model so
    that means start a few posterior sds away. The control variate's coefficient
    estimates s^2 H from this step's other elements (leave one out), so it fits the guide
    as it is now. The posterior is closed form; fused path and general one.

    The coefficient is the eps^2-weighted median of the other elements' estimates
    (gaussian.leave_one_out_median_cv). With their weighted mean, as before, one element
    whose variance had doubled in 15 of 16 steps (s^2 H = 3.3e4) made the coefficient
    -8.9 for all, and fits that had settled by step 10 were knocked off: over seed
    offsets 0-11 the medians' worst over steps 10-60 of a mean's offset (posterior sds)
    or an sd's error reached 0.15 to 1.39 (offset 2: means 1.39 sds off at step 23);
    "wide" after 10 steps had sd errors up to 23% (median) and means up to 0.70 sds off.
    With the median, over the same seeds: that worst 0.030 to 0.040 ("wide") and 0.022
    to 0.024 ("narrow"); "wide" after 10 steps sd errors 2.5-3.1% (median), 14-16% (90%
    quantile), means 0.030-0.040 sds off, the mean sd 0.6-4.2% off; "narrow" after 20
    steps 0.13-0.17%, 1.4-1.9%, 0.002 sds, and 0.03-0.15%. Before the leave-one-out
    coefficient, with the previous step's: 80% and 93%, means 4.5 sds off."""
    from pyro_natgrad import optim as optim_module

    if not fused:
        monkeypatch.setattr(NaturalGradient, "_step_diagonal_fused", lambda *a, **k: False)
    n = 2000
    noise, steps = (1.0, 20) if start == "narrow" else (0.01, 10)
    model, post_mean, post_sd = _observed_plate(
        noise * torch.randn(n, generator=generator(5), dtype=F64), noise)
    pyro.set_rng_seed(0)
    guide = AutoNormal(model)
    svi = SVI(model, guide, NaturalGradient(guide), Trace_ELBO())
    assert optim_module.CV_MIN_ELEMENTS <= n

    def errors():
        sd, m = guide.scales.z.detach(), guide.locs.z.detach()
        return (sd / post_sd - 1).abs(), ((m - post_mean) / post_sd).abs(), sd

    for _ in range(steps):
        svi.step()
    err, off, sd = errors()
    if start == "narrow":
        assert float(err.median()) < 0.005 and float(err.quantile(0.9)) < 0.03
        assert float(off.median()) < 0.005
        assert abs(float(sd.mean()) / post_sd - 1) < 0.005
    else:
        assert float(err.median()) < 0.05 and float(err.quantile(0.9)) < 0.25
        assert float(off.median()) < 0.06
        assert abs(float(sd.mean()) / post_sd - 1) < 0.06
    for _ in range(steps, 40):  # settled fits stay settled
        svi.step()
        err, off, _ = errors()
        assert max(float(err.median()), float(off.median())) < 0.06


@pytest.mark.parametrize("fused", [True, False])
def test_mean_field_plate_of_unequal_curvatures_converges(float64, monkeypatch, fused):
    """2,000 latents with observation noise sds spread log-uniformly over [0.01, 1], so
    the likelihood's curvature H_i spans 2 to 1e4 and the guide's start (sd 0.1)
    s^2 H_i spans 0.02 to 100: no one control-variate coefficient fits them all. The
    others' weighted median settles on the bulk, where their weighted mean is pulled by
    the stiffest elements. Measured (seeds 100-103 for the data): after 30 steps median
    sd errors 0.2% (90% quantile 6-8%) and means 0.00 sds off; with the mean, 38-72%
    (91-97%) and 0.48-1.17 sds, and 0.2-3.2% still after 100 steps."""
    if not fused:
        monkeypatch.setattr(NaturalGradient, "_step_diagonal_fused", lambda *a, **k: False)
    n = 2000
    g = generator(100)
    noise = 10 ** (-2 * torch.rand(n, generator=g, dtype=F64))
    data = torch.randn(n, generator=g, dtype=F64) + noise * torch.randn(n, generator=g,
                                                                         dtype=F64)

    def model():
        with pyro.plate("N", n):
            z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=F64), 1.0))
            pyro.sample("x", dist.Normal(z, noise), obs=data)

    precision = 1 + noise ** -2
    post_mean, post_sd = data / noise ** 2 / precision, precision ** -0.5
    pyro.set_rng_seed(0)
    guide = fresh(AutoNormal, model)
    svi = SVI(model, guide, NaturalGradient(guide), Trace_ELBO())
    for _ in range(30):
        svi.step()
    err = (guide.scales.z.detach() / post_sd - 1).abs()
    off = ((guide.locs.z.detach() - post_mean) / post_sd).abs()
    assert float(err.median()) < 0.01 and float(err.quantile(0.9)) < 0.2
    assert float(off.median()) < 0.02


def test_fused_and_general_mean_field_steps_share_the_sampled_coefficient(float64,
                                                                          monkeypatch):
    """Above ``CV_SAMPLE`` elements the median coefficient comes from every k-th element
    (those get their leave-one-out median, the rest the sample's): the fused step builds
    it from the sample alone, the general one from full-size tensors. Five steps of a
    1,000-latent plate with a sample of 64 (every 16th element) agree, and differ from
    those with the whole plate as the sample (so the sample is what they share)."""
    from pyro_natgrad import gaussian

    model, _, _ = _observed_plate(0.01 * torch.randn(1000, generator=generator(6),
                                                     dtype=F64), 0.01)

    def fit(fused, sample):
        monkeypatch.setattr(gaussian, "CV_SAMPLE", sample)
        if not fused:
            monkeypatch.setattr(NaturalGradient, "_step_diagonal_fused",
                                lambda *a, **k: False)
        pyro.set_rng_seed(1)
        guide = fresh(AutoNormal, model)
        svi = SVI(model, guide, NaturalGradient(guide), Trace_ELBO())
        for _ in range(5):
            svi.step()
        monkeypatch.undo()
        return guide.locs.z.detach().clone(), guide.scales.z.detach().clone()

    fused, general = fit(True, 64), fit(False, 64)
    for a, b in zip(fused, general):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    whole = fit(True, 1 << 12)
    assert not torch.allclose(whole[0], fused[0], rtol=1e-6, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("fused", [True, False])
def test_mean_field_step_size_holds_while_the_gradients_agree(float64, monkeypatch, fused):
    """AutoNormal over 300 weights of a linear regression with correlated columns
    (``benchmarks/correlated_linear.py``; the largest eigenvalue of D^-1/2 Lambda D^-1/2
    is 2.7, so the Jacobi-type mean step at rho = 1 diverges): gradients alone. The
    step size holds while successive whitened mean gradients agree, and the trust
    region counts a variance's growth in its mean's move, so 300 steps end 3.78 nats
    from the mean-field optimum and 1,000 steps 0.81 (measured; 10.5 and 1.16 while a
    precision could grow more than 2-fold in a step). Before the second, 13,600 and
    8.2; before the first, 4,290 after 1,000 (Adam's best of
    0.001/0.01/0.1: 78.6). The exact gap is closed form."""
    import importlib.util
    import pathlib

    if not fused:
        monkeypatch.setattr(NaturalGradient, "_step_diagonal_fused", lambda *a, **k: False)
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "correlated_linear.py"
    monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location("correlated_linear", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from problems import guide_moments

    problem = bench.design(300, 0.3, 0.0)
    pyro.set_rng_seed(0)
    guide = AutoNormal(problem.model)
    svi = SVI(problem.model, guide, NaturalGradient(guide), Trace_ELBO())
    gaps = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NaturalGradientWarning)
        for t in range(1000):
            svi.step()
            if t + 1 in (300, 1000):
                gaps[t + 1] = problem.optimal_elbo(True) - problem.elbo(*guide_moments(guide))
    assert gaps[300] < 100 and gaps[1000] < 5, gaps


def test_fused_step_reuses_the_guides_scale_only_while_raw_is_unchanged(float64, monkeypatch):
    """The fused step takes softplus(raw) from the guide's forward pass (recorded with
    raw's version counter) instead of computing it again, and only while raw is
    unchanged since: an in-place change in between makes it compute the scale, with the
    guide's own softplus (bit for bit the same: the kernel's own log1p(exp(raw))
    rounded differently, and a resumed run, whose first step has no recorded scale,
    left the uninterrupted one's path)."""
    import pyro.distributions.transforms.softplus as softplus_module

    from pyro_natgrad import optim as optim_module

    model, guide, opt, svi = _large_mean_field(seed=0)
    given = []
    original = optim_module.softplus_diagonal_step

    def spy(*args, scale=None, **kwargs):
        raw = guide.scales.z_unconstrained.detach().reshape(-1)
        given.append(torch.equal(scale, torch.nn.functional.softplus(raw)))
        return original(*args, scale=scale, **kwargs)

    monkeypatch.setattr(optim_module, "softplus_diagonal_step", spy)
    svi.step()
    calls = []
    softplus = softplus_module.softplus

    def counted(x):
        calls.append(x.shape)
        return softplus(x)

    for change in (False, True):
        Trace_ELBO().differentiable_loss(model, guide).backward()
        if change:
            with torch.no_grad():
                guide.scales.z_unconstrained.mul_(1.0)  # same values, a new version
        monkeypatch.setattr(softplus_module, "softplus", counted)
        opt(list(guide.parameters()))
        monkeypatch.setattr(softplus_module, "softplus", softplus)
        for p in guide.parameters():
            p.grad = None
    assert given == [True, True, True]
    assert len(calls) == 1  # the second call only


@pytest.mark.parametrize("which", ["loc", "scale"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gradient_on_the_fused_path(float64, which, bad):
    """Large AutoNormal (the fused step, which has no separate pass over the gradients
    and relies on its output check): a non-finite gradient element skips the step with
    the counting warning and leaves every parameter and the optimizer's state untouched,
    bit for bit."""
    model, guide, opt, svi = _large_mean_field(seed=1)
    Trace_ELBO().differentiable_loss(model, guide).backward()
    param = guide.locs.z_unconstrained if which == "loc" else guide.scales.z_unconstrained
    param.grad[17] = bad
    before = store_snapshot()
    state = copy.deepcopy(opt.get_state()["natural_gradient"])
    with pytest.warns(NaturalGradientWarning, match="1 skipped"):
        opt(list(guide.parameters()))
    after = store_snapshot()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The optimizer's state too: the kernel wrote the hold test's sample (NaN) before its
    # output was checked.
    now = opt.get_state()["natural_gradient"]
    for key, value in state.items():
        for k, v in value.items():
            assert torch.equal(torch.as_tensor(now[key][k]), torch.as_tensor(v)), (key, k)


# ----------------------------------------------------------------------------------------
# 11. curvature="hvp": Newton steps for mean-field means from Hessian-vector products
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoDiagonalNormal])
def test_hvp_newton_step_lands_on_the_posterior_mean(float64, rng, monkeypatch,
                                                     guide_cls):
    """rho = 1, no trust region, one single-draw step: the mean lands on the exact
    posterior mean (closed form), whatever the draw, because the Newton direction from
    the model's Hessian and the control variate P (z - mu) make the step noise-free for
    a linear-Gaussian model. AutoNormal has two groups (w, b), so this also checks that
    the latent vector is packed in the order the groups are. The same step with
    curvature="none" is a Jacobi step and stays far. The conjugate gradients are run
    to a relative residual of 1e-12: at the default HVP_TOLERANCE (1e-6) the mean
    landed 2e-6 to 8e-6 sds away, depending on the draw."""
    from pyro_natgrad import optim as optim_module

    monkeypatch.setattr(optim_module, "HVP_TOLERANCE", 1e-12)
    X, y = diabetes()
    mu, _, Lam, _ = exact_posterior(X, y)
    sd = Lam.diagonal().rsqrt()  # mean-field sds
    errors = {}
    for curvature in ("hvp", "none"):
        pyro.set_rng_seed(0)
        guide = fresh(guide_cls)
        guide(X, y)
        perturb(guide, seed=4)
        opt = NaturalGradient(guide, curvature=curvature, step_size=1.0, max_kl=None)
        SVI(blr_model, guide, opt, Trace_ELBO()).step(X, y)
        with torch.no_grad():
            m, _ = guide_moments(guide)
        errors[curvature] = float(((m.detach() - mu) / sd).abs().max())
    assert errors["hvp"] < 1e-9
    assert errors["none"] > 1.0


def test_hvp_defaults_on_a_stiff_posterior(float64, rng):
    """Default settings but curvature="hvp", AutoNormal, d = 32: the mean within 1e-5
    mean-field sds of the posterior mean after 20 steps, and every variance within 20 %
    of the mean-field optimum 1 / Lam_ii after 200 (some start 40 times too small).
    Gradient-only steps (curvature="none") leave the mean over a sd away after 20."""
    model, mu, Lam = _stiff_regression()
    sd = Lam.diagonal().rsqrt()
    result = {}
    for curvature in ("hvp", "none"):
        pyro.set_rng_seed(0)
        guide = AutoNormal(model)
        svi = SVI(model, guide, NaturalGradient(guide, curvature=curvature), Trace_ELBO())
        errors = []
        for t in range(200):
            svi.step()
            if t + 1 in (20, 200):
                m, s = guide.locs.w.detach(), guide.scales.w.detach()
                errors.append((float(((m - mu) / sd).abs().max()),
                               float((s / sd).square().sub(1).abs().max())))
        result[curvature] = errors
    assert result["hvp"][0][0] < 1e-5 and result["hvp"][1][0] < 1e-5
    assert result["hvp"][1][1] < 0.2
    assert result["none"][0][0] > 1


def test_hvp_falls_back_to_gradient_steps_where_the_hessian_is_indefinite(float64):
    """Cauchy observations far from the prior's mass: at the guide's mean the log joint
    is convex (f'' = -1 + 20 * 2 (u^2 - 1) / (1 + u^2)^2 > 0 at u = 5), so the Newton
    system is indefinite and the step must be exactly the gradient-only one."""
    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=F64), 1.0))
        with pyro.plate("n", 20):
            pyro.sample("x", dist.Cauchy(z, 1.0), obs=torch.full((20,), 5.0, dtype=F64))

    u = 5.0
    assert -1 + 20 * 2 * (u * u - 1) / (1 + u * u) ** 2 > 0  # the premise
    states = {}
    for curvature in ("hvp", "none"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoNormal(model)
        SVI(model, guide, NaturalGradient(guide, curvature=curvature), Trace_ELBO()).step()
        states[curvature] = store_snapshot()
    for k, v in states["none"].items():
        assert torch.equal(states["hvp"][k], v), k
    assert not torch.equal(states["none"]["AutoNormal.locs.z"], torch.zeros((), dtype=F64))


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_model_curvature_on_a_guide_it_cannot_serve_is_refused(curvature):
    """A hand-written guide, and an AutoGuideList with a low-rank part, step without
    model curvature, so asking for it is an error rather than an option silently
    ignored; a list of mean-field and full-rank parts takes it."""
    def guide():
        pyro.sample("z", dist.Normal(pyro.param("m", torch.zeros(())), 1.0))

    for g, what in ((guide, "not function"),
                    (_guide_list(AutoLowRankMultivariateNormal, AutoNormal),
                     "not an AutoGuideList of AutoLowRankMultivariateNormal, AutoNormal")):
        with pytest.raises(ValueError, match=f"curvature='{curvature}' needs an AutoNormal"
                                             f".*{what}"):
            NaturalGradient(g, curvature=curvature)
    NaturalGradient(_guide_list(AutoNormal, AutoDiagonalNormal), curvature=curvature)
    NaturalGradient(_guide_list(AutoMultivariateNormal, AutoNormal), curvature=curvature)


def _two_site_regression():
    """The diabetes regression with its weights in two sites, w1 (6) and w2 (4): a
    Gaussian posterior N(mean, Lambda^-1), whose mean-field optimum has the posterior
    mean and sds Lambda_ii^(-1/2)."""
    X, y = diabetes()
    noise = 0.7

    def model():
        w1 = pyro.sample("w1", dist.Normal(X.new_zeros(6), 1.0).to_event(1))
        w2 = pyro.sample("w2", dist.Normal(X.new_zeros(X.shape[1] - 6), 1.0).to_event(1))
        with pyro.plate("data", X.shape[0]):
            # (X * w).sum(-1), not w @ X.T: under vectorised particles w is (k, 1, d),
            # and the particles must stay at dim -2, beside the data plate
            pyro.sample("y", dist.Normal((X * torch.cat([w1, w2], -1)).sum(-1), noise),
                        obs=y)

    Lam = X.T @ X / noise ** 2 + torch.eye(X.shape[1], dtype=X.dtype)
    mean = torch.linalg.solve(Lam, X.T @ y / noise ** 2)
    return model, mean, Lam.diagonal().rsqrt()


def _part_moments(part, site):
    """``(mean, covariance)`` of an autoguide part over its one site."""
    if isinstance(part, AutoNormal):
        return getattr(part.locs, site), torch.diag(getattr(part.scales, site).square())
    post = part.get_posterior()
    if isinstance(part, AutoMultivariateNormal):
        return post.mean, post.covariance_matrix
    return post.mean, torch.diag(post.variance)


@pytest.mark.parametrize("curvature,particles", [("auto", 1), ("ggn", 1), ("auto", 3),
                                                 ("auto", "vectorised")])
@pytest.mark.parametrize("first,second", [
    (AutoNormal, AutoNormal), (AutoNormal, AutoDiagonalNormal),
    (AutoMultivariateNormal, AutoNormal), (AutoMultivariateNormal, AutoMultivariateNormal)],
    ids=["Normal-Normal", "Normal-Diagonal", "MVN-Normal", "MVN-MVN"])
def test_guide_list_takes_the_models_hessian(float64, rng, curvature, particles, first,
                                             second):
    """AutoGuideList([a part for w1, a part for w2]) is a block-diagonal Gaussian, and
    steps with the model's Hessian over both parts' latents (their draws merged per
    guide call): a Newton step for the mean with the running precision of the whole
    Hessian, and each block's precision towards its own block of it. So it is on the
    family's optimum (closed form: the posterior mean, and per block Lambda_bb^-1, or
    its diagonal's inverse for a mean-field part) within a few steps. The parts used to
    take gradient-only steps: with two AutoNormal parts 318 nats from the optimum after
    10 steps and 0.9 after 1,000, with two AutoMultivariateNormal parts 163 and 0.06.
    Also with several particles, sequential (a record per part and call) or vectorised."""
    model, mean, _ = _two_site_regression()
    X, _ = diabetes()
    Lam = X.T @ X / 0.7 ** 2 + torch.eye(X.shape[1], dtype=X.dtype)
    guide = AutoGuideList(model)
    guide.append(first(poutine.block(model, expose=["w1"])))
    guide.append(second(poutine.block(model, expose=["w2"])))
    loss = Trace_ELBO() if particles == 1 else Trace_ELBO(num_particles=3) \
        if particles == 3 else Trace_ELBO(num_particles=3, vectorize_particles=True,
                                          max_plate_nesting=1)
    svi = SVI(model, guide, NaturalGradient(guide, curvature=curvature), loss)
    for _ in range(15):
        svi.step()
    blocks = (slice(0, 6), slice(6, X.shape[1]))
    with torch.no_grad():
        for part, site, b, kind in zip(guide, ("w1", "w2"), blocks, (first, second)):
            m, S = _part_moments(part, site)
            best = torch.linalg.inv(Lam[b, b])
            if kind is not AutoMultivariateNormal:
                best = torch.diag(Lam[b, b].diagonal().reciprocal())
            sd = best.diagonal().sqrt()
            torch.testing.assert_close(m, mean[b], rtol=0, atol=1e-6 * float(sd.min()))
            torch.testing.assert_close(S, best, rtol=1e-6, atol=1e-9 * float(sd.min() ** 2))


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "hvp"])
def test_model_curvature_without_recorded_draws_is_refused(curvature):
    """control_variate=False records no draws, which every model-curvature mode reads:
    asking for both is an error at construction, not a silent gradient-only run."""
    guide = AutoNormal(noise_model)
    with pytest.raises(ValueError, match=f"curvature='{curvature}' reads the guide's recorded "
                                         f"draws, which control_variate=False turns off"):
        NaturalGradient(guide, curvature=curvature, control_variate=False)
    NaturalGradient(guide, curvature="none", control_variate=False)  # allowed


def test_hvp_needs_a_mean_field_guide_without_subsampling(float64):
    """Every guide that curvature="hvp" cannot serve gets an error at the first step
    that says why, and leaves the parameters as they were."""
    X, y = _small_data()
    cases = [
        (lambda: fresh(AutoMultivariateNormal, noise_model), {}, "not AutoMultivariateNormal"),
        (lambda: _guide_list(AutoNormal, AutoNormal), {}, "not AutoGuideList"),
    ]
    for make, options, why in cases:
        pyro.clear_param_store()
        guide = make()
        guide(X, y)  # creates the parameters
        before = store_snapshot()
        svi = SVI(noise_model, guide, NaturalGradient(guide, curvature="hvp", **options),
                  Trace_ELBO())
        with pytest.raises(ValueError, match="curvature='hvp' needs a mean-field guide"
                                             ".*" + re.escape(why)):
            svi.step(X, y)
        after = store_snapshot()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before)

    def model(y, idx):
        mu = pyro.sample("mu", dist.Normal(torch.zeros((), dtype=F64), 1.0))
        with pyro.plate("data", 12, subsample=idx) as ind:
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("y", dist.Normal(z, 1.0), obs=y[ind])

    pyro.clear_param_store()
    guide = AutoNormal(model, create_plates=lambda y, idx: pyro.plate("data", 12, subsample=idx))
    svi = SVI(model, guide, NaturalGradient(guide, curvature="hvp"), Trace_ELBO())
    with pytest.raises(ValueError, match="subsampled"):
        svi.step(torch.zeros(12, dtype=F64), torch.tensor([7, 2, 9, 4]))



@pytest.mark.parametrize("curvature,n", [("hessian", 20000), ("hvp", 2000)])
def test_the_mean_field_newton_step_stays_in_its_trust_region(float64, curvature, n):
    """A Poisson regression whose Hessian is far larger than the guide's first precision:
    cutting the step size weights that precision more in ``P' = (1 - rho) P0 + rho H``,
    and lengthens the Newton direction ``P'^{-1} g``. The cut was computed once, at the
    uncut direction: the mean then moved 731 (2e6 nats against ``max_kl`` 10) at the
    third step under ``"hessian"``, 8e4 at the first under ``"hvp"``, and every later
    loss was NaN. Each step's ``0.5 dmu^T M dmu`` must be within the bound in the
    smaller of its two metrics ``M``: the guide's ``diag(1 / sd^2)`` and the step's
    ``P'``. The bound is ``max_kl`` per latent."""
    gen = generator(0)
    X = 3 * torch.randn(n, 4, generator=gen, dtype=F64)
    y = torch.poisson((X @ torch.tensor([1.0, -0.5, 0.8, 0.2], dtype=F64)).clamp(max=15).exp(),
                      generator=gen)
    prior = dist.Normal(torch.zeros(4, dtype=F64), 10.0)

    def model():
        w = pyro.sample("w", prior.to_event(1))
        pyro.sample("y", dist.Poisson((X @ w).exp()).to_event(1), obs=y)

    def hessian(w):
        def neg_log_joint(v):
            return -(prior.log_prob(v).sum() + dist.Poisson((X @ v).exp()).log_prob(y).sum())
        return torch.autograd.functional.hessian(neg_log_joint, w)

    guide = AutoNormal(model, init_scale=1.0)
    guide()  # builds the parameters
    pyro.set_rng_seed(0)
    opt = NaturalGradient(guide, curvature=curvature)
    svi = SVI(model, guide, opt, Trace_ELBO())
    for _ in range(4):
        loc0, sd0 = guide.locs.w.detach().clone(), guide.scales.w.detach().clone()
        svi.step()
        state = opt._state["curvature"]
        if curvature == "hvp":
            w = state["hessian_weight"]
            P = (1 - w) * torch.diag(state["first_precision"]) + w * hessian(loc0)
        else:
            P = state["precision"]
        dmu = guide.locs.w.detach() - loc0
        kl = 0.5 * min(float((dmu / sd0).square().sum()), float(dmu @ P @ dmu))
        assert kl <= opt.max_kl * 4 * (1 + 1e-9), kl
    assert math.isfinite(svi.evaluate_loss())


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoDiagonalNormal])
def test_mean_field_steps_with_the_models_hessian_bound_the_kl_per_latent(float64, guide_cls):
    """With the model's Hessian (the default up to 256 latents), ``max_kl`` bounds a
    mean-field step's KL per latent. The KL from a guide's start to a posterior of ``D``
    informative latents grows like ``D``: one ``max_kl`` for the whole step left this
    correlated regression of 40 latents about 500 nats off after 10 steps."""
    gen = generator(3)
    n, d = 160, 39
    mix = torch.eye(d, dtype=F64) + 0.3 * torch.randn(d, d, generator=gen, dtype=F64) / d ** 0.5
    X = torch.randn(n, d, generator=gen, dtype=F64) @ mix
    y = X @ torch.randn(d, generator=gen, dtype=F64) + SIGMA * torch.randn(
        n, generator=gen, dtype=F64)
    guide = fresh(guide_cls)
    svi = SVI(blr_model, guide, NaturalGradient(guide), Trace_ELBO())
    for _ in range(10):
        svi.step(X, y)
    assert_reached(guide, X, y)


def regression_in_units_of_1e4():
    """``(model, X, y)``: a linear regression with unknown noise, data in units of 1e4,
    priors 10 times wider than the data."""
    gen = generator(1)
    n = 200
    X = torch.randn(n, 3, generator=gen, dtype=F64)
    y = 1e4 * (X @ torch.tensor([1.0, -2.0, 0.5], dtype=F64) + 3.0
               + 0.7 * torch.randn(n, generator=gen, dtype=F64))

    def model():
        b = pyro.sample("b", dist.Normal(torch.tensor(0.0, dtype=F64), 1e5))
        w = pyro.sample("w", dist.Normal(torch.zeros(3, dtype=F64), 1e5).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(1e5, dtype=F64)))
        with pyro.plate("data", n):
            pyro.sample("y", dist.Normal(b + X @ w, sigma), obs=y)

    return model, X, y


def test_a_fit_the_trust_region_stalls_warns_and_a_nearer_start_converges(float64):
    """``AutoNormal`` starts a noise scale at 1 (its unconstrained 0) against data in
    units of 1e4: the model's curvature there is about 1e9 times the posterior's, the
    trust region cut the first step to about 2e-9 and still cut the 300th below 1e-3,
    and the weights stayed near 0 for about 1,000 steps, silently. It now warns (when
    the fraction's pace puts full steps more than ``STALL_HORIZON`` steps away, at step
    90 here); started at the prior's median, as the warning advises, the fit reaches
    the least-squares answer (the priors are 1e5 times wider than it)."""
    model, X, y = regression_in_units_of_1e4()
    n = X.shape[0]
    pyro.set_rng_seed(0)
    guide = fresh(AutoNormal, model)
    svi = SVI(model, guide, NaturalGradient(guide), Trace_ELBO())
    with pytest.warns(NaturalGradientWarning, match="the fit is crawling"):
        for _ in range(150):
            svi.step()
    assert float(guide.locs.b.detach().abs()) < 1.0  # crawling indeed: b's answer is 3e4

    guide = fresh(AutoNormal, model, init_loc_fn=init_to_median)
    svi = SVI(model, guide, NaturalGradient(guide), Trace_ELBO())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(100):
            svi.step()
    assert not [w for w in caught if "crawling" in str(w.message)]
    Z = torch.cat([X.new_ones(n, 1), X], 1)
    coef = torch.linalg.lstsq(Z, y.unsqueeze(-1)).solution.squeeze(-1)
    resid_sd = float((y - Z @ coef).square().sum() / (n - 4)) ** 0.5
    se = resid_sd * torch.linalg.inv(Z.T @ Z).diagonal().sqrt()
    fitted = torch.cat([guide.locs.b.reshape(1), guide.locs.w]).detach()
    assert float(((fitted - coef) / se).abs().max()) < 0.1
    assert abs(float(guide.median()["sigma"]) / resid_sd - 1) < 0.05


def fit_recording_warnings(guide_cls, model, steps, **options):
    """``(guide, warnings)``: a fresh ``guide_cls(model)`` after ``steps`` SVI steps with
    ``NaturalGradient(guide, **options)`` from seed 0, and every warning they gave."""
    pyro.set_rng_seed(0)
    guide = fresh(guide_cls, model)
    svi = SVI(model, guide, NaturalGradient(guide, **options), Trace_ELBO())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            svi.step()
    return guide, caught


def test_a_cut_that_grows_quickly_does_not_warn_of_a_stall(float64):
    """posteriordb's blr with sigma fixed at its posterior mean and the full-rank guide:
    the trust region cut the first 43 steps below 1e-3 of their size, but the fraction
    grew 2- to 10-fold every 10 steps and the guide was exact at step 55. The earlier
    rule (ten cut steps in a row) warned that the fit had stalled; this one does not,
    and the guide is the exact posterior (a conjugate Gaussian, from the data here)."""
    ref = load_reference("sblri-blr", dtype=F64)
    sigma = ref.mean[ref.param_names.index("sigma")]
    model = poutine.condition(ref.model, data={"sigma": torch.tensor(sigma, dtype=F64)})
    X, y = ref.data["X"], ref.data["y"]
    precision = X.T @ X / sigma ** 2 + torch.eye(X.shape[1], dtype=F64) / 10.0 ** 2
    mean = torch.linalg.solve(precision, X.T @ y / sigma ** 2)
    guide, caught = fit_recording_warnings(AutoMultivariateNormal, model, 70)
    assert not [w for w in caught if issubclass(w.category, NaturalGradientWarning)]
    posterior = guide.get_posterior()
    torch.testing.assert_close(posterior.loc.detach(), mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(posterior.covariance_matrix.detach(),
                               torch.linalg.inv(precision), rtol=1e-6, atol=0)


def shared_factor_logistic(n, d, corr, seed=0):
    """``(model, X, y)``: a logistic regression of ``d`` covariates with pairwise
    correlation ``corr`` through one shared factor, weights ``N(0, 1)`` a priori."""
    gen = generator(seed)
    X = torch.randn(n, d, generator=gen, dtype=F64)
    X = (1 - corr) ** 0.5 * X + corr ** 0.5 * torch.randn(n, 1, generator=gen, dtype=F64)
    y = torch.bernoulli(torch.sigmoid(X @ torch.randn(d, generator=gen, dtype=F64) / d ** 0.5),
                        generator=gen)

    def model():
        w = pyro.sample("w", dist.Normal(torch.zeros(d, dtype=F64), 1.0).to_event(1))
        with pyro.plate("data", n):
            pyro.sample("y", dist.Bernoulli(logits=X @ w), obs=y)

    return model, X, y


def laplace_logistic(X, y):
    """The MAP of :func:`shared_factor_logistic`'s posterior by Newton's method, and the
    posterior sds of the Laplace approximation there."""
    w = X.new_zeros(X.shape[1])
    for _ in range(50):
        p = torch.sigmoid(X @ w)
        H = X.T @ (X * (p * (1 - p)).unsqueeze(-1)) + torch.eye(X.shape[1], dtype=X.dtype)
        w = w + torch.linalg.solve(H, X.T @ (y - p) - w)
    return w, torch.linalg.inv(H).diagonal().sqrt()


@pytest.mark.parametrize("corr", [0.0, 0.5])
def test_diverging_steps_from_gradients_alone_warn(float64, corr):
    """Mean-field steps from the gradient alone are Jacobi-type: along the shared factor
    of 200 covariates with correlation 0.5 the whitened precision's eigenvalue is about
    100, and the means ran away from the posterior (26 sds from the MAP by step 25,
    and on). Nothing said so; now a warning names curvature='hessian' (at step 29;
    14 to 47 at PYRO_NATGRAD_TEST_SEED_OFFSET=0..11, where the rise while turning
    reached 1.1e4- to 6e6-fold within 100 steps; DIVERGENCE_GROWTH is 200). Without
    the shared factor nothing warns, and the means do not run away: 2.2 to 3.7 sds
    from the MAP at worst after 200 steps over those seeds (2.8 to 5.1 at the start,
    approached slowly; on seed 11 the worst was further than at the start)."""
    model, X, y = shared_factor_logistic(600, 200, corr)
    mode, sd = laplace_logistic(X, y)
    pyro.set_rng_seed(0)
    guide = fresh(AutoNormal, model)
    svi = SVI(model, guide, NaturalGradient(guide, curvature="none"), Trace_ELBO())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(100 if corr else 200):
            svi.step()
            if caught:
                break
    away = float(((guide.locs.w.detach() - mode) / sd).abs().max())
    messages = [str(w.message) for w in caught]
    if corr:
        assert len(messages) == 1 and "diverging" in messages[0]
        assert "curvature='hessian'" in messages[0]
        assert away > 10
    else:
        assert not messages
        assert away < 10


def normal_hierarchy(groups, per_group, tau, centred, seed=0, dtype=F64):
    """``(model, y)``: ``y_jk ~ N(theta_j, 1)``, ``theta_j ~ N(mu, tau^2)`` (written centred
    or not), ``mu ~ N(0, 10^2)``, ``tau ~ HalfNormal(5)``; data from ``mu = 3``."""
    gen = generator(seed)
    y = (3.0 + tau * torch.randn(groups, 1, generator=gen, dtype=F64) + torch.randn(
        groups, per_group, generator=gen, dtype=F64)).to(dtype)

    def model():
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=dtype), 10.0))
        scale = pyro.sample("tau", dist.HalfNormal(torch.tensor(5.0, dtype=dtype)))
        with pyro.plate("groups", groups):
            if centred:
                theta = pyro.sample("theta", dist.Normal(mu, scale))
            else:
                theta = mu + scale * pyro.sample("z", dist.Normal(torch.tensor(0.0, dtype=dtype),
                                                                  1.0))
            with pyro.plate("obs", per_group, dim=-2):
                pyro.sample("y", dist.Normal(theta, 1.0), obs=y.T)

    return model, y


@pytest.mark.parametrize("guide_cls,groups,per_group,tau,centred", [
    (AutoNormal, 500, 5, 2.0, False), (AutoDiagonalNormal, 1000, 3, 0.1, True)])
def test_converging_hierarchical_fits_do_not_warn_of_divergence(
        float64, guide_cls, groups, per_group, tau, centred):
    """Two fits the first divergence rule (a 100-fold rise of the running average of
    log |w|^2, whatever its sign) called diverging, at steps 6 and 88: the scalar tau,
    whose single squared gradient dips far below its usual size near the optimum, and
    1,000 centred groups whose shrinking scale makes their curvature grow under the
    wide starting guide. Neither runs away (a diverging fit runs hundreds of posterior
    sds off): after 500 steps both are near the method of moments' answer, though not
    at it. The steps from gradients alone are slow here. For the first, mu is 0.3 to
    1.35 below the group means' mean over PYRO_NATGRAD_TEST_SEED_OFFSET=0..11 (its
    posterior sd is 0.09; 0.67 below after 1,000 steps and 0.56 after 3,000 at seed 0,
    where curvature="hvp" is there after 300: see docs/optimizer.rst). For the second,
    tau comes down from its start (3.4) to 0.28 to 0.36 while the data allow at most
    0.17 to 0.25 (the moments' tau^2, the group means' variance less the noise's, is
    negative on 5 of those 12 seeds, so the bound adds two of its standard errors)."""
    model, y = normal_hierarchy(groups, per_group, tau, centred)
    guide, caught = fit_recording_warnings(guide_cls, model, 500)
    assert not [w for w in caught if "diverging" in str(w.message)]
    means = y.mean(-1)
    spread = float(means.var() - 1 / per_group)  # the moments' tau^2
    standard_error = (2 / (groups - 1)) ** 0.5 * float(means.var())  # of that estimate
    largest = (max(spread, 0.0) + 2 * standard_error) ** 0.5
    median = guide.median()
    assert abs(float(median["mu"]) - float(means.mean())) < 2
    assert 1 / 3 < float(median["tau"]) / largest < 3


def test_a_crawling_fit_warns(float64):
    """502 latents, above the mean-field Hessian limit: steps from gradients alone.
    Written non-centred, ``mu`` shares a direction with every group effect and the fit
    crawls: after 500 steps ``mu`` is several posterior sds below the group means' mean
    (its posterior mean, to within the prior's pull), and the warning has said so (at
    step 500: ``mu`` moved 1.7, 1.2 and 0.7 sds one way over steps 200 to 500)."""
    model, y = normal_hierarchy(500, 5, 2.0, centred=False)
    target = float(y.mean())  # the posterior mean of mu, up to the N(0, 10^2) prior's pull
    sd = float(((y.mean(-1).var() + 0.2) / 500) ** 0.5)  # about its posterior sd
    guide, caught = fit_recording_warnings(AutoNormal, model, 500)
    crawl = [str(w.message) for w in caught if "moved steadily" in str(w.message)]
    assert len(crawl) == 1 and "curvature='hvp'" in crawl[0] and "step 500" in crawl[0]
    assert float(guide.median()["mu"]) < target - 3 * sd


@pytest.mark.slow
def test_a_slower_crawl_is_found_by_its_persistence(monkeypatch):
    """The hierarchy above in float32 (other data: ``seed=1``), with the first rule
    (three windows above CRAWL_MOVE) out of reach: the second, five windows in a row
    above CRAWL_CREEP, finds the crawl by step 1,000, while ``mu`` is still several
    posterior sds from the group means' mean (7.2 after 1,000 steps; the warning came at
    step 700, 0.68 guide sds in its last window). On the data of ``seed=0`` the median
    control-variate coefficient (``leave_one_out_median_cv``) took ``mu`` to 2.0
    posterior sds off by step 100 (4.7 with the mean) and 1.4 by step 1,000, creeping
    below CRAWL_CREEP: unnoticed, as docs/optimizer.rst says of such creeps."""
    from pyro_natgrad import diagnostics

    monkeypatch.setattr(diagnostics, "CRAWL_MOVE", math.inf)
    model, y = normal_hierarchy(500, 5, 2.0, centred=False, seed=1, dtype=torch.float32)
    target = float(y.mean())
    sd = float(((y.mean(-1).var() + 0.2) / 500) ** 0.5)
    pyro.set_rng_seed(0)
    guide = fresh(AutoNormal, model)
    svi = SVI(model, guide, NaturalGradient(guide), Trace_ELBO())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(1000):
            svi.step()
            if any("moved steadily" in str(w.message) for w in caught):
                break
    crawl = [str(w.message) for w in caught if "moved steadily" in str(w.message)]
    assert len(crawl) == 1 and "over the last 500 steps" in crawl[0], crawl
    assert guide.median()["mu"].dtype == torch.float32
    assert float(guide.median()["mu"]) < target - 3 * sd


def test_a_converged_fit_does_not_warn_of_a_crawl(float64):
    """The data of the tests above, written centred: the fit converges within 100 steps,
    and nothing warns in 600."""
    model, y = normal_hierarchy(500, 5, 2.0, centred=True)
    sd = float(((y.mean(-1).var() + 0.2) / 500) ** 0.5)
    guide, caught = fit_recording_warnings(AutoNormal, model, 600)
    assert not [w for w in caught if issubclass(w.category, NaturalGradientWarning)]
    assert abs(float(guide.median()["mu"]) - float(y.mean())) < 0.1 * sd


@pytest.mark.parametrize("power", [1.0, 0.5, 0.1])
def test_the_trust_region_cut_finds_the_bound(power):
    """``_cut_to_bound`` against the closed form: with ``excess(r) = C r^p`` (a direction
    that lengthens as the step shortens, for ``p < 1``) the bound is met at
    ``r = C^(-1/p)``, and the step returned is within it."""
    C = 1e3
    r = _cut_to_bound(1.0, C, lambda r: C * r ** power)
    assert C * r ** power <= 1 + 1e-9
    assert r == pytest.approx(C ** (-1 / power), rel=1e-6)


def test_a_trial_step_whose_root_kl_overflows_is_not_taken():
    """A shorter trial step whose root KL overflows (``inf``: a float32 quadratic form
    of its longer direction) was returned unchecked: here a step of 0.1 with an
    infinite KL. The search now backs off from it and meets the bound, at 1e-7."""
    def excess_at(r):
        return r * 1e7 if r <= 1e-6 else math.inf

    r = _cut_to_bound(1.0, 10.0, excess_at)
    assert excess_at(r) <= 1 + 1e-9
    assert r == pytest.approx(1e-7, rel=1e-6)
    # only overflowing trials: no step rather than an unchecked one
    assert _cut_to_bound(1.0, 10.0, lambda r: math.inf if r > 0 else 0.0) == 0.0


def test_skips_after_a_step_without_trust_region_name_max_kl(float64):
    """With ``max_kl=None`` the first step on the regression above put the noise scale's
    unconstrained value at about 3e9, and every later step was skipped with a warning
    that blamed the gradient alone. The warning now names ``max_kl``."""
    model, _, _ = regression_in_units_of_1e4()
    pyro.set_rng_seed(0)
    guide = fresh(AutoNormal, model)
    svi = SVI(model, guide, NaturalGradient(guide, max_kl=None), Trace_ELBO())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            svi.step()
    skips = [str(w.message) for w in caught if "step skipped" in str(w.message)]
    assert skips and all("set max_kl" in m for m in skips), skips


def test_hvp_in_float32(rng):
    """float32 parameters and data: the Newton steps still put the mean within 1e-3
    mean-field sds of the exact posterior mean (float64 closed form) in 10 steps."""
    X, y = diabetes(torch.float32)
    mu, _, Lam, _ = exact_posterior(*diabetes())
    guide = fresh(AutoNormal)
    svi = SVI(blr_model, guide, NaturalGradient(guide, curvature="hvp"), Trace_ELBO())
    for _ in range(10):
        svi.step(X, y)
    with torch.no_grad():
        m, _ = guide_moments(guide)
    assert m.dtype == torch.float32
    assert float(((m.double() - mu) * Lam.diagonal().sqrt()).abs().max()) < 1e-3


@pytest.mark.slow
def test_hvp_with_informative_data_far_from_the_start(float64):
    """2,000 independent latents, N(0, 1) prior, one observation each with noise sd 0.01:
    posterior sds 0.01, ten times narrower than AutoNormal's start, and means up to 400
    of them away. curvature="hvp" takes Newton steps for the means, so after 100 steps
    every mean is within 0.01 posterior sds and every sd within 1% (measured: means
    exact after 50, sds within 1e-4 after 100; after 50 the worst sd was 41% off).
    Gradient-only steps ("none", the default at this size) need 150
    steps for 90% of the elements to be within 3%, and leave the few most extreme ones
    stuck far away (330 sds after 200 steps, measured; see the next test):
    docs/optimizer.rst recommends "hvp" here. The posterior is closed form."""
    model, post_mean, post_sd = _observed_plate(
        torch.randn(2000, generator=generator(5), dtype=F64), 0.01)
    pyro.set_rng_seed(0)
    guide = AutoNormal(model)
    svi = SVI(model, guide, NaturalGradient(guide, curvature="hvp"), Trace_ELBO())
    for _ in range(100):
        svi.step()
    sd, m = guide.scales.z.detach(), guide.locs.z.detach()
    assert float(((m - post_mean) / post_sd).abs().max()) < 0.01
    assert float((sd / post_sd - 1).abs().max()) < 0.01


def test_gradient_only_variances_do_not_ratchet_far_from_the_mean(float64):
    """The data of the previous test with the defaults (gradients alone). Far from the
    mean a one-draw precision gradient is mostly noise, ``eps * w`` with ``w`` the
    whitened mean gradient. A precision that could grow (1 + x)-fold in a step but shrink
    only 2-fold ratcheted upwards under it: after 200 steps 60 of the 2,000 variances
    were below a quarter of the posterior's, and the 90% quantile of the means was 4.5
    posterior sds off after 100 steps (measured; 60 to 70 and 0.6 to 4.5 over seeds
    0-3). The symmetric cap (``NOISY_VARIANCE_FACTOR``): 13 and 0.22 (13 to 25 and 0.1
    to 0.5 over those seeds). The posterior is closed form."""
    model, post_mean, post_sd = _observed_plate(
        torch.randn(2000, generator=generator(5), dtype=F64), 0.01)
    pyro.set_rng_seed(0)
    guide = AutoNormal(model)
    svi = SVI(model, guide, NaturalGradient(guide), Trace_ELBO())
    for t in range(200):
        svi.step()
        if t + 1 == 100:
            off = ((guide.locs.z.detach() - post_mean) / post_sd).abs()
            assert float(off.quantile(0.9)) < 0.5
    collapsed = guide.scales.z.detach() < 0.5 * post_sd
    assert int(collapsed.sum()) < 30


def test_hvp_from_a_far_start(float64):
    """An independent Gaussian posterior N(x/2, I/2) over 300 latents whose mean is about
    21 posterior sds from AutoNormal's start (init_scale 0.1): curvature="hvp" is exact
    after 100 steps, where gradient-only steps may still be far (the exact gap is closed
    form). Its trust region, ``max_kl`` per latent, measures the mean's steps in the
    Newton matrix that starts from the guide's narrow first precision; with ``max_kl``
    for all 300 latents together (and a cut that let steps overrun it) it was 59,300
    nats away after 100 steps. Before the mean-field trust region counted the
    variance's growth in the mean's move (``step_limit``), "none" was 2,380 nats away
    after 100 steps; over seed offsets 0-7 it was 0.009 to 258 nats away after 100 (57
    on the suite's draws), and exact after 300."""
    d = 300
    data = 30 + torch.randn(d, generator=generator(0), dtype=F64)
    model = _vector_model(d, data)

    def gap(guide):
        m, s = guide.locs.z.detach(), guide.scales.z.detach()
        r = s.square() / 0.5
        return float((m - data / 2).square().sum() + 0.5 * (r - 1 - r.log()).sum())

    gaps = {}
    for curvature, steps in (("hvp", 400), ("none", 300)):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoNormal(model)
        svi = SVI(model, guide, NaturalGradient(guide, curvature=curvature), Trace_ELBO())
        for t in range(steps):
            svi.step()
            if t + 1 in (100, 300):
                gaps[curvature, t + 1] = gap(guide)
        gaps[curvature, steps] = gap(guide)
    assert gaps["hvp", 400] < 1e-6 and gaps["hvp", 100] < 1e-6
    assert gaps["none", 300] < 1e-6 and gaps["none", 100] < 1000


def _beta_logit_mean_field_optimum():
    """The best Gaussian ``N(m, s^2)`` for ``log p(z) = 1.5 log sigmoid(z) + 0.5 log
    sigmoid(-z)`` (a Beta(0.5, 0.5) prior and one success, on the logit scale), by
    Gauss-Hermite quadrature of the ELBO and scipy's optimizer: independent of the library."""
    import numpy as np
    from scipy.optimize import minimize
    from scipy.special import log_expit

    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    weights = weights / weights.sum()

    def negative_elbo(x):
        z = x[0] + np.exp(x[1]) * nodes
        return -(weights @ (1.5 * log_expit(z) + 0.5 * log_expit(-z))) - x[1]

    m, log_s = minimize(negative_elbo, [0.0, 0.0], method="Nelder-Mead",
                        options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 4000}).x
    return m, math.exp(log_s)


@pytest.mark.slow
@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoDiagonalNormal])
def test_model_hessian_steps_stay_put_where_the_curvature_vanishes_in_the_tails(float64,
                                                                               guide_cls):
    """A log-concave posterior whose Hessian vanishes in both tails. With the running
    precision free to fall to a single tail draw's Hessian, the Newton steps ``P^{-1} g``
    grew as P fell: the default AutoNormal's mean was 1185 at step 100 and the ELBO 262
    nats from its optimum at step 300 (seed 0; 4 of 10 seeds diverged), while
    curvature='none' and full-rank guides converged. Now P's Gaussian can at most double
    its variance per step, like the guide's."""
    def model():
        p = pyro.sample("p", dist.Beta(torch.tensor(0.5), torch.tensor(0.5)))
        pyro.sample("x", dist.Bernoulli(p), obs=torch.tensor(1.0))

    m, s = _beta_logit_mean_field_optimum()
    for seed in ((0, 1) if guide_cls is AutoNormal else (4, 9)):  # seeds that diverged
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        guide = guide_cls(model)
        svi = SVI(model, guide, NaturalGradient(guide), Trace_ELBO())
        for _ in range(300):
            svi.step()
        posterior = guide.get_posterior() if guide_cls is AutoDiagonalNormal else None
        loc = float(posterior.mean if posterior is not None else guide.locs.p)
        scale = float(posterior.stddev if posterior is not None else guide.scales.p)
        assert abs(loc - m) < 0.15 * s and abs(scale / s - 1) < 0.15, (seed, loc, scale, m, s)


@pytest.mark.parametrize("rho", [1.0, 0.7, 0.3])
@pytest.mark.parametrize("seed", range(4))
def test_halving_limit_is_the_largest_step_that_keeps_half_the_precision(seed, rho):
    """``_halving_limit``: the largest ``r <= rho`` with ``(1 - r) P0 + r T >= P0 / 2``,
    checked against the generalized eigenvalues of ``(T - P0, P0)`` from scipy (the
    limit is ``r <= 1 / (2 max(0, -lambda_min))``), for each way of giving ``P0``: as a
    matrix, by the whitened change, and by the covariance factor of a full-rank guide."""
    import scipy.linalg

    from pyro_natgrad.optim import _halving_limit

    g = CPUDraws(seed)
    d = 6
    M = g.randn(d, d, dtype=torch.float64)
    P0 = M @ M.mT + 0.5 * torch.eye(d, dtype=torch.float64)
    N = g.randn(d, d, dtype=torch.float64)
    # symmetric, indefinite for odd seeds (a non-log-concave draw), else positive definite
    T = N @ N.mT * 0.2 + (-1.0 if seed % 2 else 0.1) * torch.eye(d, dtype=torch.float64)
    lam = scipy.linalg.eigh((T - P0).cpu().numpy(), P0.cpu().numpy(), eigvals_only=True)[0]
    want = rho if lam >= -0.5 / rho else 0.5 / -lam

    L = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(P0)))
    X = L.mT @ (T - P0) @ L
    for got in (_halving_limit(P0, T, rho), _halving_limit(None, T, rho, whitened_change=X),
                _halving_limit(None, T, rho, cov_factor=L)):
        assert got == pytest.approx(want, rel=1e-9)
    if want < rho:  # the limit binds: the halved precision is singular there
        A = (1 - want) * P0 + want * T - P0 / 2
        assert abs(float(torch.linalg.eigvalsh(A)[0])) < 1e-8 * float(P0.norm())


# ----------------------------------------------------------------------------------------
# several particles with a global latent and a plate of local ones
# ----------------------------------------------------------------------------------------
PARTICLES_N = 30


def _particles_data():
    return 3 + 1.2 * torch.randn(PARTICLES_N, generator=generator(0), dtype=torch.float64)


def particles_model(x, batch=None):
    """mu ~ N(0, 10^2), z_i ~ N(mu, 1), x_i ~ N(z_i, 0.5^2): linear-Gaussian."""
    mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), 10.0))
    with pyro.plate("data", PARTICLES_N, subsample_size=batch) as i:
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("obs", dist.Normal(z, 0.5), obs=x[i])


def _particles_optimum(x):
    """The posterior mean (the mean-field optimum's mean) and the mean-field sds
    ``P_ii^{-1/2}`` of the precision ``P`` written out by hand."""
    n = PARTICLES_N
    P = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    P[0, 0] = 1 / 100 + n
    P[0, 1:] = P[1:, 0] = -1.0
    P[1:, 1:] = torch.eye(n, dtype=torch.float64) * (1 + 4)
    b = torch.cat([torch.zeros(1, dtype=torch.float64), 4 * x])
    mean = torch.linalg.solve(P, b)
    sd = P.diagonal().rsqrt()
    return (mean[0], sd[0]), (mean[1:], sd[1:])


@pytest.mark.parametrize("curvature", ["none", "auto"])
def test_sequential_particles_with_subsampled_locals(float64, rng, curvature):
    """Trace_ELBO(num_particles=4) over a subsampled plate of local latents: each
    particle draws its own subsample, and the ELBO averages over all 4, so a local
    visited by one particle has a quarter of the gradient (and of the precision target)
    of one visit. Its steps were taken as if from one visit: the locals' sds ended up
    about 1.5 times too wide (the model's Hessian) or collapsed to a quarter and their
    means 6 sds off (gradients alone), silently. Against the mean-field optimum in
    closed form.

    Known, not fixed: this passes on its seeds, not on all. Over
    PYRO_NATGRAD_TEST_SEED_OFFSET=0..11 (curvature="none", at 43253b5) one local's mean
    was still 0.61, 0.32 and 0.28 sds off after 300 steps on offsets 2, 7 and 11 (0.15
    after 600 on offset 2; the rest within 0.12). On offset 2 it is an element whose sd
    fell to 0.68 of its optimum by step 100, its mean then 3.4 sds behind, and both
    recover slowly (halving every 100 steps or so)."""
    x = _particles_data()
    (m_mu, s_mu), (m_z, s_z) = _particles_optimum(x)
    guide = AutoNormal(particles_model)
    svi = SVI(particles_model, guide, NaturalGradient(guide, curvature=curvature),
              Trace_ELBO(num_particles=4))
    for _ in range(300):
        assert math.isfinite(svi.step(x, 10))
    ratio = guide.scales.z.detach() / s_z
    assert float((ratio.log().abs()).max()) < math.log(1.05), ratio
    assert float(((guide.locs.z.detach() - m_z) / s_z).abs().max()) < 0.15
    assert abs(float(guide.locs.mu.detach()) - float(m_mu)) < 0.15 * float(s_mu)


def test_vectorised_particles_with_a_global_and_local_latents(float64, rng):
    """Vectorised particles draw a scalar global as (k, 1) beside the locals' (k, n):
    the joint Hessian step packed every site with the first site's leading dims and
    failed at the first step (a RuntimeError from torch.cat). With the model's Hessian
    the fit is the mean-field optimum in closed form within a few steps."""
    x = _particles_data()
    (m_mu, s_mu), (m_z, s_z) = _particles_optimum(x)
    guide = AutoNormal(particles_model)
    loss = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(particles_model, guide, NaturalGradient(guide), loss)
    for _ in range(30):
        assert math.isfinite(svi.step(x))
    torch.testing.assert_close(guide.locs.z.detach(), m_z, rtol=0, atol=1e-6)
    torch.testing.assert_close(guide.scales.z.detach(), s_z, rtol=1e-6, atol=0)
    assert abs(float(guide.locs.mu.detach()) - float(m_mu)) < 1e-6
    assert abs(float(guide.scales.mu.detach()) / float(s_mu) - 1) < 1e-6


@pytest.mark.parametrize("curvature", ["none", "auto"])
def test_model_param_beside_subsampled_locals(float64, rng, curvature):
    """A ``pyro.param`` in the model (the noise sd) beside AutoNormal locals of a
    subsampled plate: z_i ~ N(0, 1), y_i ~ N(z_i, sigma^2), 20 of 200 per step. The
    param goes to the base optimizer (Adam) unchanged, and the locals, whose likelihood
    moves with it, take natural-gradient steps on their subsample: each q(z_i) ends on
    the exact posterior given the current sigma, N(y_i / (1 + sigma^2),
    sigma^2 / (1 + sigma^2)). Adam's sigma heads for the maximum of the marginal
    likelihood y_i ~ N(0, 1 + sigma^2), sigma^2 = mean(y^2) - 1, but slowly under the
    minibatch noise (about 30 % high after 1,000 steps, as with Adam on every
    parameter), so only its direction is checked."""
    n, batch = 200, 20
    gen = generator(4)
    y = torch.randn(n, generator=gen, dtype=F64) + 0.6 * torch.randn(n, generator=gen,
                                                                      dtype=F64)
    start = 1.5

    def model(y):
        sigma = pyro.param("sigma", torch.tensor(start, dtype=F64),
                           constraint=dist.constraints.positive)
        with pyro.plate("data", n, subsample_size=batch) as i:
            z = pyro.sample("z", dist.Normal(y.new_zeros(()), 1.0))
            pyro.sample("y", dist.Normal(z, sigma), obs=y[i])

    guide = AutoNormal(model)
    opt = NaturalGradient(guide, curvature=curvature,
                          base_optimizer=pyro.optim.Adam({"lr": 0.02}))
    svi = SVI(model, guide, opt, Trace_ELBO())
    for _ in range(600):
        assert math.isfinite(svi.step(y))
    assert opt.routing()["sigma"].startswith("base optimizer")
    best = (float(y.square().mean()) - 1) ** 0.5
    sigma = float(pyro.param("sigma").detach())
    assert abs(math.log(sigma / best)) < 0.5 * abs(math.log(start / best)), (sigma, best)
    post_sd = (sigma ** 2 / (1 + sigma ** 2)) ** 0.5
    ratio = guide.scales.z.detach() / post_sd
    # The locals follow the falling sigma a little behind, the gradient-only steps more
    # (sds up to 6 % wide and means 0.3 sd off at 600 steps, 2 % and 0.05 sd at 1,000),
    # the model's Hessian less (4 % and 0.1 sd): the running precision averages visits.
    # Over 10 seeds the worst were 12 % and 0.30 sd, and 4.4 % and 0.20 sd (one GPU
    # run: 0.50 and 0.17 sd).
    sd_tol, mean_tol = {"none": (1.15, 0.6), "auto": (1.06, 0.25)}[curvature]
    assert float(ratio.log().abs().max()) < math.log(sd_tol), ratio
    err = (guide.locs.z.detach() - y / (1 + sigma ** 2)) / post_sd
    assert float(err.abs().max()) < mean_tol, err


def test_guide_list_over_a_subsampled_plate_steps_without_the_hessian(float64, rng):
    """The joint Hessian over the parts of an AutoGuideList with subsampled locals is
    not implemented: asking for "hessian" is an error at the first step that leaves the
    parameters as they were, and "auto" takes gradient-only steps, which reach the
    mean-field optimum (closed form) as a single AutoNormal's do. The list opens the
    plates, so their subsample is in its trace, not the part's: the part's draws were
    taken for the full plate, and the first step crashed (RuntimeError).

    Known, not fixed: with one particle the slowest local converges slowly on some
    draws. Over PYRO_NATGRAD_TEST_SEED_OFFSET=0..11 (at 43253b5), after 600 steps its
    mean was 0.13 to 3.0 sds off (above the bound below on offsets 2, 5, 7 and 11) and
    its sd up to 1.39 times the optimum's; after 1,200 steps 0.03 to 0.97 sds and
    1.08 times."""
    x = _particles_data()

    def make():
        pyro.clear_param_store()
        guide = AutoGuideList(particles_model)
        guide.append(AutoNormal(poutine.block(particles_model, expose=["mu"])))
        guide.append(AutoNormal(poutine.block(particles_model, expose=["z"])))
        guide(x, 10)
        return guide

    guide = make()
    before = store_snapshot()
    svi = SVI(particles_model, guide, NaturalGradient(guide, curvature="hessian"), Trace_ELBO())
    with pytest.raises(ValueError, match="curvature='hessian' with subsampled plates needs a "
                                         "single AutoNormal guide; use curvature='none'"):
        svi.step(x, 10)
    after = store_snapshot()
    assert all(torch.equal(after[k], before[k]) for k in before)
    guide = make()
    opt = NaturalGradient(guide)
    svi = SVI(particles_model, guide, opt, Trace_ELBO())
    for _ in range(600):
        assert math.isfinite(svi.step(x, 10))
    assert not opt._use_curvature and not opt._minibatch_curvature
    (m_mu, s_mu), (m_z, s_z) = _particles_optimum(x)
    ratio = guide[1].scales.z.detach() / s_z
    assert float(ratio.log().abs().max()) < math.log(1.03), ratio
    assert float(((guide[1].locs.z.detach() - m_z) / s_z).abs().max()) < 0.6
    assert abs(float(guide[0].locs.mu.detach() - m_mu)) < 0.6 * float(s_mu)


def test_a_list_of_full_rank_parts_holds_its_clock_from_a_narrow_start(float64):
    """``AutoGuideList`` of ``AutoMultivariateNormal(w)`` and ``AutoMultivariateNormal(b)``
    from ``init_scale=1e-5``: its step-size clock advanced while the precisions still grew
    from far away, and after 100 steps they were 8e-2 off the optimum's blocks (one
    ``AutoMultivariateNormal``: 2e-11; with the hold, 8e-10). The optimal block-diagonal
    Gaussian has the exact posterior's mean and the blocks of its precision."""
    X, y = diabetes()
    mean, _, Lam, _ = exact_posterior(X, y)
    d = X.shape[1]
    guide = AutoGuideList(blr_model)
    guide.append(AutoMultivariateNormal(poutine.block(blr_model, expose=["w"]), init_scale=1e-5))
    guide.append(AutoMultivariateNormal(poutine.block(blr_model, expose=["b"]), init_scale=1e-5))
    svi = SVI(blr_model, guide, NaturalGradient(guide), Trace_ELBO())
    for _ in range(100):
        svi.step(X, y)
    qw, qb = guide[0].get_posterior(), guide[1].get_posterior()
    torch.testing.assert_close(qw.precision_matrix.detach(), Lam[:d, :d], rtol=1e-6, atol=0)
    torch.testing.assert_close(qb.precision_matrix.detach(), Lam[d:, d:], rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.cat([qw.loc, qb.loc]).detach(), mean, rtol=1e-6,
                               atol=1e-8)


def test_a_callable_loss_is_warned_about_when_the_model_curvature_is_used(float64):
    """A loss given to SVI as a callable cannot be checked: scaled (ELBO / n) it left a
    full-rank guide's mean 21 posterior sds off after 1,000 steps, every sd exact, with no
    warning. One warning when the model's curvature is in use; none without it."""
    X, y = diabetes()
    n = X.shape[0]

    def scaled(model, guide, *args):
        return Trace_ELBO().differentiable_loss(model, guide, *args) / n

    for curvature, warned in (("auto", True), ("none", False)):
        pyro.clear_param_store()
        guide = AutoMultivariateNormal(blr_model)
        svi = SVI(blr_model, guide, NaturalGradient(guide, curvature=curvature), scaled)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            svi.step(X, y)
            svi.step(X, y)
        messages = [str(w.message) for w in caught if "not a Pyro ELBO" in str(w.message)]
        assert len(messages) == (1 if warned else 0), messages


def test_a_guide_list_with_a_hand_written_part_says_its_curvature_is_off(float64):
    """A hand-written part provides latents the model's Hessian cannot be conditioned on
    (the list's Gaussian parts then step from gradients alone): said once, and not with
    curvature='none' or with Gaussian and ``AutoDelta`` parts only."""
    def b_guide(X, y):
        loc = pyro.param("b_loc", X.new_zeros(()))
        scale = pyro.param("b_scale", X.new_ones(()), constraint=dist.constraints.positive)
        pyro.sample("b", dist.Normal(loc, scale))

    guide = AutoGuideList(blr_model)
    guide.append(AutoNormal(poutine.block(blr_model, expose=["w"])))
    guide.append(b_guide)
    with pytest.warns(NaturalGradientWarning, match=r"\(AutoCallable\).*gradients alone"):
        NaturalGradient(guide)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NaturalGradientWarning)
        NaturalGradient(guide, curvature="none")
        NaturalGradient(_delta_list(blr_model, ["w"], ["b"]))


def _delta_list(model, gaussian, point, part=AutoNormal):
    guide = AutoGuideList(model)
    guide.append(part(poutine.block(model, expose=gaussian)))
    guide.append(AutoDelta(poutine.block(model, expose=point)))
    return guide


@pytest.mark.parametrize("part", [AutoNormal, AutoMultivariateNormal])
def test_a_guide_list_with_an_autodelta_part_takes_the_models_curvature(float64, part):
    """Beside an ``AutoDelta`` part, the Gaussian part steps with the model's Hessian at
    the point values (it took gradient-only steps, which left it 2.5 mean-field sds off
    after 1,500 steps). With the point value held fixed (a base optimizer of lr 0) a
    linear-Gaussian model's conditional optimum is reached exactly (the trust region lets
    the variances grow from ``init_scale`` over the first steps): the mean solves
    ``Lambda_ww m = X^T (y - b) / sigma^2``, and the covariance is ``Lambda_ww^{-1}``
    (its diagonal, for a mean-field part)."""
    X, y = _small_data()
    guide = _delta_list(blr_model, ["w"], ["b"], part)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NaturalGradientWarning)
        opt = NaturalGradient(guide, base_optimizer=pyro.optim.SGD({"lr": 0.0}))
    svi = SVI(blr_model, guide, opt, Trace_ELBO())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "NaturalGradient: 1 parameter", NaturalGradientWarning)
        for _ in range(15):
            svi.step(X, y)
    b = guide[1].b.detach()
    Lww = X.T @ X / SIGMA ** 2 + torch.eye(X.shape[1], dtype=F64) / TAU_W ** 2
    mean = torch.linalg.solve(Lww, X.T @ (y - b) / SIGMA ** 2)
    posterior = guide[0].get_posterior(X, y) if part is AutoMultivariateNormal else None
    loc = guide[0].locs.w.detach() if posterior is None else posterior.loc
    assert torch.allclose(loc, mean, atol=1e-8, rtol=0), (loc, mean)
    if posterior is None:
        expected = Lww.diagonal().rsqrt()
        assert torch.allclose(guide[0].scales.w.detach(), expected, rtol=1e-8)
    else:
        assert torch.allclose(posterior.covariance_matrix, torch.linalg.inv(Lww), rtol=1e-8)


def _delta_below(y):
    """``mu ~ N(0, 5^2)``, ``theta_j ~ N(mu, 1)`` (the point part), ``y_j ~ N(theta_j, 1)``:
    the AutoDelta's site depends on the Gaussian part's latent."""
    mu = pyro.sample("mu", dist.Normal(y.new_zeros(()), 5.0))
    with pyro.plate("groups", y.shape[0]):
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        pyro.sample("y", dist.Normal(theta, 1.0), obs=y)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_an_autodelta_site_below_the_gaussian_latents_enters_their_curvature(
        float64, curvature):
    """The point part's density ``N(theta_j; mu, 1)`` depends on ``mu``: the precision of
    ``q(mu)`` given ``theta`` is ``1/25 + J`` (the generalized Gauss-Newton route counts
    it with the prior, exactly, not with the likelihood), its mean
    ``sum(theta) / (1/25 + J)`` (the trust region lets the variance grow from
    ``init_scale`` over the first steps)."""
    y = torch.tensor([0.3, -1.2, 2.5, 0.8], dtype=F64)
    guide = _delta_list(_delta_below, ["mu"], ["theta"])
    opt = NaturalGradient(guide, curvature=curvature, base_optimizer=pyro.optim.SGD({"lr": 0.0}))
    svi = SVI(_delta_below, guide, opt, Trace_ELBO())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "NaturalGradient: 1 parameter", NaturalGradientWarning)
        for _ in range(15):
            svi.step(y)
    theta = guide[1].theta.detach()
    precision = torch.tensor(1 / 25 + y.shape[0], dtype=F64)
    assert torch.allclose(guide[0].scales.mu.detach(), precision.rsqrt(), rtol=1e-8)
    assert torch.allclose(guide[0].locs.mu.detach(), theta.sum() / precision, atol=1e-8)


def test_the_gaussian_part_keeps_up_with_an_autodelta_part_under_adam(float64):
    """The optimum of the Gaussian part moves as Adam steps the ``AutoDelta``'s intercept:
    the step-size clock holds while the mean's Newton direction keeps its course
    (``HOLD_MIN_DRIFT``). With the decay alone the mean fell 0.43 conditional sds behind
    here (0.4-0.7 on other data) by step 200; with the hold, 0.16."""
    X, y = _small_data(n=50, d=3, seed=0)
    y = y + 1.5
    pyro.set_rng_seed(1)
    guide = _delta_list(blr_model, ["w"], ["b"])
    svi = SVI(blr_model, guide, NaturalGradient(guide), Trace_ELBO())
    Lww = X.T @ X / SIGMA ** 2 + torch.eye(X.shape[1], dtype=F64) / TAU_W ** 2

    def lag():
        mean = torch.linalg.solve(Lww, X.T @ (y - guide[1].b.detach()) / SIGMA ** 2)
        return float(((guide[0].locs.w.detach() - mean) * Lww.diagonal().sqrt()).abs().max())

    lag = _max_lag(svi, (X, y), lag)
    assert lag < 0.3, lag


def _max_lag(svi, args, lag, steps=200, start=100):
    """The largest ``lag()`` after each of steps ``start + 1`` to ``steps`` of ``svi``
    (the one warning about the base optimizer's parameter silenced)."""
    lags = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "NaturalGradient: 1 parameter", NaturalGradientWarning)
        for t in range(steps):
            svi.step(*args)
            if t >= start:
                lags.append(lag())
    return max(lags)


def _intercept_param_model(X, y):
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[-1]), TAU_W).to_event(1))
    b = pyro.param("b", X.new_zeros(()))  # the model's own parameter: Adam steps it
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w + b, SIGMA), obs=y)


@pytest.mark.parametrize("guide_cls", [AutoLowRankMultivariateNormal, AutoMultivariateNormal,
                                       AutoNormal])
def test_every_gaussian_guide_keeps_up_with_a_model_parameter_under_adam(float64, guide_cls):
    """The guide's optimum (the posterior of ``w`` given the intercept) moves as Adam steps
    the model's ``pyro.param``; the drift hold keeps the mean within 0.3 conditional sds
    of it. The low-rank Hessian step lacked the hold: its mean lagged 1.0-1.2 sds behind
    after step 100, so that the intercept converged more slowly than under Adam alone."""
    gen = generator(0)
    X = torch.randn(100, 5, generator=gen, dtype=F64) + 1.0  # w correlated with b
    y = X @ torch.linspace(-1, 1, 5, dtype=F64) + 3.0 + 0.5 * torch.randn(100, generator=gen,
                                                                         dtype=F64)
    P = X.T @ X / SIGMA ** 2 + torch.eye(5, dtype=F64) / TAU_W ** 2
    sd = torch.linalg.inv(P).diagonal().sqrt()
    pyro.set_rng_seed(0)
    guide = guide_cls(_intercept_param_model)
    svi = SVI(_intercept_param_model, guide, NaturalGradient(guide), Trace_ELBO())

    def lag():
        mean = torch.linalg.solve(P, X.T @ (y - pyro.param("b").detach()) / SIGMA ** 2)
        loc = guide.locs.w if guide_cls is AutoNormal else guide.loc
        return float(((loc.detach() - mean) / sd).abs().max())

    lag = _max_lag(svi, (X, y), lag)
    assert lag < 0.3, lag


def _random_log_joint(x):
    mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), 2.0))
    noise = 1e-3 * torch.randn((), dtype=x.dtype)  # a log joint that is random at a draw
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(mu + noise, 1.0), obs=x)


@pytest.mark.parametrize("refusal", ["curvature", "loss"])
def test_a_refused_step_drops_its_gradients_and_draws(float64, refusal):
    """A step refused with a ValueError (the model's Hessian asked of a random log joint;
    a loss that is not the KL ELBO) left its gradients on the parameters: the next step,
    after the user's fix, added its own to them and stepped twice as far. Now the
    parameters are unchanged, their gradients are gone and the guide's recorded draws too,
    so the fixed run's first step equals a fresh run's, bit for bit."""
    x = torch.tensor([0.3, -0.4, 1.1], dtype=F64)
    guide = AutoNormal(_random_log_joint)
    pyro.set_rng_seed(0)
    if refusal == "curvature":
        svi = SVI(_random_log_joint, guide, NaturalGradient(guide, curvature="hessian"),
                  Trace_ELBO())
    else:
        svi = SVI(_random_log_joint, guide, NaturalGradient(guide), pyro.infer.RenyiELBO())
    with pytest.raises(ValueError):
        svi.step(x)
    store = pyro.get_param_store()
    before = {k: v.unconstrained().detach().clone() for k, v in store.items()}
    assert all(v.unconstrained().grad is None for v in store.values())
    state = rng_state_now()

    def first_step():
        set_rng_state(state)
        with torch.no_grad():
            for k, v in store.items():
                v.unconstrained().copy_(before[k])
        opt = NaturalGradient(guide, curvature="none")
        SVI(_random_log_joint, guide, opt, Trace_ELBO()).step(x)
        return {k: v.unconstrained().detach().clone() for k, v in store.items()}

    after_refusal = first_step()
    for v in store.values():
        v.unconstrained().grad = None
    fresh = first_step()
    assert all(torch.equal(after_refusal[k], fresh[k]) for k in fresh)
    assert any(not torch.equal(fresh[k], before[k]) for k in fresh)


@pytest.mark.parametrize("foreign", ["adam", "none", "int"])
def test_set_state_refuses_what_is_no_checkpoint_and_changes_nothing(float64, foreign):
    """A Pyro optimizer's ``get_state()`` (keyed by parameter names) was accepted and
    wiped the step-size clocks (the step size went back to 1) and running precisions;
    ``None`` or a malformed dict raised AttributeError. Each is now a ValueError, and the
    state is as it was."""
    X, y = _small_data()
    guide = AutoMultivariateNormal(blr_model)
    opt = NaturalGradient(guide)
    svi = SVI(blr_model, guide, opt, Trace_ELBO())
    adam = pyro.optim.Adam({"lr": 0.01})
    for _ in range(15):
        svi.step(X, y)
    adam([v.unconstrained() for v in pyro.get_param_store().values()])
    before = opt.get_state()
    assert before["natural_gradient"]["curvature"]["t"] > 0
    state = {"adam": adam.get_state(), "none": None, "int": {"natural_gradient": 3}}[foreign]
    with pytest.raises(ValueError, match="expects the dict of NaturalGradient.get_state"):
        opt.set_state(state)
    after = opt.get_state()
    assert after["natural_gradient"].keys() == before["natural_gradient"].keys()
    for key, value in before["natural_gradient"].items():
        for name, v in value.items():
            w = after["natural_gradient"][key][name]
            assert torch.equal(v, w) if torch.is_tensor(v) else v == w, (key, name)


def _cauchy_two_modes():
    y = torch.tensor([-5.0, -5.2, -4.8, 5.0, 5.1, 30.0], dtype=F64)
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2, dtype=F64), 10.0).to_event(1))
    pyro.sample("y", dist.StudentT(1.0, mu.sum(), 0.5).expand([6]).to_event(1), obs=y)
    pyro.sample("y2", dist.StudentT(1.0, mu[0] - mu[1], 0.5).expand([6]).to_event(1), obs=y)


@pytest.mark.parametrize("seed", [1, 2])
def test_ggn_settles_on_a_cauchy_likelihood(float64, seed):
    """Cauchy noise with an outlier: several modes, whose full-rank ELBO optima have
    losses 55.1 and 60.1 (where gradient-only steps settle on every seed), 65.0 and
    70.1 (mu's sum and difference each near a cluster of the data, which the
    Gauss-Newton steps found on 3 of 12 seeds). The Hessian is indefinite over much of
    the guide's mass, and on these seeds the defaults wandered (median loss 96.6 and
    97.4 over the last 100 of 600 steps; as much with StepSize(initial=0.5) or
    max_kl=1: docs/optimizer.rst). The positive semi-definite Gauss-Newton matrix
    settles: the guide's mean stays put over the last 100 steps (within 0.09 guide sds
    on 12 seeds) and the median loss is that of a mode, not of the wandering."""
    pyro.set_rng_seed(seed)
    guide = AutoMultivariateNormal(_cauchy_two_modes)
    svi = SVI(_cauchy_two_modes, guide, NaturalGradient(guide, curvature="ggn"), Trace_ELBO())
    losses, locs = [], []
    for t in range(400):
        losses.append(svi.step())
        if t >= 300:
            locs.append(guide.loc.detach().clone())
    assert statistics.median(losses[300:]) < 71
    spread = torch.stack(locs).std(0) / guide.scale.detach()
    assert float(spread.max()) < 0.5, spread
