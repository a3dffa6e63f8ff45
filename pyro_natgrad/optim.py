"""``NaturalGradient``: a natural-gradient optimizer to pass to Pyro's ``SVI``.

::

    guide = AutoMultivariateNormal(model)
    svi = SVI(model, guide, NaturalGradient(guide), Trace_ELBO())

Gaussian guide parameters take mirror-descent steps in natural parameters
(:mod:`pyro_natgrad.gaussian`) with a decaying step size and a control variate
against the noise of single-sample gradients; the parameters of hand-written guide
sites in other exponential families take mirror-descent steps too
(:mod:`pyro_natgrad.expfam_step`); every other parameter goes to a base optimizer
(Adam by default, or :class:`~pyro_natgrad.AmortisedNaturalGradient` for networks).
:meth:`NaturalGradient.routing` says which.
"""

import copy
import math
import warnings
import weakref
from typing import Dict, Optional

import torch
import pyro
from pyro.optim import PyroOptim

from pyro.infer.autoguide import (AutoCallable, AutoContinuous, AutoDelta, AutoDiagonalNormal,
                                  AutoGuide, AutoGuideList, AutoMultivariateNormal, AutoNormal)

from .curvature import ModelCurvature, ModelCurvatureError
from .checkpoint import (
    check_base_shapes, check_format, check_layout, group_layout, named_shapes,
    refuse_unnamed_state, replace_base_state,
)
from .diagnostics import (
    CrawlMonitor, GrowthMonitor, NaturalGradientWarning, StallMonitor, all_finite,
    optimizer_name, param_labels, skip_non_finite, warn_skip,
)
from .gaussian import (StepError, chunk_size, cv_sample_index, diagonal_gaussian_step,
                       full_step, hold_stride, leave_one_out_median_cv, norm,
                       sampled_median_cv, softplus_diagonal_step)
from .guides import (
    DiagonalGaussianGroup, DrawRecorder, FullGaussianGroup, read_guide, reads_as_autonormal,
    same_arguments, unsupported_parts, unsupported_reason,
)
from .handwritten import (
    describe_rejected, find_svi, find_svi_args, read_handwritten, refuse_shared_across_parts,
)
from .linalg import conjugate_gradient
from .lowrank import COVARIANCE_REASON, LowRankGaussianGroup, project_lowrank, read_lowrank
from .minibatch import minibatch_targets, plate_scale, subsampled
from .replay import TorchRandomState, replay_guide, replayed_records
from .schedule import StepSize, fraction_taken

#: Largest latent dimension for which ``curvature="auto"`` computes the model's Hessian.
MAX_CURVATURE_DIM = 256
#: The same for a full-rank guide alone (``AutoMultivariateNormal``), whose steps from
#: gradients alone must estimate ``D^2/2`` precision entries from ``D`` numbers per draw
#: and lost to Adam from a few hundred dimensions on (``docs/optimizer.rst``).
MAX_FULL_RANK_CURVATURE_DIM = 1024


#: ``curvature="hvp"``: the Newton system for the mean is solved by conjugate gradients
#: (preconditioned by the guide's variances) to this relative residual, with at most
#: ``HVP_MAX_PRODUCTS`` Hessian-vector products; one more measures the step's KL, and a
#: step the trust region shortens solves again.
HVP_TOLERANCE = 1e-6
HVP_MAX_PRODUCTS = 50

#: A decaying step size of a mean-field group holds while successive whitened mean
#: gradients agree by more than this cosine (see ``NaturalGradient._advance_clock``).
HOLD_COSINE = 0.1

#: A step with the model's Hessian holds the clock on the variances' changes
#: ``S`` only while their root mean square exceeds this (a variance 10% from its target):
#: at the optimum of a Gaussian model ``S`` is rounding, whose pattern repeats from step
#: to step, and held the step at 1 where single-draw mean steps without the control
#: variate (under JIT with other randomness between steps) needed the decay.
HOLD_MIN_CHANGE = 0.1

#: Where the base optimizer steps parameters the model reads (an ``AutoDelta`` part, a
#: ``pyro.param`` of the model), the optimum of the Gaussian parts moves with them: a
#: step with the model's Hessian also holds its clock while the mean's whitened Newton
#: direction keeps its course between steps with a root mean square above this (the
#: mean a tenth of a marginal sd behind). With an ``AutoDelta`` intercept under Adam,
#: the decaying step let the mean lag 0.4-0.7 sds behind its conditional optimum, and
#: the intercept, 3 to 11 times further from its optimum after 800 steps than with
#: gradient-only steps.
HOLD_MIN_DRIFT = 0.1

#: Newton solves at most per step to meet the mean's trust region (see
#: :func:`_cut_to_bound`).
TRUST_REGION_SOLVES = 12

#: The log of the factor by which :func:`_cut_to_bound` shortens a trial step whose
#: root KL overflowed.
TRUST_REGION_BACKOFF = 10.0

#: Mean-field groups smaller than this keep the control variate's coefficient at 1: the
#: estimate of :func:`~pyro_natgrad.gaussian.leave_one_out_median_cv` from one draw of a
#: few elements is too noisy to help.
CV_MIN_ELEMENTS = 64


def _previous_gradient(state, size: int, like, key: str = "w") -> torch.Tensor:
    """The sample of the previous step's whitened mean gradient kept in a mean-field
    group's ``state[key]`` (zeros, stored there, when there is none of this size)."""
    previous = state.get(key)
    if not (torch.is_tensor(previous) and previous.shape == (size,)
            and previous.dtype == like.dtype and previous.device == like.device):
        previous = state[key] = like.new_zeros(size)
    return previous


