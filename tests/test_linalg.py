"""Conjugate gradients (:func:`pyro_natgrad.linalg.conjugate_gradient`) against dense
solves and eigenvalues, and its estimate of a float32 product's rounding against the
float64 product."""

import pytest
import torch

from pyro_natgrad.linalg import CERTIFY_MARGIN, conjugate_gradient, product_rounding
from tests.seeding import generator

F64 = torch.float64


def _spd(n, seed, shift=1.0):
    g = generator(seed)
    B = torch.randn(n, n, generator=g, dtype=F64)
    return B @ B.T + shift * torch.eye(n, dtype=F64), torch.randn(n, generator=g, dtype=F64)


def test_info_of_a_converged_solve():
    A, b = _spd(30, 0)
    x, info = conjugate_gradient(lambda v: A @ v, b, precond=lambda r: r / A.diagonal(),
                                 tol=1e-12, max_iter=200, return_info=True)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-12)
    assert info.converged and not info.negative_curvature
    # In exact arithmetic CG ends within n products; rounding costs a few more.
    assert 0 < info.iterations <= 60
    assert torch.equal(conjugate_gradient(lambda v: A @ v, b, precond=lambda r: r / A.diagonal(),
                                          tol=1e-12, max_iter=200), x)


def test_info_when_the_products_run_out():
    A, b = _spd(30, 1, shift=1e-3)
    x, info = conjugate_gradient(lambda v: A @ v, b, tol=1e-12, max_iter=3,
                                 raise_on_fail=False, return_info=True)
    # three iterations and the check of the true residual: four products
    assert (info.iterations, info.converged, info.negative_curvature) == (4, False, False)
    # Three steps of CG minimise the quadratic over the Krylov space of b, A b, A^2 b.
    K = torch.stack([b, A @ b, A @ A @ b], -1)
    c = torch.linalg.solve(K.T @ A @ K, K.T @ b)
    torch.testing.assert_close(x, K @ c, rtol=1e-6, atol=1e-9)


def test_negative_curvature_stops_at_once():
    """An indefinite matrix: the solve stops at the first direction with p^T A p <= 0
    and returns the iterate reached, which lowers the quadratic model (a
    truncated-Newton step) where continuing past that direction would not."""
    A, b = _spd(20, 2)
    evals, evecs = torch.linalg.eigh(A)
    evals[:3] = -evals[:3]  # three negative eigenvalues
    A = evecs @ torch.diag(evals) @ evecs.T
    x, info = conjugate_gradient(lambda v: A @ v, b, tol=1e-12, max_iter=100,
                                 raise_on_fail=False, return_info=True)
    assert info.negative_curvature and not info.converged
    assert info.iterations <= 20
    model = 0.5 * x @ A @ x - b @ x
    assert bool(torch.isfinite(x).all()) and float(model) <= 0.0
    # Without return_info the old contract holds: such directions are skipped.
    y = conjugate_gradient(lambda v: A @ v, b, tol=1e-12, max_iter=100, raise_on_fail=False)
    assert not torch.equal(x, y)


def test_a_solved_system_in_a_batch_is_not_negative_curvature():
    """A zero right-hand side (or one solved in one step) has direction 0, so
    ``p^T A p = 0``: with ``return_info`` it stopped every system as "negative curvature"
    and left the others unsolved."""
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    for first in ([0.0, 0.0, 0.0], [1.0, 0.0, 0.0]):
        b = torch.tensor([first, [1.0, 1.0, 1.0]], dtype=torch.float64)
        x, info = conjugate_gradient(lambda v: v @ A, b, return_info=True)
        assert info.converged and not info.negative_curvature
        torch.testing.assert_close(x, torch.linalg.solve(A, b.T).T)


def _float32_operator(g, n, log_cond, kind):
    """A float32 SPD operator with eigenvalues spread over ``log_cond`` decades, and the
    same operator exactly in float64."""
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    size = 10 ** (3 * float(torch.randn((), generator=g, dtype=F64)))
    ev = torch.logspace(0, -log_cond, n, dtype=F64) * size
    if kind == 0:
        A = ((Q * ev) @ Q.T).float()
        return (lambda v: v @ A), A.double()  # on the last dim: A is symmetric
    if kind == 1:  # a GGN's J^T J, never formed
        J = (Q * ev.sqrt()).float()
        return (lambda v: (v @ J.T) @ J), J.double().T @ J.double()
    d = ev.float()
    return (lambda v: d * v), torch.diag(d.double())


def test_product_rounding_estimates_the_float32_error():
    """The error of ``fl(A x)`` (against the float64 product of the same float32 ``A``)
    in estimates of it, over random operators and ill-conditioned ``x = A^{-1} b``:
    typically about one (the median was 0.85 over 9,000), rarely above the certification
    margin (twice in 9,000; 4.3 and 5.0). An estimate 3 times too small or too large
    fails the median, a floor-only ``eps |A x|`` the tail."""
    g = generator(7)
    ratios = []
    for trial in range(600):
        n = int(torch.randint(1, 100, (), generator=g))
        log_cond = 8 * float(torch.rand((), generator=g, dtype=F64))
        mv, A64 = _float32_operator(g, n, log_cond, trial % 3)
        x = torch.linalg.solve(A64, torch.randn(n, generator=g, dtype=F64)).float()
        Ax = mv(x)
        err = float((Ax.double() - A64 @ x.double()).norm())
        ratios.append(err / float(product_rounding(mv, x, Ax)))
    ratios = torch.tensor(ratios)
    assert 0.5 <= float(ratios.median()) <= 1.5, float(ratios.median())
    assert float((ratios > CERTIFY_MARGIN).float().mean()) <= 0.01
    assert float(ratios.max()) <= 2.5 * CERTIFY_MARGIN


def test_a_tolerance_below_the_products_rounding_fails_early_and_says_so():
    """A dense float32 matrix at condition number 1e4: a true residual of 1e-7 cannot be
    told from rounding (3e-5 to 4e-5 |b| at the solution). The recursive residual
    stalled above it, and the solve stopped only at ``max_iter`` (5,034 products) with
    advice to raise it; it now stops at the first check of the true residual that shows
    the rounding too large (43 products), and names the fixes. A coarse tolerance is met (checked in
    float64)."""
    g = generator(8)
    mv, A64 = _float32_operator(g, 40, 4.0, 0)
    b = torch.randn(3, 40, generator=g, dtype=F64).float()  # a batch of systems
    x, info = conjugate_gradient(mv, b, tol=1e-7, max_iter=5000, raise_on_fail=False,
                                 return_info=True)
    assert not info.converged and info.iterations <= 1000, info
    with pytest.raises(RuntimeError, match="cannot certify relative residual 1e-07 in "
                                           "torch.float32.*ill-conditioned.*float64.*damping"):
        conjugate_gradient(mv, b, tol=1e-7, max_iter=5000)
    x, info = conjugate_gradient(mv, b, tol=1e-2, max_iter=5000, return_info=True)
    true = (b.double() - x.double() @ A64).norm(dim=-1) / b.double().norm(dim=-1)
    assert info.converged and bool((true <= 1e-2).all()), true
