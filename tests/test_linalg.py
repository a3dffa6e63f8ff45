"""Conjugate gradients (:func:`pyro_natgrad.linalg.conjugate_gradient`) against dense
solves and eigenvalues."""

import torch

from pyro_natgrad.linalg import conjugate_gradient
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
