"""The natural gradient of one distribution, for users who write their own loops.

::

    q = dist.Gamma(alpha, beta)                    # alpha, beta: leaves, requires_grad
    loss = ...                                     # any differentiable function of q
    g = torch.autograd.grad(loss, [alpha, beta])
    with torch.no_grad():
        nat = natural_gradient(q, {"concentration": g[0], "rate": g[1]})
        alpha -= lr * nat["concentration"]         # (a positive parameter is better
        beta -= lr * nat["rate"]                   # stepped in coords="unconstrained")

In ``coords="standard"`` the natural gradient is differentiable with respect to ``q``'s
parameters, like any function of them. In the other coordinates it is not (the change of
coordinates is taken at the current values, outside the graph, so autograd's derivative
misses its dependence on them): compute it under ``torch.no_grad()`` for a plain step.
"""

from typing import Dict, Sequence

import torch
from torch.distributions import Distribution

from .fisher import fisher_operator
from .fisher.params import fold_symmetric, symmetrize


def natural_gradient(d: Distribution, grads: Dict[str, torch.Tensor], coords="standard",
                     damping: float = 0.0) -> Dict[str, torch.Tensor]:
    """``(F + damping I)^{-1} g``: the natural gradient of a loss with respect to the
    parameters of ``d``.

    :param d: the distribution at the current parameters.
    :param grads: ``{parameter name: gradient}``, each shaped like the parameter (in
        the chosen coordinates); names not given are held fixed. With
        ``coords="natural"`` or ``"mean"`` the names are the coordinates' (``eta1``,
        ``eta2``; ``mean1``, ``mean2``; see ``fisher_operator(d, coords).names``), all
        of them: the natural gradient in natural coordinates is the ordinary gradient in
        mean coordinates (and vice versa). A symmetric matrix parameter
        (``covariance_matrix``, ``precision_matrix``) takes its gradient as a whole
        matrix ``G``, as autograd gives it (symmetric, or lower triangular when the
        matrix is used through its lower triangle only): its lower-triangle coordinates'
        gradient is ``G_ii`` and ``G_ij + G_ji``. Of ``scale_tril`` (and of ``eta2``,
        ``mean2``) only the lower triangle is read.
    :param coords: as in :func:`~pyro_natgrad.fisher.fisher_information`, e.g.
        ``"unconstrained"`` when the gradients are with respect to ``log`` scales.
    :param damping: added to the Fisher's diagonal; needed for families whose
        Fisher is singular (``Delta``; ``LowRankMultivariateNormal`` of rank ``>= 2``
        when ``cov_factor`` is in ``grads``) and useful when it is near-singular.
        ``Categorical`` and ``Multinomial`` solve undamped (minimum-norm, see
        :func:`~pyro_natgrad.fisher.fisher_solve`).
    :returns: ``{parameter name: natural gradient}``, shaped like ``grads``; for a
        symmetric matrix parameter the symmetric matrix ``D`` of the step
        ``S - lr * D`` (for a Gaussian's covariance, ``2 S G S``). Uses
        the structured solve of the family (elementwise for diagonal families,
        ``O(d^3)`` for a full-rank Gaussian).
    :raises ValueError: for a gradient not shaped like its parameter, e.g. of a
        parameter shared by the batch (broadcast by the distribution: not supported).
    """
    names = _names(d, grads)
    op = fisher_operator(d, coords=coords, params=names)
    for s in op.specs:
        g = grads[s.name]
        if torch.is_tensor(g) and g.shape != s.value.shape and _broadcast(s.value) \
                and torch.broadcast_shapes(g.shape, s.value.shape) == s.value.shape:
            # Expanding the gradient, as the message below would suggest, gives a wrong
            # step: a shared parameter's Fisher is the sum over the batch.
            raise ValueError(
                f"grads[{s.name!r}] has shape {tuple(g.shape)}: {s.name!r} is shared by "
                f"the batch of {type(d).__name__}, which broadcast it to "
                f"{tuple(s.value.shape)}. A shared parameter's natural gradient needs the "
                f"Fisher summed over the batch, which natural_gradient does not compute: "
                f"pass each parameter at the batch's shape (one per element).")
        if not torch.is_tensor(g) or g.shape != s.value.shape:
            got = f"shape {tuple(g.shape)}" if torch.is_tensor(g) else type(g).__name__
            where = f"coords {coords!r}" if isinstance(coords, str) else "the given coords"
            raise ValueError(
                f"grads[{s.name!r}] has {got}, but {s.name!r} of {type(d).__name__} (in "
                f"{where}) has shape {tuple(s.value.shape)}: pass each gradient shaped like "
                f"its parameter.")
    symmetric = {s.name for s in op.specs if s.symmetric}
    folded = {n: fold_symmetric(grads[n]) if n in symmetric else grads[n] for n in op.names}
    out = op.solve_dict(folded, damping)
    return {n: symmetrize(v) if n in symmetric else v for n, v in out.items()}


def _broadcast(t: torch.Tensor) -> bool:
    """Whether ``t`` is an expanded view (a stride of 0 along a dim of size > 1): torch
    distributions broadcast their parameters so, and one shared by the batch shows it."""
    return any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape))


def _names(d, grads) -> Sequence[str]:
    if not grads:
        raise ValueError("grads is empty; pass {parameter name: gradient}")
    return tuple(grads)
