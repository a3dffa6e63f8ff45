"""Bad command-line options of the example and benchmark scripts: each must be refused
up front by argparse (exit status 2, a message naming the option and what it may be),
never with a traceback, a silent default, or after minutes of fitting.

All cases run as ``__main__`` in one interpreter (the imports of torch and pyro cost
seconds per process). ``SVI.step`` and ``subprocess.run`` are replaced by a stub that
stops the script, so a check that is missing shows up as "work started" at once instead
of a fit; an alarm stops any other long work."""

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

DRIVER = """
import contextlib, io, json, os, runpy, signal, subprocess, sys, time
import pyro.infer


class WorkStarted(BaseException):  # not an Exception: scripts that catch those report it
    pass


class TimedOut(BaseException):
    pass


def refuse(*args, **kwargs):
    raise WorkStarted


def alarm(*args):
    raise TimedOut


pyro.infer.SVI.step = refuse
subprocess.run = refuse
signal.signal(signal.SIGALRM, alarm)
base = list(sys.path)
results = []
for path, argv in json.loads(sys.argv[1]):
    sys.argv = [path] + argv
    sys.path[:] = [os.path.dirname(os.path.abspath(path))] + base  # as a script
    err = io.StringIO()
    start = time.perf_counter()
    signal.alarm(60)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(path, run_name="__main__")
        code = "finished"
    except SystemExit as e:
        code = e.code
    except WorkStarted:
        code = "work started"
    except TimedOut:
        code = "timed out"
    except Exception as e:
        code = "raised " + repr(e)[:300]
    signal.alarm(0)
    results.append({"code": code, "stderr": err.getvalue()[-2000:],
                    "seconds": time.perf_counter() - start})
print("RESULTS " + json.dumps(results))
"""


