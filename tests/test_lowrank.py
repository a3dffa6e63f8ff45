"""NaturalGradient with AutoLowRankMultivariateNormal, checked against the closed-form
posterior of a Bayesian linear regression (y ~ N(X w, sigma^2), w ~ N(0, I)), and the
low-rank projection against a direct minimisation written here (dense covariance,
torch autograd and L-BFGS over both factors; the library eliminates the factor by an
eigendecomposition instead)."""

import math
import warnings

import pyro
import pyro.infer.util
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO
from pyro.infer.autoguide import AutoLowRankMultivariateNormal

from pyro_natgrad import NaturalGradient, NaturalGradientWarning
from pyro_natgrad.lowrank import project_lowrank
from tests.seeding import generator

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
    g = generator(seed)
    X = torch.randn(n, d, generator=g, dtype=F64)
    y = X @ torch.linspace(-1, 1, d, dtype=F64) + SIGMA * torch.randn(n, generator=g, dtype=F64)
    return X, y


def model(X, y):
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("n", X.shape[0]):
        pyro.sample("y", dist.Normal((X * w).sum(-1), SIGMA), obs=y)  # broadcasts over particles


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
    """With the model's Hessian (default, small d) the covariance takes the projection
    step; without it (curvature="none") it goes to the base optimizer, with a warning."""
    X, y = data()
    guide = AutoLowRankMultivariateNormal(model, rank=2)
    guide(X, y)
    routes = NaturalGradient(guide).routing()
    assert all(routes[k] == "natural gradient (low-rank Gaussian, latent)"
               for k in ("loc", "cov_factor", "scale_unconstrained")), routes
    opt = NaturalGradient(guide, curvature="none")
    routes = opt.routing()
    assert routes["loc"].startswith("natural gradient (low-rank Gaussian, mean only")
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


@pytest.mark.parametrize("curvature,steps,tol", [("auto", 40, 1e-6), ("none", 400, 0.3)])
def test_svi_reaches_posterior_mean(curvature, steps, tol):
    """With the model's Hessian (default) the mean is exact; with the gradient only,
    close after 400 steps."""
    X, y = data()
    mean, cov, _ = posterior(X, y)
    pyro.set_rng_seed(1)
    guide = AutoLowRankMultivariateNormal(model, rank=2)
    svi = SVI(model, guide, NaturalGradient(guide, curvature=curvature), Trace_ELBO())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NaturalGradientWarning)
        for _ in range(steps):
            assert math.isfinite(svi.step(X, y))
    sd = cov.diagonal().sqrt()
    err = ((guide.loc.detach() - mean).abs() / sd).max()
    assert float(err) < tol, err


# ----------------------------------------------------------------------------------------
# The projection onto the low-rank family, and SVI reaching the low-rank optimum
# ----------------------------------------------------------------------------------------
def kl_objective(P, Sigma):
    """tr(P Sigma) - log|Sigma|: 2 KL(N(0, Sigma) || N(0, P^{-1})) up to a constant."""
    return (P * Sigma).sum() - torch.logdet(Sigma)


def lowrank_cov(C, s):
    W = C * s.unsqueeze(-1)
    return W @ W.T + torch.diag(s.square())