def _sample_size(n: int) -> int:
    """The number of elements in the hold test's sample ``v[::hold_stride(n)]``."""
    return -(-n // hold_stride(n))


def _agreement(state, v, key: str = "w"):
    """``(<v, v'>, |v|^2, |v'|^2)`` on the sample ``v[::hold_stride(v.numel())]`` of this
    step's ``v``, ``v'`` the previous step's sample kept in ``state[key]`` (then replaced
    by this one): the arguments of ``NaturalGradient._advance_clock``."""
    v = v.reshape(-1)
    v = v[::hold_stride(v.numel())]
    previous = _previous_gradient(state, v.numel(), v, key)
    sums = torch.stack([v @ previous, v @ v, previous @ previous]).tolist()
    previous.copy_(v)
    return sums


def _takes_curvature(guide) -> bool:
    """Whether steps can take the model's Hessian: a single ``AutoNormal`` or
    ``AutoContinuous`` guide, or an ``AutoGuideList`` of ``AutoNormal``,
    ``AutoDiagonalNormal`` and ``AutoMultivariateNormal`` parts (a block-diagonal
    Gaussian: :meth:`NaturalGradient._step_blocks_newton`), beside which ``AutoDelta``
    parts may stand (the Hessian is the model's at their point values). A part that
    provided no latents, such as a hand-written one, would leave the model's log joint
    random, and a low-rank part's projection step is for a guide alone."""
    if isinstance(guide, AutoGuideList):
        return any(_gaussian_part(p) for p in guide) and all(
            _gaussian_part(p) or type(p) is AutoDelta for p in guide)
    return isinstance(guide, AutoContinuous) or reads_as_autonormal(guide)


def _gaussian_part(part) -> bool:
    """Whether an ``AutoGuideList`` part can take the model's curvature."""
    return reads_as_autonormal(part) or type(part) in (AutoDiagonalNormal,
                                                       AutoMultivariateNormal)


def _guide_description(guide) -> str:
    if isinstance(guide, AutoGuideList):
        return f"an AutoGuideList of {', '.join(type(p).__name__ for p in guide) or 'nothing'}"
    return type(guide).__name__


def _subsampled_latents(guide) -> bool:
    """Whether a latent site of the autoguide lies in a subsampled plate."""
    return any(any(f.full_size is not None and f.full_size != f.size
                   for f in site["cond_indep_stack"])
               for _, site in guide.prototype_trace.iter_stochastic_nodes())


def _curvature_limit(groups) -> int:
    """The largest latent dimension for which ``"auto"`` uses the model's Hessian."""
    if groups and all(isinstance(g, FullGaussianGroup) for g in groups):
        return MAX_FULL_RANK_CURVATURE_DIM
    return MAX_CURVATURE_DIM


#: Losses whose gradients are not the KL ELBO's: they weight the guide's draws
#: (importance weights, a tail-adaptive f-divergence), so neither the control variate
#: nor a precision target from the model's Hessian fits them.
UNSUPPORTED_LOSSES = ("RenyiELBO", "TraceTailAdaptive_ELBO", "TraceTMC_ELBO")


class NaturalGradient(PyroOptim):
    """Natural-gradient optimizer for variational guides.

    Supported guides:

    * :class:`~pyro.infer.autoguide.AutoNormal`,
      :class:`~pyro.infer.autoguide.AutoDiagonalNormal`,
      :class:`~pyro.infer.autoguide.AutoMultivariateNormal`, and
      :class:`~pyro.infer.autoguide.AutoGuideList` of these and of hand-written parts:
      the steps below;
    * :class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal`: with the model's
      Hessian (see ``curvature``), a Newton step for ``loc`` and the covariance set to
      the low-rank member nearest the running precision (a KL projection); without
      it, natural-gradient steps for ``loc`` only, and the covariance factors go to
      ``base_optimizer`` (:mod:`pyro_natgrad.lowrank` says why);
    * hand-written guides whose sample sites take ``pyro.param`` values directly
      (any constraint) as the parameters of a family with a closed-form Fisher:
      Normal and MultivariateNormal(scale_tril) as below, LowRankMultivariateNormal
      (``loc`` only: the covariance goes to ``base_optimizer``), Gamma, Beta, Dirichlet,
      Categorical and the other exponential families by mirror descent in natural
      parameters (:mod:`pyro_natgrad.handwritten`). The guide is read once with the
      arguments of ``SVI.step``, found on the call stack; outside SVI call
      :meth:`read_guide` first.

    Other parameters (of the model, of other guide parts, transformed in the guide)
    are updated by ``base_optimizer``, with one warning that lists them.

    Each Gaussian ``q = N(mu, Sigma)`` takes the step
    ``Lambda' = Lambda + 2 rho dl/dSigma``, ``mu' = mu - rho Sigma' dl/dmu`` on the loss
    ``l = -ELBO``: the natural gradient, exact in one step at ``rho = 1`` for a
    Gaussian posterior and exact gradients. Positive-definiteness holds by
    construction.

    :param guide: the guide that ``SVI`` is given (an ``SVI`` over another guide, or
        with a loss that is not the KL ELBO, is refused with a ValueError at its first
        step).
    :param step_size: a :class:`~pyro_natgrad.schedule.StepSize`, or a float for a
        constant ``rho``. Default: ``StepSize()``, which is 1 for 11 steps (``t <= 10``)
        and decays like ``2/t`` so that late iterates average out gradient noise. The
        clock ``t`` counts the fraction of each step the trust region allowed; a
        mean-field group stepping from gradients alone holds it while successive
        whitened mean gradients agree (cosine above
        :data:`~pyro_natgrad.optim.HOLD_COSINE`), and steps with the model's Hessian
        while the variances' successive changes agree and are not small.
    :param max_kl: trust region: each step's quadratic estimate of ``KL(q' || q)`` is
        at most this (per element for diagonal Gaussians without model curvature,
        half for the mean and half for the precision:
        :func:`~pyro_natgrad.gaussian.step_limit`), and no step more than doubles a
        variance in any direction (nor, for mean-field steps from gradients alone,
        halves one; nor, with model curvature, doubles one of the running precision's
        Gaussian). With model curvature that limit shortens the whole step, so the
        mean's Newton move shrinks with it, and the bound holds for the whole step
        (mean-field guides: ``max_kl`` per latent, ``D max_kl`` in all), with the Newton
        direction solved anew at the shortened step. A hand-written guide's non-Gaussian
        site steps at most ``min(max_kl, SITE_MAX_KL)`` (1 nat) per element
        (:mod:`pyro_natgrad.expfam_step`). None turns these off: right for exact
        gradients, risky for noisy ones.
    :param control_variate: subtract the zero-mean term that the current
        precision predicts from each gradient, using the guide's own draws
        (recorded by forward hooks on the guide). Default True. False records no
        draws, so the model's curvature is off too (``"auto"`` means ``"none"``, and
        the other curvature modes are refused): every step is from gradients alone and
        noisier than with ``curvature="none"``; for comparisons only.
    :param base_optimizer: a :class:`pyro.optim.PyroOptim` for every other
        parameter. Default ``pyro.optim.Adam({"lr": 0.01})``.
    :param str curvature: where the precision target comes from. ``"hessian"``:
        the model's Hessian at the guide's draw (Price's theorem; exact for
        linear-Gaussian models; ``D`` backward passes per step; the model is the one
        ``SVI`` runs, e.g. ``poutine.scale(model, s)``, and in a loop of your own the
        guide's ``model``); for mean-field
        guides the mean then takes a Newton step with the full Hessian, since the
        mean-field natural gradient alone is a Jacobi iteration that needs
        ``O(condition number)`` steps. ``"none"``: the ELBO gradient only (a rank-two
        estimate per draw). ``"auto"`` (default): ``"hessian"`` for an
        ``AutoContinuous`` or ``AutoNormal`` guide, or an ``AutoGuideList`` of
        ``AutoNormal``, ``AutoDiagonalNormal`` and ``AutoMultivariateNormal`` parts
        and ``AutoDelta`` parts (the Hessian at their point values; not over
        subsampled plates), with at most
        :data:`~pyro_natgrad.optim.MAX_CURVATURE_DIM` latent dimensions
        (:data:`~pyro_natgrad.optim.MAX_FULL_RANK_CURVATURE_DIM` for an
        ``AutoMultivariateNormal``, whose gradient-only steps need ``O(D)``
        steps or more; above 256 it warns once about the cost; for a subsampled
        ``AutoNormal``: this step's globals and subsample, whose variances then move
        towards the diagonal of the Hessian over them), else ``"none"``. ``"ggn"``: as
        ``"hessian"`` but the likelihood's curvature is its generalized Gauss-Newton
        matrix ``E[J^T F_R J]`` (:mod:`pyro_natgrad.ggn`), positive semi-definite for
        any likelihood with a closed-form Fisher; equal to the Hessian for GLMs
        (canonical links, such as logistic, Poisson-log and Gaussian, with a predictor
        linear in the latents). ``"hvp"``: for mean-field guides
        (``AutoNormal``, ``AutoDiagonalNormal``) of any size, the mean takes a Newton
        step ``-grad^2 f(mu)^{-1} dl/dmu`` at the guide's mean, solved by conjugate
        gradients from Hessian-vector products (at most ``HVP_MAX_PRODUCTS + 1`` = 51 per
        solve, each about two backward passes through the model, whatever ``D``; one
        solve per step, up to ``TRUST_REGION_SOLVES + 1`` where the trust region cuts
        the step; no ``D x D`` matrix), and the variances step from the gradients as with
        ``"none"``. For a correlated posterior too large for ``"hessian"``; a step whose
        Hessian is not negative definite along the solve (a non-log-concave model away
        from its mode) falls back to the steps of ``"none"``. Its Newton steps can diverge
        where the log posterior is nearly linear in the tails (docs/optimizer.rst, "Mean-field
        guides"). Never chosen by ``"auto"``.
    """

    def __init__(self, guide, step_size=None, max_kl: Optional[float] = 10.0,
                 control_variate: bool = True, base_optimizer: Optional[PyroOptim] = None,
                 curvature: str = "auto"):
        if curvature not in ("auto", "hessian", "ggn", "hvp", "none"):
            raise ValueError(f"curvature must be 'auto', 'hessian', 'ggn', 'hvp' or 'none', "
                             f"got {curvature!r}")
        if not control_variate and curvature not in ("auto", "none"):
            raise ValueError(f"curvature={curvature!r} reads the guide's recorded draws, "
                             f"which control_variate=False turns off; keep control_variate="
                             f"True, or pass curvature='none'")
        if not callable(guide):
            raise TypeError(f"NaturalGradient expects the guide, got {type(guide).__name__}")
        if curvature in ("hessian", "ggn") and not _takes_curvature(guide):
            # Only autoguides know the model whose Hessian the step takes and provide
            # every latent it is conditioned on.
            raise ValueError(f"curvature={curvature!r} needs an AutoNormal, AutoDiagonalNormal, "
                             f"AutoMultivariateNormal or AutoLowRankMultivariateNormal guide, "
                             f"or an AutoGuideList of AutoNormal, AutoDiagonalNormal and "
                             f"AutoMultivariateNormal parts (and AutoDelta parts), not "
                             f"{_guide_description(guide)}, "
                             f"whose steps use no model curvature; use curvature='auto' or "
                             f"'none'")
        if max_kl is not None and not (isinstance(max_kl, (int, float)) and not isinstance(
                max_kl, bool) and 0 < max_kl < math.inf):
            raise ValueError(f"max_kl must be None or a positive finite number, got {max_kl!r}")
        if not isinstance(control_variate, bool):
            raise TypeError(f"control_variate must be True or False, got {control_variate!r}")
        if isinstance(step_size, (int, float)) and not isinstance(step_size, bool):
            step_size = StepSize(initial=float(step_size), decay=0.0)
        elif step_size is not None and not callable(step_size):
            raise TypeError(f"step_size must be a StepSize, a float in (0, 1] or None, got "
                            f"{step_size!r}")
        self.guide = guide
        self.step_size = step_size or StepSize()
        self.max_kl = max_kl
        self.control_variate = control_variate
        self.curvature = curvature
        self._curvature = None  # ModelCurvature when the model's Hessian is used
        self._curvature_refused: Optional[str] = None  # why the model's Hessian is unusable
        self.base_optimizer = base_optimizer or pyro.optim.Adam({"lr": 0.01})
        if not isinstance(self.base_optimizer, PyroOptim):
            raise TypeError("base_optimizer must be a pyro.optim.PyroOptim, e.g. "
                            "pyro.optim.Adam({'lr': 0.01})")
        self._groups = None
        self._owner: Dict[torch.Tensor, object] = {}
        self._state: Dict[str, Dict] = {}
        self._waiting_state: Dict[str, Dict] = {}
        # (layout, state, base state, base shapes) of a checkpoint to check
        self._waiting_layout = None
        self._recorders = []
        self._skipped = 0
        self._step_params = []  # the parameters of the step under way (see _drop_step)
        self._other_steps = False  # whether this call steps parameters of the base optimizer
        self._skip_sources = set()  # what has warned of a skipped step (see warn_skip)
        self._warned_params = set()
        self._warned_no_draws = False
        self._random_state = None  # torch's random state when the last call ended
        self._checked_svi = None  # the last SVI found to fit this optimizer
        self._warned_gradient_only = False
        self._stall = StallMonitor()
        self._growth = GrowthMonitor(MAX_CURVATURE_DIM)
        self._crawl = CrawlMonitor()
        self._use_curvature = False
        self._minibatch_curvature = False
        self._warned_mixed_arguments = False
        # Hand-written guides: the guide's arguments (to trace it), the names of its
        # parameters and why any of them take base-optimizer steps.
        self._guide_args = None
        self._param_names: Dict[int, tuple] = {}
        self._rejected: Dict[int, str] = {}
        # id -> tensor, held weakly: a replaced param store's tensors are not kept alive
        self._seen_params = weakref.WeakValueDictionary()
        self._attach()
        # PyroOptim's bookkeeping, used by get_state/set_state of the base class API.
        self.optim_objs, self.grad_clip, self._state_waiting_to_be_consumed = {}, {}, {}

    # ---- guide structure ------------------------------------------------------------
    def _attach(self):
        """Hook every guide module so each call records its draws."""
        if not self.control_variate or not isinstance(self.guide, torch.nn.Module):
            return
        modules = list(self.guide) if isinstance(self.guide, AutoGuideList) \
            else [self.guide]
        for m in modules:
            self._recorders.append(DrawRecorder(m, sites=(), owner=self))
        if self.curvature != "none" and _takes_curvature(self.guide):
            self._curvature = ModelCurvature(self.guide)
        elif self.curvature == "auto" and isinstance(self.guide, AutoGuideList):
            others = [type(p).__name__ for p in self.guide
                      if not _gaussian_part(p) and type(p) is not AutoDelta]
            if any(_gaussian_part(p) for p in self.guide):
                # Without the Hessian, an AutoDelta part (before such parts took it) left
                # the Gaussian parts 2.5 mean-field sds off after 1,500 steps, where with
                # AutoNormal in its place they were exact in 20; the parts named here
                # still leave them without it.
                warnings.warn(
                    f"NaturalGradient: this AutoGuideList has parts other than AutoNormal, "
                    f"AutoDiagonalNormal and AutoMultivariateNormal ({', '.join(others)}), "
                    f"so its Gaussian parts step from gradients alone, without the model's "
                    f"curvature, and converge far more slowly. Give every latent an "
                    f"AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal or AutoDelta "
                    f"part, or pass curvature='none' to silence this", NaturalGradientWarning)

    def detach(self):
        """Remove the hooks this optimizer placed on the guide."""
        for r in self._recorders:
            r.remove()
        self._recorders = []
        if self._curvature is not None:
            self._curvature.remove()
            self._curvature = None

    def _callable_parts(self):
        """``[(index, part)]``: the hand-written parts of an ``AutoGuideList`` (Pyro wraps
        each callable it is given in an ``AutoCallable``)."""
        if not isinstance(self.guide, AutoGuideList):
            return []
        return [(i, part) for i, part in enumerate(self.guide) if isinstance(part, AutoCallable)]

    def _handwritten(self) -> bool:
        """Whether reading the guide means running hand-written code with the guide's
        arguments: a hand-written guide, or an ``AutoGuideList`` with hand-written parts."""
        return not isinstance(self.guide, AutoGuide) or bool(self._callable_parts())

    def _discover(self):
        if self._handwritten():
            if self._guide_args is None:
                self._guide_args = find_svi_args(self)
            if self._guide_args is None:
                raise RuntimeError(
                    "NaturalGradient needs the arguments of a hand-written guide to read it; "
                    "inside SVI.step they are found automatically, otherwise call "
                    "optim.read_guide(*args, **kwargs) with the guide's arguments first")
        earlier = (self._groups, self._param_names, self._rejected)
        if not isinstance(self.guide, AutoGuide):
            groups, self._param_names, self._rejected = read_handwritten(
                self.guide, *self._guide_args)
        else:
            groups = read_guide(self.guide) + read_lowrank(self.guide)
            self._param_names, self._rejected = {}, {}
            for name, part in unsupported_parts(self.guide):
                reason = unsupported_reason(name, part)
                self._rejected.update((id(p), reason) for p in part.parameters())
            parts = {}  # id(parameter) -> the hand-written parts that use it
            for i, part in self._callable_parts():
                found, names, rejected = read_handwritten(part._guide, *self._guide_args)
                for g in found:
                    g.key = f"{i}.{g.key}"
                groups += found
                self._param_names.update(names)
                self._rejected.update(rejected)
                for p in names:
                    parts.setdefault(p, []).append(i)
            groups = refuse_shared_across_parts(groups, parts, self._rejected)
        if self._handwritten():
            groups = self._with_earlier_reads(groups, *earlier)
        waiting_base = None
        if self._waiting_layout is not None:
            # Before the groups are committed: a refused checkpoint leaves the optimizer
            # as if it had never been given one, and the next step reads the guide afresh.
            (layout, ng, waiting_base, shapes), self._waiting_layout = \
                self._waiting_layout, None
            try:
                check_layout(layout, group_layout({g.key: g for g in groups}), ng)
                check_base_shapes(shapes)
            except ValueError:
                self._waiting_state = {}
                raise
        self._groups = {g.key: g for g in groups}
        self._owner = {p: g for g in groups for p in g.tensors()}
        sites = [g.site for g in groups]
        scale_params = {g.site: g.params["scale"] for g in groups
                        if isinstance(g, DiagonalGaussianGroup) and g.softplus()}
        for r in self._recorders:
            r.sites = set(sites)
            r.scale_params = scale_params
        if waiting_base is not None:
            replace_base_state(self.base_optimizer, waiting_base)
        for key in list(self._groups) + ["curvature"]:
            if key in self._waiting_state:  # a loaded state wins over the live one
                self._state[key] = self._waiting_state.pop(key)
            else:
                self._state.setdefault(key, {"t": 0})
        lowrank = [g for g in groups if isinstance(g, LowRankGaussianGroup)]
        gaussian = all(isinstance(g, (DiagonalGaussianGroup, FullGaussianGroup)) for g in groups) \
            or (len(groups) == 1 and bool(lowrank))
        if self.curvature == "hvp":
            self._check_hvp(groups)
        self._use_curvature, self._minibatch_curvature = (
            self._curvature_modes(groups) if gaussian else (False, False))
        self._warn_gradient_only(groups)
        if self._use_curvature:
            # The projection step sets the low-rank covariance from the model's Hessian.
            for g in lowrank:
                g.own_covariance()
            self._owner = {p: g for g in groups for p in g.tensors()}
        for g in lowrank:
            if not g.owns_covariance():
                for p in (g.cov_factor, g.scale_raw):
                    self._rejected.setdefault(id(p), COVARIANCE_REASON.format(site=g.key))

    def _with_earlier_reads(self, groups, earlier_groups, earlier_names, earlier_rejected):
        """``groups`` and those of earlier reads that still hold live parameters found
        by no later read. A hand-written guide is read with one step's arguments, and
        its sites may depend on them (parameters created lazily, per group of data):
        what earlier steps' reads found still stands. The same for the parameters'
        names and the reasons for base-optimizer steps."""
        if not earlier_groups and not earlier_names:
            return groups
        live = {id(p) for p in pyro.get_param_store()._params.values()}
        if isinstance(self.guide, torch.nn.Module):
            live.update(id(p) for p in self.guide.parameters())
        found = {id(p) for g in groups for p in g.tensors()} | set(self._param_names)
        keys = {g.key for g in groups}
        kept = [g for g in (earlier_groups or {}).values() if g.key not in keys and all(
            id(p) in live and id(p) not in found for p in g.tensors())]
        for i, entry in earlier_names.items():
            if i in live and i not in found:
                self._param_names[i] = entry
                if i in earlier_rejected:
                    self._rejected[i] = earlier_rejected[i]
        return groups + kept

    def _warn_gradient_only(self, groups):
        """Once, under ``"auto"``: the model's Hessian is computed over more than
        ``MAX_CURVATURE_DIM`` latents (a cost notice), or a full-rank Gaussian too
        large for it is left to steps from gradients alone."""
        if self.curvature != "auto" or self._warned_gradient_only or not groups or not all(
                isinstance(g, (DiagonalGaussianGroup, FullGaussianGroup)) for g in groups):
            return
        dim = sum(g.params["loc"].numel() for g in groups)
        full = [g for g in groups if isinstance(g, FullGaussianGroup)]
        if self._use_curvature and dim > MAX_CURVATURE_DIM:
            self._warned_gradient_only = True
            warnings.warn(
                f"NaturalGradient: each step computes the model's Hessian over {dim} latent "
                f"dimensions ({dim} backward passes through the model): curvature='auto' does "
                f"so for a full-rank guide up to {MAX_FULL_RANK_CURVATURE_DIM} dimensions, "
                f"because its steps from gradients alone need O({dim}) steps or more. Pass "
                f"curvature='hessian' to silence this, or curvature='none' for cheap steps "
                f"that converge slowly", NaturalGradientWarning)
        elif not self._use_curvature and full and dim > _curvature_limit(groups) \
                and self._curvature is not None and self.control_variate:
            self._warned_gradient_only = True
            warnings.warn(
                f"NaturalGradient: the full-rank Gaussian over {dim} latent dimensions takes "
                f"steps from the ELBO's gradient alone (curvature='auto' computes the model's "
                f"Hessian only up to {_curvature_limit(groups)} dimensions: it costs one "
                f"backward pass per dimension and step). Such steps estimate the {dim} x {dim} "
                f"precision from one draw at a time, need O({dim}) steps or more, and a tuned "
                f"Adam can do better on a correlated posterior. Pass curvature='hessian' (or "
                f"'ggn') to use the model's curvature anyway; AutoLowRankMultivariateNormal or "
                f"AutoNormal scale further", NaturalGradientWarning)

    def _check_hvp(self, groups):
        """``curvature="hvp"`` applies to this guide, or a ValueError says why not."""
        why = None
        if not isinstance(self.guide, (AutoNormal, AutoDiagonalNormal)):
            why = f"an AutoNormal or AutoDiagonalNormal guide, not {type(self.guide).__name__}"
        elif not groups or not all(isinstance(g, DiagonalGaussianGroup) for g in groups):
            why = "a guide whose every part is a mean-field Gaussian"
        elif _subsampled_latents(self.guide):
            why = "latents without subsampled plates (for minibatch SVI use 'auto' or 'none')"
        if why is not None:
            raise ValueError(f"curvature='hvp' needs a mean-field guide: {why}. Use "
                             f"curvature='hessian' for full-rank and low-rank guides, or 'none'")

    def _curvature_modes(self, groups):
        """``(joint, minibatch)``: whether steps take the model's Hessian over all the
        latents (:meth:`_step_with_curvature`), or, for an ``AutoNormal`` over a
        subsampled plate, its diagonal over each step's subsample
        (:meth:`_minibatch_targets`, which applies the dimension limit to the step's
        latents, not to the full plate)."""
        if self._curvature is None or not self.control_variate or self._curvature_refused:
            return False, False
        if self.curvature == "hvp":
            return True, False  # checked by _check_hvp
        if _subsampled_latents(self.guide):
            if isinstance(self.guide, AutoGuideList):
                # The minibatch Hessian (_minibatch_targets) reads a single AutoNormal;
                # not written for lists.
                if self.curvature in ("hessian", "ggn"):
                    raise ValueError(f"curvature={self.curvature!r} with subsampled plates "
                                     f"needs a single AutoNormal guide; use curvature='none'")
                return False, False
            if self.curvature == "ggn" or not all(
                    isinstance(g, DiagonalGaussianGroup) for g in groups):
                if self.curvature in ("hessian", "ggn"):
                    raise ValueError(f"curvature={self.curvature!r} with subsampled plates "
                                     f"needs an AutoNormal guide and curvature='hessian'; "
                                     f"use curvature='none'")
                return False, False
            return False, True
        dim = sum(g.params["loc"].numel() for g in groups)
        return not (self.curvature == "auto" and dim > _curvature_limit(groups)), False

    def routing(self) -> Dict[str, str]:
        """Which parameter goes where: ``{parameter name: description}``.

        Names are the guide module's own (``guide.named_parameters()``, e.g.
        ``"locs.w_unconstrained"`` for the param store's ``"AutoNormal.locs.w"``), the
        ``pyro.param`` names of a hand-written guide, and the param store's names of
        the other parameters the optimizer has been given (those of the model), which
        appear once a step has been taken."""
        if self._groups is None:
            self._discover()
        names = self._names()
        out = {}
        for g in self._groups.values():
            for role, p in g.params.items():
                out[names.get(p, f"{g.key}.{role}")] = f"natural gradient ({g.kind}, {g.key})"
        for p, name in names.items():
            if p not in self._owner:
                reason = self._rejected.get(id(p))
                out[name] = f"base optimizer ({optimizer_name(self.base_optimizer)})" + (
                    f": {reason}" if reason else "")
        return out

    def _names(self) -> Dict[torch.Tensor, str]:
        """``{tensor: name}`` as :meth:`routing` and the warnings name parameters."""
        names = {}
        if self._handwritten():
            for p, name in self._param_names.values():
                names[p] = name
        if isinstance(self.guide, torch.nn.Module):
            for name, p in self.guide.named_parameters():
                names.setdefault(p, name)
        store = pyro.get_param_store()
        for p in list(self._seen_params.values()):
            name = store.param_name(p)
            # Not a tensor the store has replaced (a store loaded, or cleared and made
            # again): Pyro keeps naming those, and they would be listed beside their
            # successors as the base optimizer's.
            if p not in names and name is not None and store._params.get(name) is p:
                names[p] = name
        return names

    def read_guide(self, *args, **kwargs) -> Dict[str, str]:
        """Read a hand-written guide by running it once with these arguments (under
        ``poutine.trace`` and ``poutine.block``, the random state restored). ``SVI.step``
        does this itself on its first call (the optimizer finds the step's arguments on
        the call stack), and again when they change while a site holds values that are
        not parameters (a scale passed to the guide, a ``total_count``); call it in a
        custom loop that calls the optimizer directly (again when such values change),
        or to see :meth:`routing` before the first step. Returns :meth:`routing`."""
        self._guide_args = (args, kwargs)
        self._discover()
        return self.routing()

    # ---- the step -------------------------------------------------------------------
    def __call__(self, params, *args, **kwargs):
        self._step_params = list(params)
        try:
            self._call(self._step_params, *args, **kwargs)
        finally:
            self._step_params = []

    def _drop_step(self):
        """Drop this step's gradients (as SVI would after the step) and its draws, where
        the step is refused before anything changed (an unsupported loss, another guide's
        checkpoint, a curvature this model cannot take): else the next step, after the
        user's fix, counts them with its own (a first step twice as long)."""
        for p in self._step_params:
            p.grad = None
        for r in self._recorders:
            r.take()
        drop = getattr(self.base_optimizer, "drop_step", None)
        if callable(drop):  # an AmortisedNaturalGradient's draws
            drop()

    def _call(self, params, *args, **kwargs):
        try:
            self._check_svi()
        except ValueError:
            self._drop_step()
            raise
        refresh = self._groups is None or self._guide_changed(params)
        if not refresh and self._handwritten() and (
                any(id(p) not in self._seen_params for p in params)
                or self._read_with_other_arguments()):
            # New parameter tensors (created late, or a param store loaded), or sites that
            # hold values of the guide's arguments, which changed: read again, with this
            # step's arguments when SVI.step is the caller.
            self._guide_args = find_svi_args(self) or self._guide_args
            refresh = True
        if refresh:
            try:
                self._discover()
            except ValueError:
                # Refused (a checkpoint of another guide, a curvature this guide cannot
                # take): read the guide again at the next step, which a refused curvature
                # then refuses again (the groups were kept, and later steps went on
                # without it, silently).
                self._drop_step()
                self._groups = None
                raise
        self._seen_params.update((id(p), p) for p in params)
        if self._rejected:
            new = [p for p in params if p not in self._owner and p not in self._warned_params]
            if new:
                self._warned_params.update(new)
                listed = describe_rejected(self._rejected, self._names(), new)
                warnings.warn(
                    f"NaturalGradient: {len(new)} parameter(s) take "
                    f"{optimizer_name(self.base_optimizer)} steps: {'; '.join(listed[:8])}"
                    f"{' ...' if len(listed) > 8 else ''}. See NaturalGradient.routing().",
                    NaturalGradientWarning)
        self._warn_fallback(params)
        # Parameters the base optimizer steps may move the guide's optimum (_drift).
        self._other_steps = any(p not in self._owner for p in params)
        check = getattr(self.base_optimizer, "check_step", None)
        if callable(check):
            # An AmortisedNaturalGradient's refusals, before this optimizer writes: the
            # step is refused whole (after them, the groups here had already moved).
            try:
                check()
            except (RuntimeError, ValueError):
                self._drop_step()
                raise
        records, confirmed = self._draws(params)
        seen = set()
        rest = []
        if self._use_curvature and records:
            owned = [p for p in params if p in self._owner]
            if owned and self._with_curvature(
                    lambda r: self._step_with_curvature(r, confirmed), records):
                seen.update(self._groups)
        if not confirmed:
            records = []  # the rest is the control variate, which needs the step's own draw
        curved = set(seen)
        targets = (self._with_curvature(self._minibatch_targets, records) or {}) \
            if self._minibatch_curvature else {}
        for p in params:
            group = self._owner.get(p)
            if group is None:
                rest.append(p)
            elif isinstance(group, LowRankGaussianGroup) and group.key not in curved and any(
                    p is t for t in group.covariance_tensors()):
                # A low-rank covariance in a step without the model's Hessian (no
                # draws recorded): only the projection step can move it naturally.
                rest.append(p)
            elif group.key not in seen:
                seen.add(group.key)
                self._step_group(group, records, targets.get(group.key))
        rest, self._skipped = skip_non_finite(rest, self.base_optimizer, self._skipped,
                                              warned=self._skip_sources)
        if rest:
            self.base_optimizer(rest, *args, **kwargs)
        if self._recorders and self._groups:
            # Where the next step's compiled ELBO (if it is one) starts drawing.
            device = next(iter(self._groups.values())).tensors()[0].device
            self._random_state = TorchRandomState(device)

    def _read_with_other_arguments(self) -> bool:
        """Whether a site was read holding values other than parameters (a fixed argument
        such as a scale passed to the guide, a ``total_count``, the number of broadcast
        copies) from a call with other arguments than this ``SVI.step``'s. Its step would
        use the old values: a scale read as 1 and now 0.01 gave a step 10^4 times too
        long."""
        if not any(getattr(g, "reads_arguments", False) for g in self._groups.values()):
            return False
        found = find_svi_args(self)
        return found is not None and not same_arguments(found, self._guide_args)

    def _check_svi(self):
        """A ValueError, before anything changes, if the ``SVI`` running this step
        optimises a loss that is not the KL ELBO (:data:`UNSUPPORTED_LOSSES`: the steps
        would go to the KL optimum, with the model's curvature, or diverge, without), or
        steps another guide than this optimizer's (whose parameters would all take the
        base optimizer's steps)."""
        svi = find_svi(self)
        if svi is None or svi is self._checked_svi:
            return
        if getattr(svi, "guide", self.guide) is not self.guide:
            raise ValueError(
                f"NaturalGradient: SVI steps the guide {_guide_name(svi.guide)}, but this "
                f"optimizer was built for {_guide_name(self.guide)}: pass SVI's guide, "
                f"SVI(model, guide, NaturalGradient(guide), loss)")
        loss = getattr(getattr(svi, "loss_and_grads", None), "__self__", None)
        names = [c.__name__ for c in type(loss).__mro__]
        bad = next((n for n in names if n in UNSUPPORTED_LOSSES), None)
        if bad is not None:
            raise ValueError(
                f"NaturalGradient: SVI's loss is {type(loss).__name__}"
                f"{'' if bad == names[0] else f' (a {bad})'}, whose gradients weight the "
                f"guide's draws; the natural-gradient steps assume the KL ELBO's "
                f"gradients, and would go to the KL optimum or diverge. Use Trace_ELBO, "
                f"TraceGraph_ELBO, TraceMeanField_ELBO or TraceEnum_ELBO (or their Jit "
                f"versions), or a Pyro optimizer such as pyro.optim.Adam for this loss")
        if loss is None and self._curvature is not None:
            # A callable loss: no way to tell that it is -ELBO. Scaled (ELBO / N), its
            # gradients no longer match the model's Hessian, and the mean stayed 21
            # posterior sds off after 1,000 steps with every sd exact.
            warnings.warn(
                "NaturalGradient: SVI's loss is a callable, not a Pyro ELBO; the steps use "
                "the model's Hessian and assume the loss is exactly -ELBO (a scaled loss, "
                "such as ELBO / N, leaves the mean far from the optimum). Pass an ELBO "
                "object (Trace_ELBO(), ...), or curvature='none'; if the loss is exactly "
                "-ELBO, ignore this warning", NaturalGradientWarning)
        if self._curvature is not None:
            self._curvature.use_model(svi.model)  # the ELBO's model, not the guide's
        self._checked_svi = svi

    def _draws(self, params):
        """``(records, confirmed)``: this step's draws of the guide, and whether they are
        the draws behind its gradients. The hooks record them, except under a
        JIT-compiled ELBO, whose compiled graph runs no hooks (the records of its first
        step are of the tracing runs, which no backward pass reaches). Then the guide is
        replayed (:mod:`pyro_natgrad.replay`) and kept if the gradients confirm the draw.
        Otherwise any draw of the guide still gives the model's curvature (the Hessian at
        a draw of ``q`` estimates ``E_q[grad^2 f]`` without bias), and is returned
        unconfirmed for that alone, unless it was made on another subsample."""
        records = []
        for r in self._recorders:
            records += r.take()
        if not self.control_variate:
            return [], True
        gaussian = (DiagonalGaussianGroup, FullGaussianGroup, LowRankGaussianGroup)
        if not self._recorders or not any(isinstance(self._owner.get(p), gaussian)
                                          for p in params):
            # Only a Gaussian group's step uses the draws (other families' mirror descent
            # does not); a guide whose parameters all take base steps has been warned
            # about that instead.
            return records, True
        flags = [r[DrawRecorder.BACKWARD] for r in records]
        if records and any(f.used or not f.tracked for f in flags):
            return records, True
        found = find_svi_args(self)
        if records and found is None:
            return records, True  # gradients set by hand after a guide call
        groups = list(self._groups.values())
        replayed = []
        if found is not None and self._random_state is not None:
            replayed = replay_guide(self.guide, self._recorders, self._random_state, *found)
            if replayed_records(groups, replayed):
                return replayed, True
        other = [r for r in (records or replayed) if not DrawRecorder.plate_indices(r)]
        if self._random_state is not None and not self._warned_no_draws:
            # Not on the first step: a JIT-compiled ELBO's first step is its tracing run.
            self._warned_no_draws = True
            warnings.warn(
                "NaturalGradient: the draws of the guide behind this step's gradients could "
                "not be recovered (JitTrace_ELBO with random numbers drawn between steps, "
                "several particles or a low-rank guide; or the guide called under no_grad), "
                "so steps run without the control variate"
                + (", with the model's curvature at another draw of the guide," if other
                   else " and without the model's curvature,")
                + " and are noisier: use Trace_ELBO", NaturalGradientWarning)
        return other, False

    def _with_curvature(self, step, records):
        """``step(records)``, or None where the model's Hessian cannot be computed at the
        guide's draws (:class:`~pyro_natgrad.curvature.ModelCurvatureError`, raised
        before anything changed): under ``curvature="auto"`` this and later steps are
        then those of ``"none"``, after one warning; otherwise a ValueError.

        The model's arguments are those of the guide calls that made ``records`` (not of
        a later call, e.g. a validation loss on other data before the step). Records of
        calls with different arguments (gradients accumulated over several batches) give
        this step from gradients alone, after one warning: the model's Hessian at a draw
        is of one call's data."""
        calls = [r[DrawRecorder.ARGUMENTS] for r in records if DrawRecorder.ARGUMENTS in r]
        if calls:
            if not all(same_arguments(calls[0], c) for c in calls[1:]):
                if not self._warned_mixed_arguments:
                    self._warned_mixed_arguments = True
                    warnings.warn(
                        "NaturalGradient: this step's gradients come from guide calls with "
                        "different arguments (e.g. accumulated over several batches before "
                        "one step), and the model's Hessian is that of one call's; such steps "
                        "are taken from gradients alone. Step after each batch to keep the "
                        "model's curvature", NaturalGradientWarning)
                return None
            self._curvature.args, self._curvature.kwargs = calls[0]
        try:
            return step(records)
        except ModelCurvatureError as e:
            if self.curvature != "auto":
                self._drop_step()  # raised before anything changed
                raise ValueError(f"NaturalGradient(curvature={self.curvature!r}): {e}") from e
            self._curvature_refused = e.reason
            self._use_curvature = self._minibatch_curvature = False
            # A low-rank covariance owned for the projection step goes back to the base
            # optimizer, and routing() must say so.
            self._discover()
            warnings.warn(f"NaturalGradient: {e.reason}. Steps are taken from gradients "
                          f"alone, as with curvature='none', and converge more slowly; pass "
                          f"curvature='none' to silence this", NaturalGradientWarning)
            return None

    def _guide_changed(self, params) -> bool:
        """Whether the guide's parameter tensors were replaced (e.g. by loading a
        param store), so the groups must be read again."""
        if not isinstance(self.guide, torch.nn.Module):
            return False
        unknown = [p for p in params if p not in self._owner]
        if not unknown:
            return False
        mine = {id(q) for q in self.guide.parameters()}
        return any(id(p) in mine for p in unknown)

    def _warn_fallback(self, params):
        """Warn once about parameters that take base-optimizer steps."""
        new = [p for p in params if p not in self._owner and p not in self._warned_params]
        if not new:
            return
        self._warned_params.update(new)
        known = self._names()
        names = [known.get(p) or label for p, label in zip(new, param_labels(new))]
        warnings.warn(f"NaturalGradient: {len(new)} parameter(s) feed no supported guide site "
                      f"and take {optimizer_name(self.base_optimizer)} steps: {names[:8]}"
                      f"{' ...' if len(names) > 8 else ''}. That is expected for model "
                      f"parameters; see NaturalGradient.routing().", NaturalGradientWarning)

    def _minibatch_targets(self, records) -> Dict[str, torch.Tensor]:
        """:func:`~pyro_natgrad.minibatch.minibatch_targets` for this step, with the
        dimension limit under ``curvature="auto"``."""
        limit = MAX_CURVATURE_DIM if self.curvature == "auto" else None
        return minibatch_targets(self._curvature, self._groups.values(), records, limit)

    def _step_group(self, group, records, target=None):
        grads = group.grads()
        if any(g is None for g in grads.values()):
            return  # a part of the guide unused in this step
        if isinstance(group, DiagonalGaussianGroup) and target is None and \
                not self._per_element(group, records):
            # The fused step checks its outputs before writing them, which also rejects
            # non-finite gradients (they make the outputs non-finite): no separate
            # pass over the gradients. If it declines, the checks below decide.
            with torch.no_grad():
                if self._step_diagonal_fused(group, grads, records, self._state[group.key]):
                    return
        if not all_finite(grads.values()):
            self._skipped += 1
            warn_skip(f"non-finite gradient for {group.key}: step skipped", self._skipped,
                      self._unchanged(), group.key, self._skip_sources)
            return
        state = self._state[group.key]
        with torch.no_grad():
            if isinstance(group, DiagonalGaussianGroup):
                self._step_diagonal(group, grads, records, state, target)
            elif isinstance(group, FullGaussianGroup):
                self._step_full(group, grads, records, state)
            elif hasattr(group, "natural_step"):
                # Hand-written guide sites and AutoLowRankMultivariateNormal.
                rho = self.step_size(state["t"])
                if isinstance(group, LowRankGaussianGroup):
                    used = group.natural_step(grads, rho, self.max_kl, records)
                else:
                    used = group.natural_step(grads, rho, self.max_kl)
                if used is None:
                    self._skipped += 1
                    warn_skip(f"singular Fisher or an overflow for {group.key}: step skipped",
                              self._skipped, "the parameters are unchanged", group.key,
                              self._skip_sources)
                else:
                    state["t"] += float(fraction_taken(used, rho).mean())

    def _step_diagonal(self, group, grads, records, state, target=None, mean=None, rho=None):
        """The natural-gradient step of a mean-field group (``target``: a precision
        target from the model's Hessian). ``mean``, with ``rho`` the scheduled step
        size: the new ``loc`` from :meth:`_step_hvp`, whose clock counts the step; the
        variances step as usual, and the whitened precision gradient ``S`` of the step
        is returned for that clock."""
        loc = group.params["loc"]
        raw = group.params["scale"]
        per_element = self._per_element(group, records)
        scale, dscale = group.scale()
        g_loc, g_scale = grads["loc"], grads["scale"] / dscale
        moments = group.eps_moments(records, loc.detach(), scale) if records else None
        if per_element:
            # Subsampled local latents: only the visited elements have gradients, scaled
            # like the ELBO by full_size / size; the natural step uses the unscaled ones.
            active = (g_loc != 0) | (g_scale != 0)
            visits = moments[2] if moments is not None else None
            if visits is not None:
                active = active | (visits > 0)
            t = state.get("t_elem")
            if not torch.is_tensor(t):
                t = torch.full_like(loc.detach(), float(state["t"]))
            # With several particles each draws its own subsample, and the ELBO averages
            # over all k draws: an element visited by v of them has (v / k) c times the
            # average of its visits' gradients (it was taken as c times, shrinking
            # rarely visited elements' steps k-fold).
            c = plate_scale(self.guide, group, records)
            if visits is not None:
                share = visits / group.draw_count(records)
                c = c * torch.where(visits > 0, share, torch.ones_like(share))
            g_loc, g_scale = g_loc / c, g_scale / c
            rho = self.step_size(t)
        else:
            active = None
            rho = self.step_size(state["t"]) if rho is None else rho
        if target is not None:
            # A Hessian entry of a non-log-concave model can be negative: keep the
            # current precision there.
            target = torch.where(target > 0, target, scale.square().reciprocal())
        cv = 1.0
        if target is None and moments is not None:
            seen = moments[2] > 0  # with a subsample, only its elements
            if int(seen.sum()) >= CV_MIN_ELEMENTS:
                cv = leave_one_out_median_cv(scale * g_scale, moments[1], seen)
        step = diagonal_gaussian_step(loc.detach(), scale, g_loc, g_scale, rho,
                                      moments[:2] if moments is not None else None, self.max_kl,
                                      precision_target=target, cv=cv)
        new_raw = group.transforms["scale"].inv(step.scale_tril)
        new_loc = step.loc if mean is None else mean
        if active is not None:  # only the visited elements move
            new_loc = torch.where(active, new_loc, loc)
            new_raw = torch.where(active, new_raw, raw)
        # The one finiteness check of what is written (an overflow), so plain copies below.
        if not all_finite([new_loc, new_raw]):
            if mean is None:
                self._skip_overflow(group.key)
            return None  # nothing written (with mean: the caller undoes its other groups)
        loc.data.copy_(new_loc)
        raw.data.copy_(new_raw)
        taken = fraction_taken(step.rho, rho)
        if active is None:
            if mean is not None:
                S = scale * g_scale
                return S - cv * (moments[1] - 1) if moments is not None else S
            if target is None:
                # the whitened mean gradient's sample, as the fused step computes it
                w = scale * g_loc - (cv * moments[0] if moments is not None else 0)
                sums = _agreement(state, w)
                self._advance_clock(state, float(taken.mean()), *sums)
                self._growth.note(group.key, *sums, sample=_sample_size(w.numel()))
                self._crawl.note(group, state)
            else:
                state["t"] += float(taken.mean())
        else:
            state["t_elem"] = t + active.to(t.dtype) * taken
            state["t"] += 1

    def _per_element(self, group, records) -> bool:
        """Whether the group keeps per-element step counts: only for plates that are
        subsampled (or were); an unsubsampled plate steps every element every time, like
        an event dimension."""
        return bool(group.plates) and (torch.is_tensor(self._state[group.key].get("t_elem"))
                                       or subsampled(self.guide, group, records))

    def _step_diagonal_fused(self, group, grads, records, state) -> bool:
        """The step of :meth:`_step_diagonal` for the common case (softplus scale, a trust
        region, one draw or none, no subsampling) by :func:`softplus_diagonal_step`,
        without temporaries of full size. False (nothing changed) where it does not apply."""
        loc, raw = group.params["loc"], group.params["scale"]
        g_loc, g_raw = grads["loc"], grads["scale"]
        if self.max_kl is None or not group.softplus() or loc.dtype not in (
                torch.float32, torch.float64) or loc.shape != raw.shape:
            return False
        draw = scale = None
        if records:
            found = [r for r in records if group.site in r]
            if len(found) != 1 or found[0][group.site][0].shape != loc.shape:
                return False
            draw = found[0][group.site][0].reshape(-1)
            # The guide's own scale at this draw, valid while raw has not changed since.
            scale, version = found[0].get(DrawRecorder.SCALES, {}).get(group.site, (None, -1))
            if scale is not None and (version != raw._version or scale.shape != loc.shape
                                      or not scale.is_contiguous()):
                scale = None
        tensors = (loc, raw, g_loc, g_raw)
        if any(t.shape != loc.shape or t.dtype != loc.dtype or t.device != loc.device
               or not t.is_contiguous() for t in tensors) or any(
                t is not None and (t.dtype != loc.dtype or t.device != loc.device)
                for t in (draw, scale)):
            return False
        n = loc.numel()
        if n == 0:
            return False
        if scale is None:
            # The guide's own function, not the kernel's log1p(exp(raw)), which rounds
            # differently: a step must not depend on whether the guide's scale was
            # recorded (it is not before the groups are read, e.g. at the first step of
            # a resumed run, which then differed from the uninterrupted one).
            scale = group.transforms["scale"](raw.detach())
        flat = [t.detach().reshape(-1) for t in tensors]
        new_loc, new_raw, coefficients, *work = group.work(
            (n, n, n) + (min(n, chunk_size(loc)),) * 6, loc.dtype, loc.device)
        rho = float(self.step_size(state["t"]))
        previous = _previous_gradient(state, len(range(0, n, hold_stride(n))), loc)
        wide = previous.to(torch.float64)  # its square may overflow the dtype
        before = wide @ wide
        # The kernel writes this step's sample over its argument: a copy, kept only if the
        # step is. (In place, a declined step left the general route comparing this step's
        # gradient with itself, which held the clock for good, or a skipped one NaN.)
        sample = previous.clone()
        cv = 1.0
        if draw is not None and n >= CV_MIN_ELEMENTS:
            # leave_one_out_median_cv, without full-size temporaries
            index = cv_sample_index(n, loc.device)
            s = scale.reshape(-1)[index]
            a = s * flat[3][index] / torch.sigmoid(flat[1][index])
            e2 = ((draw[index] - flat[0][index]) / s).square()
            keep = e2 > 0
            cv = sampled_median_cv(n, index[keep], a[keep], e2[keep], flat[0], coefficients)
        sums = softplus_diagonal_step(
            flat[0], flat[1], flat[2], flat[3], draw, rho, self.max_kl, new_loc, new_raw, work,
            scale=scale.reshape(-1), cv=cv, previous=sample)
        taken, check, agreement, norm2, before = torch.stack(
            [t.to(torch.float64) for t in (*sums, before)]).tolist()
        if not (math.isfinite(taken) and math.isfinite(check)):
            return False  # e.g. an overflow or an underflowed scale: the general route decides
        with torch.no_grad():
            loc.view(-1).copy_(new_loc)
            raw.view(-1).copy_(new_raw)
            previous.copy_(sample)
        self._advance_clock(state, min(1.0, max(0.0, taken / (n * max(rho, 1e-300)))),
                            agreement, norm2, before)
        self._growth.note(group.key, agreement, norm2, before, sample=_sample_size(n))
        self._crawl.note(group, state)
        return True

    def _hold_or_advance(self, state, used, rho, change, drift=None):
        """After a step with the model's Hessian: advance the clock by the fraction of
        ``rho`` taken (``used``), unless the variances' changes ``change`` (the whitened
        precision target less 1, ``S``) agree with the last step's and are not small, or
        the mean's whitened Newton direction ``drift`` (given where the optimum moves
        with other parameters: :data:`HOLD_MIN_DRIFT`) does.

        As for the hvp step: while the variances approach from afar (from an init_scale
        1e4 times too small they grow 1.5-fold a step) ``S`` keeps its sign, and a
        decaying step would stall them; the clock holds. Below an rms of
        :data:`HOLD_MIN_CHANGE` the variances are close to their targets: what remains
        is noise (in the mean's steps too), which the decay is there to average."""
        if float(change.square().mean()) < HOLD_MIN_CHANGE ** 2:
            change = torch.zeros_like(change)
        drifting = False
        if drift is not None:
            if float(drift.square().mean()) < HOLD_MIN_DRIFT ** 2:
                drift = torch.zeros_like(drift)
            drifting = _agrees(*_agreement(state, drift, "drift"))
        taken = float(fraction_taken(used, rho).mean())
        self._stall.note(taken)
        self._advance_clock(state, taken, *_agreement(state, change), held=drifting)

    def _unchanged(self) -> str:
        """The end of a skipped step's warning. Without a trust region the cause may be
        this optimizer's own last step: on a regression with data in units of 1e4, the
        first step with ``max_kl=None`` put a noise scale's unconstrained value at 3e9,
        and every later gradient was non-finite."""
        if self.max_kl is not None:
            return "the parameters are unchanged"
        return ("the parameters are unchanged. With max_kl=None one step can carry the guide "
                "to where the model's density overflows, after which every gradient is "
                "non-finite: set max_kl (the default is 10)")




    def _advance_clock(self, state, advance, agreement, norm2, before, held=False):
        """Advance a mean-field group's step-size clock by ``advance``, unless (after the
        warm-up) this step's whitened mean gradient ``w`` still agrees with the previous
        one ``w'`` (``agreement = <w, w'>``, ``norm2 = |w|^2``, ``before = |w'|^2``, on the
        sample), ``cos(w, w') > HOLD_COSINE``: the iterates are still making progress,
        which a decaying step would slow (a Jacobi-type mean step on a correlated
        posterior needed thousands of steps), rather than averaging noise, whose
        successive gradients are uncorrelated. With no previous gradient (zeros) it
        advances."""
        held = state["t"] >= getattr(self.step_size, "warmup", 0) and (
            held or _agrees(agreement, norm2, before))
        if not held:
            state["t"] += advance

    def _step_full(self, group, grads, records, state, target=None, correction=None, rho=None):
        loc, raw_tril = group.params["loc"], group.params["scale_tril"]
        d = loc.shape[-1]
        L, G, *work = group.work(((d, d),) * 4, loc.dtype, loc.device)
        s, ds = group.scale()
        if group.unit_tril():
            U = raw_tril.detach()  # below the diagonal
            torch.mul(U, s.unsqueeze(-1), out=L).tril_(-1)
            L.diagonal().copy_(s)
        else:
            U = group.factors()[2]
            torch.mul(U, s.unsqueeze(-1), out=L)
        # L = diag(s) U: dl/dL_ij = (dl/dU_ij) / s_i below the diagonal, and
        # dl/ds_i = sum_j dl/dL_ij U_ij gives the diagonal.
        torch.div(grads["scale_tril"], s.unsqueeze(-1), out=G).tril_(-1)
        rowdot = torch.mul(G, L, out=work[0]).sum(-1).div_(s)  # sum_j G_ij U_ij
        G.diagonal().copy_(grads["scale"] / ds - rowdot)
        eps = group.eps_draws(records, loc.detach(), L) if records else None
        moments = (eps.mean(0), None) if eps is not None else None
        count = rho is None
        if count:
            rho = self.step_size(state["t"])
        try:
            step = full_step(loc.detach(), L, grads["loc"], G, rho, moments, eps, self.max_kl,
                             precision_target=target, loc_correction=correction, work=work)
        except StepError as e:
            self._skipped += 1
            warn_skip(f"{e}: step of {group.key} skipped", self._skipped,
                      "the parameters are unchanged. If this repeats, set max_kl (a trust "
                      "region) or lower it", group.key, self._skip_sources)
            return loc.new_zeros(())
        if not self._write_full(group, step.loc, step.scale_tril):
            self._skip_overflow(group.key)
            return loc.new_zeros(())
        if count:
            state["t"] += float(fraction_taken(step.rho, rho).mean())
        return step.rho

    def _skip_overflow(self, key):
        """Count and announce a step of group ``key`` skipped because its arithmetic
        overflowed (a gradient finite but near the largest float: its products with the
        guide's factor are not), before anything was written."""
        self._skipped += 1
        warn_skip(f"the step of {key} overflowed (a gradient near the largest "
                  f"floating-point number): step skipped", self._skipped,
                  "the parameters are unchanged. If this repeats, look for the overflow "
                  "in the model (float64, or a smaller init_scale, may avoid it)", key,
                  self._skip_sources)

    @staticmethod
    def _write_full(group, new_loc, L_new) -> bool:
        """Write ``loc`` and the factor ``L = diag(s) U`` of a full-rank group (``L_new``
        is overwritten); False, with nothing written, where they are not finite (an
        overflow: one check, in the pass that unpacks them)."""
        s_new = L_new.diagonal().clone()
        U_new = L_new.div_(s_new.unsqueeze(-1)).tril_(-1)
        new_scale = group.transforms["scale"].inv(s_new)
        if not all_finite([new_loc, new_scale, U_new]):
            return False
        group.params["loc"].data.copy_(new_loc)
        group.params["scale"].data.copy_(new_scale)
        group.params["scale_tril"].data.triu_().add_(U_new)  # the upper triangle is unused
        return True

    def _step_with_curvature(self, records, confirmed=True) -> bool:
        """One step of every group of the guide, with the model's Hessian as the
        precision target. Returns False (and changes nothing) when the draws or
        gradients do not allow it, so the caller takes gradient-only steps. Draws that
        are not ``confirmed`` as the gradients' own give the Hessian but no control
        variate."""
        groups = list(self._groups.values())
        grads = [g.grads() for g in groups]
        if any(v is None for gr in grads for v in gr.values()):
            return False
        records = self._joint_records(groups, records)
        if not all(bool(torch.isfinite(v).all()) for gr in grads for v in gr.values()):
            self._skipped += 1
            warn_skip("non-finite gradient: step skipped", self._skipped,
                      self._unchanged(), "curvature", self._skip_sources)
            return True
        curv = self._curvature
        draws, plates = [], []
        for record in records:
            if not all(g.site in record for g in groups):
                return False
            flat = []
            for g in groups:
                # Vectorised particles: leading dims per site (a scalar global's draw is
                # (k, 1) beside a local plate's (k, n): its own lead, not the first site's)
                x = record[g.site][0]
                lead = x.dim() - g.params["loc"].dim()
                if lead < 0:
                    return False
                flat.append(x.reshape(x.shape[:lead].numel(), -1))
            if len({x.shape[0] for x in flat}) != 1:
                return False
            draws.append(torch.cat(flat, -1))
            # The model's plates take the subsample this draw was made with, as in the ELBO.
            plates += [DrawRecorder.plate_indices(record)] * draws[-1].shape[0]
        draws = torch.cat(draws)
        state = self._state["curvature"]
        rho = self.step_size(state["t"])
        if self.curvature == "hvp":
            with torch.no_grad():
                return self._step_hvp(groups, grads, records, draws, rho, state, confirmed)
        with torch.no_grad():
            locs = torch.cat([g.params["loc"].detach().reshape(-1) for g in groups])
            if self.curvature == "ggn":
                target = torch.stack([curv.ggn_precision(z) for z in draws]).mean(0)
            else:
                target = -torch.stack([curv.hessian(z, subsample=s)
                                       for z, s in zip(draws, plates)]).mean(0)
            # The control variate must not depend on the draw: the current precision
            # (E[Lambda (z - mu)] = 0), not the draw's own Hessian (E[H(z)(z - mu)] != 0).
            offset = (draws - locs).mean(0) if confirmed else torch.zeros_like(locs)
            if not bool(torch.isfinite(target).all()):
                return False
            if isinstance(groups[0], LowRankGaussianGroup):
                used, change = self._step_lowrank_newton(groups[0], grads[0], target, offset,
                                                         rho, state)
                if used is None:
                    return False  # not finite (an overflow): gradient-only steps instead
                # The clock holds while the running precision still moves far, as for
                # the other guides (from init_scale 1e-5 the decay left it 2-13 times
                # the Hessian, 0.56 nats off after 60 steps; 1e-12 with the hold).
                self._hold_or_advance(state, used, rho, change,
                                      self._drift(groups, locs, used))
                return True
            elif len(groups) > 1 and any(isinstance(g, FullGaussianGroup) for g in groups):
                used, change = self._step_blocks_newton(groups, grads, target, offset, rho,
                                                        state)
                if used is None:
                    return False  # not finite (an overflow): gradient-only steps instead
                # Held as for one guide: from init_scale 1e-5 on the diabetes regression
                # the decay left a list of two full-rank parts' precisions 8e-2 off after
                # 100 steps (one guide: 2e-11; with the hold 8e-10).
                self._hold_or_advance(state, used, rho, change,
                                      self._drift(groups, locs, used))
                return True
            elif isinstance(groups[0], FullGaussianGroup):
                s_, _, U = groups[0].factors()
                L = s_.unsqueeze(-1) * U
                correction = torch.cholesky_solve(offset.unsqueeze(-1), L).squeeze(-1)
                step_rho = rho
                if self.max_kl is not None:
                    # As for the mean-field running precision: the step's precision
                    # may at most halve, so its Newton move (the gradient times the
                    # new covariance) cannot outgrow the curvature it has seen. In a
                    # funnel's neck (slope ~1, curvature ~0) the move doubled each step.
                    step_rho = _halving_limit(None, target, rho, cov_factor=L)
                # The whitened precision's change diag(L^T T L) - 1, the full-rank S.
                change = ((target @ L) * L).sum(-2) - 1
                used = self._step_full(groups[0], grads[0], [], state, target, correction,
                                       step_rho)
                self._hold_or_advance(state, used, rho, change,
                                      self._drift(groups, locs, used))
                return True
            else:
                P = self._state["curvature"].get("precision")
                if P is None:
                    scale = torch.cat([g.scale()[0].reshape(-1) for g in groups])
                    correction = offset / scale.square()
                else:  # the running full precision: a better, still draw-independent, variate
                    correction = P @ offset
                used, change = self._step_diagonal_newton(groups, grads, target, correction,
                                                          rho, state)
                if used is None:
                    return False  # not finite (an overflow): gradient-only steps instead
                self._hold_or_advance(state, used, rho, change,
                                      self._drift(groups, locs, used))
                return True

    def _drift(self, groups, locs, used) -> Optional[torch.Tensor]:
        """The mean's whitened Newton direction in the step just taken,
        ``(mu' - mu) / (rho sd')``, ``(D,)`` (``sd'`` the new marginal sds), for the hold
        test of :data:`HOLD_MIN_DRIFT`; None where no parameter takes base-optimizer
        steps in this call (the optimum stands still) or none of ``rho`` was taken."""
        if not self._other_steps:
            return None
        taken = float(torch.as_tensor(used, dtype=torch.float64).mean())
        if not taken > 0:
            return None
        sds = []
        for g in groups:
            if isinstance(g, FullGaussianGroup):
                s_, _, U = g.factors()
                sds.append((s_.unsqueeze(-1) * U).norm(dim=-1))
            elif isinstance(g, LowRankGaussianGroup):
                C, s_ = g.factors()  # Sigma_ii = s_i^2 (1 + |C_i|^2)
                sds.append(s_ * (1 + C.square().sum(-1)).sqrt())
            else:
                sds.append(g.scale()[0].reshape(-1))
        new = torch.cat([g.params["loc"].detach().reshape(-1) for g in groups])
        return (new - locs) / (taken * torch.cat(sds))

    def _joint_records(self, groups, records):
        """Each guide call's draws of every group in one record. An ``AutoGuideList``'s
        parts record theirs separately (a recorder each), in the order of the calls: the
        ``j``-th record of every part, merged (no records if the parts' counts differ, so
        that the step falls back to gradients alone)."""
        if not isinstance(self.guide, AutoGuideList):
            return records
        parts = [{g.site for g in groups if g.key.split(".", 1)[0] == str(i)}
                 for i in range(len(self.guide))]
        per_part = [[r for r in records if any(site in r for site in sites)]
                    for sites in parts if sites]
        if len({len(rs) for rs in per_part}) != 1:
            return []
        # Site values and subsample indices (string keys); a part's own bookkeeping
        # (the tuple keys) stays with the part's record.
        return [{k: v for r in rs for k, v in r.items() if isinstance(k, str)}
                for rs in zip(*per_part)]

    def _step_hvp(self, groups, grads, records, draws, rho, state, confirmed=True) -> bool:
        """Mean-field groups under ``curvature="hvp"``: the Newton step for the mean of
        :meth:`_step_diagonal_newton` without its ``(D, D)`` matrices.

        The running precision ``P`` there averages the Hessians of past steps into the
        guide's first precision ``P_0``; here it is ``P' = (1 - W') P_0 + W' A`` with
        ``A = -grad^2 f(mu)`` at the current mean, applied by Hessian-vector products,
        and ``W' = (1 - rho) W + rho`` the weight the average would give its Hessians
        (the same ``P'`` when the Hessian is constant, as for a linear-Gaussian model).
        Not the current ``Sigma^{-1}`` in place of ``P_0``: near ``diag(A)`` it would
        make the early, short steps Jacobi steps, which stall on a correlated posterior.
        ``mu' = mu - rho d``, ``d = P'^{-1} dl/dmu - (mean(z) - mu)`` by conjugate
        gradients (the second term is the control variate ``P' (z - mu)``, of mean
        zero since ``P'`` does not depend on the draw), with ``rho`` cut by the trust
        region as there. The variances take the gradient-only step. False (nothing
        changed) where ``P'`` is not positive definite along the solve (``A`` indefinite
        and weighted enough), or the solve is not finite."""
        loc = torch.cat([g.params["loc"].detach().reshape(-1) for g in groups])
        scale = torch.cat([g.scale()[0].reshape(-1) for g in groups])
        g_loc = torch.cat([gr["loc"].reshape(-1) for gr in grads])
        offset = (draws - loc).mean(0) if confirmed else torch.zeros_like(loc)
        if not confirmed:
            records = []  # the variances' step uses the draws for its control variate
        hessian_product = self._curvature.precision_operator(loc)
        variance = scale.square()
        weight = float(state.get("hessian_weight", 0.0))
        first = state.get("first_precision")
        if not (torch.is_tensor(first) and first.shape == loc.shape):
            first = variance.reciprocal()

        def newton(r):
            w = (1 - r) * weight + r

            def product(v):
                return (1 - w) * first * v + w * hessian_product(v)

            # The guide's precision stands in for diag(A): equal at the mean-field optimum.
            inverse_diagonal = ((1 - w) * first + w / variance).reciprocal()
            x, info = conjugate_gradient(product, g_loc, precond=lambda v: v * inverse_diagonal,
                                         tol=HVP_TOLERANCE, max_iter=HVP_MAX_PRODUCTS,
                                         raise_on_fail=False, return_info=True,
                                         check_residual=False)
            ok = not info.negative_curvature and bool(torch.isfinite(x).all())
            return w, product, x - offset, ok

        rho_mean = rho
        w, product, direction, ok = newton(rho)
        if ok and self.max_kl is not None:
            # As in _running_newton: each cut re-solves, at a longer direction (the first
            # step of a Poisson regression moved 8e4, 3e9 nats, when cut once).
            # max_kl per latent, as for the gradient-only mean-field steps (whose limit is
            # per element): a joint 10 nats held 2,000 independent latents 400 posterior
            # sds from their means to 266 sds after 400 steps (exact after 50 with
            # max_kl=None), and the clock, which counts the mean's step, stopped with it.
            bound = self._latent_kl(loc.numel())

            def excess_at(r):
                nonlocal w, product, direction, ok
                if r != rho_mean:  # the first call measures the solve already made
                    w, product, direction, ok = newton(r)
                if not ok:
                    return math.nan
                quad = min(float((direction / scale).square().sum()),
                           float(direction @ product(direction)))
                return r * math.sqrt(0.5 * max(quad, 0.0) / bound)

            excess = excess_at(rho_mean)
            if excess > 1:
                rho_mean = _cut_to_bound(rho_mean, excess, excess_at)
        if not ok:
            return False
        new_loc = loc - rho_mean * direction
        if not all_finite([new_loc]):
            return False  # an overflow: the steps of "none" (which skip it) instead
        # The groups' steps are one step: if one overflows, those already written are
        # undone, and the steps of "none" (which skip it) are taken instead.
        saved = [(g.params["loc"].detach().clone(), g.params["scale"].detach().clone())
                 for g in groups]
        pos, S = 0, []
        for g, gr in zip(groups, grads):
            n = g.params["loc"].numel()
            out = self._step_diagonal(
                g, gr, records, self._state[g.key], rho=rho,
                mean=new_loc[pos:pos + n].reshape(g.params["loc"].shape))
            if out is None:
                for h, (old_loc, old_raw) in zip(groups, saved):
                    h.params["loc"].data.copy_(old_loc)
                    h.params["scale"].data.copy_(old_raw)
                return False
            S.append(out.reshape(-1))
            pos += n
        state["hessian_weight"] = w
        state["first_precision"] = first
        # The mean is exact after a few steps here; what the decay would slow is the
        # variances' approach from afar (e.g. 40-fold), during which S keeps its sign
        # from step to step, as the whitened mean gradient does for gradient-only steps.
        taken = float(fraction_taken(rho_mean, rho))
        self._stall.note(taken)
        self._advance_clock(state, taken, *_agreement(state, torch.cat(S)))
        return True

    def _step_diagonal_newton(self, groups, grads, target, correction, rho, state):
        """Mean-field variances move towards ``diag(target)``; the mean steps with a
        running average ``P`` of the full ``target`` as in the full-rank case (see the
        ``curvature`` option), ``P' = (1 - rho) P + rho target``, ``mu' = mu - rho P'^{-1} g``.
        Returns the step size taken and the variances' whitened change
        ``S = scale^2 diag(target) - 1``, shape ``(D,)``."""
        loc = torch.cat([g.params["loc"].detach().reshape(-1) for g in groups])
        scales, dscales = zip(*(g.scale() for g in groups))
        scale = torch.cat([s.reshape(-1) for s in scales])
        g_loc = torch.cat([gr["loc"].reshape(-1) for gr in grads]) - correction
        g_scale = torch.cat([(gr["scale"] / ds).reshape(-1) for gr, ds in zip(grads, dscales)])
        P0 = state.get("precision")
        if P0 is None:
            P0 = torch.diag(scale.square().reciprocal())
        S = scale.square() * target.diagonal() - 1
        P, direction, rho = self._running_newton(
            P0, target, g_loc, rho, fallback=scale.square() * g_loc,
            guide_quad=lambda v: (v / scale).square().sum(), precision_change=S,
            max_kl=self._latent_kl(loc.numel()))
        step = diagonal_gaussian_step(loc, scale, g_loc, g_scale, rho, None, None,
                                      precision_target=target.diagonal(), loc_step=direction,
                                      floor=self.max_kl is not None)
        new, pos = [], 0
        for g in groups:
            n = g.params["loc"].numel()
            shape = g.params["loc"].shape
            new.append((step.loc[pos:pos + n].reshape(shape), g.transforms["scale"].inv(
                step.scale_tril[pos:pos + n].reshape(shape))))
            pos += n
        if not all_finite([t for pair in new for t in pair]):
            return None, None  # an overflow (a huge float32 gradient): nothing changed
        state["precision"] = P
        for g, (new_loc, new_raw) in zip(groups, new):
            self._write(g.params["loc"], new_loc)
            self._write(g.params["scale"], new_raw)
        return torch.as_tensor(rho), S

    def _step_blocks_newton(self, groups, grads, target, offset, rho, state):
        """The groups of an ``AutoGuideList`` with full-rank parts: a block-diagonal
        Gaussian. The mean steps as in :meth:`_step_diagonal_newton`, with the running
        precision ``P`` of the whole ``target``; each block's precision moves towards
        its own block of it, ``Sigma_b'^{-1} = (1 - rho) Sigma_b^{-1} + rho T_bb``, the
        natural-gradient step of a block-diagonal Gaussian (mean-field blocks: the
        diagonal of ``T_bb``). ``offset``: the mean of the draws less the mean. Returns
        ``(step size taken, whitened precision change S)``, or ``(None, None)`` (nothing
        changed) where the step is not finite."""
        blocks, pos = [], 0
        for g in groups:
            n = g.params["loc"].numel()
            if isinstance(g, FullGaussianGroup):
                s_, _, U = g.factors()
                blocks.append((slice(pos, pos + n), s_.unsqueeze(-1) * U, None))
            else:
                blocks.append((slice(pos, pos + n), None, g.scale()[0].reshape(-1)))
            pos += n
        loc = torch.cat([g.params["loc"].detach().reshape(-1) for g in groups])
        g_loc = torch.cat([gr["loc"].reshape(-1) for gr in grads])
        P0 = state.get("precision")
        if P0 is None:
            P0 = torch.block_diag(*[torch.cholesky_inverse(L) if L is not None
                                    else torch.diag(s.square().reciprocal())
                                    for _, L, s in blocks])
        # The draw-independent control variate, as for the other Newton steps.
        g_loc = g_loc - P0 @ offset
        changes, diagonals = [], []
        for sl, L, s in blocks:
            T = target[sl, sl]
            if L is not None:
                X = L.mT @ T @ L
                X.diagonal().sub_(1)
            else:
                X = s.square() * T.diagonal() - 1
            changes.append(X.reshape(-1))
            # The hold test reads the diagonal, as for one full-rank guide: a block's
            # off-diagonal entries (near 0) diluted the rms, and ended the hold early.
            diagonals.append(X.diagonal() if X.dim() == 2 else X)

        def guide_quad(v):
            total = v.new_zeros(())
            for sl, L, s in blocks:
                if L is not None:
                    w = torch.linalg.solve_triangular(L, v[sl].unsqueeze(-1), upper=False)
                    total = total + w.square().sum()
                else:
                    total = total + (v[sl] / s).square().sum()
            return total

        fallback = torch.cat([L @ (L.mT @ g_loc[sl]) if L is not None else s.square() * g_loc[sl]
                              for sl, L, s in blocks])
        P, direction, rho = self._running_newton(P0, target, g_loc, rho, fallback, guide_quad,
                                                 torch.cat(changes))
        new_loc = loc - rho * direction
        covariances = []  # every block's before any is written: a failure changes nothing
        for sl, L, s in blocks:
            T = target[sl, sl]
            if L is not None:
                # With the trust region (the mean's gradient 0: it measures the
                # covariance's move alone) no variance more than doubles, as for the
                # mean-field blocks' floor; a block's step may then be the shorter.
                cov = full_step(loc[sl], L, torch.zeros_like(loc[sl]), torch.zeros_like(L),
                                rho, max_kl=self.max_kl, precision_target=T).scale_tril
            else:
                cov = diagonal_gaussian_step(
                    loc[sl], s, g_loc[sl], torch.zeros_like(s), rho, None, None,
                    precision_target=T.diagonal(), loc_step=direction[sl],
                    floor=self.max_kl is not None).scale_tril
            covariances.append(cov)
        if not all_finite([new_loc, *covariances]):
            return None, None
        state["precision"] = P
        for g, (sl, L, _), cov in zip(groups, blocks, covariances):
            if L is not None:
                if not self._write_full(g, new_loc[sl], cov):
                    # Checked finite above; a scale that underflows to 0 could still fail.
                    raise FloatingPointError("a natural-gradient step produced non-finite "
                                             "values; this is a bug, please report it")
            else:
                shape = g.params["loc"].shape
                self._write(g.params["loc"], new_loc[sl].reshape(shape))
                self._write(g.params["scale"], g.transforms["scale"].inv(cov.reshape(shape)))
        return torch.as_tensor(rho), torch.cat(diagonals)

    def _latent_kl(self, dim: int) -> Optional[float]:
        """The trust region of a mean-field Newton step over ``dim`` latents: ``max_kl``
        per latent, as for the gradient-only mean-field steps (per element). The KL from
        a guide's start to a posterior of ``D`` informative latents grows like ``D``: one
        ``max_kl`` for the whole step held a correlated linear regression of ``D = 200``
        latents 4.9e4 nats off after 10 steps, where per latent it is exact. Full-rank,
        block and low-rank steps keep one ``max_kl``: per latent, a full-rank guide on a
        Poisson regression (``examples/poisson_regression.py``, 10 latents) met Hessians
        of far draws in its longer early steps and was 83 SEs off after 100 steps (0.04
        with one ``max_kl``)."""
        return None if self.max_kl is None else self.max_kl * dim

    def _running_newton(self, P0, target, g, rho, fallback, guide_quad, precision_change,
                        whitened_change=None, max_kl=None):
        """``(P', direction, rho)``: the running precision ``P' = (1 - rho) P0 + rho target``
        and the Newton direction ``P'^{-1} g``, with ``rho`` cut by the trust region.

        :param fallback: the direction where ``P'`` is not positive definite (the
            guide's own natural gradient); ``P0`` is then kept.
        :param guide_quad: ``v -> v^T Sigma^{-1} v`` in the guide's own metric.
        :param precision_change: the whitened change of precision ``X`` (any shape: its
            diagonal, for a mean-field guide), whose KL is ``|X|_F^2 / 4`` per unit step.
        :param whitened_change: ``X = R^{-1} (target - P0) R^{-T}`` (``P0 = R R^T``) if the
            caller has it, for :func:`_halving_limit`.
        :param max_kl: the whole step's trust region in place of ``self.max_kl`` (read
            only where ``self.max_kl`` is set: None there turns the trust region off).
        """
        def newton(r):
            P = (1 - r) * P0 + r * target
            chol, info = torch.linalg.cholesky_ex(P)
            if info != 0:
                # An indefinite Hessian (non-log-concave model): keep the last positive
                # definite average and take the guide's own natural step instead.
                return P0, fallback
            return P, torch.cholesky_solve(g.unsqueeze(-1), chol).squeeze(-1)

        def root_kl(P, direction):
            # One trust region for the whole step, so the Newton direction is not
            # distorted elementwise: KL ~ rho^2 (|d|^2 / 2 + |X|^2 / 4). The mean's
            # distance |d| is the smaller of two: in sds of q, and in sds of the
            # Gaussian with precision P. Either alone stalls: q's metric along a strongly
            # correlated posterior under a mean-field guide (kilpisjarvi, correlation
            # -0.99999, where mean-field sds are 1/200 of the marginal ones), P's when
            # the posterior is far narrower than q and its mean thousands of sds away.
            quad = torch.minimum(guide_quad(direction), direction @ (P @ direction))
            size = 0.5 * quad + 0.25 * precision_change.square().sum()
            if bool(torch.isfinite(size)):
                return float(size.clamp_min(0).sqrt())
            # A huge but finite float32 gradient: the squares overflow (to inf, or NaN
            # where a quadratic form subtracts) and made the allowed step 0. sqrt(size)
            # from norms instead (the quadratic forms of the direction scaled to a
            # largest element of 1).
            top = direction.abs().amax().clamp_min(torch.finfo(direction.dtype).tiny)
            unit = direction / top
            quad = torch.minimum(guide_quad(unit), unit @ (P @ unit))
            return float(torch.hypot(top * quad.clamp_min(0).sqrt() / math.sqrt(2),
                                     0.5 * norm(precision_change)))

        if self.max_kl is not None:
            rho = _halving_limit(P0, target, rho, whitened_change)
        P, direction = newton(rho)
        if self.max_kl is None:
            return P, direction, rho
        bound = math.sqrt(max_kl if max_kl is not None else self.max_kl)
        excess = rho * root_kl(P, direction) / bound
        if not excess > 1:
            return P, direction, rho

        def excess_at(r):
            nonlocal P, direction
            P, direction = newton(r)
            return r * root_kl(P, direction) / bound

        # A shorter step weights P0 more, whose Newton direction is longer (much longer
        # where the Hessian is far larger than P0): the cut must be found anew at each
        # direction. Cut once, a Poisson regression's mean moved 731 (2e6 nats against
        # max_kl 10) and every later loss was NaN.
        rho = _cut_to_bound(rho, excess, excess_at)  # P and direction: its last solve's
        return P, direction, rho

    def _step_lowrank_newton(self, group, grads, target, offset, rho, state):
        """The step of :mod:`pyro_natgrad.lowrank` with the model's Hessian: the running
        precision ``P' = (1 - rho) P + rho target`` and ``mu' = mu - rho P'^{-1} g`` as for
        mean-field guides, then the covariance := :func:`project_lowrank` of ``P'``.
        Returns ``(rho used, diag(X))`` (``X`` the whitened change of the running
        precision, for the clock's hold), or ``(None, None)`` where nothing changed."""
        loc = group.params["loc"].detach()
        C, s = group.factors()
        W = C * s.unsqueeze(-1)
        Sigma = W @ W.mT + torch.diag(s.square())
        # Positive definite in exact arithmetic (s > 0), but in float32 a factor 1e4 times
        # the scales (a guide loaded from an Adam run) rounds the diagonal away.
        chol, info = torch.linalg.cholesky_ex(Sigma)
        if info != 0:
            return None, None
        P0 = state.get("precision")
        if P0 is None:
            P0 = torch.cholesky_inverse(chol)
        g = grads["loc"] - P0 @ offset  # the draw-independent control variate
        # The trust region measures the move of the running precision in its own metric,
        # X = R^{-1} (target - P0) R^{-T} with P0 = R R^T: the guide's covariance is only
        # P0's projection, and in the guide's metric the part of P0 that no low-rank
        # covariance represents would count against every step.
        R, info = torch.linalg.cholesky_ex(P0)
        if info != 0:
            return None, None
        X = torch.linalg.solve_triangular(R, target - P0, upper=False)
        X = torch.linalg.solve_triangular(R, X.mT, upper=False)

        def guide_quad(v):
            w = torch.linalg.solve_triangular(chol, v.unsqueeze(-1), upper=False)
            return w.square().sum()

        P, direction, rho = self._running_newton(P0, target, g, rho, fallback=Sigma @ g,
                                                 guide_quad=guide_quad,
                                                 precision_change=X,
                                                 whitened_change=X)
        C_new, s_new = project_lowrank(P, C.shape[-1], scale=s)
        new_loc = loc - rho * direction
        if not all_finite([new_loc, C_new, s_new]):
            return None, None  # an overflow: nothing changed
        self._write(group.params["loc"], new_loc)
        group.write_covariance(C_new, s_new)
        state["precision"] = P
        return torch.as_tensor(rho), X.diagonal()

    @staticmethod
    def _write(param, value):
        if not all_finite([value]):
            raise FloatingPointError("a natural-gradient step produced non-finite values; "
                                     "this is a bug, please report it")
        param.data.copy_(value)

    # ---- state ----------------------------------------------------------------------
    def get_state(self) -> Dict:
        """Everything a resumed run needs to continue bit for bit on CPU: per group the
        step clock and what the step carries between steps (running precisions, the
        curvature's weights, per-element clocks of subsampled latents, the hold test's
        previous sample), the base optimizer's state (and its parameters' shapes), and the
        count of skipped steps. A checkpoint set but not yet used (before the first step
        after :meth:`set_state`) is part of it. The parameters themselves live in the
        param store: save it too (``pyro.get_param_store().save``).

        :raises ValueError: if a parameter that takes base-optimizer steps has no name in
            the param store (a ``PyroModule``'s own parameter under
            ``pyro.settings.set(module_local_params=True)``): its state could not be
            restored to it, and Pyro keys every such state ``None``."""
        refuse_unnamed_state(self.base_optimizer)
        merged = {**self._state, **self._waiting_state}  # a waiting state wins, as it will
        state = {k: {kk: (vv.clone() if torch.is_tensor(vv) else vv) for kk, vv in v.items()}
                 for k, v in merged.items()}
        if self._waiting_layout is not None:
            layout, _, base, shapes = self._waiting_layout
        else:
            layout = None if self._groups is None else group_layout(self._groups)
            waiting = getattr(self.base_optimizer, "_state_waiting_to_be_consumed", {})
            base = {**waiting, **self.base_optimizer.get_state()}
            shapes = named_shapes(self.base_optimizer)
        # A copy, not the base optimizer's live tensors, which later steps change in place.
        out = {"natural_gradient": state, "base": copy.deepcopy(base),
               "base_shapes": dict(shapes), "skipped": self._skipped}
        if layout is not None:
            out["layout"] = layout
        return out

    def set_state(self, state: Dict) -> None:
        """Restore :meth:`get_state`'s result, in place of the current state (copied:
        ``state`` is not changed by later steps). Groups not yet read (before the first
        step) receive theirs when they are; groups the checkpoint has no state for start
        afresh, as they had at its time.

        :raises ValueError: if the checkpoint is of another guide (its groups' parameter
            shapes differ, it has groups this guide lacks, or its base optimizer's state is
            for parameters of other shapes): here, or, if the guide has not been read yet,
            at the first step, before any of the checkpoint is used; at once, with the
            state unchanged, if ``state`` is not such a checkpoint at all (e.g. a Pyro
            optimizer's ``get_state()``, which wiped the step-size clocks)."""
        check_format(state)
        ng = state.get("natural_gradient", {})
        layout = state.get("layout")
        shapes = state.get("base_shapes", {})
        if layout is not None and self._groups is not None:
            check_layout(layout, group_layout(self._groups), ng)
        check_base_shapes(shapes)
        live, waiting = {}, {}
        for key, value in ng.items():
            # Copies: steps change some of these tensors in place (the hold test's
            # sample), and the caller's checkpoint must stay as it was.
            value = {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v))
                     for k, v in value.items()}
            if self._groups is not None and (key in self._groups or key == "curvature"):
                live[key] = value
            else:
                waiting[key] = value
        if self._groups is not None:
            for key in list(self._groups) + ["curvature"]:
                live.setdefault(key, {"t": 0})
        # torch's load_state_dict keeps the given moments' tensors and steps them in place
        base = copy.deepcopy(state.get("base", {}))
        if layout is not None and self._groups is None:
            # Checked when the guide is read, before the base optimizer makes its optimizers.
            self._waiting_layout = (layout, ng, base, shapes)
        else:
            # First: a base optimizer that refuses its share (an AmortisedNaturalGradient
            # given an Adam's state) then leaves this one's state as it was.
            replace_base_state(self.base_optimizer, base)
            self._waiting_layout = None
        self._state, self._waiting_state = live, waiting
        self._skipped = state.get("skipped", 0)

    def save(self, filename: str) -> None:
        """``torch.save`` of :meth:`get_state`."""
        torch.save(self.get_state(), filename)

    def load(self, filename: str, map_location=None) -> None:
        """:meth:`set_state` from a file written by :meth:`save`."""
        self.set_state(torch.load(filename, map_location=map_location, weights_only=False))


