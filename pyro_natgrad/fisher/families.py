"""Closed-form Fisher information of common families, in standard coordinates.

Each function receives a distribution and returns a structured operator over the
parameters the user constructed it with (``probs`` or ``logits``; for a
multivariate normal ``loc`` and one of ``scale_tril``, ``covariance_matrix`` or
``precision_matrix``). Integer arguments (``total_count``) are not coordinates.
"""

import torch
import pyro.distributions as pdist
from torch.distributions import (
    Bernoulli, Beta, Binomial, Categorical, Chi2, Dirichlet, Exponential, Gamma, Geometric,
    HalfNormal, Independent, Laplace, LogNormal, LowRankMultivariateNormal, Multinomial,
    MultivariateNormal, NegativeBinomial, Normal, OneHotCategorical, Poisson, StudentT,
)

from .operators import (
    DiagonalFisher, DiagPlusRankOneFisher, ElementBlockFisher, GaussianFisher, LogitsFisher,
    LowRankGaussianFisher, ProbsFisher, ZeroFisher,
)
from .params import ParamSpec
from .registry import register_fisher


def _trigamma(x):
    return torch.polygamma(1, x)


def _square_trigamma(a):
    """``a^2 psi'(a)``, finite where ``psi'(a) ~ 1/a^2`` overflows (float32 below 5e-20):
    there from ``psi'(a) = 1/a^2 + psi'(a + 1)``."""
    tiny = 1 + a * (a * _trigamma(a + 1))
    return torch.where(a < 1e-4, tiny, a * (a * _trigamma(a)))


# Positive parameters (scales, rates, concentrations) are passed with scale s = 1/theta and
# the Fisher of log theta as the inner factor: F = s M s. Unconstrained coordinates then
# take (j s) M (j s), j s = 1 for theta = exp(u), where F itself (1/rate^2 at a float32
# rate of 1e23) under- or overflows.


def passed_argument(d, candidates):
    """Which of ``candidates`` the constructor received.

    Alternatives such as ``probs``/``logits`` are lazy properties of each other;
    the constructor sets its own argument first, so it comes first in ``vars(d)``.
    (:func:`~pyro_natgrad.fisher.fisher_operator` first drops all but one, since
    ``expand()`` copies both in torch's order.)
    """
    for key in vars(d):
        if key in candidates:
            return key
    raise ValueError(f"cannot tell which of {candidates} {type(d).__name__} was built with")


def _elementwise(d, names, diag, scale=None):
    """``diag(s a s)``, ``a = diag``, ``s = scale`` (one per name, or None for 1)."""
    specs = [ParamSpec(n, getattr(d, n), 0) for n in names]
    scale = None if scale is None else dict(zip(names, scale))
    return DiagonalFisher(specs, d.batch_shape, dict(zip(names, diag)), scale)


def _block(d, names, rows, scale=None):
    """``S M S``, ``M`` from ``rows``, ``S = diag(scale)`` (or the identity)."""
    specs = [ParamSpec(n, getattr(d, n), 0) for n in names]
    matrix = torch.stack([torch.stack(torch.broadcast_tensors(*r), -1) for r in rows], -2)
    scale = None if scale is None else dict(zip(names, scale))
    return ElementBlockFisher(specs, d.batch_shape, matrix, scale)


def _location_scale(d, loc_info, scale_info):
    """``(loc, scale)``: ``diag(loc_info, scale_info) / sigma^2``."""
    r = d.scale.reciprocal()
    one = torch.ones_like(r)
    return _elementwise(d, ("loc", "scale"), (loc_info * one, scale_info * one), (r, r))


@register_fisher(Normal)
def _normal(d):
    """``(loc, scale)``: ``diag(1/sigma^2, 2/sigma^2)``."""
    return _location_scale(d, 1.0, 2.0)


@register_fisher(LogNormal)
def _lognormal(d):
    """``(loc, scale)`` of ``log x``: as the normal (Fisher ignores maps of the data)."""
    return _location_scale(d, 1.0, 2.0)


@register_fisher(Laplace)
def _laplace(d):
    """``(loc, scale)``: ``diag(1/b^2, 1/b^2)``."""
    return _location_scale(d, 1.0, 1.0)


@register_fisher(HalfNormal)
def _halfnormal(d):
    """``scale``: ``2/sigma^2``."""
    r = d.scale.reciprocal()
    return _elementwise(d, ("scale",), (2 * torch.ones_like(r),), (r,))


@register_fisher(Exponential)
def _exponential(d):
    """``rate``: ``1/lambda^2``."""
    r = d.rate.reciprocal()
    return _elementwise(d, ("rate",), (torch.ones_like(r),), (r,))


