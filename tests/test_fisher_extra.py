"""Fisher library checks beyond the cross-check table: NegativeBinomial against exact sums,
and regressions."""

import decimal
import math
import warnings

import pytest
import torch
import pyro.distributions as dist
from torch.distributions import constraints, kl_divergence

from pyro_natgrad import natural_gradient, register_fisher
from pyro_natgrad.fisher import (
    DiagonalFisher, FisherFallbackWarning, ParamSpec, SingularFisherError, fisher_information,
    fisher_operator, fisher_solve, fisher_vp,
)
from tests.seeding import CPUDraws


def _exact_fisher(r, param, name):
    """E[s^2] by summing over k = 0..K-1, the score by autograd through torch's log_prob
    (one leaf copy of the parameter per k gives every score in one backward pass)."""
    k = torch.arange(0, 1500, dtype=torch.float64)
    theta = param.detach().expand(k.shape).clone().requires_grad_()
    logp = dist.NegativeBinomial(r, **{name: theta}).log_prob(k)
    (scores,) = torch.autograd.grad(logp.sum(), theta)
    probs = logp.detach().exp()
    assert abs(float(probs.sum()) - 1) < 1e-10  # the truncation loses nothing
    return float((probs * scores.square()).sum())


@pytest.mark.parametrize("name,value", [("probs", 0.3), ("probs", 0.8), ("logits", -1.0),
                                        ("logits", 0.7)])
@pytest.mark.parametrize("r", [0.5, 3.0, 20.0])
def test_negative_binomial_matches_exact_sum(name, value, r):
    param = torch.tensor(value, dtype=torch.float64)
    d = dist.NegativeBinomial(torch.tensor(r, dtype=torch.float64), **{name: param})
    F = fisher_information(d)
    assert F.shape == (1, 1)
    assert float(F) == pytest.approx(_exact_fisher(r, param, name), rel=1e-9)


def test_negative_binomial_natural_coordinates_are_log_p():
    # eta = log p, A(eta) = -r log(1 - e^eta): F_eta = A'' = r p / (1 - p)^2.
    r, p = 4.0, torch.tensor(0.35, dtype=torch.float64)
    F = fisher_information(dist.NegativeBinomial(r, probs=p), coords="natural")
    assert float(F) == pytest.approx(float(r * p / (1 - p) ** 2), rel=1e-12)
    Fm = fisher_information(dist.NegativeBinomial(r, probs=p), coords="mean")
    assert float(Fm) == pytest.approx(1 / float(F), rel=1e-10)


def test_dict_coords_with_an_expanded_untransformed_parameter():
    # Regression: an expanded (stride-0) parameter left in standard coordinates used to
    # make torch.func.jvp fail. F_loc in loc = 2u is 4 / sigma^2; scale is untouched.
    from torch.distributions.transforms import AffineTransform

    d = dist.Normal(torch.zeros(3, dtype=torch.float64),
                    torch.tensor(0.5, dtype=torch.float64).expand(3))
    F = fisher_information(d, coords={"loc": AffineTransform(0.0, 2.0)})
    expected = torch.diag(torch.tensor([16.0, 8.0], dtype=torch.float64)).expand(3, 2, 2)
    assert torch.allclose(F, expected)


def _exact_logits_fisher_product(logits, n, x, digits=50):
    """``n (diag(p) - p p^T) x`` with ``p = softmax(logits)``, in decimal arithmetic."""
    with decimal.localcontext() as ctx:
        ctx.prec = digits
        e = [decimal.Decimal(float(v)).exp() for v in logits]
        p = [v / sum(e) for v in e]
        xs = [decimal.Decimal(float(v)) for v in x]
        px = sum(pi * xi for pi, xi in zip(p, xs))
        return [float(n * pi * (xi - px)) for pi, xi in zip(p, xs)]


@pytest.mark.parametrize("logits,n", [([14.0, -10.0, 0.0], 7), ([-3.0, 0.5, 12.0, -8.0], 1)])
def test_logits_fisher_keeps_its_accuracy_near_a_certain_category(logits, n):
    """With one probability within e^-14 of 1, ``n p (x - p^T x)`` computed as written
    loses ``eps / (1 - p_max)`` (1e-10) of relative accuracy; the operator keeps ~eps,
    against a 50-digit product, has ``1`` in its null space exactly, and its damped
    solve inverts its product."""
    logits_t = torch.tensor(logits, dtype=torch.float64)
    d = (dist.Multinomial(n, logits=logits_t) if n > 1 else dist.Categorical(logits=logits_t))
    op = fisher_operator(d)
    x = torch.tensor([0.3, -1.1, 0.7, 0.2][: len(logits)], dtype=torch.float64)
    exact = torch.tensor(_exact_logits_fisher_product(logits, n, x.tolist()),
                         dtype=torch.float64)
    got = op.mv(x)
    assert ((got - exact).abs() <= 1e-13 * exact.abs()).all(), (got, exact)
    assert torch.equal(op.mv(torch.ones_like(x)), torch.zeros_like(x))
    lam = 1e-3 * n
    back = op.solve(op.mv(x) + lam * x, damping=lam)
    assert (back - x).norm() <= 1e-12 * x.norm()


# ----------------------------------------------------------------------------------------
# Subclasses with other parameters do not inherit their parent's closed form
# ----------------------------------------------------------------------------------------
F64 = torch.float64


def _hessian(fn, x):
    return torch.autograd.functional.hessian(fn, x.detach())


