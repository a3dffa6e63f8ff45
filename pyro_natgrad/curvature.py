"""Model curvature for natural-gradient steps on Gaussian guides.

By Price's theorem ``d/dSigma E_q[f] = E_q[grad^2 f] / 2``, so the precision that a
Gaussian natural-gradient step moves towards is ``-E_q[grad^2 f(z)]``, with
``f(z) = log p(x, T(z)) + log|det dT/dz|`` the model's log joint on the
unconstrained latent ``z``. A single-draw estimate ``-grad^2 f(z)`` is full-rank
and, for a linear-Gaussian model, exact; the gradient-only estimate from the
same draw has rank two at most, which is why this is the default for small latents.

:class:`ModelCurvature` captures the model's arguments as the guide is called
(a forward pre-hook) and computes the Hessian by ``D`` Hessian-vector products
(``D`` backward passes through the model: cost ``O(D)`` gradients per draw).
"""

import functools
from typing import Callable, List, Tuple

import torch
from pyro import poutine
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoContinuous, AutoNormal
from torch.distributions import biject_to


def _without_init(model):
    """The model inside an autoguide's ``InitMessenger`` wrapper: the wrapper would
    draw an initial value for every latent before it is conditioned (wasted work,
    and a random draw that ``vmap`` refuses)."""
    from pyro.infer.autoguide.initialization import InitMessenger

    while isinstance(model, functools.partial) and len(model.args) == 2 \
            and isinstance(model.args[0], InitMessenger):
        model = model.args[1]
    return model


