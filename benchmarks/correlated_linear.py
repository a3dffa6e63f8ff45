"""A stiff, correlated linear regression above the mean-field Hessian limit: where the
gradient-only natural gradient of ``AutoNormal`` is known to trail Adam.

``y ~ N(X w, 1)``, ``w ~ N(0, I)``, ``X = Z (I + a R / sqrt(d)) diag(10^u)`` with ``Z``,
``R`` standard normal, ``u`` evenly spaced in ``[-b, b]`` (``--mixing a``,
``--decades b``: the columns' scales span ``2b`` decades), ``n = 4 d``. The posterior
is Gaussian, so the exact ELBO gap of a Gaussian guide to the optimum of its family is
closed form (:class:`problems.LinearRegression`). Contenders: ``NaturalGradient`` with
its defaults (for ``AutoNormal`` at d = 300: steps from the gradients alone), with
``curvature="hessian"`` (``D`` backward passes per step), for ``AutoNormal`` with
``curvature="hvp"`` (at most 101 Hessian-vector products per step), and Adam at three
learning rates; gap after each budget of single-particle ``Trace_ELBO`` steps.

    python benchmarks/correlated_linear.py [--d 300] [--guide normal|mvn] [--steps 1000]
        [--hessian-steps 100] [--hvp-steps STEPS]
"""

import argparse
import math
import os
import sys

import pyro
import torch
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    check_at_least, print_budget_table, seeded_generator, set_threads, svi_gaps)
from problems import LinearRegression, guide_moments  # noqa: E402

from pyro_natgrad import NaturalGradient  # noqa: E402


def design(d, mixing, decades, seed=1):
    g = seeded_generator(seed)
    n = 4 * d
    Z = torch.randn(n, d, generator=g, dtype=torch.float64)
    mix = torch.eye(d, dtype=torch.float64) + mixing * torch.randn(
        d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    X = Z @ mix * torch.logspace(-decades, decades, d, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    y = X @ w + torch.randn(n, generator=g, dtype=torch.float64)
    return LinearRegression(X, y, 1.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=300)
    p.add_argument("--guide", choices=("normal", "mvn"), default="normal")
    p.add_argument("--mixing", type=float, default=0.3)
    p.add_argument("--decades", type=float, default=0.0)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--hessian-steps", type=int, default=100)
    p.add_argument("--hvp-steps", type=int, default=None, help="(default: --steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    check_at_least(p, args, 1, "d", "steps", "hessian_steps", "hvp_steps", "threads")
    set_threads(args.threads)
    problem = design(args.d, args.mixing, args.decades)
    mean_field = args.guide == "normal"
    guide_cls = AutoNormal if mean_field else AutoMultivariateNormal
    best = problem.optimal_elbo(mean_field)
    budgets = [b for b in (10, 30, 100, 300, 1000, 3000, 10000) if b <= args.steps]
    contenders = [
        ("NaturalGradient (defaults)", lambda g: NaturalGradient(g), args.steps),
        ('NaturalGradient, curvature="hessian"',
         lambda g: NaturalGradient(g, curvature="hessian"), args.hessian_steps),
    ]
    if mean_field:
        contenders.append(('NaturalGradient, curvature="hvp"',
                           lambda g: NaturalGradient(g, curvature="hvp"),
                           args.hvp_steps or args.steps))
    contenders += [(f"Adam, lr {lr}", lambda g, lr=lr: pyro.optim.Adam({"lr": lr}), args.steps)
                   for lr in (0.001, 0.01, 0.1)]
    rows = svi_gaps(problem.model, guide_cls, contenders, best, budgets,
                    lambda g: problem.elbo(*guide_moments(g)), args.seed)
    print_budget_table(
        f"{guide_cls.__name__}, correlated linear regression (d = {args.d}, mixing "
        f"{args.mixing}, {2 * args.decades:g} decades of column scales)",
        f"Exact ELBO gap to the optimum of the guide's family ({best:.2f}) after each "
        f"number of SVI steps ('-': not run that long); seed {args.seed}; float64.",
        budgets, rows)


if __name__ == "__main__":
    main()
