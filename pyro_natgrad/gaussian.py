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
positive definite, without one), the step uses the retraction of the improved
Bayesian learning rule (Lin, Schmidt & Khan 2020) in matrix form instead,
``B = I + X + X^2/2 = (I + (I + X)^2) / 2`` with ``X = rho S``, ``S = K + K^T``:
``f(x) = 1 + x + x^2/2 >= 1/2`` on every eigenvalue of ``X``, so it is always
positive definite and no such step more than doubles the variance in any direction.
It takes one matrix product, no eigendecomposition. Which branch applies is decided
without a factorisation where possible: ``|X|_F < 1/2`` (or ``< 1`` without a trust
region) bounds the spectrum of ``X``, and a Rayleigh quotient of ``B`` along a
whitened draw below the floor proves the need to retract; otherwise one Cholesky
factorisation of ``B - I/2`` decides.

Single-sample gradients are noisy. With the whitened draws ``eps = L^{-1}(z - mu)``
that produced them, the control variate ``dl/dmu -= c L^{-T} E[eps]``,
``K -= c Phi(E[eps eps^T] - I)`` (averages over the particles) has mean zero. Its
coefficient ``c = (tr(L^T G_L) + d) / tr(E[eps eps^T])`` (:func:`cv_coefficient`)
estimates the mean eigenvalue of the whitened curvature ``M = L^T E[H] L`` (the
``+ d`` removes the entropy's exact ``-I``): the gradient's noise is about
``M eps eps^T``, so ``c`` cancels all of it when ``M`` is a multiple of ``I`` (far
from the optimum too, e.g. a guide started too narrow) and ``c = 1`` at the optimum
of a Gaussian posterior, where ``M = I``. Taken from the same draws, ``c`` biases the
estimate of ``S`` by ``2 (M - c I) / (d + 2)``, which vanishes at the optimum, and
removes from the mean's gradient its component along the draw (for :func:`full_step`'s
draws, ``c`` is 1 below :data:`FULL_CV_MIN_ELEMENTS` draw elements).
Mean-field steps give each element the ``c`` of the other elements' draws, which keeps
its variate's mean zero: the weighted median of their own estimates
(:func:`leave_one_out_median_cv`), which one far-off element cannot drag, rather than
the same formula summed over them (:func:`leave_one_out_cv`); see
:func:`diagonal_gaussian_step`.

Full-rank steps from the ELBO's gradient alone (no ``precision_target``) with a trust
region also take ``rho <= 1 / (2 |S|_F)``, so ``B >= I/2`` holds without the retraction.
From one draw ``S`` is a rank-two estimate whose error has norm about
``|M - c I| d``; a larger step, retracted, shrank or inflated the variance along the
draws systematically (the ``X^2/2`` term, and a multiplicative random walk), and the
full-rank guide diverged above a few dozen dimensions. Such steps estimate ``d^2/2``
precision entries from ``d`` numbers each, so they need ``O(d)`` steps or more;
the model's Hessian (``precision_target``) avoids that. With it,
:class:`~pyro_natgrad.NaturalGradient` passes a ``rho`` already cut so that
``B >= I/2`` (``optim._halving_limit``): shortening the step, rather than retracting
it, shortens the mean's Newton move too, which in a funnel's neck (slope, no
curvature) otherwise doubled with the variance at every step.
"""

import math
from typing import NamedTuple, Optional

import torch


class StepError(ArithmeticError):
    """A step could not be computed in floating point; the caller skips it."""


class GaussianStep(NamedTuple):
    """Result of a step: the new parameters and the step size actually used."""

    loc: torch.Tensor
    scale_tril: torch.Tensor  # or scale, for the diagonal step
    rho: torch.Tensor
    retracted: torch.Tensor  # whether the PD-preserving retraction was needed


#: With a trust region and no precision target, ``rho |S|_F`` is at most this: the
#: spectrum of ``X`` lies in ``[-1/2, 1/2]``, so ``B >= I/2`` with no retraction.
NOISY_STEP_LIMIT = 0.5


#: A full-rank step whose draws have fewer elements than this (draws times dimensions)
#: keeps the control variate's coefficient at 1. From the step's own draws, ``c``
#: absorbs the mean gradient's component along the draw (a fraction ``1 / (n d)`` of
#: it on average): from one draw of a one-dimensional guide all of it, so the mean
#: never moved.
FULL_CV_MIN_ELEMENTS = 8


def cv_coefficient(trace_LtG, d: int, second_moment):
    """The control variate's coefficient ``c = (tr(L^T G_L) + d) / tr(E[eps eps^T])``
    (see the module docstring); 1 where the draws are all zero. Works on tensors of
    any batch shape and on floats."""
    if torch.is_tensor(second_moment):
        ok = second_moment > 0
        return torch.where(ok, (trace_LtG + d) / torch.where(ok, second_moment, 1), 1.0)
    return (trace_LtG + d) / second_moment if second_moment > 0 else 1.0


def leave_one_out_cv(curvature: torch.Tensor, second_moment: torch.Tensor,
                     seen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-element control-variate coefficients of a mean-field step, each
    :func:`cv_coefficient` of the *other* elements' draws:
    ``c_i = sum_{j != i} (a_j + 1) / sum_{j != i} E[eps_j^2]``, ``a = scale dl/dscale``.

    ``c_i`` does not use element ``i``'s draw, so its variate keeps mean zero (up to
    the other elements' gradients' dependence on that draw, when the posterior is
    correlated); taken from this step's draws it fits the guide as it is now. The
    previous step's coefficient, used before, lagged a step behind: a guide that started
    10x too wide got a coefficient of 100 after its first step had already narrowed
    it, and the noise this injected collapsed variances for hundreds of steps.

    :param curvature: ``a``, any shape; ``second_moment``: ``E[eps^2]``, the same shape.
    :param seen: optional boolean mask of the elements that were drawn (a subsample);
        the others neither contribute nor get a meaningful coefficient.
    """
    a = curvature + 1
    e2 = second_moment
    if seen is not None:
        a, e2 = torch.where(seen, a, 0), torch.where(seen, e2, 0)
    denominator = (e2.sum() - e2).clamp_min(torch.finfo(e2.dtype).tiny)
    return (a.sum() - a) / denominator


