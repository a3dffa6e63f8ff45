"""Small batched linear-algebra routines shared by the Fisher and GGN operators."""

import math
from typing import Callable, NamedTuple, Optional

import torch


class CGInfo(NamedTuple):
    """How :func:`conjugate_gradient` stopped."""

    iterations: int  # products with A
    converged: bool  # every residual within tol
    negative_curvature: bool  # stopped at a direction with p^T A p <= 0


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    precond: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    tol: float = 1e-10,
    max_iter: int = 1000,
    raise_on_fail: bool = True,
    return_info: bool = False,
    check_residual: bool = True,
):
    """Solve ``A x = b`` for symmetric positive definite ``A`` given as ``matvec``.

    Batched over all leading dims of ``b`` (shape ``... + (k,)``); each system
    stops when ``|r| <= tol * |b|``.

    :param precond: applies an approximation of ``A^{-1}`` (identity if None).
    :param return_info: return ``(x, CGInfo)``. Then a search direction of
        non-positive curvature, ``p^T A p <= 0`` (``A`` is not positive definite), stops
        every system at once with the iterate reached (a truncated-Newton step), where
        without it that system stops moving and the others go on.
    :param check_residual: check convergence on the true residual ``b - A x`` (one more
        product), and restart from it where the recursively updated residual met ``tol``
        but the true one does not: in float32 with a condition number of ``1e7`` the
        recursive one "met" ``1e-7`` at a true ``3e-5``. ``False`` for truncated CG,
        whose callers count their products.
    :raises RuntimeError: if some system does not meet ``tol`` in ``max_iter``
        iterations and ``raise_on_fail``.
    """
    precond = precond or (lambda r: r)
    x = torch.zeros_like(b)
    r = b.clone()
    z = precond(r)
    p = z.clone()
    rz = (r * z).sum(-1, keepdim=True)
    bnorm = b.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(b.dtype).tiny)

    def result(x, products, converged, negative=False):
        return (x, CGInfo(products, converged, negative)) if return_info else x

    def met(r):
        return r.norm(dim=-1, keepdim=True) <= tol * bnorm

    products = 0
    for k in range(max_iter):
        done = met(r)
        if bool(done.all()):
            if not check_residual:
                return result(x, products, True)
            # The recursive residual drifts from b - A x in rounding: restart from the true one.
            r = b - matvec(x)
            products += 1
            done = met(r)
            if bool(done.all()):
                return result(x, products, True)
            z = precond(r)
            p = z.clone()
            rz = (r * z).sum(-1, keepdim=True)
        Ap = matvec(p)
        products += 1
        pAp = (p * Ap).sum(-1, keepdim=True)
        # A solved system's direction is 0 (p^T A p = 0): not a sign of negative curvature.
        if return_info and not bool(((pAp > 0) | done).all()):
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
    if check_residual:
        r = b - matvec(x)
        products += 1
    if bool(met(r).all()):
        return result(x, products, True)
    if raise_on_fail:
        worst = (r.norm(dim=-1, keepdim=True) / bnorm).max().item()
        cause = ("the products went non-finite; check the operator and the right-hand side"
                 if not math.isfinite(worst) else "raise damping or max_iter")
        raise RuntimeError(f"conjugate gradients did not reach relative residual {tol:g} in "
                           f"{max_iter} iterations (reached {worst:.3g}); {cause}")
    return result(x, products, False)
