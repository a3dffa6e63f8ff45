"""Neal's funnel with a mean-field guide: where the model's Hessian misleads the defaults.

``v ~ N(0, 3^2)``, ``x_i | v ~ N(0, e^v)`` (5 of them), fitted by ``AutoNormal``. The
optimal mean-field Gaussian is found by L-BFGS on the closed-form ELBO, and each fit is
scored by its exact ELBO gap to it (nats). Prints, per seed, the gap after the given
steps for ``NaturalGradient`` with its defaults, with ``curvature="none"`` and with
``StepSize(initial=0.5)``, and for ``ClippedAdam`` (lr 0.02, decay 0.9995 a step, six
times as many steps), with the lowest mean of ``v`` each run visited.

    python benchmarks/funnel.py [--steps 500] [--seeds 3]
"""

import argparse
import math
import os
import sys
import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

sys.path.insert(0, os.path.dirname(__file__))
from common import check_at_least  # noqa: E402

from pyro_natgrad import NaturalGradient, StepSize  # noqa: E402

D = 5


def model():
    v = pyro.sample("v", dist.Normal(torch.tensor(0.0), 3.0))
    pyro.sample("x", dist.Normal(torch.zeros(D), torch.exp(v / 2).expand(D)).to_event(1))


def elbo(m, log_s, a, log_b):
    """The exact ELBO of q(v) = N(m, s^2), q(x_i) = N(a_i, b_i^2)."""
    s2, b2 = (2 * log_s).exp(), (2 * log_b).exp()
    prior_v = -0.5 * math.log(2 * math.pi * 9) - (m ** 2 + s2) / 18
    # E[log N(x; 0, e^v)] with E[e^-v] = e^(-m + s^2 / 2)
    lik = (-0.5 * math.log(2 * math.pi) - m / 2 - 0.5 * (a ** 2 + b2) * (-m + s2 / 2).exp()).sum()
    entropy = 0.5 * (1 + D) * math.log(2 * math.pi * math.e) + log_s + log_b.sum()
    return prior_v + lik + entropy


def best_elbo():
    p = [torch.zeros((), dtype=torch.float64, requires_grad=True) for _ in range(2)] + \
        [torch.zeros(D, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    opt = torch.optim.LBFGS(p, max_iter=500, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-15)

    def closure():
        opt.zero_grad()
        loss = -elbo(*p)
        loss.backward()
        return loss

    opt.step(closure)
    return float(elbo(*p))


def fit(make_optim, steps, seed):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoNormal(model)
    svi = SVI(model, guide, make_optim(guide), Trace_ELBO())
    lowest = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            svi.step()
            lowest = min(lowest, float(guide.locs.v))
    with torch.no_grad():
        value = elbo(guide.locs.v.double(), guide.scales.v.double().log(),
                     guide.locs.x.double(), guide.scales.x.double().log())
    return float(value), lowest


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    check_at_least(ap, args, 1, "steps", "seeds")
    torch.set_num_threads(1)
    best = best_elbo()
    contenders = [
        ("NaturalGradient (defaults)", lambda g: NaturalGradient(g), args.steps),
        ('NaturalGradient, curvature="none"', lambda g: NaturalGradient(g, curvature="none"),
         args.steps),
        ("NaturalGradient, StepSize(initial=0.5)",
         lambda g: NaturalGradient(g, step_size=StepSize(initial=0.5)), args.steps),
        ("ClippedAdam lr 0.02, lrd 0.9995", lambda g: pyro.optim.ClippedAdam(
            {"lr": 0.02, "lrd": 0.9995}), 6 * args.steps),
    ]
    print(f"Neal's funnel (v and {D} x), AutoNormal; optimal mean-field ELBO {best:.4f}")
    print(f"{'optimizer':40s} {'steps':>6s}  " +
          "  ".join(f"seed {s}: gap (min v loc)" for s in range(args.seeds)))
    for name, make, steps in contenders:
        cells = []
        for seed in range(args.seeds):
            value, lowest = fit(make, steps, seed)
            cells.append(f"{best - value:13.3f} ({lowest:5.2f})")
        print(f"{name:40s} {steps:6d}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
