"""Natural and mean (expectation) coordinates of exponential families.

For ``p(x) = h(x) exp(<eta, T(x)> - A(eta))`` the natural coordinates are ``eta``
and the mean coordinates ``m = E[T(x)] = grad A(eta)``. Conventions (the Fisher
does not depend on shifts of ``eta``, so ``alpha - 1`` versus ``alpha`` is immaterial):

=================  ============================  ==============================
family             ``eta``                       ``T(x)``
=================  ============================  ==============================
Normal, LogNormal  ``(mu/s^2, -1/(2 s^2))``      ``(y, y^2)``, ``y = x`` or ``log x``
MultivariateNormal ``(Lambda mu, -Lambda/2)``    ``(x, x x^T)`` (tril; ``2 x_i x_j`` below)
Gamma              ``(a - 1, -b)``               ``(log x, x)``
Chi2               ``df/2 - 1``                  ``log x``
InverseGamma       ``(-a - 1, -b)``              ``(log x, 1/x)``
Beta               ``(a - 1, b - 1)``            ``(log x, log(1-x))``
Dirichlet          ``alpha - 1``                 ``log x``
Exponential        ``-lambda``                   ``x``
HalfNormal         ``-1/(2 s^2)``                ``x^2``
Poisson            ``log lambda``                ``x``
Bernoulli,Binomial ``logit p``                   ``x``
Geometric          ``log(1 - p)``                ``x`` (failures)
NegativeBinomial   ``log p``                     ``x`` (successes; ``r`` fixed)
Categorical,       ``log(p_i/p_k)``, ``i < k``   one-hot (first ``k-1``)
Multinomial
=================  ============================  ==============================

Each registered function returns an :class:`ExpFamCoords`: the current natural
and mean coordinates and maps back to the standard parameters. Where the inverse
of the mean map has no closed form (it needs the inverse digamma function) it is
replaced by its linearisation at the current point, which has the same value and
first derivative there: all a Fisher matrix needs.
"""

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import pyro.distributions as pdist
from torch.distributions import (
    Bernoulli, Beta, Binomial, Categorical, Chi2, Dirichlet, Exponential, Gamma, Geometric,
    HalfNormal, LogNormal, Multinomial, MultivariateNormal, NegativeBinomial, Normal,
    OneHotCategorical, Poisson,
)

from .families import passed_argument
from .params import symmetrize
from .registry import inherited

Tensors = Dict[str, torch.Tensor]

_EXPFAM = {}


@dataclass
class ExpFamCoords:
    """Natural and mean coordinates of one distribution.

    :param natural: current ``eta``, per coordinate block.
    :param from_natural: ``eta -> standard parameters``.
    :param to_mean: ``standard parameters -> m``.
    :param from_mean: ``m -> standard parameters``, or None (linearised inverse).
    :param layout: per coordinate name, ``(event_dim, packing)``.
    """

    natural: Tensors
    from_natural: Callable[[Tensors], Tensors]
    to_mean: Callable[[Tensors], Tensors]
    from_mean: Optional[Callable[[Tensors], Tensors]]
    layout: Dict[str, Tuple[int, str]]


def register_exponential_family(type_):
    """Decorator registering natural/mean coordinates for ``type_`` (MRO lookup
    through subclasses with the same parameters)."""

    def decorator(fn):
        _EXPFAM[type_] = fn
        return fn

    return decorator


def exponential_family_coords(d) -> Optional[ExpFamCoords]:
    """The coordinates of ``d``'s family, or of an ancestor with the same parameters
    (as for :func:`~pyro_natgrad.fisher.register_fisher`), or None."""
    fn = inherited(_EXPFAM, type(d))
    return fn(d) if fn is not None else None


def _scalar_layout(*names):
    return {n: (0, "full") for n in names}


@register_exponential_family(Normal)
@register_exponential_family(LogNormal)
def _normal(d):
    def from_natural(e):
        var = -0.5 / e["eta2"]
        return {"loc": e["eta1"] * var, "scale": var.sqrt()}

    def to_mean(t):
        return {"mean1": t["loc"], "mean2": t["loc"].square() + t["scale"].square()}

    var = d.scale.square()
    loc0, mean2_0 = d.loc, d.loc.square() + var

    # m2 - m1^2, anchored at the current point: the same function, without the
    # cancellation of m2 - m1^2 (all of float32's digits where sd / |mean| ~ 1e-3)
    def from_mean(m):
        m1 = m["mean1"]
        var_m = var + (m["mean2"] - mean2_0) - (m1 - loc0) * (m1 + loc0)
        return {"loc": m1, "scale": var_m.sqrt()}

    layout = {**_scalar_layout("eta1", "eta2"), **_scalar_layout("mean1", "mean2")}
    return ExpFamCoords({"eta1": d.loc / var, "eta2": -0.5 / var}, from_natural, to_mean,
                        from_mean, layout)