def _fallback(fn, *args, **kwargs):
    """Call through the autograd fallback (which warns once per family: not checked)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FisherFallbackWarning)
        return fn(*args, **kwargs)


def test_chi2_fisher_is_over_df():
    """Chi2(df) is a Gamma(df/2, 1/2) subclass; its Fisher is 1 x 1 over df: the Hessian
    of torch's KL in df, and in natural coordinates A''(eta) for
    A(eta) = lgamma(eta + 1) + (eta + 1) log 2, eta = df/2 - 1."""
    df0 = torch.tensor([0.7, 3.0, 40.0], dtype=F64)
    d = dist.Chi2(df0)
    expected = torch.stack([_hessian(lambda x: kl_divergence(dist.Chi2(t), dist.Chi2(x)), t)
                            for t in df0]).reshape(3, 1, 1)
    torch.testing.assert_close(fisher_information(d), expected, rtol=1e-10, atol=0)

    def log_partition(eta):
        return torch.lgamma(eta + 1) + (eta + 1) * math.log(2)

    natural = torch.stack([_hessian(log_partition, e) for e in df0 / 2 - 1]).reshape(3, 1, 1)
    torch.testing.assert_close(fisher_information(d, coords="natural"), natural,
                               rtol=1e-10, atol=0)


def _ordered_logistic_fisher(predictor, cutpoints):
    """sum_k p_k s_k s_k^T over the categories, scores by autograd of log_prob."""
    x = torch.cat([predictor.reshape(1), cutpoints]).detach().requires_grad_()
    F = 0
    for k in range(cutpoints.numel() + 1):
        lp = dist.OrderedLogistic(x[0], x[1:]).log_prob(torch.tensor(k))
        (s,) = torch.autograd.grad(lp, x)
        F = F + lp.detach().exp() * torch.outer(s, s)
    return F


def test_ordered_logistic_is_over_predictor_and_cutpoints():
    predictor = torch.tensor(0.3, dtype=F64)
    cutpoints = torch.tensor([-1.0, 0.5, 2.0], dtype=F64)
    got = _fallback(fisher_information, dist.OrderedLogistic(predictor, cutpoints))
    torch.testing.assert_close(got, _ordered_logistic_fisher(predictor, cutpoints),
                               rtol=1e-10, atol=1e-12)


class _PrecisionNormal(dist.Normal):
    """A Normal subclass built from (loc, precision)."""

    arg_constraints = {"loc": constraints.real, "precision": constraints.positive}

    def __init__(self, loc, precision, validate_args=None):
        self.precision = precision
        super().__init__(loc, precision.rsqrt(), validate_args=validate_args)


class _PrecisionNormalInheritedConstraints(dist.Normal):
    """The same, without declaring its own arg_constraints."""

    def __init__(self, loc, precision, validate_args=None):
        self.precision = precision
        super().__init__(loc, precision.rsqrt(), validate_args=validate_args)


@pytest.mark.parametrize("cls", [_PrecisionNormal, _PrecisionNormalInheritedConstraints])
def test_subclass_with_other_parameters_is_not_given_the_parents_fisher(cls):
    loc, prec = torch.tensor(0.5, dtype=F64), torch.tensor(4.0, dtype=F64)
    d = cls(loc, prec)
    if cls is _PrecisionNormal:  # the fallback: a KL Hessian over (loc, precision)
        got = _fallback(fisher_information, d)
        n = dist.Normal(loc, prec.rsqrt())
        expected = _hessian(lambda x: kl_divergence(n, dist.Normal(x[0], x[1].rsqrt())),
                            torch.stack([loc, prec]))
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)
    else:  # no "scale" argument to rebuild it with
        with pytest.raises(ValueError, match="register_fisher"):
            fisher_information(d)


@pytest.mark.parametrize("make", [
    lambda loc, L: dist.OMTMultivariateNormal(loc, L),
    lambda loc, L: dist.AVFMultivariateNormal(loc, L, torch.zeros(2, 1, 2, dtype=F64)),
    lambda loc, L: dist.MultivariateNormal(loc, scale_tril=L),
], ids=["OMT", "AVF", "pyro-MVN"])
def test_same_parameter_subclasses_keep_the_closed_form(make):
    loc = torch.tensor([0.1, -0.4], dtype=F64)
    L = torch.tensor([[1.0, 0.0], [0.3, 0.5]], dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FisherFallbackWarning)
        got = fisher_information(make(loc, L))
    rows, cols = torch.tril_indices(2, 2)
    base = torch.distributions.MultivariateNormal(loc, scale_tril=L)

    def kl(x):
        M = torch.zeros(2, 2, dtype=F64).index_put((rows, cols), x[2:])
        return kl_divergence(base, torch.distributions.MultivariateNormal(x[:2], scale_tril=M))

    torch.testing.assert_close(got, _hessian(kl, torch.cat([loc, L[rows, cols]])),
                               rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------
# Independent around a fallback (dense) Fisher
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("ndims", [1, 2])
def test_independent_of_a_fallback_family_is_block_diagonal_param_major(ndims):
    """Gumbel has a KL in torch but no closed form here (the KL-Hessian fallback). The
    reference is the Hessian of the Independent KL in the flat param-major vector
    (all reinterpreted loc entries, then all scale entries), per remaining batch element."""
    loc = torch.tensor([[0.0, 1.0, -2.0], [0.5, 0.3, 4.0]], dtype=F64)
    scale = torch.tensor([[1.0, 0.5, 2.0], [3.0, 0.7, 1.2]], dtype=F64)
    d = dist.Gumbel(loc, scale).to_event(ndims)
    got = _fallback(fisher_information, d)
    rows = [slice(None)] if ndims == 2 else [0, 1]
    expected = []
    for r in rows:
        p0 = dist.Gumbel(loc[r], scale[r]).to_event(ndims if ndims == 2 else 1)
        shape = loc[r].shape

        def kl(x):
            half = x.shape[0] // 2
            q = dist.Gumbel(x[:half].reshape(shape), x[half:].reshape(shape))
            return kl_divergence(p0, q.to_event(len(shape)))

        expected.append(_hessian(kl, torch.cat([loc[r].reshape(-1), scale[r].reshape(-1)])))
    expected = expected[0] if ndims == 2 else torch.stack(expected)
    assert got.shape == expected.shape == ((12, 12) if ndims == 2 else (2, 6, 6))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    v = torch.linspace(-1, 1, expected.shape[-1], dtype=F64).expand(expected.shape[:-1])
    torch.testing.assert_close(fisher_operator(d).mv(v), (expected @ v.unsqueeze(-1))[..., 0])
    torch.testing.assert_close(fisher_operator(d).solve(v),
                               torch.linalg.solve(expected, v.unsqueeze(-1))[..., 0])


# ----------------------------------------------------------------------------------------
# StudentT F[df, df] without cancellation
# ----------------------------------------------------------------------------------------
_DFS = [1e-3, 0.5, 1.0, 4.0, 12.0, 19.9, 20.0, 45.0, 100.0, 1e3, 1e4, 1e5, 1e7, 1e9]


def _student_t_df_reference(nu):
    """(psi'(nu/2) - psi'((nu+1)/2))/4 - (nu+5)/(2 nu (nu+1)(nu+3)) with 60 digits (the
    two terms are ~1/nu^2, their difference ~3.5/nu^4: 2 log10(nu) digits cancel)."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(60):
        v = mpmath.mpf(nu)
        return float((mpmath.polygamma(1, v / 2) - mpmath.polygamma(1, (v + 1) / 2)) / 4
                     - (v + 5) / (2 * v * (v + 1) * (v + 3)))


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 2e-13), (torch.float32, 3e-7)])
def test_student_t_df_entry_matches_high_precision(dtype, rtol):
    df = torch.tensor(_DFS, dtype=dtype)
    d = dist.StudentT(df, torch.zeros_like(df), torch.full_like(df, 2.0))
    F = fisher_information(d)
    ref = torch.tensor([_student_t_df_reference(float(v)) for v in df.double()], dtype=F64)
    rel = (F[:, 0, 0].double() / ref - 1).abs()
    assert (rel <= rtol).all(), list(zip(_DFS, rel.tolist()))
    assert bool((torch.linalg.cholesky_ex(F)[1] == 0).all())  # positive definite


