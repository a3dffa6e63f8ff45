"""GGN benchmark targets (issue 4): convergence on two GLMs and the cost of a GGN step.

Targets (benchmarks, not timed tests):

* *Convergence.* Logistic regression (German credit from the packaged reference data,
  25 weights) and a Poisson regression: with default settings, ``NaturalGradient``
  gets within 1 nat of the optimal full-rank-Gaussian ELBO in at most 30 steps, and in
  at least 10x fewer steps than the best Adam of lr {0.001, 0.01, 0.1}.
* *Cost.* A GGN step on a regression with ``n`` data and ``d`` weights costs
  ``O(n d^2 + d^3)``, and at ``n = 20,000``, ``d = 10`` one ``svi.step`` with
  ``NaturalGradient(guide, curvature="ggn")`` takes under 10x one Adam ``svi.step`` of
  the same SVI loop (ratio measured in the same process).

Problems (``benchmarks.problems.GLMRegression``, one latent site ``w``, prior
``N(0, I)``, guide ``AutoMultivariateNormal``):

* ``german``: the reference model ``german_credit_numeric_logistic_regression``
  (24 standardised features and a bias; n = 1000, D = 25);
* ``randhie``: statsmodels' bundled RAND health insurance data, Poisson (log link)
  regression of doctor visits on 9 standardised regressors and an intercept
  (n = 20,190, D = 10).

Exact ELBO: for ``q = N(m, L L^T)`` each linear predictor ``f_i = x_i^T w`` is
``N(x_i^T m, |L^T x_i|^2)``, so the expected log-likelihood is a sum of 1-D
expectations: ``E[softplus(f_i)]`` by 128-node Gauss-Hermite quadrature (logistic),
``E[exp(f_i)] = exp(mu_i + s_i^2 / 2)`` in closed form (Poisson); prior term and
entropy are closed form. The optimal full-rank ELBO maximises this deterministic
objective by L-BFGS (float64, strong Wolfe) from the Laplace approximation; the
script reports the final gradient norm. The quadrature ELBO is checked against
Pyro's ``Trace_ELBO`` (Monte Carlo), and its node count against 2x the nodes.

Each run records after every ``svi.step`` the exact ELBO of the guide's current
``(loc, L = diag(scale) @ scale_tril)``. "Steps to 1 nat" is the first step with gap
<= 1; "stays" the first step after which it never exceeds 1 again. Ratio = best
Adam's steps to 1 nat / the natural gradient's (best Adam = fewest steps; if no Adam
gets there, the ratio is a lower bound, ``> budget / steps``). All guides start from
the same initialisation (AutoMultivariateNormal's defaults, same seed).

Run ``python benchmarks/ggn_targets.py --help`` for the options.
"""

import argparse
import cProfile
import math
import os
import pstats
import statistics
import sys
import time

import numpy as np
import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    WarningLog,
    check_at_least,
    environment_line,
    fmt,
    log,
    markdown_table,
    seed_everything,
    set_threads,
)
from problems import GLMRegression, full_rank_moments  # noqa: E402

from pyro_natgrad import NaturalGradient  # noqa: E402

ADAM_LRS = (0.001, 0.01, 0.1)
PROBLEMS = {"german": GLMRegression.german_credit, "randhie": GLMRegression.randhie}
NG_VARIANTS = {"NaturalGradient (default)": {}, 'NaturalGradient (curvature="ggn")':
               {"curvature": "ggn"}}
MAX_STEPS_TARGET, RATIO_TARGET, COST_TARGET = 30, 10.0, 10.0


# -------------------------------------------------------------------------------------
# Convergence
# -------------------------------------------------------------------------------------


def make_svi(problem, optimizer, seed, lr=None, ng_kwargs=None, guide_cls=None):
    pyro.clear_param_store()
    seed_everything(seed)
    guide = (guide_cls or AutoMultivariateNormal)(problem.model)
    if optimizer == "natgrad":
        optim = NaturalGradient(guide, **(ng_kwargs or {}))
    else:
        optim = pyro.optim.Adam({"lr": lr})
    return guide, optim, SVI(problem.model, guide, optim, Trace_ELBO())


def check_reading(guide):
    """``full_rank_moments`` against ``guide.get_posterior()``; returns the max abs
    difference (0 when the parameterisation is as assumed)."""
    m, L = full_rank_moments(guide)
    with torch.no_grad():
        post = guide.get_posterior()
        return max(float((post.loc - m).abs().max()), float((post.scale_tril - L).abs().max()))


