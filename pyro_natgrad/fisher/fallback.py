"""Autograd Fisher information for families with no registered closed form.

Two routes, tried in order:

1. **KL Hessian** (exact): ``F = grad^2_theta KL(q_theta0 || q_theta)`` at ``theta0``,
   when :func:`torch.distributions.kl_divergence` knows the pair (other than through
   torch's generic rule for transformed distributions, which ignores parameters held by
   the transforms). Costs ``k`` Hessian-vector products.
2. **Monte Carlo**: ``F ~ (1/N) sum_n s_n s_n^T`` with ``s_n`` the score at
   ``N = MC_SAMPLES`` draws (standard error ``O(N^{-1/2})``); needs ``log_prob``
   differentiable in the parameters.

The parameters are the floating-point constructor arguments named in
``arg_constraints`` (discrete ones such as counts are held fixed), stored on the
distribution or read through a plain ``property`` (GammaPoisson, HalfCauchy keep them in
an inner distribution), and the distribution must be rebuildable as
``type(d)(**params, **other_args)``.
Each route warns once per family with :class:`FisherFallbackWarning`.
"""

import copy
import inspect
import warnings

import torch
from torch.distributions import Distribution, TransformedDistribution, constraints, kl
from torch.distributions.utils import lazy_property

from .operators import DenseFisher
from .params import ParamSpec, flatten, unflatten

#: Number of samples of the Monte Carlo route.
MC_SAMPLES = 10_000

#: Alternative parameterisations; the first is used where torch lost which was passed.
ALTERNATIVES = (("logits", "probs"), ("scale_tril", "covariance_matrix", "precision_matrix"),
                ("gate_logits", "gate"))

_warned = set()


class FisherFallbackWarning(UserWarning):
    """A Fisher matrix was computed by autograd, not by a registered closed form."""


def _warn_once(d, route):
    key = (type(d), route)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"no closed-form Fisher information is registered for "
                      f"{type(d).__name__}; using {route}. Register one with "
                      f"@pyro_natgrad.register_fisher({type(d).__name__}).",
                      FisherFallbackWarning, stacklevel=4)


def _signature(d):
    return [p for p in inspect.signature(type(d).__init__).parameters
            if p not in ("self", "validate_args")]


def _param_specs(d):
    specs, args = [], _signature(d)
    missing = [k for k, c in d.arg_constraints.items()
               if k not in args and not constraints.is_dependent(c) and not c.is_discrete]
    if missing:
        raise ValueError(
            f"{type(d).__name__} declares parameters {missing} in arg_constraints that are not "
            f"arguments of its constructor {tuple(args)}, so the autograd fallback cannot rebuild "
            f"it at other parameter values. Register its Fisher information with "
            f"@pyro_natgrad.register_fisher({type(d).__name__}) (or declare arg_constraints "
            f"over the constructor's arguments).")
    for name in args:
        c = d.arg_constraints.get(name)
        if c is None or constraints.is_dependent(c) or c.is_discrete:
            continue
        value = _arg_value(d, name)
        if not (torch.is_tensor(value) and value.is_floating_point()):
            continue
        # Alternatives such as probs/logits: the constructor's comes first in vars(d).
        if name in ("probs", "logits") and any(s.name in ("probs", "logits") for s in specs):
            continue
        symmetric = c is constraints.positive_definite
        packing = "tril" if symmetric or c is constraints.lower_cholesky else "full"
        specs.append(ParamSpec(name, value.detach(), _event_dim(d, name, value, c), packing,
                               symmetric))
    if not specs:
        raise _no_parameters_error(d)
    return specs


def _event_dim(d, name, value, c):
    """The dims of ``value`` after ``d.batch_shape``: ``c.event_dim`` can understate them
    (torch's LogisticNormal declares ``loc`` ``real``, yet it has an event dim)."""
    nb = len(d.batch_shape)
    if value.shape[:nb] != d.batch_shape or value.dim() - nb < c.event_dim:
        raise ValueError(
            f"{type(d).__name__}: parameter {name!r} has shape {tuple(value.shape)}, which "
            f"does not extend the batch shape {tuple(d.batch_shape)} by its constraint's "
            f"{c.event_dim} event dims, so the autograd fallback cannot lay out its Fisher "
            f"per batch element. Register its Fisher information with "
            f"@pyro_natgrad.register_fisher({type(d).__name__}).")
    return value.dim() - nb


