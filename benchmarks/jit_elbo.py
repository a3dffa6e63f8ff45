"""``NaturalGradient`` under ``JitTrace_ELBO`` against ``Trace_ELBO``.

A compiled ELBO runs no hooks, so the optimizer replays the guide from the step's
random state and keeps the draw where the gradients confirm it
(:mod:`pyro_natgrad.replay`). The problem: the diabetes linear regression with known
noise (11 weights, exact posterior; ``benchmarks/problems.py``). The table gives, over
``--seeds`` seeds, the median and worst error of the guide's mean in exact posterior
sds (for the mean-field guide: its optimum's mean, which is the posterior mean) and of
its sds relative to the family's optimal ones, after each step budget, for the default
optimizer with:

* ``Trace_ELBO``: the reference;
* ``JitTrace_ELBO``: replay confirmed at every step after the first;
* ``JitTrace_ELBO`` with a ``torch.rand`` in the loop between steps: every replay
  is another draw than the gradients' (the Hessian is still taken there, without the
  control variate);
* ``JitTrace_ELBO(num_particles=4, vectorize_particles=True)``: one replayed draw
  cannot be the four particles', as above.

Run with ``--replay off`` to see the steps without replay (what the optimizer did
before: no control variate, no Hessian; but for the first step, whose tracing-run draws
now give the Hessian). The latest output is in ``benchmarks/RESULTS_jit.md``.

    python benchmarks/jit_elbo.py [--seeds 6] [--steps 10 30 100]
"""

import argparse
import os
import statistics
import sys
import warnings

import pyro
import torch
from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import check_at_least, set_threads  # noqa: E402
from problems import LinearRegression  # noqa: E402

import pyro_natgrad.optim  # noqa: E402
from pyro_natgrad import NaturalGradient  # noqa: E402

PROBLEM = LinearRegression.diabetes()
NOISE = PROBLEM.noise


def model(X, y):
    w = pyro.sample("w", pyro.distributions.Normal(X.new_zeros(X.shape[-1]), 1.0).to_event(1))
    with pyro.plate("n", X.shape[0], dim=-1):
        mean = (X @ w.unsqueeze(-1)).squeeze(-1)  # broadcasts over vectorised particles
        pyro.sample("y", pyro.distributions.Normal(mean, NOISE), obs=y)


def errors(guide):
    """(worst |mean error| in posterior sds, worst |sd / optimal sd - 1|)."""
    mu, cov, precision = PROBLEM.mean, PROBLEM.cov, PROBLEM.precision
    with torch.no_grad():
        if isinstance(guide, AutoNormal):
            m, sd, best_sd = guide.locs.w, guide.scales.w, precision.diagonal().rsqrt()
        else:
            q = guide.get_posterior()
            m, sd, best_sd = q.mean, q.stddev, cov.diagonal().sqrt()
    m, sd = m.detach(), sd.detach()
    return (float(((m - mu) / cov.diagonal().sqrt()).abs().max()),
            float((sd / best_sd - 1).abs().max()))


SETTINGS = {
    "Trace_ELBO": (lambda: Trace_ELBO(), False),
    "JitTrace_ELBO": (lambda: JitTrace_ELBO(ignore_jit_warnings=True), False),
    "JitTrace_ELBO, rand between steps": (lambda: JitTrace_ELBO(ignore_jit_warnings=True),
                                          True),
    "JitTrace_ELBO, 4 vectorised particles": (
        lambda: JitTrace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1,
                              ignore_jit_warnings=True), False),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=6)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 30, 100])
    p.add_argument("--replay", choices=["on", "off"], default="on")
    args = p.parse_args(argv)
    check_at_least(p, args, 1, "seeds", "steps")
    set_threads(1)
    torch.set_default_dtype(torch.float64)
    if args.replay == "off":  # every replay rejected and no draw kept: the old steps
        pyro_natgrad.optim.replay_guide = lambda *a, **k: []
    X, y = PROBLEM.X, PROBLEM.y
    print(f"replay {args.replay}; {args.seeds} seeds; errors: median / worst")
    print(f"| {'guide':22} | {'ELBO':37} | {'steps':>5} | {'mean error (post. sds)':>22} | "
          f"{'sd error (relative)':>20} |")
    print(f"|{'-' * 24}|{'-' * 39}|{'-' * 7}|{'-' * 24}|{'-' * 22}|")
    for guide_cls in (AutoMultivariateNormal, AutoNormal):
        for name, (make, disturb) in SETTINGS.items():
            for steps in args.steps:
                mean_err, sd_err = [], []
                for seed in range(args.seeds):
                    pyro.clear_param_store()
                    pyro.set_rng_seed(seed)
                    guide = guide_cls(model)
                    svi = SVI(model, guide, NaturalGradient(guide), make())
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        for _ in range(steps):
                            if disturb:
                                torch.rand(())
                            svi.step(X, y)
                    a, b = errors(guide)
                    mean_err.append(a)
                    sd_err.append(b)
                print(f"| {guide_cls.__name__:22} | {name:37} | {steps:>5} | "
                      f"{statistics.median(mean_err):10.2g} / {max(mean_err):9.2g} | "
                      f"{statistics.median(sd_err):9.2g} / {max(sd_err):8.2g} |", flush=True)


if __name__ == "__main__":
    main()
