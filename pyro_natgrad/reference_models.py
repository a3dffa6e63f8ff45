"""Pyro models for the packaged reference posteriors (see :mod:`pyro_natgrad.datasets`).

Each model is written from the description recorded with its reference
(posteriordb's Stan program, or the inference-gym target). The conventions are:

* A model takes its data as keyword arguments (the ``data`` dict of a
  :class:`~pyro_natgrad.datasets.Reference`) and draws one joint sample per call
  (no vectorisation over particles).
* Vector parameters are single sample sites with an event dimension
  (``.to_event(1)``), named as in the reference (``beta`` for ``beta[1..D]``);
  only the observations sit inside a ``pyro.plate`` (site ``"obs"``).
* Improper flat priors use :class:`FlatPrior`, an
  :class:`~pyro.distributions.ImproperUniform` (log density 0 on the support)
  whose ``sample()`` returns a fixed feasible point, so that AutoGuide
  initialisation, ``Predictive`` and MCMC initialisation work unchanged.
* Stan's ``transformed data`` step lives in each spec's ``prepare`` (run once at
  load time on numpy arrays); ``transformed parameters`` that the reference
  reports (e.g. ``theta`` in non-centred eight schools, ``f`` in the GP) are
  recorded with ``pyro.deterministic`` and can be recomputed from the latent
  sites with the spec's ``derive``.
"""

import functools
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

__all__ = ["FlatPrior", "ModelSpec", "MODEL_SPECS"]


def _const(like, value):
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


class FlatPrior(dist.ImproperUniform):
    """Improper flat prior: ``log_prob`` is 0 everywhere on ``support``.

    As :class:`~pyro.distributions.ImproperUniform`, except that :meth:`sample`
    returns a fixed feasible point -- the image of 0 under
    ``transform_to(support)`` (0 for a real site, 1 for a positive one) -- in
    ``dtype``, so that tools which need *some* value of every site (AutoGuide
    initialisation, ``Predictive``'s structure trace, MCMC initialisation) work.
    That value is not a draw from the (improper) prior.
    """

    def __init__(self, support, batch_shape=(), event_shape=(), dtype=None):
        self.dtype = torch.get_default_dtype() if dtype is None else dtype
        super().__init__(support, torch.Size(batch_shape), torch.Size(event_shape))

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(FlatPrior, _instance)
        new.dtype = self.dtype
        return super().expand(batch_shape, _instance=new)

    def log_prob(self, value):
        batch_shape = value.shape[: value.dim() - self.event_dim]
        return value.new_zeros(torch.broadcast_shapes(batch_shape, self.batch_shape))

    def sample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.batch_shape + self.event_shape
        zero = torch.zeros(shape, dtype=self.dtype)
        return torch.distributions.transform_to(self.support)(zero)


def _flat(like, event_shape=(), support=constraints.real):
    """Improper flat prior on ``support`` with the given event shape, in ``like``'s dtype."""
    return FlatPrior(support, (), event_shape, dtype=like.dtype)


def _normal_vec(like, loc, scale, n):
    return dist.Normal(_const(like, loc), _const(like, scale)).expand([n]).to_event(1)


def _half_student_t(df, scale):
    # Stan: student_t(df, 0, scale) restricted to sigma > 0 (density doubled).
    return dist.FoldedDistribution(dist.StudentT(df, torch.zeros_like(scale), scale))


# --------------------------------------------------------------------------- models


def ark(y_obs, y_lags):
    """posteriordb ``arK``: AR(K) as a regression of ``y[t]`` on its ``K`` lags."""
    K = y_lags.shape[-1]
    alpha = pyro.sample("alpha", dist.Normal(_const(y_obs, 0.0), _const(y_obs, 10.0)))
    beta = pyro.sample("beta", _normal_vec(y_obs, 0.0, 10.0, K))
    sigma = pyro.sample("sigma", dist.HalfCauchy(_const(y_obs, 2.5)))
    mu = alpha + y_lags @ beta
    with pyro.plate("data", y_obs.shape[0]):
        pyro.sample("obs", dist.Normal(mu, sigma), obs=y_obs)


def blr(X, y):
    """posteriordb ``blr``: ``beta ~ N(0, 10)``, ``sigma ~ HalfNormal(10)``."""
    beta = pyro.sample("beta", _normal_vec(X, 0.0, 10.0, X.shape[-1]))
    sigma = pyro.sample("sigma", dist.HalfNormal(_const(X, 10.0)))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("obs", dist.Normal(X @ beta, sigma), obs=y)


