"""Changes of coordinates: ``F_u = J^T F_theta J`` with ``J = d theta / d u``.

``coords`` is one of :data:`COORDS` or a dict ``{param_name: Transform}`` giving
the map from each named coordinate to its parameter.
"""

from typing import Dict

import torch
from torch.distributions import (
    Bernoulli, Binomial, Geometric, NegativeBinomial, constraints, transform_to,
)
from torch.distributions.transforms import (
    ComposeTransform, IndependentTransform, LowerCholeskyTransform, SigmoidTransform,
    SoftmaxTransform, Transform,
)

from .expfam import exponential_family_coords
from .operators import (
    CategoricalMeanFisher, DiagonalFisher, FisherOperator, LogitsFisher, ProbsFisher,
    ReparamFisher,
)
from .params import ParamSpec, flatten, unflatten
from .registry import lookup_fisher

#: The named coordinate systems accepted by ``coords``.
COORDS = ("standard", "unconstrained", "natural", "mean")


def check_coords(coords):
    if isinstance(coords, dict):
        for name, t in coords.items():
            if not isinstance(t, Transform):
                raise TypeError(f"coords[{name!r}] must be a torch.distributions Transform "
                                f"mapping the coordinate to the parameter, got {type(t).__name__}")
        return
    if coords not in COORDS:
        raise ValueError(f"unknown coords {coords!r}; valid names are {', '.join(COORDS)}, "
                         f"or a dict {{param_name: Transform}}")


def _entrywise(t: Transform) -> bool:
    """Whether each output entry depends only on the same input entry."""
    if isinstance(t, ComposeTransform):
        return all(_entrywise(p) for p in t.parts)
    if isinstance(t, IndependentTransform):  # only reinterprets dims as event dims
        return _entrywise(t.base_transform)
    if isinstance(t, LowerCholeskyTransform) \
            or type(t).__name__ == "SoftplusLowerCholeskyTransform":
        return True  # entrywise on the lower triangle, which is all the coordinates read
    return t.domain.event_dim == 0 and t.codomain.event_dim == 0


def _is_real(c) -> bool:
    """Unconstrained already (``real``, ``real_vector``, ``independent(real, n)``): its
    ``transform_to`` is the identity, so the coordinates and the operator (with its
    structured solves) stay as they are."""
    while isinstance(c, constraints.independent):
        c = c.base_constraint
    return c is constraints.real


def reparameterize(d, op: FisherOperator, coords) -> FisherOperator:
    """Express ``op`` (standard coordinates of ``d``) in ``coords``."""
    if coords == "standard":
        return op
    if coords in ("natural", "mean"):
        return _expfam(d, op, coords)
    if coords == "unconstrained":
        transforms = {}
        for s in op.specs:
            c = d.arg_constraints.get(s.name)
            if c is not None and not _is_real(c) and not constraints.is_dependent(c):
                transforms[s.name] = transform_to(c)
        softmax = _softmax_of_probs(d, op, transforms)
        if softmax is not None:
            return softmax
    else:
        unknown = [k for k in coords if k not in op.names]
        fixed = [k for k in unknown if k in d.arg_constraints and k in vars(d)]
        if fixed:
            raise ValueError(f"coords names {fixed}, which params (or natural_gradient's "
                             f"grads) hold fixed; the coordinates here are "
                             f"{list(op.names)}: name a transform only for those")
        if unknown:
            raise ValueError(f"coords names {unknown}, which are not coordinates of "
                             f"{type(d).__name__}; its coordinates are {list(op.names)}")
        transforms = dict(coords)
    sigmoid = _sigmoid_of_probs(d, op, transforms)
    if sigmoid is not None:
        return sigmoid
    return _per_parameter(op, transforms)


