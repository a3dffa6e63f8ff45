"""Helpers shared by the example scripts in this folder (not part of the package).

Each example imports this module as ``_common``: a script run as
``python examples/<name>.py`` has ``examples/`` on ``sys.path``.

* :func:`add_common_args` / :func:`finish_args`: the command-line options every example has.
* :func:`check_output` / :func:`natgrad_options`: options checked before any fitting.
* :func:`fit`: an SVI loop with a progress bar, for ``NaturalGradient`` or ``Adam``.
* :func:`guide_draws`: guide samples through ``Predictive``.
* :func:`summarise` / :func:`print_table`: the posterior summary table.
* :func:`plot_elbo` / :func:`plot_marginals`: the figures written by ``--plot``.
"""

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import pyro
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO

from pyro_natgrad import NaturalGradient, StepSize

OPTIMIZERS = ("natgrad", "adam")
LABELS = {"natgrad": "natural gradient", "adam": "Adam"}


# --------------------------------------------------------------------------- options


def add_common_args(parser, natgrad_steps, adam_steps, samples: int = 4000):
    """Add ``--steps --optimizer --lr --seed --plot --compare-steps --samples --quiet``.

    ``natgrad_steps`` and ``adam_steps`` are the default step counts: ints, or strings
    for the help text when :func:`finish_args` gets ``step_defaults``."""
    parser.add_argument(
        "--steps", type=int, default=None,
        help=f"optimizer steps (default: {natgrad_steps} for natgrad, {adam_steps} for adam)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="natgrad",
                        help="natgrad (pyro_natgrad.NaturalGradient, the default) or adam")
    parser.add_argument("--lr", type=float, default=0.01,
                        help="Adam learning rate (default: 0.01); natgrad has none")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--plot", metavar="PATH", default=None,
        help="save a PNG: the ELBO of natural gradient and of Adam against the step (both "
             "are run), and the posterior marginals against the reference")
    parser.add_argument(
        "--compare-steps", type=int, default=None,
        help="with --plot: steps of the other optimizer (default: its own default step count)")
    parser.add_argument("--samples", type=int, default=samples,
                        help=f"guide draws behind the summary table (default: {samples})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default: 1; the models here are small, and more threads "
             "mostly add overhead)")
    parser.set_defaults(_default_steps={"natgrad": natgrad_steps, "adam": adam_steps})
    return parser


def description(doc: str) -> str:
    """The first paragraph of a module docstring, without reST literal markup."""
    return " ".join(doc.split("\n\n")[0].split()).replace("``", "")


