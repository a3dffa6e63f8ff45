"""Tests of :func:`pyro_natgrad.natural_gradient` against Fisher matrices built here.

The reference Fisher matrices never come from the library:

* Normal and MultivariateNormal: the Hessian (autograd) of a KL divergence written out in
  this file, ``F(theta0) = d^2/dtheta^2 KL(p_theta0 || p_theta)`` at ``theta = theta0``;
* Gamma and Beta: ``-d^2/dtheta^2 log p(x | theta)``, which for these families does not
  depend on ``x`` (checked at two points), so it equals its expectation, the Fisher.

The natural gradient is then ``torch.linalg.solve(F + damping I, g)``.
"""

import math

import pyro.distributions as dist
import pytest
import torch

from pyro_natgrad import natural_gradient
from tests.seeding import generator

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add synchronisation on a busy machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def hessian(fn, x):
    return torch.autograd.functional.hessian(fn, x)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=generator(seed), dtype=F64)


# ----------------------------------------------------------------------------------------
# independent Fisher matrices
# ----------------------------------------------------------------------------------------
def kl_normal(m0, s0, m, s):
    return torch.log(s / s0) + (s0 ** 2 + (m0 - m) ** 2) / (2 * s ** 2) - 0.5


def fisher_normal(m0, s0):
    """(loc, scale) Fisher of one Normal."""
    theta0 = torch.stack([m0, s0])
    return hessian(lambda t: kl_normal(m0, s0, t[0], t[1]), theta0)


def gamma_neg_loglik(theta, x):
    a, b = theta
    return -(a * torch.log(b) - torch.lgamma(a) + (a - 1) * torch.log(x) - b * x)


def beta_neg_loglik(theta, x):
    a, b = theta  # concentration1 (of x), concentration0 (of 1 - x)
    return -(torch.lgamma(a + b) - torch.lgamma(a) - torch.lgamma(b)
             + (a - 1) * torch.log(x) + (b - 1) * torch.log1p(-x))


def fisher_from_nll(nll, theta0, xs):
    Hs = [hessian(lambda t: nll(t, x), theta0) for x in xs]
    torch.testing.assert_close(Hs[0], Hs[1])  # independent of x, hence = the Fisher
    return Hs[0]


def tril_pack(M):
    d = M.shape[-1]
    r, c = torch.tril_indices(d, d)
    return M[..., r, c]


def tril_unpack(v, d):
    r, c = torch.tril_indices(d, d)
    out = v.new_zeros(v.shape[:-1] + (d, d))
    out[..., r, c] = v
    return out


def kl_mvn(m0, L0, m, L):
    d = m0.shape[-1]
    S0 = L0 @ L0.T
    Linv_S0 = torch.linalg.solve_triangular(L, S0, upper=False)
    tr = torch.linalg.solve_triangular(L.T, Linv_S0, upper=True).diagonal().sum()
    w = torch.linalg.solve_triangular(L, (m - m0).unsqueeze(-1), upper=False).squeeze(-1)
    logdet = 2 * torch.log(L.diagonal().abs()).sum() - 2 * torch.log(L0.diagonal().abs()).sum()
    return 0.5 * (tr + w @ w - d + logdet)


def fisher_mvn(m0, L0):
    """(loc, tril(scale_tril)) Fisher, tril in torch.tril_indices order."""
    d = m0.shape[-1]
    theta0 = torch.cat([m0, tril_pack(L0)])
    return hessian(lambda t: kl_mvn(m0, L0, t[:d], tril_unpack(t[d:], d)), theta0)


def test_reference_fishers_self_check():
    """The reference routes reproduce textbook values: Normal diag(1/s^2, 2/s^2),
    and for a 1-d MVN (loc, L) the same as the Normal."""
    F = fisher_normal(torch.tensor(0.3, dtype=F64), torch.tensor(2.0, dtype=F64))
    torch.testing.assert_close(F, torch.diag(torch.tensor([0.25, 0.5], dtype=F64)))
    F1 = fisher_mvn(torch.tensor([0.3], dtype=F64), torch.tensor([[2.0]], dtype=F64))
    torch.testing.assert_close(F1, F)
    # Gamma: [[psi'(a), -1/b], [-1/b, a/b^2]]
    a, b = torch.tensor(2.5, dtype=F64), torch.tensor(0.7, dtype=F64)
    F = fisher_from_nll(gamma_neg_loglik, torch.stack([a, b]),
                        [torch.tensor(0.4, dtype=F64), torch.tensor(3.0, dtype=F64)])
    expected = torch.tensor([[float(torch.polygamma(1, a)), -1 / 0.7],
                             [-1 / 0.7, 2.5 / 0.49]], dtype=F64)
    torch.testing.assert_close(F, expected)


