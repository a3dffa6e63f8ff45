"""Tests for the packaged reference posteriors and their Pyro models.

The checks here are written independently of ``pyro_natgrad.reference_models``:
designs are rebuilt from the stored raw data with numpy, log densities are
computed with scipy.stats, and exact posteriors (1-D / 2-D quadrature over the
scale parameters of conditionally Gaussian models, closed forms, Newton +
importance sampling) are compared with the stored reference summaries.
"""

import functools
import json

import numpy as np
import pyro
import pytest
import scipy.linalg as sla
import scipy.special as sp
import scipy.stats as st
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.poutine.util import prune_subsample_sites

from pyro_natgrad.datasets import DATA_DIR, list_references, load_reference
from pyro_natgrad.reference_models import gp_pois_regr

ALL = list_references()
KINDS = {"linear", "logistic", "probit", "poisson", "hierarchical", "time-series"}

# name -> (kind, gaussian_like, n_params, n_data, {data key: shape})
EXPECTED = {
    "arK-arK": ("time-series", True, 7, 195, {"y_obs": (195,), "y_lags": (195, 5)}),
    "diamonds-diamonds": ("linear", True, 26, 5000, {"Xc": (5000, 24), "Y": (5000,)}),
    "earnings-logearn_interaction_z": ("linear", True, 5, 1192, {"X": (1192, 4), "y": (1192,)}),
    "eight_schools-eight_schools_noncentered": (
        "hierarchical",
        False,
        10,
        8,
        {"y": (8,), "sigma": (8,)},
    ),
    "gp_pois_regr-gp_pois_regr": ("poisson", False, 13, 11, {"x": (11,), "k": (11,)}),
    "kidiq-kidscore_momhsiq": ("linear", True, 4, 434, {"X": (434, 3), "y": (434,)}),
    "kilpisjarvi_mod-kilpisjarvi": ("linear", True, 3, 62, {"x": (62,), "y": (62,)}),
    "mesquite-logmesquite_logvash": ("linear", True, 7, 46, {"X": (46, 6), "y": (46,)}),
    "nes2000-nes": ("linear", True, 10, 476, {"X": (476, 9), "y": (476,)}),
    "sblrc-blr": ("linear", True, 6, 100, {"X": (100, 5), "y": (100,)}),
    "sblri-blr": ("linear", True, 6, 100, {"X": (100, 5), "y": (100,)}),
    "german_credit_numeric_logistic_regression": (
        "logistic",
        True,
        25,
        1000,
        {"x": (1000, 24), "y": (1000,)},
    ),
    "german_credit_numeric_probit_regression": (
        "probit",
        True,
        25,
        1000,
        {"x": (1000, 24), "y": (1000,)},
    ),
    "eight_schools": ("hierarchical", False, 10, 8, {"y": (8,), "sigma": (8,)}),
    "radon_contextual_effects_minnesota": (
        "hierarchical",
        False,
        91,
        919,
        {"log_radon": (919,), "county": (919,)},
    ),
    "radon_contextual_effects_minnesota_halfnormal": (
        "hierarchical",
        False,
        91,
        919,
        {"log_radon": (919,), "county": (919,)},
    ),
}


@functools.lru_cache(maxsize=None)
def ref(name):
    return load_reference(name)


def raw(name, key):
    return np.asarray(ref(name).raw_data[key], dtype=np.float64)


def named(name, values=None):
    """``{param_name: value}`` (default: the reference mean)."""
    r = ref(name)
    values = r.mean if values is None else values
    return dict(zip(r.param_names, values))


def vec(d, site, n):
    return np.array([d["%s[%d]" % (site, i + 1)] for i in range(n)])


# ------------------------------------------------------------------- loading / shapes


def test_list_matches_packaged_files():
    assert len(ALL) == 16
    files = {
        p.name
        for p in DATA_DIR.iterdir()
        if p.suffix == ".json" and not p.name.endswith(".data.json")
    }
    assert files == {n + ".json" for n in ALL}
    assert (DATA_DIR / "README.md").exists()
    total = sum(p.stat().st_size for p in DATA_DIR.iterdir())
    assert total < 2_000_000


@pytest.mark.parametrize("name", ALL)
def test_reference_loads(name):
    r = ref(name)
    kind, gaussian_like, n_params, n_data, shapes = EXPECTED[name]
    assert r.name == name and r.kind == kind and r.kind in KINDS
    assert r.gaussian_like is gaussian_like
    assert r.n_params == n_params == len(set(r.param_names))
    assert r.n_data == n_data
    for k, shape in shapes.items():
        assert tuple(r.data[k].shape) == shape, k
    for k, v in r.data.items():
        if torch.is_tensor(v) and v.is_floating_point():
            assert v.dtype == torch.float64
    assert r.mean.shape == r.sd.shape == (n_params,)
    assert np.all(np.isfinite(r.mean)) and np.all(r.sd > 0)
    assert r.mean_se is not None and np.all(r.mean_se < 0.05 * r.sd)
    assert r.description and r.provenance
    if r.source == "posteriordb":
        assert r.provenance["source_repo"] == "https://github.com/stan-dev/posteriordb"
        assert len(r.provenance["source_commit"]) == 40
        assert r.cov is not None and r.quantiles is not None
    if r.cov is not None:
        assert r.cov.shape == (n_params, n_params)
        np.testing.assert_allclose(r.cov, r.cov.T, atol=1e-12 * np.abs(r.cov).max())
        np.testing.assert_allclose(np.sqrt(np.diag(r.cov)), r.sd, rtol=1e-3)
        assert np.linalg.eigvalsh(r.cov / np.outer(r.sd, r.sd)).min() > 0
    if r.quantiles is not None:
        q05, q50, q95 = r.quantiles[0.05], r.quantiles[0.5], r.quantiles[0.95]
        assert np.all(q05 < q50) and np.all(q50 < q95)
        assert np.all((r.mean > q05) & (r.mean < q95))


