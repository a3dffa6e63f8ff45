"""Natural-gradient steps for :class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal`.

Its posterior is ``N(loc, Sigma)``, ``Sigma = diag(s) (C C^T + I) diag(s)``, with
parameters ``loc``, ``C`` (``cov_factor``, ``d x k``) and ``s`` (``scale``,
``softplus_positive``). Two steps, by what the optimizer knows:

* **With the model's Hessian** (``curvature="auto"`` up to
  :data:`~pyro_natgrad.optim.MAX_CURVATURE_DIM` latent dimensions, or ``"hessian"``,
  ``"ggn"``): the natural-gradient step of a *full-rank* Gaussian on a running precision
  ``P' = (1 - rho) P + rho H`` (``H`` the Hessian at the guide's draw, as for
  ``AutoNormal``), a Newton step for ``loc`` with ``P'``, and the covariance set to the
  member of the low-rank family nearest ``N(loc, P'^{-1})`` in ``KL(q || .)``
  (:func:`project_lowrank`). For a Gaussian posterior its fixed points are stationary
  points of the low-rank ELBO, which are exactly the projections of ``E_q[H]``; the
  projection is a local search (two starts), so not certified to be the best one.
* **Without it** (above that dimension, ``curvature="none"``, or a step without any
  draw of the guide, as in a custom loop around ``JitTrace_ELBO``): ``loc`` alone
  takes the step
  ``loc' = loc - rho Sigma dl/dloc`` (the Fisher of ``LowRankMultivariateNormal`` is
  block diagonal, mean | covariance), with the schedule and the KL trust region
  ``rho^2/2 g^T Sigma g <= max_kl``, the gradient first cleared of the guide's score
  at its own draws (the "sticking the landing" control variate, :func:`score_at`);
  ``cov_factor`` and ``scale`` go to the base optimizer (Adam by default).

Why the covariance then has no natural-gradient step: there is no closed-form
mirror step inside the low-rank family, and the Fisher-preconditioned step in
``(C, s)`` (closed-form Fisher, rotations of ``C`` projected out, exact-KL
backtracking, no diagonal variance more than doubling or halving per step; also
with Levenberg-Marquardt damping of 1e-3 and 1e-1 times the mean Fisher diagonal)
diverged with single-draw gradients on the diabetes regression: the Fisher of ``C``
scales like ``|C|^2``, so near ``C = 0`` noise is amplified without bound. The
projection above needs no gradient of the covariance at all.

Measured against Adam by ``benchmarks/lowrank_vs_adam.py`` (diabetes regression,
rank 3, exact ELBO gap to the best low-rank ELBO); the figures are in
``docs/optimizer.rst``.
"""

import math
from typing import List

import numpy as np
import scipy.linalg
import scipy.optimize
import torch
from pyro.infer.autoguide import AutoGuideList, AutoLowRankMultivariateNormal

from .expfam_step import write_param
from .guides import _pyro_param


#: Why a low-rank covariance takes base-optimizer steps (formatted with the site).
COVARIANCE_REASON = (
    "site {site!r}: a low-rank covariance takes natural-gradient steps only by the "
    "projection step, which needs the model's Hessian (AutoLowRankMultivariateNormal with "
    "curvature 'auto' up to MAX_CURVATURE_DIM latents, 'hessian' or 'ggn'); its Fisher step "
    "from gradients alone is unstable (see pyro_natgrad.lowrank)")


class LowRankGaussianGroup:
    """One ``AutoLowRankMultivariateNormal``. It owns ``loc``, and ``cov_factor`` and
    ``scale`` too once :meth:`own_covariance` is called (when the optimizer has the
    model's Hessian for the projection step)."""

    def __init__(self, key, site, loc, cov_factor, scale_raw, scale_transform):
        self.key, self.site = key, site
        self.params = {"loc": loc}
        self.cov_factor, self.scale_raw = cov_factor, scale_raw
        self.transforms = {"scale": scale_transform}

    @property
    def kind(self):
        return "low-rank Gaussian" if self.owns_covariance() else "low-rank Gaussian, mean only"

    def own_covariance(self):
        self.params.update(cov_factor=self.cov_factor, scale=self.scale_raw)

    def owns_covariance(self) -> bool:
        return "cov_factor" in self.params

    def covariance_tensors(self):
        """The tensors that go to the base optimizer in a step without the projection."""
        return [self.cov_factor, self.scale_raw] if self.owns_covariance() else []

    def tensors(self):
        return list(self.params.values())

    def grads(self):
        return {k: p.grad for k, p in self.params.items()}

    def factors(self):
        """``(C, s)``, detached."""
        return self.cov_factor.detach(), self.transforms["scale"](self.scale_raw.detach())

    def covariance(self):
        """``Sigma = diag(s) (C C^T + I) diag(s)``, dense ``(d, d)``."""
        C, s = self.factors()
        W = C * s.unsqueeze(-1)
        return W @ W.mT + torch.diag(s.square())

    def posterior(self, requires_grad=False):
        from pyro.distributions import LowRankMultivariateNormal

        loc = self.params["loc"].detach().clone().requires_grad_(requires_grad)
        C, s = self.factors()
        return loc, LowRankMultivariateNormal(loc, C * s.unsqueeze(-1), s.square(),
                                              validate_args=False)

    def draws(self, records):
        """This step's draws of the latent, ``(N, d)``, or None."""
        zs = [r[self.site][0] for r in records if self.site in r]
        if not zs:
            return None
        d = self.params["loc"].shape[-1]
        return torch.cat([z.reshape(-1, d) for z in zs])

    def natural_step(self, grads, rho, max_kl, records=()):
        return lowrank_mean_step(self, grads, rho, max_kl, records)

    def write_covariance(self, C, s):
        write_param(self.cov_factor, C.to(self.cov_factor.dtype))
        write_param(self.scale_raw, self.transforms["scale"].inv(s.to(self.scale_raw.dtype)))


