"""Amortised inference with an encoder network: natural gradient through the GGN and CG
(pyro_natgrad.amortised.AmortisedNaturalGradient) against Adam, on the exact answer.

Data: scikit-learn's bundled handwritten digits (1,797 images of 8x8 pixels, scaled to
[0, 1] and centred). Model: probabilistic PCA with K latent dimensions per image,
``z_n ~ N(0, I)``, ``x_n ~ N(W z_n + b, sigma^2 I)``, with ``W``, ``b`` and ``sigma`` fixed
at their maximum-likelihood values (closed form, Tipping and Bishop 1999). The
posterior of each ``z_n`` is Gaussian, ``N(M^-1 W^T (x_n - b), sigma^2 M^-1)`` with
``M = W^T W + sigma^2 I``, and ``log p(X)`` is known, so the script reports the exact
gap ``log p(X) - ELBO = sum_n KL(q(z_n | x_n) || p(z_n | x_n))`` (closed form, no
sampling) as the encoder trains.

Guide: ``q(z_n | x_n) = N(loc, diag(scale^2))`` from an encoder network with a tanh
hidden layer and a linear skip connection, so that it can represent the exact
posterior (the maximum-likelihood ``W`` has orthogonal columns, so ``M`` and the
posterior covariance are diagonal, and the best guide has gap 0). The decoder is
fixed: this isolates the optimisation of the encoder.

Run ``python examples/amortised.py --help`` for the options.
"""

import argparse
import sys
import time

import _common as C
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.nn import PyroModule

from pyro_natgrad.amortised import AmortisedNaturalGradient

ADAM_LRS = (0.001, 0.01, 0.1)


def load_digits_ppca(K: int, dtype=torch.float64):
    """Centred digits ``X`` (N, 64) and the PPCA maximum-likelihood ``W``, ``b``, ``sigma``.

    Raises ``ValueError`` for a ``K`` that leaves no noise variance (see below)."""
    from sklearn.datasets import load_digits

    X = torch.tensor(load_digits().data / 16.0, dtype=dtype)
    b = X.mean(0)
    S = torch.cov((X - b).T, correction=0)
    evals, evecs = torch.linalg.eigh(S)
    evals, evecs = evals.flip(0), evecs.flip(1)
    # sigma^2 is the mean of the eigenvalues past the K-th: it must be positive, so K must
    # stay below the covariance's rank (61 of the 64 pixels: three are always blank). A
    # larger K gives sigma = 0 (or NaN past 63), and the exact posterior does not exist.
    D = X.shape[1]
    rank = int((evals > evals[0] * D * torch.finfo(dtype).eps).sum())
    if not 1 <= K < rank:
        raise ValueError(f"must be in 1..{rank - 1}: PPCA's noise variance is the mean of the "
                         f"pixel covariance's eigenvalues past the K-th, and the covariance has "
                         f"rank {rank} (of {D} pixels, {D - rank} are constant), so a larger K "
                         f"leaves sigma = 0")
    sigma2 = evals[K:].mean()
    W = evecs[:, :K] * (evals[:K] - sigma2).sqrt()
    return X, W, b, float(sigma2.sqrt())


class Exact:
    """The exact posterior of every ``z_n``, ``log p(X)``, and the exact gap of a
    diagonal Gaussian guide."""

    def __init__(self, X, W, b, sigma):
        K = W.shape[1]
        M = W.T @ W + sigma**2 * torch.eye(K, dtype=X.dtype)
        self.cov = sigma**2 * torch.linalg.inv(M)
        self.mean = (X - b) @ torch.linalg.solve(M, W.T).T
        C_ = W @ W.T + sigma**2 * torch.eye(W.shape[0], dtype=X.dtype)
        self.log_evidence = float(dist.MultivariateNormal(b, C_).log_prob(X).sum())
        self.precision = torch.linalg.inv(self.cov)
        self.logdet = float(torch.logdet(self.cov))
        # The best diagonal Gaussian: exact means, variances 1 / diag(precision).
        self.best_gap = self.gap(self.mean, self.precision.diagonal().rsqrt().expand_as(self.mean))

    def gap(self, loc, scale) -> float:
        """``sum_n KL(N(loc_n, diag scale_n^2) || exact_n)`` in nats."""
        K = loc.shape[-1]
        d = self.mean - loc
        kl = 0.5 * ((self.precision.diagonal() * scale**2).sum(-1)
                    + ((d @ self.precision) * d).sum(-1) - K + self.logdet
                    - 2 * scale.log().sum(-1))
        return float(kl.sum())