# ----------------------------------------------------------------------------------------
# probs/logits (scale_tril/covariance_matrix) both stored: which are the coordinates
# ----------------------------------------------------------------------------------------
def _enumerated_fisher(make, name, value, support):
    """sum_x p(x) s(x) s(x)^T over ``support``, s by autograd w.r.t. ``name``."""
    x = value.detach().clone().requires_grad_()
    F = 0
    for v in support:
        lp = make(**{name: x}).log_prob(v)
        (s,) = torch.autograd.grad(lp, x)
        F = F + lp.detach().exp() * torch.outer(s.reshape(-1), s.reshape(-1))
    return F


_DISCRETE = {
    "Bernoulli": (dist.Bernoulli, torch.tensor(0.4, dtype=F64),
                  torch.tensor([0.0, 1.0], dtype=F64)),
    "Binomial": (lambda **k: dist.Binomial(5, **k), torch.tensor(0.4, dtype=F64),
                 torch.arange(6.0, dtype=F64)),
    "Categorical": (dist.Categorical, torch.tensor([0.1, 0.5, -0.3], dtype=F64),
                    torch.arange(3)),
}


@pytest.mark.parametrize("family", list(_DISCRETE))
def test_expand_after_reading_the_alternative_keeps_the_coordinates(family):
    make, logits, support = _DISCRETE[family]
    probs = make(logits=logits).probs.detach()
    by_logits = _enumerated_fisher(make, "logits", logits, support)
    by_probs = _enumerated_fisher(make, "probs", probs, support)
    d = make(logits=logits)
    d.probs  # cached, as sampling or .mean do
    e = d.expand([2])  # copies probs then logits: which was passed is lost
    assert fisher_operator(e).names == ("logits",)
    torch.testing.assert_close(fisher_information(e)[0].reshape(by_logits.shape), by_logits)
    F = fisher_information(e, params=("probs",))[0]
    torch.testing.assert_close(F.reshape(by_probs.shape), by_probs)
    # built with probs, logits cached by log_prob, not expanded: still probs
    d = make(probs=probs)
    d.log_prob(support[0])
    d.logits
    assert fisher_operator(d).names == ("probs",)
    torch.testing.assert_close(fisher_information(d).reshape(by_probs.shape), by_probs)


def test_multivariate_normal_matrix_alternative_after_expand():
    L = torch.tensor([[1.0, 0.0], [0.5, 2.0]], dtype=F64)
    m = dist.MultivariateNormal(torch.zeros(2, dtype=F64), scale_tril=L)
    m.covariance_matrix
    assert fisher_operator(m.expand([3])).names == ("loc", "scale_tril")
    c = dist.MultivariateNormal(torch.zeros(2, dtype=F64), covariance_matrix=L @ L.T)
    c.scale_tril
    assert fisher_operator(c).names == ("loc", "covariance_matrix")
    assert fisher_operator(c.expand([3]), params=("loc", "covariance_matrix")).names == (
        "loc", "covariance_matrix")


