"""Three pictures of steepest descent under a metric, after the project's seed notes.

(a) Steepest descent on ``f(x) = x^T A x`` with ``A = scale * [[1, -0.5], [-0.5, 1]]``,
    once under the Euclidean metric (plain gradient descent) and once under the
    Mahalanobis metric ``||d||_A^2 = d^T A d``, whose steepest-descent direction is
    ``-A^{-1} grad f``. Both use an exact line search. The Euclidean path zig-zags
    towards the minimum; the A-metric path reaches it in one step, because under
    that metric the level sets of ``f`` are circles.

(b) The average log-likelihood of a univariate Gaussian in ``(mu, log sigma)`` for a
    simulated sample, with the Fisher information ellipses
    ``{d : d^T F d / 2 = delta}`` (a KL divergence of about ``delta``) drawn on it;
    ``F = diag(1/sigma^2, 2)`` comes from ``pyro_natgrad.fisher_information``
    (``coords="unconstrained"``). The same KL step is a long step in ``mu`` where
    ``sigma`` is large and a short one where it is small. The paths of gradient
    ascent (best fixed step on a grid) and natural-gradient ascent (step 1) to the
    maximum-likelihood estimate are drawn too.

(c) Natural policy gradient for the linear-Gaussian policy of the seed notes:
    state ``s ~ N(0, 1)``, action ``a ~ N(k s, sigma^2)``, reward ``r = -s^2 - a^2``,
    ``theta = (k, sigma)``. The expected reward is ``J = -1 - (k^2 + sigma^2)``
    (closed form; gradient by autograd). The policy's Fisher information is
    ``F = E_s[J_s^T F_N J_s]``: the Normal's Fisher in (loc, scale) from
    ``pyro_natgrad.fisher_information``, pulled back through ``loc = k s`` (the
    ``coords={"loc": AffineTransform(0, s)}`` option), averaged over ``s`` by
    Gauss-Hermite quadrature (exact here), giving ``diag(1/sigma^2, 2/sigma^2)``.
    Both methods take steps of the same size in KL, ``d^T F d / 2 = delta``, so they
    differ only in direction: the vanilla gradient's or the natural gradient's,
    which is the steepest ascent direction for that KL budget. ``--gamma g > 0``
    uses the discounted linear-quadratic problem of Peters & Schaal (2008) instead,
    with dynamics ``s' = s + a`` (``J`` again in closed form, Fisher summed over the
    discounted state distribution); there the vanilla gradient is dominated by
    ``sigma`` and the gap between the two is wider.

Each part prints a one-line numeric summary and writes a PNG into ``--out``.
There is no SVI here, so there is no ``--optimizer`` choice: every figure shows
both methods. Run ``python examples/seeds_demos.py --help`` for the options.
"""

import argparse
import math
import os

import _common as C
import numpy as np
import pyro.distributions as dist
import torch
from torch.distributions.transforms import AffineTransform

import pyro_natgrad

DTYPE = torch.float64
TOL = 1e-3


# ------------------------------------------------------------------ (a) steepest descent


def steepest_descent(A, x0, metric, steps):
    """Exact-line-search steepest descent on ``x^T A x`` under ``metric`` (a matrix M:
    direction ``-M^{-1} grad``). Returns the iterates ``[steps + 1, 2]`` (stops early at
    the minimum)."""
    xs = [x0]
    x = x0
    for _ in range(steps):
        g = 2 * A @ x
        if float(g.norm()) == 0.0:
            break
        d = -torch.linalg.solve(metric, g)
        alpha = -(g @ d) / (2 * d @ A @ d)  # minimises f(x + alpha d) exactly
        x = x + alpha * d
        xs.append(x)
    return torch.stack(xs)


def steps_to(path, target, tol=TOL):
    """First iterate index within ``tol`` (Euclidean) of ``target``, or None."""
    dist_ = (torch.as_tensor(path) - torch.as_tensor(target)).norm(dim=-1)
    hits = torch.nonzero(dist_ < tol)
    return int(hits[0]) if len(hits) else None


