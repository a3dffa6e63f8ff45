"""Hand-written mean-field Gaussian guides: what stepping without the model's Hessian
costs on a correlated posterior.

The diabetes linear regression (11 weights, known noise) with a hand-written guide
``w ~ Normal(loc, scale).to_event(1)`` (``pyro.param`` values, ``scale`` constrained
positive), as a plain function and as a ``PyroModule`` (whose calls the optimizer
records, so its steps have the control variate), against ``AutoNormal`` with the
defaults (the model's Hessian: a Newton step for the mean) and with
``curvature="none"`` (the steps a hand-written guide takes), and against Adam at three
learning rates on the function guide. Exact ELBO gap to the mean-field optimum (closed
form for a Gaussian q and this model), median over seeds, single-particle Trace_ELBO.

    python benchmarks/handwritten_gaussian.py [--steps 300] [--seeds 4]
"""

import argparse
import os
import statistics
import sys
import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroParam

sys.path.insert(0, os.path.dirname(__file__))
from problems import LinearRegression  # noqa: E402

from pyro_natgrad import NaturalGradient  # noqa: E402


def function_guide(d):
    def guide():
        loc = pyro.param("loc", torch.zeros(d, dtype=torch.float64))
        scale = pyro.param("scale", torch.ones(d, dtype=torch.float64),
                           constraint=dist.constraints.positive)
        pyro.sample("w", dist.Normal(loc, scale).to_event(1))
    return guide, lambda: (pyro.param("loc").detach(), pyro.param("scale").detach())


class ModuleGuide(PyroModule):
    def __init__(self, d):
        super().__init__()
        self.loc = PyroParam(torch.zeros(d, dtype=torch.float64))
        self.scale = PyroParam(torch.ones(d, dtype=torch.float64),
                               constraint=dist.constraints.positive)

    def forward(self):
        pyro.sample("w", dist.Normal(self.loc, self.scale).to_event(1))


def module_guide(d):
    guide = ModuleGuide(d)
    return guide, lambda: (guide.loc.detach(), guide.scale.detach())


def auto_guide(model):
    def make(d):
        guide = AutoNormal(model, init_scale=1.0)
        return guide, lambda: (guide.locs.w.detach(), guide.scales.w.detach())
    return make


def run(problem, make_guide, make_optim, steps, checkpoints, seed):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide, moments = make_guide(problem.dim)
    svi = SVI(problem.model, guide, make_optim(guide), Trace_ELBO())
    best = problem.optimal_elbo(mean_field=True)
    gaps = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(1, steps + 1):
            svi.step()
            if i in checkpoints:
                loc, scale = moments()
                gaps[i] = best - problem.elbo(loc, torch.diag(scale.square()))
    return gaps


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=4)
    args = ap.parse_args()
    if args.steps < 1 or args.seeds < 1:
        ap.error("--steps and --seeds must be at least 1")
    torch.set_num_threads(1)
    problem = LinearRegression.diabetes()
    checkpoints = [c for c in (10, 30, 100, 300, 1000, 3000) if c <= args.steps]
    rows = {
        "hand-written function guide, NaturalGradient": (function_guide, NaturalGradient),
        "hand-written PyroModule guide, NaturalGradient": (module_guide, NaturalGradient),
        "AutoNormal, NaturalGradient (defaults)": (auto_guide(problem.model), NaturalGradient),
        "AutoNormal, NaturalGradient(curvature='none')": (
            auto_guide(problem.model), lambda g: NaturalGradient(g, curvature="none")),
    }
    for lr in (0.001, 0.01, 0.1):
        rows[f"hand-written function guide, Adam lr={lr}"] = (
            function_guide, (lambda lr: lambda g: pyro.optim.Adam({"lr": lr}))(lr))
    print(f"diabetes linear regression, d = {problem.dim}: median over {args.seeds} seeds of "
          f"the exact ELBO gap to the mean-field optimum (nats)")
    print("| guide, optimizer | " + " | ".join(f"{c} steps" for c in checkpoints) + " |")
    print("|---|" + "---|" * len(checkpoints))
    for name, (make_guide, make_optim) in rows.items():
        gaps = {c: [] for c in checkpoints}
        for seed in range(args.seeds):
            for c, gap in run(problem, make_guide, make_optim, args.steps, checkpoints,
                              seed).items():
                gaps[c].append(gap)
        cells = [f"{statistics.median(v):.3g}" for v in gaps.values()]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
