"""Natural-gradient steps for one variational distribution of any family with a
closed-form Fisher (the sites of hand-written guides, :mod:`pyro_natgrad.handwritten`).

**Exponential families** (every argument of the distribution a parameter): mirror
descent in the natural parameters ``eta``,

    ``eta' = eta - rho F_eta^{-1} dl/deta``,

the natural gradient in ``eta`` being the ordinary gradient in the mean parameters.
For a conjugate model with exact gradients, ``rho = 1`` lands on the exact posterior
in one step. The optimizer holds gradients with respect to the unconstrained
parameters ``u`` (``theta = transform_to(constraint)(u)``), so with ``J = d eta / d u``
and ``F_u = J^T F_eta J`` (the Fisher in ``u``, from :func:`~pyro_natgrad.fisher.fisher_operator`
with ``coords={name: transform}``, structured where the transforms are entrywise):

    ``Delta eta = J F_u^{-1} dl/du = F_eta^{-1} dl/deta``

(one forward-mode product with ``J``; where ``u`` has more coordinates than ``eta``,
e.g. categorical logits, the minimum-norm solve gives the same ``Delta eta``). The new
``eta`` maps back to the standard parameters in closed form and from there to ``u``.

**Other families** (and sites where some arguments are fixed numbers, so the natural
parameters are not all free): a Fisher-preconditioned step in ``u``,
``u' = u - rho F_u^{-1} dl/du``.

Both steps are taken per batch element of the distribution, with ``rho`` from the
optimizer's schedule cut so that the quadratic estimate
``KL ~ rho^2/2 Delta^T F Delta <= min(max_kl, SITE_MAX_KL)``, and halved (per element,
up to 40 times) until the new parameters are finite and inside the distribution's and
the parameters' constraints and, where torch has the KL in closed form, both exact KL
divergences are within that bound; elements that never get there keep their
parameters. ``max_kl=None`` turns the bounds off.
A site that draws ``n`` independent copies of one distribution (parameters broadcast
by ``.expand``) has ``n`` times the Fisher, so its step is divided by ``n``.
"""

import math
from typing import Dict, Optional

import torch
from torch.distributions import constraints, kl_divergence

from .fisher import SingularFisherError, fisher_operator
from .fisher.expfam import exponential_family_coords
from .gaussian import full_gaussian_step

#: Halvings of the step size tried before an element's step is abandoned.
MAX_BACKTRACK = 40
#: Under a trust region, no step of a site moves any element further than this KL
#: (nats; exact in both directions where torch has the KL in closed form, else the
#: quadratic estimate), whatever ``max_kl``. These sites have neither the control
#: variate nor the variance limits of the Gaussian groups, and single-draw gradients
#: sent them far in one step: hand-written Beta guides to U-shaped Betas they never
#: left (4 of 8 seeds, float32, Beta-Bernoulli), Laplace and Student-t guides into
#: growing oscillations, categorical ones to a point mass. 0.3 was slower on a
#: categorical score-function guide, 0.1 much slower.
SITE_MAX_KL = 1.0


def _per_batch(ok, batch_shape) -> torch.Tensor:
    """Reduce a boolean tensor (batch dims first) to ``batch_shape``."""
    ok = torch.as_tensor(ok, dtype=torch.bool)
    nb = len(batch_shape)
    if ok.dim() > nb:
        ok = ok.reshape(ok.shape[:nb] + (-1,)).all(-1)
    return torch.broadcast_to(ok, batch_shape)


def _bcast(r, x, nb):
    """``r`` (batch shape) reshaped to broadcast against ``x`` (batch dims first)."""
    return r.reshape(r.shape + (1,) * (x.dim() - nb))


def write_param(param, value):
    if not bool(torch.isfinite(value).all()):
        raise FloatingPointError("a natural-gradient step produced non-finite values; "
                                 "this is a bug, please report it")
    param.data.copy_(value)


def pinv_solve(F, v):
    """Minimum-norm ``F^+ v`` for symmetric positive semi-definite ``F`` (batched)."""
    lam, Q = torch.linalg.eigh(F)
    top = lam.max(-1, keepdim=True).values.clamp_min(0)
    tol = top * F.shape[-1] * torch.finfo(F.dtype).eps * 10
    inv = torch.where(lam > tol, lam.reciprocal(), torch.zeros_like(lam))
    return Q @ (inv.unsqueeze(-1) * (Q.mT @ v))


def _exact_kl_ok(site, d, theta_new, ok, bound, batch):
    """``KL(q' || q) <= bound`` and ``KL(q || q') <= bound`` per element where torch has
    the KL in closed form (the quadratic estimate alone lets noisy single-sample steps
    jump far, e.g. to a U-shaped Beta); True where it has not."""
    safe = {r: torch.where(_bcast(ok, v, len(batch)), v, getattr(d, r).detach().expand_as(v))
            for r, v in theta_new.items()}
    try:
        q_new = site.make(safe)
        kl = torch.maximum(kl_divergence(q_new, d), kl_divergence(d, q_new))
    except NotImplementedError:
        return torch.ones(batch, dtype=torch.bool, device=ok.device)
    return _per_batch(torch.nan_to_num(kl, nan=math.inf) <= bound, batch)