def run(problem, best, optimizer, steps, seed, lr=None, ng_kwargs=None):
    """One run; the exact gap after every step."""
    guide, optim, svi = make_svi(problem, optimizer, seed, lr, ng_kwargs)
    gaps, error, reading = [], None, None
    with WarningLog() as wlog:
        start = time.perf_counter()
        try:
            for _ in range(steps):
                svi.step()
                if reading is None:
                    reading = check_reading(guide)
                m, L = full_rank_moments(guide)
                gap = best - problem.elbo(m, L)
                gaps.append(gap)
                if not math.isfinite(gap):
                    error = f"non-finite ELBO at step {len(gaps)}"
                    break
        except Exception as e:  # noqa: BLE001 -- reported in the table's notes
            error = f"{type(e).__name__} at step {len(gaps) + 1}: {str(e)[:200]}"
        wall = time.perf_counter() - start
    if isinstance(optim, NaturalGradient):
        optim.detach()
    gaps = np.asarray(gaps, dtype=float)
    return {"gaps": gaps, "wall": wall, "error": error, "warnings": wlog.summary(),
            "reading": reading, "steps": steps, **gap_metrics(gaps, steps)}


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


def check_elbo(problem, seed, particles, ng_steps=(1, 30)):
    """Quadrature ELBO against the mean of ``particles`` single-particle
    ``-Trace_ELBO().loss`` estimates, at the guide after a few natural-gradient steps,
    and the quadrature with twice the nodes. Rows for the table."""
    rows = []
    for n_steps in ng_steps:
        guide, optim, svi = make_svi(problem, "natgrad", seed)
        with WarningLog():
            for _ in range(n_steps):
                svi.step()
        optim.detach()
        m, L = full_rank_moments(guide)
        exact = problem.elbo(m, L)
        nodes = problem.gh_t.numel()
        problem.set_nodes(2 * nodes)
        exact2 = problem.elbo(m, L)
        problem.set_nodes(nodes)
        est = Trace_ELBO()
        with torch.no_grad():
            draws = np.array([-est.loss(problem.model, guide) for _ in range(particles)])
        mc, se = draws.mean(), draws.std(ddof=1) / math.sqrt(particles)
        z = (mc - exact) / se if se > 0 else 0.0
        ok = abs(mc - exact) <= 4 * se + 1e-6 * abs(exact)
        quad = (f"{exact2 - exact:+.1e}" if problem.likelihood == "logistic"
                else "closed form")
        rows.append([problem.name, f"after {n_steps} NG step(s)", fmt(exact, ".4f"),
                     f"{mc:.4f} ± {se:.2g}", fmt(z, "+.2f"), "ok" if ok else "MISMATCH", quad])
    return rows


def seed_summary(ng_runs, adam_runs_by_lr, adam_steps):
    """Per seed: the best Adam and the ratio; returns a list of dicts."""
    out = []
    for i, ng in enumerate(ng_runs):
        adams = {lr: runs[i] for lr, runs in adam_runs_by_lr.items()}
        reached = {lr: r for lr, r in adams.items() if r["first"] is not None}
        if reached:
            best_lr = min(reached, key=lambda lr: (reached[lr]["first"],
                                                   reached[lr]["median_tail"]))
            adam_first = reached[best_lr]["first"]
        else:
            best_lr, adam_first = None, None
        if ng["first"] is None:
            ratio, bound = 0.0, False
        elif adam_first is None:
            ratio, bound = adam_steps / ng["first"], True
        else:
            ratio, bound = adam_first / ng["first"], False
        out.append({"ng_first": ng["first"], "best_lr": best_lr, "adam_first": adam_first,
                    "ratio": ratio, "bound": bound})
    return out