def test_dtype_argument():
    r = load_reference("sblri-blr", dtype=torch.float32)
    assert r.data["X"].dtype == torch.float32
    assert r.to_sites(r.mean)["beta"].dtype == torch.float32
    tr = poutine.trace(poutine.condition(r.model, r.to_sites(r.mean))).get_trace()
    assert torch.isfinite(tr.log_prob_sum())
    r = load_reference("radon_contextual_effects_minnesota", dtype=torch.float32)
    assert r.data["county"].dtype == torch.long and r.data["floor"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64, "float64"])
def test_a_dtype_that_is_not_a_real_float_is_refused(dtype):
    """An integer dtype truncated the data (earnings' log incomes 10.82, 11.00 became 10,
    11) and the model ran on it without complaint."""
    with pytest.raises(TypeError, match="real floating dtype"):
        load_reference("earnings-logearn_interaction_z", dtype=dtype)


def test_the_gp_reference_in_float32_is_refused_with_the_way_out():
    """In float32 the Stan model's jitter is below resolution: the model, ``to_sites`` and
    ``extract`` raised Cholesky errors at the reference mean."""
    with pytest.raises(ValueError, match="needs float64.*jitter=1e-5"):
        load_reference("gp_pois_regr-gp_pois_regr", dtype=torch.float32)
    r = load_reference("gp_pois_regr-gp_pois_regr")
    data = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
            for k, v in r.data.items()}
    sites = {k: v.float() for k, v in r.to_sites(r.mean).items()}
    model = functools.partial(gp_pois_regr, jitter=1e-5)
    tr = poutine.trace(poutine.condition(model, sites)).get_trace(**data)
    assert tr.log_prob_sum().dtype == torch.float32 and torch.isfinite(tr.log_prob_sum())


def test_unknown_reference():
    with pytest.raises(KeyError):
        load_reference("no-such-reference")


# ------------------------------------------------------------ transformed data / recipes


def test_german_credit_standardisation():
    rows = raw("german_credit_numeric_logistic_regression", "rows_24_features_then_class")
    assert rows.shape == (1000, 25)
    assert set(np.unique(rows[:, 24])) == {1.0, 2.0}
    for name in (
        "german_credit_numeric_logistic_regression",
        "german_credit_numeric_probit_regression",
    ):
        x = ref(name).data["x"].cpu().numpy()
        y = ref(name).data["y"].cpu().numpy()
        np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-12)
        np.testing.assert_allclose(x.std(0, ddof=0), 1.0, rtol=1e-12)
        feats = rows[:, :24]
        np.testing.assert_allclose(x * feats.std(0) + feats.mean(0), feats, atol=1e-9)
        np.testing.assert_array_equal(y, rows[:, 24] == 2)  # label 1 = "bad" credit
        assert y.sum() == 300


def test_radon_data_recipe():
    r = ref("radon_contextual_effects_minnesota")
    county = r.data["county"].cpu().numpy()
    floor = r.data["floor"].cpu().numpy()
    assert r.data["J"] == 85 and set(np.unique(county)) == set(range(85))
    assert set(np.unique(floor)) == {0.0, 1.0}
    means = np.array([floor[county == j].mean() for j in range(85)])
    np.testing.assert_allclose(r.data["floor_by_county"].cpu().numpy(), means[county], atol=1e-12)
    names = list(r.raw_data["county_names"])
    assert names == sorted(names) and len(names) == 85
    # activity <= 0 was set to 0.1 before the log
    assert r.data["log_radon"].min().item() >= np.log(0.1) - 1e-12