def part_a(args, out):
    A = args.scale * torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=DTYPE)
    x0 = torch.tensor(args.x0, dtype=DTYPE)
    euclid = steepest_descent(A, x0, torch.eye(2, dtype=DTYPE), args.steps)
    mahal = steepest_descent(A, x0, A, args.steps)
    n_e, n_m = steps_to(euclid, torch.zeros(2)), steps_to(mahal, torch.zeros(2))
    fmt = lambda n: f"{n}" if n is not None else f"> {args.steps}"  # noqa: E731
    print(f"(a) steps to |x - x*| < {TOL:g}: Euclidean steepest descent {fmt(n_e)}, "
          f"A-metric steepest descent {fmt(n_m)} (exact line search, cond(A) = "
          f"{float(torch.linalg.cond(A)):.1f})")
    fig, (ax,) = C.figure(1, width=5.5, height=5.0)
    r = 1.15 * float(x0.abs().max())
    u = np.linspace(-r, r, 201)
    U, V = np.meshgrid(u, u)
    An = A.numpy()
    F = An[0, 0] * U**2 + 2 * An[0, 1] * U * V + An[1, 1] * V**2
    ax.contour(U, V, F, levels=np.geomspace(F.max() * 1e-3, F.max(), 12), colors="0.75",
               linewidths=0.8)
    ax.plot(*euclid.numpy().T, "o-", color="C1", ms=3,
            label=f"Euclidean metric: -grad f ({fmt(n_e)} steps)")
    ax.plot(*mahal.numpy().T, "s-", color="C0", ms=4,
            label=f"metric A: -A^-1 grad f ({fmt(n_m)} step)")
    # the two unit balls at x0: a circle and the ellipse d^T A d = const
    t = np.linspace(0, 2 * np.pi, 200)
    circle = np.stack([np.cos(t), np.sin(t)])
    rad = 0.25 * r
    ax.plot(x0[0].item() + rad * circle[0], x0[1].item() + rad * circle[1], color="C1", lw=0.8,
            ls="--")
    L = np.linalg.cholesky(np.linalg.inv(An))
    ell = rad * math.sqrt(np.linalg.eigvalsh(An).min()) * (L @ circle)
    ax.plot(x0[0].item() + ell[0], x0[1].item() + ell[1], color="C0", lw=0.8, ls="--")
    ax.plot([0], [0], "k*", ms=10)
    ax.set_aspect("equal")
    ax.set_title("(a) steepest descent on x^T A x: two metrics")
    ax.legend(fontsize=8, loc="upper left")
    C.save(fig, os.path.join(out, "seeds_a_steepest_descent.png"))
    return n_e, n_m


# ------------------------------------------------------------------ (b) Fisher ellipses


def normal_fisher(mu, log_sigma):
    """Fisher information of ``Normal(mu, exp(log_sigma))`` in ``(mu, log sigma)``."""
    d = dist.Normal(torch.as_tensor(mu, dtype=DTYPE), torch.as_tensor(log_sigma, dtype=DTYPE)
                    .exp())
    return pyro_natgrad.fisher_information(d, coords="unconstrained")


def mean_loglik(x, mu, log_sigma):
    """Average log-likelihood of the sample ``x``; ``mu``, ``log_sigma`` of any batch shape."""
    return dist.Normal(mu.unsqueeze(-1), log_sigma.exp().unsqueeze(-1)).log_prob(x).mean(-1)


