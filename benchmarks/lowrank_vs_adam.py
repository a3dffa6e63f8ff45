"""AutoLowRankMultivariateNormal: NaturalGradient (with its defaults, and with
``curvature="none"``, the path it takes above 256 latent dimensions) against Adam at
three learning rates on the diabetes linear regression, exact ELBO gap after each budget
of SVI steps (single-particle Trace_ELBO).

The reference is the best ELBO of the low-rank family, found by L-BFGS on the exact
ELBO (closed form for a Gaussian q), not by either optimizer.

    python benchmarks/lowrank_vs_adam.py [--steps 3000] [--seeds 3] [--rank 3]
"""

import argparse
import math
import os
import sys
import time
import warnings

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoLowRankMultivariateNormal

sys.path.insert(0, os.path.dirname(__file__))
from common import check_at_least  # noqa: E402
from problems import LinearRegression  # noqa: E402

from pyro_natgrad import NaturalGradient  # noqa: E402


def lowrank_moments(guide):
    with torch.no_grad():
        post = guide.get_posterior()
        return post.loc.detach(), post.covariance_matrix.detach()


def best_lowrank_elbo(problem, rank, seed=0):
    """max over (loc, W, D) of the exact ELBO, by L-BFGS from several starts."""
    best = -math.inf
    d = problem.dim
    for s in range(3):
        g = torch.Generator().manual_seed(seed + s)
        loc = problem.mean.clone().requires_grad_()
        W = (0.1 * torch.randn(d, rank, generator=g, dtype=torch.float64)).requires_grad_()
        logD = torch.full((d,), -4.0, dtype=torch.float64).requires_grad_()
        opt = torch.optim.LBFGS([loc, W, logD], max_iter=5000, tolerance_grad=1e-12,
                                tolerance_change=1e-15, history_size=50,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            S = W @ W.T + torch.diag(logD.exp())
            loss = -problem.elbo_tensor(loc, S)
            loss.backward()
            return loss

        for _ in range(5):
            opt.step(closure)
        with torch.no_grad():
            S = W @ W.T + torch.diag(logD.exp())
            best = max(best, problem.elbo(loc.detach(), S))
    return best


def run(problem, rank, optim, steps, checkpoints, seed):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)

    def model():
        problem.model()

    guide = AutoLowRankMultivariateNormal(model, rank=rank)
    guide()
    opt = optim(guide) if callable(optim) and not isinstance(optim, pyro.optim.PyroOptim) \
        else optim
    svi = SVI(model, guide, opt, Trace_ELBO())
    out = {}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(1, steps + 1):
            svi.step()
            if i in checkpoints:
                out[i] = problem.elbo(*lowrank_moments(guide))
    return out, (time.perf_counter() - t0) / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rank", type=int, default=3)
    args = ap.parse_args()
    check_at_least(ap, args, 1, "steps", "seeds", "rank")
    torch.set_num_threads(1)
    problem = LinearRegression.diabetes()
    ref = best_lowrank_elbo(problem, args.rank)
    full = problem.optimal_elbo(mean_field=False)
    print(f"diabetes linear regression, d = {problem.dim}, rank {args.rank}: best low-rank "
          f"ELBO {ref:.4f} (full-rank optimum = log evidence {full:.4f})")
    checkpoints = [c for c in (10, 30, 100, 300, 1000, 3000, 10000) if c <= args.steps]
    methods = {
        "NaturalGradient (defaults: Hessian, projection)": lambda g: NaturalGradient(g),
        # the path above MAX_CURVATURE_DIM latent dimensions: natural mean, Adam covariance
        "NaturalGradient (curvature='none')": lambda g: NaturalGradient(g, curvature="none"),
    }
    for lr in (0.001, 0.01, 0.1):
        methods[f"Adam lr={lr}"] = (lambda lr: lambda g: pyro.optim.Adam({"lr": lr}))(lr)
    print("median over seeds of the exact ELBO gap (best low-rank ELBO - ELBO); "
          "time per step")
    print("| method | " + " | ".join(f"{c} steps" for c in checkpoints) + " | ms/step |")
    print("|---|" + "---|" * (len(checkpoints) + 1))
    for name, make in methods.items():
        gaps = {c: [] for c in checkpoints}
        times = []
        for seed in range(args.seeds):
            out, per_step = run(problem, args.rank, make, args.steps, checkpoints, seed)
            times.append(per_step)
            for c in checkpoints:
                gaps[c].append(ref - out[c])
        cells = [f"{sorted(v)[len(v) // 2]:.3g}" for v in gaps.values()]
        ms = 1e3 * sorted(times)[len(times) // 2]
        print(f"| {name} | " + " | ".join(cells) + f" | {ms:.2f} |", flush=True)


if __name__ == "__main__":
    main()
