"""Natural-gradient steps for guide parameters that pass through arbitrary code:
amortised (encoder-network) guides, and ``pyro.param`` values transformed before
they reach a distribution.

The Fisher information of the guide ``q_theta`` with respect to the optimised
parameters ``theta`` is a generalized Gauss-Newton matrix

.. math:: G(\\theta) = \\sum_{\\text{sites } i} \\mathbb E_{z_{<i}}\\big[
          J_i^\\top F_{R,i} J_i\\big], \\qquad J_i = \\partial \\phi_i / \\partial\\theta,

where ``phi_i`` are the standard parameters of the distribution at guide sample
site ``i`` (a ``Normal``'s ``loc`` and ``scale``, ...), ``F_{R,i}`` their closed-form
Fisher information (:mod:`pyro_natgrad.fisher`), and the expectation over the
earlier sites' values is estimated with the draw of the ELBO step (sites whose
parameters do not depend on earlier draws, like the local latents of an encoder,
need no estimate at all). :class:`GuideGGN` is this matrix as a matrix-free
operator (a :class:`~pyro_natgrad.ggn.GGNOperator`): each product re-runs the
guide with the parameters substituted (``torch.func.jvp``, earlier draws held
fixed by replay) and pulls back through a reverse pass recorded once; ``J`` is
never formed. :class:`AmortisedNaturalGradient` is the optimizer.
"""

import contextlib
import copy
import math
import time
import warnings
import weakref
from collections import OrderedDict
from typing import Callable, Dict, List, Optional

import torch
import pyro
from pyro import poutine
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.optim import PyroOptim
from pyro.poutine.guide import GuideMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import Independent, TransformedDistribution, transform_to

from .fisher import fisher_operator
from .fisher.registry import lookup_fisher
from .ggn import GGNOperator, _Head, _refuse_uncovered, _uncovered
from .guides import BackwardFlag, differentiated
from .handwritten import find_svi_call
from .linalg import conjugate_gradient
from .diagnostics import (
    NaturalGradientWarning, optimizer_name, param_labels, skip_non_finite, warn_skip,
)
from .checkpoint import (
    check_base_shapes, named_shapes, refuse_unnamed_state, replace_base_state,
)
from .schedule import StepSize, fraction_taken

__all__ = ["AmortisedNaturalGradient", "GuideGGN", "StepInfo"]

try:  # the context manager behind torch.func.functional_call, for any method of a module
    from torch.nn.utils.stateless import _reparametrize_module
except ImportError:  # pragma: no cover
    _reparametrize_module = None


# -------------------------------------------------------------------------------------
# Helpers: distributions, substitution, hooks
# -------------------------------------------------------------------------------------


def _peel(d):
    """``d`` without ``TransformedDistribution`` layers that have no Fisher of their own
    (a fixed bijection does not change the Fisher information of the parameters), the
    ``Independent`` and ``MaskedDistribution`` layers kept. Returns ``None`` for a
    ``Delta`` (a deterministic function of earlier draws: no information)."""
    if isinstance(d, Independent):
        base = _peel(d.base_dist)
        return None if base is None else Independent(base, d.reinterpreted_batch_ndims)
    if isinstance(d, MaskedDistribution):
        base = _peel(d.base_dist)
        return None if base is None else MaskedDistribution(base, d._mask)
    if isinstance(d, TransformedDistribution) and lookup_fisher(type(d)) is None:
        return _peel(d.base_dist)
    if isinstance(d, pyro.distributions.Delta):
        return None
    return d


def _base(d):
    """The innermost distribution (through all wrapper layers)."""
    while True:
        if isinstance(d, (Independent, MaskedDistribution)):
            d = d.base_dist
        elif isinstance(d, TransformedDistribution) and lookup_fisher(type(d)) is None:
            d = d.base_dist
        else:
            return d


def _leaf_terms(d) -> List[torch.Tensor]:
    """Scalars that depend on every tensor (requiring grad) that ``d`` or any of its
    layers holds: the sums of those tensors."""
    out, stack = [], [d]
    while stack:
        d = stack.pop()
        for v in vars(d).values():
            if torch.is_tensor(v) and v.requires_grad:
                out.append(v.sum())
            elif isinstance(v, torch.distributions.Distribution):
                stack.append(v)
            elif isinstance(v, (list, tuple)):
                out += [x.sum() for x in v if torch.is_tensor(x) and x.requires_grad]
    return out


def _reaching(terms, params) -> set:
    """The ``params`` on which some of the scalar ``terms`` depend."""
    if not terms:
        return set()
    grads = torch.autograd.grad(torch.stack(terms).sum(), params, allow_unused=True,
                                retain_graph=True)
    return {p for p, g in zip(params, grads) if g is not None}


def _transform_outputs(d, value) -> Optional[List[torch.Tensor]]:
    """For each ``TransformedDistribution`` layer of ``d`` that :func:`_peel` drops,
    ``T(z)`` with ``z = T^{-1}(x)`` held fixed (``x`` the site's ``value`` at that layer):
    differentiable in whatever the transforms hold (tensors, a flow's module), and in
    nothing else. None where a transform has no inverse."""
    out = []
    while True:
        if isinstance(d, (Independent, MaskedDistribution)):
            d = d.base_dist
        elif isinstance(d, TransformedDistribution) and lookup_fisher(type(d)) is None:
            try:
                # Without caches: a cached transform would hand back x itself, no graph.
                transforms = [t.with_cache(0) for t in d.transforms]
                with torch.no_grad():
                    z = value
                    for t in reversed(transforms):
                        z = t.inv(z)
            except NotImplementedError:
                return None
            y = z
            for t in transforms:
                y = t(y)
            out.append(y)
            d, value = d.base_dist, z
        else:
            return out


