"""Fisher information matrices as structured linear operators.

Every operator acts on the coordinates described by its :class:`ParamSpec` list
and supports, for a batch of distributions of shape ``batch_shape``:

* ``mv(v)``: ``F v`` for ``v`` of shape ``extra + batch_shape + (k,)``;
* ``solve(v, damping)``: ``(F + damping I)^{-1} v``;
* ``dense()``: the matrix, ``batch_shape + (k, k)``, formed only when asked for;
* the same products on per-parameter tensors: ``mv_dict`` and ``solve_dict``.

Subclasses implement ``_mv`` (dict form) and, where the structure gives one, an
exact ``_solve``. Without one, ``solve`` uses a dense Cholesky factorisation for
small ``k`` and preconditioned conjugate gradients otherwise.
"""

import math
from typing import Dict, List, Optional, Sequence

import torch

from .params import ParamSpec, flatten, symmetrize, tril_half_diag, unflatten

Tensors = Dict[str, torch.Tensor]

#: Above this many coordinates per batch element, solves without a structured
#: inverse use conjugate gradients instead of a dense Cholesky factorisation.
DENSE_SOLVE_MAX_DIM = 512


class SingularFisherError(ValueError):
    """Raised when an undamped solve is asked of a Fisher matrix with no inverse."""