def _arg_value(d, name):
    """Constructor argument ``name`` of ``d`` as stored, or read through a plain
    ``property``; None for anything else, in particular a lazy alternative (``probs`` of a
    logits-built family: reading it would compute and cache it) or a property standing for
    one (ZeroInflatedNegativeBinomial's ``probs``: which one was passed is unknown).

    A lazy property with no alternative among the constructor's arguments
    (MultivariateStudentT's ``scale_tril``: it takes no ``covariance_matrix``) can only be
    the argument passed: it is read, from a copy of ``d``, which it is cached on."""
    if name in vars(d):
        return vars(d)[name]
    group = next((g for g in ALTERNATIVES if name in g), ())
    if any(other != name and other in _signature(d) for other in group):
        return None
    kind = inspect.getattr_static(type(d), name, None)
    if isinstance(kind, property):
        return getattr(d, name)
    if isinstance(kind, lazy_property):
        return getattr(copy.copy(d), name)
    return None


def _no_parameters_error(d):
    """The error for a distribution with no readable continuous parameter: a wrapper
    (parameters in its base distribution or transforms), or a family without any."""
    name = type(d).__name__
    register = f"@pyro_natgrad.register_fisher({name})"
    if isinstance(d, TransformedDistribution):
        kinds = [type(t).__name__ for t in d.transforms]
        if all(t.bijective for t in d.transforms):
            use = ("Its transforms are bijective: if they hold no parameters of yours, the "
                   "Fisher over the base distribution's parameters is the base's, "
                   "fisher_operator(d.base_dist); otherwise register its Fisher with "
                   f"{register}.")
        else:
            use = ("Its transforms are not all bijective, so its Fisher differs from the base "
                   f"distribution's: register one with {register}, or build the model from a "
                   "family the library supports (e.g. HalfNormal rather than folding a "
                   "zero-mean Normal).")
        return ValueError(
            f"{name} of {type(d.base_dist).__name__} through {kinds} keeps its parameters in "
            f"its base distribution and transforms, not as constructor arguments named in "
            f"arg_constraints, so the Fisher library cannot read them. {use}")
    base = getattr(d, "base_dist", None)
    if isinstance(base, Distribution):
        return ValueError(
            f"{name} wraps {type(base).__name__} and names no parameters of its own in "
            f"arg_constraints, so the Fisher library cannot tell how it depends on the base's "
            f"parameters. Register its Fisher with {register}, or use fisher_operator("
            f"d.base_dist) if the wrapper leaves the distribution's law unchanged.")
    return ValueError(
        f"{name} has no continuous parameters to take a Fisher information over (none of "
        f"its constructor arguments {tuple(_signature(d))} is a floating-point tensor named in "
        f"arg_constraints {list(d.arg_constraints)}). If it has some, register its Fisher "
        f"with {register}.")


def _rebuild(d, specs):
    names = {s.name for s in specs}
    taken = names | ({"probs", "logits"} if names & {"probs", "logits"} else set())
    fixed = {}
    for arg in _signature(d):
        if arg in taken:
            continue
        if arg in d.arg_constraints:
            value = _arg_value(d, arg)  # never computes a lazy alternative
            if value is not None:
                fixed[arg] = value
        elif hasattr(d, arg):
            fixed[arg] = getattr(d, arg)

    def make(params):
        return type(d)(**params, **fixed, validate_args=False)

    try:  # fail here, with the fix, rather than deep inside autograd
        make({s.name: s.value for s in specs})
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"the autograd fallback cannot rebuild {type(d).__name__} from the constructor "
            f"arguments it can read ({', '.join(sorted(names | set(fixed)))}): "
            f"{type(e).__name__}: {str(e).rstrip('.')}. Register its Fisher information with "
            f"@pyro_natgrad.register_fisher({type(d).__name__}).") from e
    return make


#: KL divergences whose Hessian at ``theta = theta0`` autograd gets wrong: torch's
#: transformed-transformed KL is the base's, blind to parameters held by the transforms
#: (Weibull, Kumaraswamy); the Laplace KL has ``|loc - loc0|``, whose second derivative
#: at 0 autograd takes as 0 (a Laplace subclass over ``(loc, rate)`` got ``F_loc = 0``,
#: not ``rate^2``).
_UNUSABLE_KL = tuple(fn for fn in (getattr(kl, "_kl_transformed_transformed", None),
                                   getattr(kl, "_kl_laplace_laplace", None)) if fn is not None)


def _has_kl(d):
    fn = kl._dispatch_kl(type(d), type(d))
    return fn is not NotImplemented and fn not in _UNUSABLE_KL


