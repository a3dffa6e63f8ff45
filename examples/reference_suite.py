"""Fit every bundled reference posterior with natural gradient and with Adam, and print
one table.

The references ship with pyro_natgrad (``pyro_natgrad.datasets``; their data,
gold-standard posteriors and provenance are in ``pyro_natgrad/data/``): the
posteriordb models (long-run Stan NUTS) and inference-gym's German credit and
radon targets. Each model is fitted with a Gaussian guide
(``AutoMultivariateNormal`` by default, ``--guide normal`` for ``AutoNormal``,
``--guide lowrank`` for ``AutoLowRankMultivariateNormal`` with Pyro's default rank,
``--guide both`` for the first two) by ``NaturalGradient(guide)`` with its defaults
and by Pyro's ``Adam`` (``--lr``), each with ``Trace_ELBO()`` and one particle. The table gives,
per model, guide and optimizer: the steps, the wall time of the fit, the largest
error of a posterior mean in reference sds (``max |mean err|``), the range of the
ratios of variational to reference sds, and the final ELBO (mean of the last 50
losses, negated).

Models marked ``*`` have posteriors that are far from Gaussian (eight schools'
tau, the radon county scale, the GP kernel parameters): no Gaussian guide can
match them, whatever the optimizer. A fit is marked "close" when its means are
within 0.1 reference sd and its sds within 10 % of the reference's.

Run ``python examples/reference_suite.py --help`` for the options, ``--list`` for
the models.
"""

import argparse
import math
import sys
import time
import warnings

import _common as C
import numpy as np
import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (AutoLowRankMultivariateNormal, AutoMultivariateNormal,
                                  AutoNormal)

from pyro_natgrad import NaturalGradient
from pyro_natgrad.datasets import list_references, load_reference

GUIDES = {"mvn": AutoMultivariateNormal, "normal": AutoNormal,
          "lowrank": AutoLowRankMultivariateNormal}
