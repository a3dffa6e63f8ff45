"""Model curvature for the optimizer: Hessian and GGN precision targets against
closed forms."""

import pytest
import torch
import pyro
import pyro.distributions as dist
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from pyro_natgrad.curvature import ModelCurvature
from tests.seeding import generator


def _data(n=40, d=3, seed=0):
    g = generator(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    return X, (X @ torch.tensor([1.0, -0.5, 0.2], dtype=torch.float64)
               + 0.3 * torch.randn(n, generator=g, dtype=torch.float64))


def _linear_model(X, y, sigma=0.5):
    def model():
        w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), 2.0).to_event(1))
        pyro.sample("y", dist.Normal(X @ w, sigma).to_event(1), obs=y)
    return model


def _glm(X, y, link):
    def model():
        w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), 1.0).to_event(1))
        eta = X @ w
        probs = torch.sigmoid(eta) if link == "logit" else dist.Normal(0.0, 1.0).cdf(eta)
        pyro.sample("y", dist.Bernoulli(probs=probs.clamp(1e-12, 1 - 1e-12)).to_event(1), obs=y)
    return model


@pytest.mark.parametrize("Guide", [AutoMultivariateNormal, AutoNormal])
def test_hessian_of_linear_gaussian_model_is_exact_precision(Guide):
    X, y = _data()
    model = _linear_model(X, y)
    guide = Guide(model)
    curv = ModelCurvature(guide)
    guide()
    z = torch.randn(3, dtype=torch.float64)
    exact = X.T @ X / 0.5**2 + torch.eye(3, dtype=torch.float64) / 2.0**2
    assert torch.allclose(-curv.hessian(z), exact, atol=1e-10)
    assert torch.allclose(curv.ggn_precision(z), exact, atol=1e-10)


def test_ggn_equals_hessian_for_logistic_and_differs_for_probit():
    X, _ = _data()
    y = (X[:, 0] > 0).to(torch.float64)
    z = torch.tensor([0.7, -0.4, 1.1], dtype=torch.float64)
    out = {}
    for link in ("logit", "probit"):
        guide = AutoMultivariateNormal(_glm(X, y, link))
        curv = ModelCurvature(guide)
        guide()
        out[link] = (-curv.hessian(z), curv.ggn_precision(z))
    H, G = out["logit"]
    # Canonical link: the Hessian does not depend on y, so it is the GGN; and the
    # closed form is X^T diag(p(1-p)) X + I.
    p = torch.sigmoid(X @ z)
    closed = X.T @ ((p * (1 - p)).unsqueeze(-1) * X) + torch.eye(3, dtype=torch.float64)
    assert torch.allclose(H, closed, atol=1e-8) and torch.allclose(G, closed, atol=1e-8)
    H, G = out["probit"]
    assert (H - G).abs().max() > 1e-3 * G.abs().max()
    assert torch.linalg.eigvalsh(G).min() > 0


def test_positive_latents_include_the_log_jacobian():
    # x ~ Gamma(a, b), no data: f(u) = log Gamma(e^u; a, b) + u, whose second derivative
    # in u is -b e^u, so the precision target is b e^u.
    a, b = 3.0, 2.0

    def model():
        pyro.sample("x", dist.Gamma(torch.tensor(a, dtype=torch.float64),
                                    torch.tensor(b, dtype=torch.float64)))

    guide = AutoNormal(model)
    curv = ModelCurvature(guide)
    guide()
    u = torch.tensor([0.3], dtype=torch.float64)
    assert torch.allclose(-curv.hessian(u), b * u.exp().reshape(1, 1), atol=1e-10)


def test_curvature_needs_the_guide_to_have_run():
    X, y = _data()
    guide = AutoMultivariateNormal(_linear_model(X, y))
    curv = ModelCurvature(guide)
    with pytest.raises(RuntimeError, match="svi.step"):
        curv.hessian(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="svi.step"):
        curv.precision_operator(torch.zeros(3, dtype=torch.float64))


def test_precision_operator_matches_closed_forms():
    """``v -> -grad^2 f(z) v`` by Hessian-vector products: the linear model's precision
    ``X^T X / sigma^2 + I / 4``, and the logistic model's ``X^T diag(p(1-p)) X + I``
    at a point, applied to several vectors through one operator (its graph is reused)."""
    X, y = _data()
    g = generator(5)
    V = torch.randn(4, 3, generator=g, dtype=torch.float64)
    guide = AutoNormal(_linear_model(X, y))
    curv = ModelCurvature(guide)
    guide()
    product = curv.precision_operator(torch.randn(3, generator=g, dtype=torch.float64))
    exact = X.T @ X / 0.5**2 + torch.eye(3, dtype=torch.float64) / 2.0**2
    for v in V:
        torch.testing.assert_close(product(v), exact @ v, rtol=1e-10, atol=1e-10)

    yb = (X[:, 0] > 0).to(torch.float64)
    guide = AutoMultivariateNormal(_glm(X, yb, "logit"))
    curv = ModelCurvature(guide)
    guide()
    z = torch.tensor([0.7, -0.4, 1.1], dtype=torch.float64)
    product = curv.precision_operator(z)
    p = torch.sigmoid(X @ z)
    closed = X.T @ ((p * (1 - p)).unsqueeze(-1) * X) + torch.eye(3, dtype=torch.float64)
    for v in V:
        torch.testing.assert_close(product(v), closed @ v, rtol=1e-10, atol=1e-10)