def test_linear_designs():
    z = ref("earnings-logearn_interaction_z").data["X"].cpu().numpy()[:, 1]
    assert abs(z.mean()) < 1e-12 and abs(z.std(ddof=1) - 1) < 1e-12
    Xc = ref("diamonds-diamonds").data["Xc"].cpu().numpy()
    X = np.asarray(ref("diamonds-diamonds").raw_data["X"])
    np.testing.assert_array_equal(X[:, 0], 1.0)
    np.testing.assert_allclose(Xc.mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(Xc, X[:, 1:] - X[:, 1:].mean(0), atol=1e-12)
    a = ref("arK-arK").data
    y = raw("arK-arK", "y")
    np.testing.assert_array_equal(a["y_obs"].cpu().numpy(), y[5:])
    for k in range(1, 6):
        np.testing.assert_array_equal(a["y_lags"].cpu().numpy()[:, k - 1], y[5 - k : 200 - k])


# ------------------------------------------------------------------ extract / to_sites


@pytest.mark.parametrize("name", ALL)
def test_extract_roundtrip(name):
    r = ref(name)
    g = np.random.default_rng(0)
    flat = r.mean + 0.1 * r.sd * g.standard_normal((4, 3, r.n_params))
    sites = r.to_sites(flat)
    back = r.extract(sites)
    assert back.shape == (4, 3, r.n_params)
    np.testing.assert_allclose(back.cpu().numpy(), flat, rtol=1e-10, atol=1e-10)
    # a single draw works too, and the sites are exactly those the model samples
    single = r.to_sites(r.mean)
    tr = prune_subsample_sites(poutine.trace(poutine.condition(r.model, single)).get_trace())
    latent = {
        n
        for n, s in tr.nodes.items()
        if s["type"] == "sample" and n != "obs" and not s["infer"].get("_deterministic")
    }
    assert latent == set(single)
    assert r.extract(single).shape == (r.n_params,)


def test_extract_positions():
    r = ref("sblri-blr")
    out = r.extract({"beta": torch.arange(1.0, 6.0), "sigma": torch.tensor(7.0)})
    np.testing.assert_array_equal(out.cpu().numpy(), [1, 2, 3, 4, 5, 7])

    r = ref("diamonds-diamonds")
    out = r.extract(
        {"b": torch.arange(24.0), "Intercept": torch.tensor(-1.0), "sigma": torch.tensor(0.5)}
    )
    np.testing.assert_array_equal(out.cpu().numpy(), list(range(24)) + [-1.0, 0.5])

    r = ref("eight_schools-eight_schools_noncentered")
    tt = torch.linspace(-1, 1, 8, dtype=torch.float64)
    out = r.extract({"mu": torch.tensor(1.0), "tau": torch.tensor(2.0), "theta_trans": tt})
    np.testing.assert_allclose(out.cpu().numpy(), np.r_[1 + 2 * tt.cpu().numpy(), 1.0, 2.0])

    r = ref("gp_pois_regr-gp_pois_regr")
    x = raw("gp_pois_regr-gp_pois_regr", "x")
    rho, alpha = 5.0, 3.0
    K = alpha**2 * np.exp(-((x[:, None] - x[None, :]) ** 2) / (2 * rho**2)) + 1e-10 * np.eye(11)
    ft = np.linspace(-1, 1, 11)
    out = r.extract(
        {
            "rho": torch.tensor(rho, dtype=torch.float64),
            "alpha": torch.tensor(alpha, dtype=torch.float64),
            "f_tilde": torch.as_tensor(ft),
        }
    )
    np.testing.assert_allclose(
        out.cpu().numpy(), np.r_[rho, alpha, np.linalg.cholesky(K) @ ft], rtol=1e-10
    )

    r = ref("radon_contextual_effects_minnesota")
    out = r.extract(
        {
            "county_effect_mean": torch.tensor(1.0),
            "county_effect_scale": torch.tensor(2.0),
            "county_effect": torch.arange(85.0) + 10,
            "weight": torch.tensor([-1.0, -2.0, -3.0]),
            "log_radon_scale": torch.tensor(3.0),
        }
    )
    np.testing.assert_array_equal(out.cpu().numpy(), np.r_[1, 2, np.arange(85) + 10, -1, -2, -3, 3])
    assert r.param_names[2] == "county_effect[1]" and r.param_names[-1] == "log_radon_scale"

    with pytest.raises(KeyError):
        r.extract({"weight": torch.zeros(3)})
    with pytest.raises(ValueError):  # inconsistent batch shapes are not broadcast
        ref("sblri-blr").extract({"beta": torch.zeros(10, 1, 5), "sigma": torch.ones(10)})


@pytest.mark.parametrize(
    "name", ["eight_schools-eight_schools_noncentered", "gp_pois_regr-gp_pois_regr"]
)
def test_extract_predictive_deterministic_sites(name):
    """Reported transformed parameters recorded by the model agree with ``derive``."""
    r = ref(name)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(r.model, init_scale=0.1)
    guide()
    out = Predictive(r.model, guide=guide, num_samples=6)()
    reported = r.extract(out)  # uses the recorded theta / f
    latent_only = {k: v for k, v in out.items() if k not in ("theta", "f", "obs")}
    assert reported.shape[0] == 6 and reported.shape[-1] == r.n_params
    np.testing.assert_allclose(reported.cpu().numpy(), r.extract(latent_only).cpu().numpy(),
                               rtol=1e-12)
    pyro.clear_param_store()


# --------------------------------------------------------- log joint against scipy.stats


def _norm(x, loc, scale):
    return st.norm.logpdf(x, loc, scale).sum()


def _linear_design(name):
    """Design matrix and response rebuilt from the raw data (numpy)."""
    R = functools.partial(raw, name)
    if name.endswith("-blr"):
        return R("X"), R("y")
    if name == "earnings-logearn_interaction_z":
        h = R("height")
        z = (h - h.mean()) / np.std(h, ddof=1)
        return np.column_stack([np.ones_like(z), z, R("male"), z * R("male")]), np.log(R("earn"))
    if name == "kidiq-kidscore_momhsiq":
        return np.column_stack([np.ones(434), R("mom_hs"), R("mom_iq")]), R("kid_score")
    if name == "mesquite-logmesquite_logvash":
        d1, d2, ch = R("diam1"), R("diam2"), R("canopy_height")
        X = np.column_stack(
            [
                np.ones_like(d1),
                np.log(d1 * d2 * ch),
                np.log(d1 * d2),
                np.log(d1 / d2),
                np.log(R("total_height")),
                R("group"),
            ]
        )
        return X, np.log(R("weight"))
    if name == "nes2000-nes":
        age = R("age_discrete")
        X = np.column_stack(
            [np.ones_like(age), R("real_ideo"), R("race_adj")]
            + [age == a for a in (2, 3, 4)]
            + [R("educ1"), R("gender"), R("income")]
        ).astype(float)
        return X, R("partyid7")
    if name == "kilpisjarvi_mod-kilpisjarvi":
        return np.column_stack([np.ones(62), R("x")]), R("y")
    if name == "arK-arK":
        y = R("y")
        X = np.column_stack([np.ones(195)] + [y[5 - k : 200 - k] for k in range(1, 6)])
        return X, y[5:]
    raise KeyError(name)


def scipy_log_joint(name, p):
    """Independent log joint density at the parameter values ``p`` (``{param_name: value}``)."""
    R = functools.partial(raw, name)
    if name == "diamonds-diamonds":
        X, Y = R("X"), R("Y")
        Xc = X[:, 1:] - X[:, 1:].mean(0)
        b, b0, s = vec(p, "b", 24), p["Intercept"], p["sigma"]
        return (
            _norm(Y, b0 + Xc @ b, s)
            + _norm(b, 0, 1)
            + st.t.logpdf(b0, 3, 8, 10)
            + np.log(2)
            + st.t.logpdf(s, 3, 0, 10)
        )
    if name == "eight_schools-eight_schools_noncentered":
        theta, mu, tau = vec(p, "theta", 8), p["mu"], p["tau"]
        return (
            _norm((theta - mu) / tau, 0, 1)
            + _norm(mu, 0, 5)
            + st.halfcauchy.logpdf(tau, scale=5)
            + _norm(R("y"), theta, R("sigma"))
        )
    if name == "eight_schools":
        a, ls, se = p["avg_effect"], p["log_stddev"], vec(p, "school_effects", 8)
        return (
            _norm(a, 0, 10)
            + _norm(ls, 5, 1)
            + _norm(se, a, np.exp(ls))
            + _norm(R("y"), se, R("sigma"))
        )
    if name == "gp_pois_regr-gp_pois_regr":
        x, k = R("x"), R("k")
        rho, alpha, f = p["rho"], p["alpha"], vec(p, "f", 11)
        K = alpha**2 * np.exp(-((x[:, None] - x[None, :]) ** 2) / (2 * rho**2))
        L = np.linalg.cholesky(K + 1e-10 * np.eye(11))
        f_tilde = sla.solve_triangular(L, f, lower=True)
        return (
            st.gamma.logpdf(rho, 25, scale=1 / 4)
            + st.halfnorm.logpdf(alpha, scale=2)
            + _norm(f_tilde, 0, 1)
            + st.poisson.logpmf(k, np.exp(f)).sum()
        )
    if name.startswith("german_credit"):
        rows = R("rows_24_features_then_class")
        feats = rows[:, :24]
        x = (feats - feats.mean(0)) / feats.std(0)
        y = rows[:, 24] == 2
        w = vec(p, "w", 25)
        z = x @ w[:24] + w[24]
        if "logistic" in name:
            ll = np.where(y, sp.log_expit(z), sp.log_expit(-z)).sum()
        else:
            ll = np.where(y, sp.log_ndtr(z), sp.log_ndtr(-z)).sum()
        return ll + _norm(w, 0, 1)
    if name.startswith("radon"):
        scale_lp = (
            (lambda s: st.uniform.logpdf(s, 0, 100))
            if name.endswith("minnesota")
            else (lambda s: st.halfnorm.logpdf(s, scale=1))
        )
        county = np.asarray(ref(name).raw_data["county"]).astype(int)
        m, a, s = p["county_effect_mean"], p["county_effect_scale"], p["log_radon_scale"]
        c, w = vec(p, "county_effect", 85), vec(p, "weight", 3)
        loc = w[0] * R("log_uranium") + w[1] * R("floor") + w[2] * R("floor_by_county")
        return (
            _norm(m, 0, 1)
            + scale_lp(a)
            + _norm(c, m, a)
            + _norm(w, 0, 1)
            + scale_lp(s)
            + _norm(R("log_radon"), loc + c[county], s)
        )
    # linear regressions
    X, y = _linear_design(name)
    if name == "kilpisjarvi_mod-kilpisjarvi":
        coef = np.array([p["alpha"], p["beta"]])
        prior = _norm(p["alpha"], R("pmualpha"), R("psalpha")) + _norm(
            p["beta"], R("pmubeta"), R("psbeta")
        )
    elif name == "arK-arK":
        coef = np.r_[p["alpha"], vec(p, "beta", 5)]
        prior = _norm(coef, 0, 10) + st.halfcauchy.logpdf(p["sigma"], scale=2.5)
    else:
        coef = vec(p, "beta", X.shape[1])
        if name.endswith("-blr"):
            prior = _norm(coef, 0, 10) + st.halfnorm.logpdf(p["sigma"], scale=10)
        elif name == "kidiq-kidscore_momhsiq":
            prior = st.halfcauchy.logpdf(p["sigma"], scale=2.5)
        else:
            prior = 0.0  # improper flat priors on beta and sigma > 0
    return _norm(y, X @ coef, p["sigma"]) + prior


def pyro_log_joint(name, flat):
    r = ref(name)
    tr = poutine.trace(poutine.condition(r.model, r.to_sites(flat))).get_trace()
    return tr.log_prob_sum().item()


@pytest.mark.parametrize("name", ALL)
def test_log_joint_matches_scipy(name):
    r = ref(name)
    g = np.random.default_rng(1)
    # away from the mean the GP's f_tilde = L^-1 f is ill-conditioned: looser rtol there
    perturbed = r.mean + 0.5 * r.sd * g.standard_normal(r.n_params)
    for flat, rtol in ((r.mean, 1e-9), (perturbed, 1e-7)):
        expected = scipy_log_joint(name, named(name, flat))
        np.testing.assert_allclose(pyro_log_joint(name, flat), expected, rtol=rtol, atol=1e-7)


# ------------------------------------------------- exact posteriors of linear regressions

FLAT_SIGMA = {"earnings-logearn_interaction_z", "mesquite-logmesquite_logvash", "nes2000-nes"}
FLAT_BETA = FLAT_SIGMA | {"kidiq-kidscore_momhsiq"}


@pytest.mark.parametrize("name", sorted(FLAT_BETA))
def test_flat_prior_mean_is_least_squares(name):
    """Flat prior on beta: beta | sigma ~ N(OLS, sigma^2 (X'X)^-1), so E[beta] = OLS."""
    r = ref(name)
    X, y = _linear_design(name)
    p = X.shape[1]
    ols, rss = np.linalg.lstsq(X, y, rcond=None)[:2]
    np.testing.assert_array_less(np.abs(ols - r.mean[:p]), 4 * r.mean_se[:p])
    if name in FLAT_SIGMA:
        # sigma^2 | y ~ InvGamma((N-p-1)/2, RSS/2) and beta | y ~ multivariate t
        N = len(y)
        a, b = (N - p - 1) / 2, rss[0] / 2
        cov = rss[0] / (N - p - 3) * np.linalg.inv(X.T @ X)
        np.testing.assert_allclose(np.sqrt(np.diag(cov)), r.sd[:p], rtol=0.02)
        e_sigma = np.sqrt(b) * np.exp(sp.gammaln(a - 0.5) - sp.gammaln(a))
        sd_sigma = np.sqrt(b / (a - 1) - e_sigma**2)
        assert abs(e_sigma - r.mean[p]) < 4 * r.mean_se[p]
        np.testing.assert_allclose(sd_sigma, r.sd[p], rtol=0.02)


def _log_sigma_prior(name):
    if name.endswith("-blr"):
        return lambda s: st.halfnorm.logpdf(s, scale=10)
    if name in ("kidiq-kidscore_momhsiq", "arK-arK"):
        return lambda s: st.halfcauchy.logpdf(s, scale=2.5)
    if name == "diamonds-diamonds":
        return lambda s: np.log(2) + st.t.logpdf(s, 3, 0, 10)
    return lambda s: np.zeros_like(s)


def _coef_prior(name, p):
    """(prior mean, prior precision) of the regression coefficients (precision 0: flat)."""
    if name == "kilpisjarvi_mod-kilpisjarvi":
        R = functools.partial(raw, name)
        return (
            np.array([R("pmualpha"), R("pmubeta")]),
            np.diag([R("psalpha") ** -2, R("psbeta") ** -2]),
        )
    if name in FLAT_BETA:
        return np.zeros(p), np.zeros((p, p))
    scale = 1.0 if name == "diamonds-diamonds" else 10.0
    return np.zeros(p), np.eye(p) / scale**2


def sigma_quadrature(name, n_grid=3001):
    """Exact posterior moments of ``y ~ N(X beta, sigma)`` with a Gaussian (or flat) prior on
    beta: beta | sigma is Gaussian, sigma is integrated on a log grid. Returns (mean, sd) in
    the reference's parameter order."""
    if name == "diamonds-diamonds":
        Xraw, Y = raw(name, "X"), raw(name, "Y")
        X = Xraw[:, 1:] - Xraw[:, 1:].mean(0)
        ybar = Y.mean()
        y = Y - ybar  # 1 is orthogonal to the centred design: the intercept separates
    else:
        X, y = _linear_design(name)
    N, p = X.shape
    m0, P0 = _coef_prior(name, p)
    ols = np.linalg.lstsq(X, y, rcond=None)[0]
    s0 = np.sqrt(np.mean((y - X @ ols) ** 2))
    log_s = np.log(s0) + np.linspace(-1.5, 1.5, n_grid)
    s = np.exp(log_s)
    XtX, Xty = X.T @ X, X.T @ y
    Pn = XtX[None] / s[:, None, None] ** 2 + P0[None]
    rhs = Xty[None] / s[:, None] ** 2 + (P0 @ m0)[None]
    L = np.linalg.cholesky(Pn)
    mn = np.linalg.solve(Pn, rhs[..., None])[..., 0]
    resid = y[None] - mn @ X.T
    logml = (
        -N * log_s
        - 0.5 * (resid**2).sum(1) / s**2
        - 0.5 * np.einsum("gi,ij,gj->g", mn - m0, P0, mn - m0)
        - np.log(np.diagonal(L, axis1=1, axis2=2)).sum(1)
    )
    logw = logml + _log_sigma_prior(name)(s) + log_s
    extra_mean = extra_var = None
    if name == "diamonds-diamonds":
        # Intercept | sigma: StudentT(3, 8, 10) prior times exp(-N (ybar - b0)^2 / (2 sigma^2))
        u = np.linspace(-12, 12, 801)
        b0 = ybar + (s[:, None] / np.sqrt(N)) * u[None]
        lw0 = st.t.logpdf(b0, 3, 8, 10) - 0.5 * u[None] ** 2
        w0 = np.exp(lw0 - lw0.max(1, keepdims=True))
        logw = logw + np.log(w0.sum(1)) + lw0.max(1) + np.log(s / np.sqrt(N))
        w0 /= w0.sum(1, keepdims=True)
        extra_mean = (w0 * b0).sum(1)
        extra_var = (w0 * b0**2).sum(1) - extra_mean**2
    w = np.exp(logw - logw.max())
    w /= w.sum()
    assert w[0] < 1e-12 and w[-1] < 1e-12, "sigma grid too narrow"
    cov_n = np.linalg.inv(Pn)
    e_beta = w @ mn
    var_beta = w @ (np.diagonal(cov_n, axis1=1, axis2=2) + mn**2) - e_beta**2
    mean, var = list(e_beta), list(var_beta)
    if extra_mean is not None:
        e0 = w @ extra_mean
        mean.append(e0)
        var.append(w @ (extra_var + extra_mean**2) - e0**2)
    e_s = w @ s
    mean.append(e_s)
    var.append(w @ s**2 - e_s**2)
    return np.array(mean), np.sqrt(np.array(var))


LINEAR = sorted(n for n in ALL if EXPECTED[n][0] in ("linear", "time-series"))


@pytest.mark.parametrize("name", LINEAR)
def test_linear_exact_posterior(name):
    r = ref(name)
    mean, sd = sigma_quadrature(name)
    z = (mean - r.mean) / r.mean_se
    assert np.abs(z).max() < 5, (name, z)
    np.testing.assert_allclose(sd, r.sd, rtol=0.03)
    if r.semianalytic is not None:  # the stored independent cross-check agrees too
        np.testing.assert_allclose(r.semianalytic["mean"], mean, atol=0.01 * r.sd.min())
        np.testing.assert_allclose(r.semianalytic["sd"], sd, rtol=0.01)


# ---------------------------------------------------------------- German credit (GLMs)


def _german(name):
    rows = raw(name, "rows_24_features_then_class")
    feats = rows[:, :24]
    x = (feats - feats.mean(0)) / feats.std(0)
    return np.column_stack([x, np.ones(1000)]), (rows[:, 24] == 2).astype(float)


def _glm_loglik_derivs(name, Xa, y, W):
    """Per-observation log-likelihood and its first two derivatives in z = Xa @ w."""
    z = W @ Xa.T
    if "logistic" in name:
        ll = y * sp.log_expit(z) + (1 - y) * sp.log_expit(-z)
        p = sp.expit(z)
        return ll, y - p, -p * (1 - p)
    sgn = 2 * y - 1  # log Phi(sgn z)
    t = sgn * z
    lam = np.exp(st.norm.logpdf(t) - sp.log_ndtr(t))
    return sp.log_ndtr(t), sgn * lam, -lam * (t + lam)


@pytest.mark.parametrize(
    "name", ["german_credit_numeric_logistic_regression", "german_credit_numeric_probit_regression"]
)
def test_german_credit_newton_and_importance_sampling(name):
    r = ref(name)
    Xa, y = _german(name)
    w = np.zeros(25)
    for _ in range(30):
        _, d1, d2 = _glm_loglik_derivs(name, Xa, y, w[None])
        grad = Xa.T @ d1[0] - w
        H = (Xa * d2[0][:, None]).T @ Xa - np.eye(25)
        step = np.linalg.solve(H, grad)
        w = w - step
        if np.abs(step).max() < 1e-12:
            break
    assert np.abs(step).max() < 1e-10
    if r.check is not None and "laplace_mode" in r.check:
        np.testing.assert_allclose(w, r.check["laplace_mode"], atol=1e-8)
    # posterior mean != mode: the intercept is skewed by ~0.4 sd, the others much less
    assert np.abs((w - r.mean) / r.sd).max() < 0.5
    assert np.median(np.abs((w - r.mean) / r.sd)) < 0.15
    # self-normalised importance sampling from the Laplace approximation
    cov = np.linalg.inv(-H)
    g = np.random.default_rng(2)
    draws = g.multivariate_normal(w, cov, size=20000)
    ll = _glm_loglik_derivs(name, Xa, y, draws)[0].sum(1)
    logw = ll - 0.5 * (draws**2).sum(1) - st.multivariate_normal(w, cov).logpdf(draws)
    wt = np.exp(logw - logw.max())
    wt /= wt.sum()
    assert 1 / (wt**2).sum() > 5000
    is_mean = wt @ draws
    is_sd = np.sqrt(wt @ draws**2 - is_mean**2)
    assert np.abs((is_mean - r.mean) / r.sd).max() < 0.05
    np.testing.assert_allclose(is_sd, r.sd, rtol=0.05)


# ----------------------------------------------------- eight schools: exact by quadrature


def _eight_schools_quadrature(centered):
    """Given the group scale, (mu, theta) are jointly Gaussian; integrate the scale on a grid."""
    y, sig = raw("eight_schools", "y"), raw("eight_schools", "sigma")
    if centered:  # inference-gym: avg_effect ~ N(0, 10), log_stddev ~ N(5, 1)
        prior_sd = 10.0
        u = np.linspace(-8.0, 10.0, 8001)  # log_stddev grid
        log_prior = st.norm.logpdf(u, 5, 1)
    else:  # posteriordb: mu ~ N(0, 5), tau ~ HalfCauchy(5); grid in log tau
        prior_sd = 5.0
        u = np.linspace(-14.0, 8.0, 8001)
        log_prior = st.halfcauchy.logpdf(np.exp(u), scale=5) + u
    tau = np.exp(u)
    v = sig[None] ** 2 + tau[:, None] ** 2  # y_j | mu, tau ~ N(mu, sigma_j^2 + tau^2)
    prec_mu = 1 / prior_sd**2 + (1 / v).sum(1)
    m_mu = (y[None] / v).sum(1) / prec_mu
    # log p(y | tau) up to a constant: Gaussian in mu integrated out
    logml = (
        -0.5 * np.log(v).sum(1)
        - 0.5 * (y[None] ** 2 / v).sum(1)
        + 0.5 * prec_mu * m_mu**2
        - 0.5 * np.log(prec_mu)
    )
    logw = logml + log_prior
    w = np.exp(logw - logw.max())
    w /= w.sum()
    assert w[0] < 1e-8 and w[-1] < 1e-8
    var_mu = 1 / prec_mu
    # theta_j | mu, tau, y ~ N(c_j (y_j / s_j^2 + mu / tau^2), c_j), c_j = 1 / (1/s_j^2 + 1/tau^2)
    c = 1 / (1 / sig[None] ** 2 + 1 / tau[:, None] ** 2)
    k = c / tau[:, None] ** 2
    m_th = c * y[None] / sig[None] ** 2 + k * m_mu[:, None]
    v_th = c + k**2 * var_mu[:, None]
    e_th = w @ m_th
    sd_th = np.sqrt(w @ (v_th + m_th**2) - e_th**2)
    e_mu = w @ m_mu
    sd_mu = np.sqrt(w @ (var_mu + m_mu**2) - e_mu**2)
    scale = u if centered else tau
    e_sc = w @ scale
    sd_sc = np.sqrt(w @ scale**2 - e_sc**2)
    if centered:
        return np.r_[e_mu, e_sc, e_th], np.r_[sd_mu, sd_sc, sd_th]
    return np.r_[e_th, e_mu, e_sc], np.r_[sd_th, sd_mu, sd_sc]


@pytest.mark.parametrize("name", ["eight_schools", "eight_schools-eight_schools_noncentered"])
def test_eight_schools_exact_posterior(name):
    r = ref(name)
    mean, sd = _eight_schools_quadrature(centered=(name == "eight_schools"))
    z = (mean - r.mean) / r.mean_se
    assert np.abs(z).max() < 5, z
    np.testing.assert_allclose(sd, r.sd, rtol=0.03)


# ------------------------------------------------------------- radon: 2-D quadrature


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["radon_contextual_effects_minnesota", "radon_contextual_effects_minnesota_halfnormal"]
)
def test_radon_exact_posterior(name):
    """Given the two scales, (county_effect_mean, county_effect, weight) is jointly Gaussian."""
    r = ref(name)
    R = functools.partial(raw, name)
    county = np.asarray(r.raw_data["county"]).astype(int)
    n, J = len(county), 85
    # coefficients: [m, c_1..c_J, w_1..w_3]; m enters only through the prior
    Z = np.zeros((n, 1 + J + 3))
    Z[np.arange(n), 1 + county] = 1.0
    Z[:, J + 1 :] = np.column_stack([R("log_uranium"), R("floor"), R("floor_by_county")])
    y = R("log_radon")
    ZtZ, Zty = Z.T @ Z, Z.T @ y
    if name.endswith("halfnormal"):

        def log_prior(s):
            return st.halfnorm.logpdf(s, scale=1)
    else:

        def log_prior(s):
            return st.uniform.logpdf(s, 0, 100)

    la = np.linspace(np.log(1e-3), np.log(1.0), 140)
    ls = np.log(0.76) + np.linspace(-0.2, 0.2, 81)
    a = np.exp(la)
    P0 = np.zeros((len(a), 1 + J + 3, 1 + J + 3))
    P0[:, 0, 0] = 1 + J / a**2
    P0[:, 0, 1 : J + 1] = P0[:, 1 : J + 1, 0] = -1 / a[:, None] ** 2
    idx = np.arange(1, J + 1)
    P0[:, idx, idx] = 1 / a[:, None] ** 2
    P0[:, J + 1 :, J + 1 :] = np.eye(3)
    logdet_P0 = -2 * J * la  # det of the (m, c) block is a^(-2J)
    logw, means, second = [], [], []
    for s in np.exp(ls):
        Pn = P0 + ZtZ[None] / s**2
        L = np.linalg.cholesky(Pn)
        mn = np.linalg.solve(Pn, np.broadcast_to(Zty / s**2, (len(a), Zty.size))[..., None])
        mn = mn[..., 0]
        quad = ((y[None] - mn @ Z.T) ** 2).sum(1) / s**2 + np.einsum("gi,gij,gj->g", mn, P0, mn)
        lml = (
            -n * np.log(s)
            - 0.5 * quad
            + 0.5 * logdet_P0
            - np.log(np.diagonal(L, axis1=1, axis2=2)).sum(1)
        )
        logw.append(lml + log_prior(a) + la + log_prior(s) + np.log(s))
        means.append(mn)
        second.append(np.diagonal(np.linalg.inv(Pn), axis1=1, axis2=2) + mn**2)
    logw = np.array(logw)  # [s, a]
    w = np.exp(logw - logw.max())
    w /= w.sum()
    assert w[[0, -1], :].max() < 1e-8 and w[:, -1].max() < 1e-8
    means, second = np.array(means), np.array(second)
    e = np.einsum("sa,sai->i", w, means)
    sd = np.sqrt(np.einsum("sa,sai->i", w, second) - e**2)
    s_grid, a_grid = np.exp(ls)[:, None] + 0 * a, a[None] + 0 * ls[:, None]
    e_a, e_s = (w * a_grid).sum(), (w * s_grid).sum()
    sd_a = np.sqrt((w * a_grid**2).sum() - e_a**2)
    sd_s = np.sqrt((w * s_grid**2).sum() - e_s**2)
    # reference order: mean, scale, county_effect[1..85], weight[1..3], log_radon_scale
    mean = np.r_[e[0], e_a, e[1 : J + 1], e[J + 1 :], e_s]
    sdv = np.r_[sd[0], sd_a, sd[1 : J + 1], sd[J + 1 :], sd_s]
    z = (mean - r.mean) / r.mean_se
    assert np.abs(z).max() < 5, z
    np.testing.assert_allclose(sdv, r.sd, rtol=0.04)


