"""Table of Fisher-information test cases, one per family / parameterisation / regime.

Every case knows how to BUILD ITS DISTRIBUTION FROM COORDINATE TENSORS with code written
here (not by the library), so that tests can differentiate ``log_prob`` or a KL divergence
with respect to exactly the coordinates the library promises to use.

Coordinate convention assumed (from the API contract):

* coordinates are the continuous constructor arguments, in constructor order, flattened
  param-major (all entries of the first parameter, then the second, ...), C order;
* matrix parameters (scale_tril, covariance_matrix, precision_matrix) are represented by
  their lower-triangle entries in ``torch.tril_indices(d, d)`` order; for the symmetric
  ones a coordinate t_ij (i > j) sets BOTH M_ij and M_ji;
* Independent / .to_event: the reinterpreted dims belong to the coordinate (param-major).

A case's parameter dict maps name -> tensor of shape ``batch_shape + coord_shape`` where
``coord_shape`` is the event part of the coordinate (``()`` for a scalar parameter,
``(d(d+1)/2,)`` for a matrix parameter, ``(d, r)`` for a low-rank factor, ...). The dict may
also hold fixed, non-coordinate values (e.g. StudentT ``df`` when df is held fixed, Binomial
``total_count``); only ``case.names`` are coordinates.

Natural-parameter conventions assumed for coords="natural" (see ``ExpFamily`` below), with
sufficient statistics T and log-partition A:

* Normal / LogNormal   eta = (mu/sigma^2, -1/(2 sigma^2)),  T = (x, x^2) (log x for LogNormal)
* Gamma                eta = (alpha - 1, -beta),            T = (log x, x)
* InverseGamma         eta = (-alpha - 1, -beta),           T = (log x, 1/x)
* Beta                 eta = (a - 1, b - 1),                T = (log x, log(1-x))
* Dirichlet            eta = alpha - 1,                     T = log x
* Exponential          eta = -lambda,                       T = x
* HalfNormal           eta = -1/(2 sigma^2),                T = x^2
* Poisson              eta = log lambda,                    T = k
* Bernoulli/Binomial   eta = logit p,                       T = k
* Geometric            eta = log(1 - p),                    T = k  (number of failures)
* Categorical          eta_i = log(p_i / p_K), i < K (minimal, K-1 coordinates), T = one-hot[:K-1]
  (OneHotCategorical the same)
* Multinomial          same eta as Categorical,             T = counts[:K-1]
* MultivariateNormal   eta = (Lambda mu, -Lambda/2) with the matrix part given by its tril
                       entries, coordinate n_ij setting both symmetric entries.
* Independent          natural parameters of the base, flattened param-major like above.

Only affine SHIFTS of eta (e.g. alpha instead of alpha - 1) leave the Hessian of A unchanged;
a different SCALING (e.g. counting an off-diagonal MVN entry once instead of twice) does not.
"""

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import pyro.distributions as dist
import torch
import torch.distributions as tdist
from torch.distributions import transform_to
from torch.distributions.transforms import (
    AffineTransform,
    ExpTransform,
    PowerTransform,
    SigmoidTransform,
    SoftplusTransform,
)
from tests.seeding import generator

MATRIX_PARAMS = ("scale_tril", "covariance_matrix", "precision_matrix")


# ----------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------
def _prod(shape):
    out = 1
    for s in shape:
        out *= int(s)
    return out


def tril_basis(d, symmetric, dtype):
    """(m, d, d) basis: coordinate k sets entry (i_k, j_k) (and (j_k, i_k) if symmetric)."""
    rows, cols = torch.tril_indices(d, d)
    m = rows.numel()
    basis = torch.zeros(m, d, d, dtype=dtype)
    idx = torch.arange(m)
    basis[idx, rows, cols] = 1.0
    if symmetric:
        basis[idx, cols, rows] = 1.0
    return basis


def tril_size_to_dim(m):
    d = int(round((math.sqrt(8 * m + 1) - 1) / 2))
    assert d * (d + 1) // 2 == m, m
    return d


def vec_to_mat(t, symmetric):
    """Matrix from tril coordinates (any leading dims); differentiable."""
    d = tril_size_to_dim(t.shape[-1])
    return torch.einsum("...k,kij->...ij", t, tril_basis(d, symmetric, t.dtype))


def mat_to_vec(m):
    d = m.shape[-1]
    rows, cols = torch.tril_indices(d, d)
    return m[..., rows, cols]


def flatten_dict(tensors, names, shapes):
    """Concatenate ``tensors[n]`` (shape lead + shapes[n]) param-major -> lead + (k,)."""
    parts = []
    for n in names:
        t = tensors[n]
        ev = len(shapes[n])
        lead = t.shape[: t.dim() - ev]
        parts.append(t.reshape(lead + (-1,)))
    return torch.cat(parts, dim=-1)


def unflatten_dict(flat, names, shapes):
    lead = flat.shape[:-1]
    out, i = {}, 0
    for n in names:
        size = _prod(shapes[n])
        out[n] = flat[..., i : i + size].reshape(lead + tuple(shapes[n]))
        i += size
    assert i == flat.shape[-1], (i, flat.shape)
    return out


def _unif(g, shape, lo, hi, dtype):
    return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=dtype)


def _logunif(g, shape, lo, hi, dtype):
    return torch.exp(_unif(g, shape, math.log(lo), math.log(hi), dtype))


