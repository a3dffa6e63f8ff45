"""Which models the model-curvature route reads correctly: guides over a blocked model,
enumerated discrete sites, subsampled plates, and models whose log joint is random.

Each Hessian is checked against an independent route (an autograd Hessian of a log
joint written out here, or a closed form), each fit against its exact optimum."""

import math
import re
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from scipy.optimize import minimize

from pyro_natgrad import NaturalGradient, NaturalGradientWarning
from pyro_natgrad.curvature import ModelCurvature, ModelCurvatureError
from tests.seeding import generator

F64 = torch.float64


# ---- a guide over poutine.block(model, expose=...) -------------------------------------
def test_a_blocked_model_keeps_its_likelihood(float64):
    """Pyro's recipe for a guide over some latents blocks the others, and with
    ``expose`` the observations too: the Hessian must still be the whole model's
    (it was the prior's alone)."""
    g = generator(0)
    X = torch.randn(30, 3, generator=g, dtype=F64)
    y = X @ torch.tensor([1.0, -0.5, 0.2], dtype=F64) + 0.3 * torch.randn(30, generator=g,
                                                                          dtype=F64)

    def model():
        w = pyro.sample("w", dist.Normal(torch.zeros(3, dtype=F64), 2.0).to_event(1))
        pyro.sample("y", dist.Normal(X @ w, 0.5).to_event(1), obs=y)

    for blocked in (poutine.block(model, expose=["w"]), poutine.block(model, hide=["y"])):
        guide = AutoMultivariateNormal(blocked)
        curv = ModelCurvature(guide)
        guide()
        exact = X.T @ X / 0.5 ** 2 + torch.eye(3, dtype=F64) / 2.0 ** 2
        z = torch.randn(3, generator=g, dtype=F64)
        torch.testing.assert_close(-curv.hessian(z), exact, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(curv.ggn_precision(z), exact, rtol=1e-10, atol=1e-10)


# ---- enumerated discrete sites ---------------------------------------------------------
WEIGHTS = (0.5, 0.5)
PRIOR_SD = 10.0


def _mixture_data():
    """90 points around -3 and 10 around 2, while the model's weights say 50/50: a
    sampled (not summed) assignment puts 50 points in each component."""
    g = generator(0)
    return torch.cat([torch.randn(90, generator=g, dtype=F64) - 3,
                      torch.randn(10, generator=g, dtype=F64) + 2])


@config_enumerate
def mixture(data):
    locs = pyro.sample("locs", dist.Normal(torch.zeros(2, dtype=F64), PRIOR_SD).to_event(1))
    with pyro.plate("data", len(data)):
        a = pyro.sample("a", dist.Categorical(torch.tensor(WEIGHTS, dtype=F64)))
        pyro.sample("obs", dist.Normal(locs[a], 1.0), obs=data)


def _mixture_log_joint(locs, data):
    """log p(data, locs) with the assignments summed out, written out: ``locs`` (..., 2)."""
    normal = torch.distributions.Normal
    prior = normal(0.0, PRIOR_SD).log_prob(locs).sum(-1)
    parts = normal(locs.unsqueeze(-2), 1.0).log_prob(data.unsqueeze(-1))  # (..., n, 2)
    lik = torch.logsumexp(parts + torch.tensor(WEIGHTS, dtype=F64).log(), -1).sum(-1)
    return prior + lik


@pytest.mark.parametrize("Guide", [AutoNormal, AutoMultivariateNormal])
def test_enumerated_sites_are_summed_out_of_the_hessian(float64, Guide):
    data = _mixture_data()
    guide = Guide(poutine.block(mixture, hide=["a"]))
    curv = ModelCurvature(guide)
    guide(data)
    for z in (torch.tensor([-3.0, 2.0], dtype=F64), torch.tensor([-1.0, 0.5], dtype=F64)):
        exact = torch.autograd.functional.hessian(lambda v: _mixture_log_joint(v, data), z)
        torch.testing.assert_close(curv.hessian(z), exact, rtol=1e-10, atol=1e-10)
        product = curv.precision_operator(z)
        v = torch.tensor([0.3, -1.2], dtype=F64)
        torch.testing.assert_close(product(v), -exact @ v, rtol=1e-10, atol=1e-10)
    with pytest.raises(ModelCurvatureError, match="enumerated"):
        curv.ggn_precision(z)  # the GGN has no sum over the assignments


def _mixture_mean_field_optimum(data, nodes=40):
    """The mean-field Gaussian that maximises the ELBO, by Gauss-Hermite quadrature of
    E_q[log p(data, locs)] on a tensor grid and scipy's BFGS, started where the fits
    start (Nelder-Mead agrees to 1e-6 and takes 30 times as long)."""
    t, w = np.polynomial.hermite.hermgauss(nodes)
    t, w = t * math.sqrt(2), w / math.sqrt(math.pi)
    x = data.cpu().numpy()
    log_w = np.log(WEIGHTS)

    def negative_elbo(p):
        m, s = p[:2], np.exp(p[2:])
        a, b = m[0] + s[0] * t, m[1] + s[1] * t  # nodes of each coordinate
        lik_a = -0.5 * (x[:, None] - a[None, :]) ** 2 + log_w[0]  # (n, nodes)
        lik_b = -0.5 * (x[:, None] - b[None, :]) ** 2 + log_w[1]
        lik = np.logaddexp(lik_a[:, :, None], lik_b[:, None, :]).sum(0)  # (nodes, nodes)
        expected = w @ lik @ w - len(x) * 0.5 * math.log(2 * math.pi)
        prior = -0.5 * ((m ** 2 + s ** 2) / PRIOR_SD ** 2).sum()
        return -(expected + prior + p[2:].sum())

    best = minimize(negative_elbo, [-1.0, 1.0, 0.0, 0.0], method="BFGS",
                    options={"gtol": 1e-8})
    return best.x[:2], np.exp(best.x[2:])


@pytest.mark.slow
def test_enumerated_mixture_fit_reaches_the_mean_field_optimum(float64):
    """TraceEnum_ELBO, AutoNormal over the blocked mixture, default NaturalGradient:
    the exact mean-field optimum (quadrature) in 60 steps (within 0.07 sd and 3.5 % from
    step 30 on seeds 0, 1, 3). With the assignments sampled inside the
    Hessian both scales went to 1/sqrt(50) = 0.141, where the optimum has 0.11 and 0.47,
    and the ELBO ended 1.4 nats lower."""
    data = _mixture_data()
    m, s = _mixture_mean_field_optimum(data)
    pyro.set_rng_seed(3)
    guide = AutoNormal(poutine.block(mixture, hide=["a"]),
                       init_loc_fn=lambda site: torch.tensor([-1.0, 1.0], dtype=F64))
    svi = SVI(mixture, guide, NaturalGradient(guide), TraceEnum_ELBO(max_plate_nesting=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NaturalGradientWarning)
        for _ in range(60):
            svi.step(data)
    loc, scale = guide.locs.locs.detach().cpu().numpy(), guide.scales.locs.detach().cpu().numpy()
    assert np.all(np.abs(loc - m) < 0.1 * s), (loc, m, s)
    assert np.all(np.abs(scale / s - 1) < 0.1), (scale, s)


# ---- subsampled plates -----------------------------------------------------------------
def test_subsample_size_plates_take_the_guides_subsample(float64, rng):
    """``pyro.plate(..., subsample_size=B)`` with an AutoNormal's own plates (no
    create_plates): the ELBO's model replays the guide's subsample, and so must the
    Hessian, whose local entries depend on each item's observation noise. One exact
    step (rho = 1, no trust region) puts each visited local on its conditional
    variance 1 / (1/tau^2 + 1/sd_i^2); with a fresh subsample in the Hessian the
    scales were off by factors from 0.4 to 5."""
    n, batch, tau = 40, 10, 1.0
    g = generator(2)
    sd = 0.1 + 2 * torch.rand(n, generator=g, dtype=F64)
    y = 1.5 + torch.randn(n, generator=g, dtype=F64)

    def model(y):
        mu = pyro.sample("mu", dist.Normal(torch.zeros((), dtype=F64), 1.0))
        with pyro.plate("data", n, subsample_size=batch) as i:
            z = pyro.sample("z", dist.Normal(mu, tau))
            pyro.sample("y", dist.Normal(z, sd[i]), obs=y[i])

    guide = AutoNormal(model, init_scale=1.0)
    svi = SVI(model, guide, NaturalGradient(guide, max_kl=None), Trace_ELBO())
    guide(y)
    before = guide.scales.z.detach().clone()
    svi.step(y)
    visited = guide.scales.z.detach() != before
    assert int(visited.sum()) == batch
    torch.testing.assert_close(guide.scales.z.detach()[visited],
                               (tau ** -2 + sd[visited] ** -2).rsqrt(), rtol=1e-9, atol=0)


# ---- models whose log joint is random at a given draw ----------------------------------
def _coin_model(y):
    """A discrete site that the guide leaves out and nobody enumerates: the ELBO samples
    it from its prior, and so would the Hessian."""
    w = pyro.sample("w", dist.Normal(torch.zeros((), dtype=F64), 1.0))
    c = pyro.sample("c", dist.Bernoulli(torch.tensor(0.5, dtype=F64)))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(w + c, 1.0), obs=y)


def _noisy_model(y):
    """Randomness outside any sample site."""
    w = pyro.sample("w", dist.Normal(torch.zeros((), dtype=F64), 1.0))
    jitter = 0.1 * torch.randn(len(y), dtype=F64)
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(w + jitter, 1.0), obs=y)