# --------------------------------------------------------- GP Poisson: importance sampling


def test_gp_pois_regr_importance_sampling():
    """Self-normalised IS in (log rho, log alpha, f_tilde): a multivariate-t proposal for the
    two hyperparameters (moments from the reference, delta method) times, given them, the
    Laplace approximation of f_tilde found by damped Newton. The proposal density is exact,
    so the IS estimates are consistent whatever its quality."""
    name = "gp_pois_regr-gp_pois_regr"
    r = ref(name)
    x, k = raw(name, "x"), raw(name, "k")
    n, eye = 20000, np.eye(11)
    g = np.random.default_rng(3)
    jac = np.diag(1 / r.mean[:2])
    prop = st.multivariate_t(np.log(r.mean[:2]), 1.5 * jac @ r.cov[:2, :2] @ jac, df=5)
    v = prop.rvs(size=n, random_state=g)
    rho, alpha = np.exp(v[:, 0]), np.exp(v[:, 1])
    d2 = (x[:, None] - x[None, :]) ** 2
    K = alpha[:, None, None] ** 2 * np.exp(-d2[None] / (2 * rho[:, None, None] ** 2))
    L = np.linalg.cholesky(K + 1e-10 * eye)

    def f_of(ft):
        return (L @ ft[..., None])[..., 0]

    def objective(ft):  # log p(f_tilde | rho, alpha, k) + const
        f = f_of(ft)
        return -0.5 * (ft**2).sum(1) + (k * f - np.exp(f)).sum(1)

    def hessian(ft):  # minus the Hessian of the objective
        return eye + np.einsum("nji,nj,njk->nik", L, np.exp(f_of(ft)), L)

    ft = np.zeros((n, 11))
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(100):
            grad = -ft + np.einsum("nji,nj->ni", L, k - np.exp(f_of(ft)))
            step = np.linalg.solve(hessian(ft), grad[..., None])[..., 0]
            t, o0 = np.ones(n), objective(ft)
            for _ in range(40):  # backtracking
                bad = ~(objective(ft + t[:, None] * step) >= o0 - 1e-9)
                if not bad.any():
                    break
                t[bad] *= 0.5
            ft = ft + t[:, None] * step
            if np.abs(t[:, None] * step).max() < 1e-9:
                break
    C = np.linalg.cholesky(hessian(ft))
    eps = g.standard_normal((n, 11))
    u = ft + np.linalg.solve(np.swapaxes(C, 1, 2), eps[..., None])[..., 0]
    log_q = (
        prop.logpdf(v)
        - 0.5 * (eps**2).sum(1)
        + np.log(np.diagonal(C, axis1=1, axis2=2)).sum(1)
        - 5.5 * np.log(2 * np.pi)
    )
    f = f_of(u)
    log_p = (
        st.gamma.logpdf(rho, 25, scale=1 / 4)
        + st.halfnorm.logpdf(alpha, scale=2)
        + v[:, 0]
        + v[:, 1]
        + st.norm.logpdf(u).sum(1)
        + st.poisson.logpmf(k[None], np.exp(f)).sum(1)
    )
    wt = np.exp(log_p - log_q - (log_p - log_q).max())
    wt /= wt.sum()
    assert 1 / (wt**2).sum() > 5000
    draws = np.column_stack([rho, alpha, f])
    m = wt @ draws
    sdv = np.sqrt(wt @ draws**2 - m**2)
    assert np.abs((m - r.mean) / r.sd).max() < 0.06
    np.testing.assert_allclose(sdv, r.sd, rtol=0.04)