def direct_minimum(P, rank, starts=3, init=None):
    """min over (C, log s) of kl_objective by L-BFGS from random starts (dense), and
    from ``init = (C, s)`` when given."""
    d = P.shape[0]
    best = (math.inf, None)
    for seed in range(starts + (init is not None)):
        if seed == starts:
            C = init[0].clone().requires_grad_()
            u = init[1].log().requires_grad_()
        else:
            g = generator(seed)
            C = torch.randn(d, rank, generator=g, dtype=F64).requires_grad_()
            u = (-0.5 * P.diagonal().log() - torch.rand(d, generator=g, dtype=F64))
            u.requires_grad_()
        opt = torch.optim.LBFGS([C, u], max_iter=400, tolerance_grad=1e-10,
                                tolerance_change=1e-14, history_size=30,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            value = kl_objective(P, lowrank_cov(C, u.exp()))
            value.backward()
            return value

        opt.step(closure)
        with torch.no_grad():
            Sigma = lowrank_cov(C, u.exp())
            value = float(kl_objective(P, Sigma))
        if value < best[0]:
            best = (value, Sigma)
    return best


def random_precision(d, seed, strength=1.0):
    g = generator(seed)
    A = torch.randn(d, d, generator=g, dtype=F64)
    scales = torch.logspace(-1, 1, d, dtype=F64)
    return (strength * A @ A.T / d + torch.eye(d, dtype=F64)) / scales.outer(scales)


# (12, 3, 1): from the mean-field start alone the projection ends 0.011 above the best
# minimum; the Heywood starts find it.
@pytest.mark.parametrize("d,rank,seed", [(6, 1, 0), (6, 2, 1), (12, 3, 2), (12, 3, 1)])
def test_projection_matches_direct_minimisation(d, rank, seed):
    P = random_precision(d, seed)
    C, s = project_lowrank(P, rank)
    assert C.shape == (d, rank) and s.shape == (d,) and C.dtype == F64
    Sigma = lowrank_cov(C, s)
    # The objective has many local minima (which coordinates are Heywood cases), so the
    # random starts alone can stop above the projection; the start at the projection
    # checks that it is a local minimum that the dense L-BFGS cannot improve on.
    value, reference = direct_minimum(P, rank, init=(C, s))
    # The floor s_i >= eps^(1/6) P_ii^(-1/2) is active in Heywood cases (here: seed 0,
    # where the direct minimisation drifts towards s_6 -> 0); it costs < 1e-7.
    assert float(kl_objective(P, Sigma)) <= value + 1e-7
    # the same Gaussian: KL(N(0, Sigma) || N(0, reference)) ~ 0 (entries can differ more
    # along the flat directions of a Heywood case)
    M = torch.linalg.solve(reference, Sigma)
    assert float(0.5 * (M.trace() - d - torch.logdet(M))) < 1e-6
    # first-order conditions, derived by hand: (P - Sigma^{-1}) W = 0 for the factor
    # W = diag(s) C, and diag(Sigma^{-1})_i = P_ii where s_i is inside its bounds
    Sinv = torch.linalg.inv(Sigma)
    W = C * s.unsqueeze(-1)
    assert float(((P - Sinv) @ W).abs().max()) < 1e-6 * float(P.abs().max() * W.abs().max())
    ratio = (s * P.diagonal().sqrt()).log()
    inside = ratio > -math.log(1 / torch.finfo(F64).eps) / 6 + 1e-6
    assert int(inside.sum()) >= d - rank
    torch.testing.assert_close(Sinv.diagonal()[inside], P.diagonal()[inside], rtol=1e-5, atol=0.0)


def test_projection_special_cases():
    d = 5
    P = torch.diag(torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0], dtype=F64))
    C, s = project_lowrank(P, 2)  # independent coordinates: the mean-field answer
    torch.testing.assert_close(lowrank_cov(C, s), torch.linalg.inv(P), rtol=1e-10, atol=1e-12)
    P = random_precision(d, 7)
    C, s = project_lowrank(P, d)  # rank d: the family contains P^{-1}
    torch.testing.assert_close(lowrank_cov(C, s), torch.linalg.inv(P), rtol=1e-6, atol=1e-8)
    C32, s32 = project_lowrank(P.float(), 2)
    C64, s64 = project_lowrank(P, 2)
    assert C32.dtype == torch.float32 and s32.dtype == torch.float32
    # float32 has a higher floor on s (eps^(1/6) = 0.07 times the mean-field scale)
    gap = float(kl_objective(P, lowrank_cov(C32.double(), s32.double()))
                - kl_objective(P, lowrank_cov(C64, s64)))
    assert -1e-5 < gap < 1e-2, gap
    with pytest.raises(ValueError, match="positive diagonal"):
        project_lowrank(-P, 2)