class _Substitute(Messenger):
    """Replace the value of the named ``pyro.param`` statements (constrained values)."""

    def __init__(self, values: Dict[str, torch.Tensor]):
        super().__init__()
        self.values = values

    def _pyro_param(self, msg):
        if msg["name"] in self.values:
            # A view, so that a subsampled plate's bookkeeping (it records the subsample
            # on the value's unconstrained parameter) lands on this call's own object.
            value = self.values[msg["name"]].view_as(self.values[msg["name"]])
            value._pyro_unconstrained_param = _Unconstrained()
            msg["value"] = value
            msg["done"] = True


class _Unconstrained:
    """Stands in for the param store's unconstrained tensor of a substituted value, which
    a subsampled ``pyro.plate`` tags with its indices (``pyro.param(..., event_dim=...)``)."""


@contextlib.contextmanager
def _hooks_off(root: Optional[torch.nn.Module]):
    """Forward hooks of ``root``'s modules silenced: re-running the guide must not look
    like a new call of it to the recorders of this optimizer or of ``NaturalGradient``."""
    if root is None:
        yield
        return
    saved = []
    for m in root.modules():
        saved.append((m, m._forward_pre_hooks, m._forward_hooks))
        m._forward_pre_hooks, m._forward_hooks = OrderedDict(), OrderedDict()
    try:
        yield
    finally:
        for m, pre, post in saved:
            m._forward_pre_hooks, m._forward_hooks = pre, post


def _refuse_running_statistics(root: Optional[torch.nn.Module]) -> None:
    """A RuntimeError, before anything changes, if a module of the guide updates running
    statistics (batch normalisation in training mode): every replay of the guide would
    update them again, and ``torch.func`` refuses the in-place update."""
    if root is None:
        return
    for name, m in root.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.training and \
                m.track_running_stats:
            raise RuntimeError(
                f"AmortisedNaturalGradient: the guide's module {name or type(m).__name__!r} "
                f"({type(m).__name__}) updates its running statistics in training mode, "
                f"and each replay of the guide would update them again; put it in eval() "
                f"mode, or build it with track_running_stats=False")


def _detached_trace(tr):
    """A trace holding only the sample sites' detached values, for ``poutine.replay``, and
    their scale and mask as the call saw them: with every handler around the guide
    (a ``poutine.scale`` from outside included), which a replay does not see."""
    out = poutine.Trace()
    for name, node in tr.nodes.items():
        if node["type"] != "sample" or node["is_observed"]:
            continue
        out.add_node(name, type="sample", name=name, is_observed=False,
                     value=node["value"].detach(), infer=dict(node["infer"]),
                     scale=node["scale"], mask=node["mask"])
    return out


# -------------------------------------------------------------------------------------
# The guide and its parameters
# -------------------------------------------------------------------------------------


class _GuideRunner:
    """Calls a guide with its parameters replaced by given tensors.

    Two routes: a parameter that the guide reads as an attribute of one of its
    modules (network weights: a plain ``nn.Module`` registered with
    ``pyro.module``, the ``nn.Parameter`` of a ``PyroModule``) is swapped in the
    module, as :func:`torch.func.functional_call` does; a parameter that reaches the
    guide through a ``pyro.param`` statement (``pyro.param`` in guide code, a
    ``PyroParam`` of an autoguide) has that statement's value replaced by
    ``transform_to(constraint)(tensor)``.
    """

    def __init__(self, guide: Callable, modules: Optional[torch.nn.Module] = None):
        self.guide = guide
        if modules is None:
            if isinstance(guide, torch.nn.Module):
                modules = guide
            elif isinstance(getattr(guide, "__self__", None), torch.nn.Module):
                modules = guide.__self__  # a method, e.g. ``vae.guide``
        self.root = modules

    def module_names(self) -> Dict[torch.Tensor, str]:
        """``{parameter tensor: dotted name}`` for the parameters that are read as module
        attributes (``PyroParam`` tensors are left out: they go through ``pyro.param``)."""
        if self.root is None:
            return {}
        out = {}
        for name, p in self.root.named_parameters():
            owner_path, _, leaf = name.rpartition(".")
            owner = self.root.get_submodule(owner_path) if owner_path else self.root
            if leaf.endswith("_unconstrained") and \
                    leaf[: -len("_unconstrained")] in getattr(owner, "_pyro_params", {}):
                continue
            out.setdefault(p, name)
        return out

    def trace(self, replay=None, module_values=None, store_values=None, args=(), kwargs=None):
        """``poutine.trace`` of one guide call, invisible to outer handlers, with the
        given sample values replayed and parameters substituted."""
        kwargs = kwargs or {}

        def call(*a, **k):
            with _hooks_off(self.root), warnings.catch_warnings():
                # pyro.module warns about the swapped-in tensors (no requires_grad).
                warnings.filterwarnings("ignore", message=".*was not registered in the "
                                                          "param store.*")
                if module_values:
                    with _reparametrize_module(self.root, module_values):
                        return self.guide(*a, **k)
                return self.guide(*a, **k)

        fn = _Substitute(store_values or {})(call)
        if replay is not None:
            fn = poutine.replay(fn, trace=replay)
        with poutine.block():
            return poutine.trace(fn).get_trace(*args, **kwargs)


