"""Closed-form Fisher information of probability distributions.

``F(theta) = E[s s^T] = -E[grad^2 log p(x | theta)]``, ``s = grad_theta log p(x | theta)``:
the metric of the KL divergence, ``KL(q_theta || q_{theta + D}) ~ 1/2 D^T F D``.

>>> import torch, pyro.distributions as dist
>>> fisher_information(dist.Normal(torch.tensor(0.), torch.tensor(2.)), coords="unconstrained")
tensor([[0.2500, 0.0000],
        [0.0000, 2.0000]])

See :func:`fisher_information` for the coordinate conventions and
:func:`register_fisher` to add a family.
"""

import copy
import importlib
from dataclasses import replace
from typing import Optional, Sequence, Union

import torch
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from torch.distributions import Distribution, Independent, constraints
from torch.distributions.utils import lazy_property

from .coords import COORDS, check_coords, reparameterize
from .fallback import ALTERNATIVES, MC_SAMPLES, FisherFallbackWarning, fallback_operator
from .operators import (
    CategoricalMeanFisher, DenseFisher, DiagonalFisher, DiagPlusRankOneFisher,
    ElementBlockFisher, FisherOperator, GaussianFisher, LogitsFisher, LowRankGaussianFisher,
    ProbsFisher, ReparamFisher, SingularFisherError, ZeroFisher,
)
from .params import ParamSpec
from .registry import lookup_fisher, register_fisher

# Imported for its side effect: its @register_fisher decorators register the closed forms.
importlib.import_module(f"{__name__}.families")

__all__ = [
    "COORDS", "MC_SAMPLES", "FisherFallbackWarning", "FisherOperator", "ParamSpec",
    "SingularFisherError", "fisher_information", "fisher_operator", "fisher_solve",
    "fisher_vp", "register_fisher", "DenseFisher", "DiagonalFisher", "DiagPlusRankOneFisher",
    "ElementBlockFisher", "GaussianFisher", "LogitsFisher", "LowRankGaussianFisher",
    "ProbsFisher", "CategoricalMeanFisher", "ReparamFisher", "ZeroFisher",
]

Coords = Union[str, dict]


def fisher_operator(d: Distribution, coords: Coords = "standard",
                    params: Optional[Sequence[str]] = None) -> FisherOperator:
    """The Fisher information of ``d`` as a structured linear operator.

    Same arguments as :func:`fisher_information`; the operator offers ``mv``,
    ``solve(v, damping)`` and ``dense()`` without forming the matrix unless asked.
    """
    if not isinstance(d, Distribution):
        raise TypeError(f"expected a torch.distributions.Distribution, got {type(d).__name__}")
    check_coords(coords)
    if params is not None:
        params = (params,) if isinstance(params, str) else tuple(params)
        if not params:
            raise ValueError("params is empty: name at least one parameter, or pass "
                             "params=None for all of them")
    # A subclass of a wrapper registered as itself is the user's to answer for: unwrapped,
    # its registration was silently ignored.
    wrapped = not any(isinstance(d, w) and lookup_fisher(type(d)) is not lookup_fisher(w)
                      for w in (Independent, MaskedDistribution, ExpandedDistribution))
    if wrapped and isinstance(d, Independent):  # block diagonal over the reinterpreted dims
        op = fisher_operator(d.base_dist, coords, params)
        return op.reinterpret(d.reinterpreted_batch_ndims)
    if wrapped and isinstance(d, MaskedDistribution):
        # The mask only drops log_prob terms: draws, and so the KL metric, are the base's,
        # whose batch shape pyro has already broadcast against the mask.
        return fisher_operator(d.base_dist, coords, params)
    if wrapped and isinstance(d, ExpandedDistribution):
        return _expanded(d, coords, params)
    d = _one_alternative(d, params)
    fn = lookup_fisher(type(d))
    op = fn(d) if fn is not None else fallback_operator(d, params=params)
    _check_values(d, op)
    if coords in ("natural", "mean"):  # coordinates named eta/mean: check names after
        op = reparameterize(d, op, coords)
        if params is not None and set(params) != set(op.names):
            raise ValueError(
                f"coords={coords!r} has the coordinates {list(op.names)} of "
                f"{type(d).__name__}, each a function of all its parameters, so params "
                f"(or natural_gradient's grads) must name exactly these; got {list(params)}")
        return op
    if params is not None:
        unknown = [p for p in params if p not in op.names]
        if unknown:
            raise ValueError(f"params {unknown} are not coordinates of {type(d).__name__}; "
                             f"its coordinates are {list(op.names)}")
        op = op.restrict([n for n in op.names if n in params])
    return reparameterize(d, op, coords)


