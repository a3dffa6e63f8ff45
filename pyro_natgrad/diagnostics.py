"""What :class:`~pyro_natgrad.NaturalGradient` tells its user about a run: skipped
steps (non-finite gradients never reach the param store) and three monitors of a fit's
health, each warning once: a trust region that keeps cutting Newton steps to nothing
(:class:`StallMonitor`), gradient-only mean-field steps that oscillate and grow
(:class:`GrowthMonitor`), and means that keep moving one way (:class:`CrawlMonitor`).
"""

import math
import warnings
from typing import Dict, List

import pyro
import torch

from .gaussian import hold_stride


class NaturalGradientWarning(UserWarning):
    """A natural-gradient step was skipped or a parameter fell back to the base optimizer."""


#: Steps with the model's curvature that the trust region cuts to less than
#: ``STALL_FRACTION`` of their scheduled size warn once when, at the pace at which the
#: fraction grew over the last ``STALL_STEPS`` of them, full steps are more than
#: ``STALL_HORIZON`` steps away: the guide is far from the posterior in units of the
#: model's curvature where the guide is, and the fit crawls (see
#: :class:`StallMonitor`).
STALL_FRACTION = 1e-3
STALL_STEPS = 20
STALL_HORIZON = 300
_TINY_FRACTION = 1e-300  # a step cut to 0 counts as this (its log is finite)

#: A mean-field group stepping from gradients alone warns once when the running average
#: of ``log |w|^2`` (``w``: its whitened mean gradient on the hold test's sample, of at
#: least ``GROWTH_MIN_SAMPLE`` elements; weight ``GROWTH_AVERAGE`` for the newest step)
#: has risen ``DIVERGENCE_GROWTH``-fold above its lowest while the running average of
#: ``cos(w, w')`` between successive steps is below ``-GROWTH_COSINE``: the steps
#: oscillate and grow (see :class:`GrowthMonitor`).
GROWTH_AVERAGE = 0.1
DIVERGENCE_GROWTH = 200.0
GROWTH_COSINE = 0.5
GROWTH_MIN_SAMPLE = 32

#: A mean-field group stepping from gradients alone warns once that it crawls when, over
#: each of ``CRAWL_WINDOWS`` windows of ``CRAWL_WINDOW`` steps in a row, its means moved
#: more than ``CRAWL_MOVE`` of the guide's sds along the way they moved over the window
#: before, or more than ``CRAWL_CREEP`` over each of ``CRAWL_CREEP_WINDOWS`` (noise alone
#: moved them 0.1 sd or less in converged fits; a converging linear regression's slowest
#: tail moved 1.1, 0.45, 0.25, then 0.11 sd; see :class:`CrawlMonitor`).
CRAWL_WINDOW = 100
CRAWL_WINDOWS = 3
CRAWL_MOVE = 0.5
CRAWL_CREEP = 0.2
CRAWL_CREEP_WINDOWS = 5