@register_fisher(Poisson)
def _poisson(d):
    """``rate``: ``1/lambda``."""
    # As 1 between scales lambda^(-1/2), not lambda between scales 1/lambda: at a rate of
    # 0 (in the support) that gave inf * 0 * inf = NaN, where F is inf, and in log-rate
    # coordinates (scales lambda * lambda^(-1/2)) its 0.
    r = d.rate.rsqrt()
    return _elementwise(d, ("rate",), (torch.ones_like(r),), (r,))


def _complement(d, name):
    """``1 - p``; from the logits as ``sigmoid(-x)``, which stays positive where ``p``
    rounds to 1 (``x > 17`` in float32)."""
    return torch.sigmoid(-d.logits) if name == "logits" else 1 - d.probs


@register_fisher(Bernoulli)
def _bernoulli(d):
    """``probs``: ``1/(p(1-p))``; ``logits``: ``p(1-p)``."""
    name = passed_argument(d, ("probs", "logits"))
    var = d.probs * _complement(d, name)
    return _elementwise(d, (name,), (var.reciprocal() if name == "probs" else var,))


@register_fisher(Binomial)
def _binomial(d):
    """``probs``: ``n/(p(1-p))``; ``logits``: ``n p(1-p)``; ``total_count`` is fixed."""
    name = passed_argument(d, ("probs", "logits"))
    var = d.probs * _complement(d, name)
    n = d.total_count
    return _elementwise(d, (name,), (n / var if name == "probs" else n * var,))


@register_fisher(Geometric)
def _geometric(d):
    """Failures before the first success. ``probs``: ``1/(p^2(1-p))``; ``logits``: ``1-p``."""
    name = passed_argument(d, ("probs", "logits"))
    p, q = d.probs, _complement(d, name)
    if name == "logits":
        return _elementwise(d, (name,), (q,))
    # (1/p) (1/q) (1/p): in logits (j = p q) the scale j/p = q keeps 1 - p representable
    # where 1/p^2 overflows (p < 1e-19 in float32).
    return _elementwise(d, (name,), (q.reciprocal(),), (p.reciprocal(),))


@register_fisher(NegativeBinomial)
def _negative_binomial(d):
    """Successes before ``total_count = r`` failures (``r`` fixed). ``probs``:
    ``r/(p(1-p)^2)``; ``logits``: ``r p``."""
    name = passed_argument(d, ("probs", "logits"))
    p, r = d.probs, d.total_count
    return _elementwise(d, (name,), (r / (p * (1 - p).square()) if name == "probs" else r * p,))


@register_fisher(Gamma)
def _gamma(d):
    """``(concentration a, rate b)``: ``[[psi'(a), -1/b], [-1/b, a/b^2]]``."""
    a, b = d.concentration, d.rate
    return _block(d, ("concentration", "rate"), ((_square_trigamma(a), -a), (-a, a)),
                  (a.reciprocal(), b.reciprocal()))


@register_fisher(Chi2)
def _chi2(d):
    """``df``: ``psi'(df/2)/4`` (a gamma with concentration ``df/2``, rate fixed at 1/2)."""
    return _elementwise(d, ("df",), (_square_trigamma(0.5 * d.df),), (d.df.reciprocal(),))


@register_fisher(pdist.InverseGamma)
def _inverse_gamma(d):
    """``(concentration, rate)``: as the gamma of ``1/x`` (Fisher ignores maps of the data)."""
    return _gamma(d)


@register_fisher(Beta)
def _beta(d):
    """``(concentration1 a, concentration0 b)``:
    ``[[psi'(a) - psi'(a+b), -psi'(a+b)], [-psi'(a+b), psi'(b) - psi'(a+b)]]``."""
    a, b = d.concentration1, d.concentration0
    # scaled by (1/a, 1/b); a b psi'(a+b) as w_a w_b (a+b)^2 psi'(a+b), w = a/(a+b), finite
    # where psi'(a+b) overflows. In float64: b^2 (psi'(b) - psi'(a+b)) is about a, the
    # difference of two terms of about b, and cancelled to 3% in float32 at b/a = 2e5.
    x, y = _wide(a), _wide(b)
    c = x + y
    wa, wb, t = x / c, y / c, _square_trigamma(c)
    ab = (-wa * (wb * t)).to(a.dtype)
    return _block(d, ("concentration1", "concentration0"),
                  (((_square_trigamma(x) - wa * (wa * t)).to(a.dtype), ab),
                   (ab, (_square_trigamma(y) - wb * (wb * t)).to(a.dtype))),
                  (a.reciprocal(), b.reciprocal()))


def _wide(x):
    """``x`` in float64 where the device has it (not Apple's MPS)."""
    return x if x.device.type == "mps" else x.to(torch.float64)


