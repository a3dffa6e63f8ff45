"""Numerical edge cases of the Fisher library, against references built here.

* Categorical / OneHotCategorical from ``probs`` with a zero entry: solves are compared
  with ``torch.linalg`` in float64 on matrices written out here (their limit from a
  positive probability: the block over the support; ``pinv``; ``Cov (1 + lambda Cov)^-1``);
  entry points with no finite answer must raise a ValueError naming the zero
  probabilities.
* Positive parameters at 1e-20 and 1e23 (float32; 1e-160 and 1e160 in float64): the
  Fisher in ``log`` coordinates, written by hand from asymptotic series of ``psi'``.
"""

import math

import pyro.distributions as dist
import pytest
import torch

from pyro_natgrad import natural_gradient
from pyro_natgrad.fisher import fisher_information, fisher_solve, fisher_vp
from tests.seeding import CPUDraws

F64 = torch.float64
DTYPES = [torch.float32, torch.float64]
FAMILIES = [dist.Categorical, dist.OneHotCategorical]
P = [0.5, 0.0, 0.2, 0.3]  # one zero probability, not the last


def _rtol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-10


def _close(got, expected, dtype, atol=None):
    expected = torch.as_tensor(expected, dtype=F64)
    atol = _rtol(dtype) if atol is None else atol
    torch.testing.assert_close(got.double(), expected, rtol=_rtol(dtype), atol=atol)


def _probs_fisher(p):
    """``diag(1/p) - 1 1^T`` in float64, for positive ``p``."""
    p = torch.tensor(p, dtype=F64)
    return torch.diag(1 / p) - torch.ones(len(p), len(p), dtype=F64)


def _on_support(solve, p, g):
    """The limit ``p_j -> 0`` of a solve with ``F = diag(1/p) - 1 1^T``: as ``F_jj -> inf``
    the inverse's row and column ``j`` vanish, leaving the solve of the block over the
    support ``S``; ``solve(F_S, g_S)``, 0 at ``j``."""
    on = [i for i, v in enumerate(p) if v > 0]
    out = torch.zeros(len(p), dtype=F64)
    out[on] = solve(_probs_fisher([p[i] for i in on]), g.double()[on])
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_probability_in_probs_coordinates(family, dtype):
    """``F = diag(1/p) - 1 1^T`` is infinite at ``p_j = 0``: the dense matrix, and ``F v``
    for ``v_j != 0``, raise a ValueError; ``F v`` for ``v_j = 0`` and the natural gradient
    (damped or not) are the limits from ``p_j = eps``, computed here by torch.linalg."""
    d = family(probs=torch.tensor(P, dtype=dtype))
    with pytest.raises(ValueError, match="zero probabilities.*logits"):
        fisher_information(d)
    g = torch.tensor([0.7, -1.1, 0.4, 2.0], dtype=dtype)
    with pytest.raises(ValueError, match="zero probabilities"):
        fisher_vp(d, g)
    # F v at p_j = eps, v_j = 0: v_i / p_i - sum v on the support, -sum v at j
    v = torch.tensor([0.7, 0.0, 0.4, 2.0], dtype=dtype)
    _close(fisher_vp(d, v), [0.7 / 0.5 - 3.1, -3.1, 0.4 / 0.2 - 3.1, 2.0 / 0.3 - 3.1], dtype)
    # undamped: the minimum-norm solution for g in the range (orthogonal to the null p)
    p = torch.tensor(P, dtype=F64)
    g_range = g.double() - (p @ g.double()) / (p @ p) * p
    expected = _on_support(lambda F, b: torch.linalg.pinv(F, hermitian=True) @ b, P, g_range)
    nat = natural_gradient(d, {"probs": g_range.to(dtype)})["probs"]
    _close(nat, expected, dtype)
    for damping in (0.1, 2.0):
        eye = torch.eye(3, dtype=F64)
        expected = _on_support(lambda F, b: torch.linalg.solve(F + damping * eye, b), P, g)
        _close(fisher_solve(d, g, damping), expected, dtype)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("built", ["probs", "underflowing logits"])
def test_zero_probability_in_unconstrained_coordinates(family, dtype, built):
    """In logits (``log p``) the Fisher ``diag(p) - p p^T`` is finite and singular along
    ``1`` and ``e_j``: the undamped natural gradient of a ``g`` in its range is
    ``pinv(F) g`` (minimum norm, 0 at ``j``); one that is nonzero at ``j`` has none
    (ValueError). Also for logits whose probability underflows to 0 (-800)."""
    if built == "probs":
        d = family(probs=torch.tensor(P, dtype=dtype))
    else:
        d = family(logits=torch.tensor([math.log(v) if v else -800.0 for v in P], dtype=dtype))
    p = torch.tensor(P, dtype=F64)
    F = torch.diag(p) - torch.outer(p, p)
    _close(fisher_information(d, coords="unconstrained"), F, dtype)
    g = torch.tensor([0.7, 0.0, 0.4, -1.1], dtype=F64)
    g = g - g.sum() * p  # in the range: zero at j, summing to 0
    x = fisher_solve(d, g.to(dtype), coords="unconstrained")
    _close(x, torch.linalg.pinv(F, hermitian=True) @ g, dtype, atol=1e-6)
    with pytest.raises(ValueError, match="zero probabilities"):
        fisher_solve(d, torch.tensor([0.7, 0.3, 0.4, -1.4], dtype=dtype),
                     coords="unconstrained")
    expected = torch.linalg.solve(F + 0.3 * torch.eye(4, dtype=F64), g)
    _close(fisher_solve(d, g.to(dtype), 0.3, coords="unconstrained"), expected, dtype)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("probs", [P, [0.5, 0.2, 0.3, 0.0]], ids=["inner", "last"])
