"""Hierarchical models: where a Gaussian guide with natural gradients does well, and
where no Gaussian guide can.

Radon (``--model radon``): inference-gym's contextual-effects model of log radon
in 919 Minnesota homes (Gelman & Hill's data), packaged as the reference
``radon_contextual_effects_minnesota_halfnormal``: 85 county effects
``county_effect[j] ~ N(county_effect_mean, county_effect_scale)``, three
regression weights (log uranium, floor, county mean floor) and a noise scale,
scales ~ HalfNormal(1); 91 latent dimensions. With ``AutoMultivariateNormal``
and ``NaturalGradient`` (defaults) the regression weights, the noise scale and the
mean county effect come out close to the reference (long-run NUTS), in means and in
sds; the 85 county effects near it (means within 0.47 reference sds, median 0.13;
sds 0.98 to 1.23 times the reference's). The county *scale* does not: its
posterior is skewed, and in this centred parameterisation it forms a funnel
with the county effects (a small scale forces the effects close together),
which a Gaussian cannot follow. The guide's sd for the scale is about a third
of the reference's, and its mean is somewhat high.

Eight schools (``--model eight_schools``): posteriordb's non-centred eight
schools (``eight_schools-eight_schools_noncentered``; 8 schools, ``mu ~ N(0, 5)``,
``tau ~ HalfCauchy(5)``). The guide is Gaussian in ``(mu, log tau, theta_trans)``.
The reference posterior of the between-school sd ``tau`` has much of its mass
near 0 and a long right tail. In ``log tau`` that is a long left tail, which a
Gaussian cannot represent: whatever the optimizer, the variational ``tau`` misses
the mass near zero (its 5 % quantile is several times the reference's) and its
sd comes out too small, even though its mean can be about right. The script
prints the reference and variational summaries of ``tau`` side by side.

Run ``python examples/hierarchical.py --help`` for the options.
"""

import argparse

import _common as C
import numpy as np
import pyro
from pyro.infer.autoguide import AutoMultivariateNormal

from pyro_natgrad.datasets import load_reference

RADON = "radon_contextual_effects_minnesota_halfnormal"
EIGHT_SCHOOLS = "eight_schools-eight_schools_noncentered"
STEPS = {"radon": {"natgrad": 200, "adam": 2000},
         "eight_schools": {"natgrad": 200, "adam": 3000}}


def fit_reference(ref, args, steps_of, natgrad_options):
    runs = [(args.optimizer, steps_of(args.optimizer, True))]
    if args.plot:
        runs.append((args.other, steps_of(args.other, False)))
    fits = [C.fit(ref.model, lambda: AutoMultivariateNormal(ref.model), opt, steps, lr=args.lr,
                  seed=args.seed, quiet=args.quiet, natgrad_options=natgrad_options,
                  desc=f"{ref.name.split('_')[0]}: {C.LABELS[opt]}")
            for opt, steps in runs]
    summaries = {f.optimizer: C.reference_summary(ref, f.activate(), args.samples) for f in fits}
    return fits, summaries


def run_radon(args, steps_of, axes=None):
    ref = load_reference(RADON)
    options = args.natgrad_options
    print(f"== radon: {ref.name} ({ref.source}), {ref.n_data} homes, "
          f"{ref.n_params} latent dimensions; NaturalGradient{options or '()'}")
    fits, summaries = fit_reference(ref, args, steps_of, options)
    main_fit = fits[0]
    s = summaries[main_fit.optimizer]
    county = [i for i, n in enumerate(ref.param_names) if n.startswith("county_effect[")]
    others = [i for i in range(ref.n_params) if i not in county]
    rows = others + (county if args.full_table else county[:5])
    print(f"\n{main_fit.label}; {args.samples} guide draws; z = (mean - ref mean) / ref sd"
          + ("" if args.full_table else "; first 5 of 85 counties (--full-table for all)"))
    C.print_table(s, ref.mean, ref.sd, "reference", rows=rows)
    z = np.abs(s.mean - ref.mean) / ref.sd
    ratio = s.sd / ref.sd
    print()
    groups = [("county effects (85)", county),
              ("weights, noise scale", [i for i in others
                                        if not ref.param_names[i].startswith("county")]),
              ("county_effect_mean", [ref.param_names.index("county_effect_mean")]),
              ("county_effect_scale", [ref.param_names.index("county_effect_scale")])]
    for label, idx in groups:
        print(f"radon {label:22s}: max |mean err| = {z[idx].max():.3f} ref sd "
              f"(median {np.median(z[idx]):.3f}); sd ratio q/ref = "
              f"{ratio[idx].min():.2f}..{ratio[idx].max():.2f}")
    i = ref.param_names.index("county_effect_scale")
    print(f"radon: county_effect_scale {s.mean[i]:.3f} (sd {s.sd[i]:.3f}) against the "
          f"reference's {ref.mean[i]:.3f} (sd {ref.sd[i]:.3f}): its posterior is skewed and "
          f"forms a funnel with the county effects, which a Gaussian guide cannot follow "
          f"(sd ratio {s.sd[i] / ref.sd[i]:.2f}).")
    print(f"radon final ELBO (mean of last 10 steps) = {-main_fit.losses[-10:].mean():.3f}")
    if axes is not None:
        C.plot_elbo(axes[0], fits, "radon (91 latent dimensions)")
        C.plot_scatter(axes[1], ref.mean, ref.sd, summaries["natgrad"], county,
                       "radon county effects, natural gradient")
    return s