def read_lowrank(guide, prefix="") -> List[LowRankGaussianGroup]:
    """The low-rank groups of an autoguide (recursing into ``AutoGuideList``)."""
    if isinstance(guide, AutoGuideList):
        out = []
        for i, part in enumerate(guide):
            out += read_lowrank(part, prefix=f"{prefix}{i}.")
        return out
    if type(guide) is not AutoLowRankMultivariateNormal \
            or getattr(guide, "prototype_trace", None) is None:
        return []
    from torch.distributions import transform_to

    loc, _ = _pyro_param(guide, "loc")
    cov_factor, _ = _pyro_param(guide, "cov_factor")
    raw, constraint = _pyro_param(guide, "scale")
    return [LowRankGaussianGroup(f"{prefix}latent", f"_{guide._pyro_name}_latent", loc,
                                 cov_factor, raw, transform_to(constraint))]


def score_at(group, z):
    """``mean_n d/dloc log q(z_n) = Sigma^{-1} (mean_n z_n - loc)``: the guide's score at
    its own draws. The single-draw ELBO gradient contains it (``+ log q`` in the
    loss) and it has mean zero, so subtracting it leaves the gradient unbiased."""
    with torch.enable_grad():
        loc, q = group.posterior(requires_grad=True)
        (g,) = torch.autograd.grad(q.log_prob(z).mean(), loc)
    return g


def lowrank_mean_step(group, grads, rho, max_kl, records=()):
    """``loc' = loc - rho Sigma (dl/dloc - score)``; writes ``loc``, returns ``rho`` used."""
    z = group.draws(records) if records else None
    g = grads["loc"]
    if z is not None:
        g = g - score_at(group, z)
    with torch.no_grad():
        loc, q = group.posterior()
        # In units of the largest gradient element: Sigma g (and g^T Sigma g) of a huge but
        # finite float32 gradient overflow, which made the step 0, then NaN.
        tiny = torch.finfo(loc.dtype).tiny
        top = g.abs().amax().clamp_min(tiny)
        unit = (q.covariance_matrix @ (g / top).unsqueeze(-1)).squeeze(-1)  # Sigma g / top
        move = torch.as_tensor(float(rho), dtype=loc.dtype) * top  # r top, for r = rho
        if max_kl is not None:
            # r <= sqrt(max_kl) / sqrt(g^T Sigma g / 2), so r top <= that bound:
            root = (0.5 * (g / top * unit).sum()).clamp_min(0).sqrt().clamp_min(tiny)
            move = torch.minimum(move, math.sqrt(max_kl) / root)
        new_loc = loc - move * unit
        if not bool(torch.isfinite(new_loc).all()):
            return None  # an overflow without a trust region: no step
        write_param(group.params["loc"], new_loc)
    return move / top


