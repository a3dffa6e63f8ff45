"""Bayesian logistic (or probit) regression on German credit, against a gold standard.

Data and model: inference-gym's German credit (numeric) regression, packaged with
pyro_natgrad as the references ``german_credit_numeric_logistic_regression`` and
``german_credit_numeric_probit_regression`` (``pyro_natgrad.datasets``): 1,000
loan applicants of the UCI Statlog German credit data, 24 standardised
numeric features and a bias (``w[25]``), ``w ~ N(0, I)``, and
``y ~ Bernoulli(sigmoid([x, 1] @ w))`` (``--link logit``, the default) or
``y ~ Bernoulli(Phi([x, 1] @ w))`` (``--link probit``).

The guide is ``AutoMultivariateNormal``. The script prints the variational
posterior beside the reference (long-run NUTS, means and sds) and the largest
error of a posterior mean in reference sds, ``max |mean err|``, and the range
of the ratios of variational to reference sds. The posterior is close to
Gaussian, so a full-rank Gaussian guide can match it well.

Run ``python examples/logistic_regression.py --help`` for the options.
"""

import argparse

import _common as C
from pyro.infer.autoguide import AutoMultivariateNormal

from pyro_natgrad.datasets import load_reference

REFERENCES = {
    "logit": "german_credit_numeric_logistic_regression",
    "probit": "german_credit_numeric_probit_regression",
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=C.description(__doc__))
    parser.add_argument("--link", choices=sorted(REFERENCES), default="logit",
                        help="logit (logistic regression, default) or probit")
    C.add_common_args(parser, natgrad_steps=100, adam_steps=2000)
    args = C.finish_args(parser, argv)

    ref = load_reference(REFERENCES[args.link])
    print(f"German credit, {args.link} link: n={ref.n_data}, {ref.n_params} weights "
          f"(w[{ref.n_params}] is the bias); reference: {ref.name} ({ref.source})")

    fits = [C.fit(ref.model, lambda: AutoMultivariateNormal(ref.model), opt, steps, lr=args.lr,
                  seed=args.seed, quiet=args.quiet)
            for opt, steps in C.runs(args)]
    summaries = {f.optimizer: C.reference_summary(ref, f.activate(), args.samples) for f in fits}

    main_fit = fits[0]
    s = summaries[main_fit.optimizer]
    print(f"\n{main_fit.label}; {args.samples} guide draws; z = (mean - ref mean) / ref sd")
    C.print_table(s, ref.mean, ref.sd, "reference")
    err, rmin, rmax = C.compare(s, ref.mean, ref.sd)
    print(f"\nmax |mean err| = {err:.3f} ref sd; sd ratio q/ref = {rmin:.3f}..{rmax:.3f}")
    print(f"final ELBO (mean of last 10 steps) = {-main_fit.losses[-10:].mean():.3f}")
    for f in fits[1:]:
        e, lo, hi = C.compare(summaries[f.optimizer], ref.mean, ref.sd)
        print(f"{f.label}: max |mean err| = {e:.3f} ref sd; sd ratio = {lo:.3f}..{hi:.3f}")

    if args.plot:
        fig, axes = C.figure(2, width=5.5, height=5.5)
        C.plot_elbo(axes[0], fits, f"German credit, {args.link} regression")
        series = [("reference (mean +- 1.645 sd)", ref.mean, ref.mean - 1.645 * ref.sd,
                   ref.mean + 1.645 * ref.sd)]
        for f in fits:
            q = summaries[f.optimizer]
            series.append((f"{C.LABELS[f.optimizer]} (5%..95%)", q.mean, q.q05, q.q95))
        C.plot_marginals(axes[1], ref.param_names, series, "posterior marginals")
        C.save(fig, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