# ----------------------------------------------------------------------------------------
# Families whose support moves with the parameters have no Fisher metric
# ----------------------------------------------------------------------------------------
def test_support_depending_on_the_parameters_is_refused():
    uniform = dist.Uniform(torch.tensor(0.0, dtype=F64), torch.tensor(2.0, dtype=F64))
    with pytest.raises(ValueError, match=r"support .* depends on the parameters \['low', 'high'\]"):
        _fallback(fisher_information, uniform)
    scale, alpha = torch.tensor(1.0, dtype=F64), torch.tensor(3.0, dtype=F64)
    with pytest.raises(ValueError, match=r"\['scale'\].*params=\('alpha',\)"):
        _fallback(fisher_information, dist.Pareto(scale, alpha))
    # alpha alone is regular: -d^2/dalpha^2 log p(x) = 1/alpha^2 whatever x
    expected = -_hessian(lambda a: dist.Pareto(scale, a).log_prob(torch.tensor(2.5, dtype=F64)),
                         alpha)
    got = _fallback(fisher_information, dist.Pareto(scale, alpha), params=("alpha",))
    torch.testing.assert_close(got, expected.reshape(1, 1), rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------------------
# Transformed families whose torch KL ignores their parameters: Monte Carlo route
# ----------------------------------------------------------------------------------------
def _score_outer_products(make, params, n):
    """Per-sample s s^T, s = grad log p(x) by autograd w.r.t. a copy of params per sample."""
    with torch.no_grad():
        x = make(*params).sample((n,))
    leaves = [p.expand(n).clone().requires_grad_() for p in params]
    grads = torch.autograd.grad(make(*leaves).log_prob(x).sum(), leaves)
    s = torch.stack(grads, -1)
    return s.unsqueeze(-1) * s.unsqueeze(-2)


EULER = 0.5772156649015329


@pytest.mark.parametrize("family", ["Weibull", "Kumaraswamy"])
def test_transformed_families_without_a_usable_kl_use_monte_carlo(family):
    """torch's KL for these dispatches to its transformed-transformed rule, which does not
    depend on their parameters (this used to crash). The Monte Carlo route must agree with
    the Weibull closed form (scale l, shape k: [[k^2/l^2, -(1-g)/l], [., ((1-g)^2 +
    pi^2/6)/k^2]]) and with an independent Monte Carlo estimate, within standard errors."""
    from pyro_natgrad.fisher import MC_SAMPLES

    make = dist.Weibull if family == "Weibull" else dist.Kumaraswamy
    params = (torch.tensor(1.5, dtype=F64), torch.tensor(2.0, dtype=F64))
    torch.manual_seed(1)
    got = _fallback(fisher_information, make(*params))
    outer = _score_outer_products(make, params, MC_SAMPLES)
    se = outer.std(0) / math.sqrt(MC_SAMPLES)
    assert ((got - outer.mean(0)).abs() <= 5 * math.sqrt(2) * se).all(), (got, outer.mean(0))
    if family == "Weibull":
        lam, k = params
        exact = torch.stack([torch.stack([k**2 / lam**2, -(1 - EULER) / lam]),
                             torch.stack([-(1 - EULER) / lam,
                                          ((1 - EULER) ** 2 + math.pi**2 / 6) / k**2])])
        assert ((got - exact).abs() <= 5 * se).all(), (got, exact)


# ----------------------------------------------------------------------------------------
# Singular Fisher matrices: which solves are defined
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("arg", ["logits", "probs"])
def test_softmax_coordinates_solve_like_logits(arg, n):
    """'unconstrained' logits are the logits (identity), and probs = softmax(u): both
    have the logits' Fisher n (diag p - p p^T) (here by enumeration of a categorical's
    scores), and undamped solves of g in its range give the minimum-norm pinv(F) g."""
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    make = dist.Categorical if n == 1 else (lambda **k: dist.Multinomial(n, **k))
    d = make(**{arg: p if arg == "probs" else p.log() + 0.7})
    F_ref = n * _enumerated_fisher(dist.Categorical, "logits", p.log(), torch.arange(4))
    g = torch.tensor([0.3, -1.0, 0.4, 0.1], dtype=F64)
    g = g - g.mean()  # in the range of F (orthogonal to its null vector 1)
    got = fisher_solve(d, g, coords="unconstrained")
    torch.testing.assert_close(got, torch.linalg.pinv(F_ref, hermitian=True) @ g,
                               rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fisher_information(d, coords="unconstrained"), F_ref)


def _lowrank_kl_hessian(loc, W, D, names):
    p0 = torch.distributions.MultivariateNormal(loc, W @ W.T + torch.diag(D))
    sizes = {"loc": loc.numel(), "cov_factor": W.numel(), "cov_diag": D.numel()}
    values = {"loc": loc, "cov_factor": W, "cov_diag": D}

    def kl(x):
        parts, i = dict(values), 0
        for name in names:
            parts[name] = x[i:i + sizes[name]].reshape(values[name].shape)
            i += sizes[name]
        cov = parts["cov_factor"] @ parts["cov_factor"].T + torch.diag(parts["cov_diag"])
        return kl_divergence(p0, torch.distributions.MultivariateNormal(parts["loc"], cov))

    return _hessian(kl, torch.cat([values[n].reshape(-1) for n in names]))


@pytest.mark.parametrize("seed", [0, 3])  # 3: a Cholesky of the singular F used to succeed
def test_lowrank_rank_two_needs_damping(seed):
    g = CPUDraws(seed)
    loc = g.randn(4, dtype=F64)
    W = g.randn(4, 2, dtype=F64)
    D = g.rand(4, dtype=F64) + 0.5
    d = dist.LowRankMultivariateNormal(loc, W, D)
    v = g.randn(16, dtype=F64)
    with pytest.raises(SingularFisherError, match="cov_factor"):
        fisher_solve(d, v)
    with pytest.raises(SingularFisherError, match="cov_factor"):
        fisher_solve(d, v, coords="unconstrained")
    with pytest.raises(SingularFisherError, match="cov_factor"):
        natural_gradient(d, {"loc": v[:4], "cov_factor": v[4:12].reshape(4, 2),
                             "cov_diag": v[12:]})
    F = _lowrank_kl_hessian(loc, W, D, ("loc", "cov_factor", "cov_diag"))
    torch.testing.assert_close(fisher_solve(d, v, damping=1e-2),
                               torch.linalg.solve(F + 1e-2 * torch.eye(16, dtype=F64), v))
    # without cov_factor the Fisher is regular
    F = _lowrank_kl_hessian(loc, W, D, ("loc", "cov_diag"))
    got = natural_gradient(d, {"loc": v[:4], "cov_diag": v[12:]})
    torch.testing.assert_close(torch.cat([got["loc"], got["cov_diag"]]),
                               torch.linalg.solve(F, torch.cat([v[:4], v[12:]])))


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,coords,name", [
    (lambda: dist.Gamma(torch.tensor(2.0), torch.tensor(3.0)),
     {"rate": torch.distributions.transforms.SigmoidTransform()}, "rate"),
    (lambda: dist.Normal(torch.tensor([0.3, -0.3]), torch.tensor(1.0)),
     {"loc": torch.distributions.transforms.ExpTransform()}, "loc"),
], ids=["sigmoid-rate-3", "exp-loc-negative"])
def test_coordinate_transform_must_reach_the_parameter(make, coords, name):
    """sigmoid(sigmoid^-1(3)) is 1 and log(-0.3) NaN: those Fishers were of another point."""
    with pytest.raises(ValueError, match=rf"coords\['{name}'\].*does not contain"):
        fisher_information(make(), coords=coords)


