"""Convergence to the optimal ELBO of the guide family, on problems with a closed-form ELBO.

Target (the optimizer issue): the default optimizer reaches within 1 nat of the
optimal ELBO of its guide family in at least 10x fewer steps than the best Adam of
the grid (lr 0.001 / 0.01 / 0.1), and its median gap over the last 10 % of a
1,000-step run is below 0.1 nats, for both ``AutoNormal`` and
``AutoMultivariateNormal``.

Problems (all Bayesian linear regressions with a known noise scale, so the
posterior is Gaussian and the ELBO of a Gaussian guide is closed-form):

* ``diabetes``: ``benchmarks.problems.LinearRegression.diabetes()`` (D = 11).
* ``blr``: posteriordb ``sblri-blr`` (D = 5, ``beta ~ N(0, 10)``) with ``sigma``
  fixed at its reference posterior mean by ``poutine.condition``.
* ``kilpisjarvi``: posteriordb ``kilpisjarvi_mod-kilpisjarvi`` (D = 2, uncentred
  year, posterior correlation about -0.99999) with ``sigma`` fixed likewise.

For a Gaussian posterior ``N(mu, Lambda^-1)`` the best full-rank Gaussian is the
posterior itself (ELBO = log evidence) and the best mean-field Gaussian has mean
``mu`` and variances ``1 / Lambda_ii``. The closed-form ELBO is checked against a
Monte Carlo estimate from Pyro's ``Trace_ELBO`` before the runs.

Each step's gap is ``optimal ELBO - ELBO(q_t)`` with the exact ELBO of the guide
after step ``t``. "Steps to 1 nat" is the first step with gap <= 1; "stays within"
is the first step after which the gap never exceeds 1 again.

Run ``python benchmarks/convergence.py --help`` for the options.
"""

import argparse
import math
import os
import sys
import time

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    WarningLog,
    check_at_least,
    check_output,
    environment_line,
    fmt,
    log,
    markdown_table,
    seed_everything,
    set_threads,
)
from problems import LinearRegression  # noqa: E402

from pyro_natgrad import NaturalGradient  # noqa: E402
from pyro_natgrad.datasets import load_reference  # noqa: E402

ADAM_LRS = (0.001, 0.01, 0.1)
GUIDES = {"AutoNormal": AutoNormal, "AutoMultivariateNormal": AutoMultivariateNormal}
LOG_2PI = math.log(2 * math.pi)


