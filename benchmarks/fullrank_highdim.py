"""AutoMultivariateNormal above the mean-field Hessian limit: a logistic regression with
``d`` = 300 weights (synthetic Gaussian design, n = 1500), single-particle
``Trace_ELBO``. Contenders: ``NaturalGradient`` with its defaults (``curvature="auto"``
computes the model's Hessian for a full-rank guide up to 1024 dimensions), with
``curvature="none"`` (steps from the gradients alone), and Adam at three learning
rates. Reported: the exact ELBO gap (Gauss-Hermite quadrature per data point) to the
optimal full-rank ELBO, found by L-BFGS on that exact ELBO (not by either optimizer),
after each budget of steps, and the time per step.

``--mixing a`` correlates the design's columns, ``X <- X (I + a R / sqrt(d))`` with
``R`` standard normal (the intercept column kept), and so the posterior's coordinates.

``--guide normal`` runs the same contenders with ``AutoNormal`` (whose default is
the gradient-only path above 256 dimensions); its gap is still measured to the
full-rank optimum, so it includes the mean-field family's own shortfall, the same for
every contender.

    python benchmarks/fullrank_highdim.py [--d 300] [--n 1500] [--steps 3000] [--quick]
        [--guide {mvn,normal}] [--mixing 0.3] [--factor 0.64]
"""

import argparse
import os
import sys

import pyro
import torch
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    check_at_least, environment_line, log, markdown_table, set_threads, svi_gaps)
from problems import GLMRegression, full_rank_moments  # noqa: E402

from pyro_natgrad import NaturalGradient  # noqa: E402


def design(n, d, mixing, seed=0, factor=0.0):
    """The synthetic logistic regression of :meth:`GLMRegression.synthetic`, with its
    columns (all but the intercept) mixed by ``I + mixing R / sqrt(d)``, or sharing one
    standard normal factor ``f``: ``sqrt(1 - factor) x + sqrt(factor) f``, pairwise
    correlation ``factor``."""
    problem = GLMRegression.synthetic(n, d, "logistic", seed=seed)
    if mixing == 0 and factor == 0:
        return problem
    g = torch.Generator().manual_seed(seed + 1)
    X = problem.X.clone()
    if mixing:
        R = torch.randn(d - 1, d - 1, generator=g, dtype=X.dtype)
        X[:, :-1] = X[:, :-1] @ (torch.eye(d - 1, dtype=X.dtype) + mixing * R / (d - 1) ** 0.5)
    if factor:
        f = torch.randn(n, 1, generator=g, dtype=X.dtype)
        X[:, :-1] = (1 - factor) ** 0.5 * X[:, :-1] + factor ** 0.5 * f
    w = torch.randn(d, generator=g, dtype=X.dtype) / d ** 0.5
    y = torch.bernoulli(torch.sigmoid(X @ w), generator=g)
    how = ([f"columns mixed by {mixing}"] if mixing else []) + (
        [f"one shared factor, correlation {factor}"] if factor else [])
    return GLMRegression(f"synthetic logistic, {', '.join(how)} (n={n}, d={d})", X, y,
                         "logistic", 1.0)


def moments(guide):
    """``(loc, L)`` of either guide kind."""
    if isinstance(guide, AutoNormal):
        with torch.no_grad():
            return guide.locs.w.detach(), torch.diag(guide.scales.w.detach())
    return full_rank_moments(guide)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=300)
    p.add_argument("--n", type=int, default=1500)
    p.add_argument("--steps", type=int, default=3000, help="steps of the cheap contenders")
    p.add_argument("--hessian-steps", type=int, default=100,
                   help="steps of the default (Hessian) run")
    p.add_argument("--quick", action="store_true", help="1000 steps, 50 Hessian steps")
    p.add_argument("--guide", choices=("mvn", "normal"), default="mvn")
    p.add_argument("--mixing", type=float, default=0.0,
                   help="correlation of the design's columns (see the docstring)")
    p.add_argument("--factor", type=float, default=0.0,
                   help="pairwise correlation of the columns through one shared factor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.hessian_steps = 1000, 50
    check_at_least(p, args, 1, "n", "steps", "hessian_steps", "threads")
    check_at_least(p, args, 2, "d")  # an intercept and at least one covariate to mix
    set_threads(args.threads)
    if not 0 <= args.factor < 1:
        p.error(f"--factor must be in [0, 1), got {args.factor}")
    problem = design(args.n, args.d, args.mixing, factor=args.factor)
    log(f"optimal full-rank ELBO by L-BFGS (d={args.d}) ...")
    best, *_ = problem.optimum()
    budgets = [b for b in (10, 30, 100, 300, 1000, 3000, 10000) if b <= args.steps]
    guide_cls = AutoNormal if args.guide == "normal" else AutoMultivariateNormal
    contenders = [
        ("NaturalGradient (defaults: model Hessian)", lambda g: NaturalGradient(g),
         args.hessian_steps),
        ('NaturalGradient, curvature="none"',
         lambda g: NaturalGradient(g, curvature="none"), args.steps),
    ] + [(f"Adam, lr {lr}", lambda g, lr=lr: pyro.optim.Adam({"lr": lr}), args.steps)
         for lr in (0.001, 0.01, 0.1)]
    if args.guide == "normal":  # "auto" is the gradient-only path here: the Hessian explicitly
        contenders[0] = ('NaturalGradient, curvature="hessian"',
                         lambda g: NaturalGradient(g, curvature="hessian"), args.hessian_steps)
        contenders[1] = ("NaturalGradient (defaults: gradients alone)",
                         lambda g: NaturalGradient(g), args.steps)
    rows = svi_gaps(problem.model, guide_cls, contenders, best, budgets,
                    lambda g: problem.elbo(*moments(g)), args.seed)
    print(f"### {guide_cls.__name__} at d = {args.d}: exact ELBO gap to the full-rank "
          f"optimum\n")
    print(f"{problem.name}; optimal full-rank ELBO {best:.2f} (L-BFGS on the exact ELBO). "
          f"Gap after each number of SVI steps ('-': not run that long); seed "
          f"{args.seed}; float64.\n")
    print(markdown_table(["optimizer"] + [str(b) for b in budgets] + ["ms/step"], rows))
    print(f"\nEnvironment: {environment_line()}")


if __name__ == "__main__":
    main()