def test_zero_probability_in_natural_and_mean_coordinates(family, dtype, probs):
    """Natural coordinates ``log(p_i / p_k)`` put a zero probability at infinity: every
    entry point raises a ValueError naming it. In mean coordinates ``m = p[:k-1]`` the
    Fisher is ``Cov(T)^{-1}``, infinite there (ValueError), but the natural gradient is
    ``Cov(T) g = (diag(q) - q q^T) g``, and damped the limit from ``p_j = eps``."""
    d = family(probs=torch.tensor(probs, dtype=dtype))
    g = torch.tensor([0.7, -1.1, 0.4], dtype=dtype)
    for call in (lambda: fisher_information(d, coords="natural"),
                 lambda: natural_gradient(d, {"eta": g}, coords="natural"),
                 lambda: fisher_solve(d, g, 0.1, coords="natural"),
                 lambda: fisher_vp(d, g, coords="natural")):
        with pytest.raises(ValueError, match="zero probabilities.*logits"):
            call()
    with pytest.raises(ValueError, match="zero probabilities"):
        fisher_information(d, coords="mean")
    q = torch.tensor(probs[:-1], dtype=F64)
    cov = torch.diag(q) - torch.outer(q, q)
    _close(natural_gradient(d, {"mean": g}, coords="mean")["mean"], cov @ g.double(), dtype)
    # (Cov^{-1} + lambda)^{-1} = Cov (1 + lambda Cov)^{-1}, finite for a singular Cov
    expected = cov @ torch.linalg.solve(torch.eye(3, dtype=F64) + 0.1 * cov, g.double())
    _close(fisher_solve(d, g, 0.1, coords="mean"), expected, dtype)


# ----------------------------------------------------------------------------------------
# positive parameters at the ends of the floating-point range, in log coordinates
# ----------------------------------------------------------------------------------------
def _sq_trigamma(a):
    """``a^2 psi'(a)`` in Python floats, for ``a`` tiny or huge only."""
    if a < 1e-8:
        return 1.0 + a * a * math.pi ** 2 / 6
    return a + 0.5 + 1 / (6 * a)


def _log_fisher(family, x):
    """The Fisher in ``log`` of each positive parameter, all set to ``x`` (Normal: of
    ``scale`` only; Beta and Dirichlet: two equal concentrations)."""
    if family == "Exponential":
        return [[1.0]]
    if family in ("HalfNormal", "Normal"):
        return [[2.0]]
    if family == "Gamma":  # [[a^2 psi'(a), -a], [-a, a]]
        return [[_sq_trigamma(x), -x], [-x, x]]
    # Beta / Dirichlet(x, x): a^2 (psi'(a) - psi'(2a)) on the diagonal, -a^2 psi'(2a) off it
    off = -_sq_trigamma(2 * x) / 4
    return [[_sq_trigamma(x) + off, off], [off, _sq_trigamma(x) + off]]


_MAKE = {
    "Exponential": (lambda x: dist.Exponential(x), None),
    "HalfNormal": (lambda x: dist.HalfNormal(x), None),
    "Normal": (lambda x: dist.Normal(torch.zeros_like(x), x), ("scale",)),
    "Gamma": (lambda x: dist.Gamma(x, x), None),
    "Beta": (lambda x: dist.Beta(x, x), None),
    "Dirichlet": (lambda x: dist.Dirichlet(torch.stack([x, x])), None),
}


_EXTREMES = [(torch.float32, 1e-20), (torch.float32, 1e23), (torch.float64, 1e-160),
             (torch.float64, 1e160)]


# Beta and Dirichlet at large x have F ~ 1/x, representable: not an edge case.
@pytest.mark.parametrize("family,dtype,x", [
    (f, dtype, x) for f in _MAKE for dtype, x in _EXTREMES
    if not (f in ("Beta", "Dirichlet") and x > 1)])
