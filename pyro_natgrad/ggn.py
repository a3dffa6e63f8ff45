"""Generalized Gauss-Newton (GGN) curvature as a matrix-free linear operator.

For parameters ``theta`` (a flat vector of ``P`` numbers) that set the
parameters ``phi(theta)`` of an output distribution ``q_phi`` (a likelihood over
data points, a batch of particles, ...), the GGN is

.. math:: G = J^\\top F_R J, \\qquad J = \\partial \\phi / \\partial \\theta,

with ``F_R`` the closed-form Fisher information of the output distribution
(:func:`pyro_natgrad.fisher.fisher_operator`) summed over its batch: the Hessian of
``-log q_phi(y)`` in ``theta`` with the term that involves the second derivatives of
``phi`` dropped and the Hessian in ``phi`` replaced by its expectation over ``y``
(``F_R``), and therefore positive semi-definite. When ``q`` is an
exponential family in the coordinates ``phi`` (Bernoulli and binomial logits,
Poisson log-rate, categorical logits, the mean of a normal with fixed scale),
the loss is linear in ``phi`` up to the log-partition, so ``G`` is the Fisher
information of ``p(y | theta)`` and, as the Hessian then does not depend on
``y``, also the exact Hessian of ``-log p(y | theta)``. Elsewhere ``G`` equals
the Fisher ``E_y[s s^T]`` of the model but not its Hessian.

Cost: :meth:`GGNOperator.mv` costs one forward-mode pass
(:func:`torch.func.jvp`, ``J v``, which re-evaluates ``fn`` alongside the
tangent), one structured Fisher product (elementwise for most families,
``O(d^3)`` per multivariate-normal batch element), and one reverse-mode pass
(``J^T w``) through a :func:`torch.func.vjp` pullback recorded once when the
operator is built: ``O(cost of fn)`` per product, and ``J`` is never formed.
:meth:`GGNOperator.dense` and :meth:`GGNOperator.diagonal` take ``P``
forward-mode passes (the columns of ``J``, one at a time in memory only if
``vectorize=False``), so they are meant for small ``P``.

Two ways in:

* :class:`GGNOperator` for any function ``fn(theta) -> parameters`` and a
  distribution constructor;
* :func:`observation_ggn` (or :class:`ModelGGN`) for the likelihood of a Pyro
  model at given latent values: ``G = sum_sites scale * J^T F_R J`` over the
  observed sample sites, ``J`` the Jacobian of each site's distribution
  parameters with respect to the packed latent.
"""

import inspect
import math
from collections import namedtuple
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from pyro import poutine
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.poutine.util import site_is_factor, site_is_subsample
from torch.distributions import Distribution, Independent, biject_to
from torch.distributions.transforms import identity_transform
from torch.distributions.utils import lazy_property

from .fisher import fisher_operator
from .fisher.registry import lookup_fisher
from .linalg import conjugate_gradient

__all__ = ["CGInfo", "GGNOperator", "ModelGGN", "observation_ggn"]

#: What :meth:`GGNOperator.solve` reports with ``return_info=True``.
#: ``iterations``: matrix-vector products taken (one per CG iteration, and one per check on
#: the true residual);
#: ``residual_norm``: ``|b - (G + damping I) x|`` recomputed at the end, per system;
#: ``converged``: whether every system met ``|r| <= tol |b|``.
CGInfo = namedtuple("CGInfo", ["iterations", "residual_norm", "converged"])


# -------------------------------------------------------------------------------------
# Output distributions: their Fisher coordinates and weights
# -------------------------------------------------------------------------------------


def _unwrap(d: Distribution):
    """``(base, masks, reinterpreted)`` for a distribution wrapped in ``Independent``
    and ``MaskedDistribution`` layers: ``reinterpreted`` is the total number of batch
    dims moved into the event, and each mask comes with the number reinterpreted
    *below* it, so that it can be aligned with ``base.batch_shape``."""
    layers = []  # (kind, payload), outermost first
    while True:
        if isinstance(d, Independent):
            layers.append(("independent", d.reinterpreted_batch_ndims))
            d = d.base_dist
        elif isinstance(d, MaskedDistribution):
            layers.append(("mask", d._mask))
            d = d.base_dist
        else:
            break
    masks, below = [], 0
    for kind, payload in reversed(layers):  # innermost first
        if kind == "independent":
            below += payload
        else:
            masks.append((payload, below))
    return d, masks, below


