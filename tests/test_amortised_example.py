"""Smoke tests of examples/amortised.py: run as a user would (a subprocess from the
repository root, small --steps) and check the numbers it prints against the exact
answer it computes in closed form (the PPCA posterior), not only its exit status."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "amortised.py"
NUM = r"(-?[0-9]+(?:\.[0-9]*)?(?:e[+-]?[0-9]+)?)"


def run_example(*args, timeout=300):
    env = {**os.environ, "MPLBACKEND": "Agg"}
    cmd = [sys.executable, str(SCRIPT), *args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(cmd)} exited {proc.returncode}\n"
                                  f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc.stdout


def numbers(pattern, text):
    m = re.search(pattern.replace("{NUM}", NUM), text)
    assert m is not None, f"no match for {pattern!r} in:\n{text}"
    return [float(g) for g in m.groups()]


def gap_column(text):
    """``{step: gap}`` from the printed table (first gap column)."""
    rows = re.findall(r"^\s*([0-9]+)\s+" + NUM + r"\s*$", text, re.M)
    return {int(s): float(g) for s, g in rows}


def test_help():
    out = run_example("--help", timeout=60)
    for option in ("--steps", "--optimizer", "--lr", "--seed", "--plot", "--quiet"):
        assert option in out


@pytest.mark.slow
def test_natural_gradient_closes_the_exact_gap():
    out = run_example("--steps", "15", "--quiet")
    (log_evidence,) = numbers(r"log p\(X\) = {NUM}", out)
    (best,) = numbers(r"best diagonal Gaussian guide: gap = {NUM} nats", out)
    assert abs(best) < 1e-6  # the guide family contains the exact posterior
    gaps = gap_column(out)
    assert gaps[1] > 1000 and gaps[15] < 100 and gaps[15] < gaps[1] / 100
    (final, per_image, ms, cg, products) = numbers(
        r"final gap = {NUM} nats \({NUM} per image\), {NUM} ms/step, CG iterations/step = "
        r"{NUM} \(max [0-9]+\), GGN products/step = {NUM}", out)
    assert final == gaps[15] and abs(per_image - final / 1797) < 1e-4
    assert 1 <= cg <= 20 and products == pytest.approx(cg + 2)
    (elbo,) = numbers(r"final ELBO \(mean of last 10 steps\) = {NUM}", out)
    # a single-sample ELBO near log p(X) - gap, within its Monte Carlo spread
    assert log_evidence - 3 * final - 200 < elbo < log_evidence + 200


@pytest.mark.slow
def test_adam_option_runs():
    out = run_example("--optimizer", "adam", "--lr", "0.01", "--steps", "100", "--quiet")
    assert "Adam lr=0.01 (100 steps" in out
    gaps = gap_column(out)
    assert gaps[100] < gaps[1]