def ascent(x, theta0, steps, lr, natural, target):
    """Fixed-step (natural-)gradient ascent on the mean log-likelihood in (mu, log sigma),
    for a batch of step sizes ``lr`` (``[L]``) at once. Returns ``[L, steps + 1, 2]``
    paths; a path stays where it is once within ``TOL / 10`` of ``target``, and is NaN
    after it blows up."""
    lr = torch.as_tensor(lr, dtype=DTYPE).reshape(-1, 1)
    theta = theta0.expand(len(lr), 2).clone()
    path = [theta.clone()]
    for _ in range(steps):
        th = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(mean_loglik(x, th[:, 0], th[:, 1]).sum(), th)
        if natural:
            g = torch.linalg.solve(normal_fisher(theta[:, 0], theta[:, 1]),
                                   g.unsqueeze(-1)).squeeze(-1)
        done = (theta - target).norm(dim=-1, keepdim=True) < TOL / 10
        new = torch.where(done, theta, theta + lr * g)
        bad = ~torch.isfinite(new).all(-1, keepdim=True) | (new.abs() > 1e3).any(-1, True)
        theta = new.masked_fill(bad, float("nan"))
        path.append(theta.clone())
        if bool((done | torch.isnan(theta)).all()):
            break
    return torch.stack(path, 1)


def part_b(args, out):
    gen = torch.Generator().manual_seed(args.seed)
    x = 1.0 + 2.0 * torch.randn(args.n, generator=gen, dtype=DTYPE)
    mle = torch.stack([x.mean(), x.std(unbiased=False).log()])
    # the library's Fisher against the closed form diag(1/sigma^2, 2)
    dev = max(float((normal_fisher(m, s) - torch.diag(torch.tensor([math.exp(-2 * s), 2.0],
                                                                    dtype=DTYPE))).abs().max())
              for m in (-1.0, 0.5, 2.0) for s in (-0.5, 0.0, 1.0))
    theta0 = torch.tensor(args.theta0, dtype=DTYPE)
    nat = ascent(x, theta0, args.steps, [1.0], True, mle)[0]
    n_nat = steps_to(nat, mle)
    lrs = np.geomspace(0.005, 2.0, 30)
    paths = ascent(x, theta0, args.steps, lrs, False, mle)
    hits = [(n, i) for i, n in enumerate(steps_to(p, mle) for p in paths) if n is not None]
    n_gd, i_gd = min(hits) if hits else (None, 0)
    lr_gd = float(lrs[i_gd]) if hits else float("nan")
    gd = paths[i_gd]
    keep = torch.isfinite(gd).all(-1)
    gd, nat = gd[keep], nat[torch.isfinite(nat).all(-1)]
    fmt = lambda n: f"{n}" if n is not None else f"> {args.steps}"  # noqa: E731
    print(f"(b) steps to the MLE within {TOL:g}: gradient ascent {fmt(n_gd)} (best fixed step "
          f"{lr_gd:.3g} of 30 tried), natural-gradient ascent {fmt(n_nat)} (step 1); "
          f"|Fisher - diag(1/sigma^2, 2)| <= {dev:.1e}")

    fig, (ax,) = C.figure(1, width=6.0, height=5.0)
    mus = np.linspace(-3.0, 5.0, 161)
    lss = np.linspace(-1.0, 2.2, 129)
    M, S = np.meshgrid(mus, lss)
    xs = x.numpy()[:, None, None]
    LL = (-0.5 * np.log(2 * np.pi) - S - 0.5 * (xs - M) ** 2 / np.exp(2 * S)).mean(0)
    top = float(LL.max())
    levels = np.sort(top - np.geomspace(top - float(LL.min()), 1e-3, 24))
    ax.contourf(M, S, LL, levels=np.append(levels, top), cmap="viridis", alpha=0.35)
    ax.contour(M, S, LL, levels=levels, colors="0.6", linewidths=0.5)
    delta = args.delta
    t = np.linspace(0, 2 * np.pi, 100)
    for m0 in np.linspace(-2.0, 4.0, 5):
        for s0 in np.linspace(-0.5, 1.8, 5):
            F = normal_fisher(m0, s0).numpy()
            # {d : d^T F d / 2 = delta}: d = sqrt(2 delta) F^{-1/2} (cos t, sin t)
            w, U = np.linalg.eigh(F)
            e = np.sqrt(2 * delta) * (U @ np.diag(w ** -0.5) @ np.stack([np.cos(t), np.sin(t)]))
            ax.plot(m0 + e[0], s0 + e[1], color="C3", lw=1)
    ax.plot(*gd.numpy().T, "o-", color="C1", ms=2.5, lw=1,
            label=f"gradient ascent, step {lr_gd:.3g} ({fmt(n_gd)} steps)")
    ax.plot(*nat.numpy().T, "s-", color="C0", ms=3.5, lw=1.2,
            label=f"natural gradient, step 1 ({fmt(n_nat)} steps)")
    ax.plot(*mle.numpy(), "k*", ms=10, label="maximum likelihood")
    ax.set_xlim(mus[0], mus[-1])
    ax.set_ylim(lss[0], lss[-1])
    ax.set_xlabel("mu")
    ax.set_ylabel("log sigma")
    ax.set_title(f"(b) Gaussian log-likelihood (n={args.n}), Fisher ellipses (KL = {delta:g})")
    ax.legend(fontsize=8, loc="lower right")
    C.save(fig, os.path.join(out, "seeds_b_fisher_ellipses.png"))
    return n_gd, n_nat, dev