def test_minibatch_hessian_diagonal_matches_autograd_hessian(float64):
    """Subsampled AutoNormal: the diagonal that the optimizer's minibatch targets use,
    one Hessian-vector product per global coordinate and per local coordinate of one
    item, equals the diagonal of the full autograd Hessian of a log joint written out
    here (locals and likelihood scaled by N / B as the ELBO scales them). The model
    couples the two coordinates of each local and the locals with the global."""
    from pyro.infer import SVI, Trace_ELBO
    from pyro_natgrad import NaturalGradient

    N, B = 12, 4
    g = generator(1)
    y = torch.randn(N, generator=g, dtype=torch.float64)
    idx = torch.tensor([7, 2, 9, 4])

    def model(y, idx):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2, dtype=y.dtype), 1.0).to_event(1))
        with pyro.plate("data", N, subsample=idx) as ind:
            z = pyro.sample("z", dist.Normal(mu, 1.0).to_event(1))
            pyro.sample("y", dist.Normal(z[..., 0] * z[..., 1] + mu[0], 0.5), obs=y[ind])

    guide = AutoNormal(model, create_plates=lambda y, idx: pyro.plate("data", N, subsample=idx))
    opt = NaturalGradient(guide)
    SVI(model, guide, opt, Trace_ELBO()).step(y, idx)  # creates params, reads the guide
    guide(y, idx)
    records = [r for rec in opt._recorders for r in rec.take()]
    targets = opt._minibatch_targets(records)
    mu0, z0 = records[-1]["mu_unconstrained"][0], records[-1]["z_unconstrained"][0]

    def log_joint(v):
        mu, z = v[:2], v[2:].reshape(B, 2)
        normal = torch.distributions.Normal
        lp = normal(0.0, 1.0).log_prob(mu).sum()
        lp = lp + N / B * normal(mu, 1.0).log_prob(z).sum()
        return lp + N / B * normal(z[:, 0] * z[:, 1] + mu[0], 0.5).log_prob(y[idx]).sum()

    H = torch.autograd.functional.hessian(log_joint, torch.cat([mu0, z0.reshape(-1)]))
    assert H[2:, 2:].reshape(B, 2, B, 2)[0, :, 1, :].abs().sum() == 0  # items independent
    assert H[2, 3].abs() > 0.1  # ...but a local's two coordinates interact
    diag = -H.diagonal()
    torch.testing.assert_close(targets["mu"], diag[:2])
    expected = torch.zeros(N, 2, dtype=torch.float64)
    expected[idx] = diag[2:].reshape(B, 2) / (N / B)  # a local's target is unscaled
    torch.testing.assert_close(targets["z"], expected)


def _subsampled_linear_model(X, y, size=10):
    def model():
        w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), 2.0).to_event(1))
        with pyro.plate("data", len(X), subsample_size=size) as i:
            pyro.sample("y", dist.Normal(X[i] @ w, 0.5), obs=y[i])
    return model


