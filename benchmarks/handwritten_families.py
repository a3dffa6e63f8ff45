"""Hand-written guides of non-Gaussian families under the default settings.

Each case fits a hand-written guide with ``SVI(model, guide, NaturalGradient(guide),
Trace_ELBO())`` (one particle, defaults) and compares it with its known optimum, over
several seeds; it prints the worst and median error after 50 and 200 steps:

* ``beta32``/``beta64``: Beta(1, 1) prior, 8 heads in 10 tosses, a ``Beta(a, b)`` guide
  started at the prior (float32/float64); the posterior is Beta(9, 3). Error: the
  guide's mean off the posterior's, in posterior sds; second figure: sd ratio.
* ``laplace``/``studentt``: a Normal posterior N(m, 1/9) fitted with a ``Laplace`` or
  ``StudentT(30)`` guide. By symmetry the optimum's mean is ``m``; the best Laplace has
  sd ``1/3`` (the Student-t's is close to it). Error in posterior sds; second figure:
  the guide's sd over 1/3.
* ``cat``: a ``Categorical`` guide with score-function gradients for a three-class
  latent; error: the largest difference of the probabilities from the posterior's;
  second figure: the smallest probability.

``--site-max-kl`` sets :data:`pyro_natgrad.expfam_step.SITE_MAX_KL` (1 nat by default);
``--site-max-kl 10`` gives the steps before that bound (``max_kl`` = 10 alone).
Run ``python benchmarks/handwritten_families.py --help`` for the options.
"""

import argparse
import math
import os
import statistics
import sys
import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import environment_line, markdown_table  # noqa: E402

from pyro_natgrad import NaturalGradient, expfam_step  # noqa: E402


def fit(model, guide, args, steps, seed):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    svi = SVI(model, guide, NaturalGradient(guide), Trace_ELBO())
    for _ in range(steps):
        svi.step(*args)
    return {k: v.detach().double() for k, v in pyro.get_param_store().items()}


def beta_case(dtype):
    x = torch.tensor([1.0, 1, 0, 1, 1, 1, 0, 1, 1, 1], dtype=dtype)
    one = torch.tensor(1.0, dtype=dtype)

    def model(x):
        p = pyro.sample("p", dist.Beta(one, one))
        with pyro.plate("d", len(x)):
            pyro.sample("x", dist.Bernoulli(p), obs=x)

    def guide(x):
        a = pyro.param("a", one.clone(), constraint=constraints.positive)
        b = pyro.param("b", one.clone(), constraint=constraints.positive)
        pyro.sample("p", dist.Beta(a, b))

    post = dist.Beta(torch.tensor(9.0, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64))

    def error(v):
        q = dist.Beta(v["a"], v["b"])
        return float((q.mean - post.mean).abs() / post.stddev), float(q.stddev / post.stddev)

    return model, guide, (x,), error


def location_scale_case(family):
    y = torch.tensor([1.4952, 0.8357, 0.322, -0.0591, 1.7477, 1.2389, 0.6078, 1.1519])
    m, s = float(y.sum()) / 9, 1 / 3  # prior N(0, 1), unit noise

    def model(y):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("n", len(y)):
            pyro.sample("y", dist.Normal(z, 1.0), obs=y)

    def guide(y):
        loc = pyro.param("m", torch.tensor(0.0))
        scale = pyro.param("s", torch.tensor(1.0), constraint=constraints.positive)
        pyro.sample("z", dist.Laplace(loc, scale) if family == "laplace"
                    else dist.StudentT(30.0, loc, scale))

    def error(v):
        sd = float(v["s"]) * (math.sqrt(2) if family == "laplace" else math.sqrt(30 / 28))
        return abs(float(v["m"]) - m) / s, sd / s

    return model, guide, (y,), error


def categorical_case():
    mus = torch.tensor([-2.0, 0.0, 3.0])
    prior = torch.tensor([0.5, 0.3, 0.2])
    y = torch.tensor([2.5, 2.0])

    def model(y):
        z = pyro.sample("z", dist.Categorical(prior))
        with pyro.plate("n", len(y)):
            pyro.sample("y", dist.Normal(mus[z], 1.0), obs=y)

    def guide(y):
        p = pyro.param("p", torch.ones(3) / 3, constraint=constraints.simplex)
        pyro.sample("z", dist.Categorical(p))

    post = (prior.log() + dist.Normal(mus.unsqueeze(-1), 1.0).log_prob(y).sum(-1)).softmax(-1)

    def error(v):
        p = pyro.param("p").detach().double()
        return float((p - post.double()).abs().max()), float(p.min())

    return model, guide, (y,), error


CASES = {"beta32": lambda: beta_case(torch.float32), "beta64": lambda: beta_case(torch.float64),
         "laplace": lambda: location_scale_case("laplace"),
         "studentt": lambda: location_scale_case("studentt"), "cat": categorical_case}
SECOND = {"beta32": "sd ratio", "beta64": "sd ratio", "laplace": "sd ratio",
          "studentt": "sd ratio", "cat": "smallest p"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--seeds", type=int, default=8, help="seeds per case (8)")
    parser.add_argument("--site-max-kl", type=float, default=None,
                        help="set expfam_step.SITE_MAX_KL (default: leave it, 1 nat)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.site_max_kl is not None and not args.site_max_kl > 0:
        parser.error("--site-max-kl must be positive (a bound on each step's KL, in nats)")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    if args.site_max_kl is not None:
        expfam_step.SITE_MAX_KL = args.site_max_kl
    rows = []
    for name in args.cases:
        model, guide, data, error = CASES[name]()
        err = {50: [], 200: []}
        second = []
        for seed in range(args.seeds):
            for steps in (50, 200):
                e, other = error(fit(model, guide, data, steps, seed))
                err[steps].append(e)
                if steps == 200:
                    second.append(other)

        spread = f"{SECOND[name]} {min(second):.3g}..{max(second):.3g}"
        med = statistics.median
        rows.append([name, f"{max(err[50]):.3g}", f"{med(err[50]):.3g}", f"{max(err[200]):.3g}",
                     f"{med(err[200]):.3g}", spread])
        print(f"[{name}] done", file=sys.stderr, flush=True)
    print(f"SITE_MAX_KL = {expfam_step.SITE_MAX_KL}, {args.seeds} seeds, defaults otherwise\n")
    print(markdown_table(["case", "error@50 worst", "median", "error@200 worst", "median",
                          "after 200 steps"], rows))
    print("\n" + environment_line())


if __name__ == "__main__":
    main()