def _softmax_of_probs(d, op, transforms):
    """Categorical / Multinomial ``probs`` in unconstrained coordinates: ``transform_to``
    gives ``probs = softmax(u)``, so ``u`` are logits (``log probs`` here), with the
    logits' Fisher and its structured, minimum-norm solves (singular along ``1``)."""
    if not (type(op) is ProbsFisher and op.name in transforms
            and isinstance(transforms[op.name], SoftmaxTransform)):
        return None
    (spec,) = op.specs
    probs = spec.value / spec.value.sum(-1, keepdim=True)
    return LogitsFisher([ParamSpec(spec.name, probs.log(), spec.event_dim)], op.batch_shape,
                        probs, -op.c, op.family)


#: Families with ``probs = sigmoid(logits)`` and the constructor arguments they take
#: besides it; families.py registers their Fisher in logits.
_BINARY = ((Bernoulli, ()), (Binomial, ("total_count",)), (Geometric, ()),
           (NegativeBinomial, ("total_count",)))


def _sigmoid_of_probs(d, op, transforms):
    """A binary family's ``probs`` through a sigmoid (``transform_to`` of its interval): the
    coordinate ``u`` is its logits, and ``F_u`` the Fisher of the family built from
    ``log p - log(1 - p)``: ``p(1-p)``, ``n p(1-p)``, ``1 - p``, ``r p``, each with its own
    limit at each end (Geometric's is 1 as ``p -> 0``, NegativeBinomial's ``r`` as
    ``p -> 1``). ``J F J`` through torch's sigmoid, clamped to ``[tiny, 1 - eps]``, is 0
    beyond that range; :func:`~.operators._zero_at_the_ends` knows only the limit 0."""
    t = transforms.get("probs")
    if not (op.names == ("probs",) and type(op) is DiagonalFisher
            and type(t) is SigmoidTransform):
        return None
    fn = lookup_fisher(type(d))
    args = next((a for family, a in _BINARY
                 if isinstance(d, family) and fn is lookup_fisher(family)), None)
    if args is None:
        return None
    (spec,) = op.specs
    p = spec.value.detach()
    try:
        built = type(d)(logits=p.log() - torch.log1p(-p), validate_args=False,
                        **{a: getattr(d, a) for a in args})
    except (TypeError, ValueError):  # a subclass with a constructor of its own
        return None
    inner = fn(built)
    scale = None if inner.scale is None else {"probs": inner.scale["logits"]}
    # The coordinate's value is torch's inverse, as for any other transform.
    return DiagonalFisher([ParamSpec("probs", t.inv(p), spec.event_dim)], op.batch_shape,
                          {"probs": inner.inner["logits"]}, scale)


def _per_parameter(op, transforms: Dict[str, Transform]):
    if not transforms:
        return op  # every parameter is its own unconstrained coordinate (e.g. logits)
    specs = []
    for s in op.specs:
        t = transforms.get(s.name)
        if t is None:
            specs.append(s)
            continue
        # An empty batch has nothing outside (and torch's checks of some constraints fail
        # on it).
        ok = t.codomain.check(s.value.detach()) if s.value.numel() else None
        if ok is not None and not bool(ok.all()):
            raise ValueError(
                f"coords[{s.name!r}] = {t} maps onto {t.codomain}, which does not contain the "
                f"current value of {s.name!r} ({int((~ok).sum())} of {ok.numel()} entries "
                f"outside); no coordinate gives this parameter. Use a transform whose "
                f"codomain contains it.")
        u = t.inv(s.value.detach())
        shift = t.domain.event_dim - t.codomain.event_dim
        same_square = s.packing == "tril" and u.shape[-2:] == s.value.shape[-2:]
        specs.append(ParamSpec(s.name, u, s.event_dim + shift, "tril" if same_square else "full"))

    def phi(u):
        return {k: transforms[k](x) if k in transforms else x for k, x in u.items()}

    elementwise = all(_entrywise(t) for t in transforms.values())
    return ReparamFisher(specs, op.batch_shape, op, phi, elementwise)