def _fit(model, curvature, steps=5):
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    guide = AutoNormal(poutine.block(model, hide=["c"]))
    y = torch.linspace(-1, 2, 8, dtype=F64)
    svi = SVI(model, guide, NaturalGradient(guide, curvature=curvature), Trace_ELBO())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            svi.step(y)
    ours = [str(w.message) for w in caught if issubclass(w.category, NaturalGradientWarning)]
    return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}, ours


@pytest.mark.parametrize("model, why", [(_coin_model, r"samples \['c'\]"),
                                        (_noisy_model, "draws random numbers")])
def test_a_random_log_joint_falls_back_to_gradient_steps_with_one_warning(float64, model,
                                                                          why):
    """Under curvature='auto' the steps are those of curvature='none', to the bit (the
    check leaves the random state as it was), after a single warning that says why."""
    auto, warned = _fit(model, "auto")
    none, quiet = _fit(model, "none")
    assert quiet == []
    assert len(warned) == 1 and re.search(why, warned[0]) and "curvature='none'" in warned[0]
    assert auto.keys() == none.keys()
    for k in auto:
        assert torch.equal(auto[k], none[k]), k


@pytest.mark.parametrize("model, why", [(_coin_model, r"samples \['c'\]"),
                                        (_noisy_model, "draws random numbers")])
