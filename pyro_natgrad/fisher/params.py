"""How a distribution's parameters become a flat coordinate vector.

A :class:`ParamSpec` names one parameter tensor and says how its trailing
``event_dim`` dimensions are flattened into coordinates:

* ``packing="full"``: every entry is a coordinate (C order).
* ``packing="tril"``: the last two dimensions are a square matrix of which only
  the lower triangle (``torch.tril_indices`` order) are coordinates. Used for
  ``scale_tril`` and for symmetric matrices (``covariance_matrix``,
  ``precision_matrix``), where the coordinate ``t_ij`` (``i > j``) sets both
  ``S_ij`` and ``S_ji`` (``symmetric=True``): its gradient is ``G_ij + G_ji`` for
  the gradient ``G`` with respect to the whole matrix (:func:`fold_symmetric`).

Per-parameter tensors ("dict form") keep the parameter's own shape, with any
number of extra leading dimensions; flat vectors have shape
``extra + batch_shape + (k,)``.
"""

from dataclasses import dataclass, replace
from typing import Dict, List, Sequence

import torch

_PACKINGS = ("full", "tril")


@dataclass(frozen=True)
class ParamSpec:
    """One block of coordinates.

    :param str name: parameter name (a constructor argument of the distribution).
    :param torch.Tensor value: the parameter, shape ``batch_shape + event_shape``.
    :param int event_dim: how many trailing dims of ``value`` belong to one batch element.
    :param str packing: ``"full"`` or ``"tril"``.
    :param bool symmetric: a ``"tril"`` block of a symmetric matrix (each off-diagonal
        coordinate sets two entries), not of a triangular one.
    """

    name: str
    value: torch.Tensor
    event_dim: int
    packing: str = "full"
    symmetric: bool = False

    def __post_init__(self):
        if self.packing not in _PACKINGS:
            raise ValueError(f"packing must be one of {_PACKINGS}, got {self.packing!r}")
        if self.packing == "tril" and self.event_dim < 2:
            raise ValueError("packing='tril' needs event_dim >= 2")
        if self.symmetric and self.packing != "tril":
            raise ValueError("symmetric=True needs packing='tril'")

    @property
    def event_shape(self) -> torch.Size:
        return self.value.shape[self.value.dim() - self.event_dim:]

    @property
    def size(self) -> int:
        shape = self.event_shape
        if self.packing == "tril":
            n = shape[-1]
            return int(torch.Size(shape[:-2]).numel()) * n * (n + 1) // 2
        return int(shape.numel())

    def reinterpret(self, n: int) -> "ParamSpec":
        """The same block with ``n`` more batch dims moved into the event."""
        return replace(self, event_dim=self.event_dim + n)

    def flatten(self, x: torch.Tensor) -> torch.Tensor:
        """``extra + batch + event_shape -> extra + batch + (size,)``."""
        lead = x.shape[: x.dim() - self.event_dim]
        if self.packing == "tril":
            n = x.shape[-1]
            rows, cols = torch.tril_indices(n, n, device=x.device)
            x = x[..., rows, cols]
        return x.reshape(lead + (self.size,))

    def unflatten(self, flat: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`flatten`; ``tril`` blocks come back lower triangular."""
        lead = flat.shape[:-1]
        shape = self.event_shape
        if self.packing == "tril":
            n = shape[-1]
            rows, cols = torch.tril_indices(n, n, device=flat.device)
            tri = flat.reshape(lead + shape[:-2] + (n * (n + 1) // 2,))
            out = flat.new_zeros(lead + shape)
            out[..., rows, cols] = tri
            return out
        return flat.reshape(lead + shape)


def flatten(specs: Sequence[ParamSpec], tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Concatenate per-parameter tensors into one flat coordinate vector."""
    return torch.cat([s.flatten(tensors[s.name]) for s in specs], dim=-1)


def unflatten(specs: Sequence[ParamSpec], flat: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Split a flat coordinate vector into per-parameter tensors."""
    out, start = {}, 0
    for s in specs:
        out[s.name] = s.unflatten(flat[..., start:start + s.size])
        start += s.size
    return out


def symmetrize(t: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose lower triangle is ``tril(t)``."""
    low = t.tril()
    return low + low.tril(-1).transpose(-1, -2)


def fold_symmetric(g: torch.Tensor) -> torch.Tensor:
    """The lower-triangle coordinates' gradient ``tril(g) + tril(g^T, -1)`` of a symmetric
    matrix whose gradient as a whole matrix is ``g``: the same for autograd's symmetric
    gradient (of ``cholesky(S)``, say) and for a gradient that is lower triangular
    already (of a use that reads the lower triangle only)."""
    return g.tril() + g.mT.tril(-1)


def tril_half_diag(x: torch.Tensor) -> torch.Tensor:
    """``tril(x)`` with its diagonal halved: the tril-coordinate gradient of a
    symmetric-matrix quadratic form whose matrix gradient is ``x``."""
    return x.tril(-1) + torch.diag_embed(0.5 * x.diagonal(dim1=-2, dim2=-1))


def total_size(specs: List[ParamSpec]) -> int:
    return sum(s.size for s in specs)
