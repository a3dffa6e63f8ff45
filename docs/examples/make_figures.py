"""Run the example scripts with ``--plot`` and write their figures into ``docs/_static/``.

The pages under ``docs/examples/`` describe these figures and give the commands
that make them; this script makes all of them at once::

    python docs/examples/make_figures.py                  # every figure
    python docs/examples/make_figures.py --only seeds     # names containing "seeds"
    python docs/examples/make_figures.py --dry-run        # print the commands only
    python docs/examples/make_figures.py --show-output    # also print what each script prints

Each ``--plot`` run fits with both natural gradient and Adam, with Adam at its
default step count (thousands of steps), and the reference-suite runner fits every
bundled reference posterior, so a full run takes about ten minutes.
"""

import argparse
import os
import pathlib
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

# name -> (script, arguments); "{out}" is replaced by the output folder
FIGURES = {
    "linear_regression": ("linear_regression.py", ["--plot", "{out}/example_linear.png"]),
    "linear_regression_unknown_noise": (
        "linear_regression.py", ["--unknown-noise", "--plot", "{out}/example_linear_unknown.png"]),
    "logistic_regression": ("logistic_regression.py",
                            ["--plot", "{out}/example_logistic.png"]),
    "probit_regression": ("logistic_regression.py",
                          ["--link", "probit", "--plot", "{out}/example_probit.png"]),
    "poisson_glm": ("poisson_regression.py", ["--plot", "{out}/example_poisson_glm.png"]),
    "poisson_gp": ("poisson_regression.py", ["--gp", "--plot", "{out}/example_poisson_gp.png"]),
    "hierarchical": ("hierarchical.py", ["--plot", "{out}/example_hierarchical.png"]),
    "seeds_demos": ("seeds_demos.py", ["--out", "{out}"]),
    "reference_suite": ("reference_suite.py", ["--plot", "{out}/example_reference_suite.png"]),
    "amortised": ("amortised.py", ["--plot", "{out}/example_amortised.png"]),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO_ROOT / "docs" / "_static"),
                        help="output folder (default: docs/_static)")
    parser.add_argument("--only", default=None,
                        help="run only the figures whose name contains this string")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--show-output", action="store_true",
                        help="print each script's standard output after it finishes")
    args = parser.parse_args(argv)

    selected = {k: v for k, v in FIGURES.items() if args.only is None or args.only in k}
    if not selected:
        parser.error(f"no figure name contains {args.only!r}; names: {', '.join(FIGURES)}")
    if not args.dry_run:
        os.makedirs(args.out, exist_ok=True)
    env = {**os.environ, "MPLBACKEND": "Agg"}
    failed = []
    for name, (script, extra) in selected.items():
        quiet = [] if script == "seeds_demos.py" else ["--quiet"]  # seeds_demos has no bar
        cmd = [sys.executable, str(REPO_ROOT / "examples" / script), *quiet,
               *[a.format(out=args.out) for a in extra]]
        print("+", " ".join(cmd), flush=True)
        if args.dry_run:
            continue
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        took = time.perf_counter() - start
        if proc.returncode != 0:
            failed.append(name)
            print(proc.stdout, proc.stderr, sep="\n", file=sys.stderr)
        elif args.show_output:
            print(proc.stdout, flush=True)
        print(f"  {name}: exit {proc.returncode} after {took:.0f} s", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
