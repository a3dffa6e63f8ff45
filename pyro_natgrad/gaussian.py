"""Natural-gradient steps for Gaussian variational distributions.

For ``q = N(mu, Sigma)`` and a loss ``l`` (the negative ELBO), mirror descent in the
natural parameters ``eta = (Lambda mu, -Lambda/2)`` with step ``rho`` is

    ``Lambda' = Lambda + 2 rho dl/dSigma``,   ``mu' = mu - rho Sigma' dl/dmu``,

the natural-gradient step, since the natural gradient in natural parameters is
the ordinary gradient in mean parameters. For a Gaussian posterior and exact
gradients, ``rho = 1`` lands on it in one step.

With ``Sigma = L L^T`` and ``G_L = dl/dL`` (lower triangular) the precision update
is, in the whitened coordinates of the current ``q``,
``Lambda' = L^{-T} B L^{-1}``, ``B = I + rho (K + K^T)``, ``K = Phi(L^T G_L)``, ``Phi``
keeping the lower triangle with the diagonal halved. If ``B`` is not positive
definite with room to spare (``B >= I/2``, when a trust region ``max_kl`` is set;
positive definite, without one), the step applies ``f(x) = 1 + x + x^2/2`` to the
negative eigenvalues of ``rho S`` instead, ``S = K + K^T`` (the retraction of the
improved Bayesian learning rule, Lin, Schmidt & Khan 2020), which is always positive
definite; with the trust region no step more than doubles the variance in any direction.

Single-sample gradients are noisy. With the whitened draws ``eps = L^{-1}(z - mu)``
that produced them, the control variate ``dl/dmu -= L^{-T} E[eps]``,
``K -= Phi(E[eps eps^T] - I)`` (averages over the particles) has mean zero and
cancels the noise that the current precision predicts: all of it at the optimum
when the posterior is Gaussian. The step functions take these two moments.
"""

from typing import NamedTuple, Optional

import torch


class GaussianStep(NamedTuple):
    """Result of a step: the new parameters and the step size actually used."""

    loc: torch.Tensor
    scale_tril: torch.Tensor  # or scale, for the diagonal step
    rho: torch.Tensor
    retracted: torch.Tensor  # whether the PD-preserving retraction was needed


def _phi(x: torch.Tensor) -> torch.Tensor:
    return x.tril(-1) + 0.5 * torch.diag_embed(x.diagonal(dim1=-2, dim2=-1))