def convergence_section(args):
    problems = [PROBLEMS[p]() for p in args.problems]
    seeds = list(range(args.seed, args.seed + args.seeds))
    opt_rows, check_rows, rows, verdict_rows, notes = [], [], [], [], []
    for problem in problems:
        log(f"[{problem.name}] optimal full-rank ELBO by L-BFGS ...")
        best, m_opt, L_opt, info = problem.optimum()
        opt_rows.append([problem.name, problem.n, problem.dim, fmt(best, ".6f"),
                         fmt(info["laplace_elbo"], ".4f"), fmt(info["gain_over_laplace"], ".3g"),
                         fmt(info["grad_norm"], ".1e")])
        if args.mc_particles > 0:
            log(f"[{problem.name}] Monte Carlo check of the quadrature ELBO ...")
            check_rows += check_elbo(problem, args.seed, args.mc_particles)
        results = {}
        for label, kw in NG_VARIANTS.items():
            results[label] = []
            for s in seeds:
                log(f"[{problem.name}] {label}, {args.ng_steps} steps, seed {s} ...")
                results[label].append(run(problem, best, "natgrad", args.ng_steps, s,
                                          ng_kwargs=kw))
        adam = {}
        for lr in ADAM_LRS:
            adam[lr] = []
            for s in seeds:
                log(f"[{problem.name}] Adam lr={lr}, {args.adam_steps} steps, seed {s} ...")
                adam[lr].append(run(problem, best, "adam", args.adam_steps, s, lr=lr))
        for label, runs in list(results.items()) + [(f"Adam lr={lr:g}", adam[lr])
                                                    for lr in ADAM_LRS]:
            firsts = [r["first"] for r in runs]
            stays = [r["stays"] for r in runs]
            rows.append([problem.name, label, runs[0]["steps"],
                         steps_list(firsts, runs[0]["steps"]),
                         steps_list(stays, runs[0]["steps"]),
                         fmt(float(np.median([r["median_tail"] for r in runs])), ".3g"),
                         fmt(float(np.median([r["final"] for r in runs])), ".3g"),
                         fmt(float(np.median([r["wall"] / r["steps"] * 1e3 for r in runs])),
                             ".1f")])
            for r, s in zip(runs, seeds):
                if r["error"] is not None:
                    notes.append(f"{problem.name} / {label} / seed {s}: {r['error']}")
                if r["reading"] is not None and r["reading"] > 1e-12:
                    notes.append(f"{problem.name} / {label} / seed {s}: (loc, L) read from the "
                                 f"guide differ from get_posterior() by {r['reading']:.2g}")
                for cat, msg, count in r["warnings"]:
                    notes.append(f"{problem.name} / {label} / seed {s}: {count} x {cat}: {msg}")
        for label, runs in results.items():
            summary = seed_summary(runs, adam, args.adam_steps)
            firsts = [x["ng_first"] if x["ng_first"] is not None else math.inf for x in summary]
            ratios = [x["ratio"] for x in summary]
            med_first = statistics.median(firsts)
            med_ratio = statistics.median(ratios)
            any_bound = any(x["bound"] for x in summary)
            ok_steps = med_first <= MAX_STEPS_TARGET
            ok_ratio = med_ratio >= RATIO_TARGET
            worst_ok = max(firsts) <= MAX_STEPS_TARGET and min(ratios) >= RATIO_TARGET
            why = [w for w, ok in (("steps > 30", ok_steps), ("ratio < 10", ok_ratio)) if not ok]
            verdict = "PASS" if ok_steps and ok_ratio else "FAIL (" + ", ".join(why) + ")"
            best_lrs = sorted({x["best_lr"] for x in summary if x["best_lr"] is not None})
            adam_firsts = [x["adam_first"] for x in summary]
            verdict_rows.append([
                problem.name, label, fmt_steps(med_first, args.ng_steps),
                "/".join(f"{x:g}" for x in best_lrs) or "none within 1 nat",
                steps_list(adam_firsts, args.adam_steps),
                ("> " if any_bound else "") + fmt(med_ratio, ".1f"),
                " ".join(("> " if x["bound"] else "") + fmt(x["ratio"], ".0f") for x in summary),
                fmt(float(np.median([r["median_tail"] for r in runs])), ".3g"),
                verdict + ("" if worst_ok or verdict != "PASS" else " (not every seed)")])

    print("### GGN targets: convergence to the optimal full-rank Gaussian ELBO (GLMs)\n")
    print(f"`SVI(model, AutoMultivariateNormal(model), optim, Trace_ELBO())`, one particle, "
          f"float64. Natural gradient with defaults (`curvature=\"auto\"`, which is the "
          f"Hessian here) and with `curvature=\"ggn\"`, {args.ng_steps} steps; Adam at lr "
          f"{'/'.join(f'{lr:g}' for lr in ADAM_LRS)} for {args.adam_steps} steps; same "
          f"initialisation; seeds {seeds[0]}..{seeds[-1]}. Gap = optimal full-rank ELBO "
          f"(quadrature, L-BFGS) - exact ELBO of the guide after each step. Target: at most "
          f"{MAX_STEPS_TARGET} steps to within 1 nat and >= {RATIO_TARGET:g}x fewer than the "
          f"best Adam (median over seeds; per-seed values listed).\n")
    print(markdown_table(["problem", "optimizer", "NG steps to <= 1 nat (median)",
                          "best Adam lr", "best Adam steps to <= 1 nat (per seed)",
                          "ratio Adam/NG (median)", "ratio per seed",
                          "NG median gap, last 10 %", "target"], verdict_rows))
    print()
    n_pass = sum(r[-1].startswith("PASS") for r in verdict_rows if "default" in r[1])
    n_all = sum("default" in r[1] for r in verdict_rows)
    print(f"**Target (default settings): {n_pass}/{n_all} problems pass.**\n")
    print("All runs (per-seed values, space separated; medians over seeds):\n")
    print(markdown_table(["problem", "optimizer", "steps", "steps to <= 1 nat",
                          "stays <= 1 nat from", "median gap, last 10 %", "final gap",
                          "ms / step (incl. exact ELBO)"], rows))
    print()
    print("Optimal full-rank Gaussian ELBO (quadrature; L-BFGS from the Laplace "
          "approximation; gradient norm of the ELBO in (m, L) at the optimum):\n")
    print(markdown_table(["problem", "n", "D", "optimal ELBO", "Laplace ELBO",
                          "gain over Laplace", "|grad|"], opt_rows))
    print()
    if check_rows:
        print(f"Check of the quadrature ELBO against Pyro's `Trace_ELBO` ({args.mc_particles} "
              f"single-particle estimates; ok when |MC - exact| <= 4 se + 1e-6 |exact|) and "
              f"of the Gauss-Hermite node count (ELBO with 2x the nodes - ELBO):\n")
        print(markdown_table(["problem", "guide state", "quadrature ELBO", "MC ELBO ± se", "z",
                              "check", "2x nodes - 1x"], check_rows))
        print()
    if notes:
        print("Notes:\n")
        for n in dict.fromkeys(notes):
            print(f"- {n}")
        print()


