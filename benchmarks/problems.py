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

from common import seeded_generator


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


# -------------------------------------------------------------------------------------
# Generalised linear models: exact ELBO of a full-rank Gaussian guide by quadrature
# -------------------------------------------------------------------------------------

LOG_2PI = math.log(2 * math.pi)


class GLMRegression:
    """``y_i ~ p(y_i | f_i)``, ``f_i = x_i^T w``, ``w ~ N(0, prior_scale^2 I)`` (one
    latent site ``w``), for ``likelihood`` ``"logistic"`` (Bernoulli logits) or
    ``"poisson"`` (Poisson, log link).

    The exact ELBO of ``q = N(m, L L^T)`` needs only one-dimensional expectations
    over each linear predictor ``f_i ~ N(mu_i, s_i^2)``, ``mu_i = x_i^T m``,
    ``s_i^2 = |L^T x_i|^2``:

    * logistic: ``E[log p] = y_i mu_i - E[softplus(f_i)]``, the expectation by
      Gauss-Hermite quadrature with ``nodes`` nodes;
    * Poisson-log: ``E[log p] = y_i mu_i - exp(mu_i + s_i^2 / 2) - log y_i!``, closed form;

    plus the Gaussian prior term and the entropy in closed form. ``model`` is the Pyro
    model whose ``Trace_ELBO`` this ELBO is the expectation of; ``design`` maps the
    latent ``w`` to the predictors (``f = X w``).
    """

    def __init__(self, name, X, y, likelihood, prior_scale=1.0, model=None, nodes=128):
        if likelihood not in ("logistic", "poisson"):
            raise ValueError(f"likelihood must be 'logistic' or 'poisson', got {likelihood!r}")
        self.name, self.X, self.y, self.likelihood = name, X, y, likelihood
        self.prior_scale = float(prior_scale)
        self.n, self.dim = X.shape
        self._model = model
        self.set_nodes(nodes)
        self.const = -torch.lgamma(y + 1).sum() if likelihood == "poisson" else 0.0

    def set_nodes(self, nodes):
        t, wts = np.polynomial.hermite.hermgauss(nodes)
        self.gh_t = torch.tensor(t, dtype=self.X.dtype) * math.sqrt(2.0)
        self.gh_w = torch.tensor(wts, dtype=self.X.dtype) / math.sqrt(math.pi)

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def german_credit(cls, dtype=torch.float64, nodes=128):
        """inference-gym German credit (numeric) logistic regression, the packaged
        reference model (24 standardised features and a bias, the last weight; prior
        ``N(0, 1)``): D = 25, n = 1000."""
        from pyro_natgrad.datasets import load_reference

        ref = load_reference("german_credit_numeric_logistic_regression", dtype=dtype)
        x, y = ref.data["x"], ref.data["y"]
        X = torch.cat([x, torch.ones(x.shape[0], 1, dtype=dtype)], 1)
        return cls("german_credit (logistic)", X, y, "logistic", 1.0, ref.model, nodes)

    @classmethod
    def randhie(cls, dtype=torch.float64, n=None):
        """statsmodels' bundled RAND health insurance data (``randhie``): Poisson
        regression of ``mdvis`` (doctor visits) on the 9 regressors, standardised, and an
        intercept (last weight); prior ``N(0, 1)``: D = 10, n = 20,190 (or the first
        ``n`` rows)."""
        import statsmodels.api as sm

        data = sm.datasets.randhie.load_pandas()
        x = np.asarray(data.exog, dtype=np.float64)
        y = np.asarray(data.endog, dtype=np.float64)
        if n is not None:
            x, y = x[:n], y[:n]
        x = (x - x.mean(0)) / x.std(0)
        X = np.concatenate([x, np.ones((x.shape[0], 1))], 1)
        return cls(f"randhie (Poisson, n={X.shape[0]})", torch.tensor(X, dtype=dtype),
                   torch.tensor(y, dtype=dtype), "poisson", 1.0)

    @classmethod
    def synthetic(cls, n, d, likelihood="logistic", seed=0, dtype=torch.float64):
        """Gaussian design (standardised columns, the last one an intercept), weights
        ``N(0, 1/d)`` drawn with ``seed``; prior ``N(0, 1)``."""
        g = seeded_generator(seed)
        X = torch.randn(n, d, generator=g, dtype=dtype)
        X[:, -1] = 1.0
        w = torch.randn(d, generator=g, dtype=dtype) / math.sqrt(d)
        f = X @ w
        if likelihood == "logistic":
            y = torch.bernoulli(torch.sigmoid(f), generator=g)
        else:
            y = torch.poisson(f.exp(), generator=g)
        return cls(f"synthetic {likelihood} (n={n}, d={d})", X, y, likelihood, 1.0)

    # -- the model ------------------------------------------------------------------------
    def model(self):
        if self._model is not None:
            return self._model()
        w = pyro.sample("w", dist.Normal(torch.zeros(self.dim, dtype=self.X.dtype),
                                         self.prior_scale).to_event(1))
        f = self.X @ w
        with pyro.plate("data", self.n):
            if self.likelihood == "logistic":
                pyro.sample("obs", dist.Bernoulli(logits=f), obs=self.y)
            else:
                pyro.sample("obs", dist.Poisson(f.exp()), obs=self.y)

    # -- the exact ELBO ---------------------------------------------------------------------
    def predictor_moments(self, m, L):
        """``(mu, s^2)`` of every linear predictor under ``q = N(m, L L^T)``."""
        return self.X @ m, (self.X @ L).square().sum(-1)

    def expected_loglik(self, m, L):
        mu, s2 = self.predictor_moments(m, L)
        if self.likelihood == "poisson":
            return (self.y * mu - torch.exp(mu + 0.5 * s2)).sum() + self.const
        f = mu.unsqueeze(-1) + s2.sqrt().unsqueeze(-1) * self.gh_t
        return (self.y * mu).sum() - (torch.nn.functional.softplus(f) @ self.gh_w).sum()

    def elbo_tensor(self, m, L):
        """Exact ELBO of ``q = N(m, L L^T)`` (``L`` lower triangular, positive
        diagonal), differentiable in ``m`` and ``L``."""
        d, v = self.dim, self.prior_scale ** 2
        logprior = -0.5 * d * (LOG_2PI + math.log(v)) - 0.5 * (m.square().sum()
                                                               + L.square().sum()) / v
        entropy = 0.5 * d * (LOG_2PI + 1) + L.diagonal().abs().log().sum()
        return self.expected_loglik(m, L) + logprior + entropy

    def elbo(self, m, L):
        with torch.no_grad():
            return float(self.elbo_tensor(m, L))

    # -- its maximum ------------------------------------------------------------------------
    def _log_joint_derivs(self, w):
        """Gradient and Hessian of ``log p(y, w)`` (for the Laplace start)."""
        f = self.X @ w
        if self.likelihood == "poisson":
            r, c = self.y - f.exp(), f.exp()
        else:
            p = torch.sigmoid(f)
            r, c = self.y - p, p * (1 - p)
        v = self.prior_scale ** 2
        g = self.X.T @ r - w / v
        H = -(self.X.T * c) @ self.X - torch.eye(self.dim, dtype=w.dtype) / v
        return g, H

    def laplace(self, iters=100):
        """MAP by Newton's method and ``(w_map, cholesky of the inverse Hessian)``."""
        w = torch.zeros(self.dim, dtype=self.X.dtype)
        for _ in range(iters):
            g, H = self._log_joint_derivs(w)
            step = torch.linalg.solve(-H, g)
            t = 1.0
            lp = self._log_joint(w)
            while self._log_joint(w + t * step) < lp - 1e-12 and t > 1e-8:
                t /= 2
            w = w + t * step
            if float(g.abs().max()) < 1e-12:
                break
        _, H = self._log_joint_derivs(w)
        cov = torch.linalg.inv(-H)
        return w, torch.linalg.cholesky(0.5 * (cov + cov.T))

    def _log_joint(self, w):
        f = self.X @ w
        if self.likelihood == "poisson":
            ll = (self.y * f - f.exp()).sum()
        else:
            ll = (self.y * f - torch.nn.functional.softplus(f)).sum()
        return float(ll - 0.5 * w.square().sum() / self.prior_scale ** 2)

    def optimum(self, max_rounds=20, tol=1e-9):
        """The optimal full-rank Gaussian: ``(elbo, m, L, info)``, maximising the exact
        ELBO by L-BFGS (strong Wolfe line search, float64) over ``(m, tril(L),
        log diag L)`` from the Laplace approximation, restarted until the ELBO stops
        improving; ``info`` reports the final gradient norm (of the ELBO with respect to
        ``m`` and ``L``) and the gain over the Laplace start."""
        m0, L0 = self.laplace()
        start = self.elbo(m0, L0)
        d = self.dim
        rows, cols = torch.tril_indices(d, d, -1)
        m = m0.clone().requires_grad_()
        off = L0[rows, cols].clone().requires_grad_()
        logdiag = L0.diagonal().log().clone().requires_grad_()

        def build():
            L = torch.diag_embed(logdiag.exp())
            return L.index_put((rows, cols), off)

        opt = torch.optim.LBFGS([m, off, logdiag], lr=1.0, max_iter=500, history_size=50,
                                tolerance_grad=1e-14, tolerance_change=1e-16,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = -self.elbo_tensor(m, build())
            loss.backward()
            return loss

        prev = -math.inf
        for _ in range(max_rounds):
            opt.step(closure)
            value = self.elbo(m.detach(), build().detach())
            if value - prev < tol:
                break
            prev = value
        m_opt, L_opt = m.detach(), build().detach()
        mm, LL = m_opt.clone().requires_grad_(), L_opt.clone().requires_grad_()
        gm, gL = torch.autograd.grad(self.elbo_tensor(mm, LL), (mm, LL))
        grad_norm = float(torch.cat([gm, gL.tril().reshape(-1)]).norm())
        value = self.elbo(m_opt, L_opt)
        return value, m_opt, L_opt, {"grad_norm": grad_norm, "laplace_elbo": start,
                                     "gain_over_laplace": value - start}


def full_rank_moments(guide):
    """``(loc, L)`` of an ``AutoMultivariateNormal`` guide read from its parameters:
    ``L = diag(scale) @ scale_tril`` (pyro 1.9), detached."""
    with torch.no_grad():
        loc = guide.loc.detach()
        L = guide.scale.detach().unsqueeze(-1) * guide.scale_tril.detach()
    return loc, L
