"""Smoke tests of the example scripts: each runs as a user would run it (a subprocess,
from the repository root, with a small ``--steps``), and the numbers it prints are
checked, not only its exit status."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"
SCRIPTS = ["linear_regression.py", "logistic_regression.py", "poisson_regression.py",
           "hierarchical.py", "seeds_demos.py", "reference_suite.py"]
NUM = r"(-?[0-9]+(?:\.[0-9]*)?(?:e[+-]?[0-9]+)?)"


def run_example(script, *args, timeout=240):
    env = {**os.environ, "MPLBACKEND": "Agg"}
    cmd = [sys.executable, str(EXAMPLES / script), *args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(cmd)} exited {proc.returncode}\n"
                                  f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc.stdout


def numbers(pattern, text):
    """The numbers captured by the first match of ``pattern`` (``NUM`` marks a number)."""
    m = re.search(pattern.replace("{NUM}", NUM), text)
    assert m is not None, f"no match for {pattern!r} in:\n{text}"
    return [float(g) for g in m.groups()]


# Each script run as __main__ with --help, all in one interpreter: the imports (torch,
# pyro) cost seconds per process and --help runs nothing else.
HELP_DRIVER = """
import os, runpy, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))  # as a script: its folder first
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    print("=== " + path, flush=True)
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        assert e.code in (0, None), (path, e.code)
    sys.stdout.flush()