# ----------------------------------------------------------------------------------------
# Families keeping their parameters as properties (in an inner distribution): fallback
# ----------------------------------------------------------------------------------------
MC_SAMPLES_TEST = 10_000
T = torch.tensor


def _within_standard_errors(got, exact, make, log_prob, params, n=MC_SAMPLES_TEST):
    """``got`` (the library's Monte Carlo Fisher) is within 5 standard errors of ``exact``;
    the standard errors from scores of ``log_prob`` (written in the test) by autograd."""
    torch.manual_seed(3)
    with torch.no_grad():
        x = make(*params).sample((n,))
    leaves = [p.expand((n,) + p.shape).clone().requires_grad_() for p in params]
    grads = torch.autograd.grad(log_prob(x, *leaves).sum(), leaves)
    s = torch.cat([g.reshape(n, -1) for g in grads], -1)
    se = (s.unsqueeze(-1) * s.unsqueeze(-2)).std(0) / math.sqrt(n)
    assert got.shape == exact.shape
    assert ((got - exact).abs() <= 5 * se + 1e-12).all(), (got, exact, se)


def test_multivariate_student_t_uses_the_fallback():
    """pyro keeps MultivariateStudentT's ``scale_tril`` as a lazy property, and its
    constructor takes no alternative to it: the fallback refused it as one of
    (scale_tril, covariance_matrix, precision_matrix) and could not rebuild the family.
    Its (df, loc) block against the closed form (Lange, Little & Taylor 1989), ``p = 2``:
    ``F_df = (psi'(nu/2) - psi'((nu+p)/2))/4 - p (nu+p+4) / (2 nu (nu+p) (nu+p+2))``,
    ``F_loc = (nu+p)/(nu+p+2) Sigma^{-1}``, uncoupled; within standard errors of scores
    by autograd through torch's log_prob."""
    L = T([[1.0, 0.0], [0.4, 0.7]], dtype=F64)
    nu, loc = T(5.0, dtype=F64), T([0.3, -0.2], dtype=F64)
    d = dist.MultivariateStudentT(nu, loc, L)
    op = _fallback(fisher_operator, d)
    assert [(s.name, s.size, s.packing) for s in op.specs] == [
        ("df", 1, "full"), ("loc", 2, "full"), ("scale_tril", 3, "tril")]
    assert "scale_tril" not in vars(d)  # read from a copy: d's cache left alone
    p = 2
    exact = torch.zeros(3, 3, dtype=F64)
    exact[0, 0] = (torch.polygamma(1, nu / 2) - torch.polygamma(1, (nu + p) / 2)) / 4 \
        - p * (nu + p + 4) / (2 * nu * (nu + p) * (nu + p + 2))
    exact[1:, 1:] = (nu + p) / (nu + p + 2) * torch.cholesky_inverse(L)

    def make(df, loc):
        return dist.MultivariateStudentT(df, loc, L)

    def log_prob(x, df, loc):
        return make(df, loc).log_prob(x)

    _within_standard_errors(op.dense()[:3, :3], exact, make, log_prob, (nu, loc))


def _enumerated_count_fisher(log_prob, params, kmax):
    """sum_k p(k) s(k) s(k)^T over k < kmax, s the autograd score of ``log_prob``."""
    k = torch.arange(kmax, dtype=F64)
    leaves = [p.expand(k.shape).clone().requires_grad_() for p in params]
    logp = log_prob(k, *leaves)
    s = torch.stack(torch.autograd.grad(logp.sum(), leaves), -1)
    probs = logp.detach().exp()
    assert abs(float(probs.sum()) - 1) < 1e-12
    return (probs[:, None, None] * s.unsqueeze(-1) * s.unsqueeze(-2)).sum(0)


def _zip_log_prob(k, rate, gate):
    poisson = k * rate.log() - rate - torch.lgamma(k + 1)
    return torch.where(k == 0, torch.log(gate + (1 - gate) * torch.exp(-rate)),
                       torch.log1p(-gate) + poisson)


def _gamma_poisson_log_prob(k, a, b):
    return (torch.lgamma(k + a) - torch.lgamma(a) - torch.lgamma(k + 1)
            + a * torch.log(b / (1 + b)) - k * torch.log1p(b))


def _half_cauchy_log_prob(x, s):
    return math.log(2 / math.pi) - s.log() - torch.log1p((x / s).square())


def _logistic_normal_log_prob(x, loc, scale):
    # The stick-breaking Jacobian does not depend on the parameters: the Normal's score.
    y = torch.distributions.StickBreakingTransform().inv(x)
    return (-0.5 * ((y - loc) / scale).square() - scale.log()).sum(-1)


@pytest.mark.parametrize("family", ["HalfCauchy", "ZeroInflatedPoisson", "GammaPoisson",
                                    "LogisticNormal"])
def test_families_with_parameters_held_as_properties_use_the_fallback(family):
    """These keep their parameters in an inner distribution (read through properties):
    they were refused as having 'no continuous parameters' (ZeroInflatedPoisson: a raw
    TypeError missing 'rate'). References: HalfCauchy 1/(2 s^2); LogisticNormal the
    Normal's diag(1/s^2, 2/s^2) (a fixed bijection of the data); ZeroInflatedPoisson and
    GammaPoisson by enumeration of a log_prob written here."""
    if family == "HalfCauchy":
        params, make, log_prob = (T(1.5, dtype=F64),), dist.HalfCauchy, _half_cauchy_log_prob
        exact = (0.5 / params[0] ** 2).reshape(1, 1)
    elif family == "LogisticNormal":
        params = (T([0.2, -0.1], dtype=F64), T([1.0, 0.5], dtype=F64))
        make, log_prob = dist.LogisticNormal, _logistic_normal_log_prob
        exact = torch.diag(torch.cat([params[1] ** -2, 2 * params[1] ** -2]))
    else:
        if family == "ZeroInflatedPoisson":
            params, log_prob = (T(2.0, dtype=F64), T(0.3, dtype=F64)), _zip_log_prob

            def make(rate, gate):
                return dist.ZeroInflatedPoisson(rate, gate=gate)
        else:
            params, log_prob = (T(2.0, dtype=F64), T(1.5, dtype=F64)), _gamma_poisson_log_prob
            make = dist.GammaPoisson
        exact = _enumerated_count_fisher(log_prob, params, 150)
    torch.manual_seed(0)
    got = _fallback(fisher_information, make(*params))
    _within_standard_errors(got, exact, make, log_prob, params)


