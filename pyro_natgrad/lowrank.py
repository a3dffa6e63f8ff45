"""Natural-gradient steps for :class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal`.

Its posterior is ``N(loc, Sigma)``, ``Sigma = W W^T + diag(D)``, ``W = C * s[:, None]``,
``D = s^2``, with parameters ``loc``, ``C`` (``cov_factor``) and ``s`` (``scale``,
``softplus_positive``). The Fisher of ``LowRankMultivariateNormal`` is block diagonal,
mean | covariance (:class:`~pyro_natgrad.fisher.LowRankGaussianFisher`), so:

* ``loc`` takes the natural-gradient step ``loc' = loc - rho Sigma dl/dloc`` with the
  optimizer's schedule and KL trust region (``rho^2/2 g^T Sigma g <= max_kl``), the
  gradient first cleared of the guide's score at its own draws (the "sticking the
  landing" control variate, :func:`score_at`; zero mean, and all the noise when the
  posterior is in the family);
* ``cov_factor`` and ``scale`` go to the base optimizer (Adam by default).

Why not a natural-gradient step for the covariance too: there is no closed-form
mirror step inside the low-rank family, and the Fisher-preconditioned step in
``(W, D)`` (closed-form Fisher, rotations of ``W`` projected out, exact-KL
backtracking, no diagonal variance more than doubling or halving per step; also
with Levenberg-Marquardt damping of 1e-3 and 1e-1 times the mean Fisher diagonal)
diverged with single-draw gradients on the diabetes regression: the Fisher of ``W``
scales like ``|W|^2``, so near ``W = 0`` noise is amplified without bound.

Measured against Adam (``benchmarks/lowrank_vs_adam.py``, diabetes regression, rank 3,
median of 3 seeds, exact ELBO gap after 30/100/300/1000/3000 steps): this hybrid
71/73/5.5/2.8/1.5 nats, the best Adam learning rate of 0.001/0.01/0.1 at each budget
25/4.8/6.8/3.7/2.1. Worse than Adam early, modestly better late.
"""

from typing import List

import torch
from pyro.infer.autoguide import AutoGuideList, AutoLowRankMultivariateNormal

from .expfam_step import write_param
from .guides import _pyro_param


class LowRankGaussianGroup:
    """The ``loc`` of one ``AutoLowRankMultivariateNormal`` (its covariance parameters
    are read, not stepped)."""

    kind = "low-rank Gaussian, mean only"

    def __init__(self, key, site, loc, cov_factor, scale_raw, scale_transform):
        self.key, self.site = key, site
        self.params = {"loc": loc}
        self.cov_factor, self.scale_raw = cov_factor, scale_raw
        self.transforms = {"scale": scale_transform}

    def tensors(self):
        return list(self.params.values())

    def grads(self):
        return {k: p.grad for k, p in self.params.items()}

    def posterior(self, requires_grad=False):
        from pyro.distributions import LowRankMultivariateNormal

        loc = self.params["loc"].detach().clone().requires_grad_(requires_grad)
        s = self.transforms["scale"](self.scale_raw.detach())
        W = self.cov_factor.detach() * s.unsqueeze(-1)
        return loc, LowRankMultivariateNormal(loc, W, s.square(), validate_args=False)

    def draws(self, records):
        """This step's draws of the latent, ``(N, d)``, or None."""
        zs = [r[self.site][0] for r in records if self.site in r]
        if not zs:
            return None
        d = self.params["loc"].shape[-1]
        return torch.cat([z.reshape(-1, d) for z in zs])

    def natural_step(self, grads, rho, max_kl, records=()):
        return lowrank_mean_step(self, grads, rho, max_kl, records)


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
        direction = (q.covariance_matrix @ g.unsqueeze(-1)).squeeze(-1)
        r = torch.as_tensor(float(rho), dtype=loc.dtype)
        if max_kl is not None:
            size = (0.5 * (g * direction).sum()).clamp_min(torch.finfo(loc.dtype).tiny)
            r = torch.minimum(r, (max_kl / size).sqrt())
        write_param(group.params["loc"], loc - r * direction)
    return r