def _cut_to_bound(rho: float, excess: float, excess_at) -> float:
    """The step size ``r < rho`` at which a Newton step's root KL meets the trust region,
    ``excess_at(r) = 1``, given ``excess = excess_at(rho) > 1``. ``excess_at`` solves
    anew at ``r``: a shorter step weights the first precision more, whose direction is
    longer, so ``log excess`` rises with ``log r`` at a slope in ``(0, 1]`` (1 where the
    direction does not change). A secant search in those coordinates, from the cut that
    slope 1 gives, to a relative 1e-9 or :data:`TRUST_REGION_SOLVES` solves; a last point
    above the bound is scaled onto it with its direction kept (no solve), so the step
    that is taken, at the direction of the last solve, is within the bound. The caller's
    state is that of the last solve.

    A trial whose root KL overflows (``inf``: a float32 quadratic form of a longer
    direction) is beyond any bound: the search backs off by a factor
    ``exp(TRUST_REGION_BACKOFF)`` and goes on from there with a fresh secant. Before, it
    returned that trial's step size unchecked. If the solves run out on such a trial,
    the longest step found within the bound is taken (0 if none was)."""
    x, g = math.log(rho), math.log(excess)
    previous = None
    within = -math.inf  # log of the longest step size found within the bound
    overflowed = False
    for _ in range(TRUST_REGION_SOLVES):
        slope = 1.0
        if previous is not None and x != previous[0]:
            slope = min(max((g - previous[1]) / (x - previous[0]), 0.05), 1.0)
        previous = None if overflowed else (x, g)
        x = x - g / slope
        e = excess_at(math.exp(x))
        overflowed = e == math.inf
        if overflowed:
            g = TRUST_REGION_BACKOFF
            continue
        if not (e > 0 and math.isfinite(e)):
            return math.exp(x)  # a zero step, or NaN (the caller's checks)
        g = math.log(e)
        if g <= 0:
            within = max(within, x)
        if abs(g) < 1e-9:
            break
    if overflowed:
        return math.exp(within)
    return math.exp(x - max(g, 0.0))