def project_lowrank(P, rank, scale=None, tol=1e-6, max_iter=500):
    """The low-rank Gaussian nearest ``N(mu, P^{-1})`` in ``KL(q || N(mu, P^{-1}))``:
    ``argmin tr(P Sigma) - log|Sigma|`` over ``Sigma = diag(s) (C C^T + I) diag(s)``.

    Given ``s``, the best ``C`` is closed form: with ``(lambda_j, u_j)`` the ``rank``
    smallest eigenpairs of ``diag(s) P diag(s)``, ``C = [u_j sqrt(1/lambda_j - 1)]``
    (0 where ``lambda_j >= 1``), and the objective becomes
    ``f(s) = sum_i P_ii s_i^2 - 2 sum_i log s_i + sum_j h(lambda_j)``,
    ``h(lambda) = 1 - lambda + log(lambda)`` for ``lambda < 1`` (else 0), with
    ``df/dlog s_i = 2 P_ii s_i^2 - 2 + 2 sum_j (1 - lambda_j)_+ u_ij^2``.
    ``f`` is minimised over ``log s`` by L-BFGS-B within ``s_i <= P_ii^{-1/2}`` (which
    the optimum satisfies: ``P_ii s_i^2 = ((C C^T + I)^{-1})_ii <= 1``) and
    ``s_i >= eps^{1/6} P_ii^{-1/2}``, ``eps`` the machine epsilon of ``P``'s dtype: with
    strongly correlated coordinates the infimum can lie at ``s_i -> 0`` (the factors
    carry coordinate ``i`` alone, a Heywood case of factor analysis), where Pyro's
    capacitance matrix ``I + W^T diag(s)^{-2} W`` would lose all precision. ``f`` is not
    convex and a warm start alone can stay in a local minimum, so it runs from
    ``scale`` (a warm start) and from the mean-field optimum ``P_ii^{-1/2}``; without a
    warm start also from the mean-field optimum with one coordinate ``i`` put at the
    floor, for the ``2 rank`` coordinates with the largest ``P_ii (P^{-1})_ii`` (the
    variance inflation factor: the coordinates best explained by the others, the
    likeliest Heywood cases). It keeps the best. (The optimizer's steps pass the guide's
    scale, whose basin the previous steps chose, and skip these extra runs.) The local
    minima differ mainly in which coordinates are Heywood cases; from the mean-field
    start alone it missed the best of these starts by up to 0.05 in
    ``tr(P Sigma) - log|Sigma|`` for about half of random 12 x 12 (rank 3) and 20 x 20
    (rank 4) precisions. Still a local search: the best of the starts, not a certified
    global minimum. Computed in float64 with partial eigendecompositions
    (``O(d^2 rank)`` per evaluation; two runs, or ``2 rank + 1`` without ``scale``).

    :param P: ``(d, d)`` symmetric positive definite precision.
    :param rank: ``k``, the number of columns of ``C``.
    :param scale: optional ``(d,)`` starting ``s``.
    :returns: ``(C, s)``, shapes ``(d, k)`` and ``(d,)``, in ``P``'s dtype and device.
    """
    d = P.shape[-1]
    if P.shape != (d, d):
        raise ValueError(f"P must be a square matrix, got shape {tuple(P.shape)}")
    Pn = P.detach().to("cpu", torch.float64).numpy()
    Pn = 0.5 * (Pn + Pn.T)
    diag = np.diag(Pn).copy()
    if not (np.all(np.isfinite(Pn)) and np.all(diag > 0)):
        raise ValueError("P must be finite with a positive diagonal")
    m = min(rank, d)
    upper = -0.5 * np.log(diag)  # log of the mean-field optimum, a bound on log s
    lower = upper - math.log(1 / torch.finfo(P.dtype).eps) / 6

    def eig(u):
        s = np.exp(u)
        lam, U = scipy.linalg.eigh(s[:, None] * Pn * s[None, :], subset_by_index=(0, m - 1),
                                   check_finite=False)
        return s, lam, U

    def objective(u):
        s, lam, U = eig(u)
        below = lam < 1
        lam_b = np.where(below, lam, 1.0)
        # A rounding error can leave a tiny or negative eigenvalue: then this u is far
        # outside the optimum's basin; an infinite value makes the line search back off.
        if np.any(lam_b <= 0):
            return math.inf, np.zeros_like(u)
        value = float(np.sum(diag * s * s) - 2 * np.sum(u) + np.sum(1 - lam_b + np.log(lam_b)))
        grad = 2 * diag * s * s - 2 + 2 * ((1 - lam_b) * U * U).sum(-1)
        return value, grad

    starts = [upper]
    if scale is None and m < d:
        # Heywood starts: the mean-field optimum with one coordinate at the floor, for
        # the coordinates of largest variance inflation P_ii (P^{-1})_ii, where
        # (P^{-1})_ii is the squared norm of column i of L^{-1} (P = L L^T).
        try:
            Linv = scipy.linalg.solve_triangular(np.linalg.cholesky(Pn), np.eye(d),
                                                 lower=True, check_finite=False)
        except np.linalg.LinAlgError:  # not positive definite in floating point
            Linv = None
        if Linv is not None:
            vif = diag * np.square(Linv).sum(0)
            for i in np.argsort(-vif, kind="stable")[:2 * m]:
                u0 = upper.copy()
                u0[i] = lower[i]
                starts.append(u0)
    if scale is not None:
        s0 = scale.detach().to("cpu", torch.float64).numpy()
        if np.all(np.isfinite(s0)) and np.all(s0 > 0):
            starts.append(np.clip(np.log(s0), lower, upper))
    best, u = math.inf, upper
    for u0 in starts:
        result = scipy.optimize.minimize(
            objective, u0, jac=True, method="L-BFGS-B", bounds=list(zip(lower, upper)),
            options=dict(maxiter=max_iter, gtol=tol, ftol=1e-13))
        if result.fun < best:
            best, u = result.fun, result.x
    s, lam, U = eig(u)
    C = np.zeros((d, rank))
    C[:, :m] = U * np.sqrt(np.clip(1 / lam - 1, 0, None))
    return (torch.from_numpy(C).to(P.dtype).to(P.device),
            torch.from_numpy(s).to(P.dtype).to(P.device))