class StallMonitor:
    """Warns once when Newton steps crawl under the trust region (see :meth:`note`)."""

    def __init__(self):
        # log of the fractions taken by the latest steps in a row cut below STALL_FRACTION
        self.run: List[float] = []
        self.warned = False

    def note(self, taken: float) -> None:
        """Warn once when the trust region has cut more than ``STALL_STEPS`` Newton steps
        in a row to less than ``STALL_FRACTION`` of their size (``taken``: the fraction of
        this one) and, at the geometric rate at which the fraction grew over the last
        ``STALL_STEPS`` of them, would cut for more than ``STALL_HORIZON`` steps yet.

        Far from the posterior the model's curvature can be many orders of magnitude
        above its value there, and the guide's variances follow it: a mean many of those
        sds away then moves a tiny fraction of the way per step, while the variances
        widen as it goes. With a noise scale started at 1 (``AutoNormal``'s default)
        against data in units of 1e4, the fraction grew from 2e-9 to 1e-3 over 300
        steps and full steps came after about 1,100; started at the prior's median, 50
        steps reach the posterior. The pace matters, not the fraction alone: a linear
        regression's full-rank guide (posteriordb's blr, sigma fixed) was cut below
        1e-3 for its first 43 steps, the fraction growing 2- to 10-fold every 10 steps,
        and was exact at step 55. An earlier rule (ten steps in a row below 1e-3) said
        that it had stalled."""
        if not taken < STALL_FRACTION:
            self.run.clear()
            return
        self.run.append(math.log(max(taken, _TINY_FRACTION)))
        del self.run[:-(STALL_STEPS + 1)]
        if len(self.run) <= STALL_STEPS or self.warned:
            return
        growth = (self.run[-1] - self.run[0]) / STALL_STEPS  # log per step
        away = -self.run[-1] / growth if growth > 0 else math.inf
        if away <= STALL_HORIZON:
            return
        self.warned = True
        pace = ("has not grown" if growth <= 0 else
                f"grew {math.exp(growth * STALL_STEPS):.3g}-fold, at which pace full steps are "
                f"about {away:.0f} steps away")
        warnings.warn(
            f"NaturalGradient: the trust region (max_kl) has cut the last {STALL_STEPS} steps "
            f"to less than {STALL_FRACTION:g} of their size (the last to "
            f"{math.exp(self.run[-1]):.2g}), and over them the fraction {pace}: the "
            f"fit is crawling. The guide is far from the posterior in units of the model's "
            f"curvature where the guide is, e.g. AutoNormal starts every latent at its "
            f"unconstrained 0 (a noise scale of 1 against data in units of 1e4), or a log "
            f"link meets a covariate in large units. Start the guide nearer the posterior "
            f"(init_loc_fn=init_to_median or init_to_mean) or standardise the data",
            NaturalGradientWarning)


class GrowthMonitor:
    """Warns once when a gradient-only mean-field group's steps diverge (see :meth:`note`).

    :param int curvature_dim: the latent dimension up to which ``curvature="auto"`` takes
        the model's Hessian, for the warning's advice."""

    def __init__(self, curvature_dim: int):
        # per group: (running mean of log |w|^2, its lowest, running mean of cos(w, w'))
        self.records: Dict[str, tuple] = {}
        self.curvature_dim = curvature_dim
        self.warned = False

    def note(self, key: str, agreement: float, norm2: float, before: float,
             sample: int) -> None:
        """Warn once when a gradient-only mean-field group's steps diverge: over a sample
        of ``sample`` elements (at least ``GROWTH_MIN_SAMPLE``) the running average of
        ``log |w|^2`` (``norm2``) has risen ``DIVERGENCE_GROWTH``-fold above its lowest
        while successive ``w`` point opposite ways (the running average of
        ``cos(w, w') = agreement / sqrt(norm2 before)`` below ``-GROWTH_COSINE``).

        A Jacobi-type step, which these are, multiplies the mean's error along an
        eigenvector of the whitened posterior precision with eigenvalue ``lam`` by
        ``1 - rho lam``; where the latents share a factor, ``lam`` is about ``D`` times
        their correlation, and while ``rho lam > 2`` that error flips sign and grows
        until the decay of ``rho`` stops it. On logistic regressions of 260 covariates
        sharing one factor (correlation 0.1 to 0.64, two seeds each) the fits were 1e5
        to 4e5 nats away after 100 steps, over which the rise while turning reached
        4,600- to 23,000-fold; this warns at step 26 to 55. Each condition alone warned
        falsely: a rise alone on a scalar site (the log of a single squared gradient near
        0 dips far), where a hierarchical model's curvature grows under a wide guide,
        and on posteriordb's radon model (``AutoNormal``'s 85 county effects rose
        4e5-fold, never turning); the sign alone where the gradient's noise lies along
        the shared factor, so that successive gradients point opposite ways half the
        time at any step size.

        ``DIVERGENCE_GROWTH`` (measured at a49fb5a, with the median control-variate
        coefficient): among converging runs the largest rise while turning was 28-fold
        (a centred hierarchy of 1,000 groups, ``AutoDiagonalNormal``, group scale 0.1,
        over 8 seeds; a non-centred one of 500 groups: 11-fold). Correlated logistic
        regressions of 300 and 400 weights, and the radon models, the only references
        with a group of 32 latents or more, under ``curvature="none"``, never turned.
        Diverging runs rose 4,600-fold or more within 100 steps (the regressions above;
        1.1e4 to 6e6 on the 200 covariates of
        ``test_diverging_steps_from_gradients_alone_warn`` over 12 seeds). The former
        threshold, 1,000, warned 8 to 24 steps later, with the means further away, and
        once (under the mean coefficient of the time) missed a run that rose 291-fold."""
        if self.warned or sample < GROWTH_MIN_SAMPLE or not (
                math.isfinite(agreement) and math.isfinite(norm2 * before) and norm2 > 0):
            return
        value = math.log(norm2)
        cosine = agreement / math.sqrt(norm2 * before) if before > 0 else 0.0
        average, lowest, turning = self.records.get(key, (value, value, 0.0))
        average += GROWTH_AVERAGE * (value - average)
        turning += GROWTH_AVERAGE * (cosine - turning)
        lowest = min(lowest, average)
        self.records[key] = (average, lowest, turning)
        if average - lowest <= math.log(DIVERGENCE_GROWTH) or turning >= -GROWTH_COSINE:
            return
        self.warned = True
        warnings.warn(
            f"NaturalGradient: the steps of {key!r} from gradients alone are diverging: the "
            f"running average of log |g|^2 (g: the ELBO's gradient in the means, times the "
            f"guide's scales) has risen {math.exp(average - lowest):.3g}-fold above its "
            f"lowest. Such a step is too long along a direction in which the posterior's "
            f"latents are strongly correlated (e.g. covariates that share a factor), and "
            f"only the step size's decay brings it back, after many steps and far from the "
            f"posterior. Pass curvature='hessian' (the default up to {self.curvature_dim} "
            f"latents; one backward pass per latent and step)",
            NaturalGradientWarning)


