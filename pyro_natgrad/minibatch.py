"""Minibatch SVI: the plates of a subsampled ``AutoNormal`` site, and the diagonal of the
model's Hessian over each step's globals and subsample.

With a subsampled plate the ELBO scales each item's terms by ``full_size / size``, so a
local latent's gradient, and its Hessian entry, carry that factor; the natural step
uses them without it. The items are conditionally independent given the globals, so
one Hessian-vector product per local coordinate *of one item* gives that coordinate's
diagonal entry for every item of the subsample at once.
"""

import math
from typing import Dict, Iterable, Optional

import torch

from .guides import DiagonalGaussianGroup, DrawRecorder, _scatter


def plate_stack(guide, group, records):
    """The plates of the group's site in this step's draws or, without any, in the
    guide's prototype trace."""
    for record in records:
        if group.site in record:
            return record[group.site][1]
    name = group.site[: -len("_unconstrained")]
    return guide.prototype_trace.nodes[name]["cond_indep_stack"]


def subsampled(guide, group, records) -> bool:
    """Whether the group's site is in a subsampled plate this step."""
    return any(f.full_size is not None and f.full_size != f.size
               for f in plate_stack(guide, group, records))


def plate_scale(guide, group, records) -> float:
    """``full_size / size`` of the site's subsampled plates, from this step's draws or,
    without them, from the guide's prototype trace."""
    c = 1.0
    for f in plate_stack(guide, group, records):
        if f.full_size is not None and f.size:
            c *= f.full_size / f.size
    return c


def minibatch_targets(curv, groups: Iterable[DiagonalGaussianGroup], records,
                      limit: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """``{group key: precision target}`` for a subsampled ``AutoNormal``: minus the
    diagonal of the model's Hessian at this step's draws (globals and the subsample's
    locals), averaged over the draws (and vectorised particles) that visited each element,
    full-size (0 outside the subsamples); each local's entry is unscaled by its plate's
    ``full_size / size``, as its gradient is.

    Cost: one backward pass per global coordinate and per local coordinate of one item,
    for each particle, not per subsample element.

    :param curv: the guide's :class:`~pyro_natgrad.curvature.ModelCurvature`.
    :param groups: the guide's groups, one per site.
    :param records: this step's records of ``DrawRecorder`` (``pyro_natgrad.guides``).
    :param limit: the largest number of Hessian-vector products per draw, or None.
    :returns: empty (gradient-only steps) when the draws do not allow it or above
        ``limit``.
    """
    groups = {g.site[: -len("_unconstrained")]: g for g in groups}
    names = [name for name, _, _ in curv._sites()]
    if not records or set(names) != set(groups):
        return {}
    sums, visits = {}, {}
    for record in records:
        if not all(groups[n].site in record for n in names):
            return {}
        # Vectorised particles: a leading particle dimension (and the particle plate's
        # singleton dims); each particle's draw is one Hessian evaluation.
        batched = {}
        for n in names:
            value = record[groups[n].site][0]
            lead = value.dim() - groups[n].params["loc"].dim()
            if lead < 0:
                return {}
            batched[n] = value.reshape((-1,) + value.shape[lead:])
        particles = {b.shape[0] for b in batched.values()}
        if len(particles) != 1:
            return {}
        particles = particles.pop()
        shapes = {n: batched[n].shape[1:] for n in names}
        # One item's shape per site: the draw's with its subsampled dims set to 1.
        reduced = {}
        for n in names:
            shape = shapes[n]
            items = {d % len(shape) for d, _ in groups[n].subsample_index(record)}
            reduced[n] = [1 if i in items else s for i, s in enumerate(shape)]
        if limit is not None and sum(math.prod(r) for r in reduced.values()) > limit:
            return {}
        total = sum(shapes[n].numel() for n in names)
        dtype, device = batched[names[0]].dtype, batched[names[0]].device
        probes, pos = [], 0
        for n in names:
            label = torch.arange(math.prod(reduced[n]), device=device).reshape(reduced[n])
            label = label.expand(shapes[n]).reshape(-1)
            for k in range(math.prod(reduced[n])):
                v = torch.zeros(total, dtype=dtype, device=device)
                v[pos:pos + label.numel()] = (label == k).to(dtype)
                probes.append(v)
            pos += label.numel()
        for p in range(particles):
            z = torch.cat([batched[n][p].reshape(-1) for n in names])
            diag = -curv.hessian_diagonal(z, probes, shapes=shapes,
                                          subsample=DrawRecorder.plate_indices(record))
            if not bool(torch.isfinite(diag).all()):
                return {}
            pos = 0
            for n in names:
                g, k = groups[n], shapes[n].numel()
                part = diag[pos:pos + k].reshape(shapes[n])
                pos += k
                index = g.subsample_index(record)
                seen = 1.0
                if index:
                    part = part / plate_scale(curv.guide, g, [record])
                    seen = _scatter(g.params["loc"], torch.ones_like(part), index)
                    part = _scatter(g.params["loc"], part, index)
                sums[g.key] = sums.get(g.key, 0) + part
                visits[g.key] = visits.get(g.key, 0) + seen
    # Each element's average over the draws that visited it: sequential particles draw
    # their own subsamples (averaging over all draws shrank a rarely visited element's
    # target, and so widened its variance, k-fold).
    return {key: value / torch.as_tensor(visits[key]).clamp_min(1)
            for key, value in sums.items()}
