"""Closed-form Fisher information with pyro_natgrad.

Prints the Fisher information matrix of a univariate Normal in (mu, log sigma)
coordinates, checks it against the textbook value diag(1/sigma^2, 2), and then
prints the Fisher information of a two-dimensional MultivariateNormal.

Run ``python examples/fisher_demo.py --help`` for the options.
"""

import argparse
import sys

import pyro.distributions as dist
import torch

import pyro_natgrad


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=(
            "Print closed-form Fisher information matrices computed by pyro_natgrad: "
            "a Normal(mu, sigma) in (mu, log sigma) coordinates, checked against "
            "diag(1/sigma^2, 2), and a two-dimensional MultivariateNormal."
        )
    )
    parser.add_argument("--mu", type=float, default=0.0, help="mean of the Normal (default: 0)")
    parser.add_argument(
        "--sigma", type=float, default=2.0, help="standard deviation of the Normal (default: 2)"
    )
    parser.add_argument(
        "--rho",
        type=float,
        default=0.5,
        help="correlation of the MultivariateNormal's two coordinates (default: 0.5)",
    )
    parser.add_argument(
        "--coords",
        default="unconstrained",
        choices=["standard", "unconstrained", "natural", "mean"],
        help="coordinate system for the MultivariateNormal (default: unconstrained)",
    )
    args = parser.parse_args(argv)
    if args.sigma <= 0:
        parser.error("--sigma must be positive")
    if not -1.0 < args.rho < 1.0:
        parser.error("--rho must lie strictly between -1 and 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_printoptions(precision=4, sci_mode=False)

    # 1. Normal in (mu, log sigma): the Fisher information is diag(1/sigma^2, 2).
    normal = dist.Normal(torch.tensor(args.mu), torch.tensor(args.sigma))
    fisher = pyro_natgrad.fisher_information(normal, coords="unconstrained")
    expected = torch.diag(torch.tensor([1.0 / args.sigma**2, 2.0]))
    print(f"Fisher information of Normal({args.mu:g}, {args.sigma:g}) in (mu, log sigma):")
    print(fisher)
    print("closed form diag(1/sigma^2, 2):")
    print(expected)
    if not torch.allclose(fisher.to(expected.dtype), expected, rtol=1e-5, atol=1e-6):
        print("MISMATCH between pyro_natgrad and the closed form", file=sys.stderr)
        return 1

    # 2. A correlated two-dimensional MultivariateNormal.
    cov = torch.tensor([[1.0, args.rho], [args.rho, 1.0]])
    mvn = dist.MultivariateNormal(torch.zeros(2), covariance_matrix=cov)
    fisher_mvn = pyro_natgrad.fisher_information(mvn, coords=args.coords)
    print()
    print(f"Fisher information of MultivariateNormal(0, [[1, {args.rho:g}], [{args.rho:g}, 1]])")
    print(f"in {args.coords!r} coordinates, shape {tuple(fisher_mvn.shape)}:")
    print(fisher_mvn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