class CrawlMonitor:
    """Warns once when a gradient-only mean-field group's means keep moving one way (see
    :meth:`note`)."""

    def __init__(self):
        self.warned = False

    def note(self, group, state) -> None:
        """Warn once when a gradient-only mean-field group's means keep moving one way:
        every ``CRAWL_WINDOW`` of its steps, ``d`` is their move over the window in units
        of the guide's sds (on the hold test's sample), and ``<d, d'> / |d'|`` its move
        along the previous window's ``d'``; more than ``CRAWL_MOVE`` over
        ``CRAWL_WINDOWS`` windows in a row, or more than ``CRAWL_CREEP`` over
        ``CRAWL_CREEP_WINDOWS``, warns. The record lives in ``state`` (``crawl_*``).

        Measured along one direction, the noise of such a move does not grow with the
        group's size: in converged fits it stayed within 0.1 sd. A non-centred hierarchy
        of 500 groups (``benchmarks/noncentred_hierarchy.py``) moved ``mu`` 1.7, 1.2 and
        0.7 sds one way over steps 200 to 500, a Jacobi-type step on a posterior whose
        latents share a direction, slowed further by the decay of a step size then
        below 0.01: ``mu`` was 2.30 after 1,000 steps and 2.37 after 3,000 (posterior
        mean 2.927). Holding the step at 0.3 while the moves went on brought it to 2.82
        after 1,000 steps, but under minibatch noise (a logistic regression of 300
        weights, 100 of 10,000 rows a step) the same hold, set off at step 500, left
        the weights 6.6 posterior sds (rms) from the full-data optimum after 2,000
        steps, against 1.6 without it: the rule finds slow progress, not whether a
        longer step is safe, so it only warns."""
        steps = state.get("crawl_steps", 0) + 1
        state["crawl_steps"] = steps
        if steps % CRAWL_WINDOW or self.warned:
            return
        loc, raw = (group.params[k].detach().reshape(-1) for k in ("loc", "scale"))
        stride = hold_stride(loc.numel())
        here = loc[::stride].to(torch.float64, copy=True)  # not a view of the param
        scale = group.transforms["scale"](raw[::stride]).to(torch.float64)
        before, state["crawl_loc"] = state.get("crawl_loc"), here
        if not (torch.is_tensor(before) and before.shape == here.shape):
            return
        move, previous = (here - before) / scale, state.get("crawl_move")
        state["crawl_move"] = move
        if not (torch.is_tensor(previous) and previous.shape == move.shape):
            return
        along = float(move @ previous) / max(float(previous.norm()), 1e-300)
        if not math.isfinite(along):
            along = 0.0
        run = state.get("crawl_run", 0) + 1 if along > CRAWL_MOVE else 0
        creep = state.get("crawl_creep", 0) + 1 if along > CRAWL_CREEP else 0
        state["crawl_run"], state["crawl_creep"] = run, creep
        if run < CRAWL_WINDOWS and creep < CRAWL_CREEP_WINDOWS:
            return
        self.warned = True
        warnings.warn(
            f"NaturalGradient: over the last {max(run, creep) * CRAWL_WINDOW} steps of "
            f"{group.key!r} (to its step {steps}) its means have moved steadily one way, "
            f"{along:.2g} of the guide's sds over the last {CRAWL_WINDOW}: the fit has not "
            f"converged, and steps from gradients alone may take thousands more. They are "
            f"slow along a direction in which the posterior's latents are strongly "
            f"correlated (e.g. a non-centred hierarchy's shared mean and its group "
            f"effects), and the step size's decay slows them further. Run until the means "
            f"stop moving, or pass curvature='hvp' (Newton steps of the means by conjugate "
            f"gradients, costlier per step) or try Adam, and check the fit from another "
            f"start",
            NaturalGradientWarning)


