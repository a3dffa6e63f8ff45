"""Bayesian Poisson regression: a count GLM against its maximum-likelihood fit, and a
latent-GP Poisson model against a gold-standard posterior (``--gp``).

GLM (default). Data: the RAND Health Insurance Experiment extract that ships with
statsmodels (``statsmodels.datasets.randhie``, bundled with the package, no
download; from Cameron & Trivedi, *Microeconometrics*, 2005): 20,190
person-years, the count ``mdvis`` (outpatient visits to a doctor) against nine
covariates (log coinsurance, deductible plan, participation incentive, ...)
and an intercept. Model: ``b ~ N(0, 10^2 I)``, ``mdvis ~ Poisson(exp(X b))``,
covariates as they come, so the coefficients read like statsmodels' output.
With 20,190 observations the weak prior hardly matters and the posterior is
close to ``N(MLE, inverse Fisher)``, so the script prints the posterior beside
the maximum-likelihood fit of ``statsmodels.GLM(family=Poisson())`` and its
standard errors. (The counts are overdispersed, variance 20 against mean 2.9, so a
Poisson model understates the uncertainty; that is the model's fault, not the
inference's, and the comparison here is between two fits of the same model.)

``--batch-size B``: the GLM by minibatch SVI, each step's ELBO on a random ``B`` of
the rows (``pyro.plate(..., subsample_size=B)``, its likelihood scaled up to the full
data); the means then average the minibatch noise away slowly
(docs/examples/poisson_regression.rst has the figures).

``--gp``: posteriordb's ``gp_pois_regr`` (packaged as the reference
``gp_pois_regr-gp_pois_regr``): 11 counts on a line, a latent Gaussian process
``f`` (squared-exponential kernel, non-centred, ``rho ~ Gamma(25, 4)``,
``alpha ~ HalfNormal(2)``) and ``k ~ Poisson(exp(f))``, compared with long-run
NUTS draws (means, sds, 5 % and 95 % quantiles). The posterior of the kernel
parameters is not Gaussian (in log space either), so the Gaussian guide
matches ``f`` well but not the spread of ``rho`` and ``alpha``. The loss can jump
by orders of magnitude in the first steps (a draw in the tails of the first,
poorly fitted guides); the trust region keeps that from derailing the fit.

The guide is ``AutoMultivariateNormal`` in both cases. Run
``python examples/poisson_regression.py --help`` for the options.
"""

import argparse

import _common as C
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoMultivariateNormal, init_to_feasible

from pyro_natgrad.datasets import load_reference

GP_REFERENCE = "gp_pois_regr-gp_pois_regr"


def load_randhie(dtype=torch.float64):
    """``(X with a const column, y, column names)`` from statsmodels' bundled randhie."""
    import statsmodels.api as sm

    data = sm.datasets.randhie.load_pandas()
    X = sm.add_constant(data.exog.astype(float), prepend=True)
    y = data.endog.astype(float)
    return (torch.tensor(X.values, dtype=dtype), torch.tensor(y.values, dtype=dtype),
            list(X.columns))


def glm_model(X, y, batch_size=None):
    """The GLM; with ``batch_size`` each evaluation sees a random subsample of that
    many rows, its log likelihood scaled by ``len(y) / batch_size`` (Pyro's plate)."""
    def model():
        b = pyro.sample("b", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), 10.0)
                        .to_event(1))
        with pyro.plate("data", len(y), subsample_size=batch_size) as i:
            pyro.sample("y", dist.Poisson(torch.exp(X[i] @ b)), obs=y[i])

    return model


def rows_per_evaluation(model) -> int:
    """The observations one run of ``model`` sees, read from its trace."""
    with torch.no_grad():
        trace = poutine.trace(model).get_trace()
    return int(trace.nodes["y"]["value"].shape[-1])


def maximum_likelihood(X, y):
    """statsmodels' Poisson GLM fit: ``(coefficients, standard errors)``."""
    import statsmodels.api as sm

    res = sm.GLM(y.numpy(), X.numpy(), family=sm.families.Poisson()).fit()
    return np.asarray(res.params), np.asarray(res.bse)