def run_eight_schools(args, steps_of, axes=None):
    ref = load_reference(EIGHT_SCHOOLS)
    options = args.natgrad_options
    print(f"== eight schools: {ref.name} ({ref.source}), {ref.n_data} schools; "
          f"NaturalGradient{options or '()'}")
    fits, summaries = fit_reference(ref, args, steps_of, options)
    main_fit = fits[0]
    s = summaries[main_fit.optimizer]
    q = ref.quantiles
    print(f"\n{main_fit.label}; {args.samples} guide draws; z = (mean - ref mean) / ref sd")
    C.print_table(s, ref.mean, ref.sd, "reference", ref_quantiles=(q[0.05], q[0.95]))
    i = ref.param_names.index("tau")
    q_tau = (s.q05[i], s.q50[i], s.q95[i])
    print("\ntau (between-school sd):   mean      sd      5%     50%     95%")
    print(f"  reference (NUTS)     {ref.mean[i]:8.3f} {ref.sd[i]:7.3f} {q[0.05][i]:7.3f} "
          f"{q[0.5][i]:7.3f} {q[0.95][i]:7.3f}")
    print(f"  variational          {s.mean[i]:8.3f} {s.sd[i]:7.3f} {q_tau[0]:7.3f} "
          f"{q_tau[1]:7.3f} {q_tau[2]:7.3f}")
    print(f"eight schools tau: q 5% quantile / reference 5% quantile = "
          f"{q_tau[0] / q[0.05][i]:.2f}; sd ratio = {s.sd[i] / ref.sd[i]:.2f}")
    print("eight schools: the posterior of tau is not log-normal (much mass near 0, "
          "a long right tail); a Gaussian guide on log tau cannot match it, "
          "whichever optimizer fits it.")
    theta = [j for j, n in enumerate(ref.param_names) if n.startswith("theta") or n == "mu"]
    err, rmin, rmax = C.compare(s, ref.mean, ref.sd, theta)
    print(f"eight schools theta, mu: max |mean err| = {err:.3f} ref sd; sd ratio q/ref = "
          f"{rmin:.2f}..{rmax:.2f}")
    print(f"eight schools final ELBO (mean of last 10 steps) = "
          f"{-main_fit.losses[-10:].mean():.3f}")
    if axes is not None:
        C.plot_elbo(axes[0], fits, "eight schools (non-centred)")
        ax = axes[1]
        for f in fits:
            pyro.set_rng_seed(args.seed)
            t = C.guide_draws(f.activate(), args.samples)["tau"].reshape(-1).numpy()
            ax.hist(t, bins=np.linspace(0, 25, 76), density=True, alpha=0.45,
                    color="C0" if f.optimizer == "natgrad" else "C1",
                    label=f"{C.LABELS[f.optimizer]}: q(tau)")
        for qq, ls in ((0.05, ":"), (0.5, "--"), (0.95, ":")):
            ax.axvline(q[qq][i], color="k", ls=ls, lw=1,
                       label="reference 5/50/95%" if qq == 0.05 else None)
        ax.set_xlabel("tau")
        ax.set_ylabel("density")
        ax.set_title("eight schools: tau, Gaussian guide on log tau")
        ax.legend(fontsize=8)
    return s


def main(argv=None):
    parser = argparse.ArgumentParser(description=C.description(__doc__))
    parser.add_argument("--model", choices=("both", "radon", "eight_schools"), default="both",
                        help="which model(s) to fit (default: both)")
    parser.add_argument("--max-kl", type=float, default=None,
                        help="NaturalGradient's trust region max_kl (default: the "
                             "optimizer's default)")
    parser.add_argument("--initial-step", type=float, default=None,
                        help="NaturalGradient's step_size=StepSize(initial=...) (default: "
                             "StepSize(), which starts at 1); 0.5 kept eight schools from "
                             "running away (docs/examples/hierarchical.rst)")
    parser.add_argument("--full-table", action="store_true",
                        help="print all 85 radon county effects")
    C.add_common_args(parser, natgrad_steps="200", adam_steps="2000 (radon), 3000 (eight "
                      "schools)")
    # None: each model's own default step counts (STEPS)
    args = C.finish_args(parser, argv, lambda a: {"natgrad": None, "adam": None})
    # the NaturalGradient options that --max-kl and --initial-step set, checked up front
    args.natgrad_options = C.natgrad_options(parser, args.max_kl, args.initial_step)

    def steps_of(model):
        def inner(opt, chosen):
            n = args.steps if chosen else args.compare_steps
            return STEPS[model][opt] if n is None else n
        return inner

    models = ["radon", "eight_schools"] if args.model == "both" else [args.model]
    fig = axes = None
    if args.plot:
        fig, axes = C.figure(2, width=5.5, nrows=len(models))
    for k, name in enumerate(models):
        if k:
            print()
        run = run_radon if name == "radon" else run_eight_schools
        run(args, steps_of(name), None if axes is None else axes[2 * k: 2 * k + 2])
    if args.plot:
        C.save(fig, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
