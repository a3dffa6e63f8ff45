"""Run the benchmark scripts and write their tables to ``benchmarks/RESULTS.md``.

::

    python benchmarks/run_all.py --quick    # smoke test: each script with --quick (default)
    python benchmarks/run_all.py --full     # the issue's settings (about 35-45 min)

Each script runs in its own process (``sys.executable``), from the repository root;
its stdout (markdown tables) goes into the results file verbatim, its stderr
(progress) passes through. The results file records the exact commands.
``ggn_targets`` (issue 4's GGN targets) adds about 4-8 min with ``--quick`` and
30-45 min with ``--full`` on a shared 2-core machine. ``--only`` rewrites the results
file with only the sections run; use ``--output`` to keep the full file.
"""

import argparse
import datetime
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

sys.path.insert(0, HERE)
from common import check_output  # noqa: E402

SCRIPTS = [
    ("reference_posteriors", "Reference posteriors (means and sds against gold standards)"),
    ("convergence", "Convergence to the optimal ELBO (closed-form problems)"),
    ("cost", "Cost of the optimizer's own update"),
    ("ggn_targets", "GGN targets: GLM convergence and the cost of a GGN step"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="each script with --quick (the default)")
    mode.add_argument("--full", action="store_true",
                      help="run each script with its default (full) settings instead of --quick")
    p.add_argument("--only", nargs="+", choices=[s for s, _ in SCRIPTS], default=None,
                   help="run only these scripts")
    p.add_argument("--output", default=os.path.join("benchmarks", "RESULTS.md"),
                   help="results file, relative to the repository root "
                        "(default benchmarks/RESULTS.md)")
    args = p.parse_args(argv)
    # checked before the scripts run (minutes to the better part of an hour), not when
    # their tables are written
    check_output(p, os.path.join(ROOT, args.output), "--output")
    return args


def main(argv=None):
    args = parse_args(argv)
    own = "python benchmarks/run_all.py" + "".join(
        f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
    sections, failures = [], []
    for name, title in SCRIPTS:
        if args.only and name not in args.only:
            continue
        cmd = [sys.executable, os.path.join("benchmarks", f"{name}.py")]
        if not args.full:
            cmd.append("--quick")
        shown = " ".join(["python"] + [shlex.quote(c) for c in cmd[1:]])
        print(f"== {shown}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        wall = time.perf_counter() - start
        out = proc.stdout.rstrip()
        if proc.returncode != 0:
            failures.append(name)
            out += f"\n\n**The script exited with status {proc.returncode}.**"
        sections.append(f"## {title}\n\nCommand: `{shown}` (exit status {proc.returncode}, "
                        f"{wall / 60:.1f} min)\n\n{out}\n")
        print(out)
        print()

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mode = ("full settings (the issue's step counts)" if args.full else
            "`--quick` settings (fewer Adam steps / repeats than the issue asks for: a smoke "
            "test; rerun with `--full` for the issue's settings)")
    header = (f"# Benchmark results\n\nProduced by `{own}` on {stamp}, {mode}. Each section "
              f"gives the exact command that printed it; run from the repository root.\n")
    path = os.path.join(ROOT, args.output)
    with open(path, "w") as f:
        f.write(header + "\n" + "\n".join(sections))
    print(f"wrote {os.path.relpath(path, ROOT)}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