@register_exponential_family(MultivariateNormal)
@register_exponential_family(pdist.AVFMultivariateNormal)
def _mvn(d):
    name = passed_argument(d, ("scale_tril", "covariance_matrix", "precision_matrix"))

    def from_cov(loc, cov, prec):
        if name == "scale_tril":
            return {"loc": loc, name: torch.linalg.cholesky(cov)}
        return {"loc": loc, name: cov if name == "covariance_matrix" else prec}

    def from_natural(e):
        prec = -2 * symmetrize(e["eta2"])
        cov = _spd_inverse(prec)
        return from_cov((cov @ e["eta1"].unsqueeze(-1)).squeeze(-1), cov, prec)

    # <eta2, x x^T> over tril coordinates counts each off-diagonal pair twice, so the
    # dual mean coordinates are E[x_i x_j] on the diagonal and 2 E[x_i x_j] below it.
    def to_mean(t):
        cov = _mvn_cov(t, name)
        loc = t["loc"]
        second = cov + loc.unsqueeze(-1) * loc.unsqueeze(-2)
        return {"mean1": loc, "mean2": second.tril() + second.tril(-1)}

    def second_moment(mean2):
        half = mean2.tril(-1) * 0.5
        return half + half.mT + torch.diag_embed(mean2.diagonal(dim1=-2, dim2=-1))

    # As the normal's: anchored at the current point (loc0, cov0), so that the
    # covariance is not the difference of two nearly equal matrices.
    t0 = {"loc": d.loc, name: getattr(d, name)}
    loc0, cov0 = d.loc, _mvn_cov(t0, name)
    second0 = second_moment(to_mean(t0)["mean2"])

    def from_mean(m):
        loc = m["mean1"]
        cov = cov0 + (second_moment(m["mean2"]) - second0) - _loc_outer_change(loc0, loc)
        prec = _spd_inverse(cov) if name == "precision_matrix" else None
        return from_cov(loc, cov, prec)

    prec = torch.cholesky_inverse(d._unbroadcasted_scale_tril)
    prec = prec.expand(d.batch_shape + d.event_shape * 2)
    eta1 = (prec @ d.loc.unsqueeze(-1)).squeeze(-1)
    layout = {"eta1": (1, "full"), "eta2": (2, "tril"), "mean1": (1, "full"),
              "mean2": (2, "tril")}
    return ExpFamCoords({"eta1": eta1, "eta2": (-0.5 * prec).tril()}, from_natural, to_mean,
                        from_mean, layout)


def _loc_outer_change(loc0, loc):
    """``loc loc^T - loc0 loc0^T`` as ``D loc0^T + loc0 D^T + D D^T``, ``D = loc - loc0``:
    exactly 0 at ``loc0``."""
    delta = loc - loc0
    return (delta.unsqueeze(-1) * (loc0 + delta).unsqueeze(-2)
            + loc0.unsqueeze(-1) * delta.unsqueeze(-2))


def _spd_inverse(A):
    """``A^{-1}`` for symmetric positive definite ``A``. Not ``torch.cholesky_inverse``,
    whose forward-mode derivative is wrong in torch 2.13 (reverse mode is right)."""
    L = torch.linalg.cholesky(A)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand(L.shape)
    return torch.cholesky_solve(eye, L)


def _mvn_cov(t, name):
    if name == "scale_tril":
        L = t[name].tril()
        return L @ L.mT
    if name == "covariance_matrix":
        return symmetrize(t[name])
    return _spd_inverse(symmetrize(t[name]))


@register_exponential_family(Gamma)
def _gamma(d):
    def to_mean(t):
        a, b = t["concentration"], t["rate"]
        return {"mean1": torch.digamma(a) - b.log(), "mean2": a / b}

    return ExpFamCoords(
        {"eta1": d.concentration - 1, "eta2": -d.rate},
        lambda e: {"concentration": e["eta1"] + 1, "rate": -e["eta2"]},
        to_mean, None, {**_scalar_layout("eta1", "eta2"), **_scalar_layout("mean1", "mean2")})