#: Above this df, F_df is summed from its series in 1/df; below, from its closed form,
#: with the trigamma difference computed as a sum of positive terms.
_STUDENT_T_SERIES_DF = 20.0
#: F_df = sum_k c_k / df^k, k = 4..21 (coefficients of the expansion of the closed form,
#: from the asymptotic series of the trigamma function); truncation error below 4e-15
#: relative for df >= 20, 2e-18 for df >= 30.
_STUDENT_T_SERIES = (3.5, -13.0, 39.5, -119.0, 363.5, -1101.0, 3279.5, -9763.0, 29523.5,
                     -89609.0, 265719.5, -778047.0, 2391483.5, -7639237.0, 21523359.5,
                     -50159771.0, 193710243.5, -1135957185.0)
#: B_2k, k = 1..6: psi'(y) ~ 1/y + 1/(2 y^2) + sum_k B_2k / y^(2k+1), within 1e-17 for y >= 20.
_BERNOULLI = (1 / 6, -1 / 30, 1 / 42, -1 / 30, 5 / 66, -691 / 2730)
_SHIFT = 20


def _trigamma_asymptotic(y):
    y2 = y.reciprocal().square()
    tail = torch.zeros_like(y)
    for b in reversed(_BERNOULLI):
        tail = (tail + b) * y2
    return (1 + 0.5 / y + tail) / y


def _trigamma_half_difference(x):
    """``psi'(x) - psi'(x + 1/2)`` to float64 accuracy (torch's trigamma is good to
    only ~5e-10 relative near 1, which F_df would amplify 10-fold): the recurrence
    ``psi'(x) = psi'(x+1) + 1/x^2`` gives positive terms
    ``1/z^2 - 1/(z+1/2)^2 = (z + 1/4) / (z^2 (z+1/2)^2)``, ``z = x + j``, then the
    asymptotic series at ``x + 20``."""
    out = torch.zeros_like(x)
    for j in range(_SHIFT):
        z = x + j
        out = out + (z + 0.25) / (z * (z + 0.5)).square()
    y = x + _SHIFT
    return out + (_trigamma_asymptotic(y) - _trigamma_asymptotic(y + 0.5))


def _student_t_df_info(nu):
    """``nu^2 F_df``, ``F_df = (psi'(nu/2) - psi'((nu+1)/2))/4 - (nu+5)/(2 nu (nu+1)(nu+3))``,
    about ``3.5/nu^4``: the difference of two ``O(1/nu^2)`` terms, which cancel to all digits
    of float32 by nu = 1e3 (of float64 by 1e5). Computed in float64, from the series in
    ``1/nu`` above :data:`_STUDENT_T_SERIES_DF`, and cast back."""
    x = _wide(nu)
    small = x.clamp_max(_STUDENT_T_SERIES_DF)
    closed = 0.25 * _trigamma_half_difference(small / 2) - (small + 5) / (
        2 * small * (small + 1) * (small + 3))
    t = x.clamp_min(_STUDENT_T_SERIES_DF).reciprocal()
    series = torch.zeros_like(t)
    for c in reversed(_STUDENT_T_SERIES):  # Horner in t = 1/nu
        series = series * t + c
    series = series * t.square().square()
    return (torch.where(x >= _STUDENT_T_SERIES_DF, series, closed) * x * x).to(nu.dtype)


@register_fisher(StudentT)
def _student_t(d):
    """``(df nu, loc, scale sigma)``. Select ``params=("loc", "scale")`` for a fixed df.

    ``F_loc = (nu+1)/((nu+3) sigma^2)``, ``F_scale = 2 nu/((nu+3) sigma^2)``,
    ``F_df,scale = -2/(sigma (nu+1)(nu+3))``,
    ``F_df = (psi'(nu/2) - psi'((nu+1)/2))/4 - (nu+5)/(2 nu (nu+1)(nu+3))``; loc decouples.
    """
    nu, s = d.df, d.scale
    zero = torch.zeros_like(s)
    # scaled by (1/nu, 1/sigma, 1/sigma); nu / (nu + 3) rather than a product that
    # overflows float32 for nu > 1e19
    ratio = nu / (nu + 3)
    f_ds = -2 * ratio / (nu + 1)
    f_loc = (nu + 1) / (nu + 3)
    f_s = 2 * ratio
    r = s.reciprocal()
    return _block(d, ("df", "loc", "scale"),
                  ((_student_t_df_info(nu), zero, f_ds), (zero, f_loc, zero), (f_ds, zero, f_s)),
                  (nu.reciprocal(), r, r))


