"""Bayesian linear regression on the diabetes data, against the exact posterior.

Data: scikit-learn's bundled diabetes data (Efron et al. 2004; 442 patients, 10
baseline variables, disease progression after one year), features and response
standardised, plus an intercept column.

Known noise (default): ``w ~ N(0, I)``, ``y ~ N(X w, sigma^2)`` with ``sigma`` fixed at
the least-squares residual sd. The posterior is Gaussian and known exactly, so
the script prints the variational posterior (``AutoMultivariateNormal``) beside
the exact one and the divergence ``KL(q || exact)``, computed in closed form
from the guide's mean and covariance.

``--unknown-noise``: ``sigma ~ HalfNormal(1)`` is inferred too. The guide is then a
Gaussian over ``(w, log sigma)`` (AutoMultivariateNormal works on the
unconstrained ``log sigma``). The exact posterior is no longer Gaussian, but
``w | sigma`` is, so the reference is computed by one-dimensional quadrature
over ``log sigma`` (1,001 points): means and sds of every parameter.

Run ``python examples/linear_regression.py --help`` for the options.
"""

import argparse
import math

import _common as C
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoMultivariateNormal


def load_diabetes(dtype=torch.float64):
    """Standardised diabetes features with an intercept column, standardised response,
    feature names, and the least-squares residual sd."""
    from sklearn.datasets import load_diabetes as load

    data = load()
    X, y = data.data, data.target
    X = (X - X.mean(0)) / X.std(0)
    X = np.concatenate([X, np.ones((len(X), 1))], 1)
    y = (y - y.mean()) / y.std()
    X, y = torch.tensor(X, dtype=dtype), torch.tensor(y, dtype=dtype)
    w = torch.linalg.lstsq(X, y.unsqueeze(-1)).solution.squeeze(-1)
    names = [f"w[{n}]" for n in data.feature_names] + ["w[intercept]"]
    return X, y, names, float((y - X @ w).std())


def make_model(X, y, sigma=None):
    """``sigma=None``: ``sigma ~ HalfNormal(1)`` is a latent site; else it is fixed."""
    def model():
        w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), 1.0)
                        .to_event(1))
        s = sigma
        if s is None:
            s = pyro.sample("sigma", dist.HalfNormal(torch.tensor(1.0, dtype=X.dtype)))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(X @ w, s), obs=y)

    return model


def exact_posterior(X, y, sigma):
    """Mean and covariance of ``w | y, sigma`` (prior ``N(0, I)``)."""
    precision = X.T @ X / sigma**2 + torch.eye(X.shape[1], dtype=X.dtype)
    cov = torch.linalg.inv(precision)
    return cov @ X.T @ y / sigma**2, cov


def quadrature_posterior(X, y, n_grid=1001):
    """Mean and sd of ``(w, sigma)`` under ``sigma ~ HalfNormal(1)``, by quadrature over
    ``log sigma``: ``p(log sigma | y)`` on a grid, times the Gaussian ``w | sigma, y``."""
    n, d = X.shape
    XtX, Xty, yty = X.T @ X, X.T @ y, y @ y
    log_s = torch.linspace(math.log(0.3), math.log(2.0), n_grid, dtype=X.dtype)
    logp, means, variances = [], [], []
    for u in log_s:
        s2 = torch.exp(2 * u)
        P = XtX / s2 + torch.eye(d, dtype=X.dtype)
        L = torch.linalg.cholesky(P)
        m = torch.cholesky_solve((Xty / s2).unsqueeze(-1), L).squeeze(-1)
        # log N(y | 0, s2 I + X X^T), via |s2 I + X X^T| = s2^n |P|
        loglik = (-0.5 * n * torch.log(2 * math.pi * s2) - torch.log(L.diagonal()).sum()
                  - 0.5 * (yty / s2 - m @ P @ m))
        logprior = dist.HalfNormal(torch.tensor(1.0, dtype=X.dtype)).log_prob(s2.sqrt()) + u
        logp.append(loglik + logprior)
        means.append(m)
        variances.append(torch.cholesky_inverse(L).diagonal())
    logp = torch.stack(logp)
    if logp[0] > logp.max() - 30 or logp[-1] > logp.max() - 30:
        raise RuntimeError("quadrature grid does not cover the posterior of sigma")
    wts = torch.softmax(logp, 0)
    means, variances = torch.stack(means), torch.stack(variances)
    w_mean = wts @ means
    w_sd = (wts @ (variances + means**2) - w_mean**2).sqrt()
    s = log_s.exp()
    s_mean = wts @ s
    s_sd = (wts @ s**2 - s_mean**2).sqrt()
    return (torch.cat([w_mean, s_mean.view(1)]).numpy(),
            torch.cat([w_sd, s_sd.view(1)]).numpy())


