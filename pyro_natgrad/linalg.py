"""Small batched linear-algebra routines shared by the Fisher and GGN operators."""

import math
from typing import Callable, NamedTuple, Optional

import torch


class CGInfo(NamedTuple):
    """How :func:`conjugate_gradient` stopped."""

    iterations: int  # products with A
    converged: bool  # every residual within tol
    negative_curvature: bool  # stopped at a direction with p^T A p <= 0


#: The true residual ``b - A x`` counts as within ``tol`` only when it is, by this many
#: estimates of the product's rounding error (:func:`product_rounding`), below
#: ``tol |b|``. An estimate, not a bound: over 9,000 random float32 operators (dense,
#: ``J^T J`` and diagonal; 1-400 dims; condition numbers up to 1e8) the actual error of
#: ``A x`` had a median of 0.85 estimates and exceeded 4 twice (4.3 and 5.0, both
#: ``J^T J`` of under 10 dims, where two probes say least).
CERTIFY_MARGIN = 4.0
#: ``A (s x) / s - A x`` for these inexact scales s rounds differently from ``A x``.
_ROUNDING_PROBES = (0.75, 1.25)


def product_rounding(matvec: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                     Ax: torch.Tensor) -> torch.Tensor:
    """An estimate of ``|fl(A x) - A x|`` per system (shape ``... + (1,)``), from the
    spread of ``A (s x) / s`` about ``A x`` over two inexact scales ``s``, and never less
    than the rounding of the result itself, ``eps |A x|``. Two more products."""
    spread = sum((matvec(s * x) / s - Ax).square().sum(-1, keepdim=True)
                 for s in _ROUNDING_PROBES)
    # Each difference holds two independent roundings, hence the 2 per probe.
    # A probe that overflows leaves nothing certified (not a NaN that compares False).
    estimate = (spread / (2 * len(_ROUNDING_PROBES))).sqrt().nan_to_num(nan=math.inf)
    return torch.maximum(estimate, torch.finfo(Ax.dtype).eps * Ax.norm(dim=-1, keepdim=True))


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    precond: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    tol: float = 1e-10,
    max_iter: int = 1000,
    raise_on_fail: bool = True,
    return_info: bool = False,
    check_residual: bool = True,
    stop_at_negative_curvature: Optional[bool] = None,
):
    """Solve ``A x = b`` for symmetric positive definite ``A`` given as ``matvec``.

    Batched over all leading dims of ``b`` (shape ``... + (k,)``); each system
    stops when ``|r| <= tol * |b|``.

    :param precond: applies an approximation of ``A^{-1}`` (identity if None).
    :param return_info: return ``(x, CGInfo)``.
    :param check_residual: check convergence on the true residual ``b - A x`` (one more
        product), and restart from it where the recursively updated residual met ``tol``
        but the true one does not: in float32 with a condition number of ``1e7`` the
        recursive one "met" ``1e-7`` at a true ``3e-5``. The true residual is computed
        with ``A``'s own rounding, which at that condition number is itself about
        ``1e-5 |b|``: it counts as met only with :data:`CERTIFY_MARGIN` estimates of that
        rounding (:func:`product_rounding`, two more products) to spare, and where the
        rounding alone leaves no room for ``tol`` the solve stops as failed. ``False``
        for truncated CG, whose callers count their products.
    :param stop_at_negative_curvature: a search direction of non-positive curvature,
        ``p^T A p <= 0`` (``A`` is not positive definite), stops every system at once
        with the iterate reached (a truncated-Newton step; reported in ``CGInfo``),
        where otherwise that system stops moving and the others go on. Default:
        ``return_info``.
    :raises RuntimeError: if some system does not meet ``tol`` in ``max_iter``
        iterations, or ``A``'s rounding rules ``tol`` out, and ``raise_on_fail``.
    """
    if stop_at_negative_curvature is None:
        stop_at_negative_curvature = return_info
    precond = precond or (lambda r: r)
    x = torch.zeros_like(b)
    r = b.clone()
    z = precond(r)
    p = z.clone()
    rz = (r * z).sum(-1, keepdim=True)
    bnorm = b.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(b.dtype).tiny)
    # The latest estimate of A's rounding at x: the recursive residual must leave room
    # for it too, or a solve whose true residual fell short would be checked every step.
    rounding = torch.zeros_like(bnorm)

    def result(x, products, converged, negative=False):
        return (x, CGInfo(products, converged, negative)) if return_info else x

    def met(r):
        return r.norm(dim=-1, keepdim=True) + CERTIFY_MARGIN * rounding <= tol * bnorm

    def out_of_reach():
        return bool((CERTIFY_MARGIN * rounding > tol * bnorm).any())

    products = since_check = 0
    # Also after k iterations (exact CG would have finished), then 2k, 4k, ...: a recursive
    # residual that stalls above tol would otherwise hide a tol out of reach until
    # max_iter. |x| grows along CG's iterates, and with it the rounding, so a tol out of
    # reach at an iterate is out of reach at the solution.
    check_after = b.shape[-1]
    for k in range(max_iter):
        done = met(r)
        due = check_residual and since_check >= check_after
        if bool(done.all()) or due:
            if not check_residual:
                return result(x, products, True)
            Ax = matvec(x)
            true = b - Ax
            rounding = product_rounding(matvec, x, Ax)
            products += 1 + len(_ROUNDING_PROBES)
            if due:
                check_after *= 2
            since_check = 0
            if bool(met(true).all()):
                return result(x, products, True)
            if out_of_reach():  # more iterations cannot help
                r = true
                break
            if bool(done.all()):
                # The recursive residual drifts from b - A x in rounding: restart from the
                # true one.
                r = true
                z = precond(r)
                p = z.clone()
                rz = (r * z).sum(-1, keepdim=True)
            done = met(r)
        Ap = matvec(p)
        products += 1
        since_check += 1
        pAp = (p * Ap).sum(-1, keepdim=True)
        # A solved system's direction is 0 (p^T A p = 0): not a sign of negative curvature.
        if stop_at_negative_curvature and not bool(((pAp > 0) | done).all()):
            return result(x, products, False, True)
        alpha = torch.where(pAp > 0, rz / pAp.where(pAp > 0, torch.ones_like(pAp)),
                            torch.zeros_like(pAp))
        x = x + alpha * p
        r = r - alpha * Ap
        z = precond(r)
        rz_new = (r * z).sum(-1, keepdim=True)
        beta = torch.where(rz > 0, rz_new / rz.where(rz > 0, torch.ones_like(rz)),
                           torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_new
    else:  # max_iter used up
        if check_residual:
            Ax = matvec(x)
            r = b - Ax
            products += 1
            if bool(met(r).all()):
                rounding = product_rounding(matvec, x, Ax)
                products += len(_ROUNDING_PROBES)
    if bool(met(r).all()):
        return result(x, products, True)
    if raise_on_fail:
        worst = (r.norm(dim=-1, keepdim=True) / bnorm).max().item()
        if check_residual and math.isfinite(worst) and not bool(rounding.any()):
            # Whether more iterations could help: rounding may put tol out of reach. (Here
            # max_iter ran out, and Ax is the product at x just taken.)
            rounding = product_rounding(matvec, x, Ax)
        if not math.isfinite(worst):
            cause = "the products went non-finite; check the operator and the right-hand side"
        elif out_of_reach():
            noise = (rounding / bnorm).max().item()
            raise RuntimeError(
                f"conjugate gradients cannot certify relative residual {tol:g} in "
                f"{b.dtype}: the product's own rounding at the iterate reached is about "
                f"{noise:.2g} of |b| (the system is ill-conditioned), so its residual "
                f"{worst:.3g} may be off by more than tol; solve in float64, loosen tol "
                f"or raise damping")
        else:
            cause = "raise damping or max_iter"
            noise = (rounding / bnorm).max().item()
            if noise > 0:
                cause += (f" (a residual counts as met with {CERTIFY_MARGIN:g} estimates of "
                          f"the product's rounding, here {noise:.2g} of |b|, to spare)")
        raise RuntimeError(f"conjugate gradients did not reach relative residual {tol:g} in "
                           f"{max_iter} iterations (reached {worst:.3g}); {cause}")
    return result(x, products, False)