class FisherOperator:
    """Base class: the Fisher information of a batch of distributions.

    :param specs: the coordinate blocks, in order.
    :param torch.Size batch_shape: shape of the batch of distributions.
    """

    #: Whether ``F`` is singular and the undamped ``_solve`` a minimum-norm one.
    singular = False

    def __init__(self, specs: Sequence[ParamSpec], batch_shape: torch.Size):
        self.specs: List[ParamSpec] = list(specs)
        self.batch_shape = torch.Size(batch_shape)

    # ---- bookkeeping -----------------------------------------------------------
    @property
    def names(self):
        return tuple(s.name for s in self.specs)

    @property
    def dim(self) -> int:
        """Number of coordinates ``k`` per batch element."""
        return sum(s.size for s in self.specs)

    @property
    def dtype(self) -> torch.dtype:
        return self.specs[0].value.dtype

    @property
    def device(self) -> torch.device:
        return self.specs[0].value.device

    def values(self) -> Tensors:
        """The current coordinate values, per parameter."""
        return {s.name: s.value for s in self.specs}

    def flatten(self, tensors: Tensors) -> torch.Tensor:
        return flatten(self.specs, tensors)

    def unflatten(self, flat: torch.Tensor) -> Tensors:
        if flat.shape[-1] != self.dim:
            raise ValueError(f"expected a vector with last dimension {self.dim} "
                             f"(coordinates {self.names}), got shape {tuple(flat.shape)}")
        return unflatten(self.specs, flat)

    def check_vector(self, v: torch.Tensor) -> None:
        """Raise a ValueError unless ``v`` has shape ``extra + batch_shape + (k,)``: torch
        would otherwise broadcast it against the batch, silently or with a bare error."""
        want = self.batch_shape + (self.dim,)
        shape = tuple(v.shape) if torch.is_tensor(v) else None
        if shape is None or len(shape) < len(want) or shape[len(shape) - len(want):] != want:
            raise ValueError(
                f"expected a vector of shape batch_shape + (k,) = {tuple(want)}, optionally "
                f"with extra leading dims (batch_shape {tuple(self.batch_shape)}, k = "
                f"{self.dim} coordinates over {list(self.names)}), got "
                f"{'shape ' + str(shape) if shape is not None else type(v).__name__}. "
                f"Flatten one vector per batch element with op.flatten({{name: tensor}}).")

    def reinterpret(self, n: int) -> "FisherOperator":
        """The operator of ``Independent(d, n)``: same products, ``n`` batch dims
        moved into each coordinate block (a block-diagonal Fisher)."""
        if n == 0:
            return self
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.specs = [s.reinterpret(n) for s in self.specs]
        new.batch_shape = self.batch_shape[: len(self.batch_shape) - n]
        return new

    def restrict(self, names) -> "FisherOperator":
        """The sub-block over the parameters ``names``, the others held fixed."""
        if tuple(names) == self.names:
            return self
        return RestrictedFisher(self, names)

    def _with_specs(self, names):
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.specs = [s for s in self.specs if s.name in names]
        return new

    # ---- products ----------------------------------------------------------------
    def _mv(self, v: Tensors) -> Tensors:
        raise NotImplementedError

    def _solve(self, v: Tensors, damping: float) -> Optional[Tensors]:
        """Exact structured solve, or ``None`` when the structure has none for
        this damping (the caller then falls back)."""
        return None

    def mv_dict(self, v: Tensors) -> Tensors:
        """``F v`` on per-parameter tensors."""
        return self._mv(v)

    def solve_dict(self, v: Tensors, damping: float = 0.0) -> Tensors:
        """``(F + damping I)^{-1} v`` on per-parameter tensors."""
        return self.unflatten(self.solve(self.flatten(v), damping))

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        """``F v``; ``v`` has shape ``extra + batch_shape + (k,)``."""
        self.check_vector(v)
        if v.numel() == 0:  # an empty batch, or no coordinates (a one-category Categorical)
            return v.clone()
        return self.flatten(self._mv(self.unflatten(v)))

    def solve(self, v: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
        """``(F + damping I)^{-1} v``; ``v`` has shape ``extra + batch_shape + (k,)``."""
        if damping < 0 or not math.isfinite(damping):
            raise ValueError(f"damping must be a finite number >= 0, got {damping}")
        self.check_vector(v)
        if v.numel() == 0:
            return v.clone()
        exact = self._solve(self.unflatten(v), damping)
        if exact is not None:
            return self.flatten(exact)
        if self.dim <= DENSE_SOLVE_MAX_DIM:
            return self._dense_solve(v, damping)
        return self._cg_solve(v, damping)

    def dense(self) -> torch.Tensor:
        """The Fisher matrix, shape ``batch_shape + (k, k)``."""
        k, nb = self.dim, len(self.batch_shape)
        eye = torch.eye(k, dtype=self.dtype, device=self.device)
        cols = eye.reshape((k,) + (1,) * nb + (k,)).expand((k,) + self.batch_shape + (k,))
        out = self.mv(cols)  # out[j, ..., i] = F_ij
        return out.movedim(0, -1)

    # ---- generic solves ---------------------------------------------------------
    def _dense_solve(self, v: torch.Tensor, damping: float) -> torch.Tensor:
        F = self.dense()
        if damping:
            F = F + damping * torch.eye(self.dim, dtype=F.dtype, device=F.device)
        # v: extra + batch + (k,) -> batch + (k, m) with the extra dims as columns.
        extra = v.dim() - 1 - len(self.batch_shape)
        # The extra dims' size spelled out: -1 is ambiguous for an empty batch.
        count = v.shape[:extra].numel()
        rhs = v.reshape((count,) + self.batch_shape + (self.dim,)).movedim(0, -1)
        if not damping:
            # A coordinate with a zero row and column of F (no trials, in natural or mean
            # coordinates) is a null direction: F x = v has a solution only for v 0 there,
            # and x is 0 there, the rest being a block of its own. A 1 on its diagonal
            # leaves the rest to Cholesky or pinv (and gives x = v = 0 there).
            none = (F == 0).all(-1)  # batch + (k,)
            if bool(none.any()):
                _refuse_zero_information(v, none, self.names)
                F = F + torch.diag_embed(none.to(F.dtype))
        if self.singular and not damping:
            # The minimum-norm solve, as the structured operators give: a Cholesky of a
            # singular matrix fails or, with a pivot of rounding size, succeeds with a
            # solution that depends on that rounding.
            sol = (torch.linalg.pinv(F, hermitian=True) @ rhs).movedim(-1, 0)
            return sol.reshape(v.shape[:extra] + self.batch_shape + (self.dim,))
        chol, info = torch.linalg.cholesky_ex(F)
        if bool((info != 0).any()):
            raise SingularFisherError(
                f"the Fisher matrix of {self.names} is singular or not positive definite "
                f"here; pass damping > 0")
        sol = torch.cholesky_solve(rhs, chol).movedim(-1, 0)
        return sol.reshape(v.shape[:extra] + self.batch_shape + (self.dim,))

    def _cg_solve(self, v: torch.Tensor, damping: float, tol: float = None,
                  max_iter: int = None) -> torch.Tensor:
        """Conjugate gradients on ``F + damping I``, preconditioned by the
        undamped structured inverse where one exists."""
        if tol is None:
            tol = 1e-10 if v.dtype == torch.float64 else 1e-5
        max_iter = 10 * self.dim if max_iter is None else max_iter

        def matvec(x):
            return self.mv(x) + damping * x

        def precond(r):
            # A singular F's undamped solve is a minimum-norm one, which drops r's component
            # along the null space: as a preconditioner CG could then never solve along it.
            try:
                exact = (self._solve(self.unflatten(r), 0.0)
                         if damping and not self.singular else None)
            except SingularFisherError:  # no undamped inverse to precondition with
                exact = None
            return self.flatten(exact) if exact is not None else r

        from ..linalg import conjugate_gradient  # local: linalg imports nothing of ours

        return conjugate_gradient(matvec, v, precond=precond, tol=tol, max_iter=max_iter)


# ---------------------------------------------------------------------------------
# Structures
# ---------------------------------------------------------------------------------


class ZeroFisher(FisherOperator):
    """A distribution whose parameters carry no information (``Delta``)."""

    def _mv(self, v):
        return {k: torch.zeros_like(x) for k, x in v.items()}

    def _solve(self, v, damping):
        if damping == 0:
            raise SingularFisherError(
                f"the Fisher information of {self.names} is zero (a point mass carries no "
                f"information about its location); pass damping > 0")
        return {k: x / damping for k, x in v.items()}


def _scaled(x, s):
    """``s x s``, the scale applied first to the inner factor: ``1/rate^2`` of a rate of
    1e23 underflows float32, ``(j/rate) 1 (j/rate)`` with ``j = rate`` does not."""
    if s is None:
        return x
    # s = 0 is a coordinate that does not move its parameter (j = 0 at a boundary of the
    # support: a Poisson rate or a Bernoulli probability of 0); x may be inf there.
    return torch.where(s == 0, torch.zeros_like(x), s * x * s)


def _rescale(scale, names, jac):
    """The scales after the change of coordinates ``J = diag(jac)``: ``jac * scale``, 0
    where ``jac`` is 0 (a parameter on the boundary, whose scale may be inf there)."""
    return {n: jac[n] if scale is None else
            torch.where(jac[n] == 0, torch.zeros_like(jac[n]), jac[n] * scale[n])
            for n in names}


class DiagonalFisher(FisherOperator):
    """``F = diag(s a s)``, one entry per coordinate; all products are elementwise.

    :param diag: per-parameter tensors ``a`` with the parameters' shapes.
    :param scale: optional per-parameter tensors ``s`` (default 1), e.g. ``1/rate``: a
        change of coordinates ``J = diag(j)`` (:meth:`congruent`) multiplies ``j s`` before
        ``a``, so ``F_u = diag((j s) a (j s))`` stays representable where ``F`` is not.
    """

    def __init__(self, specs, batch_shape, diag: Tensors, scale: Optional[Tensors] = None):
        super().__init__(specs, batch_shape)
        self.inner, self.scale = diag, scale
        self.diag = {k: _scaled(a, None if scale is None else scale[k]) for k, a in diag.items()}

    def congruent(self, jac: Tensors) -> "DiagonalFisher":
        """``J F J`` for ``J = diag(jac)``, over the same specs."""
        inner = {n: self.inner[n] for n in self.names}
        return DiagonalFisher(self.specs, self.batch_shape, inner,
                              _rescale(self.scale, self.names, jac))

    def _mv(self, v):
        # 0 where x is 0: an infinite entry (a probability or rate on the boundary) times
        # no change is no change, not NaN in every product of a batch or solve.
        return {k: torch.where(x == 0, torch.zeros_like(x), self.diag[k] * x)
                for k, x in v.items()}

    def _solve(self, v, damping):
        if damping == 0:
            for k, x in v.items():
                _refuse_zero_information(x, self.diag[k] == 0, self.names)
            # A zero entry (with v zero there, else refused) solves to 0, not 0/0.
            return {k: torch.where(self.diag[k] == 0, torch.zeros_like(x), x / self.diag[k])
                    for k, x in v.items()}
        return {k: x / (self.diag[k] + damping) for k, x in v.items()}

    def dense(self):
        return torch.diag_embed(self.flatten(self.diag))

    def restrict(self, names):
        return self._with_specs(names)


class ElementBlockFisher(FisherOperator):
    """``p`` elementwise parameters of one shape, coupled only at the same
    element: a ``p x p`` matrix per element, ``M`` of shape ``shape + (p, p)``.
    Used for two- and three-parameter families (Gamma, Beta, StudentT).

    :param scale: optional per-parameter tensors ``s``: ``F = diag(s) M diag(s)``, as for
        :class:`DiagonalFisher`. The scales stay outside ``M`` in every product:
        ``F v = s (M (s v))``, and solves ``D^{-1} A^{-1} D^{-1} v`` with
        ``D = diag(sqrt(F_ii + lambda))``, ``A = D^{-1} (F + lambda I) D^{-1}`` (unit
        diagonal), so an entry of ``F`` that overflows (``a/b^2`` of a float32 Gamma at a
        rate of 1e-30) gives no ``inf * 0`` NaN, and a finite solve stays finite.
    """

    def __init__(self, specs, batch_shape, matrix: torch.Tensor,
                 scale: Optional[Tensors] = None):
        super().__init__(specs, batch_shape)
        self.inner, self.scale = matrix, scale

    def restrict(self, names):
        idx = [i for i, n in enumerate(self.names) if n in names]
        new = self._with_specs(names)
        new.inner = self.inner[..., idx, :][..., :, idx]
        return new

    def congruent(self, jac: Tensors) -> "ElementBlockFisher":
        """``J F J`` for ``J = diag(jac)``, over the same specs."""
        return ElementBlockFisher(self.specs, self.batch_shape, self.inner,
                                  _rescale(self.scale, self.names, jac))

    def _stack(self, v):
        return torch.stack([v[n] for n in self.names], dim=-1)

    def _unstack(self, x):
        return {n: x[..., i] for i, n in enumerate(self.names)}

    def _scales(self):
        """``s``, shape ``shape + (p,)`` (ones without scales)."""
        diag = self.inner.diagonal(dim1=-2, dim2=-1)
        if self.scale is None:
            return torch.ones_like(diag)
        s = torch.stack(torch.broadcast_tensors(*[self.scale[n] for n in self.names]), -1)
        return torch.broadcast_tensors(s, diag)[0]

    def _mv(self, v):
        x, s = self._stack(v), self._scales()
        # 0 where v or s is 0: no change along an overflowed scale, or a coordinate that
        # does not move its parameter (s = 0), is no change, not inf * 0.
        y = torch.where((x == 0) | (s == 0), torch.zeros_like(x), s * x)
        z = (self.inner @ y.unsqueeze(-1)).squeeze(-1)
        return self._unstack(torch.where((z == 0) | (s == 0), torch.zeros_like(z), s * z))

    def dense(self):
        # Symmetric to the last bit: the products give s_i (M_ij s_j), rounded apart from
        # s_j (M_ji s_i).
        F = super().dense()
        return F.tril() + F.tril(-1).mT

    def _solve(self, v, damping):
        M, s = self.inner, self._scales()
        root = math.sqrt(damping)
        # d = sqrt(s^2 M_ii + lambda), by hypot: s^2 M_ii itself may overflow.
        d = torch.hypot(s * M.diagonal(dim1=-2, dim2=-1).sqrt(), torch.full_like(s, root))
        none = d == 0  # undamped, and no information along the coordinate
        x = self._stack(v)
        if bool(none.any()):
            _refuse_zero_information(x, none, self.names)
        d = torch.where(none, torch.ones_like(d), d)
        r = torch.where(s == 0, torch.zeros_like(s), s / d)  # A = R M R + lambda D^-2
        A = r.unsqueeze(-1) * M * r.unsqueeze(-2) + torch.diag_embed(
            (root / d).square() + none.to(d.dtype))  # 1 on a null coordinate: x = 0 there
        chol, info = torch.linalg.cholesky_ex(A)
        if bool((info != 0).any()):
            raise SingularFisherError(f"the Fisher matrix of {self.names} is not positive "
                                      f"definite here; pass damping > 0")
        y = (x / d).unsqueeze(-1)
        chol = chol.expand(y.shape[:-2] + chol.shape[-2:])
        out = torch.cholesky_solve(y, chol).squeeze(-1) / d
        return self._unstack(torch.where(none, torch.zeros_like(out), out))


def _refuse_zero_information(x, zero, what):
    """A :class:`SingularFisherError` where ``x`` is nonzero along a direction in which
    the Fisher information is 0 (``zero``, broadcast against ``x``): ``F y = x`` has no
    solution there."""
    bad = (x != 0) & zero.expand(x.shape)
    if bool(bad.any()):
        raise SingularFisherError(
            f"the Fisher information of {what} is 0 along {int(bad.sum())} entries of the "
            f"vector, which are not 0 (draws carry no information along them: for example a "
            f"Binomial or Multinomial with total_count 0, or a probability or Poisson rate "
            f"of 0 in unconstrained coordinates), so F x = v has no solution; pass "
            f"damping > 0")


class DiagPlusRankOneFisher(FisherOperator):
    """``F = diag(a) + c u u^T`` along the last dim of one vector parameter
    (Dirichlet; Categorical and Multinomial, where it is singular).

    :param a, u: shape of the parameter; ``c``: its shape without the last dim.
    :param singular: ``F`` is singular, with null vector ``a^{-1} u``. The undamped solve
        returns ``a^{-1} g`` less its component along the null vector: the minimum-norm
        solution for ``g`` in the range of ``F``; for other ``g`` it solves
        ``F x = g - (u^T a^{-1} g / u^T a^{-1} u) u`` (the range is orthogonal to the null
        vector), not the least-squares ``pinv(F) g``.
    :param scale: optional ``s``, shaped like the parameter: ``F = S (diag(a) + c u u^T) S``,
        ``S = diag(s)``, as for :class:`DiagonalFisher` (Dirichlet: ``s = 1/alpha``).
    """

    def __init__(self, specs, batch_shape, a, u, c, singular=False, scale=None):
        super().__init__(specs, batch_shape)
        (self.name,) = self.names
        self.inner, self.scale = (a, u), scale
        if scale is not None:
            a, u = _scaled(a, scale), scale * u
        self.a, self.u, self.c, self.singular = a, u, c, singular

    def congruent(self, jac: Tensors) -> "DiagPlusRankOneFisher":
        """``J F J`` for ``J = diag(jac)``, over the same spec."""
        a, u = self.inner
        scale = jac[self.name] if self.scale is None else jac[self.name] * self.scale
        return DiagPlusRankOneFisher(self.specs, self.batch_shape, a, u, self.c,
                                     self.singular, scale)

    def _mv(self, v):
        x = v[self.name]
        uv = (self.u * x).sum(-1, keepdim=True)
        return {self.name: self.a * x + self.c.unsqueeze(-1) * self.u * uv}

    def _solve(self, v, damping):
        g = v[self.name]
        a = self.a + damping
        ainv_g, ainv_u = g / a, self.u / a
        if self.singular and damping == 0:
            # In the range of F, x = a^{-1} g solves F x = g; project out the null space.
            null = ainv_u
            coef = (null * ainv_g).sum(-1, keepdim=True) / (null * null).sum(-1, keepdim=True)
            return {self.name: ainv_g - coef * null}
        c = self.c.unsqueeze(-1)
        denom = 1 + c * (self.u * ainv_u).sum(-1, keepdim=True)
        return {self.name: ainv_g - c * ainv_u * (self.u * ainv_g).sum(-1, keepdim=True) / denom}


class LogitsFisher(DiagPlusRankOneFisher):
    """``F = n (diag(p) - p p^T)``: a categorical's or multinomial's Fisher in
    ``logits`` (``n`` the total count), singular along ``1``.

    Products are taken relative to the most probable category ``m``:
    ``F x = n p (x - x_m - sum_j p_j (x_j - x_m))``, which is ``n p (x - p^T x)`` for
    ``sum p = 1`` but keeps ``F 1 = 0`` exactly and its relative accuracy when ``p_m``
    is near 1 (the plain form cancels down to ``eps / (1 - p_m)``: 2e-12 for logits
    ``(10, -10, 0)``). The damped solve uses the Sherman-Morrison denominator in the
    same form, ``sum_i p_i lambda / (n p_i + lambda)``, a sum of positive terms.

    :param probs: shape ``batch_shape + (k,)``; ``n``: ``batch_shape``.
    :param family: the distribution's name, for error messages.
    """

    def __init__(self, specs, batch_shape, probs, n, family="Categorical"):
        super().__init__(specs, batch_shape, n.unsqueeze(-1) * probs, probs, -n,
                         singular=True)
        self.family = family
        self.top = probs.argmax(-1, keepdim=True)

    def _centred(self, x):
        return x - x.gather(-1, self.top.expand(x.shape[:-1] + (1,)))

    def _mv(self, v):
        x = self._centred(v[self.name])
        p = self.u
        return {self.name: self.a * (x - (p * x).sum(-1, keepdim=True))}

    def _solve(self, v, damping):
        if damping == 0:
            return _over_trials(self._min_norm, v[self.name], -self.c.unsqueeze(-1),
                                self.family, self.name)
        g, p = v[self.name], self.u
        a = self.a + damping  # n p + lambda
        ainv_g, ainv_p = g / a, p / a
        denom = (damping * ainv_p).sum(-1, keepdim=True)  # 1 - n p^T a^{-1} p
        n = -self.c.unsqueeze(-1)
        return {self.name: ainv_g + n * ainv_p * (p * ainv_g).sum(-1, keepdim=True) / denom}


    def _min_norm(self, g):
        """``x = g / (n p) - mean(g / (n p))`` over the support ``p > 0``, 0 off it: the
        minimum-norm solution for ``g`` in the range of ``F``. A category of probability 0
        (at ``logit = -inf``, or underflowed) is one more null direction ``e_j``: ``F``'s
        row and column ``j`` are 0, and the gradient of any function of the distribution
        is 0 there too."""
        on = self.u > 0
        _refuse_off_support(g, on, self.family, self.name,
                            "its Fisher is 0 along those entries (they leave the distribution "
                            "unchanged to first order), so F x = g has no solution; such a g "
                            "is not the gradient of a function of the distribution. Pass "
                            "damping > 0")
        x = torch.where(on, g / self.a, torch.zeros_like(g))
        weight = on.to(g.dtype)
        mean = (x * weight).sum(-1, keepdim=True) / weight.sum(-1, keepdim=True)
        return {self.name: (x - mean) * weight}


def _over_trials(solve, g, n, family, name):
    """``solve(g)`` (undamped, ``F = n F_1``) where the total count ``n`` (shaped
    ``batch_shape + (1,)``) is positive, 0 where it is 0 and ``g`` is too: no trials carry
    no information, ``F = 0``. A nonzero ``g`` there raises a :class:`SingularFisherError`."""
    none = n == 0
    if not bool(none.any()):
        return solve(g)
    _refuse_zero_information(g, none, f"{family} {name!r}")
    (x,) = solve(g).values()  # 0/0 where n = 0, replaced below
    return {name: torch.where(none, torch.zeros_like(x), x)}


def _refuse_off_support(x, on, family, name, why):
    """A ValueError where ``x`` is nonzero at a zero probability (``on`` False)."""
    bad = (x != 0) & ~on.expand(x.shape)
    if bool(bad.any()):
        raise ValueError(
            f"{family}: the vector over {name!r} is nonzero at {int(bad.sum())} entries "
            f"whose probability is 0 (zero probabilities): {why}. To keep every direction, "
            f"build the distribution from logits or keep its probabilities positive.")


def _zero_probs_error(family, name, what):
    return ValueError(
        f"{family}: {name!r} has zero probabilities, where {what}. The natural gradient "
        f"(fisher_solve, natural_gradient) is finite and available; otherwise build the "
        f"distribution from logits (finite log-probabilities) or keep the probabilities "
        f"positive.")


class ProbsFisher(DiagPlusRankOneFisher):
    """``F = n (diag(1/p) - 1 1^T)``: a categorical's or multinomial's Fisher in ``probs``
    (``n`` the total count), singular along ``p``.

    Solves use ``F^{-1}``'s factor ``p`` rather than ``1/p``: undamped, the minimum-norm
    ``x = p g / n - (p^T (p g) / p^T p) p / n``; damped, Sherman-Morrison with
    ``(n/p + lambda)^{-1} = p / (n + lambda p)`` and the denominator
    ``sum_i p_i lambda p_i / (n + lambda p_i)``. Both are finite, and the limits of the
    positive-``p`` answers, at a zero probability, where ``F`` (``1/p``) is infinite: there
    ``dense()`` raises a ValueError, and ``F v`` is finite (``0 * inf = 0``, the limit)
    only for ``v`` zero at those entries.

    :param probs: shape ``batch_shape + (k,)``; ``n``: ``batch_shape``.
    :param family: the distribution's name, for error messages.
    """

    def __init__(self, specs, batch_shape, probs, n, family="Categorical"):
        super().__init__(specs, batch_shape, n.unsqueeze(-1) / probs, torch.ones_like(probs),
                         -n, singular=True)
        self.probs, self.n, self.family = probs, n.unsqueeze(-1), family

    def _mv(self, v):
        x, p = v[self.name], self.probs
        on = p > 0
        _refuse_off_support(x, on, self.family, self.name,
                            "F = diag(1/p) - 1 1^T is infinite there, and so is F v")
        ratio = torch.where(on, x / p, torch.zeros_like(x))
        return {self.name: self.n * (ratio - x.sum(-1, keepdim=True))}

    def dense(self):
        if bool((self.probs == 0).any()):
            raise _zero_probs_error(self.family, self.name,
                                    "the Fisher information diag(1/p) - 1 1^T is infinite")
        return super().dense()

    def _solve(self, v, damping):
        g, p, n = v[self.name], self.probs, self.n
        if damping == 0:
            def min_norm(g):
                x = p * g
                coef = (p * x).sum(-1, keepdim=True) / (p * p).sum(-1, keepdim=True)
                return {self.name: (x - coef * p) / n}
            return _over_trials(min_norm, g, n, self.family, self.name)
        ainv = p / (n + damping * p)
        denom = (damping * p * ainv).sum(-1, keepdim=True)  # 1 - n 1^T a^{-1} 1, sum p = 1
        return {self.name: ainv * g + n * ainv * (ainv * g).sum(-1, keepdim=True) / denom}


class CategoricalMeanFisher(FisherOperator):
    """A categorical's or multinomial's Fisher in mean coordinates ``m = n q``, ``q`` the
    first ``k - 1`` probabilities: the inverse of ``Cov(T) = n (diag(q) - q q^T)``,
    ``F = (diag(1/q) + 1 1^T / p_k) / n``.

    Solves multiply by ``Cov(T)`` (damped: Sherman-Morrison over ``diag(1/(n q)) +
    lambda``, with ``n p_k`` for ``1/c``), finite at zero probabilities, where ``F`` is
    infinite (``dense()`` raises a ValueError; ``F v`` is finite only for ``v`` zero at
    those entries, and summing to 0 if ``p_k = 0``).

    With no trials (``n = 0``) ``m`` is 0 whatever ``q``: the draws say nothing, and ``F``
    is 0 there, as in the other coordinates (not the ``1/n`` of the formula).

    :param probs: all ``k`` probabilities, ``batch_shape + (k,)``; ``n``: ``batch_shape``.
    """

    def __init__(self, specs, batch_shape, probs, n, family="Categorical"):
        super().__init__(specs, batch_shape)
        (self.name,) = self.names
        self.q, self.last = probs[..., :-1], probs[..., -1:]
        self.n, self.family = n.unsqueeze(-1), family
        self.none = self.n == 0  # batch_shape + (1,)

    def _mv(self, v):
        x, q, none = v[self.name], self.q, self.none
        on = (q > 0) | none  # no trials: F = 0, finite at a zero probability too
        _refuse_off_support(x, on, self.family, self.name, "F = (diag(1/q) + 1 1^T / p_k) / n is "
                            "infinite there, and so is F v")
        total = x.sum(-1, keepdim=True)
        last = (self.last > 0) | none
        if bool(((total != 0) & ~last.expand(total.shape)).any()):
            raise _zero_probs_error(self.family, self.name, "the last probability p_k is 0, "
                                    "so F v is infinite for v not summing to 0")
        ratio = torch.where(q > 0, x / q, torch.zeros_like(x))
        tail = torch.where(self.last > 0, total / self.last, torch.zeros_like(total))
        out = (ratio + tail) / torch.where(none, torch.ones_like(self.n), self.n)
        return {self.name: torch.where(none, torch.zeros_like(out), out)}

    def dense(self):
        trials = ~self.none
        if bool(((self.q == 0) & trials).any()) or bool(((self.last == 0) & trials).any()):
            raise _zero_probs_error(self.family, "probs", "the Fisher information in mean "
                                    "coordinates, (diag(1/q) + 1 1^T / p_k) / n, is infinite")
        return super().dense()

    def _solve(self, v, damping):
        g, q, n = v[self.name], self.q, self.n
        if damping == 0:
            def cov(g):
                return {self.name: n * q * (g - (q * g).sum(-1, keepdim=True))}
            return _over_trials(cov, g, n, self.family, self.name)
        ainv = n * q / (1 + damping * n * q)
        coef = (ainv * g).sum(-1, keepdim=True) / (n * self.last + ainv.sum(-1, keepdim=True))
        # No trials: F = 0, so g / lambda, not the 0/0 of coef.
        return {self.name: torch.where(self.none, g / damping, ainv * (g - coef))}


class GaussianFisher(FisherOperator):
    """Multivariate normal with ``loc`` and one matrix parameter.

    With ``Sigma = L L^T``, ``F_loc = Sigma^{-1}`` and no loc-matrix coupling. For the
    matrix block (all products O(d^3), never a d^2 x d^2 matrix):

    * ``scale_tril``: with ``M = L^{-1} V``, ``v^T F v = |M|^2 + |diag M|^2``, so
      ``F V = tril(L^{-T}(M + Diag M))`` and ``F^{-1} G = L Phi(tril(L^T G))``,
      ``Phi`` halving the diagonal;
    * ``covariance_matrix`` (and ``precision_matrix`` with ``Sigma`` and ``Lambda``
      swapped): ``v^T F v = 1/2 tr(Sigma^{-1} S Sigma^{-1} S)`` with ``S = sym(V)``, so
      ``F V = trilhalf(Sigma^{-1} S Sigma^{-1})`` and ``F^{-1} G = tril(Sigma (G + G^T) Sigma)``.

    Damped solves run conjugate gradients preconditioned by the exact inverse.
    """

    def __init__(self, specs, batch_shape, scale_tril, matrix_param):
        super().__init__(specs, batch_shape)
        self.L = scale_tril
        self.matrix_param = matrix_param  # "scale_tril", "covariance_matrix" or "precision_matrix"

    def restrict(self, names):
        return self._with_specs(names)  # loc and matrix blocks do not couple

    def _tri(self, A, B, left=True, upper=False):
        return torch.linalg.solve_triangular(
            A.expand(B.shape[:-2] + A.shape[-2:]), B, upper=upper, left=left)

    def _prec_mv(self, x):  # Sigma^{-1} x for vectors
        y = self._tri(self.L, x.unsqueeze(-1))
        return self._tri(self.L.mT, y, upper=True).squeeze(-1)

    def _cov_mv(self, x):  # Sigma x for vectors
        return (self.L @ (self.L.mT @ x.unsqueeze(-1))).squeeze(-1)

    def _sandwich_inv(self, S):  # Sigma^{-1} S Sigma^{-1}
        A = self._tri(self.L.mT, self._tri(self.L, S), upper=True)  # Sigma^{-1} S
        return self._tri(self.L.mT, self._tri(self.L, A.mT), upper=True).mT

    def _sandwich(self, S):  # Sigma S Sigma
        Sig = self.L @ self.L.mT
        return Sig @ S @ Sig

    def _mv(self, v):
        out = {}
        if "loc" in v:
            out["loc"] = self._prec_mv(v["loc"])
        name = self.matrix_param
        if name in v:
            V = v[name].tril()
            if name == "scale_tril":
                M = self._tri(self.L, V)
                N = M + torch.diag_embed(M.diagonal(dim1=-2, dim2=-1))
                out[name] = self._tri(self.L.mT, N, upper=True).tril()
            elif name == "covariance_matrix":
                out[name] = tril_half_diag(self._sandwich_inv(symmetrize(V)))
            else:
                out[name] = tril_half_diag(self._sandwich(symmetrize(V)))
        return out

    def _solve(self, v, damping):
        if damping:
            return None
        out = {}
        if "loc" in v:
            out["loc"] = self._cov_mv(v["loc"])
        name = self.matrix_param
        if name in v:
            G = v[name].tril()
            if name == "scale_tril":
                N = (self.L.mT @ G).tril()
                N = N - 0.5 * torch.diag_embed(N.diagonal(dim1=-2, dim2=-1))
                out[name] = self.L @ N
            elif name == "covariance_matrix":
                out[name] = self._sandwich(G + G.mT).tril()
            else:
                out[name] = self._sandwich_inv(G + G.mT).tril()
        return out


class LowRankGaussianFisher(FisherOperator):
    """``LowRankMultivariateNormal(loc, W, D)``, ``Sigma = W W^T + diag(D)``.

    ``F_loc = Sigma^{-1}``; for ``(W, D)``, with ``A = Sigma^{-1} dSigma Sigma^{-1}`` and
    ``dSigma = dW W^T + W dW^T + diag(dD)``: ``F [dW, dD] = [A W, diag(A)/2]``.
    Products cost O(d^2 r) through the Woodbury identity; solves have no closed
    form and use dense Cholesky (small) or conjugate gradients (large).

    For rank ``r >= 2``, ``W -> W R`` (``R`` orthogonal) leaves ``Sigma`` unchanged, so
    ``F`` over ``cov_factor`` is singular (``r(r-1)/2`` null directions): undamped solves
    over it raise :class:`SingularFisherError`.
    """

    def __init__(self, specs, batch_shape, cov_factor, cov_diag, precision):
        super().__init__(specs, batch_shape)
        self.W, self.D, self.P = cov_factor, cov_diag, precision

    def restrict(self, names):
        return self._with_specs(names)  # products already act on any subset

    def _solve(self, v, damping):
        rank = self.W.shape[-1]
        if damping == 0 and rank >= 2 and "cov_factor" in self.names:
            raise SingularFisherError(
                f"the Fisher information over cov_factor of a rank-{rank} "
                f"LowRankMultivariateNormal is singular (cov_factor @ R, R orthogonal, is "
                f"the same distribution); pass damping > 0, or hold cov_factor fixed with "
                f"params=('loc', 'cov_diag')")
        return None

    def _mv(self, v):
        out = {}
        if "loc" in v:
            out["loc"] = (self.P @ v["loc"].unsqueeze(-1)).squeeze(-1)
        if "cov_factor" in v or "cov_diag" in v:
            dS = 0
            if "cov_factor" in v:
                dWWt = v["cov_factor"] @ self.W.mT
                dS = dWWt + dWWt.mT
            if "cov_diag" in v:
                dS = dS + torch.diag_embed(v["cov_diag"])
            A = self.P @ dS @ self.P
            if "cov_factor" in v:
                out["cov_factor"] = A @ self.W
            if "cov_diag" in v:
                out["cov_diag"] = 0.5 * A.diagonal(dim1=-2, dim2=-1)
        return out


class ReparamFisher(FisherOperator):
    """The Fisher in coordinates ``u`` with parameters ``theta = phi(u)``:
    ``F_u = J^T F_theta J``, ``J = d phi / d u``, never forming ``J``.

    With ``elementwise=True`` (each coordinate maps to its own parameter entry, as
    for ``exp``, ``softplus`` or ``LowerCholeskyTransform``), ``J = diag(j)`` and
    the solve is ``j^{-1} F_theta^{-1} j^{-1}``; otherwise products go through
    forward- and reverse-mode autograd and solves are dense or CG.
    """

    def __init__(self, specs, batch_shape, base: FisherOperator, phi, elementwise: bool):
        super().__init__(specs, batch_shape)
        self.base, self.phi, self.elementwise = base, phi, elementwise
        self.singular = base.singular  # an elementwise solve goes through the base's
        # Contiguous copies: jvp cannot differentiate through an expanded (stride-0) view.
        self._u = {s.name: s.value.detach().clone() for s in specs}
        self._inner = None
        if elementwise:
            ones = {k: torch.ones_like(x) for k, x in self._u.items()}
            _, jac = torch.func.jvp(self.phi, (self._u,), (ones,))
            self.jac = self._own_dtypes(_zero_at_the_ends(self.phi, self._u, base.values(),
                                                          jac))
            # J F J in the base's own structure, J applied to its scales before its
            # entries: F of a float32 rate of 1e23 (1e-46) underflows, F_u (1) does not.
            if type(base) in _CONGRUENT and [s.size for s in specs] == \
                    [s.size for s in base.specs]:
                self._inner = base.congruent(self.jac)

    def reinterpret(self, n):
        new = super().reinterpret(n)
        new.base = self.base.reinterpret(n)
        if self._inner is not None:
            new._inner = self._inner.reinterpret(n)
        return new

    def dense(self):
        if self._inner is not None:
            return self._inner.dense()
        return super().dense()

    def _jvp(self, v):
        if self.elementwise:
            return {k: self.jac[k] * x for k, x in v.items()}
        return self._own_dtypes(
            self._batched(lambda t: torch.func.jvp(self.phi, (self._u,), (t,))[1], v))

    def _vjp(self, w):
        if self.elementwise:
            return {k: self.jac[k] * x for k, x in w.items()}
        _, pullback = torch.func.vjp(self.phi, self._u)
        return self._own_dtypes(self._batched(lambda t: pullback(t)[0], w))

    def _own_dtypes(self, tangents):
        # Transforms with Python-float constants (transform_to(positive) adds 0.0) give
        # float64 tangents under forward-mode autograd even for float32 coordinates.
        theta = self.base.values()
        return {k: x.to((self._u[k] if k in self._u else theta[k]).dtype)
                for k, x in tangents.items()}

    def _batched(self, fn, v):
        """Apply a map defined on tensors of the coordinates' own shapes to
        tensors that may carry extra leading dims (vmapped over them)."""
        ref = next(iter(v))
        base_shape = self._u[ref].shape if ref in self._u else self.base.values()[ref].shape
        extra = v[ref].dim() - len(base_shape)
        if extra == 0:
            return fn(v)
        lead = v[ref].shape[:extra]
        flat = {k: x.reshape((lead.numel(),) + x.shape[extra:]) for k, x in v.items()}
        out = torch.func.vmap(fn)(flat)
        return {k: x.reshape(lead + x.shape[1:]) for k, x in out.items()}

    def _mv(self, v):
        if self._inner is not None:
            return self._inner.mv_dict(v)
        return self._vjp(self.base.mv_dict(self._jvp(v)))

    def _solve(self, v, damping):
        if self._inner is not None:
            return self._inner._solve(v, damping)
        if not self.elementwise or damping:
            return None
        scaled = {k: x / self.jac[k] for k, x in v.items()}
        inner = self.base._solve(scaled, 0.0)
        if inner is None:
            inner = self.base.solve_dict(scaled)
        return {k: x / self.jac[k] for k, x in inner.items()}


def _zero_at_the_ends(phi, u, theta, jac):
    """``jac``, 0 where ``theta`` is on the boundary of its support (a rate or a
    probability of 0, a probability of 1): the limit of ``phi`` at an infinite coordinate,
    where ``phi' = 0``. Torch's inverse transforms clamp such a ``theta`` to a finite
    ``u`` (``phi(u) != theta``), whose ``phi'`` is not 0, and ``F_u = j^2 F_theta`` was
    then inf (``F_theta`` is inf there) where it is 0; ``log 0`` gave ``-inf * 0``.

    On the boundary means at or beyond ``phi(-inf)`` or ``phi(inf)`` (the ends of the
    range of an entrywise monotone ``phi``; torch's sigmoid clamps them to ``tiny`` and
    ``1 - eps``) and not reproduced by ``phi(u)``. This takes ``F_u -> 0`` there, true of a
    rate; the binary families' probabilities, whose limits differ per family and end (a
    Geometric's ``F_u = 1 - p -> 1`` as ``p -> 0``), get the Fisher of their logits
    instead (``coords._sigmoid_of_probs``)."""
    try:
        with torch.no_grad():
            lo, hi = (phi({k: torch.full_like(x, end) for k, x in u.items()})
                      for end in (-math.inf, math.inf))
            back = phi(u)
    except Exception:  # noqa: BLE001 - a user's transform undefined at infinity: no ends
        return jac
    out = {}
    for k, j in jac.items():
        t = theta.get(k)
        if t is None or not (t.shape == j.shape == lo[k].shape == back[k].shape):
            out[k] = j
            continue
        below, above = torch.minimum(lo[k], hi[k]), torch.maximum(lo[k], hi[k])
        end = (below < above) & ((t <= below) | (t >= above))
        off = end & ((back[k] != t) | ~torch.isfinite(u[k]))
        out[k] = torch.where(off, torch.zeros_like(j), j)
    return out


#: Structures whose ``congruent(jac)`` gives ``J F J`` for a diagonal ``J``.
_CONGRUENT = (DiagonalFisher, ElementBlockFisher, DiagPlusRankOneFisher)


class DenseFisher(FisherOperator):
    """A Fisher matrix held densely, ``batch_shape + (k, k)``: the fallback's result."""

    def __init__(self, specs, batch_shape, matrix: torch.Tensor):
        super().__init__(specs, batch_shape)
        self.matrix = matrix

    def mv(self, v):
        self.check_vector(v)
        return (self.matrix @ v.unsqueeze(-1)).squeeze(-1)

    def _mv(self, v):
        return self.unflatten(self.mv(self.flatten(v)))

    def dense(self):
        return self.matrix

    def reinterpret(self, n):
        """Block diagonal over the ``m`` elements of the last ``n`` batch dims, in the
        param-major order of the reinterpreted specs: entry ``j`` of parameter ``i`` at
        element ``e`` moves from ``o_i + j`` to ``m o_i + e s_i + j`` (``o_i``, ``s_i`` the
        block's offset and size per element), ``batch + (k, k) -> batch' + (m k, m k)``."""
        if n == 0:
            return self
        new = super().reinterpret(n)
        batch = new.batch_shape
        m = int(self.batch_shape[len(batch):].numel())
        index, offset = [], 0
        for s in self.specs:
            e = torch.arange(m, device=self.device).unsqueeze(-1)
            j = torch.arange(s.size, device=self.device)
            index.append(m * offset + e * s.size + j)  # (m, s_i)
            offset += s.size
        index = torch.cat(index, -1)  # (m, k): new coordinate of (element, old coordinate)
        k = self.dim
        blocks = self.matrix.reshape(batch + (m, k, k))
        out = self.matrix.new_zeros(batch + (m * k, m * k))
        out[..., index.unsqueeze(-1).expand(m, k, k), index.unsqueeze(-2).expand(m, k, k)] = blocks
        new.matrix = out
        return new


class RestrictedFisher(FisherOperator):
    """The sub-block of ``base`` over some of its parameters, the others held fixed."""

    def __init__(self, base: FisherOperator, names):
        super().__init__([s for s in base.specs if s.name in names], base.batch_shape)
        self.base = base

    def reinterpret(self, n):
        new = super().reinterpret(n)
        new.base = self.base.reinterpret(n)
        return new

    def _mv(self, v):
        ref = next(s for s in self.specs if s.name in v)
        lead = v[ref.name].shape[: v[ref.name].dim() - ref.value.dim()]
        full = {s.name: v[s.name] if s.name in v else s.value.new_zeros(lead + s.value.shape)
                for s in self.base.specs}
        out = self.base.mv_dict(full)
        return {k: out[k] for k in self.names}