@pytest.mark.parametrize("curvature", ["hessian", "hvp", "ggn"])
def test_a_random_log_joint_refuses_an_explicit_curvature_and_changes_nothing(float64,
                                                                              curvature,
                                                                              model, why):
    """(``"ggn"`` on ``torch.randn`` in the model raised torch's bare vmap
    RuntimeError.)"""
    pyro.set_rng_seed(1)
    y = torch.linspace(-1, 2, 8, dtype=F64)
    guide = AutoNormal(poutine.block(model, hide=["c"]))
    svi = SVI(model, guide, NaturalGradient(guide, curvature=curvature), Trace_ELBO())
    guide(y)
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    with pytest.raises(ValueError, match=why + ".*curvature='none'"):
        svi.step(y)
    for k, v in pyro.get_param_store().items():
        assert torch.equal(v.detach(), before[k]), k



# ---- what the check must get right as the arguments change -----------------------------
@config_enumerate
def semi_supervised(data, labels=None):
    """The mixture with the assignments observed in some batches and enumerated in the
    others (the semi-supervised pattern)."""
    locs = pyro.sample("locs", dist.Normal(torch.zeros(2, dtype=F64), PRIOR_SD).to_event(1))
    with pyro.plate("data", len(data)):
        a = pyro.sample("a", dist.Categorical(torch.tensor(WEIGHTS, dtype=F64)), obs=labels)
        pyro.sample("obs", dist.Normal(locs[a], 1.0), obs=data)


def test_the_structure_is_read_at_every_evaluation(float64):
    """Labelled batch first, then unlabelled: the second Hessian sums the assignments
    out (it sampled them, a different answer at every call, when the first batch's
    structure was kept)."""
    data = _mixture_data()
    labels = (data > 0).long()
    guide = AutoNormal(poutine.block(semi_supervised, hide=["a"]))
    curv = ModelCurvature(guide)
    z = torch.tensor([-3.0, 2.0], dtype=F64)
    normal = torch.distributions.Normal

    def labelled(v):
        prior = normal(0.0, PRIOR_SD).log_prob(v).sum()
        return prior + normal(v[labels], 1.0).log_prob(data).sum()

    guide(data, labels)
    torch.testing.assert_close(curv.hessian(z), torch.autograd.functional.hessian(labelled, z),
                               rtol=1e-10, atol=1e-10)
    guide(data)
    exact = torch.autograd.functional.hessian(lambda v: _mixture_log_joint(v, data), z)
    for _ in range(2):
        torch.testing.assert_close(curv.hessian(z), exact, rtol=1e-10, atol=1e-10)