def steps_list(values, budget):
    return " ".join(str(v) if v is not None else f">{budget}" for v in values)


def fmt_steps(v, budget):
    return f"> {budget}" if v == math.inf else fmt(float(v), "g")


# -------------------------------------------------------------------------------------
# Cost
# -------------------------------------------------------------------------------------


class TimedOptim(pyro.optim.PyroOptim):
    """Times each call of the wrapped optimizer as ``SVI`` makes it."""

    def __init__(self, inner):  # nothing of PyroOptim's own to set up
        self.inner = inner
        self.times = []

    def __call__(self, params, *args, **kwargs):
        start = time.perf_counter()
        self.inner(params, *args, **kwargs)
        self.times.append(time.perf_counter() - start)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def cost_pair(n, d, repeats, seed, warmup=5, ng_kwargs=None):
    """Interleaved ``svi.step`` of a natural gradient and an Adam SVI loop on the same
    synthetic logistic regression (each with its own guide). Returns per-step times of
    the whole step and of the optimizer call alone, for both."""
    problem = GLMRegression.synthetic(n, d, "logistic", seed=seed)
    pyro.clear_param_store()
    seed_everything(seed)
    # A subclass gets its own parameter names, so the two guides share no parameters.
    adam_guide = type("AdamGuide", (AutoMultivariateNormal,), {})(problem.model)
    ng_guide = AutoMultivariateNormal(problem.model)
    ng = TimedOptim(NaturalGradient(ng_guide, **(ng_kwargs or {"curvature": "ggn"})))
    adam = TimedOptim(pyro.optim.Adam({"lr": 0.01}))
    svis = {"ng": SVI(problem.model, ng_guide, ng, Trace_ELBO()),
            "adam": SVI(problem.model, adam_guide, adam, Trace_ELBO())}
    steps = {"ng": [], "adam": []}
    cpu = {"ng": [], "adam": []}
    with WarningLog():
        for i in range(warmup + repeats):
            order = ("ng", "adam") if i % 2 == 0 else ("adam", "ng")
            for k in order:
                start, start_cpu = time.perf_counter(), time.thread_time()
                svis[k].step()
                if i >= warmup:
                    steps[k].append(time.perf_counter() - start)
                    cpu[k].append(time.thread_time() - start_cpu)
    ng.inner.detach()
    return {"ng_step": steps["ng"], "adam_step": steps["adam"],
            "ng_cpu": cpu["ng"], "adam_cpu": cpu["adam"],
            "ng_opt": ng.times[warmup:], "adam_opt": adam.times[warmup:]}