class Encoder(PyroModule):
    """``q(z_n | x_n)``: ``(loc, log scale) = skip(x) + head(tanh(hidden(x)))``."""

    def __init__(self, D: int, K: int, H: int):
        super().__init__()
        self.K = K
        self.skip = PyroModule[torch.nn.Linear](D, 2 * K)
        self.hidden = PyroModule[torch.nn.Linear](D, H)
        self.head = PyroModule[torch.nn.Linear](H, 2 * K)

    def outputs(self, x):
        out = self.skip(x) + self.head(torch.tanh(self.hidden(x)))
        return out[..., :self.K], out[..., self.K:].exp()

    def forward(self, x):
        loc, scale = self.outputs(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def make_model(W, b, sigma):
    K = W.shape[1]

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(K, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + b, sigma).to_event(1), obs=x)

    return model


def run(optimizer, steps, X, model, exact, args, lr=None, desc=""):
    """Fit a fresh encoder; returns a dict with the losses, the exact gap at checkpoints,
    the time, and (natgrad) the CG iterations of each step."""
    from tqdm.auto import tqdm

    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    guide = Encoder(X.shape[1], args.latent, args.hidden).to(X.dtype)
    if optimizer == "natgrad":
        optim = AmortisedNaturalGradient(guide, cg_iters=args.cg_iters)
    else:
        optim = pyro.optim.Adam({"lr": lr})
    svi = SVI(model, guide, optim, Trace_ELBO())
    checkpoints = sorted({int(c) for c in np.unique(np.geomspace(1, steps, 25).round())})
    losses, gaps, cg, seconds = [], {}, [], 0.0
    bar = tqdm(range(steps), desc=desc, leave=False,
               disable=args.quiet or not sys.stderr.isatty(), file=sys.stderr)
    for step in bar:
        start = time.perf_counter()
        losses.append(svi.step(X))
        seconds += time.perf_counter() - start
        if optimizer == "natgrad":
            cg.append(optim.last_step.cg_iterations)
        if step + 1 in checkpoints:
            with torch.no_grad():
                gaps[step + 1] = exact.gap(*guide.outputs(X))
            bar.set_postfix(gap=f"{gaps[step + 1]:.4g}", refresh=False)
    bar.close()
    P = sum(p.numel() for p in guide.parameters())
    cost = measure_costs(guide, optim, X) if optimizer == "natgrad" else None
    return {"optimizer": optimizer, "lr": lr, "losses": np.asarray(losses), "gaps": gaps,
            "seconds": seconds, "cg": np.asarray(cg), "P": P, "cost": cost,
            "label": (f"natural gradient ({steps} steps, {seconds:.1f} s)"
                      if optimizer == "natgrad" else
                      f"Adam lr={lr:g} ({steps} steps, {seconds:.1f} s)")}


def measure_costs(guide, optim, X, repeats: int = 10):
    """Milliseconds of one guide evaluation (forward, no grad) and of one GGN product
    (one jvp and one reverse pass through the guide) at the fitted parameters."""
    with torch.no_grad():
        guide(X)
        start = time.perf_counter()
        for _ in range(repeats):
            guide(X)
        forward = (time.perf_counter() - start) / repeats
    G = optim.operator(list(guide.parameters()))
    v = torch.randn(G.dim, dtype=X.dtype)
    G.mv(v)
    start = time.perf_counter()
    for _ in range(repeats):
        G.mv(v)
    product = (time.perf_counter() - start) / repeats
    return 1e3 * forward, 1e3 * product


