"""``curvature="hvp"`` on a non-Gaussian posterior: a mean-field ``AutoNormal`` over a
logistic regression with correlated features, above the ``"auto"`` Hessian limit.

``y ~ Bernoulli(sigmoid(X w))``, ``w ~ N(0, I_d)``, ``X = Z (I + a R / sqrt(d))`` with
``Z``, ``R`` standard normal (``--mixing a``), ``n`` rows, true weights of norm 3. No
closed form: the table gives the negative ELBO (lower is better) estimated with
``--draws`` vectorised draws of the guide after each budget of single-particle
``Trace_ELBO`` steps. Contenders: ``NaturalGradient`` with its defaults (gradient-only
steps at this size), with ``curvature="hvp"``, and Adam at two learning rates.

    python benchmarks/hvp_logistic.py [--d 400] [--n 2000] [--steps 1000]
"""

import argparse
import math
import os
import sys

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    check_at_least, print_budget_table, seeded_generator, set_threads, svi_gaps)

from pyro_natgrad import NaturalGradient  # noqa: E402


def logistic_problem(d, n, mixing, seed=0):
    g = seeded_generator(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) @ (
        torch.eye(d, dtype=torch.float64)
        + mixing * torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d))
    w = 3 * torch.randn(d, generator=g, dtype=torch.float64) / math.sqrt(d)
    y = torch.bernoulli(torch.sigmoid(X @ w), generator=g)

    def model():
        z = pyro.sample("w", dist.Normal(X.new_zeros(d), 1.0).to_event(1))
        # z @ X.T, not X @ z: the ELBO estimate below draws z with a leading batch dim
        pyro.sample("y", dist.Bernoulli(logits=z @ X.T).to_event(1), obs=y)

    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=400)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--mixing", type=float, default=0.3)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--draws", type=int, default=500, help="draws per ELBO estimate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    check_at_least(p, args, 1, "d", "n", "steps", "draws", "threads")
    set_threads(args.threads)
    model = logistic_problem(args.d, args.n, args.mixing)
    estimator = Trace_ELBO(num_particles=args.draws, vectorize_particles=True,
                           max_plate_nesting=0)

    def elbo(guide):
        with torch.no_grad():
            return -estimator.loss(model, guide)

    budgets = [b for b in (10, 30, 100, 300, 1000, 3000) if b <= args.steps]
    contenders = [
        ("NaturalGradient (defaults)", lambda g: NaturalGradient(g), args.steps),
        ('NaturalGradient, curvature="hvp"', lambda g: NaturalGradient(g, curvature="hvp"),
         args.steps),
    ] + [(f"Adam, lr {lr}", lambda g, lr=lr: pyro.optim.Adam({"lr": lr}), args.steps)
         for lr in (0.01, 0.1)]
    # svi_gaps reports best - ELBO: with best = 0 that is the negative ELBO.
    rows = svi_gaps(model, AutoNormal, contenders, 0.0, budgets, elbo, args.seed, spec=".1f")
    print_budget_table(
        f"AutoNormal, logistic regression (d = {args.d}, n = {args.n}, mixing {args.mixing})",
        f"Negative ELBO (estimated with {args.draws} draws of the guide; lower is better) "
        f"after each number of SVI steps; seed {args.seed}; float64.", budgets, rows)


if __name__ == "__main__":
    main()