# ------------------------------------------------------------------ (c) policy gradient


def expected_reward(theta, gamma):
    """``J(k, sigma)``: ``gamma = 0``: one step, ``s ~ N(0, 1)``; ``gamma > 0``: discounted
    infinite horizon with ``s' = s + a``, ``s_0 ~ N(0, 1)``. Also returns the discounted
    state second moment ``V = sum_t gamma^t E[s_t^2]`` and ``W = sum_t gamma^t``."""
    k, sigma = theta[0], theta[1]
    if gamma == 0:
        return -1.0 - k**2 - sigma**2, torch.ones_like(k), torch.ones_like(k)
    c = (1 + k) ** 2  # E[s_{t+1}^2] = c E[s_t^2] + sigma^2
    a = 1 / (1 - gamma * c)
    V = a + sigma**2 * gamma * a / (1 - gamma)
    W = torch.full_like(k, 1 / (1 - gamma))
    J = -(1 + k**2) * V - sigma**2 * W
    return torch.where(gamma * c < 1, J, -math.inf), V, W  # -inf: the state diverges


def policy_fisher(theta, state_var, weight):
    """``weight * E_s[Fisher of N(k s, sigma^2) in (k, sigma)]`` for ``s ~ N(0, state_var)``:
    pyro_natgrad's Normal Fisher pulled back through ``loc = k s``, 3-point Gauss-Hermite
    (exact: the integrand is quadratic in ``s``). ``theta`` is ``[..., 2]``; the result
    ``[..., 2, 2]``."""
    nodes, w = np.polynomial.hermite_e.hermegauss(3)
    theta = theta.detach()
    k, sigma = theta[..., 0:1], theta[..., 1:2]
    s = torch.as_tensor(nodes, dtype=DTYPE) * torch.as_tensor(state_var).unsqueeze(-1).sqrt()
    s = s.expand(k.shape[:-1] + (3,)).clone()
    d = dist.Normal(k * s, sigma.expand(s.shape).clone())
    F = pyro_natgrad.fisher_information(d, coords={"loc": AffineTransform(0.0, s)})
    w = torch.as_tensor(w / w.sum(), dtype=DTYPE)
    return torch.as_tensor(weight).unsqueeze(-1).unsqueeze(-1) * (
        w.view(-1, 1, 1) * F).sum(-3)