# ----------------------------------------------------------------------------------------
# natural_gradient == solve(F, g)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_normal(damping):
    loc = rand(4, seed=1)
    scale = rand(4, seed=2).exp()
    g_loc, g_scale = rand(4, seed=3), rand(4, seed=4)
    nat = natural_gradient(dist.Normal(loc, scale), {"loc": g_loc, "scale": g_scale},
                           damping=damping)
    assert set(nat) == {"loc", "scale"}
    for i in range(4):
        F = fisher_normal(loc[i], scale[i]) + damping * torch.eye(2, dtype=F64)
        expected = torch.linalg.solve(F, torch.stack([g_loc[i], g_scale[i]]))
        torch.testing.assert_close(nat["loc"][i], expected[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(nat["scale"][i], expected[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_gamma(damping):
    a = torch.tensor([0.5, 2.5, 7.0], dtype=F64)
    b = torch.tensor([1.3, 0.7, 4.0], dtype=F64)
    ga, gb = rand(3, seed=5), rand(3, seed=6)
    nat = natural_gradient(dist.Gamma(a, b), {"concentration": ga, "rate": gb},
                           damping=damping)
    xs = [torch.tensor(0.4, dtype=F64), torch.tensor(3.0, dtype=F64)]
    for i in range(3):
        F = fisher_from_nll(gamma_neg_loglik, torch.stack([a[i], b[i]]), xs)
        F = F + damping * torch.eye(2, dtype=F64)
        expected = torch.linalg.solve(F, torch.stack([ga[i], gb[i]]))
        torch.testing.assert_close(torch.stack([nat["concentration"][i], nat["rate"][i]]),
                                   expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_beta(damping):
    a = torch.tensor([0.5, 2.5, 9.0], dtype=F64)
    b = torch.tensor([3.0, 0.8, 9.0], dtype=F64)
    ga, gb = rand(3, seed=7), rand(3, seed=8)
    nat = natural_gradient(dist.Beta(a, b), {"concentration1": ga, "concentration0": gb},
                           damping=damping)
    xs = [torch.tensor(0.2, dtype=F64), torch.tensor(0.9, dtype=F64)]
    for i in range(3):
        F = fisher_from_nll(beta_neg_loglik, torch.stack([a[i], b[i]]), xs)
        F = F + damping * torch.eye(2, dtype=F64)
        expected = torch.linalg.solve(F, torch.stack([ga[i], gb[i]]))
        torch.testing.assert_close(
            torch.stack([nat["concentration1"][i], nat["concentration0"][i]]),
            expected, rtol=1e-9, atol=1e-12)


def _mvn_case(d=3, seed=10):
    m = rand(d, seed=seed)
    A = rand(d, d, seed=seed + 1)
    L = torch.linalg.cholesky(A @ A.T + 0.5 * torch.eye(d, dtype=F64))
    return m, L


@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_multivariate_normal_scale_tril(damping):
    d = 3
    m, L = _mvn_case(d)
    g_loc = rand(d, seed=20)
    G = rand(d, d, seed=21)  # full matrix: only its lower triangle may be read
    nat = natural_gradient(dist.MultivariateNormal(m, scale_tril=L),
                           {"loc": g_loc, "scale_tril": G}, damping=damping)
    F = fisher_mvn(m, L)
    k = F.shape[0]
    expected = torch.linalg.solve(F + damping * torch.eye(k, dtype=F64),
                                  torch.cat([g_loc, tril_pack(G)]))
    torch.testing.assert_close(nat["loc"], expected[:d], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(nat["scale_tril"], tril_unpack(expected[d:], d),
                               rtol=1e-8, atol=1e-10)
    # the upper triangle of the gradient is ignored
    nat2 = natural_gradient(dist.MultivariateNormal(m, scale_tril=L),
                            {"loc": g_loc, "scale_tril": G.tril()}, damping=damping)
    torch.testing.assert_close(nat2["scale_tril"], nat["scale_tril"])


def test_multivariate_normal_loc_only_is_covariance_times_gradient():
    m, L = _mvn_case(4, seed=30)
    g = rand(4, seed=31)
    nat = natural_gradient(dist.MultivariateNormal(m, scale_tril=L), {"loc": g})
    assert set(nat) == {"loc"}
    torch.testing.assert_close(nat["loc"], L @ L.T @ g, rtol=1e-10, atol=1e-12)


def test_multivariate_normal_batched():
    ms, Ls = zip(*(_mvn_case(2, seed=40 + 3 * i) for i in range(3)))
    m, L = torch.stack(ms), torch.stack(Ls)
    g_loc, G = rand(3, 2, seed=50), rand(3, 2, 2, seed=51)
    nat = natural_gradient(dist.MultivariateNormal(m, scale_tril=L),
                           {"loc": g_loc, "scale_tril": G})
    for i in range(3):
        F = fisher_mvn(m[i], L[i])
        expected = torch.linalg.solve(F, torch.cat([g_loc[i], tril_pack(G[i])]))
        torch.testing.assert_close(nat["loc"][i], expected[:2], rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(nat["scale_tril"][i], tril_unpack(expected[2:], 2),
                                   rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", ["covariance_matrix", "precision_matrix"])
def test_symmetric_matrix_takes_autograd_gradient(name, dtype):
    """A user's loop: the gradient of a loss with respect to the covariance (or
    precision) matrix, straight from autograd, symmetric. The natural gradient is the
    textbook one, from the metric 1/2 tr(S^-1 dS S^-1 dS) of a Gaussian in S = Sigma
    (in S = Lambda the same with Sigma for S^-1): D = 2 S G S, and Sigma g for the mean.
    A lower-triangular use of the matrix (its gradient lower triangular) gives the same."""
    m, L = _mvn_case(3, seed=70)
    m, L = m.to(dtype), L.to(dtype)
    S0 = L @ L.T if name == "covariance_matrix" else torch.cholesky_inverse(L)
    target = dist.MultivariateNormal(rand(3, seed=71).to(dtype), scale_tril=2 * L)

    def loss(loc, S):
        return torch.distributions.kl_divergence(
            dist.MultivariateNormal(loc, **{name: S}), target)

    loc, S = m.clone().requires_grad_(), S0.clone().requires_grad_()
    g_loc, G = torch.autograd.grad(loss(loc, S), [loc, S])
    torch.testing.assert_close(G, G.T)  # what autograd gives: the test's premise
    nat = natural_gradient(dist.MultivariateNormal(m, **{name: S0}),
                           {"loc": g_loc, name: G})
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(nat["loc"], L @ L.T @ g_loc, **tol)
    torch.testing.assert_close(nat[name], 2 * S0 @ G @ S0, **tol)

    T = S0.clone().requires_grad_()  # the matrix built from its lower triangle
    sym = T.tril() + T.tril(-1).T
    (G_tril,) = torch.autograd.grad(loss(m, sym), [T])
    assert torch.equal(G_tril, G_tril.tril())
    nat_tril = natural_gradient(dist.MultivariateNormal(m, **{name: S0}), {name: G_tril})
    nat_alone = natural_gradient(dist.MultivariateNormal(m, **{name: S0}), {name: G})
    torch.testing.assert_close(nat_tril[name], nat_alone[name], **tol)


# ----------------------------------------------------------------------------------------
# invariance: the natural-gradient direction is a tangent vector, so with u = phi^{-1}(theta)
# and J = dtheta/du, grads map by J^T and natural gradients by J^{-1}
# ----------------------------------------------------------------------------------------
def test_normal_invariance_log_scale():
    loc = rand(5, seed=60)
    scale = rand(5, seed=61).exp()
    g_loc, g_scale = rand(5, seed=62), rand(5, seed=63)
    d = dist.Normal(loc, scale)
    std = natural_gradient(d, {"loc": g_loc, "scale": g_scale})
    # (mu, log sigma): dL/du = dL/dsigma * sigma
    unc = natural_gradient(d, {"loc": g_loc, "scale": g_scale * scale}, coords="unconstrained")
    torch.testing.assert_close(unc["loc"], std["loc"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(unc["scale"], std["scale"] / scale, rtol=1e-10, atol=1e-12)
    # and in (mu, log sigma) the Fisher is diag(1/sigma^2, 2): the closed form
    torch.testing.assert_close(unc["loc"], scale ** 2 * g_loc)
    torch.testing.assert_close(unc["scale"], g_scale * scale / 2)


def test_gamma_invariance_log_params():
    a = torch.tensor([0.5, 3.0], dtype=F64)
    b = torch.tensor([2.0, 0.3], dtype=F64)
    ga, gb = rand(2, seed=70), rand(2, seed=71)
    d = dist.Gamma(a, b)
    std = natural_gradient(d, {"concentration": ga, "rate": gb})
    unc = natural_gradient(d, {"concentration": ga * a, "rate": gb * b}, coords="unconstrained")
    torch.testing.assert_close(unc["concentration"], std["concentration"] / a, rtol=1e-9,
                               atol=1e-12)
    torch.testing.assert_close(unc["rate"], std["rate"] / b, rtol=1e-9, atol=1e-12)


def test_mvn_invariance_log_diagonal():
    """lower_cholesky's unconstrained coordinates: log of the diagonal, identity below."""
    d = 3
    m, L = _mvn_case(d, seed=80)
    g_loc, G = rand(d, seed=81), rand(d, d, seed=82).tril()
    q = dist.MultivariateNormal(m, scale_tril=L)
    std = natural_gradient(q, {"loc": g_loc, "scale_tril": G})
    J = torch.ones(d, d, dtype=F64).tril(-1) + torch.diag(L.diagonal())  # dL_ij / du_ij
    unc = natural_gradient(q, {"loc": g_loc, "scale_tril": G * J}, coords="unconstrained")
    torch.testing.assert_close(unc["loc"], std["loc"], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(unc["scale_tril"].tril(), (std["scale_tril"] / J).tril(),
                               rtol=1e-8, atol=1e-10)


def test_natural_gradient_step_decreases_kl_fastest():
    """A property that needs no Fisher at all: for a small step along -nat from theta0,
    the KL to a target falls, and for a given KL(q_new || q_old) budget the natural step
    beats the plain gradient step scaled to the same budget."""
    m0, s0 = torch.tensor(0.0, dtype=F64), torch.tensor(3.0, dtype=F64)
    mt, st = torch.tensor(1.0, dtype=F64), torch.tensor(0.5, dtype=F64)
    theta = torch.stack([m0, s0]).requires_grad_()
    loss = kl_normal(theta[0], theta[1], mt, st)
    (g,) = torch.autograd.grad(loss, theta)
    nat = natural_gradient(dist.Normal(m0, s0), {"loc": g[0], "scale": g[1]})
    nat = torch.stack([nat["loc"], nat["scale"]])
    budget = 1e-3

    def scaled(v):  # KL(q_new || q_old) = budget, to second order
        F = fisher_normal(m0, s0)
        return v * math.sqrt(2 * budget / float(v @ F @ v))

    def kl_after(v):
        t = torch.stack([m0, s0]) - scaled(v)
        return float(kl_normal(t[0], t[1], mt, st))

    assert kl_after(nat) < kl_after(g) < float(loss.detach())


def test_errors():
    d = dist.Normal(torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64))
    with pytest.raises(ValueError):
        natural_gradient(d, {})
    with pytest.raises(ValueError, match="nope"):
        natural_gradient(d, {"nope": torch.tensor(1.0, dtype=F64)})



def _grad(loss, x):
    x = x.detach().requires_grad_()
    return torch.autograd.grad(loss(x), x)[0]


# Hand-written maps between the standard parameters theta (stacked on dim 0, a batch of 2
# on dim 1) and the natural (eta) and mean (m) coordinates of the conventions documented in
# pyro_natgrad.fisher.expfam: (make, theta, to_eta, from_eta, to_mean).
_FAMILIES = {
    "Normal": (
        dist.Normal,
        torch.tensor([[0.5, -1.0], [2.0, 0.3]], dtype=F64),
        lambda t: torch.stack([t[0] / t[1] ** 2, -0.5 / t[1] ** 2]),
        lambda e: torch.stack([-e[0] / (2 * e[1]), (-0.5 / e[1]).sqrt()]),
        lambda t: torch.stack([t[0], t[0] ** 2 + t[1] ** 2]),
    ),
    "Gamma": (
        dist.Gamma,
        torch.tensor([[2.5, 0.7], [1.5, 4.0]], dtype=F64),
        lambda t: torch.stack([t[0] - 1, -t[1]]),
        lambda e: torch.stack([e[0] + 1, -e[1]]),
        lambda t: torch.stack([torch.digamma(t[0]) - t[1].log(), t[0] / t[1]]),
    ),
}


@pytest.mark.parametrize("family", list(_FAMILIES))
def test_natural_and_mean_coordinates_swap_gradients(family):
    """For an exponential family F_eta = dm/deta, so the natural gradient in natural
    coordinates is the ordinary gradient in mean coordinates, and vice versa. Gradients in
    m come from the chain rule, g_m = (dm/dtheta)^{-T} g_theta, Jacobians by autograd."""
    make, theta, to_eta, from_eta, to_mean = _FAMILIES[family]
    q = make(theta[0], theta[1])

    def loss(t):  # any smooth function of the parameters
        return (t[0] ** 2 * t[1] + torch.sin(t[1]) + t[0]).sum()

    g_eta = _grad(lambda e: loss(from_eta(e)), to_eta(theta))
    g_theta = _grad(loss, theta)
    jac = torch.stack([torch.autograd.functional.jacobian(to_mean, theta[:, i])
                       for i in range(theta.shape[1])])  # (batch, m, theta)
    g_mean = torch.linalg.solve(jac.mT, g_theta.mT.unsqueeze(-1))[..., 0].mT
    nat = natural_gradient(q, {"eta1": g_eta[0], "eta2": g_eta[1]}, coords="natural")
    torch.testing.assert_close(torch.stack([nat["eta1"], nat["eta2"]]), g_mean,
                               rtol=1e-9, atol=1e-12)
    nat = natural_gradient(q, {"mean1": g_mean[0], "mean2": g_mean[1]}, coords="mean")
    torch.testing.assert_close(torch.stack([nat["mean1"], nat["mean2"]]), g_eta,
                               rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="eta1"):  # standard names with natural coords
        natural_gradient(q, {"loc": g_theta[0]}, coords="natural")


def test_a_parameter_shared_by_the_batch_is_refused_not_expanded():
    """``Normal(scalar loc, scale of shape (3,))``: autograd's gradient of the shared
    ``loc`` has shape (), and the error asked for a gradient of shape (3,). Expanding it
    so gives a wrong step: the shared ``loc``'s natural gradient is ``g / sum_i 1/s_i^2``
    (its Fisher summed over the batch), not the per-element ``g s_i^2``. It is now refused
    as a shared parameter."""
    loc = torch.tensor(0.5, requires_grad=True)
    scale = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    d = dist.Normal(loc, scale)
    g_loc, g_scale = torch.autograd.grad(-d.log_prob(torch.tensor([0.1, 0.2, 0.3])).sum(),
                                         [loc, scale])
    with pytest.raises(ValueError, match="shared by the batch"):
        natural_gradient(d, {"loc": g_loc, "scale": g_scale})
    # the expansion the old message suggested: per element g s_i^2, summing to
    # 14 g, against the shared parameter's g / (1 + 1/4 + 1/9)
    expanded = natural_gradient(d, {"loc": g_loc.expand(3), "scale": g_scale})["loc"]
    shared = g_loc / (scale.detach() ** -2).sum()
    assert not torch.isclose(expanded.sum(), shared)


def test_coords_for_a_parameter_held_fixed_says_so():
    """A coords dict naming a parameter that ``grads`` leaves out (held fixed) was told
    "not coordinates of Normal", which it is; the error now says it is held fixed."""
    from torch.distributions.transforms import AffineTransform, ExpTransform

    d = dist.Normal(torch.tensor(0.3), torch.tensor(1.7))
    coords = {"loc": AffineTransform(0.0, 2.0), "scale": ExpTransform()}
    with pytest.raises(ValueError, match=r"\['loc'\], which params .* hold fixed"):
        natural_gradient(d, {"scale": torch.tensor(1.0)}, coords=coords)
    with pytest.raises(ValueError, match="not coordinates of Normal"):
        natural_gradient(d, {"scale": torch.tensor(1.0)}, coords={"rate": ExpTransform()})