def _align(w, trailing: int, dtype, device):
    """A weight broadcastable to a site's batch shape, moved to align with the
    base distribution's batch shape (``trailing`` reinterpreted dims)."""
    w = torch.as_tensor(w, dtype=dtype, device=device)
    return w.reshape(w.shape + (1,) * trailing) if trailing and w.dim() else w


class _Head:
    """One output distribution: its Fisher operator at ``theta0`` (over the base
    distribution, whose batch dims are summed over) and a weight broadcastable
    to the base batch shape (scale times mask, over the sample dims averaged)."""

    def __init__(self, d0: Distribution, weight, label: str):
        base, masks, reinterpreted = _unwrap(d0)
        if lookup_fisher(type(base)) is None:
            raise NotImplementedError(
                f"{label}: no closed-form Fisher information is registered for "
                f"{type(base).__name__}, so its GGN is not available. Register one with "
                f"@pyro_natgrad.register_fisher({type(base).__name__}).")
        self.op = fisher_operator(base)
        self.names = self.op.names
        self.label = label
        dtype, device = self.op.dtype, self.op.device
        w = _align(weight, reinterpreted, dtype, device)
        for m, below in masks:
            if m is not None and not (isinstance(m, bool) and m):
                w = w * _align(m, below, dtype, device)
        w_ = torch.as_tensor(w)
        try:
            fits = torch.broadcast_shapes(w_.shape, base.batch_shape) == base.batch_shape
        except RuntimeError:
            fits = False
        if not fits:
            # A scale of shape (2, 4) for a batch of 4 lined its extra dim up with the
            # columns of J: G was silently wrong.
            batch = tuple(base.batch_shape)[:len(base.batch_shape) - reinterpreted]
            raise ValueError(f"{label}: the scale (times the mask) has shape "
                             f"{tuple(torch.as_tensor(weight).shape)}, which does not "
                             f"broadcast to the distribution's batch shape {batch}; give "
                             f"one weight per batch element, or a number")
        if not bool(((w_ >= 0) & torch.isfinite(w_)).all()):  # NaN fails both
            bad = w_[~((w_ >= 0) & torch.isfinite(w_))].flatten()[0].item()
            raise ValueError(f"{label}: the scale (times the mask) must be finite and >= 0 "
                             f"for a positive semi-definite GGN, got {bad}")
        self.weight = w
        self.batch_shape = base.batch_shape
        self.reinterpreted = reinterpreted

    @staticmethod
    def coordinates(d: Distribution, names) -> Dict[str, torch.Tensor]:
        """The Fisher coordinates of ``d`` (as its constructor stored them)."""
        base = _unwrap(d)[0]
        return {n: getattr(base, n) for n in names}

    def apply(self, t: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``weight * F_R t`` per batch element; ``t`` may carry extra leading dims.

        Where ``F_R`` is infinite (a probability rounded to 1, a rate to 0) and the
        tangent there is 0 (the Jacobian vanishes with it: ``J^T F_R J`` tends to 0, e.g.
        ``p (1 - p)`` for a Bernoulli of ``sigmoid(eta)``), or the weight is 0, the
        product is 0, not ``0 * inf = NaN``, which made the whole ``G`` NaN."""
        out = self.op.mv_dict(t)
        w = self.weight
        specs = {s.name: s for s in self.op.specs}
        result = {}
        for k, x in out.items():
            wk = w.reshape(w.shape + (1,) * specs[k].event_dim) \
                if torch.is_tensor(w) and w.dim() > 0 else torch.as_tensor(w)
            y = wk * x
            vanishing = (t[k] == 0) | (wk == 0)
            result[k] = torch.where(vanishing & ~torch.isfinite(y), torch.zeros_like(y), y)
        return result


def _uncovered(d: Distribution, names) -> List[str]:
    """The arguments that ``d``'s constructor stored as tensors, other than ``names``.
    An alternative form of a covered one (``probs`` beside ``logits``, a covariance
    beside a ``scale_tril``: torch computes the others lazily, and caches them once
    read) is a function of it, so it does not count."""
    base = _unwrap(d)[0]
    stored = vars(base)

    def lazy(name):
        return isinstance(inspect.getattr_static(type(base), name, None), lazy_property)

    alternatives = any(lazy(n) for n in names)
    return [a for a in getattr(base, "arg_constraints", {})
            if a not in names and torch.is_tensor(stored.get(a))
            and not (alternatives and lazy(a))]


def _refuse_uncovered(distributions: Callable, theta: torch.Tensor, heads, at_theta) -> None:
    """A ValueError if a tensor that a distribution's constructor stored, other than its
    Fisher coordinates (``head.names``), depends on ``theta``: ``G`` takes it as fixed
    and has no curvature along its direction (a negative binomial's ``total_count``, a
    learned dispersion, read as 0 and its solve failed). ``distributions``: ``theta ->
    {head key: distribution}``; ``at_theta``: its value at ``theta`` (without a graph),
    which tells whether there is anything to check (most families store nothing else)."""
    if not any(_uncovered(d, heads[k].names) for k, d in at_theta.items()):
        return
    with torch.enable_grad():
        th = theta.detach().clone().requires_grad_(True)
        for key, d in distributions(th).items():
            base = _unwrap(d)[0]
            for arg in _uncovered(base, heads[key].names):
                v = getattr(base, arg)
                if not v.requires_grad or \
                        torch.autograd.grad(v.sum(), th, allow_unused=True)[0] is None:
                    continue
                family = type(base).__name__
                raise ValueError(
                    f"{heads[key].label}: {family}'s {arg!r} depends on the parameters, but "
                    f"its closed-form Fisher covers only {list(heads[key].names)}, so the GGN "
                    f"would miss that direction. Hold {arg!r} fixed (compute it from "
                    f"detached values), or register a Fisher that covers it "
                    f"(@pyro_natgrad.register_fisher({family}))")


def _index(x, i):
    if isinstance(x, dict):
        return {k: _index(v, i) for k, v in x.items()}
    return x[i]


def _stack(xs):
    if isinstance(xs[0], dict):
        return {k: _stack([x[k] for x in xs]) for k in xs[0]}
    return torch.stack(xs)


# -------------------------------------------------------------------------------------
# The operator
# -------------------------------------------------------------------------------------


class GGNOperator:
    """``G = scale * J^T F_R J`` for a function from a flat parameter vector to
    the parameters of a distribution, as a linear operator.

    :param fn: ``theta -> dict`` of the distribution's constructor arguments
        (``{"loc": ..., "scale": ...}``, ``{"logits": ...}``), or, with
        ``distribution=None``, ``theta -> Distribution``. It must be a pure
        function of ``theta`` (no sampling); it is re-run by every product.
    :param torch.Tensor theta: the point, shape ``(P,)``.
    :param distribution: a :class:`~torch.distributions.Distribution` class,
        called as ``distribution(**fn(theta))``, or a callable
        ``make(params) -> Distribution`` (fixed arguments such as a binomial's
        ``total_count`` or a known noise scale go there), or ``None``.
        ``Independent`` and ``MaskedDistribution`` wrappers are allowed.
    :param scale: a float or a tensor broadcastable to the distribution's batch
        shape multiplying ``G`` (a subsampling factor ``N / B`` as in
        ``pyro.plate(..., subsample_size=B)``, per-point weights); must be ``>= 0``.
    :param int sample_dims: how many leading batch dims index Monte-Carlo draws
        (particles) to be averaged over instead of summed.
    :param bool vectorize: evaluate several products at once with
        :func:`torch.func.vmap`; set ``False`` if ``fn`` has data-dependent
        control flow that ``vmap`` cannot follow (products then run one by one).

    The Fisher ``F_R`` is the closed form for the distribution's own
    coordinates: the tensors its constructor stored (``probs`` or ``logits`` as
    passed, after any normalisation or broadcasting it does; for a multivariate
    normal ``loc`` and the lower triangle of the matrix passed), evaluated at
    ``theta``. ``J`` is the derivative of those tensors through ``fn`` and the
    constructor, so maps inside ``make`` (e.g. ``scale=exp(s)``) are accounted for.
    The distribution's batch dims (data points, particles) are summed over.
    """

    def __init__(self, fn: Callable, theta: torch.Tensor, distribution=None, *,
                 scale: Union[float, torch.Tensor] = 1.0, sample_dims: int = 0,
                 vectorize: bool = True):
        if distribution is None:
            make = None
        elif isinstance(distribution, type) and issubclass(distribution, Distribution):
            def make(params, _cls=distribution):
                return _cls(**params)
        elif callable(distribution):
            make = distribution
        else:
            raise TypeError(f"distribution must be a Distribution class, a callable "
                            f"params -> Distribution, or None; got {type(distribution).__name__}")

        def build(th):
            out = fn(th)
            d = out if make is None else make(out)
            if not isinstance(d, Distribution):
                raise TypeError(f"expected a Distribution, got {type(d).__name__}; pass "
                                f"distribution= when fn returns its parameters")
            return d

        theta = self._check_theta(theta)
        with torch.no_grad():
            d0 = build(theta)
        if not isinstance(sample_dims, int) or sample_dims < 0:
            raise ValueError(f"sample_dims must be an int >= 0, got {sample_dims!r}")
        if sample_dims > len(d0.batch_shape):
            raise ValueError(f"sample_dims={sample_dims} exceeds the distribution's batch "
                             f"shape {tuple(d0.batch_shape)}")
        n_samples = math.prod(d0.batch_shape[:sample_dims])
        weight = scale / n_samples if sample_dims else scale
        head = _Head(d0, weight, type(d0).__name__)
        _refuse_uncovered(lambda th: {"": build(th)}, theta, {"": head}, {"": d0})

        def coordinates(th):
            return {"": _Head.coordinates(build(th), head.names)}

        self._setup(coordinates, theta, {"": head}, vectorize)

    # ---- construction ------------------------------------------------------------
    @staticmethod
    def _check_theta(theta):
        if not torch.is_tensor(theta) or theta.dim() != 1 or not theta.is_floating_point():
            raise ValueError("theta must be a flat floating-point tensor of shape (P,), got "
                             f"{getattr(theta, 'shape', type(theta).__name__)}")
        if theta.numel() == 0:
            raise ValueError("theta is empty (P = 0): there is nothing to take the GGN with "
                             "respect to (ModelGGN: give latent_values at least one latent)")
        return theta.detach()

    def _setup(self, coordinates: Callable, theta: torch.Tensor, heads: Dict[str, _Head],
               vectorize: bool):
        self.theta = theta
        self.heads = heads
        self.vectorize = vectorize
        self._coordinates = coordinates
        self._pullback_fn = None

    @property
    def _pullback(self):
        # The reverse pass is recorded once, on the first product that needs it, and
        # reused; dense() never does (it contracts forward-mode rows).
        if self._pullback_fn is None:
            _, self._pullback_fn = torch.func.vjp(self._coordinates, self.theta)
        return self._pullback_fn

    # ---- bookkeeping ------------------------------------------------------------
    @property
    def dim(self) -> int:
        """``P``, the number of parameters."""
        return self.theta.shape[0]

    @property
    def shape(self):
        return torch.Size((self.dim, self.dim))

    @property
    def dtype(self):
        return self.theta.dtype

    def __repr__(self):
        fams = ", ".join(f"{type(h.op).__name__}{tuple(h.batch_shape)}" for h in
                         self.heads.values())
        return f"{type(self).__name__}(P={self.dim}, outputs=[{fams}])"

    # ---- the three stages of a product --------------------------------------------
    def _map(self, fn, x, lead):
        """``fn`` over the leading dim of ``x`` (a tensor or nested dict)."""
        if self.vectorize:
            return torch.func.vmap(fn)(x)
        return _stack([fn(_index(x, i)) for i in range(lead)])

    def _jvp(self, V):
        """``J v`` for the rows of ``V`` ``(m, P)``: per-head dicts with a leading ``m``."""
        def one(v):
            return torch.func.jvp(self._coordinates, (self.theta,), (v,))[1]

        return self._map(one, V, V.shape[0])

    def _fisher(self, T):
        return {h: head.apply(T[h]) for h, head in self.heads.items()}

    def _vjp(self, W, m):
        return self._map(lambda w: self._pullback(w)[0], W, m)

    def _as_rows(self, v):
        if not torch.is_tensor(v) or v.dim() == 0 or v.shape[-1] != self.dim:
            raise ValueError(f"expected a vector with last dimension {self.dim}, got shape "
                             f"{tuple(getattr(v, 'shape', ()))}")
        return v.to(self.dtype).reshape(-1, self.dim)

    # ---- products -----------------------------------------------------------------
    def mv(self, v: torch.Tensor) -> torch.Tensor:
        """``G v`` for ``v`` of shape ``(P,)`` or ``extra + (P,)`` (each row a vector).

        One forward-mode pass (``J v``), the structured Fisher product, and one
        reverse-mode pass (``J^T w``) per vector; ``J`` is never formed.
        """
        V = self._as_rows(v)
        m = V.shape[0]
        out = self._vjp(self._fisher(self._jvp(V)), m)
        return out.reshape(v.shape)

    def __matmul__(self, v):
        return self.mv(v)

    def _jacobian_rows(self):
        """``J e_i`` for every ``i``: per-head dicts with a leading ``P``."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.theta.device)
        return self._jvp(eye)

    @staticmethod
    def _inner(A, B):
        """``sum_coords A[i] * B[j]`` over all heads and coordinates: ``(m, n)``."""
        total = 0
        for h in A:
            for k in A[h]:
                a = A[h][k].reshape(A[h][k].shape[0], -1)
                b = B[h][k].reshape(B[h][k].shape[0], -1)
                total = total + a @ b.mT
        return total

    def dense(self) -> torch.Tensor:
        """``G`` as a ``(P, P)`` matrix, from the ``P`` columns of ``J`` (forward
        mode) as ``(J e_i)^T F_R (J e_j)``; no reverse pass. For small ``P``."""
        T = self._jacobian_rows()
        G = self._inner(T, self._fisher(T))
        return 0.5 * (G + G.mT)

    def diagonal(self) -> torch.Tensor:
        """``diag(G)``, ``(P,)``: ``(J e_i)^T F_R (J e_i)`` by ``P`` forward-mode passes."""
        T = self._jacobian_rows()
        FT = self._fisher(T)
        total = 0
        for h in T:
            for k in T[h]:
                total = total + (T[h][k] * FT[h][k]).reshape(self.dim, -1).sum(-1)
        return total

    # ---- solves -------------------------------------------------------------------
    def solve(self, b: torch.Tensor, damping: float = 0.0, tol: Optional[float] = None,
              max_iter: Optional[int] = None, return_info: bool = False,
              raise_on_fail: bool = True):
        """``(G + damping I)^{-1} b`` by conjugate gradients (matrix-free).

        :param b: shape ``(P,)`` or ``extra + (P,)`` (independent systems).
        :param float damping: ``>= 0``; with ``0`` and a singular ``G`` (fewer
            informative outputs than parameters) CG only converges for ``b`` in the
            range of ``G``.
        :param float tol: stop when ``|r| <= tol |b|`` for every system (default
            ``1e-10`` in float64, ``1e-5`` otherwise), with room to spare for the
            product's rounding in ``r``: at float32 and a condition number of ``1e7`` that
            rounding is about ``1e-5 |b|``, and such a solve raises (or reports
            ``converged=False``) rather than claim ``1e-5``
            (:func:`pyro_natgrad.linalg.conjugate_gradient`).
        :param int max_iter: at most this many CG iterations, one product each (default
            ``10 P``); checking convergence on the true residual ``b - (G + damping I) x``
            costs one more product each time the recursive one meets ``tol``, two more to
            estimate its rounding, and one at the end (``CGInfo.iterations`` counts every
            product).
        :param bool return_info: also return a ``CGInfo`` (its ``residual_norm`` is
            recomputed after the solve, in ``b``'s dtype).
        :param bool raise_on_fail: raise ``RuntimeError`` if ``tol`` is not met.
        :returns: ``x``, or ``(x, CGInfo)``.
        """
        if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0):
            raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
        B = self._as_rows(b)
        if not bool(torch.isfinite(B).all()):
            # An infinite b gave x = 0 "converged" (its relative residual inf / inf).
            raise ValueError("solve: b has non-finite entries; the solve of a non-finite "
                             "right-hand side is undefined")
        if tol is None:
            tol = 1e-10 if B.dtype == torch.float64 else 1e-5
        elif isinstance(tol, bool) or not (isinstance(tol, (int, float)) and 0 < tol < math.inf):
            raise ValueError(f"tol must be a finite number > 0 (or None), got {tol!r}")
        if max_iter is None:
            max_iter = 10 * self.dim
        elif not (isinstance(max_iter, int) and max_iter >= 1):
            raise ValueError(f"max_iter must be an int >= 1 (or None: 10 P), got {max_iter!r}")
        count = [0]

        def matvec(x):
            count[0] += 1
            return self.mv(x) + damping * x

        x, cg = conjugate_gradient(matvec, B, tol=tol, max_iter=max_iter,
                                   raise_on_fail=raise_on_fail, return_info=True,
                                   stop_at_negative_curvature=False)
        x = x.reshape(b.shape)
        if not return_info:
            return x
        r = (B - (self.mv(x.reshape(B.shape)) + damping * x.reshape(B.shape))).norm(dim=-1)
        return x, CGInfo(count[0], r.reshape(b.shape[:-1]), cg.converged)