# -------------------------------------------------------------------------------------
# The operator
# -------------------------------------------------------------------------------------


def _arguments(draw, default):
    """``(args, kwargs)`` of the guide call that made ``draw`` (a recorded trace), else
    the pair ``default``."""
    recorded = getattr(draw, "arguments", None)
    return default if recorded is None else recorded


class GuideGGN(GGNOperator):
    """The Fisher information of a guide with respect to (some of) its parameters,
    ``G = sum_sites scale * J^T F_R J``, as a matrix-free operator.

    :param runner: how to call the guide with substituted parameters
        (built by :class:`AmortisedNaturalGradient`).
    :param list params: the unconstrained parameter tensors ``theta`` (leaves of the
        param store), packed in this order into a flat vector.
    :param dict routes: ``{tensor: ("module", dotted name) or ("store", param name,
        constraint)}``.
    :param list draws: traces (detached values) of guide calls whose sample values
        are held fixed; ``G`` averages over them. Each site's ``scale`` and ``mask``
        are the draw's where it has them (as recorded, with the handlers around the
        call), else the replay's. One draw is exact for guides whose
        distribution parameters do not depend on earlier draws.
    :param tuple args, kwargs: the guide's arguments, for draws that do not carry their
        own call's (a recorded draw's ``arguments``).

    The sample sites counted are the unobserved, non-subsample sites with a
    closed-form Fisher (``Delta`` sites carry no information and are skipped;
    ``TransformedDistribution`` layers are looked through). Each site is weighted
    by its ``scale`` (a subsampling plate's ``N / B``) times its mask, as in the ELBO.
    """

    def __init__(self, runner: _GuideRunner, params: List[torch.Tensor], routes: Dict,
                 draws: List, args=(), kwargs=None, *, vectorize: bool = False):
        if not draws:
            raise ValueError("need at least one draw of the guide")
        self.params = list(params)
        self.shapes = [p.shape for p in self.params]
        kwargs = dict(kwargs or {})
        theta = torch.cat([p.detach().reshape(-1) for p in self.params])
        specs = [routes[p] for p in self.params]

        def substitutions(flat):
            module_values, store_values = {}, {}
            for value, spec in zip(self.unpack(flat), specs):
                if spec[0] == "module":
                    module_values[spec[1]] = value
                else:
                    store_values[spec[1]] = transform_to(spec[2])(value)
            return module_values, store_values

        heads, sites, at_theta = {}, [], {}
        #: latent elements the guide's sites hold (each times its scale, averaged over draws)
        self.num_elements = 0.0
        calls = [_arguments(draw, (args, kwargs)) for draw in draws]
        with torch.no_grad():
            mv0, sv0 = substitutions(theta)
            for k, draw in enumerate(draws):
                tr = runner.trace(draw, mv0, sv0, *calls[k])
                for name, node in tr.nodes.items():
                    if node["type"] != "sample" or node["is_observed"] or \
                            site_is_subsample(node):
                        continue
                    d = _peel(node["fn"])
                    if d is None or lookup_fisher(type(_base(d))) is None:
                        continue
                    # The scale and mask the call saw, where the draw kept them (the
                    # replay misses handlers around the guide), else the replay's.
                    seen = draw.nodes.get(name, {}) if draw is not None else {}
                    site_scale = seen.get("scale", node["scale"])
                    site_mask = seen["mask"] if "scale" in seen else node["mask"]
                    weight = site_scale / len(draws)
                    if site_mask is not None:
                        weight = weight * torch.as_tensor(site_mask)
                    scale = float(torch.as_tensor(site_scale, dtype=torch.float64).mean())
                    self.num_elements += scale * node["value"].numel() / len(draws)
                    key = f"{k}:{name}"
                    heads[key] = _Head(d, weight, f"guide site {name!r}")
                    at_theta[key] = _base(d)
                    sites.append((key, k, name))
        if not heads:
            raise ValueError("the guide has no sample site with a closed-form Fisher")
        self.sites = [name for _, k, name in sites if k == 0]

        def distributions(flat):
            mv, sv = substitutions(flat)
            traces = [runner.trace(draw, mv, sv, *call) for draw, call in zip(draws, calls)]
            return {key: _base(traces[k].nodes[name]["fn"]) for key, k, name in sites}

        def coordinates(flat):
            return {key: {n: getattr(d, n) for n in heads[key].names}
                    for key, d in distributions(flat).items()}

        _refuse_uncovered(distributions, theta, heads, at_theta)

        self._setup(coordinates, self._check_theta(theta), heads, vectorize)

    def unpack(self, flat: torch.Tensor) -> List[torch.Tensor]:
        out, pos = [], 0
        for shape in self.shapes:
            n = shape.numel()
            out.append(flat[pos:pos + n].reshape(shape))
            pos += n
        return out


# -------------------------------------------------------------------------------------
# The optimizer
# -------------------------------------------------------------------------------------


class StepInfo:
    """What the last step of :class:`AmortisedNaturalGradient` did (``optim.last_step``).

    ``taken``: whether parameters changed; ``reason``: why not; ``dim``: ``P``;
    ``cg_iterations``: CG products; ``residual``: ``|g - (G + lambda I) x| / |g|``;
    ``damping``: ``lambda``; ``rho``: step size used; ``kl``: ``rho^2 x^T G x / 2``;
    ``products``: GGN products in all; ``draws``: the guide's draws ``G`` averages over
    (one per particle); ``seconds``: wall time of the step.
    """

    def __init__(self, **kw):
        self.taken, self.reason = False, ""
        self.dim = self.cg_iterations = self.products = 0
        self.residual = self.damping = self.rho = self.kl = self.seconds = math.nan
        self.__dict__.update(kw)

    def __repr__(self):
        return "StepInfo(" + ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items()) + ")"