def test_a_scale_on_sites_apart_from_the_enumeration_is_fine(float64):
    """poutine.scale on the global prior alone: the contraction is still the ELBO's, so
    the Hessian is exact (such a model used to be refused); a scale on the observations,
    which depend on the enumerated assignments, is refused with the site named."""
    data = _mixture_data()

    def scaled(data, where):
        with poutine.scale(scale=0.5 if where == "prior" else 1.0):
            locs = pyro.sample("locs", dist.Normal(torch.zeros(2, dtype=F64),
                                                   PRIOR_SD).to_event(1))
        with pyro.plate("data", len(data)), poutine.scale(scale=0.5 if where == "obs" else 1.0):
            a = pyro.sample("a", dist.Categorical(torch.tensor(WEIGHTS, dtype=F64)),
                            infer={"enumerate": "parallel"})
            pyro.sample("obs", dist.Normal(locs[a], 1.0), obs=data)

    z = torch.tensor([-1.0, 0.5], dtype=F64)
    guide = AutoNormal(poutine.block(scaled, hide=["a"]))
    curv = ModelCurvature(guide)
    guide(data, "prior")

    def log_joint(v):
        prior = torch.distributions.Normal(0.0, PRIOR_SD).log_prob(v).sum()
        return _mixture_log_joint(v, data) - 0.5 * prior

    torch.testing.assert_close(curv.hessian(z), torch.autograd.functional.hessian(log_joint, z),
                               rtol=1e-10, atol=1e-10)
    guide(data, "obs")
    with pytest.raises(ModelCurvatureError, match=r"site '(a|obs)' depends on the enumerated"):
        curv.hessian(z)


def test_observation_only_subsampling_leaves_the_random_state_alone(float64, rng):
    """A full-rank guide with subsampled observations: the guide has no plate, so the
    Hessian draws its own subsample, from the current random state, which it leaves as
    it was (it advanced it at every evaluation)."""
    g = generator(4)
    X = torch.randn(200, 3, generator=g, dtype=F64)
    y = X @ torch.tensor([1.0, -0.5, 0.2], dtype=F64) + torch.randn(200, generator=g,
                                                                    dtype=F64)

    def model():
        w = pyro.sample("w", dist.Normal(torch.zeros(3, dtype=F64), 1.0).to_event(1))
        with pyro.plate("data", 200, subsample_size=20) as i:
            pyro.sample("y", dist.Normal(X[i] @ w, 1.0), obs=y[i])

    guide = AutoMultivariateNormal(model)
    curv = ModelCurvature(guide)
    guide()
    z = torch.zeros(3, dtype=F64)
    state = torch.get_rng_state()
    first, second = curv.hessian(z), curv.hessian(z)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    # a subsample of 20 scaled by 10, not the full data
    assert not torch.allclose(-first, X.T @ X + torch.eye(3, dtype=F64), rtol=1e-3)


def _numpy_model(y):
    w = pyro.sample("w", dist.Normal(torch.zeros((), dtype=F64), 1.0))
    jitter = torch.as_tensor(0.1 * np.random.randn(len(y)))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(w + jitter, 1.0), obs=y)


def test_numpy_randomness_is_found_too_and_left_as_it_was(float64):
    y = torch.linspace(-1, 2, 8, dtype=F64)
    guide = AutoNormal(_numpy_model)
    curv = ModelCurvature(guide)
    guide(y)
    state = np.random.get_state()
    with pytest.raises(ModelCurvatureError, match="draws random numbers"):
        curv.hessian(torch.zeros(1, dtype=F64))
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), state))