DEFAULT_STEPS = {"natgrad": 200, "adam": 2000}
ELBO_WINDOW = 50  # final ELBO: mean of the last 50 losses, negated
MEAN_TOL, SD_TOL = 0.1, 0.1  # "close": max |mean err| <= 0.1 ref sd, sd ratios in [0.9, 1.1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=C.description(__doc__),
        epilog="Example: python examples/reference_suite.py --models kidiq german_credit "
               "--steps 100")
    parser.add_argument(
        "--models", nargs="+", metavar="NAME", default=None,
        help="references to fit: exact names or substrings matching one or more names "
             "(default: all; see --list)")
    parser.add_argument("--list", action="store_true", help="list the references and exit")
    parser.add_argument("--guide", choices=("mvn", "normal", "lowrank", "both"), default="mvn",
                        help="mvn (AutoMultivariateNormal, the default), normal (AutoNormal), "
                             "lowrank (AutoLowRankMultivariateNormal) or both (mvn and normal)")
    parser.add_argument("--optimizer", choices=("natgrad", "adam", "both"), default="both",
                        help="natgrad (pyro_natgrad.NaturalGradient), adam, or both "
                             "(the default)")
    parser.add_argument(
        "--steps", type=int, default=None,
        help=f"steps of every fit (default: {DEFAULT_STEPS['natgrad']} for natgrad, "
             f"{DEFAULT_STEPS['adam']} for adam)")
    parser.add_argument("--adam-steps", type=int, default=None,
                        help="steps of the Adam fits (overrides --steps for Adam)")
    parser.add_argument("--lr", type=float, default=0.01,
                        help="Adam learning rate (default: 0.01); natgrad has none")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--samples", type=int, default=4000,
                        help="guide draws behind each row's summaries (default: 4000)")
    parser.add_argument(
        "--plot", metavar="PATH", default=None,
        help="save a PNG: per model, the max |mean err| and the sd-ratio range of each fit")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default: 1; the models are small)")
    args = parser.parse_args(argv)
    for name in ("steps", "adam_steps", "samples", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.lr < math.inf:  # NaN fails too, before any fitting
        parser.error("--lr must be a positive finite number")
    C.check_output(parser, args.plot, "--plot")
    if not args.list:
        try:
            args.models = select_models(args.models)
        except ValueError as e:
            parser.error(str(e))
    args.guides = ["mvn", "normal"] if args.guide == "both" else [args.guide]
    args.optimizers = ["natgrad", "adam"] if args.optimizer == "both" else [args.optimizer]
    args.steps_of = {
        "natgrad": args.steps or DEFAULT_STEPS["natgrad"],
        "adam": args.adam_steps or args.steps or DEFAULT_STEPS["adam"],
    }
    torch.set_num_threads(args.threads)
    return args


def select_models(patterns):
    """The reference names that equal, or contain, one of ``patterns`` (all for None)."""
    names = list_references()
    if not patterns:
        return names
    chosen = []
    for pattern in patterns:
        matches = [pattern] if pattern in names else [n for n in names if pattern in n]
        if not matches:
            raise ValueError(f"--models {pattern!r} matches no reference; see --list")
        chosen += [m for m in matches if m not in chosen]
    return chosen


def fit(ref, guide_key, optimizer, steps, args, desc):
    """One SVI fit. Returns a dict with the guide, the losses, the wall time, the final
    ELBO, an error message (an exception or a non-finite loss ends the fit) and the
    warnings raised during the fit."""
    from tqdm.auto import tqdm

    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    guide = GUIDES[guide_key](ref.model)
    optim = NaturalGradient(guide) if optimizer == "natgrad" else pyro.optim.Adam({"lr": args.lr})
    svi = SVI(ref.model, guide, optim, Trace_ELBO())
    bar = tqdm(range(steps), desc=desc, leave=False, file=sys.stderr,
               disable=args.quiet or not sys.stderr.isatty())
    losses, error = [], None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        try:
            for step in bar:
                losses.append(svi.step())
                if not math.isfinite(losses[-1]):
                    error = f"non-finite loss at step {step + 1}"
                    break
                if step % 10 == 0:
                    bar.set_postfix(elbo=f"{-losses[-1]:.5g}", refresh=False)
        except Exception as e:  # reported below the table, not hidden
            error = f"{type(e).__name__} at step {len(losses) + 1}: {str(e)[:160]}"
        seconds = time.perf_counter() - start
    bar.close()
    if isinstance(optim, NaturalGradient):
        optim.detach()  # remove its hooks from the guide
    tail = losses[-ELBO_WINDOW:]
    elbo = -float(np.mean(tail)) if tail and error is None else math.nan
    counts = {}
    for w in caught:
        if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
            continue  # torch's and pyro's own deprecations say nothing about the fit
        key = f"{w.category.__name__}: {str(w.message).splitlines()[0][:120]}"
        counts[key] = counts.get(key, 0) + 1
    return {"guide": guide, "losses": np.asarray(losses, dtype=float), "seconds": seconds,
            "elbo": elbo, "error": error, "warnings": counts}


def evaluate(ref, run, num_samples):
    """``(max |mean err| / ref sd, min sd ratio, max sd ratio)`` from guide draws; NaN
    when the fit failed or the draws are not finite."""
    nan = (math.nan, math.nan, math.nan)
    if run["error"] is not None:
        return nan
    flat = ref.extract(C.guide_draws(run["guide"], num_samples))
    summary = C.summarise(ref.param_names, flat)
    if not (np.isfinite(summary.mean).all() and np.isfinite(summary.sd).all()):
        return nan
    return C.compare(summary, ref.mean, ref.sd)


def is_close(err, lo, hi):
    return err <= MEAN_TOL and 1 - SD_TOL <= lo and hi <= 1 + SD_TOL


def fmt(x, spec):
    return "-" if not math.isfinite(x) else format(x, spec)


def print_table(rows):
    header = ["model", "guide", "optimizer", "steps", "wall (s)", "max |mean err|",
              "sd ratio", "final ELBO", "close"]
    table = [[r["model"] + ("" if r["gaussian_like"] else "*"), r["guide"], r["optimizer"],
              str(r["steps"]), f"{r['seconds']:.1f}", fmt(r["err"], ".3f"),
              f"{fmt(r['lo'], '.3f')}..{fmt(r['hi'], '.3f')}", fmt(r["elbo"], ".2f"),
              "yes" if r["close"] else "no"] for r in rows]
    widths = [max(len(h), *(len(t[j]) for t in table)) for j, h in enumerate(header)]
    left = {0, 1, 2, 8}

    def line(cells):
        return "  ".join(c.ljust(w) if j in left else c.rjust(w)
                         for j, (c, w) in enumerate(zip(cells, widths))).rstrip()

    print(line(header))
    print("-" * len(line(header)))
    for t in table:
        print(line(t))


def plot(rows, path):
    """Left: max |mean err| per model and fit (log scale). Right: the sd-ratio range."""
    multi_guide = len({r["guide"] for r in rows}) > 1

    def label(r):
        star = "" if r["gaussian_like"] else "*"
        return r["model"] + star + (f" ({r['guide']})" if multi_guide else "")

    labels = list(dict.fromkeys(label(r) for r in rows))
    optimizers = list(dict.fromkeys(r["optimizer"] for r in rows))
    offsets = np.linspace(-0.15, 0.15, len(optimizers)) if len(optimizers) > 1 else [0.0]
    colours = {"NaturalGradient": "C0", "Adam": "C1"}
    fig, axes = C.figure(2, width=5.2, height=0.3 * len(labels) + 1.6)
    for k, opt in enumerate(optimizers):
        mine = [r for r in rows if r["optimizer"] == opt]
        y = np.array([labels.index(label(r)) for r in mine]) + offsets[k]
        err, lo, hi = (np.array([r[key] for r in mine]) for key in ("err", "lo", "hi"))
        axes[0].plot(np.clip(err, 1e-3, None), y, "o", color=colours[opt], ms=4, label=opt)
        axes[1].hlines(y, lo, hi, color=colours[opt], lw=2, label=opt)
        axes[1].plot(np.concatenate([lo, hi]), np.concatenate([y, y]), "|",
                     color=colours[opt], ms=6)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yticks(np.arange(len(labels)))
        ax.set_ylim(len(labels) - 0.5, -0.5)
    axes[0].legend(fontsize=7, loc="best")
    axes[0].set_yticklabels(labels, fontsize=7)
    axes[1].set_yticklabels([])
    axes[0].axvline(MEAN_TOL, color="0.5", lw=0.8, ls="--")
    axes[0].set_xlabel("max |mean err| (reference sds)")
    axes[0].set_title(f"posterior means (dashed: {MEAN_TOL} sd)")
    axes[1].axvspan(1 - SD_TOL, 1 + SD_TOL, color="0.9", zorder=0)
    axes[1].axvline(1.0, color="0.5", lw=0.8)
    axes[1].set_xlabel("sd / reference sd (min..max)")
    axes[1].set_title("posterior sds (grey: within 10 %)")
    C.save(fig, path)


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        print(f"{'reference':48s} {'kind':13s} {'params':>6s}  gaussian-like  source")
        for name in list_references():
            ref = load_reference(name)
            print(f"{name:48s} {ref.kind:13s} {ref.n_params:6d}  "
                  f"{'yes' if ref.gaussian_like else 'no':13s}  {ref.source}")
        return 0

    refs = [load_reference(n) for n in args.models]
    refs.sort(key=lambda r: (not r.gaussian_like, r.name))  # Gaussian-like first
    n_fits = len(refs) * len(args.guides) * len(args.optimizers)
    print(f"{len(refs)} reference(s), {n_fits} fit(s): NaturalGradient() "
          f"{args.steps_of['natgrad']} steps, Adam(lr={args.lr:g}) {args.steps_of['adam']} "
          f"steps; Trace_ELBO, 1 particle; seed {args.seed}; {args.samples} guide draws per "
          f"summary", flush=True)
    rows, notes = [], []
    total = time.perf_counter()
    for ref in refs:
        for guide_key in args.guides:
            for opt in args.optimizers:
                steps = args.steps_of[opt]
                run = fit(ref, guide_key, opt, steps, args,
                          desc=f"{ref.name[:28]} {guide_key} {opt}")
                err, lo, hi = evaluate(ref, run, args.samples)
                row = {"model": ref.name, "gaussian_like": ref.gaussian_like,
                       "guide": GUIDES[guide_key].__name__,
                       "optimizer": "NaturalGradient" if opt == "natgrad" else "Adam",
                       "steps": len(run["losses"]), "seconds": run["seconds"],
                       "err": err, "lo": lo, "hi": hi, "elbo": run["elbo"],
                       "close": math.isfinite(err) and is_close(err, lo, hi)}
                rows.append(row)
                where = f"{ref.name}, {row['guide']}, {row['optimizer']}"
                if run["error"]:
                    notes.append(f"{where}: {run['error']}")
                for msg, count in run["warnings"].items():
                    notes.append(f"{where}: {count} x {msg}")

    print()
    print_table(rows)
    print(f"\n* posterior far from Gaussian: no Gaussian guide can match it. "
          f"close = max |mean err| <= {MEAN_TOL} ref sd and sd ratios within "
          f"[{1 - SD_TOL:.1f}, {1 + SD_TOL:.1f}].")
    for opt in ("NaturalGradient", "Adam"):
        for guide in dict.fromkeys(r["guide"] for r in rows):
            mine = [r for r in rows if r["optimizer"] == opt and r["guide"] == guide
                    and r["gaussian_like"]]
            if mine:
                print(f"{opt}, {guide}: {sum(r['close'] for r in mine)}/{len(mine)} "
                      f"Gaussian-like posteriors close")
    if notes:
        print("\nnotes:")
        for n in notes:
            print(f"- {n}")
    print(f"\ntotal wall time {time.perf_counter() - total:.0f} s")
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