def pg_direction(theta, gamma, natural):
    """``(J, grad J, direction, F)`` at ``theta`` (``[..., 2]``): the direction is the
    gradient (vanilla) or ``F^{-1}`` times it (natural)."""
    th = theta.clone().requires_grad_(True)
    J, V, W = expected_reward(th.unbind(-1), gamma)
    (g,) = torch.autograd.grad(J.sum(), th)
    F = policy_fisher(theta, (V / W).detach(), W.detach())
    d = torch.linalg.solve(F, g.unsqueeze(-1)).squeeze(-1) if natural else g
    return J.detach(), g, d, F


def policy_ascent(theta0, gamma, delta, steps, natural):
    """Steps of KL size ``delta`` (``d^T F d / 2 = delta``) along the vanilla or the
    natural gradient. Returns the iterates and ``J`` along them."""
    theta = theta0.clone()
    path, Js = [theta.clone()], []
    for _ in range(steps):
        J, g, d, F = pg_direction(theta, gamma, natural)
        Js.append(float(J))
        size = float(d @ F @ d)
        if size <= 0:
            break
        new = theta + math.sqrt(2 * delta / size) * d
        if new[1] <= 0 or not math.isfinite(float(expected_reward(new, gamma)[0])):
            break  # left the policy family or the stable region
        theta = new
        path.append(theta.clone())
    Js.append(float(expected_reward(theta, gamma)[0]))
    return torch.stack(path), np.asarray(Js)


def optimum(gamma):
    """Best ``(k, J)`` (``sigma = 0``): the scalar discounted Riccati solution."""
    if gamma == 0:
        return 0.0, -1.0
    P = 1.0
    for _ in range(10000):  # P = 1 + gamma P - (gamma P)^2 / (1 + gamma P)
        P = 1 + gamma * P - (gamma * P) ** 2 / (1 + gamma * P)
    k = -gamma * P / (1 + gamma * P)
    return k, -P