def main(argv=None):
    parser = argparse.ArgumentParser(description=C.description(__doc__))
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps (default: 40 for natgrad, 1500 for adam)")
    parser.add_argument("--optimizer", choices=C.OPTIMIZERS, default="natgrad",
                        help="natgrad (AmortisedNaturalGradient, the default) or adam")
    parser.add_argument("--lr", type=float, default=None,
                        help="Adam learning rate (default: the best of 0.001, 0.01, 0.1 by "
                             "the final exact gap; all three are run)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--plot", metavar="PATH", default=None,
                        help="save a PNG: ELBO and exact gap against the step for natural "
                             "gradient and Adam (both are run)")
    parser.add_argument("--compare-steps", type=int, default=None,
                        help="with --plot: steps of the other optimizer (default: its "
                             "default)")
    parser.add_argument("--latent", type=int, default=4,
                        help="latent dimension K (default 4; at most 60, the rank of the "
                             "digits' covariance less one)")
    parser.add_argument("--hidden", type=int, default=16,
                        help="hidden units of the encoder (default 16)")
    parser.add_argument("--cg-iters", type=int, default=20,
                        help="CG iterations per natural-gradient step at most (default 20)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    defaults = {"natgrad": 40, "adam": 1500}
    other = "adam" if args.optimizer == "natgrad" else "natgrad"
    # "is None", not "or": --steps 0 is an error, not the default
    if args.steps is None:
        args.steps = defaults[args.optimizer]
    if args.compare_steps is None:
        args.compare_steps = defaults[other]
    for name in ("steps", "compare_steps", "latent", "hidden", "cg_iters", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.lr is not None and not 0 < args.lr < float("inf"):
        parser.error("--lr must be positive and finite")
    C.check_output(parser, args.plot, "--plot")
    torch.set_num_threads(args.threads)

    try:
        X, W, b, sigma = load_digits_ppca(args.latent)
    except ValueError as e:
        parser.error(f"--latent {args.latent}: {e}")
    model = make_model(W, b, sigma)
    exact = Exact(X, W, b, sigma)
    N, D = X.shape
    print(f"digits: N={N} images, D={D} pixels; PPCA with K={args.latent}, sigma={sigma:.4f}; "
          f"log p(X) = {exact.log_evidence:.2f}")
    print(f"best diagonal Gaussian guide: gap = {exact.best_gap:.3f} nats "
          f"({exact.best_gap / N:.5f} per image)")

    plan = [(args.optimizer, args.steps)] + ([(other, args.compare_steps)] if args.plot else [])
    results = {}
    for opt, steps in plan:
        if opt == "natgrad":
            results[opt] = run(opt, steps, X, model, exact, args, desc="natural gradient")
        else:
            lrs = [args.lr] if args.lr is not None else list(ADAM_LRS)
            fits = [run(opt, steps, X, model, exact, args, lr=lr, desc=f"Adam lr={lr:g}")
                    for lr in lrs]
            for f in fits:
                print(f"Adam lr={f['lr']:g}: final gap {f['gaps'][steps]:.3f} nats, "
                      f"{f['seconds']:.1f} s")
            results[opt] = min(fits, key=lambda f: f["gaps"][steps])
            results[opt]["label"] += " (best lr)" if len(fits) > 1 else ""

    main_fit = results[args.optimizer]
    print(f"\nencoder parameters P = {main_fit['P']}")
    print(f"{'step':>6s} " + " ".join(f"{r['optimizer'] + ' gap':>14s}" for r in results.values()))
    steps_all = sorted(set().union(*[r["gaps"] for r in results.values()]))
    for s in steps_all:
        cells = [f"{r['gaps'][s]:14.3f}" if s in r["gaps"] else f"{'':14s}"
                 for r in results.values()]
        print(f"{s:6d} " + " ".join(cells))
    print()
    for r in results.values():
        n = len(r["losses"])
        line = (f"{r['label']}: final gap = {r['gaps'][n]:.3f} nats "
                f"({r['gaps'][n] / N:.5f} per image), {1e3 * r['seconds'] / n:.1f} ms/step")
        if r["optimizer"] == "natgrad":
            line += (f", CG iterations/step = {r['cg'].mean():.1f} (max {r['cg'].max()}), "
                     f"GGN products/step = {r['cg'].mean() + 2:.1f}")
        print(line)
        if r["cost"] is not None:
            fwd, prod = r["cost"]
            print(f"one GGN product = {prod:.2f} ms = {prod / fwd:.1f} guide evaluations "
                  f"({fwd:.2f} ms each)")
    print(f"final ELBO (mean of last 10 steps) = {-main_fit['losses'][-10:].mean():.2f}")
    if "natgrad" in results and "adam" in results:
        ng, ad = results["natgrad"], results["adam"]
        target = ng["gaps"][len(ng["losses"])]
        reached = [s for s, g in sorted(ad["gaps"].items()) if g <= target]
        msg = (f"Adam reaches natural gradient's final gap at step {reached[0]}"
               if reached else "Adam does not reach natural gradient's final gap")
        print(msg + f" (natural gradient: {len(ng['losses'])} steps, {ng['seconds']:.1f} s; "
                    f"Adam: {ad['seconds']:.1f} s for {len(ad['losses'])} steps)")

    if args.plot:
        fig, axes = C.figure(2, width=5.5)
        colours = {"natgrad": "C0", "adam": "C1"}
        for r in results.values():
            elbo = -r["losses"]
            steps = np.arange(1, len(elbo) + 1)
            axes[0].plot(steps, elbo, color=colours[r["optimizer"]], alpha=0.2, lw=0.6)
            axes[0].plot(steps, C.running_median(elbo, max(1, len(elbo) // 50)),
                         color=colours[r["optimizer"]], lw=1.8, label=r["label"])
            g = sorted(r["gaps"].items())
            axes[1].plot([s for s, _ in g], [v for _, v in g], "o-", ms=3,
                         color=colours[r["optimizer"]], label=r["label"])
        axes[0].axhline(exact.log_evidence, color="0.5", ls="--", lw=0.8, label="log p(X)")
        axes[0].set_ylim(exact.log_evidence - 500, exact.log_evidence + 100)
        if exact.best_gap > 1e-6:  # (0 to rounding when the guide can be exact)
            axes[1].axhline(exact.best_gap, color="0.5", ls="--", lw=0.8,
                            label="best diagonal guide")
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        axes[0].set_ylabel("ELBO (single-sample, running median)")
        axes[0].set_title("amortised PPCA on digits: ELBO")
        axes[1].set_yscale("log")
        axes[1].set_ylabel("log p(X) - ELBO (exact, nats)")
        axes[1].set_title(f"exact gap (best possible: {max(exact.best_gap, 0.0):.2g})")
        C.save(fig, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