class ConditionedLinear:
    """``y ~ N(X theta, sigma^2)`` with ``sigma`` known and independent Normal priors
    on the coordinates of ``theta`` (the latent sites, concatenated in ``sites``
    order). Exact ELBO of ``q = N(m, S)``::

        E_q[log p(y | theta)] = -n/2 log(2 pi sigma^2) - (|y - X m|^2 + tr(X^T X S)) / (2 sigma^2)
        E_q[log p(theta)]     = sum_i -1/2 log(2 pi s_i^2) - ((m_i - m0_i)^2 + S_ii) / (2 s_i^2)
        H[q]                  = 1/2 log det(2 pi e S)

    plus the constant ``log p(sigma)`` of the conditioned site, which ``Trace_ELBO``
    counts as an observation (0 for a flat prior).
    """

    def __init__(self, name, model, sites, X, y, sigma, prior_loc, prior_scale):
        self.name, self.model, self.sites = name, model, sites
        tr = poutine.trace(model).get_trace()
        node = tr.nodes["sigma"]
        self.log_p_sigma = float(node["fn"].log_prob(node["value"]).sum())
        self.X, self.y, self.sigma = X, y, float(sigma)
        self.prior_loc, self.prior_scale = prior_loc, prior_scale
        self.XtX = X.T @ X
        self.dim = X.shape[1]
        s2 = self.sigma ** 2
        self.precision = self.XtX / s2 + torch.diag(prior_scale.pow(-2))
        b = X.T @ y / s2 + prior_loc / prior_scale.pow(2)
        self.cov = torch.linalg.inv(self.precision)
        self.cov = 0.5 * (self.cov + self.cov.T)
        self.mean = torch.linalg.solve(self.precision, b)

    # -- constructors for two posteriordb linear regressions, sigma conditioned ----------
    @classmethod
    def blr(cls):
        ref = load_reference("sblri-blr", dtype=torch.float64)
        sigma = ref.mean[ref.param_names.index("sigma")]
        model = poutine.condition(ref.model, data={"sigma": torch.tensor(sigma,
                                                                          dtype=torch.float64)})
        X, y = ref.data["X"], ref.data["y"]
        d = X.shape[1]
        return cls("blr (sblri, sigma fixed)", model, [("beta", d)], X, y, sigma,
                   torch.zeros(d, dtype=X.dtype), torch.full((d,), 10.0, dtype=X.dtype))

    @classmethod
    def kilpisjarvi(cls):
        ref = load_reference("kilpisjarvi_mod-kilpisjarvi", dtype=torch.float64)
        sigma = ref.mean[ref.param_names.index("sigma")]
        model = poutine.condition(ref.model, data={"sigma": torch.tensor(sigma,
                                                                          dtype=torch.float64)})
        x, y = ref.data["x"], ref.data["y"]
        X = torch.stack([torch.ones_like(x), x], -1)
        loc = torch.stack([ref.data["pmualpha"], ref.data["pmubeta"]])
        scale = torch.stack([ref.data["psalpha"], ref.data["psbeta"]])
        return cls("kilpisjarvi (sigma fixed)", model, [("alpha", None), ("beta", None)], X, y,
                   sigma, loc, scale)

    # -- exact ELBO ---------------------------------------------------------------------
    def elbo(self, m, S):
        n = self.y.shape[0]
        s2 = self.sigma ** 2
        r = self.y - self.X @ m
        loglik = -0.5 * n * (LOG_2PI + math.log(s2)) - 0.5 * (r @ r + (self.XtX * S).sum()) / s2
        v = self.prior_scale.pow(2)
        logprior = (-0.5 * (LOG_2PI + v.log()) - 0.5 * ((m - self.prior_loc).pow(2)
                                                         + S.diagonal()) / v).sum()
        entropy = 0.5 * torch.logdet(2 * math.pi * math.e * S)
        return float(loglik + logprior + entropy) + self.log_p_sigma

    def optimal_elbo(self, mean_field):
        S = torch.diag(1 / self.precision.diagonal()) if mean_field else self.cov
        return self.elbo(self.mean, S)

    def moments(self, guide):
        return site_moments(guide, self.sites)


class Diabetes:
    """``LinearRegression.diabetes()`` from ``benchmarks/problems.py`` (site ``w``)."""

    def __init__(self):
        self.lr = LinearRegression.diabetes(dtype=torch.float64)
        self.name = "diabetes"
        self.model = self.lr.model
        self.sites = [("w", self.lr.dim)]
        self.dim = self.lr.dim

    def elbo(self, m, S):
        return self.lr.elbo(m, S)

    def optimal_elbo(self, mean_field):
        return self.lr.optimal_elbo(mean_field)

    def moments(self, guide):
        return site_moments(guide, self.sites)


PROBLEMS = {"diabetes": Diabetes, "blr": ConditionedLinear.blr,
            "kilpisjarvi": ConditionedLinear.kilpisjarvi}


def site_moments(guide, sites):
    """``(mean, covariance)`` of the real-valued latent sites ``[(name, size or None)]``,
    concatenated in that order, under an ``AutoNormal`` or ``AutoMultivariateNormal``."""
    with torch.no_grad():
        if isinstance(guide, AutoNormal):
            m = torch.cat([getattr(guide.locs, s).detach().reshape(-1) for s, _ in sites])
            sd = torch.cat([getattr(guide.scales, s).detach().reshape(-1) for s, _ in sites])
            return m, torch.diag(sd.square())
        post = guide.get_posterior()
        pos, index = 0, {}
        for name, _ in guide.prototype_trace.iter_stochastic_nodes():
            n = guide._unconstrained_shapes[name].numel()
            index[name] = list(range(pos, pos + n))
            pos += n
        idx = torch.tensor([i for s, _ in sites for i in index[s]])
        m = post.mean.detach()[idx]
        S = post.covariance_matrix.detach()[idx][:, idx]
        return m, S