def _expanded(d, coords, params):
    """pyro's ``ExpandedDistribution``: the base's Fisher at every element of the larger
    batch, through ``base.expand`` (its parameters expanded, its structure kept) where the
    base has one, else the base's operator broadcast densely."""
    base = d.base_dist
    while isinstance(base, ExpandedDistribution):  # its expand() would mutate it in place
        base = base.base_dist
    base = _one_alternative(base, params)  # before expand() copies both alternatives
    try:
        expanded = base.expand(d.batch_shape)
    except NotImplementedError:
        expanded = None
    if expanded is None or isinstance(expanded, ExpandedDistribution):
        op = fisher_operator(base, coords, params)
        shape = d.batch_shape
        specs = [replace(s, value=s.value.expand(shape + s.event_shape)) for s in op.specs]
        return DenseFisher(specs, shape, op.dense().expand(shape + (op.dim, op.dim)))
    return fisher_operator(expanded, coords, params)


def fisher_information(d: Distribution, coords: Coords = "standard",
                       params: Optional[Sequence[str]] = None) -> torch.Tensor:
    """The Fisher information matrix of ``d``, shape ``d.batch_shape + (k, k)``.

    The ``k`` coordinates are the distribution's continuous parameters, in the
    order of its constructor arguments, flattened parameter by parameter (C
    order). It uses the arguments ``d`` was built with (``probs`` or ``logits``;
    for a multivariate normal ``loc`` and one of ``scale_tril``,
    ``covariance_matrix`` or ``precision_matrix``, of which only the lower
    triangle are coordinates, ``t_ij`` setting both entries of a symmetric
    matrix; ``probs`` normalised, as torch keeps them). Where torch stores the
    alternative too (it caches it when read, and ``expand()`` then copies both,
    forgetting which was passed), the one named in ``params`` is used; without one,
    the constructor's, or after such an ``expand()`` ``logits`` and ``scale_tril``.
    Counts such as ``total_count`` are fixed. ``Independent`` wrappers give the
    block-diagonal Fisher over all reinterpreted entries; pyro's ``.mask()`` and
    ``.expand()`` wrappers (``MaskedDistribution``, ``ExpandedDistribution``) the base's
    Fisher at each element of their batch (a mask drops ``log_prob`` terms, not draws).

    :param d: a :class:`torch.distributions.Distribution` (Pyro's included).
    :param coords: ``"standard"`` (the parameters themselves); ``"unconstrained"``
        (each constrained parameter as ``transform_to(constraint)`` of a real
        coordinate, e.g. ``log`` of a scale); ``"natural"`` or ``"mean"``
        (exponential families, see :mod:`pyro_natgrad.fisher.expfam`); or a dict
        ``{param_name: Transform}`` mapping coordinates to parameters. In
        coordinates ``u`` with ``theta = phi(u)``, ``F_u = J^T F_theta J``.
    :param params: a subset of parameter names; the others are held fixed (e.g.
        ``params=("loc", "scale")`` for a Student-t with fixed ``df``). With
        ``coords="natural"`` or ``"mean"`` the names are those coordinates' (``eta1``,
        ``eta2``, ... as listed by ``fisher_operator(d, coords).names``), all of them.
    :raises ValueError: for an unknown ``coords`` or parameter name, parameter
        values outside their constraints, or an infinite Fisher of a categorical (its
        zero probabilities, in ``probs``, mean or natural coordinates). The
        one-parameter binary and count families (Bernoulli, Binomial, Geometric,
        NegativeBinomial, Poisson) return ``inf`` there instead (a probability or rate
        on the boundary of its support, in standard or mean coordinates): their entries
        are independent, so an infinite one spoils no other, its solve is 0 and its
        product with 0 is 0.
    """
    return fisher_operator(d, coords, params).dense()


def fisher_vp(d: Distribution, v: torch.Tensor, coords: Coords = "standard",
              params: Optional[Sequence[str]] = None) -> torch.Tensor:
    """``F v`` for ``v`` of shape ``batch_shape + (k,)`` (extra leading dims allowed; other
    shapes raise a ValueError), without forming ``F``. Returns ``v``'s shape."""
    return fisher_operator(d, coords, params).mv(v)