def _expfam(d, op, coords):
    ef = exponential_family_coords(d)
    if ef is None:
        raise ValueError(f"coords={coords!r} needs an exponential family; "
                         f"{type(d).__name__} is not one (or none is registered). "
                         f"Use 'standard' or 'unconstrained'.")
    standard = set(ef.from_natural(ef.natural))
    if standard != set(op.names):
        # a subclass registered over other parameters than the ancestor whose
        # exponential-family coordinates it inherits
        raise ValueError(
            f"coords={coords!r}: the Fisher of {type(d).__name__} is over {list(op.names)}, "
            f"but the exponential-family coordinates it inherits map to {sorted(standard)}. "
            f"Use coords='standard' or 'unconstrained'.")
    if coords == "natural":
        values, phi = ef.natural, ef.from_natural
        _check_natural(d, op, values)
    elif isinstance(op, (ProbsFisher, LogitsFisher)):
        # F_mean = Cov(T)^{-1}: its solves (products with Cov(T)) stay finite at zero
        # probabilities, where the chain through d probs / d m meets F_probs = diag(1/p).
        (name, value), = ef.to_mean({s.name: s.value for s in op.specs}).items()
        spec = ParamSpec(name, value.detach(), *ef.layout[name])
        return CategoricalMeanFisher([spec], op.batch_shape, op.u if isinstance(
            op, LogitsFisher) else op.probs, -op.c, type(d).__name__)
    else:
        values = ef.to_mean({s.name: s.value for s in op.specs})
        phi = ef.from_mean or _linearized_inverse(op, ef.to_mean, values)
    specs = [ParamSpec(k, v.detach(), *ef.layout[k]) for k, v in values.items()]
    return ReparamFisher(specs, op.batch_shape, op, phi, elementwise=False)


def _check_natural(d, op, values):
    """A ValueError where the natural coordinates are infinite: a zero probability (of a
    categorical built from probs, ``log(p_i / p_k)``; a Bernoulli's ``logit 0``) is no
    point of them, and the Fisher there no function of them."""
    bad = [k for k, v in values.items() if not bool(torch.isfinite(v).all())]
    if not bad:
        return
    zero = [s.name for s in op.specs if s.name == "probs" and bool((s.value == 0).any())]
    why = (f"{zero[0]!r} has zero probabilities, which are at infinity in natural "
           f"coordinates (log-probabilities)" if zero else
           f"the parameters {list(op.names)} are on the boundary of the family")
    raise ValueError(
        f"coords='natural': the natural coordinates {bad} of {type(d).__name__} are not "
        f"finite here: {why}. Build the distribution from logits (finite log-probabilities) "
        f"or keep the probabilities positive; or use coords='standard' or 'mean'.")


def _linearized_inverse(op, forward, values):
    """``m -> theta0 + J^{-1} (m - m0)``, ``J = d forward / d theta`` at ``theta0``:
    the inverse of ``forward`` to first order, exact for Jacobians."""
    theta_specs = op.specs
    theta0 = {s.name: s.value.detach() for s in theta_specs}
    m_specs = [ParamSpec(k, v.detach(), theta_specs[0].event_dim if v.dim() > len(op.batch_shape)
                         else 0) for k, v in values.items()]

    def flat_forward(x):
        return flatten(m_specs, forward(unflatten(theta_specs, x)))

    x0 = flatten(theta_specs, theta0)
    k = x0.shape[-1]
    eye = torch.eye(k, dtype=x0.dtype, device=x0.device).expand(x0.shape[:-1] + (k, k))
    cols = [torch.func.jvp(flat_forward, (x0,), (eye[..., j],))[1] for j in range(k)]
    # In theta's dtype: forward mode promotes a 0-d float32 tensor met by a Python float
    # (Chi2's 0.5 * df) to float64 tangents.
    jac = torch.stack(cols, -1).to(x0.dtype)  # batch + (k_m, k_theta)
    m0 = flat_forward(x0)

    def phi(m):
        delta = torch.linalg.solve(jac, (flatten(m_specs, m) - m0).unsqueeze(-1)).squeeze(-1)
        return unflatten(theta_specs, x0 + delta)

    return phi