# --------------------------------------------------------------- AutoGuide smoke test


@pytest.mark.parametrize("name", ALL)
def test_autoguide_and_predictive_run(name):
    r = ref(name)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(r.model, init_scale=0.01)  # default init works with flat priors
    svi = SVI(r.model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    for _ in range(2):
        assert np.isfinite(svi.step())
    with torch.no_grad():
        flat = r.extract(guide())
    assert flat.shape == (r.n_params,) and torch.isfinite(flat).all()
    assert flat.dtype == torch.float64
    draws = Predictive(r.model, guide=guide, num_samples=3)()
    flat = r.extract(draws)
    assert flat.shape[0] == 3 and flat.shape[-1] == r.n_params
    assert torch.isfinite(flat).all()
    pyro.clear_param_store()


def test_flat_prior():
    from pyro.distributions import ImproperUniform, constraints

    from pyro_natgrad.reference_models import FlatPrior

    d = FlatPrior(constraints.positive, (), (3,), dtype=torch.float64)
    assert isinstance(d, ImproperUniform)
    v = torch.tensor([[0.5, 2.0, 7.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    lp = d.log_prob(v)
    assert lp.shape == (2,) and lp.dtype == torch.float64 and (lp == 0).all()
    s = d.expand([4]).sample((2,))
    assert s.shape == (2, 4, 3) and s.dtype == torch.float64 and (s == 1).all()
    assert (FlatPrior(constraints.real, (), (), dtype=torch.float32).sample() == 0).all()


def test_packaged_files_are_plain_json():
    for name in ALL:
        with open(DATA_DIR / (name + ".json")) as f:
            meta = json.load(f)
        assert meta["name"] == name
        assert meta["param_names"] == ref(name).param_names
