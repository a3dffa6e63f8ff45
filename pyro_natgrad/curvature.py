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

import contextlib
import functools
import operator
import random
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from pyro import poutine
from pyro.distributions.util import is_identically_one, sum_rightmost
from pyro.infer.autoguide import AutoContinuous, AutoDelta, AutoGuideList, AutoNormal
from pyro.infer.mcmc.util import TraceEinsumEvaluator
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to


def _plate_scale(node) -> float:
    """``full_size / size`` over a site's subsampled plates: the scale that a guide's
    site in the same plates carries (and no ``poutine.scale`` of the model's)."""
    scale = 1.0
    for frame in node["cond_indep_stack"]:
        if frame.full_size is not None and frame.size not in (None, -1) \
                and frame.full_size != frame.size:
            scale = scale * frame.full_size / frame.size
    return scale


class ModelCurvatureError(ValueError):
    """The model's Hessian at the guide's draw cannot be computed here: its log joint is
    random there (it draws values the guide does not provide), or it needs what this
    module does not do. ``reason`` says which; ``fix`` what to use instead."""

    def __init__(self, reason: str, fix: str = "use curvature='none' (steps from gradients "
                                                "alone)"):
        super().__init__(f"{reason}; {fix}")
        self.reason, self.fix = reason, fix