def cases(tmp):
    """``[(id, script, argv, [substrings the error message must hold])]``."""
    missing = str(tmp / "no_such_folder" / "out.png")
    a_file = tmp / "a_file"  # a plain file, made by the test
    ex, bm = "examples/", "benchmarks/"
    at_least = "must be at least"
    out = [
        # examples
        ("quickstart-steps", ex + "quickstart.py", ["--steps", "0"], ["--steps", at_least]),
        ("quickstart-adam-steps", ex + "quickstart.py", ["--adam-steps", "-1"],
         ["--adam-steps", at_least]),
        ("quickstart-threads", ex + "quickstart.py", ["--threads", "0"],
         ["--threads", at_least]),
        ("linear-plot", ex + "linear_regression.py", ["--plot", missing],
         ["--plot", "does not exist"]),
        ("linear-plot-folder", ex + "linear_regression.py", ["--plot", str(tmp)],
         ["--plot", "is a folder"]),
        ("logistic-plot", ex + "logistic_regression.py", ["--plot", missing], ["--plot"]),
        ("reference-suite-plot", ex + "reference_suite.py",
         ["--models", "kidiq", "--plot", missing], ["--plot", "does not exist"]),
        ("seeds-out", ex + "seeds_demos.py", ["--out", str(a_file / "sub")],
         ["--out", "not a folder"]),
        ("poisson-batch-size", ex + "poisson_regression.py", ["--batch-size", "30000"],
         ["--batch-size", "20190"]),
        ("poisson-max-kl", ex + "poisson_regression.py", ["--max-kl", "0"],
         ["--max-kl", "positive"]),
        ("poisson-plot", ex + "poisson_regression.py", ["--gp", "--plot", missing],
         ["--plot", "does not exist"]),
        ("hierarchical-max-kl", ex + "hierarchical.py", ["--max-kl", "-1"],
         ["--max-kl", "positive"]),
        ("hierarchical-max-kl-inf", ex + "hierarchical.py", ["--max-kl", "inf"],
         ["--max-kl", "finite"]),
        ("hierarchical-initial-step", ex + "hierarchical.py", ["--initial-step", "1.5"],
         ["--initial-step", "(0, 1]"]),
        ("hierarchical-plot", ex + "hierarchical.py", ["--plot", missing], ["--plot"]),
        ("amortised-steps", ex + "amortised.py", ["--steps", "0"], ["--steps", at_least]),
        ("eight-schools-seeds", bm + "eight_schools_seeds.py", ["--seeds", "0"],
         ["--seeds", at_least]),
        ("amortised-compare-steps", ex + "amortised.py", ["--plot", str(tmp / "a.png"),
                                                          "--compare-steps", "0"],
         ["--compare-steps", at_least]),
        ("amortised-latent", ex + "amortised.py", ["--latent", "64"],
         ["--latent", "1..60", "rank 61"]),
        ("amortised-latent-61", ex + "amortised.py", ["--latent", "61"], ["--latent", "1..60"]),
        ("amortised-plot", ex + "amortised.py", ["--plot", missing], ["--plot"]),
        # benchmarks
        ("convergence-steps", bm + "convergence.py",
         ["--steps", "0", "--mc-particles", "0", "--problems", "diabetes"],
         ["--steps", at_least]),
        ("convergence-mc-particles", bm + "convergence.py", ["--mc-particles", "-1"],
         ["--mc-particles", "at least 0"]),
        ("convergence-plot", bm + "convergence.py",
         ["--mc-particles", "0", "--problems", "diabetes", "--plot", missing],
         ["--plot", "does not exist"]),
        ("funnel-steps", bm + "funnel.py", ["--steps", "0"], ["--steps", at_least]),
        ("cost-repeats", bm + "cost.py", ["--repeats", "0"], ["--repeats", at_least]),
        ("cost-n", bm + "cost.py", ["--n", "0", "--quick"], ["--n", at_least]),
        ("cost-device-name", bm + "cost.py", ["--device", "gpu"], ["--device gpu"]),
        ("correlated-d", bm + "correlated_linear.py", ["--d", "0"], ["--d", at_least]),
        ("correlated-steps", bm + "correlated_linear.py", ["--d", "5", "--steps", "0"],
         ["--steps", at_least]),
        ("fullrank-d", bm + "fullrank_highdim.py", ["--d", "1", "--n", "20"],
         ["--d", "at least 2"]),
        ("fullrank-hessian-steps", bm + "fullrank_highdim.py",
         ["--d", "3", "--n", "20", "--hessian-steps", "0"], ["--hessian-steps", at_least]),
        ("ggn-seeds", bm + "ggn_targets.py", ["--seeds", "0"], ["--seeds", at_least]),
        ("ggn-cost-sizes", bm + "ggn_targets.py", ["--skip", "convergence", "--cost-sizes",
                                                   "100x0"], ["--cost-sizes", "at least 1"]),
        ("ggn-cost-sizes-format", bm + "ggn_targets.py", ["--cost-sizes", "100by10"],
         ["--cost-sizes", "N x D"]),
        ("handwritten-seeds", bm + "handwritten_families.py", ["--seeds", "0"],
         ["--seeds", at_least]),
        ("handwritten-site-max-kl", bm + "handwritten_families.py", ["--site-max-kl", "0"],
         ["--site-max-kl", "positive"]),
        ("handwritten-gaussian-seeds", bm + "handwritten_gaussian.py", ["--seeds", "0"],
         ["--seeds", at_least]),
        ("hvp-draws", bm + "hvp_logistic.py", ["--d", "5", "--n", "20", "--draws", "0"],
         ["--draws", at_least]),
        ("jit-steps", bm + "jit_elbo.py", ["--steps", "10", "0"], ["--steps", at_least]),
        ("jit-seeds", bm + "jit_elbo.py", ["--seeds", "0"], ["--seeds", at_least]),
        ("lowrank-rank", bm + "lowrank_vs_adam.py", ["--rank", "0"], ["--rank", at_least]),
        ("noncentred-groups", bm + "noncentred_hierarchy.py", ["--groups", "0"],
         ["--groups", at_least]),
        ("lowrank-seeds", bm + "lowrank_vs_adam.py", ["--seeds", "0"], ["--seeds", at_least]),
        ("reference-posteriors-samples", bm + "reference_posteriors.py",
         ["--models", "kidiq", "--num-samples", "0"], ["--num-samples", at_least]),
        ("reference-posteriors-models", bm + "reference_posteriors.py",
         ["--models", "no_such_model"], ["--models", "no_such_model"]),
        ("run-all-output", bm + "run_all.py", ["--only", "cost", "--output", missing],
         ["--output", "does not exist"]),
    ]
    if not torch.cuda.is_available():
        out.append(("cost-device-cuda", bm + "cost.py", ["--device", "cuda", "--quick"],
                    ["--device cuda", "torch.cuda.is_available()"]))
    return out