def make_guide(problem, guide_name):
    return GUIDES[guide_name](problem.model)


def check_elbo(problem, guide_name, particles, seed):
    """Closed-form ELBO against ``-Trace_ELBO().loss`` averaged over ``particles``
    single-particle estimates, after 1 natural-gradient step (far from the optimum) and
    after 100 (near it, where the estimate is sharp; a full covariance for
    ``AutoMultivariateNormal``). Returns rows for the table."""
    rows = []
    for n_steps in (1, 100):
        pyro.clear_param_store()
        seed_everything(seed)
        guide = make_guide(problem, guide_name)
        optim = NaturalGradient(guide)
        svi = SVI(problem.model, guide, optim, Trace_ELBO())
        with WarningLog():
            for _ in range(n_steps):
                svi.step()  # the first step also creates the parameters
        optim.detach()  # its hooks would otherwise record every draw below
        m, S = problem.moments(guide)
        exact = problem.elbo(m, S)
        est = Trace_ELBO()
        with torch.no_grad():
            draws = np.array([-est.loss(problem.model, guide) for _ in range(particles)])
        mc, se = draws.mean(), draws.std(ddof=1) / math.sqrt(particles)
        # At the optimum of a Gaussian posterior log p(x, z) - log q(z) is constant, so
        # the MC error vanishes; rounding then needs an absolute tolerance.
        diff = mc - exact
        z = diff / se if se > 0 else (0.0 if diff == 0 else math.inf)
        ok = abs(diff) <= 4 * se + 1e-6 * max(1.0, abs(exact))
        rows.append([problem.name, guide_name, f"after {n_steps} step(s)", fmt(exact, ".4f"),
                     f"{mc:.4f} ± {se:.2g}", f"{diff:+.2g}", fmt(z, "+.2f"),
                     "ok" if ok else "MISMATCH"])
    return rows


def run(problem, guide_name, optimizer, steps, seed, lr=None):
    """One run; returns the exact gap after every step."""
    pyro.clear_param_store()
    seed_everything(seed)
    guide = make_guide(problem, guide_name)
    optim = NaturalGradient(guide) if optimizer == "natgrad" else pyro.optim.Adam({"lr": lr})
    svi = SVI(problem.model, guide, optim, Trace_ELBO())
    best = problem.optimal_elbo(mean_field=guide_name == "AutoNormal")
    gaps, error = [], None
    with WarningLog() as wlog:
        start = time.perf_counter()
        try:
            for _ in range(steps):
                svi.step()
                m, S = problem.moments(guide)
                gap = best - problem.elbo(m, S)
                gaps.append(gap)
                if not math.isfinite(gap):
                    error = f"non-finite ELBO at step {len(gaps)}"
                    break
        except Exception as e:
            error = f"{type(e).__name__} at step {len(gaps) + 1}: {str(e)[:200]}"
        wall = time.perf_counter() - start
    if isinstance(optim, NaturalGradient):
        optim.detach()
    gaps = np.asarray(gaps, dtype=float)
    return {"gaps": gaps, "wall": wall, "error": error, "warnings": wlog.summary(),
            "optimizer": optimizer, "lr": lr, "steps": steps, **gap_metrics(gaps, steps)}