@contextlib.contextmanager
def _second_derivatives():
    """Autograd's refusal of a second derivative (an op without double backward, such as
    ``torch.cdist``) as a :class:`ModelCurvatureError`, raised before anything changed:
    ``curvature="auto"`` then falls back to gradient-only steps with one warning, where
    the raw error stopped the run."""
    try:
        yield
    except ModelCurvatureError:
        raise
    except (NotImplementedError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelCurvatureError(
            f"the model's second derivatives are not available ({type(e).__name__}: "
            f"{first})") from e


def curvature_model(model):
    """The model inside an autoguide's ``InitMessenger`` wrapper and any
    ``poutine.block`` around it. The init wrapper would draw an initial value for every
    latent before it is conditioned (wasted work, and a random draw that ``vmap``
    refuses); a block (Pyro's recipe for a guide over some of the latents, e.g.
    ``AutoNormal(poutine.block(model, hide=["assignment"]))`` with enumerated discrete
    sites) would hide the sites it leaves out, observations included, from the log
    joint, whose Hessian would then be that of another model."""
    from pyro.infer.autoguide.initialization import InitMessenger
    from pyro.poutine.block_messenger import BlockMessenger

    while isinstance(model, functools.partial) and len(model.args) == 2 \
            and isinstance(model.args[0], (InitMessenger, BlockMessenger)):
        model = model.args[1]
    return model


class _RandomState:
    """The state of every random generator a model may draw from (torch's on the CPU and
    on ``device``, numpy's, Python's): captured, compared, restored."""

    def __init__(self, device: torch.device):
        self.device = device
        self.torch = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.numpy = np.random.get_state()
        self.python = random.getstate()

    def __eq__(self, other) -> bool:
        return (torch.equal(self.torch, other.torch)
                and (self.cuda is None or torch.equal(self.cuda, other.cuda))
                and all(np.array_equal(a, b) for a, b in zip(self.numpy, other.numpy))
                and self.python == other.python)

    def restore(self):
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        np.random.set_state(self.numpy)
        random.setstate(self.python)


def curvature_guide(guide) -> bool:
    """Whether :class:`ModelCurvature` can read ``guide``: an ``AutoContinuous`` or
    ``AutoNormal``, or an ``AutoGuideList`` of these and of ``AutoDelta`` parts, with
    at least one of these (the parts then provide every latent the model's log joint is
    conditioned on; a part it cannot read, such as a hand-written one, would leave its
    latents to be drawn at random)."""
    if isinstance(guide, AutoGuideList):
        return any(isinstance(p, (AutoContinuous, AutoNormal)) for p in guide) and all(
            isinstance(p, (AutoContinuous, AutoNormal)) or type(p) is AutoDelta
            for p in guide)
    return isinstance(guide, (AutoContinuous, AutoNormal))


class ModelCurvature:
    """Hessians of the model log joint on an autoguide's unconstrained latent.

    :param guide: an ``AutoContinuous`` guide or an ``AutoNormal``, or an
        ``AutoGuideList`` of them (the latent packs the parts' latents one after
        another) and of ``AutoDelta`` parts (the model is conditioned on their current
        point values: the Hessian is the one at the ELBO's, ``f(z) = log p(x, T(z),
        theta)`` at the parts' ``theta``); its ``.model`` is the model (see
        :func:`curvature_model`). For
        subsampled sites, :meth:`unpack`, :meth:`hessian` and :meth:`log_joint` take
        the subsample's ``shapes``, and the methods that evaluate the model take
        ``subsample``, ``{plate name: indices}`` (the guide's, which the ELBO's model
        run replays; plates without them draw their own).

    Discrete sites that the model enumerates in parallel (``config_enumerate``, for
    ``TraceEnum_ELBO``) are summed out, as the ELBO sums them. A model that draws other
    values the guide does not provide (a discrete site sampled, not enumerated, or
    ``torch.randn`` inside the model) has a random log joint at a given draw: every
    evaluation checks that (the structure may change with the arguments, e.g. a
    label observed in one batch and enumerated in the next) and raises
    :class:`ModelCurvatureError`, with every random generator as it was.
    """

    def __init__(self, guide):
        if not curvature_guide(guide):
            raise TypeError(f"model curvature needs an AutoContinuous or AutoNormal guide, or "
                            f"an AutoGuideList of them, got {type(guide).__name__}")
        self.guide = guide
        self._model = curvature_model(guide.model)
        self.args: Tuple = ()
        self.kwargs = {}
        self.seen = False
        self._handle = guide.register_forward_pre_hook(self._capture, with_kwargs=True)

    def use_model(self, model) -> None:
        """Take the Hessian of ``model`` (see :func:`curvature_model`): the ELBO's, which
        may differ from the one the guide was built on (``poutine.scale(model, s)``
        given to ``SVI`` for a tempered posterior: with the guide's model every variance
        settled at ``s`` times its optimum)."""
        self._model = curvature_model(model)

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
    def _parts(self):
        return list(self.guide) if isinstance(self.guide, AutoGuideList) else [self.guide]

    def _sites(self) -> List[Tuple[str, dict, torch.Size]]:
        """``[(name, prototype site, unconstrained shape)]`` in the order of the packed
        latent: an ``AutoGuideList``'s parts one after another, each in its own order
        (``AutoDelta`` parts' sites are not in the latent: see :meth:`fixed`)."""
        out = []
        for part in self._parts():
            if isinstance(part, AutoDelta):
                continue
            for name, site in part.prototype_trace.iter_stochastic_nodes():
                if isinstance(part, AutoNormal):
                    # attrgetter: a site named "linear.weight" (a PyroSample of a
                    # PyroModule) is a nested attribute of part.locs
                    shape = operator.attrgetter(name)(part.locs).shape
                else:
                    shape = part._unconstrained_shapes[name]
                out.append((name, site, torch.Size(shape)))
        return out

    def fixed(self) -> Dict[str, torch.Tensor]:
        """``{site: point value}`` of the ``AutoDelta`` parts (constrained, detached),
        their parameters' current values: the values the guide's last call gave the
        model, as the natural-gradient steps come before the base optimizer's."""
        values = {}
        for part in self._parts():
            if not isinstance(part, AutoDelta) or part.prototype_trace is None:
                continue
            for name, site in part.prototype_trace.iter_stochastic_nodes():
                if _plate_scale(site) != 1.0:
                    # Its value at the step's subsample is not its parameter (the full
                    # plate); not written.
                    raise ModelCurvatureError(
                        f"the AutoDelta part's site {name!r} lies in a subsampled plate, "
                        f"which the model's Hessian here does not support")
                values[name] = operator.attrgetter(name)(part).detach()
        return values

    def _fns(self) -> Dict[str, object]:
        """``{site: its prototype distribution}`` (for the support and event dim)."""
        return {name: site["fn"] for name, site, _ in self._sites()}

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

    def _trace(self, conditioned: Dict[str, torch.Tensor], enumerate_at: Optional[int] = None):
        model = poutine.condition(self._model, {**self.fixed(), **conditioned})
        if enumerate_at is not None:
            model = poutine.enum(model, first_available_dim=-1 - enumerate_at)
        with poutine.block():  # invisible to any handler the caller is inside
            return poutine.trace(model).get_trace(*self.args, **self.kwargs)

    def _structure(self, values: Dict[str, torch.Tensor], subsample):
        """``(nesting, enumerated, plates)`` of the model at these latent values: its plate
        nesting, the sites it enumerates, and the subsample of each of its plates (those
        without one in ``subsample`` draw theirs here, every generator restored after),
        or a :class:`ModelCurvatureError` for latent sites the guide does not provide."""
        device = next(iter(values.values())).device if values else torch.device("cpu")
        state = _RandomState(device)
        try:
            with torch.no_grad():
                tr = self._trace({**subsample, **values})
        finally:
            state.restore()
        latent = [(name, node) for name, node in tr.nodes.items()
                  if node["type"] == "sample" and not node["is_observed"]
                  and not site_is_subsample(node)]
        enumerated = [name for name, node in latent
                      if node["infer"].get("enumerate") == "parallel"]
        uncovered = [name for name, node in latent if name not in enumerated]
        if uncovered:
            raise ModelCurvatureError(
                f"the model samples {uncovered}, which the guide does not provide and "
                f"nobody enumerates in parallel: its log joint at the guide's draw is random, "
                f"so its Hessian is no precision target")
        dims = [f.dim for node in tr.nodes.values() if node["type"] == "sample"
                for f in node["cond_indep_stack"] if f.vectorized]
        plates = {name: node["value"] for name, node in tr.nodes.items()
                  if node["type"] == "sample" and site_is_subsample(node)}
        return (-min(dims) if dims else 0), enumerated, plates

    @staticmethod
    def _check_scales(tr, nesting: int, enumerated):
        """The contraction sums each site's scaled log density over the enumerated values,
        which is not the ELBO's (it scales the sum): refuse a scale on any site that
        depends on an enumerated value (its log density has an enumerated dim)."""
        for name, node in tr.nodes.items():
            if node["type"] != "sample" or site_is_subsample(node) \
                    or is_identically_one(node["scale"]):
                continue
            lp = node["unscaled_log_prob"]
            if any(size > 1 for size in lp.shape[:max(0, lp.dim() - nesting)]):
                raise ModelCurvatureError(
                    f"site {name!r} depends on the enumerated {enumerated} and has a scale "
                    f"(a subsampled plate or poutine.scale), which the Hessian here does not "
                    f"support")

    def log_joint(self, z: torch.Tensor, prior_only: bool = False,
                  shapes=None, subsample: Optional[Dict[str, torch.Tensor]] = None
                  ) -> torch.Tensor:
        """``f(z)``: the model's log joint at the constrained values plus the log
        Jacobian determinant of the constraining transforms (without the observed
        sites if ``prior_only``), enumerated discrete sites summed out; ``shapes`` and
        ``subsample`` as in the class docstring."""
        values, ladjs = {}, {}
        fns = self._fns()
        for name, u in self.unpack(z, shapes).items():
            t = biject_to(fns[name].support)
            x = t(u)
            values[name] = x
            ladj = t.log_abs_det_jacobian(u, x)
            ladjs[name] = sum_rightmost(ladj, ladj.dim() - x.dim() + fns[name].event_dim).sum()
        subsample = dict(subsample or {})
        nesting, enumerated, plates = self._structure(
            {k: v.detach() for k, v in values.items()}, subsample)
        if enumerated and prior_only:
            raise ModelCurvatureError(
                "the prior's curvature alone (curvature='ggn') is not defined for a model "
                "with enumerated discrete sites", "use curvature='hessian' or 'none'")
        state = _RandomState(z.device)
        tr = self._trace({**plates, **subsample, **values}, nesting if enumerated else None)
        if _RandomState(z.device) != state:
            state.restore()
            raise ModelCurvatureError(
                "the model draws random numbers even with every latent site given (a site "
                "hidden by a poutine.block inside the model, or torch.rand... or numpy.random "
                "in it): its log joint at the guide's draw is random, so its Hessian is no "
                "precision target")
        # The Jacobian term comes from the guide's log density (-log q of a transformed
        # draw), so it takes the guide site's scale, full_size / size over its subsampled
        # plates, not the model's (a poutine.scale there, for KL annealing, scaled it too:
        # a Beta latent's fit came out 20% too narrow). A site this call's model does not
        # sample still has it: from the guide's prototype plates.
        sites = {name: site for name, site, _ in self._sites()}
        logdet = sum(_plate_scale(tr.nodes.get(name, sites[name])) * ladj
                     for name, ladj in ladjs.items())
        if prior_only:
            # condition() marks the latents observed too, so select them by name (an
            # AutoDelta's site is a latent too: its density may depend on z).
            fixed = self.fixed()
            return tr.log_prob_sum(lambda name, site: name in values or name in fixed) \
                + logdet
        if enumerated:
            evaluator = TraceEinsumEvaluator(tr, True, nesting)  # computes the log densities
            self._check_scales(tr, nesting, enumerated)
            return evaluator.log_prob(tr) + logdet
        return tr.log_prob_sum() + logdet

    def hessian(self, z: torch.Tensor, prior_only: bool = False, shapes=None,
                subsample=None) -> torch.Tensor:
        """``grad^2 f(z)``, ``(D, D)``, by ``D`` Hessian-vector products; with
        ``prior_only`` the observed sites are left out; ``shapes`` and ``subsample`` as
        in the class docstring."""
        self._require_arguments()
        with torch.enable_grad(), _second_derivatives():
            z = z.detach().requires_grad_()
            (g,) = torch.autograd.grad(self.log_joint(z, prior_only, shapes, subsample), z,
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
        with torch.enable_grad(), _second_derivatives():
            z = z.detach().requires_grad_()
            (g,) = torch.autograd.grad(self.log_joint(z), z, create_graph=True)

        def product(v: torch.Tensor) -> torch.Tensor:
            with _second_derivatives():
                (hv,) = torch.autograd.grad(g, z, v, retain_graph=True, allow_unused=True)
            return -hv.detach() if hv is not None else torch.zeros_like(v)

        return product

    def hessian_diagonal(self, z: torch.Tensor, probes, shapes=None,
                         subsample=None) -> torch.Tensor:
        """``diag(grad^2 f(z))``, ``(D,)``, by one Hessian-vector product per probe.

        ``probes``: 0/1 vectors ``(D,)`` with disjoint supports covering every
        coordinate, such that no two coordinates of one probe interact (their Hessian
        entry is 0): e.g. one coordinate of every item of a subsampled plate, whose
        items are conditionally independent. Then ``H v`` is the diagonal on ``v``'s
        support. ``shapes`` and ``subsample`` as in the class docstring."""
        self._require_arguments()
        diag = torch.zeros_like(z)
        with torch.enable_grad(), _second_derivatives():
            z = z.detach().requires_grad_()
            (g,) = torch.autograd.grad(self.log_joint(z, False, shapes, subsample), z,
                                       create_graph=True)
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

        values, fns = {}, self._fns()
        for name, u in self.unpack(z.detach()).items():
            values[name] = biject_to(fns[name].support)(u)
        self._require_arguments()
        enumerated = self._structure({k: v.detach() for k, v in values.items()}, {})[1]
        if enumerated:
            raise ModelCurvatureError(
                f"the generalized Gauss-Newton matrix (curvature='ggn') does not sum out the "
                f"enumerated {enumerated}", "use curvature='hessian', which does, or 'none'")
        # First: it checks that the log joint is not random at a given draw (torch.randn in
        # the model), which under ModelGGN's vmap is torch's bare RuntimeError instead.
        prior = self.hessian(z, prior_only=True)
        # Subsampling plates draw their indices as ModelGGN traces the model: from the
        # current state, which is restored, as for the Hessian (see _structure).
        state = _RandomState(z.device)
        try:
            model, sites, fixed = self._model, None, self.fixed()
            if fixed:
                # An AutoDelta's sites are conditioned on, and so observed: their terms,
                # exact in the prior's Hessian above, are not the likelihood's.
                model = poutine.condition(self._model, fixed)
                with poutine.block(), torch.no_grad():
                    tr = poutine.trace(poutine.condition(model, values)).get_trace(
                        *self.args, **self.kwargs)
                state.restore()  # ModelGGN's trace draws the same subsample
                sites = [n for n, node in tr.nodes.items()
                         if node["type"] == "sample" and node["is_observed"]
                         and not site_is_subsample(node) and n not in fixed
                         and n not in values]
            G = ModelGGN(model, values, self.args, self.kwargs, sites=sites).dense()
        except (ValueError, NotImplementedError) as e:
            # ModelGGN's fixes (e.g. its sites= argument) are not NaturalGradient's.
            raise ModelCurvatureError(
                f"the generalized Gauss-Newton matrix (curvature='ggn') is not available for "
                f"this model: {str(e).split('; ')[0].split('. ')[0]}",
                "use curvature='hessian' (the model's exact Hessian), or 'none'") from e
        finally:
            state.restore()
        return G - prior