@register_exponential_family(Chi2)
def _chi2(d):
    def to_mean(t):
        return {"mean": torch.digamma(0.5 * t["df"]) + math.log(2)}

    return ExpFamCoords({"eta": 0.5 * d.df - 1}, lambda e: {"df": 2 * (e["eta"] + 1)}, to_mean,
                        None, _scalar_layout("eta", "mean"))


@register_exponential_family(pdist.InverseGamma)
def _inverse_gamma(d):
    def to_mean(t):
        a, b = t["concentration"], t["rate"]
        return {"mean1": b.log() - torch.digamma(a), "mean2": a / b}

    return ExpFamCoords(
        {"eta1": -d.concentration - 1, "eta2": -d.rate},
        lambda e: {"concentration": -e["eta1"] - 1, "rate": -e["eta2"]},
        to_mean, None, {**_scalar_layout("eta1", "eta2"), **_scalar_layout("mean1", "mean2")})


@register_exponential_family(Beta)
def _beta(d):
    def to_mean(t):
        a, b = t["concentration1"], t["concentration0"]
        s = torch.digamma(a + b)
        return {"mean1": torch.digamma(a) - s, "mean2": torch.digamma(b) - s}

    return ExpFamCoords(
        {"eta1": d.concentration1 - 1, "eta2": d.concentration0 - 1},
        lambda e: {"concentration1": e["eta1"] + 1, "concentration0": e["eta2"] + 1},
        to_mean, None, {**_scalar_layout("eta1", "eta2"), **_scalar_layout("mean1", "mean2")})


@register_exponential_family(Dirichlet)
def _dirichlet(d):
    def to_mean(t):
        a = t["concentration"]
        return {"mean": torch.digamma(a) - torch.digamma(a.sum(-1, keepdim=True))}

    return ExpFamCoords({"eta": d.concentration - 1},
                        lambda e: {"concentration": e["eta"] + 1}, to_mean, None,
                        {"eta": (1, "full"), "mean": (1, "full")})


def _one_param(natural, from_natural, to_mean, from_mean):
    return ExpFamCoords({"eta": natural}, lambda e: from_natural(e["eta"]),
                        lambda t: {"mean": to_mean(t)}, lambda m: from_mean(m["mean"]),
                        _scalar_layout("eta", "mean"))


@register_exponential_family(Exponential)
def _exponential(d):
    return _one_param(-d.rate, lambda e: {"rate": -e}, lambda t: t["rate"].reciprocal(),
                      lambda m: {"rate": m.reciprocal()})


@register_exponential_family(HalfNormal)
def _halfnormal(d):
    return _one_param(-0.5 / d.scale.square(), lambda e: {"scale": (-0.5 / e).sqrt()},
                      lambda t: t["scale"].square(), lambda m: {"scale": m.sqrt()})


@register_exponential_family(Poisson)
def _poisson(d):
    return _one_param(d.rate.log(), lambda e: {"rate": e.exp()}, lambda t: t["rate"],
                      lambda m: {"rate": m})


def _probs_from(name, p):
    return {name: p if name == "probs" else torch.logit(p)}


def _probs_of(name, t):
    return t[name] if name == "probs" else torch.sigmoid(t[name])


# With logits, eta and its inverse map are written in the logits x, never through
# p = sigmoid(x), which rounds to 1 for x > 17 (float32) and would make eta infinite.
@register_exponential_family(Bernoulli)
@register_exponential_family(Binomial)
def _bernoulli(d):
    name = passed_argument(d, ("probs", "logits"))
    n = getattr(d, "total_count", 1)
    def from_natural(e):  # eta = logit p
        return {name: e if name == "logits" else torch.sigmoid(e)}

    # No trials: m = n p is 0 whatever p, so p does not move with m (d p / d m = 0, a
    # zero Fisher as in the other coordinates), where m / n was 0/0 = NaN.
    none = torch.as_tensor(n) == 0
    theta0 = getattr(d, name).detach()

    def from_mean(m):
        if not bool(none.any()):
            return _probs_from(name, m / n)
        # 1/2 in the unused branch, not 0 / 1: logit's derivative there, times the 0 that
        # where gives it, would still be inf * 0.
        p = torch.where(none, torch.full_like(m, 0.5), m / torch.where(none, 1, n))
        return {name: torch.where(none, theta0, _probs_from(name, p)[name])}

    eta = d.logits if name == "logits" else torch.logit(d.probs)
    return _one_param(eta, from_natural, lambda t: n * _probs_of(name, t), from_mean)