def diamonds(Xc, Y):
    """posteriordb ``diamonds`` (brms): centred design, Student-t intercept and scale priors."""
    b = pyro.sample("b", _normal_vec(Xc, 0.0, 1.0, Xc.shape[-1]))
    intercept = pyro.sample(
        "Intercept", dist.StudentT(_const(Xc, 3.0), _const(Xc, 8.0), _const(Xc, 10.0)))
    sigma = pyro.sample("sigma", _half_student_t(_const(Xc, 3.0), _const(Xc, 10.0)))
    with pyro.plate("data", Xc.shape[0]):
        pyro.sample("obs", dist.Normal(intercept + Xc @ b, sigma), obs=Y)


def flat_linear_regression(X, y):
    """``y ~ N(X beta, sigma)`` with improper flat priors on ``beta`` and on ``sigma > 0``."""
    beta = pyro.sample("beta", _flat(X, (X.shape[-1],)))
    sigma = pyro.sample("sigma", _flat(X, (), constraints.positive))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("obs", dist.Normal(X @ beta, sigma), obs=y)


def kidscore_momhsiq(X, y):
    """posteriordb ``kidscore_momhsiq``: flat ``beta``, ``sigma ~ HalfCauchy(2.5)``."""
    beta = pyro.sample("beta", _flat(X, (X.shape[-1],)))
    sigma = pyro.sample("sigma", dist.HalfCauchy(_const(X, 2.5)))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("obs", dist.Normal(X @ beta, sigma), obs=y)


def kilpisjarvi(x, y, pmualpha, psalpha, pmubeta, psbeta):
    """posteriordb ``kilpisjarvi``: uncentred year, Normal priors from data, flat ``sigma``."""
    alpha = pyro.sample("alpha", dist.Normal(pmualpha, psalpha))
    beta = pyro.sample("beta", dist.Normal(pmubeta, psbeta))
    sigma = pyro.sample("sigma", _flat(x, (), constraints.positive))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(alpha + beta * x, sigma), obs=y)


def eight_schools_noncentered(y, sigma):
    """posteriordb ``eight_schools_noncentered``; reports ``theta = mu + tau * theta_trans``."""
    J = y.shape[0]
    mu = pyro.sample("mu", dist.Normal(_const(y, 0.0), _const(y, 5.0)))
    tau = pyro.sample("tau", dist.HalfCauchy(_const(y, 5.0)))
    theta_trans = pyro.sample("theta_trans", _normal_vec(y, 0.0, 1.0, J))
    theta = pyro.deterministic("theta", mu + tau * theta_trans, event_dim=1)
    with pyro.plate("data", J):
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


GP_JITTER = 1e-10  # diagonal jitter of posteriordb's gp_pois_regr.stan


def _gp_cholesky(x, rho, alpha, jitter):
    d = x.unsqueeze(-1) - x.unsqueeze(-2)
    rho = rho.unsqueeze(-1).unsqueeze(-1)
    alpha = alpha.unsqueeze(-1).unsqueeze(-1)
    K = alpha ** 2 * torch.exp(-0.5 * d ** 2 / rho ** 2)
    K = K + jitter * torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    return torch.linalg.cholesky(K)


def gp_pois_regr(x, k, jitter=GP_JITTER):
    """posteriordb ``gp_pois_regr``: latent GP (non-centred) with Poisson log link.

    Needs float64: the description's ``1e-10`` jitter is below float32 resolution and
    the Cholesky factorisation then fails. (``jitter`` can be raised, e.g. ``1e-5`` for
    float32, at the cost of a slightly different model.)
    """
    N = x.shape[0]
    rho = pyro.sample("rho", dist.Gamma(_const(x, 25.0), _const(x, 4.0)))
    alpha = pyro.sample("alpha", dist.HalfNormal(_const(x, 2.0)))
    f_tilde = pyro.sample("f_tilde", _normal_vec(x, 0.0, 1.0, N))
    L = _gp_cholesky(x, rho, alpha, jitter)
    f = pyro.deterministic("f", (L @ f_tilde.unsqueeze(-1)).squeeze(-1), event_dim=1)
    with pyro.plate("data", N):
        pyro.sample("obs", dist.Poisson(f.exp()), obs=k)


def german_credit_logistic(x, y):
    """inference-gym German credit (numeric) logistic regression; bias is the last weight."""
    D = x.shape[-1] + 1
    w = pyro.sample("w", _normal_vec(x, 0.0, 1.0, D))
    logits = x @ w[:-1] + w[-1]
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Bernoulli(logits=logits), obs=y)


def german_credit_probit(x, y):
    """inference-gym German credit (numeric) probit regression; bias is the last weight."""
    D = x.shape[-1] + 1
    w = pyro.sample("w", _normal_vec(x, 0.0, 1.0, D))
    z = x @ w[:-1] + w[-1]
    # P(y=1) = Phi(z); logit(Phi(z)) = log Phi(z) - log Phi(-z), stable in both tails.
    logits = torch.special.log_ndtr(z) - torch.special.log_ndtr(-z)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Bernoulli(logits=logits), obs=y)