#: ``{guide module: weakref to the AmortisedNaturalGradient whose hooks record it}``
_RECORDING: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class AmortisedNaturalGradient(PyroOptim):
    """Natural-gradient steps on guide parameters that reach the guide's
    distributions through arbitrary differentiable code (encoder networks,
    transformed ``pyro.param`` values), through the matrix-free GGN and CG.

    ::

        guide = Encoder(...)                       # an nn.Module / PyroModule guide
        svi = SVI(model, guide, AmortisedNaturalGradient(guide), Trace_ELBO())

        # an autoguide part for global latents and a network part for local ones:
        optim = NaturalGradient(guide, base_optimizer=AmortisedNaturalGradient(guide))

    The step on the guide parameters ``theta`` (flattened, unconstrained) is

    .. math:: \\theta' = \\theta - \\rho\\,(G + \\lambda I)^{-1} g,

    ``g`` the gradient of the loss (``-ELBO``) and ``G`` the Fisher information of
    the guide with respect to ``theta`` (:class:`GuideGGN`), applied by truncated
    conjugate gradients. ``rho`` is ``step_size`` shortened so that the quadratic
    estimate of the step's ``KL(q || q')``, ``rho^2 x^T G x / 2``, is at most ``max_kl``
    per latent element (times the number of elements the guide's sites hold, each
    site counted with its plate scale: ``N d`` for ``N`` local ``d``-dimensional latents).

    **Cost per step**: two guide evaluations (one reads the sites and their Fisher
    operators, one is recorded for the reverse passes), then ``k + 2`` GGN products
    with ``k <= cg_iters`` the CG iterations (one product for the damping scale, one
    for the trust region). Each product is one ``torch.func.jvp`` (a forward pass of
    the guide carrying a tangent) and one reverse pass: about the cost of 3 to 4
    guide evaluations plus a structured Fisher product per site (measured 3.2 to 4.9
    for the encoder of ``examples/amortised.py``: 1,696 weights, 1,797 data points). ``J``
    and ``G`` are never formed; memory is that of one recorded guide evaluation.
    ``last_step`` (a :class:`StepInfo`) reports the counts and the time.

    :param guide: the guide, an ``nn.Module`` (``PyroModule``, autoguide,
        ``AutoGuideList``, or a module whose ``forward`` is the guide) or a method of
        one (``vae.guide``); its modules' parameters are swapped functionally and its
        ``pyro.param`` statements substituted. A plain function guide: pass the
        modules it uses as ``modules=torch.nn.ModuleDict(...)`` and give
        :attr:`guide` (a recording wrapper) to ``SVI``.
    :param step_size: a float (constant ``rho``) or a :class:`~pyro_natgrad.StepSize`.
        Default ``StepSize()``: ``rho = 1`` for 11 steps (``t <= 10``), then decaying like
        ``2/t`` so that the iterates average out the noise of single-sample ELBO gradients
        (with exact gradients, pass ``1.0``: Gauss-Newton on the distribution parameters).
        ``t`` counts a step that the trust region shortened as the fraction taken.
    :param float damping: ``lambda = damping * g^T G g / g^T g`` (relative to the
        curvature along the gradient, so that it does not depend on the size of the
        data set); default ``1e-3``.
    :param int cg_iters: at most this many CG iterations per step (truncated CG, as
        in Hessian-free optimisation). Default 50.
    :param float cg_tol: CG stops when ``|r| <= cg_tol |g|``; default ``1e-10`` in
        float64, ``1e-5`` in float32.
    :param max_kl: trust region on the quadratic KL estimate, per latent element
        (None: off). Default 0.5.
    :param other_optimizer: a :class:`pyro.optim.PyroOptim` for the parameters that
        are not the guide's (model parameters such as a decoder's weights), which have
        no Fisher under ``q``. Default ``pyro.optim.Adam({"lr": 0.01})``.
    :param modules: the ``nn.Module`` whose parameters are swapped (default: the guide,
        or the module of a guide method).

    **Composed with** :class:`~pyro_natgrad.NaturalGradient` (this optimizer as its
    ``base_optimizer``, an autoguide for global latents and an encoder for local ones)
    the two step their blocks from the same gradients: a block-Jacobi iteration that
    ignores the coupling between the blocks. With the decaying step size its error falls
    like ``t^(-2 (1 - c))``, ``c`` the posterior canonical correlation between the global
    latents and the local ones. That is slow when ``c`` is large: on the linear-Gaussian
    model of the tests (30 points, one global offset ``mu``) data with ``c = 0.49``
    reach the mean-field optimum in about 120 steps, while with ``c = 0.89`` ``mu`` is
    still 1.3 posterior sd away after 400. More particles do not help (32 gave the
    same); a step that decays more slowly trades that error for noise in the scales. A
    non-amortised ``AutoNormal`` over ``mu`` and the ``z_n`` together, stepped by
    ``NaturalGradient`` with its default model curvature, lands on the mean-field
    optimum of the same data (``c`` up to 0.89) to three digits in 120 steps: where the
    local latents are few enough to have guide parameters of their own, prefer it.

    **Which parameters**: those that reach a guide site with a registered Fisher. Those
    of ``Delta`` sites, of sites with no registered Fisher, inside a distribution's
    transforms, and guide parameters the model reads too (seen once a step under
    ``SVI`` has run the model) take ``other_optimizer``'s steps, with one warning:
    ``G`` has no curvature for them along some directions. :meth:`routing` lists them.

    A step is skipped with a :class:`~pyro_natgrad.NaturalGradientWarning` (the
    guide parameters unchanged) when the gradient, a product or the solution is not
    finite. Dropout or other randomness inside the guide breaks the replay; put such
    modules in ``eval()`` mode. Batch normalisation in training mode is refused (each
    replay would update its running statistics): ``eval()`` mode, or
    ``track_running_stats=False``. Vectorised particles (``vectorize_particles=True``) are
    not supported; ``num_particles > 1`` averages ``G`` over the particles' draws.
    """

    MAX_DRAWS = 64

    def __init__(self, guide, step_size=None, damping: float = 1e-3, cg_iters: int = 50,
                 cg_tol: Optional[float] = None, max_kl: Optional[float] = 0.5,
                 other_optimizer: Optional[PyroOptim] = None,
                 modules: Optional[torch.nn.Module] = None):
        if not callable(guide):
            raise TypeError(f"expected the guide, got {type(guide).__name__}")
        if isinstance(guide, GuideMessenger):
            # Its __call__ runs the model under the messenger and never calls forward, so
            # the hooks below would see no call; wrapped as a function its trace holds
            # the model's observed sites too.
            raise TypeError(
                f"AmortisedNaturalGradient does not support Pyro's messenger guides "
                f"({type(guide).__name__}): use AutoNormal or AutoMultivariateNormal with "
                f"pyro_natgrad.NaturalGradient for natural-gradient steps on that family")
        for name, value in (("step_size", step_size), ("damping", damping),
                            ("cg_iters", cg_iters), ("cg_tol", cg_tol), ("max_kl", max_kl)):
            if isinstance(value, bool):
                raise TypeError(f"{name} must be a number, got {value!r}")
        if cg_tol is not None and not (isinstance(cg_tol, (int, float)) and 0 < cg_tol < 1):
            raise ValueError(f"cg_tol must be None or a number in (0, 1), got {cg_tol!r}")
        if isinstance(step_size, (int, float)):
            if not 0 < step_size <= 1:
                raise ValueError(f"step_size must be in (0, 1], got {step_size}")
            step_size = StepSize(initial=float(step_size), decay=0.0)
        step_size = step_size if step_size is not None else StepSize()
        if not isinstance(step_size, StepSize):
            raise TypeError("step_size must be a float or a pyro_natgrad.StepSize")
        if not (isinstance(damping, (int, float)) and 0 <= damping < math.inf):
            raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
        if not (isinstance(cg_iters, int) and cg_iters >= 1):
            raise ValueError(f"cg_iters must be an int >= 1, got {cg_iters!r}")
        if max_kl is not None and not (isinstance(max_kl, (int, float))
                                       and 0 < max_kl < math.inf):
            raise ValueError(f"max_kl must be None or a positive finite number, got {max_kl!r}")
        if _reparametrize_module is None:  # pragma: no cover
            raise ImportError("AmortisedNaturalGradient needs torch.nn.utils.stateless")
        self.step_size, self.damping, self.cg_iters = step_size, float(damping), cg_iters
        self.cg_tol, self.max_kl = cg_tol, max_kl
        self.other_optimizer = other_optimizer or pyro.optim.Adam({"lr": 0.01})
        if not isinstance(self.other_optimizer, PyroOptim):
            raise TypeError("other_optimizer must be a pyro.optim.PyroOptim")
        self._runner = _GuideRunner(guide, modules)
        self._args, self._kwargs, self._seen = (), {}, False
        self._draws: List = []
        self._tracer = None
        self._handles = []
        if isinstance(guide, torch.nn.Module):
            self.guide = guide
            earlier = _RECORDING.get(guide)
            earlier = earlier() if earlier is not None else None
            if earlier is not None and earlier._handles:
                # Two recorders' tracers would nest and leave in the wrong order (Pyro:
                # "This Messenger is not on the bottom of the stack").
                earlier.detach()
                warnings.warn("AmortisedNaturalGradient: a new optimizer for this guide "
                              "takes over recording its calls; the earlier one's hooks were "
                              "removed (it now replays fresh draws of the guide)",
                              NaturalGradientWarning)
            _RECORDING[guide] = weakref.ref(self)
            self._handles = [guide.register_forward_pre_hook(self._pre, with_kwargs=True),
                             guide.register_forward_hook(self._post, always_call=True)]
        else:
            def recording_guide(*args, **kwargs):
                self._pre(None, args, kwargs)
                try:
                    return guide(*args, **kwargs)
                finally:
                    self._post(None, args, None)

            self.guide = recording_guide
        self.t = 0.0  # steps taken, each counted as the fraction of its scheduled size
        self.skipped = 0
        self.last_step = StepInfo(reason="no step yet")
        self._warned = set()
        self._skip_sources = set()  # what has warned of a skipped step (see warn_skip)
        self._route_cache = None
        self._model = None  # SVI's, once a step has seen it (see _read_by_model)
        self._waiting_shapes = {}  # of a checkpoint's other-optimizer state (set_state)
        self._before_checkpoint = (0.0, 0)
        self.optim_objs, self.grad_clip, self._state_waiting_to_be_consumed = {}, {}, {}

    # ---- recording the guide's calls -----------------------------------------------
    def _pre(self, module, args, kwargs):
        self._args, self._kwargs, self._seen = tuple(args), dict(kwargs or {}), True
        if not torch.is_grad_enabled():
            return  # Predictive and other no-grad calls are not the ELBO's draws
        self._tracer = poutine.trace()
        self._tracer.arguments = (self._args, self._kwargs)
        self._tracer.__enter__()

    def _post(self, module, args, *rest):
        tracer, self._tracer = self._tracer, None
        if tracer is None:
            return
        tracer.__exit__(None, None, None)
        if any(f.name == "num_particles_vectorized" for node in tracer.trace.nodes.values()
               for f in node.get("cond_indep_stack", ())):
            raise NotImplementedError(
                "AmortisedNaturalGradient does not support vectorize_particles=True (the "
                "replayed guide would count each particle's Fisher once per particle); use "
                "Trace_ELBO(num_particles=n) without vectorize_particles")
        draw = _detached_trace(tracer.trace)
        # The call's own arguments: G replays the draw with them, whatever calls came
        # after it (a validation loss on other data between backward() and the step).
        draw.arguments = tracer.arguments
        # A backward pass through the draw marks it: calls whose loss is not
        # differentiated (a validation loss, inspecting the guide on other data) must
        # not be replayed as this step's draws.
        draw.backward = BackwardFlag([node["value"] for node in tracer.trace.nodes.values()
                                      if node["type"] == "sample" and not node["is_observed"]])
        self._draws.append(draw)
        del self._draws[:-self.MAX_DRAWS]

    def detach(self):
        """Remove the hooks placed on the guide."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_args=(), _kwargs={}, _draws=[], _tracer=None, _handles=[],
                     _route_cache=None, _model=None)
        return state

    # ---- which parameters -------------------------------------------------------------
    def _routes(self, params) -> Dict[torch.Tensor, tuple]:
        """``{tensor: route}`` for the given parameters that the guide reads (cached
        while the same tensors come back)."""
        key = (self._model,) + tuple(params)  # the routes change once the model is known
        cached = self._route_cache
        if cached is not None and len(cached[0]) == len(key) and \
                all(a is b for a, b in zip(cached[0], key)):
            return cached[1]
        routes = self._find_routes(params)
        self._route_cache = (key, routes)
        return routes

    def _find_routes(self, params) -> Dict[torch.Tensor, tuple]:
        module_names = self._runner.module_names()
        draw = self._draws[-1] if self._draws else None
        with torch.no_grad():
            tr = self._runner.trace(draw, None, None,
                                    *_arguments(draw, (self._args, self._kwargs)))
        store = pyro.get_param_store()
        by_tensor = {}
        for name, node in tr.nodes.items():
            if node["type"] != "param":
                continue
            ref = getattr(node["value"], "unconstrained", None)
            leaf = ref() if callable(ref) else node["value"]
            if leaf is not None:
                constraint = store._constraints.get(name, torch.distributions.constraints.real)
                by_tensor.setdefault(leaf, (name, constraint))
        routes = {}
        for p in params:
            if p in module_names:
                routes[p] = ("module", module_names[p])
            elif p in by_tensor:
                routes[p] = ("store",) + by_tensor[p]
        informative = self._informative(list(routes)) - self._read_by_model(tr, list(routes))
        return {p: r for p, r in routes.items() if p in informative}

    def _read_by_model(self, guide_trace, params) -> set:
        """The ``params`` that the model's log density (at the guide's draw) also depends
        on. ``G`` sees only their part in the guide, and where that is small the damped
        solve gives them ``g / lambda``: a parameter the guide read as ``loc + 1e-3 a``
        and the model as an offset went 0.08, 0.93, 7.4, -158. They go to
        ``other_optimizer``. The model is the one of the ``SVI`` that last ran this
        optimizer; before that, or in a custom loop, it is unknown and this check is not
        made."""
        model = self._model
        if model is None or not params:
            return set()
        args, kwargs = _arguments(guide_trace, (self._args, self._kwargs))
        rng = pyro.util.get_rng_state()
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        try:
            with torch.random.fork_rng(devices=cuda), torch.enable_grad(), poutine.block():
                tr = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                    *args, **kwargs)
                log_density = tr.log_prob_sum()
                return _reaching([log_density], params) if log_density.requires_grad else set()
        except Exception as e:  # noqa: BLE001 - the check must not stop a run the ELBO ran
            if "model" not in self._warned:
                self._warned.add("model")
                warnings.warn(f"AmortisedNaturalGradient: could not run the model to see "
                              f"which guide parameters it also reads ({type(e).__name__}: "
                              f"{e}); such a parameter would take a natural-gradient step "
                              f"from the guide's curvature alone", NaturalGradientWarning)
            return set()
        finally:
            pyro.util.set_rng_state(rng)

    def _informative(self, params) -> set:
        """The parameters that reach some sample site with a Fisher of its own, and no
        ``TransformedDistribution``'s transforms. The others have no curvature in ``G``
        along some of their directions, and the damped solve would give them
        ``g / lambda`` there, a step the trust region does not see: those of ``Delta``
        sites only (MAP parts of a guide), and those a transform holds, which ``G``
        takes as fixed (even where they also feed the base distribution: a layer whose
        output sets both the base's scale and an affine transform's shift). They go to
        ``other_optimizer``."""
        if not params:
            return set()
        draw = self._draws[-1] if self._draws else None
        with torch.enable_grad():
            tr = self._runner.trace(draw, None, None,
                                    *_arguments(draw, (self._args, self._kwargs)))
        terms, fixed = [], []
        for node in tr.nodes.values():
            if node["type"] != "sample" or node["is_observed"] or site_is_subsample(node):
                continue
            d = _peel(node["fn"])
            if d is None:
                continue
            base = _base(d)
            if lookup_fisher(type(base)) is None:
                # G leaves such a site out: every parameter it reads would take g / lambda
                # along the directions only this site sees.
                fixed += _leaf_terms(node["fn"])
                continue
            names = fisher_operator(base).names
            # Arguments outside the Fisher's coordinates (a learned negative-binomial
            # total_count): G takes them as fixed, as it does a transform's.
            fixed += [getattr(base, a).sum() for a in _uncovered(base, names)
                      if getattr(base, a).requires_grad]
            base = [t.sum() for t in _Head.coordinates(base, names).values() if t.requires_grad]
            terms += base
            outputs = _transform_outputs(node["fn"], node["value"].detach())
            # A transform without an inverse: its parameters cannot be told apart from
            # the base's, so none of this site's go to G.
            fixed += base if outputs is None else [y.sum() for y in outputs if y.requires_grad]
        reached = _reaching(terms, params)
        return reached - _reaching(fixed, params)

    def routing(self, params=None) -> Dict[str, str]:
        """``{parameter name: "natural gradient (GGN)" or the other optimizer}`` for
        ``params`` (default: every parameter in the param store)."""
        if not self._seen:
            raise RuntimeError("the guide has not been called yet, so its arguments are "
                               "unknown; run svi.step(...) (or the guide once) first")
        store = pyro.get_param_store()
        if params is None:
            params = [store._params[n] for n in store.keys()]
        routes = self._routes(params)
        other = optimizer_name(self.other_optimizer)
        return {name: ("natural gradient (GGN)" if p in routes else f"other optimizer ({other})")
                for name, p in zip(param_labels(params), params)}

    def operator(self, params=None) -> GuideGGN:
        """The :class:`GuideGGN` at the current parameters and the last recorded draws
        (the guide must have been called)."""
        if not self._seen:
            raise RuntimeError("the guide has not been called yet, so its arguments are "
                               "unknown; run svi.step(...) first")
        if params is None:
            store = pyro.get_param_store()
            params = [store._params[n] for n in store.keys()]
        routes = self._routes(params)
        mine = [p for p in params if p in routes]
        draws = self._draws or [self._fresh_draw()]
        return GuideGGN(self._runner, mine, routes, draws, self._args, self._kwargs)

    def _fresh_draw(self):
        with torch.no_grad():
            return _detached_trace(self._runner.trace(None, None, None, self._args,
                                                      self._kwargs))

    # ---- the step -------------------------------------------------------------------
    def __call__(self, params, *args, **kwargs):
        start = time.perf_counter()
        params = list(params)
        try:
            self.check_step()
        except (RuntimeError, ValueError):
            # Refused before anything changed: the step's gradients and draws go (as SVI
            # would drop them after the step), or the next step, after the fix, adds its
            # own to them.
            for p in params:
                p.grad = None
            self.drop_step()
            raise
        call = find_svi_call(self)
        if call is not None:
            # Under JitTrace_ELBO the compiled graph runs no hooks, so the arguments the
            # hooks saw are the first step's: a fresh draw must use this step's.
            svi, self._args, self._kwargs = call
            self._model = svi.model
        draws, self._draws = self._draws, []
        draws = differentiated(draws, lambda d: d.backward)
        draws = draws[-self.MAX_DRAWS:] or [self._fresh_draw()]
        self._draws = draws[-1:]  # for _routes
        routes = self._routes(params)
        self._draws = []
        # SVI passes a set: a fixed order (by name) makes runs repeatable.
        mine = sorted((p for p in params if p in routes and p.grad is not None),
                      key=lambda p: routes[p][1])
        rest = [p for p in params if p not in routes]
        self._warn_rest(rest)
        # The guide's step first: it is the part that can fail (an unusual guide), and a
        # failure must leave every parameter as it was.
        info = self._step(mine, routes, draws) if mine else \
            StepInfo(reason="no guide parameter with a gradient")
        rest, self.skipped = skip_non_finite(rest, self.other_optimizer, self.skipped,
                                             prefix="AmortisedNaturalGradient: ",
                                             warned=self._skip_sources)
        if rest:
            self.other_optimizer(rest, *args, **kwargs)
        info.seconds = time.perf_counter() - start
        self.last_step = info

    def check_step(self) -> None:
        """Raise, changing nothing, where the next step would be refused: no guide call
        seen, a module that updates running statistics, a checkpoint for other shapes
        (that checkpoint is then dropped). :class:`~pyro_natgrad.NaturalGradient` calls
        this before its own writes when this optimizer is its base optimizer, so that a
        refusal here leaves the whole step undone."""
        if not self._seen:
            raise RuntimeError("AmortisedNaturalGradient has not seen a call of the guide; "
                               "give SVI the guide this optimizer was built with (for a "
                               "function guide: optim.guide)")
        _refuse_running_statistics(self._runner.root)
        self._check_checkpoint()

    def drop_step(self) -> None:
        """Forget the draws recorded for the step under way (the step was refused; see
        :meth:`NaturalGradient._drop_step <pyro_natgrad.NaturalGradient>`, which calls this
        when this optimizer is its base optimizer)."""
        self._draws = []

    def _warn_rest(self, rest):
        new = [p for p in rest if p not in self._warned]
        if not new:
            return
        self._warned.update(new)
        names = param_labels(new)
        warnings.warn(f"AmortisedNaturalGradient: {len(new)} parameter(s) reach no guide "
                      f"site with a Fisher of its own and take "
                      f"{optimizer_name(self.other_optimizer)} steps: "
                      f"{names[:8]}{' ...' if len(names) > 8 else ''} (expected for model "
                      f"parameters and guide parameters the model reads too, Delta sites, "
                      f"parameters inside a distribution's transforms, and those of sites "
                      f"with no registered Fisher)",
                      NaturalGradientWarning)

    def _skip(self, reason, info):
        self.skipped += 1
        warn_skip(f"AmortisedNaturalGradient: {reason}: step skipped", self.skipped,
                  "the guide parameters are unchanged", reason, self._skip_sources)
        info.reason = reason
        return info

    def _step(self, mine, routes, draws) -> StepInfo:
        g = torch.cat([p.grad.detach().reshape(-1) for p in mine])
        info = StepInfo(dim=g.numel(), draws=len(draws))
        if not bool(torch.isfinite(g).all()):
            return self._skip("non-finite gradient", info)
        gnorm2 = float(g.square().sum())
        if gnorm2 == 0.0:
            info.reason = "zero gradient"
            return info
        G = GuideGGN(self._runner, mine, routes, draws, self._args, self._kwargs)
        tol = self.cg_tol if self.cg_tol is not None else \
            (1e-10 if g.dtype == torch.float64 else 1e-5)
        with torch.no_grad():
            curvature = float(g @ G.mv(g)) / gnorm2
            lam = self.damping * curvature
            if not math.isfinite(lam) or lam < 0:
                return self._skip("non-finite curvature", info)
            lam = max(lam, torch.finfo(g.dtype).tiny)
            count = [0]

            def matvec(v):
                count[0] += 1
                return G.mv(v) + lam * v

            x = conjugate_gradient(matvec, g, tol=tol, max_iter=self.cg_iters,
                                   raise_on_fail=False, check_residual=False)
            Gx = G.mv(x)
            quad = float(x @ Gx)
            info.products = count[0] + 2  # + the damping scale and x^T G x
            info.cg_iterations = count[0]
            info.damping = lam
            info.residual = float((g - Gx - lam * x).norm()) / math.sqrt(gnorm2)
            if not (bool(torch.isfinite(x).all()) and math.isfinite(quad)):
                return self._skip("non-finite natural-gradient direction", info)
            scheduled = rho = float(self.step_size(self.t))
            limit = None if self.max_kl is None else self.max_kl * max(G.num_elements, 1.0)
            if limit is not None and 0.5 * rho**2 * quad > limit:
                rho = math.sqrt(2 * limit / quad)
            new = G.unpack(G.theta - rho * x)
            if not all(bool(torch.isfinite(v).all()) for v in new):
                return self._skip("non-finite parameters", info)
            for p, v in zip(mine, new):
                p.data.copy_(v)
        # A step the trust region shortened counts as the fraction taken (as in
        # NaturalGradient), so the warm-up at the initial step size and the decay are not
        # spent on steps that the trust region cut to a fraction of it.
        self.t += float(fraction_taken(rho, scheduled))
        info.taken, info.rho, info.kl = True, rho, 0.5 * rho**2 * quad
        return info

    # ---- state ----------------------------------------------------------------------
    def get_state(self) -> Dict:
        # A copy, not the other optimizer's live tensors, which later steps change in place;
        # with a state loaded but not yet consumed by a step.
        refuse_unnamed_state(self.other_optimizer)
        waiting = getattr(self.other_optimizer, "_state_waiting_to_be_consumed", {})
        return {"t": self.t, "skipped": self.skipped,
                "other": copy.deepcopy({**waiting, **self.other_optimizer.get_state()}),
                "other_shapes": {**self._waiting_shapes, **named_shapes(self.other_optimizer)}}

    def set_state(self, state: Dict) -> None:
        """Restore a :meth:`get_state` checkpoint, replacing the whole state (the other
        optimizer's moments of parameters it has stepped included). A ValueError, with
        nothing restored, for a checkpoint that is not this optimizer's or was made for
        parameters of other shapes."""
        missing = [k for k in ("t", "skipped", "other") if k not in state] \
            if isinstance(state, dict) else ["t", "skipped", "other"]
        if missing:
            raise ValueError(
                f"AmortisedNaturalGradient.set_state: the state lacks {missing}; it is not "
                f"a checkpoint of AmortisedNaturalGradient (get_state() or save() makes one)")
        other = copy.deepcopy(state["other"])  # later steps change it in place
        shapes = dict(state.get("other_shapes", {}))
        check_base_shapes(shapes)  # those in the param store now; the others at the step
        self._before_checkpoint = (self.t, self.skipped)
        self.t, self.skipped = state["t"], state["skipped"]
        self._waiting_shapes = shapes
        replace_base_state(self.other_optimizer, other)

    def _check_checkpoint(self):
        """At a step, a ValueError for a checkpoint made for parameters that now have
        other shapes, with the checkpoint dropped (before anything changes)."""
        if not self._waiting_shapes:
            return
        try:
            check_base_shapes(self._waiting_shapes)
        except ValueError:
            self._waiting_shapes = {}
            self.t, self.skipped = self._before_checkpoint
            replace_base_state(self.other_optimizer, {})
            raise

    def save(self, filename: str) -> None:
        torch.save(self.get_state(), filename)

    def load(self, filename: str, map_location=None) -> None:
        self.set_state(torch.load(filename, map_location=map_location, weights_only=False))