def _const(values, shape, dtype):
    t = torch.tensor(values, dtype=dtype)
    n = _prod(shape)
    if t.numel() < n:  # cycle through the listed values
        t = t.repeat(n // t.numel() + 1)
    return t[:n].reshape(shape)


def base_distribution(d):
    while isinstance(d, tdist.Independent):
        d = d.base_dist
    return d


# ----------------------------------------------------------------------------------------
# case objects
# ----------------------------------------------------------------------------------------
@dataclass
class ExpFamily:
    """Natural parameterisation written by hand for the tests.

    ``eta(p)`` maps the coordinate dict to a dict of natural parameters (shape
    lead + shapes[name]); ``log_partition(e, p)`` returns A per element (``p`` only supplies
    fixed values such as a Binomial total_count); the case sums over every dim after the
    batch dims.
    """

    names: tuple
    shapes: dict
    eta: Callable
    log_partition: Callable


@dataclass
class Case:
    id: str
    family: str
    build: Callable  # dict of coordinate tensors (+ fixed values) -> Distribution
    names: tuple
    coord_shapes: dict
    batch_shape: tuple
    gen: Callable  # (torch.Generator, dtype) -> dict
    params_arg: Optional[tuple] = None  # what to pass as fisher_information(params=...)
    kl: bool = False  # torch has a registered analytic KL for the family
    ef: Optional[ExpFamily] = None
    singular: bool = False  # F is singular by construction
    mc: bool = True  # Monte Carlo estimates are trustworthy for this regime
    mc_samples: int = 20000
    step: Optional[Callable] = None  # p -> dict name -> natural step scale (coord shapes)
    coord_dict: Optional[dict] = None  # an example {param: Transform} coordinate system
    support: Optional[Callable] = None  # p -> (values, mask) enumerating a discrete support
    # log p is twice differentiable in the coordinates (False for Laplace: |x - loc|), so
    # that -E[Hessian] and autograd Hessians of the KL are valid references
    smooth: bool = True
    # an equivalent distribution to feed torch's KL when the family's own KL formula is
    # numerically poor (LowRankMVN: cancellations between O(1/cov_diag) trace terms)
    kl_build: Optional[Callable] = None
    # torch's KL is accurate enough for the 1/2 D^T F D expansion down to eps = 1e-3
    kl_expansion: bool = True

    def __repr__(self):
        return f"Case({self.id})"

    # -- parameters ----------------------------------------------------------------------
    def params(self, dtype=torch.float64):
        g = generator(zlib.crc32(self.id.encode()))
        p = self.gen(g, dtype)
        for n in self.names:
            assert p[n].shape == torch.Size(self.batch_shape) + torch.Size(self.coord_shapes[n]), (
                self.id,
                n,
                p[n].shape,
            )
        return p

    def make(self, p):
        return self.build(p)

    def make_for_kl(self, p):
        return (self.kl_build or self.build)(p)

    @property
    def k(self):
        return sum(_prod(self.coord_shapes[n]) for n in self.names)

    def flatten(self, tensors):
        return flatten_dict(tensors, self.names, self.coord_shapes)

    def unflatten(self, flat):
        return unflatten_dict(flat, self.names, self.coord_shapes)

    def with_coords(self, p, flat):
        """Copy of ``p`` with the coordinates replaced by ``flat`` (lead + (k,))."""
        q = dict(p)
        q.update(self.unflatten(flat))
        return q

    # -- unconstrained coordinates ---------------------------------------------------------
    def constraint(self, p, name):
        return base_distribution(self.make(p)).arg_constraints[name]

    def uncon_transform(self, p, name):
        # The issue defines "unconstrained" by transform_to, as pyro.param does: for a
        # simplex that is the softmax, with K coordinates (one of them redundant).
        return transform_to(self.constraint(p, name))

    def uncon_shapes(self, p):
        shapes = {}
        for n in self.names:
            shapes[n] = tuple(self.coord_shapes[n])
        return shapes

    def to_unconstrained(self, p):
        u = {}
        for n in self.names:
            t = self.uncon_transform(p, n)
            if n in MATRIX_PARAMS:
                m = vec_to_mat(p[n], symmetric=(n != "scale_tril"))
                u[n] = mat_to_vec(t.inv(m))
            else:
                u[n] = t.inv(p[n])
        return u

    def from_unconstrained(self, p, u):
        """Coordinates (dict) from unconstrained coordinates (dict); differentiable."""
        out = {}
        for n in self.names:
            t = self.uncon_transform(p, n)
            if n in MATRIX_PARAMS:
                m = vec_to_mat(u[n], symmetric=False)  # unconstrained matrix: lower part only
                out[n] = mat_to_vec(t(m))
            else:
                out[n] = t(u[n])
        return out

    # -- natural parameters ----------------------------------------------------------------
    def natural_flat(self, p):
        e = self.ef.eta(p)
        return flatten_dict(e, self.ef.names, self.ef.shapes)

    def log_partition_flat(self, eta_flat, p):
        """A(eta) summed over everything but the batch dims; ``p`` supplies fixed values."""
        e = unflatten_dict(eta_flat, self.ef.names, self.ef.shapes)
        a = self.ef.log_partition(e, p)
        nb = eta_flat.dim() - 1
        return a.reshape(a.shape[:nb] + (-1,)).sum(-1)


# ----------------------------------------------------------------------------------------
# exponential-family definitions (written for the tests)
# ----------------------------------------------------------------------------------------
def _ef_normal(shape):
    def eta(p):
        s2 = p["scale"] ** 2
        return {"eta1": p["loc"] / s2, "eta2": -0.5 / s2}

    def a(e, p=None):
        return -(e["eta1"] ** 2) / (4 * e["eta2"]) - 0.5 * torch.log(-2 * e["eta2"])

    return ExpFamily(("eta1", "eta2"), {"eta1": shape, "eta2": shape}, eta, a)


def _ef_gamma(shape):
    def eta(p):
        return {"eta1": p["concentration"] - 1, "eta2": -p["rate"]}

    def a(e, p=None):
        alpha = e["eta1"] + 1
        return torch.lgamma(alpha) - alpha * torch.log(-e["eta2"])

    return ExpFamily(("eta1", "eta2"), {"eta1": shape, "eta2": shape}, eta, a)


def _ef_inverse_gamma(shape):
    def eta(p):
        return {"eta1": -p["concentration"] - 1, "eta2": -p["rate"]}

    def a(e, p=None):
        alpha = -e["eta1"] - 1
        return torch.lgamma(alpha) - alpha * torch.log(-e["eta2"])

    return ExpFamily(("eta1", "eta2"), {"eta1": shape, "eta2": shape}, eta, a)


def _ef_beta(shape):
    def eta(p):
        return {"eta1": p["concentration1"] - 1, "eta2": p["concentration0"] - 1}

    def a(e, p=None):
        x, y = e["eta1"] + 1, e["eta2"] + 1
        return torch.lgamma(x) + torch.lgamma(y) - torch.lgamma(x + y)

    return ExpFamily(("eta1", "eta2"), {"eta1": shape, "eta2": shape}, eta, a)


def _ef_dirichlet(shape):
    def eta(p):
        return {"eta": p["concentration"] - 1}

    def a(e, p=None):
        alpha = e["eta"] + 1
        return torch.lgamma(alpha).sum(-1) - torch.lgamma(alpha.sum(-1))

    return ExpFamily(("eta",), {"eta": shape}, eta, a)


def _ef_exponential(shape):
    return ExpFamily(
        ("eta",),
        {"eta": shape},
        lambda p: {"eta": -p["rate"]},
        lambda e, p=None: -torch.log(-e["eta"]),
    )


def _ef_half_normal(shape):
    return ExpFamily(
        ("eta",),
        {"eta": shape},
        lambda p: {"eta": -0.5 / p["scale"] ** 2},
        lambda e, p=None: -0.5 * torch.log(-2 * e["eta"]),
    )


def _ef_poisson(shape):
    return ExpFamily(
        ("eta",),
        {"eta": shape},
        lambda p: {"eta": torch.log(p["rate"])},
        lambda e, p=None: torch.exp(e["eta"]),
    )


def _ef_logit(shape, which, total_count=False):
    def eta(p):
        if which == "probs":
            return {"eta": torch.log(p["probs"]) - torch.log1p(-p["probs"])}
        return {"eta": p["logits"]}

    def a(e, p=None):
        out = torch.nn.functional.softplus(e["eta"])
        if total_count:  # Binomial: A = n softplus(eta)
            n = p["total_count"]
            out = n.reshape(n.shape + (1,) * (out.dim() - n.dim())) * out
        return out

    return ExpFamily(("eta",), {"eta": shape}, eta, a)


def _ef_geometric(shape, which):
    def eta(p):
        if which == "probs":
            return {"eta": torch.log1p(-p["probs"])}
        return {"eta": -torch.nn.functional.softplus(p["logits"])}

    return ExpFamily(
        ("eta",), {"eta": shape}, eta, lambda e, p=None: -torch.log(-torch.expm1(e["eta"]))
    )


def _ef_categorical(shape, which):
    kk = shape[-1]

    def eta(p):
        if which == "probs":
            lp = torch.log(p["probs"])
        else:
            lp = p["logits"]
        return {"eta": lp[..., :-1] - lp[..., -1:]}

    def a(e, p=None):
        z = torch.zeros_like(e["eta"][..., :1])
        return torch.logsumexp(torch.cat([e["eta"], z], dim=-1), dim=-1)

    return ExpFamily(("eta",), {"eta": shape[:-1] + (kk - 1,)}, eta, a)


def _precision_from(p):
    if "precision_matrix" in p:
        return vec_to_mat(p["precision_matrix"], symmetric=True)
    if "covariance_matrix" in p:
        return torch.linalg.inv(vec_to_mat(p["covariance_matrix"], symmetric=True))
    lower = vec_to_mat(p["scale_tril"], symmetric=False)
    return torch.cholesky_inverse(lower)


def _covariance_from(p):
    if "covariance_matrix" in p:
        return vec_to_mat(p["covariance_matrix"], symmetric=True)
    if "precision_matrix" in p:
        return torch.linalg.inv(vec_to_mat(p["precision_matrix"], symmetric=True))
    lower = vec_to_mat(p["scale_tril"], symmetric=False)
    return lower @ lower.transpose(-1, -2)


def _ef_mvn(d):
    def eta(p):
        lam = _precision_from(p)
        h = (lam @ p["loc"].unsqueeze(-1)).squeeze(-1)
        return {"h": h, "N": mat_to_vec(-0.5 * lam)}

    def a(e, p=None):
        n = vec_to_mat(e["N"], symmetric=True)
        h = e["h"].unsqueeze(-1)
        quad = (h.transpose(-1, -2) @ torch.linalg.solve(n, h)).squeeze(-1).squeeze(-1)
        return -0.25 * quad - 0.5 * torch.logdet(-2 * n)

    return ExpFamily(("h", "N"), {"h": (d,), "N": (d * (d + 1) // 2,)}, eta, a)


# ----------------------------------------------------------------------------------------
# scalar-parameter families: a spec + parameter regimes, turned into cases below
# ----------------------------------------------------------------------------------------
@dataclass
class Spec:
    family: str
    ctor: Callable  # p -> distribution with elementwise (scalar) parameters
    names: tuple
    regimes: dict  # label -> (g, dtype, shape) -> dict
    kl: bool
    ef: Optional[Callable] = None  # shape -> ExpFamily
    step: Optional[Callable] = None
    no_mc: tuple = ()  # regimes in which Monte Carlo is not trustworthy
    mc_samples: dict = field(default_factory=dict)
    params_arg: Optional[tuple] = None
    coord_dict: Optional[dict] = None
    support: Optional[Callable] = None
    smooth: bool = True
    no_kl_expansion: tuple = ()


def _loc_scale_regimes(extreme_loc=1e3, scale_range=(1e-4, 1e4)):
    def rand(g, dt, s):
        return {"loc": _unif(g, s, -3, 3, dt), "scale": _logunif(g, s, 0.3, 3.0, dt)}

    def extreme(g, dt, s):
        n = _prod(s)
        lo, hi = math.log10(scale_range[0]), math.log10(scale_range[1])
        scale = torch.logspace(lo, hi, n, dtype=dt).reshape(s)
        return {"loc": _unif(g, s, -extreme_loc, extreme_loc, dt), "scale": scale}

    return {"rand": rand, "extreme": extreme}


def _positive_regimes(names, rand_range, extreme_values):
    def rand(g, dt, s):
        return {n: _logunif(g, s, *rand_range[n], dt) for n in names}

    def make_extreme(vals):
        def extreme(g, dt, s):
            return {n: _const(vals[n], s, dt) for n in names}

        return extreme

    out = {"rand": rand}
    for label, vals in extreme_values.items():
        out[label] = make_extreme(vals)
    return out


def _step_loc_scale(p):
    return {"loc": p["scale"], "scale": p["scale"]}


def _step_identity(*names):
    return lambda p: {n: p[n].abs() for n in names}


def _step_unit(name):
    return lambda p: {name: torch.minimum(p[name], 1 - p[name])}


def _step_ones(name):
    return lambda p: {name: torch.ones_like(p[name])}


def _support_count(max_fn):
    """Values 0..K for a count family; K from max_fn(p) (an int)."""

    def support(p, d):
        kmax = max_fn(p)
        vals = torch.arange(kmax + 1, dtype=next(iter(p.values())).dtype)
        shape = (kmax + 1,) + tuple(d.batch_shape) + tuple(d.event_shape)
        vals = vals.reshape((-1,) + (1,) * (len(shape) - 1)).expand(shape)
        return vals, torch.ones(shape[: 1 + len(d.batch_shape)], dtype=torch.bool)

    return support


def _support_binomial(p, d):
    n = p["total_count"]
    kmax = int(n.max())
    vals = torch.arange(kmax + 1, dtype=n.dtype).reshape((-1,) + (1,) * n.dim())
    mask = vals <= n
    vals = torch.minimum(vals, n)  # clamp into the support; masked out anyway
    return vals.expand((kmax + 1,) + n.shape), mask.expand((kmax + 1,) + n.shape)


def _support_enumerate(p, d):
    vals = d.enumerate_support(expand=True)
    return vals, torch.ones(vals.shape[: 1 + len(d.batch_shape)], dtype=torch.bool)


def _support_multinomial(total, kk):
    def support(p, d):
        rows = []

        def rec(prefix, left, slots):
            if slots == 1:
                rows.append(prefix + [left])
                return
            for i in range(left + 1):
                rec(prefix + [i], left - i, slots - 1)

        rec([], total, kk)
        dtype = next(iter(p.values())).dtype
        vals = torch.tensor(rows, dtype=dtype)  # (S, K)
        shape = (vals.shape[0],) + tuple(d.batch_shape) + (kk,)
        vals = vals.reshape((vals.shape[0],) + (1,) * len(d.batch_shape) + (kk,)).expand(shape)
        return vals, torch.ones(shape[:-1], dtype=torch.bool)

    return support


def _poisson_kmax(p):
    lam = float(p["rate"].max())
    return int(lam + 40 * math.sqrt(lam) + 60)


def _geometric_kmax(p):
    if "probs" in p:
        pmin = float(p["probs"].min())
    else:
        pmin = float(torch.sigmoid(p["logits"]).min())
    return int(math.ceil(-80.0 / math.log1p(-pmin))) + 10


SPECS = [
    Spec(
        "Normal",
        lambda p: dist.Normal(p["loc"], p["scale"]),
        ("loc", "scale"),
        _loc_scale_regimes(),
        kl=True,
        ef=_ef_normal,
        step=_step_loc_scale,
        coord_dict={"loc": AffineTransform(1.0, 3.0), "scale": SoftplusTransform()},
    ),
    Spec(
        "LogNormal",
        lambda p: dist.LogNormal(p["loc"], p["scale"]),
        ("loc", "scale"),
        # exp(loc + scale * z) must stay finite in float64 for Monte Carlo
        _loc_scale_regimes(extreme_loc=30.0, scale_range=(1e-4, 40.0)),
        kl=True,
        ef=_ef_normal,
        step=_step_loc_scale,
        coord_dict={"scale": SoftplusTransform()},
    ),
    Spec(
        "Gamma",
        lambda p: dist.Gamma(p["concentration"], p["rate"]),
        ("concentration", "rate"),
        _positive_regimes(
            ("concentration", "rate"),
            {"concentration": (0.5, 5.0), "rate": (0.2, 5.0)},
            {
                "extreme": {
                    "concentration": [0.05, 200.0, 1.0, 0.05, 200.0, 3.0],
                    "rate": [1e-4, 1e4, 1e4, 1e4, 1e-4, 1.0],
                }
            },
        ),
        kl=True,
        ef=_ef_gamma,
        step=_step_identity("concentration", "rate"),
        coord_dict={"rate": ExpTransform()},
    ),
    Spec(
        "InverseGamma",
        lambda p: dist.InverseGamma(p["concentration"], p["rate"]),
        ("concentration", "rate"),
        _positive_regimes(
            ("concentration", "rate"),
            {"concentration": (0.5, 5.0), "rate": (0.2, 5.0)},
            {
                "extreme": {
                    "concentration": [0.05, 200.0, 1.0, 0.05, 200.0, 3.0],
                    "rate": [1e-3, 1e3, 1e3, 1e3, 1e-3, 1.0],
                }
            },
        ),
        kl=True,
        ef=_ef_inverse_gamma,
        step=_step_identity("concentration", "rate"),
        coord_dict={"concentration": SoftplusTransform()},
    ),
    Spec(
        "Beta",
        lambda p: dist.Beta(p["concentration1"], p["concentration0"]),
        ("concentration1", "concentration0"),
        _positive_regimes(
            ("concentration1", "concentration0"),
            {"concentration1": (0.5, 5.0), "concentration0": (0.5, 5.0)},
            {
                # concentration0 >= 0.5 keeps samples away from 1 - 1e-16 (MC-safe)
                "extreme": {
                    "concentration1": [0.05, 200.0, 0.05, 0.5, 1.0, 50.0],
                    "concentration0": [3.0, 0.5, 200.0, 200.0, 0.5, 1.0],
                },
                # both concentrations tiny: samples pile up at 1 - eps, MC is biased
                "tiny": {
                    "concentration1": [0.05, 0.05, 200.0, 1e3, 0.05, 0.2],
                    "concentration0": [0.05, 200.0, 0.05, 1e3, 1e-2, 0.05],
                },
            },
        ),
        kl=True,
        ef=_ef_beta,
        step=_step_identity("concentration1", "concentration0"),
        no_mc=("tiny",),
        coord_dict={"concentration1": SoftplusTransform()},
    ),
    Spec(
        "Exponential",
        lambda p: dist.Exponential(p["rate"]),
        ("rate",),
        _positive_regimes(
            ("rate",), {"rate": (0.2, 5.0)}, {"extreme": {"rate": [1e-4, 1e4, 1.0, 1e-2, 1e2, 3.0]}}
        ),
        kl=True,
        ef=_ef_exponential,
        step=_step_identity("rate"),
        coord_dict={"rate": SoftplusTransform()},
    ),
    Spec(
        "HalfNormal",
        lambda p: dist.HalfNormal(p["scale"]),
        ("scale",),
        _positive_regimes(
            ("scale",),
            {"scale": (0.2, 5.0)},
            {"extreme": {"scale": [1e-4, 1e4, 1.0, 1e-2, 1e2, 3.0]}},
        ),
        kl=True,
        ef=_ef_half_normal,
        step=_step_identity("scale"),
    ),
    Spec(
        "Laplace",
        lambda p: dist.Laplace(p["loc"], p["scale"]),
        ("loc", "scale"),
        _loc_scale_regimes(),
        kl=True,
        step=_step_loc_scale,
        coord_dict={"scale": ExpTransform()},
        smooth=False,
    ),
    Spec(
        "StudentT",
        lambda p: dist.StudentT(p["df"], p["loc"], p["scale"]),
        ("df", "loc", "scale"),
        {
            "rand": lambda g, dt, s: {
                "df": _logunif(g, s, 1.0, 10.0, dt),
                "loc": _unif(g, s, -3, 3, dt),
                "scale": _logunif(g, s, 0.3, 3.0, dt),
            },
            "extreme": lambda g, dt, s: {
                "df": _const([0.5, 200.0, 3.0, 0.5, 50.0, 1.0], s, dt),
                "loc": _unif(g, s, -1e3, 1e3, dt),
                "scale": _const([1e-4, 1e4, 1.0, 1e4, 1e-4, 2.0], s, dt),
            },
        },
        kl=False,
        step=lambda p: {"df": p["df"], "loc": p["scale"], "scale": p["scale"]},
        coord_dict={"df": ExpTransform(), "scale": SoftplusTransform()},
    ),
    Spec(
        "Poisson",
        lambda p: dist.Poisson(p["rate"]),
        ("rate",),
        _positive_regimes(
            ("rate",),
            {"rate": (0.5, 20.0)},
            {"extreme": {"rate": [1e-3, 1e4, 0.05, 300.0, 1.0, 2e-3]}},
        ),
        kl=True,
        ef=_ef_poisson,
        step=_step_identity("rate"),
        mc_samples={"extreme": 50000},
        coord_dict={"rate": PowerTransform(2.0)},
        support=_support_count(_poisson_kmax),
    ),
    Spec(
        "Bernoulli[probs]",
        lambda p: dist.Bernoulli(probs=p["probs"]),
        ("probs",),
        {
            "rand": lambda g, dt, s: {"probs": _unif(g, s, 0.1, 0.9, dt)},
            "extreme": lambda g, dt, s: {
                "probs": _const([1e-3, 0.999, 0.5, 2e-3, 0.998, 0.2], s, dt)
            },
        },
        kl=True,
        ef=lambda s: _ef_logit(s, "probs"),
        step=_step_unit("probs"),
        mc_samples={"extreme": 50000},
        coord_dict={"probs": SigmoidTransform()},
        support=_support_enumerate,
    ),
    Spec(
        "Bernoulli[logits]",
        lambda p: dist.Bernoulli(logits=p["logits"]),
        ("logits",),
        {
            "rand": lambda g, dt, s: {"logits": _unif(g, s, -3, 3, dt)},
            "extreme": lambda g, dt, s: {
                "logits": _const([-8.0, 8.0, 0.0, -15.0, 15.0, 1.0], s, dt)
            },
        },
        kl=True,
        ef=lambda s: _ef_logit(s, "logits"),
        step=_step_ones("logits"),
        no_mc=("extreme",),  # p ~ 3e-7: no event among any feasible number of samples
        coord_dict={"logits": AffineTransform(0.0, 0.5)},
        support=_support_enumerate,
    ),
    Spec(
        "Binomial[probs]",
        lambda p: dist.Binomial(total_count=p["total_count"], probs=p["probs"]),
        ("probs",),
        {
            "rand": lambda g, dt, s: {
                "probs": _unif(g, s, 0.1, 0.9, dt),
                "total_count": _const([5.0, 20.0, 1.0, 3.0, 50.0, 10.0], s, dt),
            },
            "extreme": lambda g, dt, s: {
                # not exactly 0.5: torch's Binomial.log_prob evaluates softplus(logits)
                # through |logits|, whose autograd second derivative at 0 is 0 (harness)
                "probs": _const([1e-3, 0.999, 0.45, 2e-3, 0.998, 0.2], s, dt),
                "total_count": _const([5.0, 20.0, 1.0, 3.0, 50.0, 10.0], s, dt),
            },
        },
        kl=True,
        ef=lambda s: _ef_logit(s, "probs", total_count=True),
        step=_step_unit("probs"),
        mc_samples={"extreme": 50000},
        support=_support_binomial,
    ),
    Spec(
        "Binomial[logits]",
        lambda p: dist.Binomial(total_count=p["total_count"], logits=p["logits"]),
        ("logits",),
        {
            "rand": lambda g, dt, s: {
                "logits": _unif(g, s, -3, 3, dt),
                "total_count": _const([5.0, 20.0, 1.0, 3.0, 50.0, 10.0], s, dt),
            },
            "extreme": lambda g, dt, s: {
                "logits": _const([-8.0, 8.0, 0.3, -15.0, 15.0, 1.0], s, dt),
                "total_count": _const([5.0, 20.0, 1.0, 3.0, 50.0, 10.0], s, dt),
            },
        },
        # torch's Binomial KL evaluates log1p(-probs) from a rounded probs: at logits=15 its
        # absolute error (~1e-8) swamps the 1e-11 KL of an eps=1e-3 step
        no_kl_expansion=("extreme",),
        kl=True,
        ef=lambda s: _ef_logit(s, "logits", total_count=True),
        step=_step_ones("logits"),
        no_mc=("extreme",),
        support=_support_binomial,
    ),
    Spec(
        "Geometric[probs]",
        lambda p: dist.Geometric(probs=p["probs"]),
        ("probs",),
        {
            "rand": lambda g, dt, s: {"probs": _unif(g, s, 0.1, 0.9, dt)},
            "extreme": lambda g, dt, s: {
                "probs": _const([1e-3, 0.999, 0.5, 2e-3, 0.998, 0.2], s, dt)
            },
        },
        kl=True,
        ef=lambda s: _ef_geometric(s, "probs"),
        step=_step_unit("probs"),
        mc_samples={"extreme": 50000},
        support=_support_count(_geometric_kmax),
    ),
    Spec(
        "Geometric[logits]",
        lambda p: dist.Geometric(logits=p["logits"]),
        ("logits",),
        {
            "rand": lambda g, dt, s: {"logits": _unif(g, s, -3, 3, dt)},
            "extreme": lambda g, dt, s: {"logits": _const([-6.0, 6.0, 0.0, -5.0, 5.0, 1.0], s, dt)},
        },
        kl=True,
        ef=lambda s: _ef_geometric(s, "logits"),
        step=_step_ones("logits"),
        mc_samples={"extreme": 50000},
        support=_support_count(_geometric_kmax),
    ),
]


def _cases_from_spec(spec, batch=(2, 3)):
    out = []
    for label, regime in spec.regimes.items():

        def gen(g, dt, regime=regime):
            return regime(g, dt, batch)

        out.append(
            Case(
                id=f"{spec.family}-{label}",
                family=spec.family.split("[")[0],
                build=spec.ctor,
                names=spec.names,
                coord_shapes={n: () for n in spec.names},
                batch_shape=batch,
                gen=gen,
                params_arg=spec.params_arg,
                kl=spec.kl,
                ef=spec.ef(()) if spec.ef else None,
                mc=label not in spec.no_mc,
                mc_samples=spec.mc_samples.get(label, 20000),
                step=spec.step,
                coord_dict=spec.coord_dict,
                support=spec.support,
                smooth=spec.smooth,
                kl_expansion=label not in spec.no_kl_expansion,
            )
        )
    return out


def _independent_case(spec, label, shape, ndims, wrapper="to_event"):
    """``spec``'s distribution with parameters of ``shape``, last ``ndims`` dims reinterpreted."""
    regime = spec.regimes[label]
    batch = tuple(shape[: len(shape) - ndims])
    ev = tuple(shape[len(shape) - ndims :])

    if wrapper == "to_event":

        def build(p):
            return spec.ctor(p).to_event(ndims)

    else:

        def build(p):
            return tdist.Independent(spec.ctor(p), ndims)

    return Case(
        id=f"Independent({spec.family},{ndims})-{label}-{wrapper}-{'x'.join(map(str, shape))}",
        family=f"Independent({spec.family.split('[')[0]})",
        build=build,
        names=spec.names,
        coord_shapes={n: ev for n in spec.names},
        batch_shape=batch,
        gen=lambda g, dt: regime(g, dt, shape),
        params_arg=spec.params_arg,
        kl=spec.kl,
        ef=spec.ef(ev) if spec.ef else None,
        mc=label not in spec.no_mc,
        mc_samples=spec.mc_samples.get(label, 20000),
        step=spec.step,
        coord_dict=spec.coord_dict,
        support=None,
        smooth=spec.smooth,
        kl_expansion=label not in spec.no_kl_expansion,
    )


_SPEC = {s.family: s for s in SPECS}


# ----------------------------------------------------------------------------------------
# multivariate families
# ----------------------------------------------------------------------------------------
def _random_corr(g, d, dtype, batch):
    """Correlation matrices with smallest eigenvalue >= 0.6 (0.6 I + 0.4 R)."""
    w = torch.randn(batch + (d, d + 2), generator=g, dtype=dtype)
    c = w @ w.transpose(-1, -2)
    sd = c.diagonal(dim1=-2, dim2=-1).sqrt()
    r = c / (sd.unsqueeze(-1) * sd.unsqueeze(-2))
    return 0.6 * torch.eye(d, dtype=dtype) + 0.4 * r


def _mvn_gen(kind, d, batch, which):
    def gen(g, dt):
        corr = _random_corr(g, d, dt, batch)
        if kind == "rand":
            sd = _logunif(g, batch + (d,), 0.5, 2.0, dt)
        else:
            sd = _const([1e-3, 1.0, 1e3, 1e2, 1e-2, 1.0][:d] * 2, batch + (d,), dt)
        m = corr * sd.unsqueeze(-1) * sd.unsqueeze(-2)
        loc = _unif(g, batch + (d,), -2, 2, dt) * sd
        p = {"loc": loc}
        if which == "scale_tril":
            p[which] = mat_to_vec(torch.linalg.cholesky(m))
        else:  # covariance_matrix or precision_matrix: the matrix is m itself
            p[which] = mat_to_vec(m)
        return p

    return gen


def _mvn_step(which):
    def step(p):
        if which == "scale_tril":
            lower = vec_to_mat(p["scale_tril"], symmetric=False)
            diag = lower.diagonal(dim1=-2, dim2=-1)
            d = diag.shape[-1]
            rows, _ = torch.tril_indices(d, d)
            mat_scale = diag[..., rows]  # row i of L moves in units of L_ii
        else:
            m = vec_to_mat(p[which], symmetric=True)
            sd = m.diagonal(dim1=-2, dim2=-1).sqrt()
            mat_scale = mat_to_vec(sd.unsqueeze(-1) * sd.unsqueeze(-2))
        cov = _covariance_from(p)
        return {"loc": cov.diagonal(dim1=-2, dim2=-1).sqrt(), which: mat_scale}

    return step


def _mvn_case(kind, d, batch, which, to_event=False):
    if which == "scale_tril":

        def build0(p):
            return dist.MultivariateNormal(p["loc"], scale_tril=vec_to_mat(p["scale_tril"], False))

    elif which == "covariance_matrix":

        def build0(p):
            return dist.MultivariateNormal(
                p["loc"], covariance_matrix=vec_to_mat(p["covariance_matrix"], True)
            )

    else:

        def build0(p):
            return dist.MultivariateNormal(
                p["loc"], precision_matrix=vec_to_mat(p["precision_matrix"], True)
            )

    m = d * (d + 1) // 2
    if to_event:
        # batch (2,) of MVNs reinterpreted as one event: coordinates are all locs, then all
        # tril vectors (param-major, C order over the reinterpreted dim)
        return Case(
            id=f"Independent(MVN[{which}],1)-{kind}-d{d}",
            family="Independent(MultivariateNormal)",
            build=lambda p: build0(p).to_event(1),
            names=("loc", which),
            coord_shapes={"loc": (2, d), which: (2, m)},
            batch_shape=batch,
            gen=_mvn_gen(kind, d, batch + (2,), which),
            kl=True,
            ef=None,
            step=_mvn_step(which),
            mc_samples=20000,
        )
    return Case(
        id=f"MVN[{which}]-{kind}-d{d}-b{'x'.join(map(str, batch)) or 'scalar'}",
        family="MultivariateNormal",
        build=build0,
        names=("loc", which),
        coord_shapes={"loc": (d,), which: (m,)},
        batch_shape=batch,
        gen=_mvn_gen(kind, d, batch, which),
        kl=True,
        ef=_ef_mvn(d),
        step=_mvn_step(which),
        mc_samples=20000,
    )


def _lowrank_as_full_mvn(p):
    w = p["cov_factor"]
    cov = w @ w.transpose(-1, -2) + torch.diag_embed(p["cov_diag"])
    return dist.MultivariateNormal(p["loc"], covariance_matrix=cov)


def _lowrank_case(kind, d, r, batch):
    def gen(g, dt):
        if kind == "rand":
            w = torch.randn(batch + (d, r), generator=g, dtype=dt)
            diag = _logunif(g, batch + (d,), 0.3, 3.0, dt)
        else:
            w = 10.0 * torch.randn(batch + (d, r), generator=g, dtype=dt)
            diag = _const([1e-3, 1.0, 1e2], batch + (d,), dt)
        return {"loc": _unif(g, batch + (d,), -2, 2, dt), "cov_factor": w, "cov_diag": diag}

    def step(p):
        w, diag = p["cov_factor"], p["cov_diag"]
        sd = ((w**2).sum(-1) + diag).sqrt()
        return {"loc": sd, "cov_factor": sd.unsqueeze(-1).expand(w.shape), "cov_diag": diag}

    return Case(
        id=f"LowRankMVN-{kind}-d{d}-r{r}",
        family="LowRankMultivariateNormal",
        build=lambda p: dist.LowRankMultivariateNormal(p["loc"], p["cov_factor"], p["cov_diag"]),
        kl_build=_lowrank_as_full_mvn,
        names=("loc", "cov_factor", "cov_diag"),
        coord_shapes={"loc": (d,), "cov_factor": (d, r), "cov_diag": (d,)},
        batch_shape=batch,
        gen=gen,
        kl=True,
        # W -> W Q (Q orthogonal r x r) leaves the distribution unchanged: singular for r >= 2
        singular=r >= 2,
        step=step,
        coord_dict={"cov_diag": ExpTransform()},
    )


def _dirichlet_case(kind):
    batch, kk = (2,), 3

    def gen(g, dt):
        if kind == "rand":
            return {"concentration": _logunif(g, batch + (kk,), 0.5, 5.0, dt)}
        if kind == "extreme":  # MC-safe: no component is pushed to within 1e-16 of 1
            return {
                "concentration": torch.tensor([[0.05, 0.3, 200.0], [200.0, 150.0, 0.05]], dtype=dt)
            }
        return {"concentration": torch.tensor([[0.05, 0.05, 0.05], [1e3, 1e-2, 1.0]], dtype=dt)}

    return Case(
        id=f"Dirichlet-{kind}",
        family="Dirichlet",
        build=lambda p: dist.Dirichlet(p["concentration"]),
        names=("concentration",),
        coord_shapes={"concentration": (kk,)},
        batch_shape=batch,
        gen=gen,
        kl=True,
        ef=_ef_dirichlet((kk,)),
        mc=kind != "tiny",
        step=_step_identity("concentration"),
    )


def _categorical_case(kind, which, multinomial=False, one_hot=False):
    batch, kk, total = (2,), (3 if multinomial else 4), 10

    def gen(g, dt):
        if which == "probs":
            if kind == "rand":
                v = _logunif(g, batch + (kk,), 0.2, 1.0, dt)
                v = v / v.sum(-1, keepdim=True)
            else:
                rows = [[1e-3, 1e-3, 0.5, 0.498], [0.997, 1e-3, 1e-3, 1e-3]]
                if multinomial:
                    rows = [[1e-3, 0.5, 0.499], [0.998, 1e-3, 1e-3]]
                v = torch.tensor(rows, dtype=dt)
            return {"probs": v}
        if kind == "rand":
            return {"logits": 2.0 * torch.randn(batch + (kk,), generator=g, dtype=dt)}
        rows = [[-8.0, -8.0, 4.0, 0.0], [10.0, -10.0, 0.0, 0.0]]
        if multinomial:
            rows = [[-8.0, 4.0, 0.0], [10.0, -10.0, 0.0]]
        return {"logits": torch.tensor(rows, dtype=dt)}

    if multinomial:

        def build(p):
            return dist.Multinomial(total, **{which: p[which]})

    else:

        def build(p):
            cls = dist.OneHotCategorical if one_hot else dist.Categorical
            return cls(**{which: p[which]})

    ef = _ef_categorical((kk,), which)
    if multinomial:
        base_a = ef.log_partition
        ef = ExpFamily(ef.names, ef.shapes, ef.eta, lambda e, p=None: total * base_a(e))
    fam = "Multinomial" if multinomial else "OneHotCategorical" if one_hot else "Categorical"
    return Case(
        id=f"{fam}[{which}]-{kind}",
        family=fam,
        build=build,
        names=(which,),
        coord_shapes={which: (kk,)},
        batch_shape=batch,
        gen=gen,
        kl=not multinomial,  # torch registers no Multinomial KL
        ef=ef,
        singular=True,
        mc=(kind == "rand" or which == "probs"),
        mc_samples=50000 if kind != "rand" else 20000,
        step=(lambda p: {which: p[which]}) if which == "probs" else _step_ones(which),
        support=_support_multinomial(total, kk) if multinomial else _support_enumerate,
    )


def _studentt_fixed_df_case(kind):
    spec = _SPEC["StudentT"]
    regime = spec.regimes[kind]
    return Case(
        id=f"StudentT[fixed df]-{kind}",
        family="StudentT",
        build=spec.ctor,
        names=("loc", "scale"),
        coord_shapes={"loc": (), "scale": ()},
        batch_shape=(2, 3),
        gen=lambda g, dt: regime(g, dt, (2, 3)),
        params_arg=("loc", "scale"),
        kl=False,
        step=_step_loc_scale,
        coord_dict={"scale": SoftplusTransform()},
    )


def _delta_case(event_dim):
    shape = (2,) if event_dim == 0 else (2, 3)
    return Case(
        id=f"Delta-event{event_dim}",
        family="Delta",
        build=lambda p: dist.Delta(p["v"], event_dim=event_dim),
        names=("v",),
        coord_shapes={"v": shape[1:]},
        batch_shape=(2,),
        gen=lambda g, dt: {"v": torch.randn(shape, generator=g, dtype=dt)},
        params_arg=("v",),
        kl=False,
        singular=True,
    )


def _normal_scalar_case():
    spec = _SPEC["Normal"]
    return Case(
        id="Normal-scalar",
        family="Normal",
        build=spec.ctor,
        names=spec.names,
        coord_shapes={"loc": (), "scale": ()},
        batch_shape=(),
        gen=lambda g, dt: {
            "loc": torch.tensor(0.7, dtype=dt),
            "scale": torch.tensor(1.3, dtype=dt),
        },
        kl=True,
        ef=_ef_normal(()),
        step=_step_loc_scale,
        coord_dict=spec.coord_dict,
    )


def _torch_normal_case():
    """Built from torch.distributions (not pyro): dispatch must follow the torch MRO too."""
    return Case(
        id="torch.Normal-rand",
        family="Normal",
        build=lambda p: tdist.Normal(p["loc"], p["scale"]),
        names=("loc", "scale"),
        coord_shapes={"loc": (), "scale": ()},
        batch_shape=(3,),
        gen=lambda g, dt: _SPEC["Normal"].regimes["rand"](g, dt, (3,)),
        kl=True,
        ef=_ef_normal(()),
        step=_step_loc_scale,
    )


def _build_cases():
    cases = []
    for spec in SPECS:
        cases.extend(_cases_from_spec(spec))
    cases.append(_normal_scalar_case())
    cases.append(_torch_normal_case())
    cases.append(_studentt_fixed_df_case("rand"))
    cases.append(_studentt_fixed_df_case("extreme"))
    for kind in ("rand", "extreme", "tiny"):
        cases.append(_dirichlet_case(kind))
    for which in ("scale_tril", "covariance_matrix", "precision_matrix"):
        for kind in ("rand", "extreme"):
            cases.append(_mvn_case(kind, 3, (2,), which))
    cases.append(_mvn_case("rand", 2, (), "scale_tril"))
    cases.append(_mvn_case("rand", 2, (), "scale_tril", to_event=True))
    cases.append(_lowrank_case("rand", 3, 1, (2,)))
    cases.append(_lowrank_case("extreme", 3, 1, (2,)))
    cases.append(_lowrank_case("rand", 3, 2, ()))
    for multinomial in (False, True):
        for which in ("probs", "logits"):
            for kind in ("rand", "extreme"):
                cases.append(_categorical_case(kind, which, multinomial))
    for which in ("probs", "logits"):
        cases.append(_categorical_case("rand", which, one_hot=True))
    cases.append(_delta_case(0))
    cases.append(_delta_case(1))
    # Independent / .to_event wrappers
    cases.append(_independent_case(_SPEC["Normal"], "rand", (2, 3), 1))
    cases.append(_independent_case(_SPEC["Normal"], "extreme", (2, 3), 1))
    cases.append(_independent_case(_SPEC["Normal"], "rand", (2, 3), 1, wrapper="torch"))
    cases.append(_independent_case(_SPEC["Gamma"], "rand", (2, 3), 2))
    cases.append(_independent_case(_SPEC["Gamma"], "extreme", (2, 3), 1))
    cases.append(_independent_case(_SPEC["Beta"], "extreme", (3,), 1))
    cases.append(_independent_case(_SPEC["Bernoulli[logits]"], "rand", (2, 3), 1))
    cases.append(_independent_case(_SPEC["Poisson"], "rand", (2, 2), 1))
    return cases


CASES = _build_cases()
assert len({c.id for c in CASES}) == len(CASES)


def case_ids(cases):
    return [c.id for c in cases]