# -------------------------------------------------------------------------------------
# Pyro models
# -------------------------------------------------------------------------------------


class ModelGGN(GGNOperator):
    """The GGN of a Pyro model's likelihood with respect to its latent variables.

    ``G_lik = sum_sites scale_site * J_site^T F_site J_site`` over the observed
    sample sites (``is_observed`` and not among ``latent_values``), where
    ``J_site`` is the Jacobian of the site distribution's parameters with respect
    to the packed latent ``z`` and ``scale_site`` is the site's ``scale`` (a
    subsampling plate's ``N / B``, :func:`pyro.poutine.scale`) times its mask.
    The prior terms of the latent sites are not included.

    :param model: a Pyro model.
    :param dict latent_values: ``{site: value}`` for every latent sample site, in
        the site's own (constrained) space; their order fixes the packing of ``z``.
    :param tuple args, kwargs: the model's arguments.
    :param bool unconstrained: if ``True`` (default), ``z`` holds each latent as
        ``biject_to(site support).inv(value)`` (``log`` for a positive site), and
        ``G`` is with respect to those coordinates; for real-valued sites this is
        the value itself. If ``False``, ``z`` holds the values themselves.
    :param sites: restrict to these observed sites (default: all of them).
    :param bool vectorize: see :class:`GGNOperator`.

    Subsampling plates draw their indices once, at construction (from torch's random
    state, which they advance); every product replays them. Discrete latent sites and
    factor statements are not supported; every observed site must have a registered
    closed-form Fisher (not, for example, ``Cauchy``: :func:`~pyro_natgrad.register_fisher`
    adds one).
    """

    def __init__(self, model: Callable, latent_values: Dict[str, torch.Tensor],
                 args: Sequence = (), kwargs: Optional[dict] = None, *,
                 unconstrained: bool = True, sites: Optional[Sequence[str]] = None,
                 vectorize: bool = True):
        kwargs = dict(kwargs or {})
        self.model, self.args, self.kwargs = model, tuple(args), kwargs
        latent_values = {k: torch.as_tensor(v).detach() for k, v in latent_values.items()}
        with poutine.block(), torch.no_grad():
            trace = poutine.trace(poutine.condition(model, latent_values)).get_trace(
                *self.args, **kwargs)
        #: The trace at ``latent_values``; products replay its subsample indices.
        self.trace = trace

        self.latent_names = list(latent_values)
        unknown = [n for n in self.latent_names if n not in trace.nodes
                   or trace.nodes[n]["type"] != "sample"]
        if unknown:
            raise ValueError(f"latent_values names {unknown}, which are not sample sites of "
                             f"the model")
        stochastic, observed = [], []
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site) or name in latent_values:
                continue
            if site["is_observed"]:
                observed.append(name)
            else:
                stochastic.append(name)
        if stochastic:
            raise ValueError(f"latent sites {stochastic} have no value in latent_values; "
                             f"the GGN needs every latent fixed")

        # The packing of z.
        self.transforms, self.latent_shapes, parts = {}, {}, []
        for name in self.latent_names:
            site_fn = trace.nodes[name]["fn"]
            support = site_fn.support
            if support.is_discrete:
                raise ValueError(f"latent site {name!r} is discrete; the GGN needs "
                                 f"continuous latents")
            t = biject_to(support) if unconstrained else identity_transform
            u = t.inv(latent_values[name])
            self.transforms[name] = t
            self.latent_shapes[name] = u.shape
            parts.append(u.reshape(-1))
        theta = torch.cat(parts) if parts else torch.zeros(0)
        if not theta.is_floating_point():
            theta = theta.to(torch.get_default_dtype())

        # The observed sites and their Fisher operators at z.
        if sites is not None:
            missing = [s for s in sites if s not in observed]
            if missing:
                raise ValueError(f"sites {missing} are not observed sample sites of the model; "
                                 f"those are {observed}")
            observed = [s for s in observed if s in sites]
        heads = {}
        for name in observed:
            site = trace.nodes[name]
            if site_is_factor(site):
                raise ValueError(f"site {name!r} is a factor statement, which has no output "
                                 f"distribution and no GGN; leave it out with sites=[...]")
            weight = site["scale"]
            if site["mask"] is not None:
                weight = weight * torch.as_tensor(site["mask"])
            heads[name] = _Head(site["fn"], weight, f"site {name!r}")
        if not heads:
            raise ValueError("the model has no observed sample sites")
        self.observed_sites = list(heads)

        def distributions(z):
            values = self.constrain(z)
            with poutine.block():
                tr = poutine.trace(poutine.replay(poutine.condition(model, values),
                                                  trace=trace)).get_trace(*self.args, **kwargs)
            return {n: tr.nodes[n]["fn"] for n in heads}

        def coordinates(z):
            return {n: _Head.coordinates(d, heads[n].names)
                    for n, d in distributions(z).items()}

        theta = self._check_theta(theta)
        _refuse_uncovered(distributions, theta, heads,
                          {n: trace.nodes[n]["fn"] for n in heads})
        self._setup(coordinates, theta, heads, vectorize)

    def unpack(self, z: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``{site: coordinate}`` (unconstrained if so built) from a packed ``(P,)``."""
        out, pos = {}, 0
        for name in self.latent_names:
            shape = self.latent_shapes[name]
            n = shape.numel()
            out[name] = z[pos:pos + n].reshape(shape)
            pos += n
        return out

    def pack(self, values: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`unpack`."""
        return torch.cat([values[n].reshape(-1) for n in self.latent_names])

    def constrain(self, z: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``{site: value}`` in each site's own space from a packed ``(P,)``."""
        return {n: self.transforms[n](u) for n, u in self.unpack(z).items()}


def observation_ggn(model: Callable, latent_values: Dict[str, torch.Tensor], *args,
                    **kwargs) -> ModelGGN:
    """The GGN of ``model``'s likelihood (its observed sites) with respect to its
    latents, at ``latent_values``; ``args`` and ``kwargs`` go to the model.

    Shorthand for ``ModelGGN(model, latent_values, args, kwargs)``; see
    :class:`ModelGGN` for the options (coordinates, site selection).
    """
    return ModelGGN(model, latent_values, args, kwargs)