def med_ms(ts):
    return statistics.median(ts) * 1e3


def profile_ggn(n, d, steps, seed, top=24):
    """cProfile of ``steps`` natural-gradient (``curvature="ggn"``) ``svi.step`` calls;
    the functions of ``pyro_natgrad`` and the main torch entry points they call, by
    cumulative time per step."""
    problem = GLMRegression.synthetic(n, d, "logistic", seed=seed)
    guide, optim, svi = make_svi(problem, "natgrad", seed, ng_kwargs={"curvature": "ggn"})
    with WarningLog():
        for _ in range(5):
            svi.step()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            svi.step()
        prof.disable()
    optim.detach()
    stats = pstats.Stats(prof)
    rows = []
    for (path, line, name), (cc, nc, tt, ct, callers) in stats.stats.items():
        where = path.replace("\\", "/")
        mine = "/pyro_natgrad/" in where
        interesting = mine or name in (
            "step", "loss_and_grads", "get_trace", "vjp", "jvp", "vmap", "grad", "backward",
            "_jvp", "_vjp", "dense", "_inner", "cholesky_solve", "wrapped")
        if not interesting or ct / steps < 2e-4:
            continue
        short = where.split("/pyro_natgrad/")[-1] if mine else "/".join(where.split("/")[-2:])
        rows.append((ct / steps, tt / steps, nc / steps, f"{short}:{line} {name}"))
    rows.sort(reverse=True)
    return [[r[3], fmt(r[0] * 1e3, ".2f"), fmt(r[1] * 1e3, ".2f"), fmt(r[2], ".3g")]
            for r in rows[:top]]


def breakdown(n, d, repeats, seed):
    """Median CPU times (ms) of the parts of one GGN step, each called on its own at a
    fixed draw (interleaved, after the SVI loop has run a few steps so the model's
    arguments are captured). Uses the optimizer's ``_curvature`` (a diagnostic only)."""
    from torch.distributions import biject_to

    from pyro_natgrad.curvature import curvature_model
    from pyro_natgrad.ggn import ModelGGN

    problem = GLMRegression.synthetic(n, d, "logistic", seed=seed)
    guide, optim, svi = make_svi(problem, "natgrad", seed, ng_kwargs={"curvature": "ggn"})
    with WarningLog():
        for _ in range(3):
            svi.step()
    curv = optim._curvature
    optim.detach()
    with torch.no_grad():
        z = guide.get_posterior().sample()
    values = {name: biject_to(guide.prototype_trace.nodes[name]["fn"].support)(u)
              for name, u in curv.unpack(z).items()}
    model = curvature_model(guide.model)
    op = ModelGGN(model, values, curv.args, curv.kwargs)
    T = op._jacobian_rows()
    FT = op._fisher(T)
    elbo = Trace_ELBO()

    def loss_and_grads():
        elbo.loss_and_grads(problem.model, guide)
        for p in guide.parameters():
            p.grad = None

    parts = {
        "Trace_ELBO.loss_and_grads (the gradient, shared with Adam)": loss_and_grads,
        "one model trace (poutine.trace(model).get_trace)":
            lambda: pyro.poutine.trace(model).get_trace(*curv.args, **curv.kwargs),
        "ModelCurvature.ggn_precision(z) (all of the curvature)": lambda: curv.ggn_precision(z),
        "  ModelGGN(...) construction (no-grad trace + torch.func.vjp recording)":
            lambda: ModelGGN(model, values, curv.args, curv.kwargs),
        "    of which torch.func.vjp(coordinates, z) (pullback; unused by dense())":
            lambda: torch.func.vjp(op._coordinates, op.theta),
        "  GGNOperator.dense()": op.dense,
        "    of which _jacobian_rows() (vmap of jvp over d columns, a model trace)":
            op._jacobian_rows,
        "    of which _inner(T, F T) (the n x d^2 contraction)": lambda: op._inner(T, FT),
        "  ModelCurvature.hessian(z, prior_only=True) (model trace + d backward passes)":
            lambda: curv.hessian(z, prior_only=True),
    }
    times = {k: [] for k in parts}
    with WarningLog():
        for _ in range(3):
            for f in parts.values():
                f()
        for _ in range(repeats):
            for k, f in parts.items():
                start = time.thread_time()
                f()
                times[k].append(time.thread_time() - start)
    # CPU time of this (single torch) thread: on a shared machine much less disturbed by
    # other processes than wall time.
    return {k: med_ms(v) for k, v in times.items()}