def exact_elbo(m, Sigma, X, y):
    """ELBO of q = N(m, Sigma) for this file's model, in closed form."""
    n, d = X.shape
    r = y - X @ m
    loglik = -0.5 * n * math.log(2 * math.pi * SIGMA ** 2) \
        - 0.5 * (r @ r + ((X.T @ X) * Sigma).sum()) / SIGMA ** 2
    logprior = -0.5 * d * math.log(2 * math.pi) - 0.5 * (m @ m + Sigma.trace())
    entropy = 0.5 * d * (1 + math.log(2 * math.pi)) + 0.5 * torch.logdet(Sigma)
    return float(loglik + logprior + entropy)


def lowrank_optimum(X, y, rank):
    """The best low-rank ELBO: the mean is the posterior mean whatever the covariance
    family; the covariance minimises tr(Lam Sigma) - log|Sigma| (direct minimisation)."""
    mean, _, prec = posterior(X, y)
    _, Sigma = direct_minimum(prec, rank)
    return exact_elbo(mean, Sigma, X, y)


def guide_elbo(guide, X, y):
    with torch.no_grad():
        post = guide.get_posterior()
        return exact_elbo(post.loc, post.covariance_matrix, X, y)


def test_two_steps_land_on_lowrank_optimum():
    """Linear-Gaussian model: the Hessian at any draw is the posterior precision Lam.
    At rho = 1 without a trust region the first step sets the covariance to its
    optimum (the projection of Lam); the second also moves the mean there exactly (in
    the first, the control variate still uses the guide's initial precision, not Lam)."""
    X, y = data(d=6)
    mean, _, prec = posterior(X, y)
    value, _ = direct_minimum(prec, 2)
    best = lowrank_optimum(X, y, 2)
    pyro.set_rng_seed(0)
    guide = AutoLowRankMultivariateNormal(model, rank=2)
    svi = SVI(model, guide, NaturalGradient(guide, step_size=1.0, max_kl=None), Trace_ELBO())
    svi.step(X, y)
    with torch.no_grad():
        Sigma = guide.get_posterior().covariance_matrix
    assert abs(float(kl_objective(prec, Sigma)) - value) < 1e-6
    assert float((guide.loc.detach() - mean).abs().max()) > 1e-3
    svi.step(X, y)
    torch.testing.assert_close(guide.loc.detach(), mean, rtol=1e-9, atol=1e-10)
    assert abs(guide_elbo(guide, X, y) - best) < 1e-6


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_svi_defaults_reach_lowrank_optimum(dtype):
    X, y = data(d=6)
    best = lowrank_optimum(X, y, 2)
    pyro.set_rng_seed(1)
    Xd, yd = X.to(dtype), y.to(dtype)
    guide = AutoLowRankMultivariateNormal(model, rank=2)
    svi = SVI(model, guide, NaturalGradient(guide), Trace_ELBO())
    for _ in range(30):
        assert math.isfinite(svi.step(Xd, yd))
    gap = best - guide_elbo(guide, X, y) if dtype == F64 else best - exact_elbo(
        guide.loc.detach().double(), guide.get_posterior().covariance_matrix.detach().double(),
        X, y)
    # (the direct minimisation can stop short of the infimum of a Heywood case by 1e-7)
    assert -1e-6 < gap < (1e-5 if dtype == F64 else 1e-2), gap