def test_ggn_precision_leaves_the_random_state_as_it_was():
    """A subsampled plate of observations draws its indices for the GGN from the current
    random state, which is restored, as for the Hessian (ggn_precision advanced it, so
    the next ELBO step saw other minibatches than under curvature='hessian'). The
    linear-Gaussian model's GGN is its Hessian: X_i^T X_i (N / B) / sigma^2 + I / 4 on
    the subsample the state would draw."""
    X, y = _data()
    guide = AutoMultivariateNormal(_subsampled_linear_model(X, y))
    curv = ModelCurvature(guide)
    guide()
    z = torch.zeros(3, dtype=torch.float64)
    for target in (lambda: -curv.hessian(z), lambda: curv.ggn_precision(z)):
        torch.manual_seed(3)
        state = torch.get_rng_state()
        G = target()
        assert torch.equal(torch.get_rng_state(), state)
        i = torch.randperm(len(X))[:10]  # pyro's subsample, drawn from the same state
        Xi = X[i]
        exact = Xi.T @ Xi * (len(X) / 10) / 0.5 ** 2 + torch.eye(3, dtype=torch.float64) / 4
        torch.testing.assert_close(G, exact, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("Guide", [AutoMultivariateNormal, AutoNormal])
@pytest.mark.parametrize("curvature", ["auto", "ggn"])
def test_the_curvature_is_that_of_the_model_svi_runs(Guide, curvature):
    """``SVI(poutine.scale(model, s), AutoGuide(model), ...)`` (a tempered posterior):
    the ELBO's optimum has precision ``s * Lambda`` (mean-field: its diagonal), but the
    optimizer took the Hessian of the guide's model, and every sd settled at ``sqrt(s)``
    times its optimum, silently."""
    from pyro import poutine
    from pyro.infer import SVI, Trace_ELBO
    from pyro_natgrad import NaturalGradient

    s = 0.3
    X, y = _data()
    model = _linear_model(X, y)
    Lambda = X.T @ X / 0.5**2 + torch.eye(3, dtype=torch.float64) / 2.0**2
    mean = torch.linalg.solve(Lambda, X.T @ y / 0.5**2)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = Guide(model)
    svi = SVI(poutine.scale(model, scale=s), guide, NaturalGradient(guide, curvature=curvature),
              Trace_ELBO())
    for _ in range(60):
        svi.step()
    q = guide.get_posterior() if Guide is AutoMultivariateNormal else None
    if q is None:
        loc = guide.locs.w.detach()
        sd = guide.scales.w.detach()
        expected_sd = (s * Lambda.diagonal()).rsqrt()
    else:
        loc, sd = q.loc.detach(), q.covariance_matrix.detach().diagonal().sqrt()
        expected_sd = torch.linalg.inv(s * Lambda).diagonal().sqrt()
    torch.testing.assert_close(loc, mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(sd, expected_sd, rtol=1e-8, atol=0)


def test_sites_with_dotted_names_take_the_exact_step():
    """Site names with dots (a ``PyroSample`` of a ``PyroModule``, ``"linear.weight"``)
    are nested attributes of ``AutoNormal.locs``: reading the latent's shape raised
    AttributeError at the first step. The default steps reach the exact posterior mean."""
    from pyro.infer import SVI, Trace_ELBO
    from pyro_natgrad import NaturalGradient

    X, y = _data()

    def model():
        w = pyro.sample("linear.weight",
                        dist.Normal(torch.zeros(3, dtype=X.dtype), 2.0).to_event(1))
        pyro.sample("y", dist.Normal(X @ w, 0.5).to_event(1), obs=y)

    exact = X.T @ X / 0.5**2 + torch.eye(3, dtype=torch.float64) / 2.0**2
    mean = torch.linalg.solve(exact, X.T @ y / 0.5**2)
    pyro.clear_param_store()
    guide = AutoNormal(model)
    svi = SVI(model, guide, NaturalGradient(guide), Trace_ELBO())
    for _ in range(30):
        svi.step()
    torch.testing.assert_close(guide.locs.linear.weight.detach(), mean, rtol=1e-10, atol=1e-12)


def test_a_model_without_second_derivatives_falls_back_or_is_refused():
    """``torch.cdist`` has no double backward: the default raised autograd's
    NotImplementedError at the first step. Under ``"auto"``: one warning and gradient-only
    steps; under ``"hessian"``: a ValueError naming ``curvature='none'``, nothing changed."""
    import warnings
    from pyro.infer import SVI, Trace_ELBO
    from pyro_natgrad import NaturalGradient, NaturalGradientWarning

    x = torch.randn(6, 1, generator=generator(1), dtype=torch.float64)

    def model():
        u = pyro.sample("u", dist.Normal(torch.zeros(6, 1, dtype=x.dtype), 1.0).to_event(2))
        d = torch.cdist(u, x)
        pyro.sample("obs", dist.Normal(d.sum(-1), 1.0).to_event(1),
                    obs=torch.ones(6, dtype=x.dtype))

    for curvature in ("auto", "hessian"):
        pyro.clear_param_store()
        guide = AutoNormal(model)
        svi = SVI(model, guide, NaturalGradient(guide, curvature=curvature), Trace_ELBO())
        if curvature == "hessian":
            guide()
            before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
            with pytest.raises(ValueError, match="second derivatives.*curvature='none'"):
                svi.step()
            after = pyro.get_param_store()
            assert all(torch.equal(before[k], after[k].detach()) for k in before)
            continue
        with pytest.warns(NaturalGradientWarning, match="second derivatives are not available"):
            svi.step()
        with warnings.catch_warnings():
            warnings.simplefilter("error", NaturalGradientWarning)  # warned once
            losses = [svi.step() for _ in range(5)]
        assert all(torch.isfinite(torch.tensor(losses)))