def fallback_operator(d, mc_samples: int = None, params=None) -> DenseFisher:
    """The Fisher of ``d`` by autograd (see module docstring), as a dense operator;
    over ``params`` only, the others held fixed, when they are all parameters."""
    specs = _param_specs(d)
    if params is not None and {s.name for s in specs} >= set(params):
        specs = [s for s in specs if s.name in params]
    make = _rebuild(d, specs)
    x0 = flatten(specs, {s.name: s.value for s in specs})
    _check_regular(d, specs, make, x0)
    F = _kl_hessian(d, specs, make, x0) if _has_kl(d) else None
    if F is not None:
        _warn_once(d, "the Hessian of its registered KL divergence (exact)")
    else:
        n = mc_samples or MC_SAMPLES
        _warn_once(d, f"a Monte Carlo estimate of E[score score^T] from {n} samples")
        F = _mc_fisher(d, specs, make, x0, n)
    F = 0.5 * (F + F.mT)
    return DenseFisher(specs, d.batch_shape, F)


def _check_regular(d, specs, make, x0):
    """Refuse families whose support moves with the parameters (Uniform, Pareto): there
    the score does not have mean zero, ``E[s s^T]`` is not the curvature of the KL, and
    the KL's Hessian is not even positive semi-definite."""
    with torch.enable_grad():
        x = x0.detach().requires_grad_()
        support = make(_params(specs, x)).support
        bounds = _bounds_with_grad(support)
        if not bounds:
            return
        (grad,) = torch.autograd.grad(sum(b.sum() for b in bounds), x, allow_unused=True)
    blocks = unflatten(specs, grad if grad is not None else torch.zeros_like(x))
    moving = [k for k, g in blocks.items() if bool((g != 0).any())] or [s.name for s in specs]
    fixed = [s.name for s in specs if s.name not in moving]
    raise ValueError(
        f"{type(d).__name__}: its support {support} depends on the parameters {moving}, so "
        f"the family is not regular there and has no Fisher information metric (the score's "
        f"mean is not zero, the KL is not quadratic near the current point). "
        + (f"Hold them fixed with params={tuple(fixed)}, or register " if fixed else "Register ")
        + f"a metric of your choice with @pyro_natgrad.register_fisher({type(d).__name__}).")


def _bounds_with_grad(c):
    """The tensors inside constraint ``c`` (bounds, nested constraints) that carry a
    gradient, i.e. depend on the parameters the distribution was built from."""
    out = []
    for value in vars(c).values():
        if torch.is_tensor(value) and value.requires_grad:
            out.append(value)
        elif isinstance(value, constraints.Constraint):
            out.extend(_bounds_with_grad(value))
    return out


def _params(specs, x):
    from .params import symmetrize

    out = unflatten(specs, x)
    for s in specs:
        if s.symmetric:
            out[s.name] = symmetrize(out[s.name])
    return out


def _kl_hessian(d, specs, make, x0):
    with torch.enable_grad():
        x = x0.detach().requires_grad_()
        p0 = make(_params(specs, x0.detach()))
        div = kl.kl_divergence(p0, make(_params(specs, x))).sum()
        if not div.requires_grad:
            return None  # the registered KL ignores these parameters: use Monte Carlo
        g = torch.autograd.grad(div, x, create_graph=True)[0]
        cols = []
        for j in range(x.shape[-1]):
            # The KL is a sum over the batch, so column j of every block comes at once.
            cols.append(torch.autograd.grad(g[..., j].sum(), x, retain_graph=True)[0])
    return torch.stack(cols, -1).detach()


def _mc_fisher(d, specs, make, x0, n):
    # The draws leave the caller's random stream where it was: a Fisher is a property of
    # the distribution, and computing one must not change what a seeded run draws next.
    devices = [x0.device] if x0.device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            sample = make(_params(specs, x0)).sample((n,))
        with torch.enable_grad():
            # A copy of the parameters per sample gives per-sample scores in one backward.
            x = x0.detach().expand((n,) + x0.shape).clone().requires_grad_()
            logp = make(_params(specs, x)).log_prob(sample)
            (score,) = torch.autograd.grad(logp.sum(), x)
    except NotImplementedError as e:
        raise ValueError(
            f"{type(d).__name__} has no registered closed-form Fisher information and no "
            f"KL divergence, and the Monte Carlo estimate needs its sample() and log_prob(), "
            f"which raised NotImplementedError{f' ({e})' if str(e) else ''}. Register its "
            f"Fisher information with @pyro_natgrad.register_fisher({type(d).__name__}).") \
            from e
    return torch.einsum("n...i,n...j->...ij", score, score) / n