def whitened_sizes(grad_loc_w: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``KL(q' || q) ~ rho^2 * size`` for the step: ``|w|^2/2 + |S|_F^2/4``."""
    return 0.5 * grad_loc_w.square().sum(-1) + 0.25 * S.square().sum((-1, -2))


def full_gaussian_step(loc, scale_tril, grad_loc, grad_scale_tril, rho,
                       eps_moments=None, max_kl: Optional[float] = None,
                       precision_target=None, loc_correction=None):
    """One natural-gradient step for ``N(loc, scale_tril scale_tril^T)``.

    :param loc: ``(..., d)``.
    :param scale_tril: ``(..., d, d)`` lower triangular, positive diagonal.
    :param grad_loc: ``dl/dloc``, ``(..., d)``.
    :param grad_scale_tril: ``dl/dL``, ``(..., d, d)`` (upper triangle ignored).
    :param rho: step size in ``(0, 1]``, a float or a tensor of shape ``(...)``.
    :param eps_moments: ``(E[eps], E[eps eps^T])`` of the whitened draws behind the
        gradients, shapes ``(..., d)`` and ``(..., d, d)``, for the control variate; or None.
    :param max_kl: if given, ``rho`` shrinks so that the quadratic estimate of
        ``KL(q' || q)`` is at most this.
    :param precision_target: optional ``(..., d, d)`` estimate of ``-E_q[grad^2 f]``
        (model curvature); replaces the precision target from ``grad_scale_tril``.
    :param loc_correction: optional zero-mean term subtracted from ``grad_loc``
        (replaces the ``eps_moments`` control variate for the mean).
    :returns: :class:`GaussianStep` with the new ``loc`` and ``scale_tril``.
    """
    L = scale_tril
    d = L.shape[-1]
    eye = torch.eye(d, dtype=L.dtype, device=L.device)
    g = grad_loc
    if precision_target is not None:
        S = L.mT @ precision_target @ L - eye
    else:
        K = _phi(L.mT @ grad_scale_tril.tril())
        if eps_moments is not None:
            K = K - _phi(eps_moments[1] - eye)
        S = K + K.mT
    if loc_correction is not None:
        g = g - loc_correction
    elif eps_moments is not None:
        g = g - torch.linalg.solve_triangular(
            L.mT, eps_moments[0].unsqueeze(-1), upper=True).squeeze(-1)
    rho = torch.as_tensor(rho, dtype=L.dtype, device=L.device).expand(L.shape[:-2])
    if max_kl is not None:
        w = (L.mT @ g.unsqueeze(-1)).squeeze(-1)
        size = whitened_sizes(w, S).clamp_min(torch.finfo(L.dtype).tiny)
        rho = torch.minimum(rho, (max_kl / size).sqrt())
    r = rho[..., None, None]
    B = eye + r * S
    # With a trust region, B = I + rho S while B >= I/2, otherwise B = f(rho S) with
    # f(x) = 1 + x for x >= 0 and 1 + x + x^2/2 below (the iBLR retraction), so no step
    # more than doubles the variance in any direction however noisy S is. Without one
    # (exact gradients), I + rho S whenever it is positive definite. One Cholesky checks.
    _, info = torch.linalg.cholesky_ex(B - 0.5 * eye if max_kl is not None else B)
    retract = info != 0
    if bool(retract.any()):
        lam, Q = torch.linalg.eigh(r * S)
        f = torch.where(lam < 0, 1 + lam + 0.5 * lam.square(), 1 + lam)
        B = torch.where(retract[..., None, None], (Q * f.unsqueeze(-2)) @ Q.mT, B)
    # UL factorisation B = U U^T (U upper) via the Cholesky factor of the reversed matrix.
    C = torch.linalg.cholesky(B.flip(-1, -2))
    U = C.flip(-1, -2)
    # Sigma' = L B^{-1} L^T = (L U^{-T})(L U^{-T})^T and L U^{-T} is lower triangular.
    L_new = torch.linalg.solve_triangular(U.mT, L, upper=False, left=False)
    step = (L_new @ (L_new.mT @ g.unsqueeze(-1))).squeeze(-1)
    return GaussianStep(loc - rho[..., None] * step, L_new, rho, retract)


def diagonal_gaussian_step(loc, scale, grad_loc, grad_scale, rho,
                           eps_moments=None, max_kl: Optional[float] = None,
                           precision_target=None, loc_step=None, floor=None):
    """Elementwise natural-gradient step for independent ``N(loc, scale^2)``.

    Shapes broadcast elementwise; ``eps_moments = (E[eps], E[eps^2])``. Same maths
    as :func:`full_gaussian_step` with ``d = 1`` per element: ``S = scale * dl/dscale``
    (minus ``mean(eps^2) - 1``), ``scale' = scale / sqrt(1 + rho S)``,
    ``loc' = loc - rho scale'^2 dl/dloc``. ``max_kl`` bounds each element's step.
    ``precision_target`` (elementwise ``-E[f'']``) replaces the precision target
    from ``grad_scale``; ``loc_step`` replaces the mean's step direction
    ``scale'^2 dl/dloc`` (e.g. by a Newton direction). ``floor`` (default: whether
    ``max_kl`` is set) keeps each variance from more than doubling.
    """
    g = grad_loc
    if precision_target is not None:
        S = scale.square() * precision_target - 1
    else:
        S = scale * grad_scale
        if eps_moments is not None:
            S = S - (eps_moments[1] - 1)
    if eps_moments is not None:
        g = g - eps_moments[0] / scale
    rho = torch.as_tensor(rho, dtype=loc.dtype, device=loc.device)
    if max_kl is not None:
        size = (0.5 * (scale * g).square() + 0.25 * S.square()).clamp_min(
            torch.finfo(loc.dtype).tiny)
        rho = torch.minimum(rho, (max_kl / size).sqrt())
    x = rho * S
    # With a trust region: 1 + x, continued below 0 by 1 + x + x^2/2 (the iBLR
    # retraction), smooth and >= 1/2, so no step more than doubles a variance however
    # noisy S is. Without one (exact gradients): 1 + x wherever it is positive.
    floor = max_kl is not None if floor is None else floor
    retract = x < 0 if floor else 1 + x <= 0
    B = torch.where(retract, 1 + x + 0.5 * x.square(), 1 + x)
    scale_new = scale * B.rsqrt()
    direction = scale_new.square() * g if loc_step is None else loc_step
    return GaussianStep(loc - rho * direction, scale_new, rho, retract)