class ModelCurvature:
    """Hessians of the model log joint on an autoguide's unconstrained latent.

    :param guide: an ``AutoContinuous`` guide or an ``AutoNormal``; its ``.model`` is
        the model. For subsampled sites, :meth:`unpack`, :meth:`hessian` and
        :meth:`log_joint` take the subsample's ``shapes``.
    """

    def __init__(self, guide):
        if not isinstance(guide, (AutoContinuous, AutoNormal)):
            raise TypeError(f"model curvature needs an AutoContinuous or AutoNormal guide, got "
                            f"{type(guide).__name__}")
        self.guide = guide
        self.args: Tuple = ()
        self.kwargs = {}
        self.seen = False
        self._handle = guide.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module, args, kwargs):
        self.args, self.kwargs, self.seen = args, kwargs, True

    def remove(self):
        self._handle.remove()

    def _require_arguments(self):
        if not self.seen:
            raise RuntimeError("the guide has not been called yet, so the model's arguments "
                               "are unknown; run svi.step(...) first")

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(args=(), kwargs={}, _handle=None)
        return state

    # ---- the unconstrained latent --------------------------------------------------
    def _sites(self) -> List[Tuple[str, dict, torch.Size]]:
        out = []
        for name, site in self.guide.prototype_trace.iter_stochastic_nodes():
            if isinstance(self.guide, AutoNormal):
                shape = getattr(self.guide.locs, name).shape
            else:
                shape = self.guide._unconstrained_shapes[name]
            out.append((name, site, torch.Size(shape)))
        return out

    def unpack(self, z: torch.Tensor, shapes=None):
        """``{site: unconstrained value}`` from a packed latent ``(D,)``; ``shapes``
        (``{site: shape}``) overrides the guide's, e.g. for a subsample's values."""
        values, pos = {}, 0
        for name, site, shape in self._sites():
            if shapes is not None:
                shape = torch.Size(shapes[name])
            n = shape.numel()
            values[name] = z[pos:pos + n].reshape(shape)
            pos += n
        return values

    def pack(self, values) -> torch.Tensor:
        return torch.cat([values[name].reshape(-1) for name, _, _ in self._sites()])

    def log_joint(self, z: torch.Tensor, prior_only: bool = False,
                  shapes=None) -> torch.Tensor:
        """``f(z)``: the model's log joint at the constrained values plus the log
        Jacobian determinant of the constraining transforms (without the observed
        sites if ``prior_only``); ``shapes`` as in :meth:`unpack`."""
        values, ladjs = {}, {}
        for name, u in self.unpack(z, shapes).items():
            site = self.guide.prototype_trace.nodes[name]
            t = biject_to(site["fn"].support)
            x = t(u)
            values[name] = x
            ladj = t.log_abs_det_jacobian(u, x)
            ladjs[name] = sum_rightmost(ladj, ladj.dim() - x.dim() + site["fn"].event_dim).sum()
        with poutine.block():  # invisible to any handler the caller is inside
            model = poutine.condition(self.guide.model, values)
            tr = poutine.trace(model).get_trace(*self.args, **self.kwargs)
        # The Jacobian term is part of the site's log density, so it takes the site's
        # scale (full_size / size in a subsampled plate) like the ELBO does.
        logdet = sum(tr.nodes[name]["scale"] * ladj for name, ladj in ladjs.items())
        if prior_only:
            # condition() marks the latents observed too, so select them by name.
            return tr.log_prob_sum(lambda name, site: name in values) + logdet
        return tr.log_prob_sum() + logdet

    def hessian(self, z: torch.Tensor, prior_only: bool = False, shapes=None) -> torch.Tensor:
        """``grad^2 f(z)``, ``(D, D)``, by ``D`` Hessian-vector products; with
        ``prior_only`` the observed sites are left out; ``shapes`` as in :meth:`unpack`."""
        self._require_arguments()
        with torch.enable_grad():
            z = z.detach().requires_grad_()
            (g,) = torch.autograd.grad(self.log_joint(z, prior_only, shapes), z,
                                       create_graph=True)
            H = None
            if prior_only:
                # The prior's graph is small, so one batched (vmapped) backward pass
                # beats D sequential ones; for the likelihood at large n it is slower.
                try:
                    eye = torch.eye(z.numel(), dtype=z.dtype, device=z.device)
                    (H,) = torch.autograd.grad(g, z, eye, retain_graph=True,
                                               is_grads_batched=True, allow_unused=True)
                except RuntimeError:  # an op without a batching rule
                    H = None
            if H is None:
                rows = [torch.autograd.grad(g[i], z, retain_graph=True, allow_unused=True)[0]
                        for i in range(z.numel())]
                H = torch.stack([r if r is not None else torch.zeros_like(z) for r in rows])
        return 0.5 * (H + H.mT)

    def precision_operator(self, z: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``v -> -grad^2 f(z) v`` for ``v`` of shape ``(D,)``: one Hessian-vector product
        (a backward pass through the gradient's graph, built once here) per call, with
        no ``(D, D)`` matrix."""
        self._require_arguments()
        with torch.enable_grad():
            z = z.detach().requires_grad_()
            (g,) = torch.autograd.grad(self.log_joint(z), z, create_graph=True)

        def product(v: torch.Tensor) -> torch.Tensor:
            (hv,) = torch.autograd.grad(g, z, v, retain_graph=True, allow_unused=True)
            return -hv.detach() if hv is not None else torch.zeros_like(v)

        return product

    def hessian_diagonal(self, z: torch.Tensor, probes, shapes=None) -> torch.Tensor:
        """``diag(grad^2 f(z))``, ``(D,)``, by one Hessian-vector product per probe.

        ``probes``: 0/1 vectors ``(D,)`` with disjoint supports covering every
        coordinate, such that no two coordinates of one probe interact (their Hessian
        entry is 0): e.g. one coordinate of every item of a subsampled plate, whose
        items are conditionally independent. Then ``H v`` is the diagonal on ``v``'s
        support."""
        self._require_arguments()
        diag = torch.zeros_like(z)
        with torch.enable_grad():
            z = z.detach().requires_grad_()
            (g,) = torch.autograd.grad(self.log_joint(z, False, shapes), z, create_graph=True)
            for v in probes:
                (hv,) = torch.autograd.grad(g, z, v, retain_graph=True, allow_unused=True)
                if hv is not None:
                    diag = diag + hv.detach() * v
        return diag

    def ggn_precision(self, z: torch.Tensor) -> torch.Tensor:
        """``G_lik(z) - grad^2 log prior(z)``: the generalized Gauss-Newton matrix of the
        likelihood (:class:`~pyro_natgrad.ggn.ModelGGN`, positive semi-definite) plus the
        exact curvature of the prior and of the constraining transforms."""
        from .ggn import ModelGGN

        values = {}
        for name, u in self.unpack(z.detach()).items():
            values[name] = biject_to(self.guide.prototype_trace.nodes[name]["fn"].support)(u)
        G = ModelGGN(_without_init(self.guide.model), values, self.args, self.kwargs).dense()
        return G - self.hessian(z, prior_only=True)