def optimizer_name(optim) -> str:
    """``"Adam"`` for ``pyro.optim.Adam(...)`` (a PyroOptim wrapping torch's Adam)."""
    return (getattr(optim, "pt_optim_constructor", None) or type(optim)).__name__


def skip_non_finite(params, optimizer, skipped: int, prefix: str = "", warned=None):
    """``(finite, skipped)``: the parameters whose gradients are finite (or None), and the
    count of skipped steps, one more (with a warning naming the others) if any gradient
    is not finite: no optimizer may step those, it would write them into the param
    store (and its moments). ``warned``: as in :func:`warn_skip`."""
    finite, bad = [], []
    for p in params:
        (finite if p.grad is None or all_finite([p.grad]) else bad).append(p)
    if bad:
        skipped += 1
        warn_skip(f"{prefix}non-finite gradient for {len(bad)} parameter(s) of "
                  f"{optimizer_name(optimizer)}: {', '.join(param_labels(bad)[:8])}; "
                  f"their step skipped", skipped, "they are unchanged", "base", warned)
    return finite, skipped


def warn_skip(what: str, skipped: int, then: str, source=None, warned=None):
    """Warn ``"{what} ({skipped} skipped so far; ...); {then}"`` at the first skip of each
    ``source`` (a group's key, say; ``warned`` is the set of those warned of, updated) and
    whenever ``skipped`` is a power of two. The count is in the text, so Python's filter
    would repeat the warning at every step of a run whose gradients stay non-finite: this
    names every source once and keeps the count's growth in about log2(steps) warnings."""
    first = warned is not None and source not in warned
    if first:
        warned.add(source)
    if first or skipped & (skipped - 1) == 0:
        warnings.warn(f"{what} ({skipped} skipped so far; further skips warn when the count "
                      f"reaches a power of two); {then}", NaturalGradientWarning)


def param_labels(params):
    """The param store's name of each tensor, or its shape where it has none."""
    store = pyro.get_param_store()
    return [store.param_name(p) or f"<tensor {tuple(p.shape)}>" for p in params]


def all_finite(tensors) -> bool:
    """Whether every element is finite: one sum per tensor (a non-finite element makes
    it non-finite), and an elementwise check only where a sum overflowed."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return True
    sums = torch.stack([t.sum().to(torch.float64) for t in tensors]).tolist()
    return all(math.isfinite(v) or bool(torch.isfinite(t).all()) for v, t in zip(sums, tensors))
