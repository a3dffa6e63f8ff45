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
``arg_constraints`` (discrete ones such as counts are held fixed), and the
distribution must be rebuildable as ``type(d)(**params, **other_args)``.
Each route warns once per family with :class:`FisherFallbackWarning`.
"""

import inspect
import warnings

import torch
from torch.distributions import constraints, kl

from .operators import DenseFisher
from .params import ParamSpec, flatten, unflatten

#: Number of samples of the Monte Carlo route.
MC_SAMPLES = 10_000

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
    present = [k for k in vars(d) if k in d.arg_constraints and k in args]
    for name in args:
        c = d.arg_constraints.get(name)
        value = vars(d).get(name)
        if c is None or name not in present or constraints.is_dependent(c) or c.is_discrete:
            continue
        if not (torch.is_tensor(value) and value.is_floating_point()):
            continue
        # Alternatives such as probs/logits: the constructor's comes first in vars(d).
        if {name, "probs", "logits"} >= {"probs", "logits"} and any(
                s.name in ("probs", "logits") for s in specs):
            continue
        packing = "tril" if c in (constraints.lower_cholesky, constraints.positive_definite) \
            else "full"
        specs.append(ParamSpec(name, value.detach(), c.event_dim, packing))
    if not specs:
        raise ValueError(f"{type(d).__name__} has no continuous parameters to take a Fisher "
                         f"information over")
    return specs


def _rebuild(d, specs):
    names = {s.name for s in specs}
    taken = names | ({"probs", "logits"} if names & {"probs", "logits"} else set())
    fixed = {}
    for arg in _signature(d):
        if arg in taken or not hasattr(d, arg):
            continue
        if arg in d.arg_constraints and arg not in vars(d):
            continue  # a lazy alternative parameterisation
        fixed[arg] = getattr(d, arg)

    def make(params):
        return type(d)(**params, **fixed, validate_args=False)

    return make


def _has_kl(d):
    fn = kl._dispatch_kl(type(d), type(d))
    # torch's KL between transformed distributions with equal transforms is the base's KL,
    # blind to parameters held by the transforms (Weibull, Kumaraswamy): no Hessian there.
    return fn is not NotImplemented and fn is not getattr(kl, "_kl_transformed_transformed", None)


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
        if s.packing == "tril" and s.name != "scale_tril":
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
    with torch.no_grad():
        sample = make(_params(specs, x0)).sample((n,))
    with torch.enable_grad():
        # A copy of the parameters per sample gives per-sample scores in one backward.
        x = x0.detach().expand((n,) + x0.shape).clone().requires_grad_()
        logp = make(_params(specs, x)).log_prob(sample)
        (score,) = torch.autograd.grad(logp.sum(), x)
    return torch.einsum("n...i,n...j->...ij", score, score) / n
