"""Gaussian guides on the non-centred eight schools, over many seeds.

The funnel's neck (``docs/examples/hierarchical.rst``) sent one full-rank seed of 72 into
a runaway before the full-rank step had the precision-halving limit; this counts the
runaways of a guide (``AutoNormal``, or ``--guide AutoMultivariateNormal``) with the
optimizer's defaults (the model's Hessian, 10 latents). For each seed: ``--steps`` SVI
steps (``Trace_ELBO``, one particle), then the ELBO estimated from ``--draws`` guide draws
(its own seed, ``1000 + seed``) and the guide's median of ``tau``. A runaway ends with an
ELBO below -36.

    python benchmarks/eight_schools_seeds.py [--guide AutoNormal] [--seeds 72]
        [--steps 100] [--draws 200]
"""

import argparse
import os
import statistics
import sys
import warnings

import pyro
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import check_at_least, environment_line, set_threads  # noqa: E402

from pyro_natgrad import NaturalGradient  # noqa: E402
from pyro_natgrad.datasets import load_reference  # noqa: E402

RUNAWAY_ELBO = -36.0
GUIDES = {"AutoNormal": AutoNormal, "AutoMultivariateNormal": AutoMultivariateNormal}


def fit(model, guide_cls, seed, steps, draws):
    """``(ELBO from draws, guide median of tau)`` after ``steps`` default steps."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = guide_cls(model)
    svi = SVI(model, guide, NaturalGradient(guide), Trace_ELBO())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            svi.step()
    pyro.set_rng_seed(1000 + seed)
    elbo = -Trace_ELBO(num_particles=draws).loss(model, guide)
    return elbo, float(guide.median()["tau"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guide", choices=sorted(GUIDES), default="AutoNormal",
                        help="the guide (AutoNormal)")
    parser.add_argument("--seeds", type=int, default=72, help="seeds 0 .. N-1 (72)")
    parser.add_argument("--steps", type=int, default=100, help="SVI steps per seed (100)")
    parser.add_argument("--draws", type=int, default=200, help="draws of the ELBO (200)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    args = parser.parse_args(argv)
    check_at_least(parser, args, 1, "seeds", "steps", "draws", "threads")
    set_threads(args.threads)
    model = load_reference("eight_schools-eight_schools_noncentered").model
    elbos, taus = [], []
    for seed in range(args.seeds):
        elbo, tau = fit(model, GUIDES[args.guide], seed, args.steps, args.draws)
        elbos.append(elbo)
        taus.append(tau)
    runaways = [s for s, e in enumerate(elbos) if e < RUNAWAY_ELBO]
    print(f"eight schools (non-centred), {args.guide}, NaturalGradient defaults, "
          f"{args.steps} steps, seeds 0-{args.seeds - 1}:")
    print(f"  ELBO ({args.draws} draws): {min(elbos):.2f} to {max(elbos):.2f}, median "
          f"{statistics.median(elbos):.2f} (worst seed {elbos.index(min(elbos))})")
    print(f"  guide median of tau: {min(taus):.2f} to {max(taus):.2f}")
    print(f"  runaways (ELBO < {RUNAWAY_ELBO:g}): {len(runaways)} {runaways or ''}")
    print(f"Environment: {environment_line()}")


if __name__ == "__main__":
    main()