def test_without_draws_the_covariance_takes_base_steps():
    """A custom loop around JitTrace_ELBO: its compiled graph records no draws, and
    outside SVI.step there are no arguments to replay the guide with, so there is no
    Hessian at a draw: the mean takes the natural step, the covariance factors Adam's
    (they must not stay frozen)."""
    X, y = data()
    pyro.set_rng_seed(2)
    guide = AutoLowRankMultivariateNormal(model, rank=2)
    elbo, opt = JitTrace_ELBO(), NaturalGradient(guide)

    def step():
        with poutine.trace(param_only=True) as tr:
            loss = elbo.loss_and_grads(model, guide, X, y)
        params = [site["value"].unconstrained() for site in tr.trace.nodes.values()]
        opt(params)
        pyro.infer.util.zero_grads(params)
        return loss

    step()  # the traced first call runs the guide's Python code, hooks and all
    start = {k: v.detach().clone() for k, v in guide.named_parameters()}
    with pytest.warns(NaturalGradientWarning, match="could not be recovered"):
        for _ in range(3):
            assert math.isfinite(step())
    for k, v in guide.named_parameters():
        assert not torch.equal(v.detach(), start[k]), k


def test_jit_elbo_covariance_from_replayed_draws():
    """Inside SVI.step the guide is replayed from the step's random state. A low-rank
    group cannot confirm the draw (its gradients have no identity to check), so the
    draw gives the Hessian but no control variate: the covariance takes the projection
    step, and equals Trace_ELBO's (the Hessian is constant here), while the mean
    carries the gradient noise. To 1e-5: the trust region cuts the first five steps,
    and where it cuts depends on the mean's direction, whose noise differs (step sizes
    0.189 and 0.192 at the first), and the covariances forget that slowly (1.7e-8
    apart after 30 steps, 1.3e-8 after 60)."""
    X, y = data(d=6)
    cov = {}
    for elbo in (Trace_ELBO(), JitTrace_ELBO()):
        pyro.clear_param_store()
        pyro.set_rng_seed(5)
        guide = AutoLowRankMultivariateNormal(model, rank=2)
        svi = SVI(model, guide, NaturalGradient(guide), elbo)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NaturalGradientWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            for _ in range(30):
                svi.step(X, y)
        with torch.no_grad():
            cov[type(elbo).__name__] = guide.get_posterior().covariance_matrix.clone()
    torch.testing.assert_close(cov["JitTrace_ELBO"], cov["Trace_ELBO"], rtol=1e-5, atol=1e-7)