def eight_schools_centered(y, sigma):
    """inference-gym ``eight_schools`` (centred; its priors differ from posteriordb's)."""
    J = y.shape[0]
    avg_effect = pyro.sample("avg_effect", dist.Normal(_const(y, 0.0), _const(y, 10.0)))
    log_stddev = pyro.sample("log_stddev", dist.Normal(_const(y, 5.0), _const(y, 1.0)))
    school_effects = pyro.sample(
        "school_effects", dist.Normal(avg_effect, log_stddev.exp()).expand([J]).to_event(1))
    with pyro.plate("data", J):
        pyro.sample("obs", dist.Normal(school_effects, sigma), obs=y)


def radon_contextual_effects(log_uranium, floor, floor_by_county, county, log_radon, J,
                             scale_prior="uniform"):
    """inference-gym ``radon_contextual_effects_minnesota`` (``scale_prior="uniform"``:
    both scales ~ Uniform(0, 100); ``"halfnormal"``: both ~ HalfNormal(1))."""
    x = log_radon

    def scale_dist():
        if scale_prior == "uniform":
            return dist.Uniform(_const(x, 0.0), _const(x, 100.0))
        if scale_prior == "halfnormal":
            return dist.HalfNormal(_const(x, 1.0))
        raise ValueError("scale_prior must be 'uniform' or 'halfnormal'")

    ce_mean = pyro.sample("county_effect_mean", dist.Normal(_const(x, 0.0), _const(x, 1.0)))
    ce_scale = pyro.sample("county_effect_scale", scale_dist())
    county_effect = pyro.sample(
        "county_effect", dist.Normal(ce_mean, ce_scale).expand([J]).to_event(1))
    weight = pyro.sample("weight", _normal_vec(x, 0.0, 1.0, 3))
    scale = pyro.sample("log_radon_scale", scale_dist())
    loc = (weight[0] * log_uranium + weight[1] * floor + weight[2] * floor_by_county
           + county_effect[county])
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(loc, scale), obs=log_radon)


# ------------------------------------------------------ transformed data (numpy, at load)


def _prep_ark(raw):
    y = np.asarray(raw["y"], dtype=np.float64)
    K = int(raw["K"])
    T = y.shape[0]
    lags = np.stack([y[K - k:T - k] for k in range(1, K + 1)], axis=1)  # column k-1: y[t-k]
    return {"y_obs": y[K:], "y_lags": lags}


def _prep_blr(raw):
    return {"X": np.asarray(raw["X"], dtype=np.float64),
            "y": np.asarray(raw["y"], dtype=np.float64)}


def _prep_diamonds(raw):
    X = np.asarray(raw["X"], dtype=np.float64)
    Xc = X[:, 1:] - X[:, 1:].mean(axis=0)
    return {"Xc": Xc, "Y": np.asarray(raw["Y"], dtype=np.float64)}


def _prep_earnings(raw):
    h = np.asarray(raw["height"], dtype=np.float64)
    male = np.asarray(raw["male"], dtype=np.float64)
    z = (h - h.mean()) / h.std(ddof=1)
    X = np.stack([np.ones_like(z), z, male, z * male], axis=1)
    return {"X": X, "y": np.log(np.asarray(raw["earn"], dtype=np.float64))}


def _prep_kidiq(raw):
    hs = np.asarray(raw["mom_hs"], dtype=np.float64)
    iq = np.asarray(raw["mom_iq"], dtype=np.float64)
    X = np.stack([np.ones_like(hs), hs, iq], axis=1)
    return {"X": X, "y": np.asarray(raw["kid_score"], dtype=np.float64)}


def _prep_kilpisjarvi(raw):
    out = {"x": np.asarray(raw["x"], dtype=np.float64),
           "y": np.asarray(raw["y"], dtype=np.float64)}
    for k in ("pmualpha", "psalpha", "pmubeta", "psbeta"):
        out[k] = np.asarray(raw[k], dtype=np.float64)
    return out


def _prep_mesquite(raw):
    d1, d2, ch, th, group, weight = (
        np.asarray(raw[k], dtype=np.float64)
        for k in ("diam1", "diam2", "canopy_height", "total_height", "group", "weight"))
    X = np.stack([np.ones_like(d1), np.log(d1 * d2 * ch), np.log(d1 * d2), np.log(d1 / d2),
                  np.log(th), group], axis=1)
    return {"X": X, "y": np.log(weight)}


def _prep_nes(raw):
    c = {k: np.asarray(raw[k], dtype=np.float64)
         for k in ("real_ideo", "race_adj", "age_discrete", "educ1", "gender", "income",
                   "partyid7")}
    age = c["age_discrete"]
    X = np.stack([np.ones_like(age), c["real_ideo"], c["race_adj"], (age == 2) * 1.0,
                  (age == 3) * 1.0, (age == 4) * 1.0, c["educ1"], c["gender"], c["income"]],
                 axis=1)
    return {"X": X, "y": c["partyid7"]}