def test_extreme_positive_parameters_in_unconstrained_coordinates(family, dtype, x):
    """``F_u = J F J`` with ``J = theta``: ``F`` alone (``1/rate^2`` at 1e23 is 1e-46)
    under- or overflows, ``F_u`` (1 for an exponential) does not; so for the solve."""
    make, params = _MAKE[family]
    d = make(torch.tensor(x, dtype=dtype))
    expected = torch.tensor(_log_fisher(family, x), dtype=F64)
    F = fisher_information(d, coords="unconstrained", params=params)
    assert F.dtype == dtype
    top = expected.abs().max()
    torch.testing.assert_close(F.double() / top, expected / top, rtol=_rtol(dtype),
                               atol=_rtol(dtype))
    if family in ("Exponential", "HalfNormal", "Normal"):
        g = torch.ones(1, dtype=dtype)
        x_nat = fisher_solve(d, g, coords="unconstrained", params=params)
        _close(x_nat, 1 / expected[0], dtype)


@pytest.mark.parametrize("family", FAMILIES + [dist.Multinomial])
@pytest.mark.parametrize("coords", ["unconstrained", "affine"])
def test_damped_solve_over_many_logits_covers_the_null_direction(family, coords):
    """Above the dense-solve size (512 coordinates) a damped solve over logits runs
    conjugate gradients on ``J F J + lambda I``, ``F = n (diag(p) - p p^T)``, which is not
    singular. It used to be preconditioned with ``F``'s minimum-norm pseudo-inverse, which
    drops the right-hand side's component along ``1``, so CG never converged (and
    ``coords="unconstrained"``, where logits are their own coordinates, took that route
    too). Against ``torch.linalg.solve`` on the matrix written out here."""
    k, damping, jac = 600, 0.1, 2.0
    g = CPUDraws(0)
    logits = g.randn(k, dtype=F64)
    n = 3 if family is dist.Multinomial else 1
    d = family(n, logits=logits) if family is dist.Multinomial else family(logits=logits)
    v = g.randn(k, dtype=F64) + 1.0  # a component along the null vector
    j = jac if coords == "affine" else 1.0
    p = torch.softmax(logits, -1)
    F = n * j * j * (torch.diag(p) - torch.outer(p, p)) + damping * torch.eye(k, dtype=F64)
    expected = torch.linalg.solve(F, v)
    chosen = ({"logits": torch.distributions.AffineTransform(0.0, jac)}
              if coords == "affine" else coords)
    got = fisher_solve(d, v, damping=damping, coords=chosen)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8 * expected.abs().max())
    if coords == "unconstrained":
        nat = natural_gradient(d, {"logits": v}, coords=coords, damping=damping)["logits"]
        torch.testing.assert_close(nat, expected, rtol=1e-8, atol=1e-8 * expected.abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("a,b", [(0.5, 1e4), (0.5, 1e5), (1e-5, 1.0), (3.0, 2e6)])
def test_beta_with_one_concentration_far_larger(dtype, a, b):
    """``F_u`` of a Beta in log coordinates, ``[[a^2 (psi'(a) - psi'(c)), -a b psi'(c)],
    [., b^2 (psi'(b) - psi'(c))]]``, ``c = a + b``, against mpmath at 50 digits. Its
    corner for the larger concentration is about the smaller one, the difference of two
    terms of about the larger: in float32 it was 3% off at b/a = 2e5 (and the natural
    gradient 5%)."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(50):
        A, B = mpmath.mpf(a), mpmath.mpf(b)
        tc = mpmath.psi(1, A + B)
        expected = torch.tensor(
            [[float(A * A * (mpmath.psi(1, A) - tc)), float(-A * B * tc)],
             [float(-A * B * tc), float(B * B * (mpmath.psi(1, B) - tc))]], dtype=F64)
    d = dist.Beta(torch.tensor(a, dtype=dtype), torch.tensor(b, dtype=dtype))
    F = fisher_information(d, coords="unconstrained")
    assert F.dtype == dtype
    rtol = 2e-6 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(F.double(), expected, rtol=rtol, atol=0.0)
    # torch's trigamma is good to about 5e-10 (near 1), which the solve amplifies
    g = torch.ones(2, dtype=F64)
    torch.testing.assert_close(fisher_solve(d, g.to(dtype), coords="unconstrained").double(),
                               torch.linalg.solve(expected, g),
                               rtol=1e-5 if dtype == torch.float32 else 1e-8, atol=0.0)


@pytest.mark.parametrize("family", ["NegativeBinomial", "Geometric"])
@pytest.mark.parametrize("dtype,x", [(torch.float32, 30.0), (torch.float64, 40.0),
                                     (torch.float64, -3.0)])
def test_mean_coordinates_from_large_logits(family, dtype, x):
    """In mean coordinates ``m = E[T]``, ``F = 1 / Var(T)``, with ``q = 1 - p =
    sigmoid(-x)``: a negative binomial's ``Var = r p / q^2``, a geometric's (failures
    before the first success) ``q / p^2``. The maps to and from ``m`` went through
    ``1 - sigmoid(x)``, which rounds to 0 for large logits, and gave NaN where the answer
    (2.9e-27 for r = 3, x = 30 in float32) is representable."""
    xs = torch.tensor(x, dtype=F64)
    p, q = torch.sigmoid(xs), torch.sigmoid(-xs)
    logits = torch.tensor(x, dtype=dtype)
    if family == "NegativeBinomial":
        d = dist.NegativeBinomial(torch.tensor(3.0, dtype=dtype), logits=logits)
        expected = q * q / (3 * p)
    else:
        d = dist.Geometric(logits=logits)
        expected = p * p / q
    F = fisher_information(d, coords="mean")
    assert F.dtype == dtype
    torch.testing.assert_close(F.double().reshape(()), expected, rtol=_rtol(dtype), atol=0.0)



ZERO_TRIALS = {  # total_count (0, 4), or 0 for torch's Multinomial (one int count)
    "Binomial probs": lambda: dist.Binomial(torch.tensor([0., 4.], dtype=F64),
                                            torch.tensor([0.3, 0.6], dtype=F64)),
    "Binomial logits": lambda: dist.Binomial(torch.tensor([0., 4.], dtype=F64),
                                             logits=torch.tensor([0.4, -1.], dtype=F64)),
    "Multinomial probs": lambda: dist.Multinomial(
        0, torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]], dtype=F64)),
    "Multinomial logits": lambda: dist.Multinomial(
        0, logits=torch.tensor([[0.2, 0.5, -0.3], [1., 0.1, 0.8]], dtype=F64)),
}


@pytest.mark.parametrize("coords", ["standard", "unconstrained"])
@pytest.mark.parametrize("name", list(ZERO_TRIALS))
def test_zero_trials_undamped_solve(name, coords):
    """No trials (``total_count`` 0) carry no information: ``F = 0`` for that element. An
    undamped solve of a vector nonzero there has no solution and must raise (it gave inf
    or NaN); a vector zero there solves to 0 there, and an element with trials must still
    satisfy ``F x = v`` for the dense F written out from ``mv``."""
    from pyro_natgrad.fisher import SingularFisherError, fisher_operator
    op = fisher_operator(ZERO_TRIALS[name](), coords=coords)
    F = op.dense()
    assert float(F[0].abs().max()) == 0.0
    g = CPUDraws(0)
    v = g.randn(2, op.dim, dtype=F64)
    if op.singular:  # the gradient of a function of the distribution: in F's range
        v = torch.einsum("bij,bj->bi", F, v)
    v[0] = g.randn(op.dim, dtype=F64)
    with pytest.raises(SingularFisherError, match="total_count 0"):
        op.solve(v)
    v[0] = 0
    x = op.solve(v)
    assert bool((x[0] == 0).all())
    torch.testing.assert_close(F[1] @ x[1], v[1], rtol=1e-10, atol=1e-10)
    # Damped, F = 0 gives v / lambda there.
    torch.testing.assert_close(op.solve(v + 1, damping=0.5)[0], (v[0] + 1) / 0.5)


@pytest.mark.parametrize("coords", ["standard", "unconstrained"])
def test_zero_trials_beside_a_zero_probability(coords):
    """No trials and a zero probability at once: a vector that is 0 there solves to 0.
    (The no-trials route once fed the solve ones in its place, which the zero
    probability then refused as a vector nonzero off the support.)"""
    from pyro_natgrad.fisher import fisher_operator
    d = dist.Multinomial(0, torch.tensor([[0.5, 0.0, 0.5]], dtype=F64), validate_args=False)
    x = fisher_operator(d, coords=coords).solve(torch.zeros(1, 3, dtype=F64))
    assert bool((x == 0).all())


def _zero_trials_closed_form(name, coords):
    """Per element, the Fisher written out here: ``n p q`` in natural coordinates
    (``logit p``), ``1/(n p q)`` in mean ones (``n p``), a zero matrix with no trials; or
    None for a zero matrix of the element's size."""
    if not name.startswith("Binomial"):
        return [None, None]
    p = 0.6 if name.endswith("probs") else 1 / (1 + math.exp(1.0))
    var = 4 * p * (1 - p)
    return [None, var if coords == "natural" else 1 / var]


@pytest.mark.parametrize("coords", ["natural", "mean"])
@pytest.mark.parametrize("name", list(ZERO_TRIALS))
def test_zero_trials_in_natural_and_mean_coordinates(name, coords):
    """No trials carry no information in any coordinates: ``F = 0`` there, as in standard
    ones (the documented zero Fisher), and the other element keeps its closed form. In
    mean coordinates the binomial's ``p = m / n`` gave NaN (``0/0``) in F, and every solve
    raised, the other element's too; the multinomial's gave inf and a NaN damped solve;
    in natural coordinates an undamped solve of a vector 0 there raised."""
    from pyro_natgrad.fisher import SingularFisherError, fisher_operator
    op = fisher_operator(ZERO_TRIALS[name](), coords=coords)
    k = op.dim
    expected = torch.zeros(2, k, k, dtype=F64)
    for i, f in enumerate(_zero_trials_closed_form(name, coords)):
        if f is not None:
            expected[i] = f
    F = op.dense()
    torch.testing.assert_close(F, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(op.mv(torch.ones(2, k, dtype=F64)), expected.sum(-1),
                               rtol=1e-12, atol=0)
    trials = expected.flatten(1).ne(0).any(-1)  # the elements with trials
    g = CPUDraws(1)
    v = g.randn(2, k, dtype=F64)
    with pytest.raises(SingularFisherError, match="total_count 0"):
        op.solve(v)
    v[~trials] = 0
    x = op.solve(v)
    want = torch.zeros(2, k, dtype=F64)
    want[trials] = torch.linalg.solve(expected[trials], v[trials])
    torch.testing.assert_close(x, want, rtol=1e-12, atol=0)
    assert bool((x[~trials] == 0).all())
    # Damped: (F + lambda I)^{-1}, v / lambda where F = 0.
    eye = torch.eye(k, dtype=F64)
    want = torch.linalg.solve(expected + 0.5 * eye, (v + 1).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(op.solve(v + 1, damping=0.5), want, rtol=1e-12, atol=0)


def _empty_batch_cases():
    from tests.fisher_cases import CASES
    out = []
    for case in CASES:
        if case.batch_shape:
            out += [(case, c) for c in ("standard", "unconstrained")
                    + (("natural", "mean") if case.ef else ())]
    return out


@pytest.mark.parametrize("case, coords", _empty_batch_cases(),
                         ids=lambda x: getattr(x, "id", x))
def test_empty_batch(case, coords):
    """A batch of 0 elements (a plate of size 0) gives empty answers of the right shapes,
    ``batch_shape + (k, k)`` and ``v``'s, like any other batch size (it raised torch's
    bare reshape errors). ``k`` must equal that of the case's own, nonempty batch."""
    from pyro_natgrad.fisher import fisher_operator
    from torch.distributions import Distribution
    p = case.params()
    nb = len(case.batch_shape)
    empty = {n: t[:0] if tuple(t.shape[:nb]) == tuple(case.batch_shape) else t
             for n, t in p.items() if torch.is_tensor(t)}
    params = case.params_arg if coords in ("standard", "unconstrained") else None
    k = fisher_operator(case.make(p), coords=coords, params=params).dim
    before = Distribution._validate_args
    Distribution.set_default_validate_args(False)  # torch's own checks fail on empty sizes
    try:
        op = fisher_operator(case.make({**p, **empty}), coords=coords, params=params)
    finally:
        Distribution.set_default_validate_args(before)
    rest = tuple(case.batch_shape[1:])
    assert op.dim == k
    assert op.dense().shape == (0,) + rest + (k, k)
    v = torch.zeros((3, 0) + rest + (k,), dtype=F64)
    assert op.mv(v).shape == v.shape
    assert op.solve(v, damping=0.1).shape == v.shape


@pytest.mark.parametrize("family", [dist.Categorical, dist.OneHotCategorical])
@pytest.mark.parametrize("coords", ["natural", "mean"])
def test_one_category_has_no_natural_coordinates(family, coords):
    """A one-category distribution is a point mass: its minimal natural (and mean)
    coordinates are ``k - 1 = 0`` numbers, so its Fisher is 0 x 0 (it raised a bare
    reshape error in natural coordinates)."""
    d = family(torch.tensor([[1.0], [1.0]], dtype=F64))
    assert fisher_information(d, coords=coords).shape == (2, 0, 0)
    assert fisher_solve(d, torch.zeros(2, 0, dtype=F64), coords=coords).shape == (2, 0)


BOUNDARY = {  # (distribution at (boundary, interior), F_theta, F_u at the interior value)
    "Poisson": (lambda x: dist.Poisson(x), lambda r: 1 / r, lambda r: r),
    "Bernoulli": (lambda x: dist.Bernoulli(probs=x), lambda p: 1 / (p * (1 - p)),
                  lambda p: p * (1 - p)),
    "Binomial": (lambda x: dist.Binomial(3, probs=x), lambda p: 3 / (p * (1 - p)),
                 lambda p: 3 * p * (1 - p)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(BOUNDARY))
def test_a_parameter_at_zero_on_the_boundary_of_its_support(name, dtype):
    """A Poisson rate or a probability of 0 is in the support. There ``F_theta`` is inf
    (the limit of ``1/rate``, ``1/(p(1-p))``, written out here) and its inverse 0, and in
    the unconstrained coordinate (log rate, logit) ``F_u`` is 0 (the limit of ``rate``,
    ``p(1-p)``): draws there carry no information. It was NaN in both (0 * inf)."""
    from pyro_natgrad.fisher import SingularFisherError, fisher_operator
    build, f_theta, f_u = BOUNDARY[name]
    theta = torch.tensor([0.0, 0.3], dtype=dtype)
    d = build(theta)
    v = torch.tensor([[1.5], [2.0]], dtype=dtype)
    standard = fisher_operator(d)
    assert float(standard.dense()[0, 0, 0]) == math.inf
    _close(standard.dense()[1, 0, 0], f_theta(0.3), dtype)
    x = standard.solve(v)
    assert float(x[0, 0]) == 0.0
    _close(x[1, 0], 2.0 / f_theta(0.3), dtype)
    unconstrained = fisher_operator(d, coords="unconstrained")
    F = unconstrained.dense()
    assert float(F[0, 0, 0]) == 0.0
    _close(F[1, 0, 0], f_u(0.3), dtype)
    with pytest.raises(SingularFisherError, match="is 0 along 1 entries"):
        unconstrained.solve(v)
    x = unconstrained.solve(v * torch.tensor([[0.0], [1.0]], dtype=dtype))
    assert float(x[0, 0]) == 0.0
    _close(x[1, 0], 2.0 / f_u(0.3), dtype)


class _FiniteOnlyExp(torch.distributions.transforms.ExpTransform):
    """``exp``, refusing non-finite input, as a user's transform may."""

    def _call(self, x):
        if not bool(torch.isfinite(x).all()):
            raise ValueError("finite input only")
        return super()._call(x)


def test_a_transform_undefined_at_infinity_still_gives_the_fisher():
    """The boundary check evaluates the coordinates' map at -inf and inf; a transform that
    refuses them keeps its Jacobian as it is: Gamma's rate in log coordinates, ``a``
    (``rate^2 * a / rate^2``), written out here."""
    from pyro_natgrad.fisher import fisher_operator
    d = dist.Gamma(torch.tensor(2.5, dtype=F64), torch.tensor(0.7, dtype=F64))
    F = fisher_operator(d, coords={"rate": _FiniteOnlyExp()}, params=("rate",)).dense()
    torch.testing.assert_close(F, torch.tensor([[2.5]], dtype=F64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype,p", [(torch.float32, 1e-20), (torch.float32, 1e-30),
                                     (torch.float64, 1e-200)])
def test_a_geometric_with_a_tiny_probability_in_logits(dtype, p):
    """In logits the score of ``Geometric`` at ``k`` failures is ``(1 - p) - k p``, whose
    variance is ``p^2 Var(k) = 1 - p`` (worked by hand): representable, where the probs
    form ``1/(p^2 (1 - p))`` overflows. It was inf, and the natural gradient 0."""
    d = dist.Geometric(probs=torch.tensor(p, dtype=dtype))
    F = fisher_information(d, coords="unconstrained")
    assert torch.allclose(F, torch.tensor(1 - p, dtype=dtype), rtol=1e-5), F
    step = natural_gradient(d, {"probs": torch.tensor(2.0, dtype=dtype)}, coords="unconstrained")
    assert torch.allclose(step["probs"], torch.tensor(2.0, dtype=dtype), rtol=1e-5), step


@pytest.mark.parametrize("make", [lambda t: dist.Bernoulli(probs=t),
                                  lambda t: dist.Poisson(t)],
                         ids=["bernoulli", "poisson"])
def test_no_change_at_an_infinite_entry_is_no_change(make):
    """``F v`` with an infinite entry (a probability or rate of 0) where ``v`` is 0: that
    element's product is 0, not NaN (which went on into every solve by products); the
    other element's is its own ``F v`` (closed forms: ``1/(p(1-p))``, ``1/rate``)."""
    bernoulli = isinstance(make(torch.tensor(0.5)), dist.Bernoulli)
    value = 0.3 if bernoulli else 2.0
    d = make(torch.tensor([0.0, value], dtype=torch.float64))
    out = fisher_vp(d, torch.tensor([[0.0], [1.0]], dtype=torch.float64)).flatten()
    expected = 1 / (value * (1 - value)) if bernoulli else 1 / value
    assert out[0] == 0 and math.isclose(out[1].item(), expected, rel_tol=1e-12), out


def test_the_monte_carlo_fallback_leaves_the_random_stream_alone():
    """A seeded run draws the same numbers whether or not it computed a Fisher by the
    Monte Carlo fallback in between (HalfCauchy has no closed form and no KL)."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        fisher_information(dist.HalfCauchy(torch.tensor(1.0)))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("p", [[0.2, 0.3, 0.5], [0.25, 0.25, 0.5], [0.7, 0.2, 0.1]])
def test_a_singular_fisher_through_the_dense_route_solves_with_minimum_norm(dtype, p):
    """``coords={"probs": SoftmaxTransform()}`` is the map of ``coords="unconstrained"``
    but goes through the dense route, whose Cholesky of the singular Fisher (null vector
    ``1``) raised or returned a rounding-dependent solution. Both are now the
    minimum-norm solve: ``F x = g`` for ``g`` in the range, ``x`` orthogonal to ``1``,
    with ``F = diag(p) - p p^T`` the softmax logits' Fisher (closed form)."""
    from torch.distributions.transforms import SoftmaxTransform

    probs = torch.tensor(p, dtype=dtype)
    d = dist.Categorical(probs=probs)
    g = torch.tensor([1.0, -2.0, 1.0], dtype=dtype)
    x = fisher_solve(d, g, coords={"probs": SoftmaxTransform()})
    F = torch.diag(probs) - probs.outer(probs)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert torch.allclose(F @ x, g, atol=tol * 10), (F @ x, g)
    assert abs(float(x.sum())) < tol * 10 * float(x.abs().max()), x
    assert torch.allclose(x, fisher_solve(d, g, coords="unconstrained"), rtol=tol, atol=tol)


class _WideIndependent(torch.distributions.Independent):
    """A user's wrapper whose registered Fisher is that of ``base`` at twice its scale:
    not the unwrapped base's, so a test can tell which one answered."""


def test_a_registered_subclass_of_a_wrapper_is_used():
    """``register_fisher`` on a subclass of ``Independent`` was silently ignored: the
    wrapper was unwrapped before the registry was asked. Its registration now answers:
    ``Normal(0, 2)``'s ``diag(1/4, 2/4)`` per element, not the base's ``diag(1, 2)``."""
    from pyro_natgrad import fisher_operator, register_fisher
    from pyro_natgrad.fisher import registry

    @register_fisher(_WideIndependent)
    def _wide(d):
        base = d.base_dist
        return fisher_operator(dist.Normal(base.loc, 2 * base.scale)).reinterpret(
            d.reinterpreted_batch_ndims)

    try:
        d = _WideIndependent(dist.Normal(torch.zeros(2), torch.ones(2)), 1)
        F = fisher_information(d)
        assert torch.allclose(F, torch.diag(torch.tensor([0.25, 0.25, 0.5, 0.5]))), F
    finally:
        registry._REGISTRY.pop(_WideIndependent, None)
        registry._lookup.cache_clear()


class _RateLaplace(dist.Laplace):
    """A Laplace over ``(loc, rate)``: not the registered ``(loc, scale)`` family, so the
    fallback answers."""
    arg_constraints = {"loc": dist.constraints.real, "rate": dist.constraints.positive}

    def __init__(self, loc, rate, validate_args=None):
        self.rate = rate
        super().__init__(loc, 1 / rate, validate_args=validate_args)


def test_the_fallback_does_not_differentiate_the_laplace_kl_at_its_kink():
    """The Laplace KL has ``|loc - loc0|``, whose second derivative autograd takes as 0 at
    ``theta0``: the fallback's "exact" KL Hessian gave ``F_loc = 0``. It now takes the Monte
    Carlo estimate, near the closed form ``diag(rate^2, 1/rate^2)`` (the score in ``loc``
    is ``rate sign(x - loc)``, in ``rate`` ``1/rate - |x - loc|``)."""
    rate = 2.0
    with pytest.warns(UserWarning, match="Monte Carlo"):
        F = fisher_information(_RateLaplace(torch.tensor(0.3, dtype=torch.float64),
                                            torch.tensor(rate, dtype=torch.float64)))
    assert torch.allclose(F.diagonal(), torch.tensor([rate ** 2, rate ** -2],
                                                     dtype=torch.float64), rtol=0.05), F


@pytest.mark.parametrize("make,variance,p", [
    (lambda p: dist.Geometric(probs=p), lambda p: (1 - p) / p ** 2, 1.0),
    (lambda p: dist.Geometric(probs=p), lambda p: (1 - p) / p ** 2, 0.3),
    (lambda p: dist.NegativeBinomial(3.0, probs=p), lambda p: 3.0 * p / (1 - p) ** 2, 0.0),
    (lambda p: dist.NegativeBinomial(3.0, probs=p), lambda p: 3.0 * p / (1 - p) ** 2, 0.3),
], ids=["geometric-1", "geometric-0.3", "negative-binomial-0", "negative-binomial-0.3"])
def test_mean_coordinates_at_the_boundary_are_infinite_not_nan(make, variance, p):
    """In mean coordinates an exponential family's Fisher is ``1 / Var(T)`` (``T = k``
    here). Where the count is always 0 (a geometric's ``p = 1``, a negative binomial's
    ``p = 0``) that is ``1 / 0``: inf, as for Bernoulli, not the NaN of ``inf / inf`` and
    ``0 inf`` through the odds; at an interior ``p``, its closed form."""
    d = make(torch.tensor(p, dtype=torch.float64))
    var = variance(torch.tensor(p, dtype=torch.float64))
    F = fisher_information(d, coords="mean")
    expected = var.reciprocal()
    assert torch.allclose(F, expected.reshape(1, 1), rtol=1e-12), (F, expected)


def test_a_class_inheriting_two_registrations_is_warned_of_once():
    """A class deriving from two registered families took the first in its method
    resolution order silently (``torch.distributions.kl`` warns in that case). It now
    warns once, naming both; none of pyro's and torch's own classes does."""
    import inspect
    import warnings

    from pyro_natgrad.fisher.registry import lookup_fisher

    class Both(dist.Exponential, dist.HalfNormal):
        pass

    with pytest.warns(RuntimeWarning, match="both Exponential and HalfNormal"):
        assert lookup_fisher(Both) is lookup_fisher(dist.Exponential)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        lookup_fisher(Both)  # once
        for module in (dist, torch.distributions):
            for name in dir(module):
                cls = getattr(module, name)
                if inspect.isclass(cls) and issubclass(cls, torch.distributions.Distribution):
                    lookup_fisher(cls)


@pytest.mark.parametrize("family", [dist.Gamma, dist.InverseGamma])
@pytest.mark.parametrize("dtype,a,b", [(torch.float32, 2.0, 1e-30), (torch.float32, 0.5, 1e-25),
                                       (torch.float64, 2.0, 1e-200)])
def test_an_overflowing_entry_of_a_two_parameter_block(family, dtype, a, b):
    """``F = [[psi'(a), -1/b], [-1/b, a/b^2]]`` (mpmath here) with ``a/b^2`` beyond the
    dtype's range: that entry may be inf, but no entry NaN; ``F e_0`` is finite, and so
    is the solve ``F^{-1} e_0 = [a, b] / (a psi'(a) - 1)`` (and the damped one).
    The scales were folded into the matrix: ``inf * 0`` gave a NaN entry below the
    diagonal and in ``F e_0``, and a Cholesky of the scaled matrix refused to solve."""
    from pyro_natgrad.fisher import fisher_operator
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(600):  # f h - g^2 cancels 400 digits at b = 1e-200
        A, B = mpmath.mpf(a), mpmath.mpf(torch.tensor(b, dtype=dtype).item())
        tg = mpmath.polygamma(1, A)
        ref = mpmath.matrix([[tg, -1 / B], [-1 / B, A / B ** 2]])
    d = family(torch.tensor(a, dtype=dtype), torch.tensor(b, dtype=dtype))
    op = fisher_operator(d)
    F = op.dense().double()
    assert not bool(F.isnan().any()), F
    # torch's trigamma is good to about 5e-10 relative; the solve amplifies it ~5-fold.
    rtol = 1e-5 if dtype == torch.float32 else 1e-8
    big = float(ref[1, 1]) > torch.finfo(dtype).max
    for i, j in [(0, 0), (0, 1), (1, 0)] + ([] if big else [(1, 1)]):
        assert math.isclose(F[i, j].item(), float(ref[i, j]), rel_tol=rtol), (i, j, F)
    if big:
        assert F[1, 1].item() == math.inf, F
    e0 = torch.tensor([1.0, 0.0], dtype=dtype)
    Fe0 = op.mv(e0).double()
    torch.testing.assert_close(Fe0, torch.tensor([float(tg), float(-1 / B)], dtype=F64),
                               rtol=rtol, atol=0)
    for damping in (0.0, 0.1):  # [[f, g], [g, h]]^{-1} e_0 = [h, -g] / (f h - g^2)
        with mpmath.workdps(600):
            f, g, h = ref[0, 0] + damping, ref[0, 1], ref[1, 1] + damping
            det = f * h - g * g
            want = torch.tensor([float(h / det), float(-g / det)], dtype=F64)
        torch.testing.assert_close(op.solve(e0, damping).double(), want, rtol=rtol, atol=0)


_P_HI = {dt: torch.tensor(1.0, dtype=dt) - torch.finfo(dt).eps / 2 for dt in DTYPES}
_P_LO = {dt: torch.tensor(torch.finfo(dt).tiny / 4, dtype=dt) for dt in DTYPES}
CLAMPED = {  # (distribution, probability, F in logits at p: worked by hand)
    "NegativeBinomial p->1": (lambda p: dist.NegativeBinomial(3.0, probs=p), _P_HI,
                              lambda p: 3 * p),
    "Geometric p->0": (lambda p: dist.Geometric(probs=p), _P_LO, lambda p: 1 - p),
    "Geometric p->1": (lambda p: dist.Geometric(probs=p), _P_HI, lambda p: 1 - p),
    "Bernoulli p->1": (lambda p: dist.Bernoulli(probs=p), _P_HI, lambda p: p * (1 - p)),
    "Binomial p->1": (lambda p: dist.Binomial(5, probs=p), _P_HI, lambda p: 5 * p * (1 - p)),
}


@pytest.mark.parametrize("coords", ["unconstrained", "sigmoid"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CLAMPED))
def test_a_probability_beyond_the_sigmoid_clamp_keeps_its_unconstrained_fisher(
        name, dtype, coords):
    """Torch's sigmoid clamps to ``[tiny, 1 - eps]``; a probability beyond (``1 - eps/2``,
    ``tiny/4``) is still inside (0, 1), and its Fisher in logits, ``p(1-p) F_p p(1-p)``,
    is the closed form written here from ``p`` in float64: ``r p`` (3, not 0) for a
    negative binomial near 1, ``1 - p`` (1) for a geometric near 0. It was 0 (taken as
    the limit at every end), and the natural gradient raised."""
    from torch.distributions.transforms import SigmoidTransform
    build, probs, closed = CLAMPED[name]
    p = probs[dtype]
    assert 0 < p.item() < 1
    d = build(p)
    c = "unconstrained" if coords == "unconstrained" else {"probs": SigmoidTransform()}
    expected = closed(p.double())
    F = fisher_information(d, coords=c)
    _close(F, expected.reshape(1, 1), dtype, atol=0)
    g = torch.tensor(2.0, dtype=dtype)
    step = natural_gradient(d, {"probs": g}, coords=c)["probs"]
    _close(step, 2.0 / expected, dtype, atol=0)