def test_ggn_curvature_follows_the_hessian_for_a_canonical_link():
    """Logistic regression: the GGN of a canonical link equals the Hessian (checked in
    tests/test_curvature.py), so curvature="ggn" must follow the default's trajectory."""
    g = generator(4)
    X = torch.randn(60, 5, generator=g, dtype=F64)
    y = torch.bernoulli(torch.sigmoid(X @ torch.linspace(-1, 1, 5, dtype=F64)), generator=g)

    def logistic(X, y):
        w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
        with pyro.plate("n", X.shape[0]):
            pyro.sample("y", dist.Bernoulli(logits=X @ w), obs=y)

    out = {}
    for curvature in ("auto", "ggn"):
        pyro.clear_param_store()
        pyro.set_rng_seed(3)
        guide = AutoLowRankMultivariateNormal(logistic, rank=2)
        svi = SVI(logistic, guide, NaturalGradient(guide, curvature=curvature), Trace_ELBO())
        for _ in range(10):
            svi.step(X, y)
        with torch.no_grad():
            post = guide.get_posterior()
            out[curvature] = (post.loc.clone(), post.covariance_matrix.clone())
    # (rounding-level differences between the two matrices can end the projection's
    # L-BFGS one iteration apart: agreement to its tolerance, not to the last bit)
    torch.testing.assert_close(out["ggn"][0], out["auto"][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["ggn"][1], out["auto"][1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", ["TraceGraph_ELBO", "vectorized4"])
def test_other_elbos_reach_lowrank_optimum(loss):
    """The projection step with other estimators: TraceGraph_ELBO, and four vectorised
    particles (the Hessian averaged over the particles' draws)."""
    from pyro.infer import TraceGraph_ELBO

    X, y = data(d=6)
    best = lowrank_optimum(X, y, 2)
    pyro.set_rng_seed(5)
    guide = AutoLowRankMultivariateNormal(model, rank=2)
    elbo = TraceGraph_ELBO() if loss == "TraceGraph_ELBO" else Trace_ELBO(
        num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, NaturalGradient(guide), elbo)
    for _ in range(30):
        assert math.isfinite(svi.step(X, y))
    assert abs(best - guide_elbo(guide, X, y)) < 1e-5


def test_module_local_params():
    """pyro.settings module_local_params=True: the parameters live on the guide, not in
    the param store; the groups are found by tensor identity all the same."""
    X, y = data(d=6)
    best = lowrank_optimum(X, y, 2)
    pyro.set_rng_seed(6)
    with pyro.settings.context(module_local_params=True):
        # Pyro 1.9.2's SVI cannot run AutoContinuous guides with module-local params
        # ('Parameter' object has no attribute 'unconstrained', with Adam too): a loop.
        guide = AutoLowRankMultivariateNormal(model, rank=2)
        guide(X, y)
        opt, elbo = NaturalGradient(guide), Trace_ELBO()
        with warnings.catch_warnings():
            warnings.simplefilter("error", NaturalGradientWarning)
            for _ in range(20):
                for p in guide.parameters():
                    p.grad = None
                elbo.differentiable_loss(model, guide, X, y).backward()
                opt(list(guide.parameters()))
        assert len(pyro.get_param_store()) == 0
        assert abs(best - guide_elbo(guide, X, y)) < 1e-5


@pytest.mark.parametrize("d,rank,seed", [(6, 2, 4), (11, 3, 5)])
def test_projection_from_a_warm_start_in_a_worse_basin(d, rank, seed):
    """The reduced objective is not convex: from these warm starts (scales between 5% and
    100% of the mean-field ones) L-BFGS alone ends in a local minimum 0.01-0.27 worse.
    The projection also runs from the mean-field start and keeps the better one."""
    P = random_precision(d, seed, strength=3.0)
    g = generator(seed)
    warm = P.diagonal().rsqrt() * torch.exp(-3 * torch.rand(d, generator=g, dtype=F64))
    value, _ = direct_minimum(P, rank)
    C, s = project_lowrank(P, rank, scale=warm)
    assert float(kl_objective(P, lowrank_cov(C, s))) <= value + 1e-7


def test_svi_from_a_far_too_narrow_start_reaches_lowrank_optimum():
    """From ``init_scale=1e-5`` the running precision may at most halve per step, as for
    the other guides, and the step-size clock ran meanwhile: after 60 steps the ELBO was
    still 0.56 nats short of the best low-rank one (found by direct minimisation here).
    The clock now holds while the precision's whitened changes agree and are not small."""
    X, y = data(d=6)
    best = lowrank_optimum(X, y, 2)
    pyro.set_rng_seed(0)
    guide = AutoLowRankMultivariateNormal(model, rank=2, init_scale=1e-5)
    svi = SVI(model, guide, NaturalGradient(guide), Trace_ELBO())
    for _ in range(60):
        assert math.isfinite(svi.step(X, y))
    gap = best - guide_elbo(guide, X, y)
    assert -1e-6 < gap < 1e-6, gap


def test_float32_factor_far_above_the_scales_steps_without_the_hessian():
    """A float32 guide whose ``cov_factor`` is 1e4 times its scales (loaded from an Adam
    run, say): ``W W^T + diag(s^2)`` loses its diagonal to rounding and its Cholesky
    factorisation raised out of ``svi.step``. That step now goes from gradients alone, and
    every parameter stays finite."""
    X, y = (t.float() for t in data(d=5))
    pyro.set_rng_seed(0)
    guide = AutoLowRankMultivariateNormal(model, rank=2)
    guide(X, y)
    with torch.no_grad():
        guide.cov_factor.copy_(1e4 * torch.randn(5, 2, generator=generator(1)))
    svi = SVI(model, guide, NaturalGradient(guide), Trace_ELBO())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            svi.step(X, y)
    assert all(bool(torch.isfinite(p).all()) for p in guide.parameters())