def _prep_eight_schools(raw):
    return {"y": np.asarray(raw["y"], dtype=np.float64),
            "sigma": np.asarray(raw["sigma"], dtype=np.float64)}


def _prep_gp(raw):
    return {"x": np.asarray(raw["x"], dtype=np.float64),
            "k": np.asarray(raw["k"], dtype=np.float64)}


def _prep_german(raw):
    rows = np.asarray(raw["rows_24_features_then_class"], dtype=np.float64)
    feats, cls = rows[:, :24], rows[:, 24]
    x = (feats - feats.mean(axis=0)) / feats.std(axis=0)  # np.std: ddof=0
    return {"x": x, "y": (cls == 2).astype(np.float64)}


def _prep_radon(raw):
    out = {k: np.asarray(raw[k], dtype=np.float64)
           for k in ("log_uranium", "floor", "floor_by_county", "log_radon")}
    out["county"] = np.asarray(raw["county"], dtype=np.int64)
    out["J"] = int(raw["J"])
    return out


# ------------------------------------------------ reported <-> latent (transformed params)


def _derive_eight_schools(samples, data):
    mu, tau = samples["mu"], samples["tau"]
    return {"theta": mu.unsqueeze(-1) + tau.unsqueeze(-1) * samples["theta_trans"]}


def _underive_eight_schools(reported, data):
    mu, tau = reported["mu"], reported["tau"]
    out = {k: v for k, v in reported.items() if k != "theta"}
    out["theta_trans"] = (reported["theta"] - mu.unsqueeze(-1)) / tau.unsqueeze(-1)
    return out


def _derive_gp(samples, data):
    L = _gp_cholesky(data["x"], samples["rho"], samples["alpha"], GP_JITTER)
    return {"f": (L @ samples["f_tilde"].unsqueeze(-1)).squeeze(-1)}


def _underive_gp(reported, data):
    L = _gp_cholesky(data["x"], reported["rho"], reported["alpha"], GP_JITTER)
    f_tilde = torch.linalg.solve_triangular(L, reported["f"].unsqueeze(-1), upper=False)
    out = {k: v for k, v in reported.items() if k != "f"}
    out["f_tilde"] = f_tilde.squeeze(-1)
    return out


@dataclass(frozen=True)
class ModelSpec:
    """How to build and read one reference model.

    :param fn: the Pyro model; called as ``fn(**data)``.
    :param prepare: raw stored data (dict) -> model data (numpy float arrays, int64
        index arrays, python ints), i.e. Stan's ``transformed data``.
    :param obs: the data key observed by the likelihood (its length is ``n_data``).
    :param derive: ``(latent sites, data) -> reported sites`` for reported quantities
        that are not sample sites; ``None`` when every reported site is a sample site.
    :param underive: the inverse of ``derive`` (reported sites -> latent sites).
    """

    fn: Callable
    prepare: Callable[[dict], Dict[str, object]]
    obs: str
    derive: Optional[Callable] = None
    underive: Optional[Callable] = None


MODEL_SPECS: Dict[str, ModelSpec] = {
    "arK": ModelSpec(ark, _prep_ark, "y_obs"),
    "blr": ModelSpec(blr, _prep_blr, "y"),
    "diamonds": ModelSpec(diamonds, _prep_diamonds, "Y"),
    "logearn_interaction_z": ModelSpec(flat_linear_regression, _prep_earnings, "y"),
    "kidscore_momhsiq": ModelSpec(kidscore_momhsiq, _prep_kidiq, "y"),
    "kilpisjarvi": ModelSpec(kilpisjarvi, _prep_kilpisjarvi, "y"),
    "logmesquite_logvash": ModelSpec(flat_linear_regression, _prep_mesquite, "y"),
    "nes": ModelSpec(flat_linear_regression, _prep_nes, "y"),
    "eight_schools_noncentered": ModelSpec(
        eight_schools_noncentered, _prep_eight_schools, "y",
        _derive_eight_schools, _underive_eight_schools),
    "gp_pois_regr": ModelSpec(
        gp_pois_regr, _prep_gp, "k", _derive_gp, _underive_gp),
    "german_credit_logistic": ModelSpec(german_credit_logistic, _prep_german, "y"),
    "german_credit_probit": ModelSpec(german_credit_probit, _prep_german, "y"),
    "eight_schools_centered": ModelSpec(eight_schools_centered, _prep_eight_schools, "y"),
    "radon_uniform": ModelSpec(
        functools.partial(radon_contextual_effects, scale_prior="uniform"), _prep_radon,
        "log_radon"),
    "radon_halfnormal": ModelSpec(
        functools.partial(radon_contextual_effects, scale_prior="halfnormal"), _prep_radon,
        "log_radon"),
}