@register_fisher(Dirichlet)
def _dirichlet(d):
    """``concentration``: ``diag(psi'(alpha)) - psi'(alpha_0) 1 1^T``."""
    a = d.concentration
    a0 = a.sum(-1)
    spec = ParamSpec("concentration", a, 1)
    # scaled by 1/alpha: diag(alpha^2 psi'(alpha)) - alpha0^2 psi'(alpha0) w w^T, w = alpha/alpha0
    return DiagPlusRankOneFisher([spec], d.batch_shape, _square_trigamma(a),
                                 a / a0.unsqueeze(-1), -_square_trigamma(a0),
                                 scale=a.reciprocal())


def _categorical_like(d, probs, n, spec_source):
    name = passed_argument(spec_source, ("probs", "logits"))
    spec = ParamSpec(name, getattr(d, name), 1)
    if name == "probs":  # n (diag(1/p) - 1 1^T), null vector p
        return ProbsFisher([spec], d.batch_shape, probs, n, type(d).__name__)
    # n (diag(p) - p p^T), null 1
    return LogitsFisher([spec], d.batch_shape, probs, n, type(d).__name__)


@register_fisher(Categorical)
def _categorical(d):
    """``probs`` (all k): ``diag(1/p) - 1 1^T``, singular along ``p``; ``logits``:
    ``diag(p) - p p^T``, singular along ``1``.

    ``p`` is the normalised ``d.probs``: torch divides the ``probs`` argument by its sum
    and keeps only the result, so for an unnormalised argument ``t`` (sum ``s``) this is
    not the Fisher in ``t`` (which is this one divided by ``s^2``, in the directions that
    change ``p``). Undamped solves of ``g`` in the range of ``F`` (the gradient of any
    function of the distribution is) return the minimum-norm solution; for other ``g``
    they solve ``F x = g - (p^T g) 1`` (probs) or ``F x = g - (1^T g) p`` (logits), which
    is not the least-squares ``pinv(F) g``."""
    p = d.probs
    return _categorical_like(d, p, torch.ones_like(p[..., 0]), d)


@register_fisher(OneHotCategorical)
def _one_hot_categorical(d):
    """As the categorical: one-hot coding is a map of the data, which the Fisher ignores."""
    p = d.probs
    return _categorical_like(d, p, torch.ones_like(p[..., 0]), d._categorical)


@register_fisher(Multinomial)
def _multinomial(d):
    """As the categorical, times ``total_count`` (which is fixed)."""
    p = d.probs
    n = torch.as_tensor(d.total_count, dtype=p.dtype, device=p.device).expand(p.shape[:-1])
    return _categorical_like(d, p, n, d._categorical)


@register_fisher(MultivariateNormal)
@register_fisher(pdist.AVFMultivariateNormal)  # control_var shapes gradients, not the law
def _mvn(d):
    """``loc`` and whichever of ``scale_tril``, ``covariance_matrix`` or
    ``precision_matrix`` was passed (lower-triangle coordinates). See
    :class:`~pyro_natgrad.fisher.operators.GaussianFisher`."""
    name = passed_argument(d, ("scale_tril", "covariance_matrix", "precision_matrix"))
    specs = [ParamSpec("loc", d.loc, 1),
             ParamSpec(name, getattr(d, name), 2, "tril", symmetric=name != "scale_tril")]
    return GaussianFisher(specs, d.batch_shape, d._unbroadcasted_scale_tril, name)


@register_fisher(LowRankMultivariateNormal)
def _lowrank_mvn(d):
    """``(loc, cov_factor, cov_diag)``. See
    :class:`~pyro_natgrad.fisher.operators.LowRankGaussianFisher`."""
    W, D = d.cov_factor, d.cov_diag
    # Woodbury: Sigma^{-1} = D^{-1} - D^{-1} W C^{-1} W^T D^{-1}, C = I + W^T D^{-1} W.
    Wt_Dinv = (W / D.unsqueeze(-1)).mT
    Y = torch.linalg.solve_triangular(d._capacitance_tril.expand(
        Wt_Dinv.shape[:-2] + d._capacitance_tril.shape[-2:]), Wt_Dinv, upper=False)
    P = torch.diag_embed(D.reciprocal()) - Y.mT @ Y
    specs = [ParamSpec("loc", d.loc, 1), ParamSpec("cov_factor", W, 2),
             ParamSpec("cov_diag", D, 1)]
    return LowRankGaussianFisher(specs, d.batch_shape, W, D, P)


@register_fisher(pdist.Delta)
def _delta(d):
    """A point mass: zero information about ``v`` (solves need damping > 0)."""
    return ZeroFisher([ParamSpec("v", d.v, d.event_dim)], d.batch_shape)


@register_fisher(Independent)
def _independent(d):
    """Block diagonal over the reinterpreted batch dims."""
    from . import fisher_operator

    return fisher_operator(d.base_dist).reinterpret(d.reinterpreted_batch_ndims)