def finish_args(parser, argv=None, step_defaults: Optional[Callable] = None):
    """Parse, check, and fill in the per-optimizer step defaults (``step_defaults(args)``
    returns ``{"natgrad": n, "adam": m}`` where they depend on other options; ``None``
    leaves the choice to the script)."""
    args = parser.parse_args(argv)
    defaults = step_defaults(args) if step_defaults else args._default_steps
    if args.steps is None:
        args.steps = defaults[args.optimizer]
    other = "adam" if args.optimizer == "natgrad" else "natgrad"
    if args.compare_steps is None:
        args.compare_steps = defaults[other]
    for name in ("steps", "compare_steps", "samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.lr < math.inf:  # NaN fails too, before any fitting
        parser.error("--lr must be a positive finite number")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    check_output(parser, args.plot, "--plot")
    torch.set_num_threads(args.threads)
    args.other = other
    return args


def check_output(parser, path, option, folder=False):
    """``parser.error`` unless ``path`` can be written: its folder exists and is writable
    (``folder=True``: ``path`` is a folder, made if missing, so its nearest existing
    ancestor must be writable). Called before fitting, so that a typo in a folder does not
    lose a run that took minutes; ``None`` or ``""`` (no output) passes."""
    if not path:
        return
    full = os.path.abspath(path)
    if folder:
        if os.path.exists(full) and not os.path.isdir(full):
            parser.error(f"{option} {path}: not a folder")
        parent = full
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
    else:
        if os.path.isdir(full):
            parser.error(f"{option} {path}: is a folder; give a file name")
        parent = os.path.dirname(full)
        if not os.path.isdir(parent):
            parser.error(f"{option} {path}: folder {parent} does not exist")
    if not os.path.isdir(parent):
        parser.error(f"{option} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        parser.error(f"{option} {path}: folder {parent} is not writable")


def _no_guide(*args, **kwargs):
    """A stand-in guide: NaturalGradient checks its options in the constructor."""


def natgrad_options(parser, max_kl=None, initial_step=None) -> dict:
    """``NaturalGradient``'s keyword options from ``--max-kl`` and ``--initial-step``
    (``None``: the optimizer's default), checked now by the library's own rules, so that
    a bad value is a usage error before any fitting, not a traceback at the first fit."""
    options = {}
    if initial_step is not None:
        try:
            options["step_size"] = StepSize(initial=initial_step)
        except ValueError as e:
            parser.error(f"--initial-step {initial_step:g}: {e}")
    if max_kl is not None:
        options["max_kl"] = max_kl
        try:
            NaturalGradient(_no_guide, max_kl=max_kl)
        except ValueError as e:
            parser.error(f"--max-kl {max_kl:g}: {e}")
    return options


def runs(args):
    """``[(optimizer, steps), ...]``: the chosen optimizer, plus the other one for --plot."""
    out = [(args.optimizer, args.steps)]
    if args.plot:
        out.append((args.other, args.compare_steps))
    return out


# --------------------------------------------------------------------------- fitting


@dataclass
class Fit:
    """A fitted guide. Its parameters live in Pyro's global param store, which the next
    :func:`fit` clears: call :meth:`activate` before using ``guide`` again."""
    optimizer: str
    guide: object
    losses: np.ndarray
    seconds: float
    state: dict

    def activate(self):
        """Put this fit's parameters back into Pyro's param store; returns the guide."""
        pyro.clear_param_store()
        pyro.get_param_store().set_state(self.state)
        return self.guide

    @property
    def label(self):
        return f"{LABELS[self.optimizer]} ({len(self.losses)} steps, {self.seconds:.1f} s)"


def fit(model, make_guide: Callable, optimizer: str, steps: int, lr: float = 0.01, seed: int = 0,
        quiet: bool = False, natgrad_options: Optional[dict] = None, model_kwargs=None,
        desc: str = "") -> Fit:
    """Fit a fresh guide ``make_guide()`` to ``model`` with SVI and ``Trace_ELBO``.

    ``optimizer`` is ``"natgrad"`` (``NaturalGradient(guide, **natgrad_options)``) or
    ``"adam"`` (``pyro.optim.Adam({"lr": lr})``). The progress bar goes to stderr and is
    shown only on a terminal, and not with ``quiet``.
    """
    from tqdm.auto import tqdm

    model_kwargs = model_kwargs or {}
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = make_guide()
    if optimizer == "natgrad":
        optim = NaturalGradient(guide, **(natgrad_options or {}))
    elif optimizer == "adam":
        optim = pyro.optim.Adam({"lr": lr})
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    svi = SVI(model, guide, optim, Trace_ELBO())
    bar = tqdm(range(steps), desc=desc or LABELS[optimizer], leave=False,
               disable=quiet or not sys.stderr.isatty(), file=sys.stderr)
    losses = []
    start = time.perf_counter()
    for step in bar:
        losses.append(svi.step(**model_kwargs))
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(elbo=f"{-losses[-1]:.5g}", refresh=False)
    seconds = time.perf_counter() - start
    bar.close()
    return Fit(optimizer, guide, np.asarray(losses, dtype=float), seconds,
               pyro.get_param_store().get_state())


def guide_draws(guide, num_samples: int, model_kwargs=None) -> Dict[str, torch.Tensor]:
    """``num_samples`` joint draws of the guide's sample sites (constrained values),
    from ``Predictive`` run on the guide alone (vectorised; no model evaluations).
    Auxiliary sites (``_AutoMultivariateNormal_latent``, ...) are dropped."""
    with torch.no_grad():
        draws = Predictive(guide, num_samples=num_samples, parallel=True)(**(model_kwargs or {}))
    return {k: v.detach() for k, v in draws.items() if not k.startswith("_")}


def expected_loss(model, guide, num_particles: int = 200, model_kwargs=None) -> float:
    """Monte Carlo estimate of ``-ELBO`` (nats) from ``num_particles`` single-draw losses."""
    model_kwargs = model_kwargs or {}
    elbo = Trace_ELBO()
    with torch.no_grad():
        return float(np.mean([elbo.loss(model, guide, **model_kwargs)
                              for _ in range(num_particles)]))


# --------------------------------------------------------------------------- summaries


@dataclass
class Summary:
    """Marginal summaries of a ``[draws, n]`` sample: mean, sd, 5 % / 95 % / 50 % quantiles."""
    names: List[str]
    mean: np.ndarray
    sd: np.ndarray
    q05: np.ndarray
    q95: np.ndarray
    q50: np.ndarray


def summarise(names: Sequence[str], flat) -> Summary:
    flat = np.asarray(torch.as_tensor(flat).reshape(-1, len(names)).double().cpu().numpy())
    q05, q50, q95 = np.quantile(flat, [0.05, 0.5, 0.95], axis=0)
    return Summary(list(names), flat.mean(0), flat.std(0, ddof=1), q05, q95, q50)


def print_table(summary: Summary, ref_mean=None, ref_sd=None, ref_label="reference",
                rows: Optional[Sequence[int]] = None, ref_quantiles=None, file=None):
    """Print parameter, mean, sd, 5 %, 95 % and, where given, the reference mean and sd
    (and its 5 % / 95 % quantiles, ``ref_quantiles=(q05, q95)``) with the error of the
    mean in reference sds, ``z = (mean - ref mean) / ref sd``."""
    file = file or sys.stdout
    width = max(12, max(len(n) for n in summary.names) + 1)
    head = f"{'parameter':{width}s} {'mean':>9s} {'sd':>8s} {'5%':>9s} {'95%':>9s}"
    if ref_mean is not None:
        head += f" | {ref_label + ' mean':>14s} {'sd':>8s}"
        if ref_quantiles is not None:
            head += f" {'5%':>9s} {'95%':>9s}"
        head += f" {'z':>6s}"
    print(head, file=file)
    print("-" * len(head), file=file)
    for i in (range(len(summary.names)) if rows is None else rows):
        line = (f"{summary.names[i]:{width}s} {summary.mean[i]:9.4f} {summary.sd[i]:8.4f} "
                f"{summary.q05[i]:9.4f} {summary.q95[i]:9.4f}")
        if ref_mean is not None:
            z = (summary.mean[i] - ref_mean[i]) / ref_sd[i]
            line += f" | {ref_mean[i]:14.4f} {ref_sd[i]:8.4f}"
            if ref_quantiles is not None:
                line += f" {ref_quantiles[0][i]:9.4f} {ref_quantiles[1][i]:9.4f}"
            line += f" {z:6.2f}"
        print(line, file=file)


def compare(summary: Summary, ref_mean, ref_sd, idx=None):
    """``(max |mean err| / ref sd, min sd ratio, max sd ratio)`` over ``idx`` (default: all)."""
    idx = slice(None) if idx is None else np.asarray(idx)
    err = np.abs(summary.mean - ref_mean)[idx] / np.asarray(ref_sd)[idx]
    ratio = summary.sd[idx] / np.asarray(ref_sd)[idx]
    return float(err.max()), float(ratio.min()), float(ratio.max())


# --------------------------------------------------------------------------- figures


def running_median(x, window: int):
    """Centred running median (a spike in a noisy ELBO trace does not smear out)."""
    x = np.asarray(x, dtype=float)
    if window <= 1 or len(x) < 3:
        return x.copy()
    half = window // 2
    padded = np.pad(x, half, mode="edge")
    view = np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1)
    return np.median(view, axis=-1)


def plot_elbo(ax, fits: Sequence[Fit], title: str = "ELBO"):
    """ELBO (negated loss, running median) against the step, log-scaled step axis.

    The y-range runs from the lowest ELBO either curve has after a tenth of its
    steps to the best one seen, so that the first steps (and early spikes) do not
    squash the part of the curves where they approach each other."""
    colours = {"natgrad": "C0", "adam": "C1"}
    lo, hi = math.inf, -math.inf
    for f in fits:
        elbo = -f.losses
        smooth = running_median(elbo, max(1, len(elbo) // 50))
        steps = np.arange(1, len(elbo) + 1)
        ax.plot(steps, elbo, color=colours[f.optimizer], alpha=0.15, lw=0.6)
        ax.plot(steps, smooth, color=colours[f.optimizer], lw=1.8, label=f.label)
        later = smooth[len(smooth) // 10:]
        later = later[np.isfinite(later)]
        if later.size:
            lo = min(lo, float(later.min()))
            hi = max(hi, float(later.max()))
    if math.isfinite(lo) and math.isfinite(hi) and hi > lo:
        pad = 0.05 * (hi - lo)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("ELBO (running median)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")


def plot_marginals(ax, names: Sequence[str], series: Sequence[tuple], title: str = ""):
    """Forest plot: for each parameter a point (mean) and a bar (5 %..95 % or mean +- 1.645
    sd) per series. ``series``: ``[(label, mean, lo, hi), ...]``."""
    n = len(names)
    offsets = np.linspace(-0.25, 0.25, len(series)) if len(series) > 1 else [0.0]
    for j, (label, mean, lo, hi) in enumerate(series):
        y = np.arange(n) + offsets[j]
        mean, lo, hi = (np.asarray(a, dtype=float) for a in (mean, lo, hi))
        ax.errorbar(mean, y, xerr=[mean - lo, hi - mean], fmt="o", ms=3, lw=1,
                    color=f"C{j}", label=label)
    ax.set_yticks(np.arange(n))
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0.0, color="0.8", lw=0.8, zorder=0)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")


def plot_scatter(ax, ref_mean, ref_sd, summary: Summary, idx, title: str = ""):
    """Variational against reference means (with +- 1 sd bars) for many parameters."""
    idx = np.asarray(idx)
    ax.errorbar(ref_mean[idx], summary.mean[idx], xerr=ref_sd[idx], yerr=summary.sd[idx],
                fmt="none", lw=0.5, alpha=0.25, color="C0")
    ax.plot(ref_mean[idx], summary.mean[idx], "o", ms=3, color="C0")
    lo = min(ref_mean[idx].min(), summary.mean[idx].min())
    hi = max(ref_mean[idx].max(), summary.mean[idx].max())
    ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls="--")
    ax.set_xlabel("reference mean (+- sd)")
    ax.set_ylabel("variational mean (+- sd)")
    ax.set_title(title)


def save(fig, path):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def figure(ncols: int, width: float = 5.0, height: float = 4.2, nrows: int = 1):
    import matplotlib

    matplotlib.use("Agg")  # the examples only write files
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, axes.ravel()


def reference_summary(ref, guide, num_samples: int) -> Summary:
    """Summary of ``num_samples`` guide draws in the order of ``ref.param_names``
    (reported quantities that are not sample sites are recomputed by ``ref.extract``)."""
    return summarise(ref.param_names, ref.extract(guide_draws(guide, num_samples)))