@pytest.mark.parametrize("make,match", [
    (lambda: dist.FoldedDistribution(dist.Normal(T(0.5), T(2.0))),
     r"not all bijective.*register_fisher\(FoldedDistribution\)"),
    (lambda: dist.TransformedDistribution(dist.Normal(T(0.3), T(0.8)),
                                          [torch.distributions.ExpTransform()]),
     r"base distribution and transforms.*fisher_operator\(d\.base_dist\)"),
    (lambda: dist.ZeroInflatedNegativeBinomial(T(2.0), probs=T(0.3), gate=T(0.2)),
     r"cannot rebuild ZeroInflatedNegativeBinomial.*register_fisher"),
    (lambda: dist.AffineBeta(T(2.0), T(3.0), T(0.5), T(2.0)),
     r"support .* depends on the parameters \['loc', 'scale'\]"),
    # no KL and no sample(): torch's bare NotImplementedError escaped the Monte Carlo route
    (lambda: dist.LogNormalNegativeBinomial(T(5.0), T(0.3), T(0.5)),
     r"sample\(\) and log_prob\(\).*register_fisher\(LogNormalNegativeBinomial\)"),
], ids=["folded", "transformed", "zinb", "affine-beta", "no-sample"])
def test_unsupported_families_say_why_and_what_to_do(make, match):
    """Each used to say 'has no continuous parameters' (ZeroInflatedNegativeBinomial would
    have failed inside the rebuild)."""
    with pytest.raises(ValueError, match=match):
        _fallback(fisher_information, make())


# ----------------------------------------------------------------------------------------
# pyro's .mask() and .expand() wrappers: the base's Fisher at each element
# ----------------------------------------------------------------------------------------
def _normal_fisher(loc, scale):
    """Normal(loc, scale) elementwise: diag(1/s^2, 2/s^2), shape scale.shape + (2, 2)."""
    return torch.diag_embed(torch.stack([scale ** -2 + 0 * loc, 2 * scale ** -2], -1))


class _NormalWithoutExpand(dist.Normal):
    def expand(self, batch_shape, _instance=None):
        raise NotImplementedError


def _pyro_expanded(d, shape):
    from pyro.distributions.torch_distribution import ExpandedDistribution

    return ExpandedDistribution(d, torch.Size(shape))


@pytest.mark.parametrize("case", ["mask", "mask-broadcast", "expand", "expand-interstitial",
                                  "expand-no-native", "expand-to-event", "mask-of-expand"])
def test_mask_and_expand_wrappers_give_the_base_fisher_per_element(case):
    """These said 'has no continuous parameters'. Reference: the Normal's closed form,
    broadcast to the wrapper's batch shape by hand (to_event: param-major diagonal)."""
    loc, scale = T([0.5, 1.0], dtype=F64), T([2.0, 3.0], dtype=F64)
    n = dist.Normal(loc, scale)
    per = _normal_fisher(loc, scale)  # (2, 2, 2)
    if case == "mask":
        d, expected = n.mask(T([True, False])), per
    elif case == "mask-broadcast":  # pyro expands the base to the mask's shape
        d, expected = n.mask(torch.ones(3, 2, dtype=torch.bool)), per.expand(3, 2, 2, 2)
    elif case == "expand":
        d, expected = _pyro_expanded(n, (3, 2)), per.expand(3, 2, 2, 2)
    elif case == "expand-interstitial":
        col = dist.Normal(loc[:, None], scale[:, None])  # batch (2, 1) -> (2, 3)
        d, expected = _pyro_expanded(col, (2, 3)), per[:, None].expand(2, 3, 2, 2)
    elif case == "expand-no-native":  # the base's operator broadcast densely
        d, expected = _pyro_expanded(_NormalWithoutExpand(loc, scale), (3, 2)), \
            per.expand(3, 2, 2, 2)
    elif case == "expand-to-event":
        d = _pyro_expanded(n, (3, 2)).to_event(1)
        expected = torch.diag(torch.cat([scale ** -2, 2 * scale ** -2])).expand(3, 4, 4)
    else:
        d, expected = _pyro_expanded(n, (3, 2)).mask(False), per.expand(3, 2, 2, 2)
    got = fisher_information(d)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    v = torch.linspace(-1, 2, expected[..., 0].numel(), dtype=F64).reshape(expected.shape[:-1])
    torch.testing.assert_close(fisher_operator(d).mv(v), (expected @ v[..., None])[..., 0])
    torch.testing.assert_close(fisher_solve(d, v),
                               torch.linalg.solve(expected, v[..., None])[..., 0])
    # unconstrained (log scale): F_log = diag(1/s^2, 2) at every element
    u = fisher_information(d, coords="unconstrained")
    if case != "expand-to-event":
        torch.testing.assert_close(u[..., 1, 1], torch.full(u.shape[:-2], 2.0, dtype=F64))


def test_expand_wrapper_keeps_the_argument_passed_before_expanding():
    """torch's expand() copies both probs and logits once logits were read (by log_prob);
    the Fisher of a probs-built Bernoulli is over probs, 1/(p(1-p)), not p(1-p)."""
    p = T([0.2, 0.7], dtype=F64)
    b = dist.Bernoulli(probs=p)
    b.log_prob(T([1.0, 0.0], dtype=F64))  # caches logits
    got = fisher_information(_pyro_expanded(b, (3, 2)))
    torch.testing.assert_close(got, (1 / (p * (1 - p))).reshape(2, 1, 1).expand(3, 2, 1, 1))