def run_glm(args, data):
    X, y, columns = data
    names = [f"b[{c}]" for c in columns]
    model = glm_model(X, y, args.batch_size)
    mle, se = maximum_likelihood(X, y)
    print(f"randhie (statsmodels, bundled): n={len(y)} person-years, outcome mdvis "
          f"(mean {float(y.mean()):.2f}, variance {float(y.var()):.1f}), "
          f"{X.shape[1]} coefficients")
    if args.batch_size is not None:
        print(f"minibatch SVI: each step's ELBO sees {rows_per_evaluation(model)} of "
              f"{len(y)} observations")
    options = args.natgrad_options
    fits = [C.fit(model, lambda: AutoMultivariateNormal(model, init_loc_fn=init_to_feasible),
                  opt, steps, lr=args.lr, seed=args.seed, quiet=args.quiet,
                  natgrad_options=options)
            for opt, steps in C.runs(args)]
    summaries = {}
    for f in fits:
        draws = C.guide_draws(f.activate(), args.samples)
        summaries[f.optimizer] = C.summarise(names, draws["b"])
    main_fit = fits[0]
    s = summaries[main_fit.optimizer]
    print(f"\n{main_fit.label}; {args.samples} guide draws; "
          f"z = (mean - MLE) / SE (statsmodels GLM Poisson)")
    C.print_table(s, mle, se, "MLE")
    err, rmin, rmax = C.compare(s, mle, se)
    print(f"\nmax |mean - MLE| = {err:.3f} SE; sd ratio q/SE = {rmin:.3f}..{rmax:.3f}")
    print(f"final ELBO (mean of last 10 steps) = {-main_fit.losses[-10:].mean():.3f}")
    for f in fits[1:]:
        e, lo, hi = C.compare(summaries[f.optimizer], mle, se)
        print(f"{f.label}: max |mean - MLE| = {e:.3f} SE; sd ratio = {lo:.3f}..{hi:.3f}")
    if args.plot:
        fig, axes = C.figure(2, width=5.5)
        C.plot_elbo(axes[0], fits, "randhie Poisson GLM")
        # coefficients on very different scales: plot them standardised by the SE
        series = [("MLE +- 1.645 SE", np.zeros_like(mle), -1.645 * np.ones_like(mle),
                   1.645 * np.ones_like(mle))]
        for f in fits:
            q = summaries[f.optimizer]
            series.append((f"{C.LABELS[f.optimizer]} (5%..95%)", (q.mean - mle) / se,
                           (q.q05 - mle) / se, (q.q95 - mle) / se))
        C.plot_marginals(axes[1], names, series, "posterior marginals, (b - MLE) / SE")
        C.save(fig, args.plot)


def run_gp(args):
    ref = load_reference(GP_REFERENCE)
    options = args.natgrad_options
    print(f"{ref.name} ({ref.source}): {ref.n_data} counts, latent GP; "
          f"reference: long-run NUTS")
    fits = [C.fit(ref.model, lambda: AutoMultivariateNormal(ref.model), opt, steps,
                  lr=args.lr, seed=args.seed, quiet=args.quiet, natgrad_options=options)
            for opt, steps in C.runs(args)]
    summaries = {f.optimizer: C.reference_summary(ref, f.activate(), args.samples) for f in fits}
    losses = {}
    for f in fits:
        f.activate()
        pyro.set_rng_seed(args.seed)
        losses[f.optimizer] = C.expected_loss(ref.model, f.guide, 200)
    main_fit = fits[0]
    s = summaries[main_fit.optimizer]
    q = ref.quantiles
    print(f"\n{main_fit.label}; {args.samples} guide draws; z = (mean - ref mean) / ref sd")
    C.print_table(s, ref.mean, ref.sd, "reference", ref_quantiles=(q[0.05], q[0.95]))
    f_idx = [i for i, n in enumerate(ref.param_names) if n.startswith("f[")]
    k_idx = [i for i, n in enumerate(ref.param_names) if not n.startswith("f[")]
    print()
    for label, idx in (("f (latent GP)", f_idx), ("rho, alpha (kernel)", k_idx)):
        err, rmin, rmax = C.compare(s, ref.mean, ref.sd, idx)
        print(f"{label:20s}: max |mean err| = {err:.3f} ref sd; sd ratio q/ref = "
              f"{rmin:.3f}..{rmax:.3f}")
    for f in fits:
        print(f"{f.label}: -ELBO = {losses[f.optimizer]:.2f} nats (200 draws)")
    if args.plot:
        fig, axes = C.figure(2, width=5.5)
        C.plot_elbo(axes[0], fits, "latent-GP Poisson regression")
        series = [("reference (5%..95%)", ref.mean, q[0.05], q[0.95])]
        for f in fits:
            qs = summaries[f.optimizer]
            series.append((f"{C.LABELS[f.optimizer]} (5%..95%)", qs.mean, qs.q05, qs.q95))
        C.plot_marginals(axes[1], ref.param_names, series, "posterior marginals")
        C.save(fig, args.plot)


def main(argv=None):
    parser = argparse.ArgumentParser(description=C.description(__doc__))
    parser.add_argument("--gp", action="store_true",
                        help="the latent-GP Poisson model (reference gp_pois_regr) instead")
    parser.add_argument("--max-kl", type=float, default=None,
                        help="NaturalGradient's trust region max_kl (default: the "
                             "optimizer's default)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="GLM only: minibatch SVI, each step on a random subsample of "
                             "this many observations (default: all 20,190)")
    C.add_common_args(parser, natgrad_steps="100 (--gp: 300)", adam_steps="3000 (--gp: 5000)")
    args = C.finish_args(parser, argv, lambda a: {"natgrad": 300, "adam": 5000} if a.gp
                         else {"natgrad": 100, "adam": 3000})
    if args.batch_size is not None and (args.gp or args.batch_size < 1):
        parser.error("--batch-size needs a positive size, and applies to the GLM only")
    args.natgrad_options = C.natgrad_options(parser, args.max_kl)
    if args.gp:
        run_gp(args)
        return 0
    data = load_randhie()
    n = len(data[1])
    if args.batch_size is not None and args.batch_size > n:
        # Pyro's plate would refuse it only at the first step, after the MLE fit
        parser.error(f"--batch-size {args.batch_size}: the GLM has only {n} observations "
                     f"(give 1..{n})")
    run_glm(args, data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