def cost_section(args):
    rows, verdict, verdict_cpu = [], None, None
    sizes = [(20000, 10)] + [s for s in args.cost_sizes if s != (20000, 10)]
    # The default curvature ("hessian" at these sizes) for comparison, at n = 20,000.
    runs = [(n, d, "ggn") for n, d in sizes] + [(n, d, "hessian") for n, d in sizes
                                                if n == 20000]
    for n, d, curvature in runs:
        log(f"[cost] n={n}, d={d}, curvature={curvature}: {args.cost_repeats} interleaved "
            f"svi.step pairs ...")
        t = cost_pair(n, d, args.cost_repeats, args.seed, ng_kwargs={"curvature": curvature})
        ratio_step = statistics.median(t["ng_step"]) / statistics.median(t["adam_step"])
        ratio_opt = statistics.median(t["ng_opt"]) / statistics.median(t["adam_opt"])
        # The natural gradient's step beyond the shared ELBO gradient: whole step minus
        # Adam's whole step (same loss_and_grads) is the cost the curvature adds.
        extra = med_ms(t["ng_step"]) - med_ms(t["adam_step"])
        ratio_cpu = statistics.median(t["ng_cpu"]) / statistics.median(t["adam_cpu"])
        rows.append([n, d, curvature, fmt(med_ms(t["ng_step"]), ".2f"),
                     fmt(med_ms(t["adam_step"]), ".2f"),
                     fmt(ratio_step, ".1f"), fmt(med_ms(t["ng_cpu"]), ".2f"),
                     fmt(med_ms(t["adam_cpu"]), ".2f"), fmt(ratio_cpu, ".1f"),
                     fmt(med_ms(t["ng_opt"]), ".2f"),
                     fmt(med_ms(t["adam_opt"]), ".3f"), fmt(ratio_opt, ".0f"),
                     fmt(extra, ".2f")])
        if (n, d, curvature) == (20000, 10, "ggn"):
            verdict, verdict_cpu = ratio_step, ratio_cpu
    print("### GGN targets: cost of a GGN step (synthetic logistic regression)\n")
    print(f"One `svi.step()` with `NaturalGradient(guide, curvature=\"ggn\")` against one with "
          f"`pyro.optim.Adam({{\"lr\": 0.01}})`, `AutoMultivariateNormal`, `Trace_ELBO()`, "
          f"float64; two SVI loops in one process, steps interleaved (order alternating), "
          f"medians of {args.cost_repeats} steps after 5 untimed ones. \"optimizer call\": the "
          f"`optim(params)` call inside the step alone (timed by a wrapper). CPU: the step's "
          f"CPU time (`time.thread_time`, one torch thread), less disturbed by other "
          f"processes on a shared machine than wall time. Target: whole step ratio < "
          f"{COST_TARGET:g} at n = 20,000, d = 10 (wall time; the CPU-time ratio alongside). "
          f"Rows with `curvature=\"hessian\"` (what the default `\"auto\"` picks here) for "
          f"comparison.\n")
    print(markdown_table(["n", "d", "NG curvature", "NG step (ms)", "Adam step (ms)",
                          "ratio (step)", "NG step CPU (ms)", "Adam step CPU (ms)", "ratio (CPU)",
                          "NG optimizer call (ms)", "Adam optimizer call (ms)",
                          "ratio (call)", "NG step - Adam step (ms)"], rows))
    print()
    ok = verdict is not None and verdict < COST_TARGET
    print(f"**Target (n = 20,000, d = 10, whole step < {COST_TARGET:g}x Adam): "
          f"{'PASS' if ok else 'FAIL'}, ratio {fmt(verdict, '.1f')} (CPU time: "
          f"{fmt(verdict_cpu, '.1f')}).** (1-minute load average "
          f"of the machine after the timings: {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
          f"cores; absolute times vary with it, the interleaved ratios less.)\n")
    if args.breakdown_repeats > 0:
        parts, columns = None, []
        for n, d in sizes:
            log(f"[cost] breakdown of a GGN step at n={n}, d={d} ...")
            b = breakdown(n, d, args.breakdown_repeats, args.seed)
            parts = parts or list(b)
            columns.append(b)
        rows = [["↳ " * ((len(p) - len(p.lstrip())) // 2) + p.strip()]
                + [fmt(c[p], ".2f") for c in columns] for p in parts]
        print(f"Where a GGN step's time goes: each part called on its own at one draw "
              f"(median CPU time of {args.breakdown_repeats} interleaved calls, ms). Rows "
              f"marked ↳ are parts of the row above them. The scaling of each row with n "
              f"(at d = 10) and with d (at n = 20,000) is the check of O(n d^2 + d^3):\n")
        print(markdown_table(["part"] + [f"n={n}, d={d}" for n, d in sizes], rows))
        print()
    if args.profile_steps > 0:
        log(f"[cost] profiling {args.profile_steps} GGN steps at n=20000, d=10 ...")
        prof = profile_ggn(20000, 10, args.profile_steps, args.seed)
        print(f"Where a GGN step's time goes (cProfile of {args.profile_steps} `svi.step()` "
              f"calls at n = 20,000, d = 10; per step; cumulative includes callees, so rows "
              f"nest; profiling overhead inflates small functions):\n")
        print(markdown_table(["function", "cumulative ms / step", "own ms / step",
                              "calls / step"], prof))
        print()


# -------------------------------------------------------------------------------------


def parse_size(text):
    """``"20000x10"`` -> ``(20000, 10)``; argparse reports a malformed size as a usage
    error naming the option."""
    try:
        n, d = text.lower().split("x")
        return int(n), int(d)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size N x D, e.g. 20000x10")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 seed, 100 NG / 2000 Adam steps, 200 MC particles, "
                        "fewer cost repeats and sizes")
    p.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (3; 1 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="first seed (0)")
    p.add_argument("--ng-steps", type=int, default=None,
                   help="natural-gradient steps (300; 100 with --quick)")
    p.add_argument("--adam-steps", type=int, default=None,
                   help="Adam steps per lr (5000; 2000 with --quick)")
    p.add_argument("--mc-particles", type=int, default=None,
                   help="particles of the Monte Carlo check (1000; 200 with --quick; 0 skips)")
    p.add_argument("--cost-repeats", type=int, default=None,
                   help="timed step pairs per size (40; 15 with --quick)")
    p.add_argument("--cost-sizes", nargs="*", type=parse_size, default=None,
                   help="n x d sizes besides 20000x10 (default 5000x10 80000x10 20000x40; "
                        "with --quick 5000x10 20000x40)")
    p.add_argument("--profile-steps", type=int, default=None,
                   help="GGN steps profiled (20; 10 with --quick; 0 skips)")
    p.add_argument("--breakdown-repeats", type=int, default=None,
                   help="calls per part in the cost breakdown (30; 10 with --quick; 0 skips)")
    p.add_argument("--skip", nargs="*", default=[], choices=["convergence", "cost"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    q = args.quick
    defaults = {"seeds": (1, 3), "ng_steps": (100, 300), "adam_steps": (2000, 5000),
                "mc_particles": (200, 1000), "cost_repeats": (15, 40),
                "breakdown_repeats": (10, 30),
                "profile_steps": (10, 20)}
    for k, (quick, full) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, quick if q else full)
    if args.cost_sizes is None:
        args.cost_sizes = ([(5000, 10), (20000, 40)] if q else
                           [(5000, 10), (80000, 10), (20000, 40)])
    check_at_least(p, args, 1, "seeds", "ng_steps", "adam_steps", "cost_repeats", "threads")
    check_at_least(p, args, 0, "mc_particles", "profile_steps", "breakdown_repeats")
    for n, d in args.cost_sizes:
        if n < 1 or d < 1:
            p.error(f"--cost-sizes {n}x{d}: n and d must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    set_threads(args.threads)
    start = time.perf_counter()
    if "convergence" not in args.skip:
        convergence_section(args)
    if "cost" not in args.skip:
        cost_section(args)
    print(f"Environment: {environment_line()}; total wall time "
          f"{time.perf_counter() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