def test_a_low_rank_guide_refused_its_curvature_routes_its_covariance_to_adam(float64):
    from pyro.infer.autoguide import AutoLowRankMultivariateNormal

    pyro.set_rng_seed(1)
    y = torch.linspace(-1, 2, 8, dtype=F64)
    guide = AutoLowRankMultivariateNormal(poutine.block(_coin_model, hide=["c"]), rank=1)
    opt = NaturalGradient(guide)
    svi = SVI(_coin_model, guide, opt, Trace_ELBO())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        svi.step(y)
        assert opt.routing()["cov_factor"].startswith("natural gradient") is False
        assert opt.routing()["cov_factor"].startswith("base optimizer")
        assert opt.routing()["loc"].startswith("natural gradient")


def test_the_ggn_error_on_an_enumerated_model_points_to_the_hessian(float64):
    data = _mixture_data()
    guide = AutoNormal(poutine.block(mixture, hide=["a"]))
    svi = SVI(mixture, guide, NaturalGradient(guide, curvature="ggn"),
              TraceEnum_ELBO(max_plate_nesting=1))
    with pytest.raises(ValueError) as info:
        svi.step(data)
    message = str(info.value)
    assert "enumerated ['a']" in message and "use curvature='hessian', which does" in message
    assert "no precision target" not in message