def expfam_site_step(site, grads: Dict[str, torch.Tensor], rho: float,
                     max_kl: Optional[float]) -> Optional[torch.Tensor]:
    """One step of an ``ExpFamSite`` (:mod:`pyro_natgrad.handwritten`); writes the new
    parameters and returns the step size used per batch element (None: no step,
    the Fisher was singular)."""
    roles = list(site.params)
    T = site.transforms
    with torch.no_grad():
        u = {r: site.params[r].detach().clone() for r in roles}
        theta = {r: T[r](u[r]) for r in roles}
        d = site.make(theta)
    op = fisher_operator(d, coords={r: T[r] for r in roles}, params=roles)
    g = op.flatten({r: grads[r].detach() for r in op.names})
    try:
        nat = op.solve(g)
    except SingularFisherError:
        # Coordinates with a redundant direction (a softmax-parameterised simplex,
        # logits): the minimum-norm solve. The gradient lies in the range of F_u
        # (it is J^T dl/deta), so J applied to it still gives F_eta^{-1} dl/deta.
        nat = pinv_solve(op.dense(), g.unsqueeze(-1)).squeeze(-1)
    if not bool(torch.isfinite(nat).all()):
        return None
    batch = op.batch_shape
    nb = len(batch)
    count = float(site.count)
    # sqrt(g^T F^{-1} g / 2 count) = sqrt(top) sqrt((g / top)^T F^{-1} g / 2 count): the
    # product of a huge but finite float32 gradient and its natural gradient overflows,
    # and made the step 0.
    tiny = torch.finfo(g.dtype).tiny
    top = g.abs().amax(-1, keepdim=True).clamp_min(tiny)
    root = top.squeeze(-1).sqrt() * (0.5 * (g / top * nat).sum(-1) / count).clamp_min(0).sqrt()
    root = root.clamp_min(tiny)
    rho_t = torch.full(batch, float(rho), dtype=g.dtype, device=g.device)
    if max_kl is not None:
        bound = min(max_kl, SITE_MAX_KL)
        rho_t = torch.minimum(rho_t, math.sqrt(bound) / root)
    du = op.unflatten(nat / count)

    if site.mirror:
        ef = exponential_family_coords(d)
        keys = list(ef.natural)
        eta = {k: ef.natural[k].detach() for k in keys}

        def natural_of(*flat):
            uu = dict(zip(roles, flat))
            coords = exponential_family_coords(site.make({r: T[r](uu[r]) for r in roles}))
            return tuple(coords.natural[k] for k in keys)

        # Reverse-over-reverse: forward mode of some ops (cholesky_inverse) is wrong.
        _, deta = torch.autograd.functional.jvp(
            natural_of, tuple(u[r] for r in roles), tuple(du[r] for r in roles))
        deta = dict(zip(keys, deta))

        def candidate(r):
            new_eta = {k: eta[k] - _bcast(r, eta[k], nb) * deta[k] for k in keys}
            th = ef.from_natural(new_eta)
            th = {k: th[k] for k in roles}
            return th, {k: T[k].inv(th[k]) for k in roles}
    else:
        def candidate(r):
            uu = {k: u[k] - _bcast(r, u[k], nb) * du[k] for k in roles}
            return {k: T[k](uu[k]) for k in roles}, uu

    result = {r: u[r].clone() for r in roles}
    accepted = torch.zeros(batch, dtype=torch.bool, device=g.device)
    with torch.no_grad():
        for _ in range(MAX_BACKTRACK):
            try:
                th, uu = candidate(rho_t)
                ok = torch.ones(batch, dtype=torch.bool, device=g.device)
                for r in roles:
                    ok = ok & _per_batch(torch.isfinite(uu[r]), batch)
                    ok = ok & _per_batch(torch.isfinite(th[r]), batch)
                    for c in (d.arg_constraints.get(r), site.constraints.get(r)):
                        if c is not None and not constraints.is_dependent(c):
                            ok = ok & _per_batch(c.check(th[r]), batch)
                if max_kl is not None and bool(ok.any()):
                    ok = ok & _exact_kl_ok(site, d, th, ok, bound / count, batch)
            except (RuntimeError, ValueError):  # e.g. a Cholesky of a non-PD matrix
                ok = torch.zeros(batch, dtype=torch.bool, device=g.device)
                uu = None
            new = ok & ~accepted
            if uu is not None and bool(new.any()):
                for r in roles:
                    result[r] = torch.where(_bcast(new, u[r], nb), uu[r], result[r])
            accepted = accepted | new
            if bool(accepted.all()):
                break
            rho_t = torch.where(accepted, rho_t, 0.5 * rho_t)
        rho_t = torch.where(accepted, rho_t, torch.zeros_like(rho_t))
        for r in roles:
            write_param(site.params[r], result[r])
    return rho_t


def tril_gaussian_step(site, grads, rho, max_kl):
    """``MultivariateNormal(loc, scale_tril=L)``: the Gaussian mirror step of
    :func:`~pyro_natgrad.gaussian.full_gaussian_step`, with ``dl/dL`` from the
    gradient of the unconstrained ``L`` (the transform is entrywise on the lower
    triangle). Returns the step size taken, or None, with nothing written, where the
    step overflows."""
    T = site.transforms["scale_tril"]
    with torch.no_grad():
        loc = site.params["loc"].detach()
        raw = site.params["scale_tril"].detach().clone()
    _, dL = torch.func.jvp(T, (raw,), (torch.ones_like(raw),))
    with torch.no_grad():
        L = T(raw)
        lower = torch.ones(L.shape[-2:], dtype=torch.bool, device=L.device).tril()
        G = torch.where(lower, grads["scale_tril"] / torch.where(lower, dL, torch.ones_like(dL)),
                        torch.zeros_like(dL))
        step = full_gaussian_step(loc, L, grads["loc"], G, rho, None, max_kl)
        new_raw = raw.triu(1) + T.inv(step.scale_tril).tril()
        if not (bool(torch.isfinite(step.loc).all()) and bool(torch.isfinite(new_raw).all())):
            return None  # an overflow (a gradient near the largest float): skipped, unchanged
        site.params["loc"].data.copy_(step.loc)  # checked above
        site.params["scale_tril"].data.copy_(new_raw)
    return step.rho