def _halving_limit(P0, target, rho: float, whitened_change=None, cov_factor=None) -> float:
    """The largest step ``r <= rho`` with ``(1 - r) P0 + r target >= P0 / 2``: the Gaussian
    of the running precision at most doubles its variance in any direction per step, as
    a guide's own step does under a trust region. Without this, single-draw Hessians from
    the tails of a model whose curvature vanishes there (a Bernoulli likelihood on the
    logit scale) made ``P`` ever flatter and the Newton steps ``P^{-1} g`` ever longer:
    the mean of a one-dimensional ``AutoNormal`` ran to hundreds of sds into the tails.
    A full-rank guide's step with model curvature takes the same limit on its own
    precision (eight schools' funnel neck: see ``docs/examples/hierarchical.rst``).
    ``P0`` is ``(D, D)`` positive definite, ``target`` symmetric; ``whitened_change``,
    if given, is ``R^{-1} (target - P0) R^{-T}`` with ``P0 = R R^T``. Or, with ``P0``
    None, ``cov_factor`` is ``L`` with ``P0 = (L L^T)^{-1}`` (so ``R^{-1} = L^T``), and
    that change is formed only if the first test below does not settle it."""
    if rho <= 0.5 and bool(torch.linalg.cholesky_ex(target)[1] == 0):
        return rho  # (1 - r) P0 + r target >= (1 - r) P0 >= P0 / 2
    X = whitened_change
    if X is None and cov_factor is not None:
        X = cov_factor.mT @ target @ cov_factor
        X.diagonal().sub_(1)
    elif X is None:
        R = torch.linalg.cholesky(P0)
        X = torch.linalg.solve_triangular(R, target - P0, upper=False)
        X = torch.linalg.solve_triangular(R, X.mT, upper=False)
    # (1 - r) P0 + r target - P0 / 2 = R (I / 2 + r X) R^T
    lowest = float(torch.linalg.eigvalsh(0.5 * (X + X.mT))[0])
    return rho if lowest >= -0.5 else min(rho, 0.5 / -lowest)


def _guide_name(guide) -> str:
    return f"{type(guide).__name__} at {id(guide):#x}" if isinstance(guide, torch.nn.Module) \
        else repr(guide)


def _agrees(agreement, norm2, before) -> bool:
    """``cos(v, v') > HOLD_COSINE`` from ``(<v, v'>, |v|^2, |v'|^2)`` (False for zeros or
    an overflow)."""
    return (math.isfinite(agreement) and math.isfinite(norm2 * before)
            and agreement > HOLD_COSINE * math.sqrt(max(norm2 * before, 0.0)))
