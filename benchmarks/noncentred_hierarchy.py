"""A non-centred normal hierarchy above the mean-field Hessian limit: where the defaults'
steps from gradients alone crawl.

``y_jk ~ N(mu + tau z_j, 1)`` for ``J`` groups of ``m``, ``z_j ~ N(0, 1)``,
``mu ~ N(0, 10^2)``, ``tau ~ HalfNormal(5)``, fitted by ``AutoNormal`` (``J + 2``
latents; above 256 the defaults take mean-field steps from gradients alone). ``mu``
shares a direction with every ``z_j`` (``mu + tau z_j`` is what the data see), the
structure in which such steps are slow. Prints the guide's medians of ``mu`` and ``tau``
after each budget of steps against their posterior means, computed by quadrature over
``tau`` (``mu`` given ``tau`` is Gaussian), for ``NaturalGradient`` with its defaults,
with ``curvature="hvp"``, and for Adam at lr 0.01 and 0.1.

    python benchmarks/noncentred_hierarchy.py [--groups 500] [--per-group 5] [--steps 3000]
"""

import argparse
import os
import sys
import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import check_at_least, environment_line, log, markdown_table, set_threads  # noqa: E402

from pyro_natgrad import NaturalGradient  # noqa: E402

PRIOR_MU, PRIOR_TAU = 10.0, 5.0


def data(groups, per_group, tau=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 3.0 + tau * torch.randn(groups, 1, generator=g, dtype=torch.float64) + torch.randn(
        groups, per_group, generator=g, dtype=torch.float64)


def make_model(y):
    groups, per_group = y.shape

    def model():
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), PRIOR_MU))
        tau = pyro.sample("tau", dist.HalfNormal(torch.tensor(PRIOR_TAU, dtype=y.dtype)))
        with pyro.plate("groups", groups):
            z = pyro.sample("z", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 1.0))
            with pyro.plate("obs", per_group, dim=-2):
                pyro.sample("y", dist.Normal(mu + tau * z, 1.0), obs=y.T)

    return model


def posterior_means(y, points=20000):
    """``(E[mu | y], E[tau | y])`` by quadrature over ``tau``: given ``tau`` the group
    means are ``N(mu, tau^2 + 1/m)`` and ``mu`` integrates out in closed form."""
    groups, per_group = y.shape
    means = y.mean(-1)
    tau = torch.linspace(0, 12, points + 1, dtype=torch.float64)[1:]
    v = tau.square() + 1 / per_group
    precision = groups / v + PRIOR_MU ** -2  # of mu given tau
    post_mu = means.sum() / v / precision
    # log p(means | tau) up to a constant: the Gaussian over mu integrated out
    log_like = (-0.5 * groups * v.log() - 0.5 * (means.square().sum() / v)
                + 0.5 * precision * post_mu.square() - 0.5 * precision.log())
    log_post = log_like - 0.5 * (tau / PRIOR_TAU).square()
    w = torch.softmax(log_post, 0)
    return float((w * post_mu).sum()), float((w * tau).sum())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", type=int, default=500)
    p.add_argument("--per-group", type=int, default=5)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    check_at_least(p, args, 1, "groups", "per_group", "steps", "threads")
    set_threads(args.threads)
    y = data(args.groups, args.per_group)
    model = make_model(y)
    mu_star, tau_star = posterior_means(y)
    budgets = [b for b in (10, 30, 100, 300, 1000, 3000, 10000) if b <= args.steps]
    contenders = [("NaturalGradient (defaults)", lambda g: NaturalGradient(g)),
                  ('NaturalGradient, curvature="hvp"',
                   lambda g: NaturalGradient(g, curvature="hvp"))] + [
        (f"Adam, lr {lr}", lambda g, lr=lr: pyro.optim.Adam({"lr": lr})) for lr in (0.01, 0.1)]
    rows = []
    for name, make in contenders:
        log(f"{name}: {args.steps} steps ...")
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        guide = AutoNormal(model)
        svi = SVI(model, guide, make(guide), Trace_ELBO())
        cells = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(1, args.steps + 1):
                svi.step()
                if i in budgets:
                    m = guide.median()
                    cells[i] = f"{float(m['mu']):.3f} / {float(m['tau']):.3f}"
        rows.append([name] + [cells.get(b, "-") for b in budgets])
    print(f"### Non-centred normal hierarchy, {args.groups} groups of {args.per_group}, "
          f"AutoNormal ({args.groups + 2} latents)\n")
    print(f"Guide medians of mu / tau after each number of single-particle `Trace_ELBO` "
          f"steps; posterior means {mu_star:.3f} / {tau_star:.3f} (quadrature over tau). "
          f"Seed {args.seed}; float64.\n")
    print(markdown_table(["optimizer"] + [str(b) for b in budgets], rows))
    print(f"\nEnvironment: {environment_line()}")


if __name__ == "__main__":
    main()