def gap_metrics(gaps, steps):
    ok = np.isfinite(gaps) & (gaps <= 1.0)
    first = int(np.argmax(ok)) + 1 if ok.any() else None
    stays = None
    if len(gaps) == steps and ok[-1]:
        bad = np.nonzero(~ok)[0]
        stays = int(bad[-1]) + 2 if len(bad) else 1
    tail = gaps[-max(1, steps // 10):] if len(gaps) == steps else np.array([np.nan])
    return {"first": first, "stays": stays, "median_tail": float(np.median(tail)),
            "final": float(gaps[-1]) if len(gaps) else float("nan")}


def steps_label(n, budget):
    return str(n) if n is not None else f"> {budget}"


def plot(path, problem_name, guide_name, ng, adams, best):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    floor = 1e-9  # gaps below this (rounding level) are drawn at it
    for r in adams:
        if r is best:
            continue
        ax.plot(np.arange(1, len(r["gaps"]) + 1), np.maximum(r["gaps"], floor), lw=0.6,
                alpha=0.5, label=f"Adam lr={r['lr']:g}")
    if best is not None:
        ax.plot(np.arange(1, len(best["gaps"]) + 1), np.maximum(best["gaps"], floor), lw=1.2,
                color="tab:red", label=f"Adam lr={best['lr']:g} (best of grid)")
    ax.plot(np.arange(1, len(ng["gaps"]) + 1), np.maximum(ng["gaps"], floor), lw=1.2,
            color="tab:blue", label="NaturalGradient (default)")
    ax.axhline(1.0, color="grey", ls="--", lw=0.8)
    ax.axhline(0.1, color="grey", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("SVI step (Trace_ELBO, 1 particle)")
    ax.set_ylabel("optimal ELBO - ELBO (nats; floor 1e-9)")
    ax.set_title(f"{problem_name}, {guide_name}: exact gap to the family's optimum")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000, help="natural-gradient steps (1000)")
    p.add_argument("--adam-steps", type=int, default=None,
                   help="Adam steps per learning rate (default 10000; 2000 with --quick)")
    p.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    p.add_argument("--guides", nargs="+", default=list(GUIDES), choices=list(GUIDES))
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2000 Adam steps, 300 Monte Carlo particles in the check")
    p.add_argument("--mc-particles", type=int, default=None,
                   help="particles of the Monte Carlo ELBO check (default 2000; 300 with "
                        "--quick; 0 skips it)")
    p.add_argument("--plot", default=os.path.join("benchmarks", "convergence.png"),
                   help="PNG of gap vs step for diabetes / AutoMultivariateNormal "
                        "(default benchmarks/convergence.png; '' for none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    if args.adam_steps is None:
        args.adam_steps = 2000 if args.quick else 10000
    if args.mc_particles is None:
        args.mc_particles = 300 if args.quick else 2000
    check_at_least(p, args, 1, "steps", "adam_steps", "threads")
    check_at_least(p, args, 0, "mc_particles")
    check_output(p, args.plot, "--plot")
    return args


def main(argv=None):
    args = parse_args(argv)
    set_threads(args.threads)
    total_start = time.perf_counter()
    problems = [PROBLEMS[p]() for p in args.problems]

    check_rows = []
    if args.mc_particles > 0:
        for problem in problems:
            for guide_name in args.guides:
                log(f"[{problem.name} / {guide_name}] Monte Carlo check of the ELBO formula ...")
                check_rows += check_elbo(problem, guide_name, args.mc_particles, args.seed)

    rows, opt_rows, notes, verdicts = [], [], [], []
    plotted = None
    for problem in problems:
        for guide_name in args.guides:
            mf = guide_name == "AutoNormal"
            opt_rows.append([problem.name, guide_name, problem.dim,
                             fmt(problem.optimal_elbo(mf), ".4f")])
            log(f"[{problem.name} / {guide_name}] natural gradient, {args.steps} steps ...")
            ng = run(problem, guide_name, "natgrad", args.steps, args.seed)
            adams = []
            for lr in ADAM_LRS:
                log(f"[{problem.name} / {guide_name}] Adam lr={lr}, {args.adam_steps} steps ...")
                adams.append(run(problem, guide_name, "adam", args.adam_steps, args.seed, lr))
            reached = [r for r in adams if r["first"] is not None]
            best = (min(reached, key=lambda r: (r["first"], r["median_tail"])) if reached
                    else min(adams, key=lambda r: r["final"] if math.isfinite(r["final"])
                             else math.inf))
            adam_first = best["first"] if reached else None
            if ng["first"] is None:
                ratio, ratio_txt = 0.0, "NG never within 1 nat"
            elif adam_first is None:
                ratio = args.adam_steps / ng["first"]
                ratio_txt = f"> {ratio:.0f}"
            else:
                ratio = adam_first / ng["first"]
                ratio_txt = f"{ratio:.1f}"
            ok_ratio = ratio >= 10
            ok_tail = ng["median_tail"] < 0.1 and ng["error"] is None
            verdict = "PASS" if ok_ratio and ok_tail else "FAIL"
            why = []
            if not ok_ratio:
                why.append("ratio < 10")
            if not ok_tail:
                why.append("median gap >= 0.1")
            verdicts.append((problem.name, guide_name, verdict, ratio_txt, ng["median_tail"]))
            for r in [ng] + adams:
                label = ("NaturalGradient (default)" if r["optimizer"] == "natgrad"
                         else f"Adam lr={r['lr']:g}" + (" (best)" if r is best else ""))
                is_ng = r is ng
                rows.append([problem.name, guide_name, label, r["steps"],
                             steps_label(r["first"], r["steps"]),
                             steps_label(r["stays"], r["steps"]),
                             fmt(r["median_tail"], ".3g"), fmt(r["wall"], ".1f"),
                             ratio_txt if is_ng else "",
                             (verdict + (f" ({', '.join(why)})" if why else "")) if is_ng else ""])
                if r["error"] is not None:
                    notes.append(f"{problem.name} / {guide_name} / {label}: {r['error']}")
                for cat, msg, count in r["warnings"]:
                    notes.append(f"{problem.name} / {guide_name} / {label}: {count} x {cat}: "
                                 f"{msg}")
            if (args.plot and plotted is None and problem.name == "diabetes"
                    and guide_name == "AutoMultivariateNormal"):
                plot(args.plot, problem.name, guide_name, ng, adams, best)
                plotted = args.plot

    print("### Convergence to the optimal ELBO of the guide family (closed-form ELBO)\n")
    print(f"`Trace_ELBO()` with one particle; natural gradient `NaturalGradient(guide)` with "
          f"defaults for {args.steps} steps; Adam at lr {'/'.join(f'{lr:g}' for lr in ADAM_LRS)} "
          f"for {args.adam_steps} steps each. Gap = optimal ELBO of the family - exact ELBO of "
          f"the guide after each step. Ratio = (best Adam's steps to within 1 nat) / (natural "
          f"gradient's); best Adam = fewest steps to 1 nat. Pass: ratio >= 10 and the natural "
          f"gradient's median gap over the last 10 % of its run < 0.1 nats. float64; seed "
          f"{args.seed}.\n")
    header = ["problem", "guide", "optimizer", "steps", "steps to <= 1 nat",
              "stays <= 1 nat from", "median gap, last 10 %", "wall (s)", "ratio Adam/NG",
              "pass"]
    print(markdown_table(header, rows))
    print()
    n_pass = sum(v[2] == "PASS" for v in verdicts)
    print(f"**Target: {n_pass}/{len(verdicts)} problem x guide combinations pass.**\n")
    print("Optimal ELBO of each family (closed form):\n")
    print(markdown_table(["problem", "guide", "D", "optimal ELBO"], opt_rows))
    print()
    if check_rows:
        print(f"Check of the closed-form ELBO against Pyro's `Trace_ELBO` ({args.mc_particles} "
              f"single-particle estimates; z = (MC - exact) / MC standard error; ok when "
              f"|MC - exact| <= 4 se + 1e-6 |exact|, the last term for rounding where the "
              f"estimator's variance vanishes, at the optimum of a Gaussian posterior):\n")
        print(markdown_table(["problem", "guide", "state", "exact ELBO", "MC ELBO ± se",
                              "MC - exact", "z", "check"], check_rows))
        print()
    if plotted:
        print(f"Plot: `{plotted}` (diabetes, AutoMultivariateNormal, gap vs "
              f"step, log-log).\n")
    if notes:
        print("Notes:\n")
        for n in notes:
            print(f"- {n}")
        print()
    print(f"Environment: {environment_line()}; total wall time "
          f"{time.perf_counter() - total_start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