def gaussian_kl(m0, S0, m1, S1):
    """KL(N(m0, S0) || N(m1, S1)) in nats."""
    d = len(m0)
    L1 = torch.linalg.cholesky(S1)
    tr = torch.cholesky_solve(S0, L1).diagonal().sum()
    diff = torch.cholesky_solve((m1 - m0).unsqueeze(-1), L1).squeeze(-1)
    return float(0.5 * (tr + (m1 - m0) @ diff - d + 2 * torch.log(L1.diagonal()).sum()
                        - torch.logdet(S0)))


def flat_draws(draws, unknown_noise):
    w = draws["w"].reshape(-1, draws["w"].shape[-1])
    if unknown_noise:
        return torch.cat([w, draws["sigma"].reshape(-1, 1)], -1)
    return w


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=C.description(__doc__),
        epilog="Known noise: prints KL(q || exact). --unknown-noise: compares with quadrature.")
    parser.add_argument("--unknown-noise", action="store_true",
                        help="infer sigma ~ HalfNormal(1) as well (Gaussian guide on log sigma)")
    C.add_common_args(parser, natgrad_steps=30, adam_steps=3000)
    args = C.finish_args(parser, argv)

    X, y, names, sigma_ls = load_diabetes()
    if args.unknown_noise:
        model = make_model(X, y, None)
        ref_mean, ref_sd = quadrature_posterior(X, y)
        names = names + ["sigma"]
        ref_label = "exact"
        print(f"diabetes: n={len(y)}, d={X.shape[1]}, sigma ~ HalfNormal(1) unknown; "
              f"reference: quadrature over log sigma")
    else:
        model = make_model(X, y, sigma_ls)
        mean, cov = exact_posterior(X, y, sigma_ls)
        ref_mean, ref_sd = mean.numpy(), cov.diagonal().sqrt().numpy()
        ref_label = "exact"
        print(f"diabetes: n={len(y)}, d={X.shape[1]}, sigma={sigma_ls:.4f} known; "
              f"the exact posterior is Gaussian")

    fits = [C.fit(model, lambda: AutoMultivariateNormal(model), opt, steps, lr=args.lr,
                  seed=args.seed, quiet=args.quiet)
            for opt, steps in C.runs(args)]
    main_fit = fits[0]
    summaries = {}
    for f in fits:
        pyro.set_rng_seed(args.seed)
        summaries[f.optimizer] = C.summarise(
            names, flat_draws(C.guide_draws(f.activate(), args.samples), args.unknown_noise))

    s = summaries[main_fit.optimizer]
    print(f"\n{main_fit.label}; {args.samples} guide draws; z = (mean - exact mean) / exact sd")
    C.print_table(s, ref_mean, ref_sd, ref_label)
    err, rmin, rmax = C.compare(s, ref_mean, ref_sd)
    print()
    if not args.unknown_noise:
        post = main_fit.activate().get_posterior()
        kl = gaussian_kl(post.mean.detach(), post.covariance_matrix.detach(), mean, cov)
        print(f"KL(q || exact) = {kl:.3e} nats")  # unclamped: below 0 only by rounding
    print(f"max |mean err| = {err:.3f} exact sd; sd ratio q/exact = {rmin:.3f}..{rmax:.3f}")
    print(f"final ELBO (mean of last 10 steps) = {-main_fit.losses[-10:].mean():.3f}")

    if args.plot:
        fig, axes = C.figure(2, width=5.5)
        C.plot_elbo(axes[0], fits, "diabetes linear regression"
                    + (", unknown noise" if args.unknown_noise else ", known noise"))
        series = [("exact (mean +- 1.645 sd)", ref_mean, ref_mean - 1.645 * ref_sd,
                   ref_mean + 1.645 * ref_sd)]
        for f in fits:
            q = summaries[f.optimizer]
            series.append((f"{C.LABELS[f.optimizer]} (5%..95%)", q.mean, q.q05, q.q95))
        C.plot_marginals(axes[1], names, series, "posterior marginals")
        C.save(fig, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
