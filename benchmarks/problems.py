"""Benchmark problems with an exact ELBO for Gaussian guides.

``LinearRegression``: y ~ N(X w, sigma^2), w ~ N(0, prior_scale^2 I), sigma known. The
posterior is Gaussian, so the optimal full-rank ELBO is the log evidence and the
optimal mean-field Gaussian has the posterior mean and variances 1/Lambda_ii.
"""

import math

import numpy as np
import torch
import pyro
import pyro.distributions as dist


class LinearRegression:
    def __init__(self, X, y, noise, prior_scale=1.0):
        self.X, self.y = X, y
        self.noise, self.prior_scale = noise, prior_scale
        n, d = X.shape
        self.dim = d
        self.precision = X.T @ X / noise**2 + torch.eye(d, dtype=X.dtype) / prior_scale**2
        self.cov = torch.linalg.inv(self.precision)
        self.mean = self.cov @ (X.T @ y) / noise**2

    @classmethod
    def diabetes(cls, dtype=torch.float64):
        from sklearn.datasets import load_diabetes

        X, y = load_diabetes(return_X_y=True)
        X = (X - X.mean(0)) / X.std(0)
        y = (y - y.mean()) / y.std()
        X = np.concatenate([X, np.ones((X.shape[0], 1))], 1)
        X, y = torch.tensor(X, dtype=dtype), torch.tensor(y, dtype=dtype)
        w = torch.linalg.lstsq(X, y.unsqueeze(-1)).solution.squeeze(-1)
        noise = float((y - X @ w).std())
        return cls(X, y, noise)

    def model(self):
        w = pyro.sample("w", dist.Normal(torch.zeros(self.dim, dtype=self.X.dtype),
                                         self.prior_scale).to_event(1))
        with pyro.plate("data", self.X.shape[0]):
            pyro.sample("y", dist.Normal((w.unsqueeze(-2) @ self.X.T).squeeze(-2), self.noise),
                        obs=self.y)

    def elbo(self, m, S):
        """Exact ELBO of q = N(m, S)."""
        return float(self.elbo_tensor(m, S))

    def elbo_tensor(self, m, S):
        """Exact ELBO of q = N(m, S), differentiable."""
        X, y, s2, t2 = self.X, self.y, self.noise**2, self.prior_scale**2
        n, d = X.shape
        r = y - X @ m
        loglik = -0.5 * n * math.log(2 * math.pi * s2) - 0.5 * (r @ r + (X.T @ X * S).sum()) / s2
        logprior = -0.5 * d * math.log(2 * math.pi * t2) - 0.5 * (m @ m + S.diagonal().sum()) / t2
        entropy = 0.5 * torch.logdet(2 * math.pi * math.e * S)
        return loglik + logprior + entropy

    def optimal_elbo(self, mean_field):
        S = torch.diag(1 / self.precision.diagonal()) if mean_field else self.cov
        return self.elbo(self.mean, S)


def guide_moments(guide):
    """(mean, covariance) of the latent 'w' under an AutoNormal / AutoDiagonalNormal /
    AutoMultivariateNormal guide."""
    from pyro.infer.autoguide import AutoNormal

    with torch.no_grad():
        if isinstance(guide, AutoNormal):
            m = guide.locs.w.detach()
            return m, torch.diag(guide.scales.w.detach() ** 2)
        post = guide.get_posterior()
        if hasattr(post, "covariance_matrix"):
            return post.mean.detach(), post.covariance_matrix.detach()
        return post.mean.detach(), torch.diag(post.variance.detach())
