"""Helpers shared by the benchmark scripts: checks of command-line options, seeding,
posterior draws from a guide, markdown tables and environment notes."""

import math
import os
import platform
import sys
import warnings

import numpy as np
import pyro
import torch
from pyro.infer.autoguide import AutoContinuous, AutoNormal
from torch.distributions import biject_to


def check_at_least(parser, args, minimum, *names) -> None:
    """``parser.error`` unless each option in ``names`` (attributes of ``args``; ``None``,
    not given, passes; a list is checked item by item) is at least ``minimum``: counts of
    steps, seeds, repeats and sizes are refused before any work, not after minutes of it
    or as a traceback."""
    for name in names:
        value = getattr(args, name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and v < minimum:
                parser.error(f"--{name.replace('_', '-')} must be at least {minimum}, got {v}")


def check_output(parser, path, option) -> None:
    """``parser.error`` unless the file ``path`` can be written: its folder exists and is
    writable. Checked before the benchmark runs, so that a typo in a folder does not lose
    its results; ``None`` or ``""`` (no output) passes."""
    if not path:
        return
    full = os.path.abspath(path)
    if os.path.isdir(full):
        parser.error(f"{option} {path}: is a folder; give a file name")
    folder = os.path.dirname(full)
    if not os.path.isdir(folder):
        parser.error(f"{option} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        parser.error(f"{option} {path}: folder {folder} is not writable")


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch and pyro (``pyro.set_rng_seed`` covers all three)."""
    pyro.set_rng_seed(seed)


def seeded_generator(seed: int) -> torch.Generator:
    """A generator seeded with ``seed`` on torch's default device (``cost.py --device
    cuda`` sets it), so that data drawn with it land there."""
    return torch.Generator(device=torch.empty(0).device).manual_seed(seed)


def set_threads(n: int) -> None:
    torch.set_num_threads(n)


def guide_draws(guide, num_samples: int):
    """``{site: constrained value}`` with a leading ``num_samples`` dimension, drawn from
    an ``AutoContinuous`` or ``AutoNormal`` guide in one vectorised pass.

    This is what ``Predictive(model, guide=guide, num_samples=n)`` returns for the
    latent sites (the guide draws the unconstrained latent and maps it through
    ``biject_to(site["fn"].support)``), without running guide and model ``n`` times
    each. Deterministic sites are recomputed by ``Reference.extract``.
    """
    out = {}
    with torch.no_grad():
        if isinstance(guide, AutoContinuous):
            latent = guide.get_posterior().sample((num_samples,))
            for site, u in guide._unpack_latent(latent):
                out[site["name"]] = biject_to(site["fn"].support)(u)
        elif isinstance(guide, AutoNormal):
            for name, site in guide.prototype_trace.iter_stochastic_nodes():
                loc = getattr(guide.locs, name).detach()
                scale = getattr(guide.scales, name).detach()
                u = loc + scale * torch.randn((num_samples,) + loc.shape, dtype=loc.dtype)
                out[name] = biject_to(site["fn"].support)(u)
        else:
            raise TypeError(f"unsupported guide {type(guide).__name__}")
    return out


def predictive_draws(model, guide, num_samples: int, sites):
    """The same draws through ``pyro.infer.Predictive`` (slow: runs the guide and the
    model ``num_samples`` times each)."""
    from pyro.infer import Predictive

    with torch.no_grad():
        return Predictive(model, guide=guide, num_samples=num_samples, return_sites=list(sites))()


def markdown_table(header, rows) -> str:
    """A GitHub markdown table from a header list and rows of strings."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(header)]
    line = "| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join([line, sep] + body)


def fmt(x, spec=".3g") -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return format(x, spec)


def library_version() -> str:
    """The git commit of the working tree, and whether ``pyro_natgrad/`` differs from it."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                                capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "pyro_natgrad"], cwd=root,
                               text=True, capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "git commit unknown"
    return f"git {commit}" + (" + uncommitted changes in pyro_natgrad/" if dirty else "")


def environment_line() -> str:
    return (f"{library_version()}; "
            f"python {platform.python_version()}, torch {torch.__version__}, pyro "
            f"{pyro.__version__}, numpy {np.__version__}; {os.cpu_count()} CPU core(s), "
            f"torch threads {torch.get_num_threads()}; {platform.machine()}")


def log(*args) -> None:
    """Progress messages go to stderr, tables to stdout."""
    print(*args, file=sys.stderr, flush=True)


class WarningLog:
    """Record warnings raised inside a ``with`` block (all of them, not once per place)."""

    def __enter__(self):
        self._cm = warnings.catch_warnings(record=True)
        self.records = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)

    def summary(self, limit=3):
        """``[(category name, first line of message, count)]`` of the distinct warnings."""
        counts = {}
        for w in self.records:
            if issubclass(w.category, DeprecationWarning) and "torch.jit" in str(w.message):
                continue  # torch's own, raised once when torch.func.jvp first loads
            key = (w.category.__name__, str(w.message).splitlines()[0][:160])
            counts[key] = counts.get(key, 0) + 1
        return [(c, m, n) for (c, m), n in list(counts.items())[:limit]]


def print_budget_table(title, caption, budgets, rows) -> None:
    """Print the markdown section of :func:`svi_gaps`' rows: heading, caption, table
    (one column per step budget, then ms per step) and the environment."""
    print(f"### {title}\n")
    print(f"{caption}\n")
    print(markdown_table(["optimizer"] + [str(b) for b in budgets] + ["ms/step"], rows))
    print(f"\nEnvironment: {environment_line()}")


def svi_gaps(model, guide_cls, contenders, best, budgets, elbo_of, seed=0, spec=".3g"):
    """Rows ``[name, gap after each budget ..., ms per step]`` of single-particle
    ``Trace_ELBO`` runs: ``contenders`` are ``(name, make_optim(guide), steps)``, the gap
    is ``best - elbo_of(guide)`` ('-' past a contender's steps or a non-finite ELBO),
    formatted with ``spec``."""
    import time

    from pyro.infer import SVI, Trace_ELBO

    rows = []
    for name, make_optim, steps in contenders:
        log(f"{name}: {steps} steps ...")
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        guide = guide_cls(model)
        svi = SVI(model, guide, make_optim(guide), Trace_ELBO())
        elbos, elapsed, i = {}, 0.0, 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the optimizers' one-time notices
            for i in range(1, steps + 1):
                start = time.perf_counter()
                svi.step()
                elapsed += time.perf_counter() - start
                if i in budgets:
                    elbos[i] = elbo_of(guide)
                    if not math.isfinite(elbos[i]):
                        break
        rows.append([name] + [fmt(best - elbos[b], spec) if b in elbos else "-" for b in budgets]
                    + [f"{1000 * elapsed / max(1, i):.1f}"])
    return rows