# ----------------------------------------------------------------------------------------
# Wrong shapes: a ValueError naming the expected shape, not torch broadcasting
# ----------------------------------------------------------------------------------------
_NORMAL2 = (lambda: dist.Normal(T([0.5, 1.0]), T([2.0, 3.0])))
_GAMMA2 = (lambda: dist.Gamma(T([2.0, 3.0]), T([1.0, 0.5])))


@pytest.mark.parametrize("fn", ["fisher_vp", "fisher_solve", "op.solve-damped"])
@pytest.mark.parametrize("make,shape", [(_NORMAL2, (2,)), (_NORMAL2, (3, 2)), (_GAMMA2, (4,)),
                                        (_GAMMA2, (2, 2, 3))],
                         ids=["normal-no-batch", "normal-wrong-batch", "gamma-wrong-k",
                              "gamma-wrong-k-extra"])
def test_wrong_shape_vector_names_the_expected_shape(fn, make, shape):
    """v must be batch_shape + (k,) = (2, 2) here (extra leading dims allowed). (2,) was
    broadcast silently against the batch (fisher_vp), (3, 2) failed inside torch, and a
    wrong k was reported without the batch shape."""
    d, v = make(), torch.ones(shape)
    with pytest.raises(ValueError, match=r"batch_shape \+ \(k,\) = \(2, 2\).*got shape"):
        if fn == "fisher_vp":
            fisher_vp(d, v)
        elif fn == "fisher_solve":
            fisher_solve(d, v)
        else:
            fisher_operator(d).solve(v, damping=0.1)


@pytest.mark.parametrize("grad_shape", [(3,), (1,), (), (2, 2)])
def test_wrong_shape_gradient_names_the_parameter_shape(grad_shape):
    """Each gradient must be shaped like its parameter, (2,) here; these failed inside
    torch (a RuntimeError about concatenating tensors)."""
    d = _NORMAL2()
    with pytest.raises(ValueError, match=r"grads\['scale'\] has shape .*'scale' of Normal "
                                         r"\(in coords 'unconstrained'\) has shape \(2,\)"):
        natural_gradient(d, {"loc": torch.ones(2), "scale": torch.ones(grad_shape)},
                         coords="unconstrained")


def _sigmoid(x):
    """``1 / (1 + e^-x)`` in Python floats (double precision, never through torch)."""
    return 1 / (1 + math.exp(-x))


# (make, the Fisher in the logits, in natural coordinates), written with p = sigmoid(x)
# and q = sigmoid(-x) = 1 - p. Geometric counts failures (eta = log q, T = x: the
# variance q / p^2); NegativeBinomial successes (eta = log p: r p / q^2).
_SATURATING = {
    "Bernoulli": (lambda x: dist.Bernoulli(logits=x), lambda p, q: p * q, lambda p, q: p * q),
    "Binomial": (lambda x: dist.Binomial(10, logits=x), lambda p, q: 10 * p * q,
                 lambda p, q: 10 * p * q),
    "Geometric": (lambda x: dist.Geometric(logits=x), lambda p, q: q, lambda p, q: q / p ** 2),
    "NegativeBinomial": (lambda x: dist.NegativeBinomial(3.0, logits=x), lambda p, q: 3 * p,
                         lambda p, q: 3 * p / q ** 2),
}


@pytest.mark.parametrize("dtype,x", [(torch.float32, 20.0), (torch.float32, -20.0),
                                     (torch.float64, 40.0), (torch.float64, -40.0)])