#: Elements whose ratios :func:`leave_one_out_median_cv` sorts, at most: a sort of
#: 65,536 took 13 ms a step at 10^6 latents (the whole update took 21 ms before), this
#: size 1-2 ms.
CV_SAMPLE = 1 << 12


def cv_sample_index(n: int, device=None) -> torch.Tensor:
    """The elements of a group of ``n`` whose ratios the median coefficient sorts: every
    element up to :data:`CV_SAMPLE`, else every ``ceil(n / CV_SAMPLE)``-th."""
    return torch.arange(0, n, max(1, -(-n // CV_SAMPLE)), device=device)


def leave_one_out_median_cv(curvature: torch.Tensor, second_moment: torch.Tensor,
                            seen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`leave_one_out_cv` with the weighted median in place of the weighted mean:
    ``c_i`` is the median of the other elements' ratios ``r_j = (a_j + 1) / eps_j^2``
    weighted by ``eps_j^2`` (:func:`leave_one_out_cv` is their weighted mean).

    ``a_j + 1 = k_j eps_j (delta_j + eps_j)``, ``k_j = scale_j^2 H_j`` and ``delta_j``
    the mean's offset in the guide's sds, for a Gaussian posterior: one element with a
    huge ``k_j`` (its variance far too wide) outweighs the rest in the mean, while the
    median stays with the typical ``k``. On a plate of 2,000 conjugate latents started
    ten times too wide one such element (its variance doubled in 15 of 16 steps) made
    the mean's coefficient -8.9 for every element, and the means went from 0.07 to 1.4
    posterior sds off.

    Flattened; elements where ``seen`` is False or ``eps_j = 0`` give no ratio and take
    the median of all ratios. Above :data:`CV_SAMPLE` elements the ratios come from a
    strided sample (:func:`cv_sample_index`): its elements get their leave-one-out
    median of the sample, the others the sample's median, which does not use their
    draws either. Shape: ``curvature``'s.
    """
    a, e2 = curvature.reshape(-1), second_moment.reshape(-1)
    index = cv_sample_index(a.shape[0], a.device)
    keep = e2[index] > 0
    if seen is not None:
        keep = keep & seen.reshape(-1)[index]
    index = index[keep]
    return sampled_median_cv(a.shape[0], index, a[index], e2[index], a).reshape(
        curvature.shape)


def sampled_median_cv(n: int, index: torch.Tensor, curvature: torch.Tensor,
                      second_moment: torch.Tensor, like: torch.Tensor,
                      out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The coefficients of :func:`leave_one_out_median_cv` from the elements ``index``
    (their ``a`` and ``eps^2 > 0`` given): shape ``(n,)``, like ``like``, written to
    ``out`` if given (a fresh tensor of 10^6 elements costs more than the rest)."""
    out = like.new_empty(n) if out is None else out
    if index.shape[0] < 2:
        return out.fill_(1.0)
    ratio = (curvature + 1) / second_moment
    order = torch.argsort(ratio)
    r, w = ratio[order], second_moment[order]
    cumulative = torch.cumsum(w, 0)
    total = cumulative[-1]
    last = r.shape[0] - 1
    out.fill_(float(r[torch.searchsorted(cumulative, 0.5 * total).clamp_max(last)]))
    # Without element p (weight w_p): the first k < p with C_k >= (W - w_p) / 2, else
    # the first k > p with C_k - w_p >= (W - w_p) / 2, i.e. C_k >= (W + w_p) / 2.
    position = torch.arange(r.shape[0], device=r.device)
    below = torch.searchsorted(cumulative, 0.5 * (total - w)).clamp_max(last)
    above = torch.searchsorted(cumulative, 0.5 * (total + w)).clamp_max(last)
    out[index[order]] = r[torch.where(below < position, below, above)]
    return out


def _phi(x: torch.Tensor) -> torch.Tensor:
    return x.tril(-1) + 0.5 * torch.diag_embed(x.diagonal(dim1=-2, dim2=-1))


def norm(x: torch.Tensor, dim=None) -> torch.Tensor:
    """``|x|_2`` over ``dim`` (all of it if None) that does not overflow where the squares
    do: those elements are rescaled by their largest ``|x_i|`` (a float32 gradient of
    1e22 is finite, its square is not). Shape: ``x``'s without ``dim``."""
    n = torch.linalg.vector_norm(x, dim=dim)
    if bool(torch.isinf(n).any()):
        top = x.abs().amax(dim=dim, keepdim=True)
        unit = x / torch.where(torch.isfinite(top) & (top > 0), top, 1)
        top = top.squeeze(dim) if dim is not None else top.reshape(())
        n = torch.where(torch.isfinite(top), top * torch.linalg.vector_norm(unit, dim=dim), top)
    return n


def _float_norm(x: torch.Tensor) -> float:
    """:func:`norm` of all of ``x`` as a float, with one synchronisation unless it
    overflows."""
    n = float(torch.linalg.vector_norm(x))
    return float(norm(x)) if math.isinf(n) else n


def whitened_root_sizes(grad_loc_w: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``sqrt(size)``, ``KL(q' || q) ~ rho^2 * size`` for the step:
    ``size = |w|^2/2 + |S|_F^2/4``; ``w`` ``(..., d)``, ``S`` ``(..., d, d)`` -> ``(...)``.
    The root, from norms that do not overflow: the size itself would, for a finite but huge
    float32 gradient, and make the allowed step 0."""
    return torch.hypot(norm(grad_loc_w, -1) / math.sqrt(2), 0.5 * norm(S, (-1, -2)))


#: Below this size the triangular products below use one dense product.
BLOCK = 128

#: The same off the CPU: a GPU's dense products are cheap and its small kernels are not
#: (at d = 1000 the halving took 470 kernel launches per step).
DEVICE_BLOCK = 1 << 13


def _dense_below(t: torch.Tensor) -> int:
    return BLOCK if t.device.type == "cpu" else DEVICE_BLOCK


def _tril_mm(A, B, out):
    """``out = tril(A @ B)`` (``out`` square, ``n x n``), in about half the flops of
    ``A @ B``: the blocks above the diagonal are never computed."""
    n = out.shape[-1]
    if n <= _dense_below(out):
        torch.matmul(A, B, out=out)
        out.tril_()
        return out
    h = n // 2
    _tril_mm(A[:h], B[:, :h], out[:h, :h])
    out[:h, h:].zero_()
    torch.matmul(A[h:], B[:, :h], out=out[h:, :h])
    _tril_mm(A[h:], B[:, h:], out[h:, h:])
    return out


def _tri_mm(T, X, out, upper: bool):
    """``out = T @ X`` for triangular ``T`` (``n x n``), in half the flops of a dense
    product."""
    n = T.shape[-1]
    if n <= _dense_below(out):
        return torch.matmul(T, X, out=out)
    h = n // 2
    if upper:  # [T11 X1 + T12 X2; T22 X2]
        _tri_mm(T[:h, :h], X[:h], out[:h], upper)
        out[:h].addmm_(T[:h, h:], X[h:])
        _tri_mm(T[h:, h:], X[h:], out[h:], upper)
    else:  # [T11 X1; T21 X1 + T22 X2]
        _tri_mm(T[h:, h:], X[h:], out[h:], upper)
        out[h:].addmm_(T[h:, :h], X[:h])
        _tri_mm(T[:h, :h], X[:h], out[:h], upper)
    return out


def _tril_ut_l(U, G, out):
    """``out = tril(U^T G)`` for lower triangular ``U`` and ``G`` (zero above their
    diagonals), in half the flops of a Cholesky factorisation plus the blocks' products
    (a dense product takes six times as many)."""
    n = U.shape[-1]
    if n <= _dense_below(out):
        torch.matmul(U.mT, G, out=out)
        return out.tril_()
    h = n // 2
    # (U^T G)_11 = U11^T G11 + U21^T G21 and (U^T G)_21 = U22^T G21; the upper right
    # block of ``out`` holds the lower triangle of U21^T G21 meanwhile.
    _tril_ut_l(U[:h, :h], G[:h, :h], out[:h, :h])
    tmp = out[:h, h:2 * h]
    out[:h, :h].add_(_tril_mm(U[h:, :h].mT, G[h:, :h], tmp))
    out[:h, h:].zero_()
    _tri_mm(U[h:, h:].mT, G[h:, :h], out[h:, :h], upper=True)
    _tril_ut_l(U[h:, h:], G[h:, h:], out[h:, h:])
    return out


def _lower_right_solve(L, V, out):
    """``out = L V^{-1}`` for lower triangular ``L`` and ``V`` (the result is lower
    triangular too), in about half the flops of a triangular solve with a dense
    right-hand side. ``out`` must not overlap ``L`` or ``V``."""
    n = L.shape[-1]
    if n <= _dense_below(out):
        out.copy_(L)
        torch.linalg.solve_triangular(V, out, upper=False, left=False, out=out)
        return out.tril_()
    h = n // 2
    _lower_right_solve(L[:h, :h], V[:h, :h], out[:h, :h])
    out[:h, h:].zero_()
    _lower_right_solve(L[h:, h:], V[h:, h:], out[h:, h:])
    # X21 V11 + X22 V21 = L21
    X21 = out[h:, :h]
    _tri_mm(out[h:, h:], V[h:, :h], X21, upper=False)
    torch.sub(L[h:, :h], X21, out=X21)
    torch.linalg.solve_triangular(V[:h, :h], X21, upper=False, left=False, out=X21)
    return out


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
    if scale_tril.dim() == 2:
        G = None if precision_target is not None else grad_scale_tril.tril()
        return full_step(loc, scale_tril.tril(), grad_loc, G, rho, eps_moments, None, max_kl,
                         precision_target, loc_correction)
    L = scale_tril
    d = L.shape[-1]
    eye = torch.eye(d, dtype=L.dtype, device=L.device)
    g = grad_loc
    c = torch.ones(L.shape[:-2], dtype=L.dtype, device=L.device)
    if precision_target is not None:
        S = L.mT @ precision_target @ L - eye
    else:
        LtG = L.mT @ grad_scale_tril.tril()
        K = _phi(LtG)
        if eps_moments is not None:
            c = cv_coefficient(LtG.diagonal(dim1=-2, dim2=-1).sum(-1), d,
                               eps_moments[1].diagonal(dim1=-2, dim2=-1).sum(-1))
            K = K - c[..., None, None] * _phi(eps_moments[1] - eye)
        S = K + K.mT
    if loc_correction is not None:
        g = g - loc_correction
    elif eps_moments is not None:
        g = g - c[..., None] * torch.linalg.solve_triangular(
            L.mT, eps_moments[0].unsqueeze(-1), upper=True).squeeze(-1)
    rho = torch.as_tensor(rho, dtype=L.dtype, device=L.device).expand(L.shape[:-2])
    if max_kl is not None:
        w = (L.mT @ g.unsqueeze(-1)).squeeze(-1)
        root = whitened_root_sizes(w, S).clamp_min(torch.finfo(L.dtype).tiny)
        rho = torch.minimum(rho, math.sqrt(max_kl) / root)
        if precision_target is None:
            s_norm = norm(S, (-1, -2)).clamp_min(torch.finfo(L.dtype).tiny)
            rho = torch.minimum(rho, NOISY_STEP_LIMIT / s_norm)
    r = rho[..., None, None]
    B = eye + r * S
    _, info = torch.linalg.cholesky_ex(B - 0.5 * eye if max_kl is not None else B)
    retract = info != 0
    if bool(retract.any()):
        B = torch.where(retract[..., None, None], 0.5 * (eye + B @ B), B)
    U = torch.linalg.cholesky(B.flip(-1, -2)).flip(-1, -2)
    L_new = torch.linalg.solve_triangular(U.mT, L, upper=False, left=False)
    step = (L_new @ (L_new.mT @ g.unsqueeze(-1))).squeeze(-1)
    return GaussianStep(loc - rho[..., None] * step, L_new, rho, retract)


def full_step(loc, L, grad_loc, G, rho, eps_moments=None, draws=None,
              max_kl: Optional[float] = None, precision_target=None, loc_correction=None,
              work=None):
    """:func:`full_gaussian_step` for one Gaussian (no batch dimensions), with fewer
    flops and no temporaries of size ``d x d`` beyond ``work``.

    ``L`` and ``G`` must be lower triangular (zero above the diagonal; ``G`` is
    ignored with a ``precision_target``). ``draws``: the whitened draws ``(n, d)``
    behind the gradients, whose second moment is then applied as a rank-``n`` update
    (``eps_moments[1]`` is not read and may be None). ``work``: two scratch ``d x d``
    tensors, not overlapping the inputs; the returned ``scale_tril`` is one of them.
    Nothing else is modified.
    """
    if work is None:
        work = [torch.empty_like(L), torch.empty_like(L)]
    P, S = work
    g = grad_loc
    c = 1.0
    # Only the lower triangle of the symmetric S (and B) is formed: it is all that the
    # factorisations read.
    if precision_target is not None:
        torch.matmul(L.mT, torch.matmul(precision_target, L, out=P), out=S)
        S.diagonal().sub_(1)
    else:
        # S = Phi(P) + Phi(P)^T - c (E[eps eps^T] - I) with P = tril(L^T G), whose lower
        # triangle is P's own, less that of c (E[eps eps^T] - I).
        _tril_ut_l(L, G, S)
        trace = float(S.diagonal().sum())  # tr(L^T G)
        if draws is not None:
            n = draws.shape[0]
            if n * L.shape[-1] >= FULL_CV_MIN_ELEMENTS:
                c = cv_coefficient(trace, L.shape[-1], float(draws.square().sum()) / n)
            S.addmm_(draws.mT, draws, alpha=-c / n)
            S.diagonal().add_(c)
        elif eps_moments is not None:
            c = cv_coefficient(trace, L.shape[-1], float(eps_moments[1].diagonal().sum()))
            S.sub_(c * eps_moments[1])
            S.diagonal().add_(c)
    S.tril_()
    if loc_correction is not None:
        g = g - loc_correction
    elif eps_moments is not None:
        g = g - c * torch.linalg.solve_triangular(
            L.mT, eps_moments[0].unsqueeze(-1), upper=True).squeeze(-1)
    # |S|_F^2 = 2 |tril S|^2 - |diag S|^2, from norms and in that form so that nothing
    # squared overflows (a huge but finite gradient otherwise made the step 0)
    lower, diagonal = _float_norm(S), _float_norm(S.diagonal())
    s_norm = lower * math.sqrt(max(0.0, 2 - (diagonal / lower) ** 2)) if lower > 0 else 0.0
    rho = float(rho)
    if max_kl is not None:
        root = math.hypot(_float_norm(L.mT @ g) / math.sqrt(2), 0.5 * s_norm)  # sqrt(size)
        if root > 0:
            rho = min(rho, math.sqrt(max_kl) / root)
        if precision_target is None and s_norm > 0:
            rho = min(rho, NOISY_STEP_LIMIT / s_norm)
    # B = I + X, X = rho S, while B >= I/2 with a trust region (no variance more than
    # doubles; always, for noisy S, by the limit above), or while B > 0 without one;
    # else the iBLR retraction
    # B = I + X + X^2/2 = (I + (I + X)^2) / 2, which always is >= I/2.
    B = S.mul_(rho)
    B.diagonal().add_(1)
    floor = 0.5 if max_kl is not None else 0.0
    bound = rho * s_norm  # the spectrum of X lies within +-|X|_F
    # With a floor, B >= I/2 holds at bound = 1/2, where the limit above puts noisy
    # steps (up to the rounding of rho = 1/(2 |S|_F)).
    if bound < 1 - floor or (floor > 0 and bound <= floor * (1 + 1e-9)):
        retract = False
    else:
        retract = _below(B, floor, draws, eps_moments)

    def retraction(B):
        Y = torch.add(B, B.mT, out=P)  # I + X in full
        Y.diagonal().sub_(B.diagonal())
        B = _tril_mm(Y, Y, S)
        B.diagonal().add_(1)
        return B.mul_(0.5)

    if retract:
        B = retraction(B)
    # UL factorisation B = U U^T (U upper): the Cholesky factor R^T R of the reversed
    # matrix, which upper=True reads from its upper triangle (B's lower one); then
    # V = U^T = flip(R) is lower triangular.
    R, info = torch.linalg.cholesky_ex(B.flip(-1, -2), upper=True)
    if (info != 0 or not bool(torch.isfinite(R.diagonal()).all())) and not retract:
        # I + X passed the check by a rounding error's margin (an extreme curvature
        # estimate, e.g. exp of a far draw under a Poisson likelihood): retract.
        retract = True
        B = retraction(B)
        R, info = torch.linalg.cholesky_ex(B.flip(-1, -2), upper=True)
    if info != 0 or not bool(torch.isfinite(R.diagonal()).all()):
        raise StepError("the precision update is not positive definite in floating point "
                        "(a non-finite or extreme curvature estimate)")
    V = R.flip(-1, -2)
    # Sigma' = L B^{-1} L^T = (L U^{-T})(L U^{-T})^T and L U^{-T} = L V^{-1} is lower
    # triangular.
    L_new = _lower_right_solve(L, V, P)
    step = L_new @ (L_new.mT @ g)
    return GaussianStep(loc - rho * step, L_new, torch.as_tensor(rho, dtype=L.dtype),
                        torch.as_tensor(retract))


def _below(B, floor, draws, eps_moments) -> bool:
    """Whether ``B - floor I`` is not positive definite (``B`` symmetric, given by its
    lower triangle, zero above): yes at once if a Rayleigh quotient along the draws (or
    their mean) shows it, else one Cholesky factorisation decides."""
    vs = draws if draws is not None else (
        eps_moments[0].unsqueeze(0) if eps_moments is not None else None)
    if vs is not None:
        nv = vs.square().sum(-1)
        q = 2 * ((vs @ B.mT) * vs).sum(-1) - (vs.square() * B.diagonal()).sum(-1)
        if bool(((q < floor * nv) & (nv > 0)).any()):
            return True
    M = B.clone()
    M.diagonal().sub_(floor)
    return bool(torch.linalg.cholesky_ex(M)[1] != 0)


#: A mean-field step from gradients alone (no model curvature) with a trust region
#: changes no variance by more than this factor either way (see
#: :func:`diagonal_gaussian_step`; docs/optimizer.rst has the measurements). 3 settled
#: a start ten times too wide faster, but collapsed more variances far from the mean.
NOISY_VARIANCE_FACTOR = 2.0


def step_limit(w: torch.Tensor, S: torch.Tensor, max_kl: float) -> torch.Tensor:
    """The largest step size of each element of a mean-field step under the trust region
    ``max_kl``, which the mean's move and the precision's change share equally:
    ``(rho |w| (1 + rho |S|))^2 / 2 <= max_kl / 2`` and ``(rho S)^2 / 4 <= max_kl / 2``.

    ``w = scale dl/dloc`` (the whitened mean gradient) and ``S`` (the whitened precision
    gradient) broadcast together. The mean moves ``rho w / B`` current sds, and
    ``1 / B <= 1 + rho |S|`` for either sign of ``S`` (see :func:`diagonal_gaussian_step`).
    Bounding the move as if ``B`` were 1, as before, let a variance that grew carry the
    mean further than the region allows, and allowed larger steps where ``S > 0`` than
    where ``S < 0``: from a start far from the mean, where ``S`` is mostly noise, that
    asymmetry shrank variances systematically until they collapsed. The bound is the
    positive root of the quadratic, written without cancellation, and with
    ``sqrt(a^2 + 4 r a b) = sqrt(a) sqrt(a + 4 r b)``: ``a^2`` overflows for a huge but
    finite gradient (``|w| > 2e19`` in float32), which made the step 0."""
    r = math.sqrt(max_kl)
    a, b = w.abs(), S.abs()
    mean = 2 * r / (a + a.sqrt() * (a + 4 * r * b).sqrt())
    precision = math.sqrt(2) * r / b
    return torch.minimum(mean, precision)  # 1/0 = inf where a term vanishes


def diagonal_gaussian_step(loc, scale, grad_loc, grad_scale, rho,
                           eps_moments=None, max_kl: Optional[float] = None,
                           precision_target=None, loc_step=None, floor=None, cv=1.0):
    """Elementwise natural-gradient step for independent ``N(loc, scale^2)``.

    Shapes broadcast elementwise; ``eps_moments = (E[eps], E[eps^2])``. Same maths
    as :func:`full_gaussian_step` with ``d = 1`` per element, except for the trust
    region (:func:`step_limit`) and the retraction (below): ``S = scale * dl/dscale``
    (minus ``cv (mean(eps^2) - 1)``), ``scale' = scale / sqrt(1 + rho S)``,
    ``loc' = loc - rho scale'^2 dl/dloc`` (``dl/dloc`` less ``cv E[eps] / scale``).
    ``cv``: the control variate's coefficient, a number or a tensor that broadcasts,
    whose element ``i`` must not depend on element ``i``'s draw (e.g.
    :func:`leave_one_out_cv`). ``max_kl`` bounds each element's step.
    ``precision_target`` (elementwise ``-E[f'']``) replaces the precision target
    from ``grad_scale``; ``loc_step`` replaces the mean's step direction
    ``scale'^2 dl/dloc`` (e.g. by a Newton direction). ``floor`` (default: whether
    ``max_kl`` is set) keeps each variance from more than doubling; without a
    ``precision_target`` it caps ``x`` to ``[1 - F, F - 1]`` instead,
    ``F = NOISY_VARIANCE_FACTOR``, so that no variance changes more than ``F``-fold
    either way.
    """
    g = grad_loc
    if precision_target is not None:
        S = scale.square() * precision_target - 1
    else:
        S = scale * grad_scale
        if eps_moments is not None:
            S = S - cv * (eps_moments[1] - 1)
    if eps_moments is not None:
        g = g - cv * eps_moments[0] / scale
    rho = torch.as_tensor(rho, dtype=loc.dtype, device=loc.device)
    if max_kl is not None:
        rho = torch.minimum(rho, step_limit(scale * g, S, max_kl))
    x = rho * S
    # B = 1 + x (linear in the precision) where x >= 0, 1 / (1 - x) (linear in the
    # variance) where -1 <= x < 0, and 1/2 below: a more negative S never grows a
    # variance less, and none more than doubles. (The iBLR form 1 + x + x^2/2, used
    # before, turns back below x = -1: under noise it shrank variances that had to grow.)
    # With a trust region this applies for all x < 0; without one (exact gradients)
    # only where 1 + x <= 0.
    floor = max_kl is not None if floor is None else floor
    retract = x < 0 if floor else 1 + x <= 0
    if floor and precision_target is None:
        # From gradients alone S is noisy (from one draw its term eps * w, w the whitened
        # mean gradient, dwarfs the signal while the mean is far), and a precision that
        # may grow (1 + x)-fold but shrink at most 2-fold ratchets upwards under such
        # noise until variances collapse. A symmetric cap keeps log B odd in x.
        x = x.clamp(1 - NOISY_VARIANCE_FACTOR, NOISY_VARIANCE_FACTOR - 1)
        B = torch.where(retract, (1 - x).reciprocal(), 1 + x)
    else:
        B = torch.where(retract, (1 - x.clamp(-1, 0)).reciprocal(), 1 + x)
    scale_new = scale * B.rsqrt()
    direction = scale_new.square() * g if loc_step is None else loc_step
    return GaussianStep(loc - rho * direction, scale_new, rho, retract)


#: Elements per pass of :func:`softplus_diagonal_step` on a CPU: its temporaries stay in
#: cache.
CHUNK = 1 << 18

#: The same on a GPU, where each pass costs kernel launches rather than cache misses:
#: 10^6 latents take one pass (about 40 kernels instead of 180).
DEVICE_CHUNK = 1 << 22


def chunk_size(t: torch.Tensor) -> int:
    """Elements per pass of :func:`softplus_diagonal_step` for tensors like ``t``."""
    return CHUNK if t.device.type == "cpu" else DEVICE_CHUNK


#: Elements of a mean-field group's whitened mean gradient compared between steps:
#: the cosine of two random vectors of this size is about 1/256, far below the
#: threshold that matters (0.1), and larger groups are strided down to it.
HOLD_SAMPLE = 1 << 16


def hold_stride(n: int) -> int:
    """The stride of the sample ``w[::stride]`` (at most about ``HOLD_SAMPLE`` of ``n``)."""
    return max(1, -(-n // HOLD_SAMPLE))


class FusedSums(NamedTuple):
    """The sums a pass of :func:`softplus_diagonal_step` returns, 0-d tensors."""

    taken: torch.Tensor  # sum(rho_i)
    check: torch.Tensor  # sum(loc') + sum(raw'): finite only if every output is
    agreement: torch.Tensor  # <w, previous w> on the sample, w = scale (dl/dloc - cv eps/scale)
    norm2: torch.Tensor  # |w|^2 on the sample (these two in float64)


def passes(n: int, chunk: int):
    """``(start, stop)`` of the passes over ``n`` elements: as few as chunks of at most
    ``chunk`` allow, of equal length (within one), so that no pass is a short tail whose
    leave-one-out sums would be noisy."""
    count = max(1, -(-n // chunk))
    bounds = [n * k // count for k in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def softplus_diagonal_step(loc, raw, grad_loc, grad_raw, draw, rho: float, max_kl: float,
                           out_loc, out_raw, work, scale=None, cv=None,
                           previous=None) -> FusedSums:
    """:func:`diagonal_gaussian_step` with a trust region, fused for the parameterisation
    ``scale = softplus(raw)`` of Pyro's guides and written without temporaries of full
    size: the new ``loc`` and ``raw`` go to ``out_loc`` and ``out_raw``.

    The same maths, in the unconstrained coordinates: ``dl/dscale = dl/draw / sigmoid(raw)``;
    ``eps = (draw - loc) / scale`` (one draw, or None for no control variate);
    ``rho_i = min(rho, step_limit(scale g, S, max_kl))``;
    ``B = (1 + max(x, 0)) / (1 - min(x, 0))``,
    ``x = clamp(rho_i S, 1 - F, F - 1)`` (``F = NOISY_VARIANCE_FACTOR``);
    ``scale' = scale / sqrt(B)``, ``loc' = loc - rho_i scale'^2 g``,
    ``raw' = log(expm1(scale'))``. ``scale`` is the guide's own ``softplus(raw)`` if
    given (saving two of the four transcendental functions per element, the larger part
    of the cost); else it is computed as ``log1p(exp(raw))``, which needs ``raw <= 20``.
    1-d contiguous tensors of one length.

    ``cv`` is the control variate's coefficient, as in :func:`diagonal_gaussian_step`:
    a number, a tensor like ``loc`` (e.g. :func:`sampled_median_cv`), or None:
    :func:`leave_one_out_cv` within each pass (see :func:`passes`; at most
    ``chunk_size(loc)`` elements, at least half that when there are more).

    :param work: a list of 6 scratch tensors of length ``min(len(loc), chunk_size(loc))``.
    :param previous: optional, the whitened mean gradient ``w`` of the previous step
        on the sample ``w[::hold_stride(len(loc))]``; it is read for ``agreement`` and
        overwritten with this step's.
    :returns: :class:`FusedSums`. ``check`` is the caller's check of the outputs, made
        while they are in cache.
    """
    n = loc.shape[0]
    taken = loc.new_zeros(())
    check = loc.new_zeros(())
    # In float64: the squares of a huge but finite float32 gradient overflow, and the
    # hold test then read inf as "no agreement". The sample is small (HOLD_SAMPLE).
    agreement = loc.new_zeros((), dtype=torch.float64)
    norm2 = loc.new_zeros((), dtype=torch.float64)
    stride = hold_stride(n)
    root_kl = math.sqrt(max_kl)
    tiny = torch.finfo(loc.dtype).tiny
    for start, stop in passes(n, chunk_size(loc)):
        r, m, gl, gr = (t[start:stop] for t in (raw, loc, grad_loc, grad_raw))
        s, A, C, D, E, F = (t[:stop - start] for t in work)
        if scale is None:
            torch.exp(r, out=A)
            torch.log1p(A, out=s)                      # scale
            torch.div(gr, A, out=C)
            C.mul_(A.add_(1)).mul_(s)                  # scale dl/dscale, 1/sigmoid = (1+e)/e
        else:
            s = scale[start:stop]
            torch.sigmoid(r, out=A)
            torch.div(gr, A, out=C).mul_(s)            # scale dl/dscale
        if draw is not None:
            torch.sub(draw[start:stop], m, out=D).div_(s)   # eps
            torch.mul(D, D, out=E)                          # eps^2
            if cv is None or torch.is_tensor(cv):
                coefficient = F if cv is None else cv[start:stop]  # (F is overwritten below)
                if cv is None:
                    # c_i = (sum(a + 1) - a_i - 1) / (sum(eps^2) - eps_i^2), a = C
                    torch.sub(C.sum() + (stop - start - 1), C, out=F)
                    F.div_(torch.sub(E.sum(), E, out=A).clamp_min_(tiny))
                g = torch.addcdiv(gl, torch.mul(D, coefficient, out=A), s, value=-1, out=A)
                C.addcmul_(coefficient, E.sub_(1), value=-1)          # S
            else:
                g = torch.addcdiv(gl, D, s, value=-cv, out=A)    # dl/dloc - cv eps / scale
                C.add_(E.sub_(1), alpha=-cv)                      # S
        else:
            g = gl
        torch.mul(s, g, out=D)                         # w
        if previous is not None:
            first = -(-start // stride) * stride  # the pass's first sampled element
            sample = D[first - start::stride]
            part = previous[first // stride:first // stride + sample.shape[0]]
            wide = sample.to(torch.float64)
            norm2 += torch.dot(wide, wide)
            agreement += torch.dot(wide, part.to(torch.float64))
            part.copy_(sample)
        # rho_i = min(rho, 2k / (a + sqrt(a^2 + 4k a b)), sqrt(2) k / b): step_limit,
        # a = |w|, b = |S|, k = sqrt(max_kl), as 2k / max(sqrt(a) (sqrt(a) + sqrt(a + 4k b)),
        # sqrt(2) b): a^2 overflows for a huge finite gradient (and made rho_i 0), and one
        # reciprocal serves both limits, so this takes no more operations than before.
        torch.abs(C, out=E)
        torch.add(D.abs_(), E, alpha=4 * root_kl, out=F).sqrt_()
        F.add_(D.sqrt_()).mul_(D)
        torch.maximum(F, E.mul_(math.sqrt(2)), out=D).reciprocal_().mul_(2 * root_kl)
        D.clamp_max_(rho)
        taken += D.sum()
        C.mul_(D).clamp_(1 - NOISY_VARIANCE_FACTOR, NOISY_VARIANCE_FACTOR - 1)  # x
        torch.clamp_max(C, 0, out=E)
        # B^(-1/2) = (1 + |x|)^(-1/2) (1 - min(x, 0))
        C.abs_().add_(1).rsqrt_().addcmul_(C, E, value=-1)
        torch.mul(s, C, out=E)                         # scale'
        D.mul_(g).mul_(E)
        new_loc = torch.addcmul(m, D, E, value=-1, out=out_loc[start:stop])
        torch.expm1(E, out=D)
        new_raw = torch.log(D, out=out_raw[start:stop])
        check += new_loc.sum() + new_raw.sum()
    return FusedSums(taken, check, agreement, norm2)