def _factor_model(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.factor("ridge", -0.5 * (w ** 2).sum())
    with pyro.plate("data", len(X)):
        pyro.sample("y", dist.Normal(X @ w, 1.0), obs=y)


def _cauchy_model(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("data", len(X)):
        pyro.sample("y", dist.Cauchy(X @ w, 1.0), obs=y)


@pytest.mark.parametrize("model,why", [(_factor_model, "site 'ridge' is a factor statement"),
                                       (_cauchy_model, "registered for Cauchy")])
def test_a_model_without_a_ggn_is_refused_with_a_fix_that_applies(float64, model, why):
    """curvature='ggn' on a model with a factor statement, or a likelihood with no
    closed-form Fisher: a ValueError that says why and points to curvature='hessian'
    (it told the user to pass ModelGGN's ``sites=``, which NaturalGradient does not
    take, or was a bare NotImplementedError), raised before anything changed; the
    Hessian takes the model as it is."""
    g = generator(0)
    X = torch.randn(30, 2, generator=g)
    y = X @ torch.tensor([1.0, -0.5]) + torch.randn(30, generator=g)
    guide = AutoMultivariateNormal(model)
    guide(X, y)
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    svi = SVI(model, guide, NaturalGradient(guide, curvature="ggn"), Trace_ELBO())
    with pytest.raises(ValueError) as info:
        svi.step(X, y)
    message = str(info.value)
    assert why in message and "use curvature='hessian'" in message, message
    assert "sites=" not in message
    for k, v in pyro.get_param_store().items():
        assert torch.equal(v.detach(), before[k]), k
    svi = SVI(model, guide, NaturalGradient(guide, curvature="hessian"), Trace_ELBO())
    assert math.isfinite(svi.step(X, y))


@pytest.mark.parametrize("scale", ["number", "per item"])
def test_a_scaled_constrained_latent_takes_the_guides_jacobian(float64, scale):
    """Beta latents under ``poutine.scale`` (KL annealing, per-item weights): Trace_ELBO's
    objective in the unconstrained ``u`` is ``s log p(sigmoid(u)) + ladj(u)``, the Jacobian
    term from the guide's density, which carries no model scale; it is written out here and
    differentiated by autograd. The model's scale multiplied the Jacobian too (the fit was
    20% too narrow), and a per-item scale made the log joint a vector (an error)."""
    s = torch.tensor(10.0, dtype=F64) if scale == "number" else \
        torch.tensor([1.0, 2.0, 0.5], dtype=F64)
    obs = torch.tensor([0.2, 0.9, 0.4], dtype=F64)

    def model():
        with pyro.plate("n", 3), poutine.scale(scale=s):
            p = pyro.sample("p", dist.Beta(torch.tensor(2.0, dtype=F64), 3.0))
            pyro.sample("y", dist.Normal(p, 0.5), obs=obs)

    guide = AutoNormal(model)
    curv = ModelCurvature(guide)
    guide()
    u = torch.tensor([0.4, -1.1, 2.0], dtype=F64)

    def objective(u):
        sigmoid = torch.distributions.transforms.SigmoidTransform()
        p = sigmoid(u)
        joint = dist.Beta(torch.tensor(2.0, dtype=F64), 3.0).log_prob(p) \
            + dist.Normal(p, 0.5).log_prob(obs)
        return (s * joint).sum() + sigmoid.log_abs_det_jacobian(u, p).sum()

    torch.testing.assert_close(curv.hessian(u), torch.autograd.functional.hessian(objective, u),
                               rtol=1e-10, atol=1e-10)


def test_a_tensor_scale_apart_from_the_enumeration_is_fine(float64):
    """Per-item weights on an observed site that does not depend on the enumerated
    assignment: the check of scales compared a tensor with 1 (an error). The Hessian is
    that of the log joint, the mixture summed out, written out here."""
    data = _mixture_data()
    weights = torch.linspace(0.5, 2.0, len(data), dtype=F64)
    other = torch.linspace(-1.0, 1.0, len(data), dtype=F64)

    def model(data):
        locs = pyro.sample("locs", dist.Normal(torch.zeros(2, dtype=F64), PRIOR_SD).to_event(1))
        with pyro.plate("data", len(data)):
            a = pyro.sample("a", dist.Categorical(torch.tensor(WEIGHTS, dtype=F64)),
                            infer={"enumerate": "parallel"})
            pyro.sample("obs", dist.Normal(locs[a], 1.0), obs=data)
            with poutine.scale(scale=weights):
                pyro.sample("other", dist.Normal(locs[0], 1.0), obs=other)

    guide = AutoNormal(poutine.block(model, hide=["a"]))
    curv = ModelCurvature(guide)
    guide(data)
    z = torch.tensor([-1.0, 0.5], dtype=F64)

    def log_joint(v):
        return _mixture_log_joint(v, data) \
            + (weights * torch.distributions.Normal(v[0], 1.0).log_prob(other)).sum()

    torch.testing.assert_close(curv.hessian(z), torch.autograd.functional.hessian(log_joint, z),
                               rtol=1e-10, atol=1e-10)


def test_a_latent_this_call_does_not_sample_keeps_its_jacobian(float64):
    """A latent sampled only when an argument is given; the guide, set up with it, always
    samples it. Without it the model's trace has no such site (a KeyError): the ELBO's
    objective there is its Jacobian term alone, ``log sigmoid'(u)``, beside the rest,
    written out here."""
    y = torch.tensor([0.3, -0.2, 1.1], dtype=F64)

    def model(extra=None):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
        if extra is not None:
            s = pyro.sample("s", dist.Beta(torch.tensor(2.0, dtype=F64), 2.0))
            pyro.sample("e", dist.Normal(s, 1.0), obs=extra)
        with pyro.plate("n", 3):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    guide = AutoNormal(model)
    curv = ModelCurvature(guide)
    guide(torch.tensor(0.3, dtype=F64))
    guide()
    z = torch.tensor([0.2, 0.7], dtype=F64)  # (mu, u_s), the guide's order

    def objective(v):
        sigmoid = torch.distributions.transforms.SigmoidTransform()
        prior = dist.Normal(torch.tensor(0.0, dtype=F64), 1.0).log_prob(v[0])
        return prior + dist.Normal(v[0], 1.0).log_prob(y).sum() \
            + sigmoid.log_abs_det_jacobian(v[1], sigmoid(v[1]))

    torch.testing.assert_close(curv.hessian(z), torch.autograd.functional.hessian(objective, z),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", ["ggn with a subsampled plate", "hvp with a full-rank guide"])
def test_a_refused_curvature_is_refused_at_every_step(float64, case):
    """A curvature the guide cannot take raises a ValueError at the first step. The
    groups were kept, so the next steps went on without it, silently: each step is
    refused now, and nothing changes."""
    from pyro.infer.autoguide import AutoMultivariateNormal as Full

    data = torch.linspace(-1.0, 1.0, 10, dtype=F64)

    def model():
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
        with pyro.plate("n", 10, subsample_size=5 if case.startswith("ggn") else None) as i:
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("y", dist.Normal(z, 1.0), obs=data[i])

    guide = AutoNormal(model) if case.startswith("ggn") else Full(model)
    curvature = "ggn" if case.startswith("ggn") else "hvp"
    svi = SVI(model, guide, NaturalGradient(guide, curvature=curvature), Trace_ELBO())
    guide()
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    for _ in range(3):
        with pytest.raises(ValueError, match=f"curvature='{curvature}'"):
            svi.step()
    for k, v in pyro.get_param_store().items():
        assert torch.equal(v.detach(), before[k]), k