def run_driver(items):
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(items)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")][-1]
    return json.loads(line[len("RESULTS "):])


def test_bad_options_are_usage_errors(tmp_path):
    """Every case in one test (one interpreter; a module fixture would run once per
    xdist worker): exit status 2, argparse's "error:" line naming the option and its
    range, no traceback, nothing fitted. All failing cases are listed together."""
    (tmp_path / "a_file").write_text("")
    table = cases(tmp_path)
    results = run_driver([(script, argv) for _, script, argv, _ in table])
    assert len(results) == len(table)
    failures = []
    for (key, script, argv, expect), r in zip(table, results):
        stderr = r["stderr"]
        missing = [text for text in expect if text not in stderr]
        if r["code"] != 2 or "error:" not in stderr or "Traceback" in stderr or missing:
            failures.append(f"{key}: {script} {' '.join(argv)} -> exit {r['code']!r}, "
                            f"missing {missing} in stderr:\n{stderr[-600:]}")
        elif r["seconds"] > 20:  # parse errors come before any work, imports aside
            failures.append(f"{key}: refused only after {r['seconds']:.1f} s")
    assert not failures, "\n\n".join(failures)


def test_good_options_reach_the_fit(tmp_path):
    """The checks refuse only what they should: valid values at the edges of the ranges
    get as far as the first SVI step."""
    items = [
        ("examples/hierarchical.py", ["--max-kl", "0.5", "--initial-step", "1",
                                      "--model", "eight_schools",
                                      "--plot", str(tmp_path / "h.png")]),
        ("examples/amortised.py", ["--latent", "60", "--steps", "1"]),
        ("examples/quickstart.py", ["--steps", "1", "--adam-steps", "1", "--threads", "1"]),
        ("benchmarks/jit_elbo.py", ["--seeds", "1", "--steps", "1"]),
        ("benchmarks/eight_schools_seeds.py", ["--seeds", "1", "--steps", "1",
                                               "--draws", "1", "--threads", "1"]),
    ]
    for (script, argv), r in zip(items, run_driver(items)):
        assert r["code"] == "work started", (script, argv, r)


def load(path):
    """A helper module of the scripts, loaded from its file (they are not packages)."""
    spec = importlib.util.spec_from_file_location(f"cli_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_output_checks_pass_writable_places(tmp_path):
    examples = load(REPO_ROOT / "examples" / "_common.py")
    benchmarks = load(REPO_ROOT / "benchmarks" / "common.py")
    parser = argparse.ArgumentParser()
    for check in (examples.check_output, benchmarks.check_output):
        check(parser, str(tmp_path / "out.png"), "--plot")
        check(parser, None, "--plot")
        check(parser, "", "--plot")  # no output
    # a folder that is made if missing: its nearest existing ancestor must be writable
    examples.check_output(parser, str(tmp_path / "new" / "folder"), "--out", folder=True)
    examples.check_output(parser, str(tmp_path), "--out", folder=True)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as info:  # a file where the folder should be
        examples.check_output(parser, str(tmp_path / "a_file"), "--out", folder=True)
    assert info.value.code == 2


def test_check_at_least_items_and_none():
    benchmarks = load(REPO_ROOT / "benchmarks" / "common.py")
    parser = argparse.ArgumentParser()
    args = argparse.Namespace(steps=[10, 30], seeds=None, draws=0)
    benchmarks.check_at_least(parser, args, 1, "steps", "seeds")
    benchmarks.check_at_least(parser, args, 0, "draws")
    for bad in ([10, 0], -1):
        args.steps = bad
        with pytest.raises(SystemExit) as info:
            benchmarks.check_at_least(parser, args, 1, "steps")
        assert info.value.code == 2