def part_c(args, out):
    gamma, delta = args.gamma, args.kl_step
    theta0 = torch.tensor(args.theta0_pg, dtype=DTYPE)
    if not math.isfinite(float(expected_reward(theta0, gamma)[0])):
        raise SystemExit(f"--theta0-pg {args.theta0_pg} gives an unstable policy for "
                         f"gamma={gamma}")
    k_star, J_star = optimum(gamma)
    van, J_van = policy_ascent(theta0, gamma, delta, args.pg_steps, natural=False)
    nat, J_nat = policy_ascent(theta0, gamma, delta, args.pg_steps, natural=True)
    F0 = policy_fisher(theta0, torch.tensor(1.0, dtype=DTYPE), torch.tensor(1.0, dtype=DTYPE))
    F0_closed = torch.diag(torch.tensor([1.0, 2.0], dtype=DTYPE)) / theta0[1] ** 2
    print(f"(c) after {args.pg_steps} steps of KL size {delta:g} (gamma={gamma:g}): vanilla "
          f"J = {J_van[-1]:.5f}, natural J = {J_nat[-1]:.5f}, optimum J* = {J_star:.5f}; "
          f"|E_s Fisher - diag(1, 2)/sigma^2| = "
          f"{float((F0 - F0_closed).abs().max()):.1e}")

    fig, axes = C.figure(3, width=4.8, height=4.3)
    ks = np.linspace(-2.0, 1.5, 23) if gamma == 0 else np.linspace(-1.9, -0.05, 23)
    sig = np.linspace(0.08, 1.4, 17)
    KK, SS = np.meshgrid(np.linspace(ks[0], ks[-1], 150), np.linspace(sig[0], sig[-1], 120))
    Jgrid = expected_reward(torch.tensor(np.stack([KK, SS])), gamma)[0].numpy()
    for ax, natural, path, name in ((axes[0], False, van, "vanilla gradient"),
                                    (axes[1], True, nat, "natural gradient")):
        finite = np.isfinite(Jgrid)
        ax.contour(KK, SS, np.where(finite, Jgrid, np.nan),
                   levels=np.quantile(Jgrid[finite], np.linspace(0.02, 0.98, 14)),
                   colors="0.75", linewidths=0.8)
        grid = torch.tensor(np.stack(np.meshgrid(ks, sig), -1))  # [sigma, k, 2]
        stable = torch.isfinite(expected_reward(grid.unbind(-1), gamma)[0])
        safe = torch.where(stable.unsqueeze(-1), grid, torch.tensor(args.theta0_pg,
                                                                     dtype=DTYPE))
        d = pg_direction(safe, gamma, natural)[2]
        d = (d / d.norm(dim=-1, keepdim=True)).masked_fill(~stable.unsqueeze(-1), float("nan"))
        U, V = d[..., 0].numpy(), d[..., 1].numpy()
        ax.quiver(ks, sig, U, V, color="C0" if natural else "C1", angles="xy", scale=30,
                  width=0.004)
        ax.plot(*path.numpy().T, "-", color="k", lw=1.2, label="path from theta0")
        ax.plot([k_star], [0.0], "k*", ms=10, clip_on=False)
        ax.set_xlabel("k")
        ax.set_ylabel("sigma")
        ax.set_title(f"(c) {name} directions")
        ax.legend(fontsize=8, loc="upper right")
    ax = axes[2]
    ax.semilogy(np.maximum(J_star - J_van, 1e-16), color="C1", label="vanilla gradient")
    ax.semilogy(np.maximum(J_star - J_nat, 1e-16), color="C0", label="natural gradient")
    ax.set_xlabel(f"step (KL size {delta:g} each)")
    ax.set_ylabel("J* - J")
    ax.set_title("(c) learning curves")
    ax.legend(fontsize=8)
    C.save(fig, os.path.join(out, "seeds_c_policy_gradient.png"))
    return J_van[-1], J_nat[-1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=C.description(__doc__))
    parser.add_argument("--out", default=".", help="folder for the three PNGs (default: .)")
    parser.add_argument("--steps", type=int, default=200,
                        help="most iterations in (a) and (b) (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of (b)'s sample (default: 0)")
    parser.add_argument("--scale", type=float, default=1.0, help="(a) scale of A (default: 1)")
    parser.add_argument("--x0", type=float, nargs=2, default=[2.0, 0.5],
                        help="(a) starting point (default: 2 0.5)")
    parser.add_argument("--n", type=int, default=50, help="(b) sample size (default: 50)")
    parser.add_argument("--theta0", type=float, nargs=2, default=[-2.0, 1.5],
                        help="(b) starting (mu, log sigma) (default: -2 1.5)")
    parser.add_argument("--delta", type=float, default=0.02,
                        help="(b) KL radius of the Fisher ellipses (default: 0.02)")
    parser.add_argument("--gamma", type=float, default=0.0,
                        help="(c) discount; 0 (default) is the one-step problem")
    parser.add_argument("--kl-step", type=float, default=0.01,
                        help="(c) KL size of every policy step (default: 0.01)")
    parser.add_argument("--pg-steps", type=int, default=50,
                        help="(c) policy-gradient steps (default: 50)")
    parser.add_argument("--theta0-pg", type=float, nargs=2, default=[-1.5, 0.8],
                        help="(c) starting (k, sigma) (default: -1.5 0.8)")
    args = parser.parse_args(argv)
    if args.scale <= 0 or args.n < 2 or args.steps < 1 or args.pg_steps < 1:
        parser.error("need --scale > 0, --n >= 2, --steps >= 1, --pg-steps >= 1")
    if not 0 <= args.gamma < 1 or args.kl_step <= 0 or args.theta0_pg[1] <= 0:
        parser.error("need 0 <= --gamma < 1, --kl-step > 0 and a positive sigma in --theta0-pg")
    C.check_output(parser, args.out, "--out", folder=True)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    part_a(args, args.out)
    part_b(args, args.out)
    part_c(args, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