@pytest.mark.parametrize("family", list(_SATURATING))
def test_binary_families_keep_their_fisher_where_the_probability_rounds_to_one(family,
                                                                               dtype, x):
    """At ``|x| = 20`` (float32) or 40 (float64) ``sigmoid(x)`` rounds to 1, but ``p q``
    is a normal number: the Fisher in the logits and in natural coordinates must be it,
    not 0 or NaN (they were, through ``1 - p``)."""
    make, standard, natural = _SATURATING[family]
    p, q = _sigmoid(x), _sigmoid(-x)
    d = make(torch.tensor(x, dtype=dtype))
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    assert float(fisher_information(d)) == pytest.approx(standard(p, q), rel=rtol)
    assert float(fisher_information(d, coords="natural")) == pytest.approx(natural(p, q),
                                                                           rel=rtol)
    nat = natural_gradient(d, {"logits": torch.ones((), dtype=dtype)})["logits"]
    assert float(nat) == pytest.approx(1 / standard(p, q), rel=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("logits", [[0.0, 1.0, -800.0], [-800.0, 0.0, 1.0]])
def test_categorical_natural_coordinates_with_a_vanishing_probability(logits, dtype):
    """A probability that underflows to 0 (logit -800) leaves the natural coordinates'
    Fisher, the covariance of the first k - 1 one-hot entries, finite: ``diag(p) - p p^T``,
    its entries for the vanishing category 0."""
    d = dist.Categorical(logits=torch.tensor(logits, dtype=dtype))
    e = [math.exp(v) if v > -700 else 0.0 for v in logits]
    p = [v / sum(e) for v in e][:2]
    expected = torch.tensor([[p[0] - p[0] ** 2, -p[0] * p[1]], [-p[0] * p[1], p[1] - p[1] ** 2]],
                            dtype=dtype)
    torch.testing.assert_close(fisher_information(d, coords="natural"), expected)


@pytest.mark.parametrize("mu,s", [(1.0, 1e-3), (10.0, 1e-2), (-3.0, 2.0)])
def test_normal_mean_coordinates_keep_float32_accuracy_when_the_sd_is_small(mu, s):
    """In mean coordinates ``(m1, m2) = (E x, E x^2)`` the Fisher is the inverse of
    ``Cov[(x, x^2)] = [[v, 2 mu v], [2 mu v, 4 mu^2 v + 2 v^2]]`` (``v = s^2``), exact in
    ``(mu, s)``. Recovering ``s`` as ``sqrt(m2 - m1^2)`` cost 5% of float32's accuracy
    at ``s / mu = 1e-3``."""
    v = s * s
    cov_t = torch.tensor([[v, 2 * mu * v], [2 * mu * v, 4 * mu * mu * v + 2 * v * v]],
                         dtype=torch.float64)
    F = fisher_information(dist.Normal(torch.tensor(mu), torch.tensor(s)), coords="mean")
    assert F.dtype == torch.float32
    torch.testing.assert_close(F.double(), torch.linalg.inv(cov_t), rtol=1e-5, atol=0)


def test_mvn_mean_coordinates_keep_float32_accuracy_when_the_sds_are_small():
    """Mean and natural coordinates are dual: ``F_mean = F_natural^{-1}``; the natural
    coordinates' Fisher is computed without any cancellation (float64 here)."""
    L = torch.tensor([[1e-3, 0.0], [5e-4, 1e-3]], dtype=torch.float64)
    loc = torch.tensor([1.0, -2.0], dtype=torch.float64)
    F_nat = fisher_information(dist.MultivariateNormal(loc, scale_tril=L), coords="natural")
    F = fisher_information(dist.MultivariateNormal(loc.float(), scale_tril=L.float()),
                           coords="mean")
    torch.testing.assert_close(F.double(), torch.linalg.inv(F_nat), rtol=1e-4, atol=0)


class _ConcentrationOnlyGamma(dist.Gamma):
    """A Gamma whose registered Fisher covers ``concentration`` alone."""


@register_fisher(_ConcentrationOnlyGamma)
def _concentration_only_gamma(d):
    return DiagonalFisher([ParamSpec("concentration", d.concentration, 0)], d.batch_shape,
                          {"concentration": torch.polygamma(1, d.concentration)})


@pytest.mark.parametrize("call,match", [
    (lambda: fisher_information(dist.Normal(0.0, 1.0), params=()), "params is empty"),
    (lambda: fisher_information(_ConcentrationOnlyGamma(torch.tensor(2.0), torch.tensor(1.0)),
                                coords="natural"), "coordinates it inherits map to"),
], ids=["empty-params", "partial-registration-natural"])
def test_clear_errors_for_requests_without_an_answer(call, match):
    with pytest.raises(ValueError, match=match):
        call()


class _CoinAndNoise(dist.TorchDistribution):
    """A coin ``Bernoulli(probs)`` and an independent ``Normal(0, scale)``, drawn as a pair:
    a user family with no closed form, ``probs`` before another parameter."""

    arg_constraints = {"probs": constraints.unit_interval, "scale": constraints.positive}
    support = constraints.real_vector

    def __init__(self, probs, scale, validate_args=None):
        self.probs, self.scale = torch.broadcast_tensors(torch.as_tensor(probs),
                                                         torch.as_tensor(scale))
        super().__init__(self.probs.shape, torch.Size([2]), validate_args=validate_args)

    def parts(self):
        return dist.Bernoulli(self.probs), dist.Normal(torch.zeros_like(self.scale), self.scale)

    def log_prob(self, x):
        coin, noise = self.parts()
        return coin.log_prob(x[..., 0]) + noise.log_prob(x[..., 1])


@torch.distributions.kl.register_kl(_CoinAndNoise, _CoinAndNoise)
def _kl_coin_and_noise(p, q):
    return sum(kl_divergence(a, b) for a, b in zip(p.parts(), q.parts()))


def test_fallback_keeps_the_parameters_after_probs():
    """The fallback took no parameter after ``probs`` or ``logits`` in the constructor (its
    test of the alternative's group was always true): ``scale`` was silently no coordinate.
    The Fisher (the KL's Hessian) is ``diag(1/(p(1-p)), 2/scale^2)``, written out here."""
    p, s = 0.3, 0.8
    d = _CoinAndNoise(torch.tensor(p, dtype=torch.float64), torch.tensor(s, dtype=torch.float64))
    op = _fallback(fisher_operator, d)
    assert op.names == ("probs", "scale")
    expected = torch.diag(torch.tensor([1 / (p * (1 - p)), 2 / s ** 2], dtype=torch.float64))
    torch.testing.assert_close(op.dense(), expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("when", ["fresh", "after log_prob"])
def test_params_naming_an_alternative_torch_has_not_computed_yet(when):
    """``params=("logits",)`` of a probs-built Bernoulli: refused until torch had cached
    ``logits`` (a ``log_prob``), then accepted. Now always the Fisher over the logit,
    ``p(1 - p)``, and ``natural_gradient`` is ``g / (p(1 - p))``."""
    d = dist.Bernoulli(probs=torch.tensor(0.3, dtype=torch.float64))
    if when == "after log_prob":
        d.log_prob(torch.tensor(1.0, dtype=torch.float64))
    F = fisher_information(d, params=("logits",))
    torch.testing.assert_close(F, torch.tensor([[0.21]], dtype=torch.float64))
    nat = natural_gradient(d, {"logits": torch.tensor(0.5, dtype=torch.float64)})
    torch.testing.assert_close(nat["logits"], torch.tensor(0.5 / 0.21, dtype=torch.float64))
    if when == "fresh":
        assert "logits" not in vars(d)  # computed on a copy: d is left as it was


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chi2_mean_coordinates_of_a_scalar(dtype):
    """A 0-d Chi2 in mean coordinates (``E[log x] = psi(df/2) + log 2``) raised in float32
    (forward mode promoted the Jacobian to float64). Its Fisher there is ``1 / Var(log x)
    = 1 / psi'(df/2)``, written out here."""
    d = dist.Chi2(torch.tensor(3.0, dtype=dtype))
    F = fisher_information(d, coords="mean")
    assert F.dtype == dtype
    expected = 1 / torch.polygamma(1, torch.tensor(1.5, dtype=torch.float64))
    torch.testing.assert_close(F.double(), expected.reshape(1, 1),
                               rtol=1e-5 if dtype == torch.float32 else 1e-10, atol=0)
