"""Quickstart: natural-gradient SVI on a Bayesian linear regression.

Fits ``y ~ N(X w, sigma^2)``, ``w ~ N(0, I)``, on scikit-learn's diabetes data
(442 patients, 10 standardised features and an intercept; sigma fixed at the
least-squares residual sd) with ``AutoMultivariateNormal``, once with
``NaturalGradient`` and once with Pyro's ``Adam``, and compares both with the
exact posterior, which is Gaussian here.

Run ``python examples/quickstart.py --help`` for the options.
"""

import argparse

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal

from pyro_natgrad import NaturalGradient


def load_diabetes(dtype=torch.float64):
    from sklearn.datasets import load_diabetes as load

    X, y = load(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    X = np.concatenate([X, np.ones((len(X), 1))], 1)
    y = (y - y.mean()) / y.std()
    X, y = torch.tensor(X, dtype=dtype), torch.tensor(y, dtype=dtype)
    w = torch.linalg.lstsq(X, y.unsqueeze(-1)).solution.squeeze(-1)
    return X, y, float((y - X @ w).std())


def make_model(X, y, sigma):
    def model():
        w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), 1.0).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(X @ w, sigma), obs=y)

    return model


def exact_posterior(X, y, sigma):
    precision = X.T @ X / sigma**2 + torch.eye(X.shape[1], dtype=X.dtype)
    cov = torch.linalg.inv(precision)
    return cov @ X.T @ y / sigma**2, cov


def fit(model, optim_fn, steps, seed):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoMultivariateNormal(model)
    svi = SVI(model, guide, optim_fn(guide), Trace_ELBO())
    losses = [svi.step() for _ in range(steps)]
    post = guide.get_posterior()
    return post.mean.detach(), post.covariance_matrix.detach(), losses


def gaussian_kl(m0, S0, m1, S1):
    """KL(N(m0, S0) || N(m1, S1))."""
    d = len(m0)
    L1 = torch.linalg.cholesky(S1)
    tr = torch.cholesky_solve(S0, L1).diagonal().sum()
    diff = torch.cholesky_solve((m1 - m0).unsqueeze(-1), L1).squeeze(-1)
    return float(0.5 * (tr + (m1 - m0) @ diff - d + torch.logdet(S1) - torch.logdet(S0)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="natural-gradient steps (30)")
    parser.add_argument("--adam-steps", type=int, default=3000, help="Adam steps (3000)")
    parser.add_argument("--adam-lr", type=float, default=0.01, help="Adam learning rate (0.01)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1; the model is small, and more threads mostly "
                             "add overhead)")
    args = parser.parse_args(argv)
    # checked before any fitting, as the other examples do (examples/_common.py)
    for name in ("steps", "adam_steps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.adam_lr < float("inf"):
        parser.error("--adam-lr must be positive and finite")
    torch.set_num_threads(args.threads)

    X, y, sigma = load_diabetes()
    model = make_model(X, y, sigma)
    mean, cov = exact_posterior(X, y, sigma)
    runs = {
        f"NaturalGradient ({args.steps} steps)": (lambda g: NaturalGradient(g), args.steps),
        f"Adam lr={args.adam_lr} ({args.adam_steps} steps)": (
            lambda g: pyro.optim.Adam({"lr": args.adam_lr}), args.adam_steps),
    }
    print(f"diabetes: n={len(y)}, d={X.shape[1]}, sigma={sigma:.4f}; exact posterior is Gaussian")
    print(f"{'optimizer':34s} {'KL(q || exact)':>15s} {'max |mean err|/sd':>18s} {'sd ratio':>14s}")
    for name, (optim_fn, steps) in runs.items():
        m, S, _ = fit(model, optim_fn, steps, args.seed)
        sd = cov.diagonal().sqrt()
        err = float(((m - mean).abs() / sd).max())
        ratio = S.diagonal().sqrt() / sd
        print(f"{name:34s} {gaussian_kl(m, S, mean, cov):15.2e} {err:18.2e} "
              f"{float(ratio.min()):6.3f}..{float(ratio.max()):5.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