"""


def test_help():
    env = {**os.environ, "MPLBACKEND": "Agg"}
    paths = [str(EXAMPLES / s) for s in SCRIPTS]
    proc = subprocess.run([sys.executable, "-c", HELP_DRIVER, *paths], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    outs = proc.stdout.split("=== ")[1:]
    assert len(outs) == len(SCRIPTS), proc.stdout
    for script, out in zip(SCRIPTS, outs):
        assert out.startswith(str(EXAMPLES / script)) and "usage:" in out and "--steps" in out
        if script != "seeds_demos.py":  # no SVI there: both methods are always shown
            for option in ("--optimizer", "--lr", "--seed", "--plot", "--quiet"):
                assert option in out, f"{script} --help lacks {option}"


@pytest.mark.slow
def test_linear_known_noise_reaches_the_exact_posterior():
    out = run_example("linear_regression.py", "--steps", "30", "--quiet", "--samples", "2000")
    (kl,) = numbers(r"KL\(q \|\| exact\) = {NUM} nats", out)
    err, lo, hi = numbers(r"max \|mean err\| = {NUM} exact sd; sd ratio q/exact = "
                          r"{NUM}\.\.{NUM}", out)
    assert -1e-8 < kl < 0.05  # a KL below 0 beyond rounding is a bug
    assert err < 0.2 and 0.9 < lo <= hi < 1.1
    assert "w[bmi]" in out and "exact mean" in out


@pytest.mark.slow
def test_linear_unknown_noise_matches_quadrature():
    out = run_example("linear_regression.py", "--unknown-noise", "--steps", "30", "--quiet",
                      "--samples", "2000")
    err, lo, hi = numbers(r"max \|mean err\| = {NUM} exact sd; sd ratio q/exact = "
                          r"{NUM}\.\.{NUM}", out)
    assert err < 0.25 and 0.85 < lo <= hi < 1.15
    assert re.search(r"^sigma\s", out, re.M), "sigma row missing from the table"


def test_linear_adam_option_runs():
    out = run_example("linear_regression.py", "--optimizer", "adam", "--lr", "0.05",
                      "--steps", "200", "--quiet", "--samples", "500")
    assert "Adam (200 steps" in out
    (kl,) = numbers(r"KL\(q \|\| exact\) = {NUM} nats", out)
    assert -1e-8 < kl < 100


@pytest.mark.slow
def test_linear_plot_writes_png(tmp_path):
    png = tmp_path / "linear.png"
    out = run_example("linear_regression.py", "--steps", "10", "--compare-steps", "50",
                      "--quiet", "--samples", "500", "--plot", str(png))
    assert png.is_file() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}" in out


@pytest.mark.slow
@pytest.mark.parametrize("link", ["logit", "probit"])
def test_german_credit_against_gold_standard(link):
    out = run_example("logistic_regression.py", "--link", link, "--steps", "100", "--quiet",
                      "--samples", "2000")
    err, lo, hi = numbers(r"max \|mean err\| = {NUM} ref sd; sd ratio q/ref = {NUM}\.\.{NUM}",
                          out)
    assert err < 0.2
    assert 0.9 < lo <= hi < 1.1
    assert "w[25]" in out


@pytest.mark.slow
def test_poisson_glm_against_statsmodels_mle():
    out = run_example("poisson_regression.py", "--steps", "100", "--quiet", "--samples", "2000")
    assert "randhie" in out and "b[lncoins]" in out
    err, lo, hi = numbers(r"max \|mean - MLE\| = {NUM} SE; sd ratio q/SE = {NUM}\.\.{NUM}", out)
    # n = 20,190 and a weak prior: posterior ~ N(MLE, SE^2)
    assert err < 0.5
    assert 0.9 < lo <= hi < 1.1


@pytest.mark.slow
def test_poisson_glm_with_minibatches():
    """Minibatch SVI, 1,000 of 20,190 rows per step: the minibatch's log likelihood is
    scaled by 20.19 in the ELBO, and the model Hessian behind the precision must be too,
    or the sds would be off by a factor of about 4.5. The means average the minibatch
    noise only slowly (1.9 SE from the MLE after 300 steps at seed 0; 0.03 with all
    rows in 100 steps, above)."""
    out = run_example("poisson_regression.py", "--batch-size", "1000", "--steps", "300",
                      "--quiet", "--samples", "2000")
    # read from a trace of the example's model, so the option is known to be wired
    assert "each step's ELBO sees 1000 of 20190 observations" in out
    err, lo, hi = numbers(r"max \|mean - MLE\| = {NUM} SE; sd ratio q/SE = {NUM}\.\.{NUM}", out)
    assert err < 3
    assert 0.93 < lo <= hi < 1.08


@pytest.mark.slow
def test_poisson_gp_against_reference():
    out = run_example("poisson_regression.py", "--gp", "--steps", "100", "--quiet",
                      "--samples", "2000")
    err_f, lo_f, hi_f = numbers(r"f \(latent GP\)\s*: max \|mean err\| = {NUM} ref sd; "
                                r"sd ratio q/ref = {NUM}\.\.{NUM}", out)
    _, lo_k, hi_k = numbers(r"rho, alpha \(kernel\)\s*: max \|mean err\| = {NUM} ref sd; "
                            r"sd ratio q/ref = {NUM}\.\.{NUM}", out)
    # over the example's seeds 0-9: errors up to 0.55 sds, sd ratios 0.82 to 1.52 (1.40
    # at seed 0 here, 1.45 with another build of torch): a full-rank guide over f and the
    # kernel, whose posterior is not Gaussian
    assert err_f < 0.75 and 0.75 < lo_f <= hi_f < 1.6
    # the kernel parameters' posterior is not Gaussian: the guide is too narrow there
    assert hi_k < 1.0
    (loss,) = numbers(r"-ELBO = {NUM} nats", out)
    assert loss < 65


@pytest.mark.slow
def test_eight_schools_tau_is_out_of_reach_of_a_gaussian_guide():
    out = run_example("hierarchical.py", "--model", "eight_schools", "--steps", "200",
                      "--quiet", "--samples", "4000")
    err, lo, hi = numbers(r"eight schools theta, mu: max \|mean err\| = {NUM} ref sd; "
                          r"sd ratio q/ref = {NUM}\.\.{NUM}", out)
    assert err < 0.3 and 0.8 < lo <= hi < 1.25
    q05_ratio, sd_ratio = numbers(r"q 5% quantile / reference 5% quantile = {NUM}; "
                                  r"sd ratio = {NUM}", out)
    assert q05_ratio > 2.0  # the guide misses tau's mass near zero
    assert "cannot match" in out


@pytest.mark.slow
def test_eight_schools_seed_1_does_not_run_into_the_funnel():
    """Seed 1 ran away with the full-rank step before it had the mean-field path's
    halving limit (the ELBO about -45.7 after 100 steps: a Newton move that doubled at
    every step in the funnel's neck; see docs/examples/hierarchical.rst). With the
    defaults it must reach the other seeds' optimum, about -31.6."""
    out = run_example("hierarchical.py", "--model", "eight_schools", "--steps", "100",
                      "--seed", "1", "--quiet", "--samples", "2000")
    (elbo,) = numbers(r"eight schools final ELBO \(mean of last 10 steps\) = {NUM}", out)
    assert elbo > -33
    err, lo, hi = numbers(r"eight schools theta, mu: max \|mean err\| = {NUM} ref sd; "
                          r"sd ratio q/ref = {NUM}\.\.{NUM}", out)
    assert err < 0.3 and 0.7 < lo <= hi < 1.3


@pytest.mark.slow
def test_radon_good_except_the_county_scale():
    out = run_example("hierarchical.py", "--model", "radon", "--steps", "120", "--quiet",
                      "--samples", "2000", timeout=300)

    def group(label):
        return numbers(label + r"\s*: max \|mean err\| = {NUM} ref sd \(median {NUM}\); "
                       r"sd ratio q/ref = {NUM}\.\.{NUM}", out)

    err, _, lo, hi = group(r"radon weights, noise scale")
    assert err < 0.5 and 0.8 < lo <= hi < 1.25
    err, median, lo, hi = group(r"radon county effects \(85\)")
    assert median < 0.3 and err < 1.0 and 0.75 < lo <= hi < 1.35
    err, _, lo, _ = group(r"radon county_effect_scale")
    assert lo < 0.6  # the Gaussian guide is far too narrow for the skewed scale
    assert "funnel" in out


@pytest.mark.slow
def test_seeds_demos(tmp_path):
    out = run_example("seeds_demos.py", "--out", str(tmp_path), "--pg-steps", "40")
    n_euclid, n_metric = numbers(r"Euclidean steepest descent {NUM}, A-metric steepest "
                                 r"descent {NUM}", out)
    assert n_metric <= 2 < n_euclid
    n_gd, n_nat = numbers(r"gradient ascent {NUM} \(best fixed step .*natural-gradient "
                          r"ascent {NUM} \(step 1\)", out)
    assert n_nat < n_gd
    (dev,) = numbers(r"\|Fisher - diag\(1/sigma\^2, 2\)\| <= {NUM}", out)
    assert dev < 1e-6
    j_van, j_nat, j_star = numbers(r"vanilla J = {NUM}, natural J = {NUM}, optimum J\* = {NUM}",
                                   out)
    assert j_van < j_nat <= j_star + 1e-12
    for name in ("seeds_a_steepest_descent.png", "seeds_b_fisher_ellipses.png",
                 "seeds_c_policy_gradient.png"):
        png = tmp_path / name
        assert png.is_file() and png.stat().st_size > 10_000, name


def test_seeds_policy_gradient_discounted(tmp_path):
    out = run_example("seeds_demos.py", "--out", str(tmp_path), "--steps", "30",
                      "--gamma", "0.9", "--theta0-pg", "-1.2", "0.5", "--pg-steps", "30")
    j_van, j_nat, j_star = numbers(r"vanilla J = {NUM}, natural J = {NUM}, optimum J\* = {NUM}",
                                   out)
    assert j_van < j_nat <= j_star
    assert j_nat - j_van > 0.1  # the gap of Peters & Schaal's figure


def suite_rows(out):
    """``{(model, guide, optimizer): (steps, max err, sd lo, sd hi, elbo, close)}`` from
    the table printed by reference_suite.py."""
    rows = {}
    pattern = (r"^(\S+)\s+(Auto\w+)\s+(NaturalGradient|Adam)\s+(\d+)\s+[0-9.]+\s+{NUM}\s+"
               r"{NUM}\.\.{NUM}\s+{NUM}\s+(yes|no)$").replace("{NUM}", NUM)
    for m in re.finditer(pattern, out, flags=re.M):
        model, guide, opt, steps, err, lo, hi, elbo, close = m.groups()
        rows[(model, guide, opt)] = (int(steps), float(err), float(lo), float(hi),
                                     float(elbo), close == "yes")
    return rows


def test_reference_suite_lists_every_bundled_reference():
    from pyro_natgrad.datasets import list_references

    out = run_example("reference_suite.py", "--list", timeout=120)
    for name in list_references():
        assert re.search(rf"^{re.escape(name)}\s", out, flags=re.M), name
    assert re.search(r"^eight_schools\s+hierarchical\s+10\s+no\s", out, flags=re.M)


@pytest.mark.slow
def test_reference_suite_table(tmp_path):
    png = tmp_path / "suite.png"
    out = run_example("reference_suite.py", "--models", "kidiq", "eight_schools_noncentered",
                      "--steps", "100", "--adam-steps", "200", "--samples", "2000", "--quiet",
                      "--plot", str(png), timeout=300)
    rows = suite_rows(out)
    mvn = "AutoMultivariateNormal"
    assert set(rows) == {(m, mvn, o) for m in ("kidiq-kidscore_momhsiq",
                                                "eight_schools-eight_schools_noncentered*")
                         for o in ("NaturalGradient", "Adam")}, out
    # natural gradient reaches the linear regression's reference in 100 steps ...
    steps, err, lo, hi, elbo, close = rows[("kidiq-kidscore_momhsiq", mvn, "NaturalGradient")]
    assert steps == 100 and err < 0.2 and 0.85 < lo <= hi < 1.15
    assert -1880 < elbo < -1870  # log evidence about -1876.4 (benchmarks/RESULTS.md)
    # ... where 200 Adam steps (lr 0.01) are nowhere near: sigma starts far off
    steps, err, lo, hi, adam_elbo, close = rows[("kidiq-kidscore_momhsiq", mvn, "Adam")]
    assert steps == 200 and err > 1.0 and not close and adam_elbo < elbo - 100
    # eight schools: the means fit, tau's sd cannot (starred: not Gaussian)
    steps, err, lo, hi, elbo, close = rows[("eight_schools-eight_schools_noncentered*", mvn,
                                            "NaturalGradient")]
    assert err < 0.5 and lo < 0.95 and not close
    assert "NaturalGradient, AutoMultivariateNormal: 1/1 Gaussian-like posteriors close" in out
    assert "Adam, AutoMultivariateNormal: 0/1 Gaussian-like posteriors close" in out
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reference_suite_mean_field_option_and_bad_model_name():
    out = run_example("reference_suite.py", "--models", "kilpisjarvi", "--guide", "normal",
                      "--optimizer", "natgrad", "--steps", "20", "--samples", "500", "--quiet")
    rows = suite_rows(out)
    assert list(rows) == [("kilpisjarvi_mod-kilpisjarvi", "AutoNormal", "NaturalGradient")]
    assert rows[list(rows)[0]][0] == 20
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / "reference_suite.py"), "--models",
                           "no_such_model"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "matches no reference" in proc.stderr