def _odds(name, t):
    """``p / (1 - p)``; from the logits as ``exp(x)``, not through ``1 - sigmoid(x)``,
    which rounds to 0 (``x > 17`` in float32)."""
    return t[name].exp() if name == "logits" else t[name] / (1 - t[name])


def _from_odds(name, odds):
    """The inverse of :func:`_odds`: ``logits = log(odds)``, never through ``p``;
    ``p = odds / (1 + odds)``, and ``odds`` itself (its value and derivative there) at
    odds 0: the Fisher of ``p`` is infinite there, and the quotient's derivative took
    ``0 inf`` from it (a negative binomial at ``probs = 0`` had a NaN Fisher in mean
    coordinates, not an infinite one)."""
    if name == "logits":
        return {name: odds.log()}
    return {name: torch.where(odds == 0, odds, odds / (1 + odds))}


def _log_p_to_logits(log_p):
    """``logit(p) = log p - log(1 - p)`` from ``log p <= 0``."""
    return log_p - torch.log(-torch.expm1(log_p))


@register_exponential_family(Geometric)
def _geometric(d):
    name = passed_argument(d, ("probs", "logits"))
    def from_natural(e):  # eta = log(1 - p)
        return {name: -_log_p_to_logits(e) if name == "logits" else -torch.expm1(e)}

    eta = torch.nn.functional.logsigmoid(-d.logits) if name == "logits" \
        else torch.log1p(-d.probs)
    return _one_param(eta, from_natural,
                      lambda t: _odds(name, t).reciprocal(),
                      lambda m: {name: -m.log()} if name == "logits"
                      # 1 / (1 + m), not through the odds 1/m: infinite at m = 0 (p = 1)
                      else {name: (1 + m).reciprocal()})


@register_exponential_family(NegativeBinomial)
def _negative_binomial(d):
    name = passed_argument(d, ("probs", "logits"))
    r = d.total_count
    def from_natural(e):  # eta = log p
        return {name: _log_p_to_logits(e) if name == "logits" else e.exp()}

    eta = torch.nn.functional.logsigmoid(d.logits) if name == "logits" else d.probs.log()
    return _one_param(eta, from_natural,
                      lambda t: r * _odds(name, t),
                      lambda m: _from_odds(name, m / r))


def _categorical_coords(d, name, n):
    def probs_to_param(p):
        return {name: p if name == "probs" else p.log()}

    def from_natural(e):
        eta = e["eta"]
        full = torch.cat([eta, torch.zeros_like(eta[..., :1])], -1)
        # logits as log_softmax, not log(softmax): a probability that underflows to 0
        # would give -inf and a NaN Jacobian
        return {name: torch.softmax(full, -1) if name == "probs"
                else torch.log_softmax(full, -1)}

    def to_mean(t):
        p = t[name] if name == "probs" else torch.softmax(t[name], -1)
        p = p / p.sum(-1, keepdim=True)
        return {"mean": n * p[..., :-1]}

    def from_mean(m):
        p = m["mean"] / n
        return probs_to_param(torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1))

    logp = d.logits if name == "logits" else d.probs.log()
    return ExpFamCoords({"eta": logp[..., :-1] - logp[..., -1:]}, from_natural, to_mean,
                        from_mean, {"eta": (1, "full"), "mean": (1, "full")})


@register_exponential_family(Categorical)
def _categorical(d):
    return _categorical_coords(d, passed_argument(d, ("probs", "logits")), 1)


@register_exponential_family(OneHotCategorical)
def _one_hot_categorical(d):
    return _categorical_coords(d, passed_argument(d._categorical, ("probs", "logits")), 1)


@register_exponential_family(Multinomial)
def _multinomial(d):
    n = torch.as_tensor(d.total_count, dtype=d.probs.dtype).unsqueeze(-1) if torch.is_tensor(
        d.total_count) else d.total_count
    return _categorical_coords(d, passed_argument(d._categorical, ("probs", "logits")), n)