def fisher_solve(d: Distribution, v: torch.Tensor, damping: float = 0.0,
                 coords: Coords = "standard",
                 params: Optional[Sequence[str]] = None) -> torch.Tensor:
    """``(F + damping I)^{-1} v``, structured where the family allows (elementwise
    for diagonal families, O(d^3) for a full-rank Gaussian).

    Some Fisher matrices are singular. ``Delta`` (zero) and ``LowRankMultivariateNormal``
    of rank ``>= 2`` over ``cov_factor`` (``cov_factor @ R``, ``R`` orthogonal, is the same
    distribution) need ``damping > 0``; undamped solves raise
    :class:`SingularFisherError`. ``Categorical`` and ``Multinomial`` (singular along
    ``p`` in ``probs``, along ``1`` in ``logits`` and unconstrained coordinates) return the
    minimum-norm solution when ``v`` is in the range of ``F``, as the gradient of any
    function of the distribution is (see their closed forms for other ``v``). Built from
    ``probs`` with zero probabilities, their solves are the finite limits from positive
    ones, though ``F`` itself is infinite (``diag(1/p)``; see the API docs).

    ``v`` has shape ``batch_shape + (k,)``, extra leading dims allowed (others raise a
    ValueError), as for :func:`fisher_vp`; the result has ``v``'s shape.
    """
    return fisher_operator(d, coords, params).solve(v, damping)


def _one_alternative(d, params):
    """``d``, or a shallow copy of it keeping only one stored alternative of each group:
    the one named in ``params``, else the constructor's (:func:`_constructed_with`).

    torch caches an alternative once it is read (``probs`` of a logits-built Bernoulli by
    ``.mean`` or sampling, ``logits`` of a probs-built one by ``log_prob``), and
    ``expand()`` copies both."""
    categorical = getattr(d, "_categorical", None)  # Multinomial keeps its probs there
    if isinstance(categorical, Distribution):
        inner = _one_alternative(categorical, params)
        if inner is not categorical:
            d = copy.copy(d)
            d._categorical = inner
    for group in ALTERNATIVES:
        stored = [name for name in vars(d) if name in group]
        wanted = [n for n in group if params is not None and n in params and n not in stored]
        if stored and wanted and isinstance(getattr(type(d), wanted[0], None), lazy_property):
            # Named but not yet computed (logits of a probs-built Bernoulli before any
            # log_prob): computing it makes the answer independent of torch's cache.
            d = copy.copy(d)
            getattr(d, wanted[0])
            stored = [name for name in vars(d) if name in group]
        if len(stored) < 2:
            continue
        named = [name for name in stored if params is not None and name in params]
        keep = named[0] if named else _constructed_with(d, stored, group)
        d = copy.copy(d)
        for name in stored:
            if name != keep:
                del d.__dict__[name]  # a lazy property: recomputed from `keep` if read
    return d


def _constructed_with(d, stored, group):
    """The constructor stores its argument first (Bernoulli and kin also as ``_param``).
    ``expand()`` instead writes in a fixed order (``probs`` then ``logits``, re-pointing
    ``_param`` at ``logits``; MultivariateNormal's ``loc`` first): the argument is then
    unknown and the first of ``group`` (``logits``, ``scale_tril``) is used."""
    param = vars(d).get("_param")
    if param is not None:
        return next((name for name in stored if vars(d)[name] is param), group[0])
    return stored[0] if next(iter(vars(d))) in stored else group[0]


def _check_values(d, op):
    for s in op.specs:
        c = d.arg_constraints.get(s.name)
        value = s.value
        bad = ~torch.isfinite(value)
        if value.numel() == 0:
            continue  # an empty batch (torch's own checks of some constraints fail on it)
        if c is not None and not constraints.is_dependent(c):
            bad = bad | ~_expand_check(c.check(value), value, c.event_dim)
        if bool(bad.any()):
            raise ValueError(
                f"{type(d).__name__}: parameter {s.name!r} has values outside its constraint "
                f"{c} (or non-finite values); the Fisher information is undefined there. "
                f"Build the distribution with valid parameters (validate_args=True catches this "
                f"at construction).")


def _expand_check(ok, value, event_dim):
    return ok.reshape(ok.shape + (1,) * (value.dim() - ok.dim())).expand(value.shape) \
        if ok.dim() < value.dim() else ok