def test_reference_suite_lowrank_option():
    """--guide lowrank on kidiq (4 dimensions, rank 2; sigma starts far off, so, as for
    AutoMultivariateNormal, the first 50 steps are spent getting there): close to the
    reference after 100 steps, the sds at most the reference's (a low-rank family can
    only lose variance in the directions it does not represent) within MC noise."""
    out = run_example("reference_suite.py", "--models", "kidiq", "--guide", "lowrank",
                      "--optimizer", "natgrad", "--steps", "100", "--samples", "2000",
                      "--quiet")
    rows = suite_rows(out)
    key = ("kidiq-kidscore_momhsiq", "AutoLowRankMultivariateNormal", "NaturalGradient")
    assert list(rows) == [key], out
    steps, err, lo, hi, elbo, close = rows[key]
    assert steps == 100 and err < 0.15 and 0.5 < lo <= hi < 1.08


def test_quickstart_natural_gradient_lands_on_the_exact_posterior():
    """The README's first command: 30 natural-gradient steps against the closed-form
    Gaussian posterior of the known-noise regression (KL and errors zero to rounding)."""
    out = run_example("quickstart.py", "--adam-steps", "200")
    kl, err, lo, hi = numbers(r"NaturalGradient \(30 steps\)\s+{NUM}\s+{NUM}\s+{NUM}\.\.{NUM}",
                              out)
    assert abs(kl) < 1e-8 and err < 1e-6 and lo == hi == 1.0, out
    assert re.search(r"^Adam lr=0\.01 \(200 steps\)", out, re.M), out


def test_fisher_demo_prints_the_seeds_anchor():
    """A Normal(0, 2) in (mu, log sigma) has Fisher diag(1/sigma^2, 2) = diag(0.25, 2),
    printed from the library and from the closed form."""
    out = run_example("fisher_demo.py")
    rows = re.findall(r"\[\[?\s*{NUM},\s+{NUM}\]".replace("{NUM}", NUM), out)
    assert [tuple(map(float, r)) for r in rows[:4]] == [(0.25, 0.0), (0.0, 2.0)] * 2, out
