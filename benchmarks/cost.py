"""Cost of the optimizer's own update (not the ELBO).

Targets (the optimizer issue):

* ``AutoNormal`` at 10^6 latent dimensions: ``NaturalGradient``'s update takes at most
  1.5x the time of ``pyro.optim.Adam``'s update of the same parameters;
* ``AutoMultivariateNormal`` at d = 1000: at most 5x one ``torch.linalg.cholesky`` of
  a d x d matrix (same dtype).

Set-up: a trivial model (``z ~ Normal(0, 1)`` in a plate, or a ``d``-vector, with one
observed site ``x ~ Normal(z, 1)``). Two settings, calls of the contenders interleaved
in one process, medians of ``--repeats`` calls:

* *fresh gradients*: the parameters after one SVI step are snapshotted; before each
  timed call (untimed) they are restored and one ``Trace_ELBO`` backward pass makes
  the gradients, recorded by the natural gradient's hooks as in a real step; only
  ``optim(params)`` is timed;
* *inside SVI*: a natural-gradient guide and an Adam guide are fitted side by side
  by alternating ``svi.step()`` calls, and the optimizer call inside each step is
  timed (through a thin timing wrapper), after 10 untimed steps.

The natural gradient runs with ``curvature="none"``, its steps from the gradients
alone: the targets exclude per-parameter Hessian-vector products. (``"auto"`` takes that
path for the ``AutoNormal`` here, D > 256, but computes the model's Hessian for an
``AutoMultivariateNormal`` up to 1024 dimensions.) Only ratios are results; absolute
times are for orientation (the machine is shared).

Context rows (not targets): the natural gradient's update of ``AutoMultivariateNormal``
against Adam's, the cost of the optimizer's draw-recording hooks on a guide call,
and a whole ``svi.step`` with each optimizer.

Run ``python benchmarks/cost.py --help`` for the options.
"""

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    WarningLog,
    check_at_least,
    environment_line,
    log,
    markdown_table,
    seed_everything,
    seeded_generator,
    set_threads,
)

from pyro_natgrad import NaturalGradient  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64}
_synchronize = None  # torch.cuda.synchronize with --device cuda: kernels run asynchronously


def clock():
    """``time.perf_counter()`` once the device has finished the work queued so far."""
    if _synchronize is not None:
        _synchronize()
    return time.perf_counter()
SVI_SKIP = 10  # SVI steps run before the timed ones
NG_OPTIONS = {"curvature": "none"}  # the update from gradients alone (see the docstring)


def event_model(n, dtype):
    """The same as :func:`plate_model` with the latent as one event of size ``n``."""
    data = torch.randn(n, dtype=dtype)

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(n, dtype=dtype), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=data)

    return model


def plate_model(n, dtype):
    data = torch.randn(n, dtype=dtype)

    def model():
        with pyro.plate("N", n):
            z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=dtype), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=data)

    return model


def vector_model(d, dtype):
    """``z ~ N(0, I_d)``, ``x ~ N(z, I_d)`` observed: the posterior is ``N(x / 2, I / 2)``
    (``model.posterior_guide_kwargs`` starts an autoguide exactly there)."""
    data = torch.randn(d, dtype=dtype)

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(d, dtype=dtype), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=data)

    model.posterior_guide_kwargs = {"init_loc_fn": lambda site: data / 2,
                                    "init_scale": 0.5 ** 0.5}
    return model


class Setup:
    """A guide whose parameters exist (one SVI step) and are snapshotted. ``prepare()``
    (untimed) restores them and computes fresh gradients with one ``Trace_ELBO``
    backward pass; the guide call inside it is recorded by the natural gradient's
    hooks, so each natural-gradient call sees the draw behind its gradients, as in a
    real step."""

    def __init__(self, model, guide_cls, seed, guide_kwargs=None, **ng_kwargs):
        pyro.clear_param_store()
        seed_everything(seed)
        self.model = model
        self.guide = guide_cls(model, **(guide_kwargs or {}))
        self.ng = NaturalGradient(self.guide, **{**NG_OPTIONS, **ng_kwargs})
        self.adam = pyro.optim.Adam({"lr": 0.01})
        self.elbo = Trace_ELBO()
        with WarningLog():
            SVI(model, self.guide, self.ng, Trace_ELBO()).step()  # creates params, groups
        self.params = [p for _, p in pyro.get_param_store().named_parameters()]
        self.values = [p.detach().clone() for p in self.params]

    def prepare(self):
        with torch.no_grad():
            for p, v in zip(self.params, self.values):
                p.data.copy_(v)
                p.grad = None
        # Drop the draws recorded by other contenders' prepare() calls (each SVI step
        # records one guide call: the one behind its gradients).
        for recorder in self.ng._recorders:
            recorder.take()
        self.elbo.differentiable_loss(self.model, self.guide).backward()

    def ng_call(self):
        self.ng(self.params)

    def adam_call(self):
        self.adam(self.params)


def interleaved(contenders, repeats, warmup=3):
    """``{name: [seconds]}``: each contender is ``(prepare, call)``; the calls alternate."""
    times = {name: [] for name in contenders}
    for i in range(warmup + repeats):
        for name, (prepare, call) in contenders.items():
            prepare()
            start = clock()
            call()
            elapsed = clock() - start
            if i >= warmup:
                times[name].append(elapsed)
    return times


def med(ts):
    return statistics.median(ts)


def spread(ts):
    q = statistics.quantiles(ts, n=4)
    return q[0], q[2]


def profile_call(prepare, call, repeats=5, top=12):
    """cProfile (python functions, cumulative) and torch.profiler (ops, self CPU) of a call."""
    prof = cProfile.Profile()
    for _ in range(repeats):
        prepare()
        prof.enable()
        call()
        prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("cumulative").print_stats(top + 8)
    py_lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(py_lines) if ln.lstrip().startswith("ncalls")), 0)
    py_table = "\n".join(py_lines[start:start + top + 8])

    from torch.profiler import ProfilerActivity, profile

    totals, counts = {}, {}
    for _ in range(repeats):
        prepare()  # outside the profiled region
        with profile(activities=[ProfilerActivity.CPU]) as tp:
            call()
        for ev in tp.key_averages():
            totals[ev.key] = totals.get(ev.key, 0.0) + ev.self_cpu_time_total
            counts[ev.key] = counts.get(ev.key, 0) + ev.count
    grand = sum(totals.values()) or 1.0
    ops = sorted(totals, key=totals.get, reverse=True)[:top]
    op_table = markdown_table(
        ["torch op", "self CPU per update (ms)", "share", "calls per update"],
        [[k, f"{totals[k] / repeats / 1e3:.2f}", f"{100 * totals[k] / grand:.1f} %",
          f"{counts[k] / repeats:g}"] for k in ops])
    return py_table, op_table


class LinalgLog:
    """While installed, logs the names of the dense factorisations called through
    ``torch.linalg`` (benchmark instrumentation: the originals run unchanged).
    ``path(call)`` runs ``call`` and returns the factorisations it used, in order, e.g.
    ``"cholesky_ex > eigh > cholesky"``: which branch of the step was taken."""

    NAMES = ("cholesky", "cholesky_ex", "eigh", "eig", "qr", "svd")
    calls = []
    _originals = {}

    def __enter__(self):
        for name in self.NAMES:
            original = getattr(torch.linalg, name)
            LinalgLog._originals[name] = original

            def wrapped(*args, _name=name, _original=original, **kwargs):
                LinalgLog.calls.append(_name)
                return _original(*args, **kwargs)

            setattr(torch.linalg, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, original in LinalgLog._originals.items():
            setattr(torch.linalg, name, original)
        LinalgLog._originals = {}

    @staticmethod
    def mark():
        return len(LinalgLog.calls)

    @staticmethod
    def since(mark):
        return " > ".join(LinalgLog.calls[mark:]) or "none"


class TimedOptim(pyro.optim.PyroOptim):
    """Wraps an optimizer so that ``SVI`` calls it as usual while the call is timed;
    ``paths`` keeps :meth:`LinalgLog.since` of each call."""

    def __init__(self, inner):  # no PyroOptim.__init__: nothing of its own to set up
        self.inner = inner
        self.times, self.paths = [], []

    def __call__(self, params, *args, **kwargs):
        mark = LinalgLog.mark()
        start = clock()
        self.inner(params, *args, **kwargs)
        self.times.append(clock() - start)
        self.paths.append(LinalgLog.since(mark))

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def by_path(times, paths):
    """``{path: [times]}`` in order of first appearance."""
    out = {}
    for t, p in zip(times, paths):
        out.setdefault(p, []).append(t)
    return out


def in_svi(model, guide_cls, seed, steps, baseline=None, skip=SVI_SKIP):
    """Time the optimizer call inside real SVI steps: the natural gradient and Adam
    each fit their own guide (different parameter names), steps alternate, and
    ``baseline`` (e.g. one Cholesky) is timed between them. The first ``skip`` steps
    (parameter creation, the natural gradient's full-size early steps) are not counted."""
    pyro.clear_param_store()
    seed_everything(seed)
    # A subclass gets its own parameter names ("AdamGuide.locs.z", ...), so the two
    # guides do not share the global param store.
    adam_guide = type("AdamGuide", (guide_cls,), {})(model)
    ng_guide = guide_cls(model)
    ng = TimedOptim(NaturalGradient(ng_guide, **NG_OPTIONS))
    adam = TimedOptim(pyro.optim.Adam({"lr": 0.01}))
    svis = [SVI(model, ng_guide, ng, Trace_ELBO()), SVI(model, adam_guide, adam, Trace_ELBO())]
    base_times = []
    with WarningLog(), LinalgLog():
        for i in range(skip + steps):
            for svi in svis:
                svi.step()
            if baseline is not None:
                start = clock()
                baseline()
                base_times.append(clock() - start)
    ng.inner.detach()
    return {"ng": ng.times[skip:], "ng_paths": ng.paths[skip:], "adam": adam.times[skip:],
            "base": base_times[skip:]}


def context_rows(setup, repeats):
    """Cost of the optimizer's draw-recording hooks on a guide call (informational)."""
    rows = []
    guide = setup.guide

    def guide_call():
        guide()  # with grad enabled, as in a step (the hooks skip no_grad calls)

    def drop_records():
        # As the optimizer's step does once per step: records left to pile up would keep
        # every call's draws alive, and the allocator would hand out fresh pages each time.
        for recorder in setup.ng._recorders:
            recorder.take()

    with_hooks = interleaved({"g": (drop_records, guide_call)}, repeats)["g"]
    setup.ng.detach()
    without = interleaved({"g": (lambda: None, guide_call)}, repeats)["g"]
    rows.append(("guide forward, with vs without the optimizer's recording hooks",
                 med(with_hooks), med(without)))
    return rows


def svi_step_rows(model, guide_cls, seed, repeats):
    """Whole ``svi.step()`` time, natural gradient vs Adam (separate param stores)."""
    out = {}
    for name in ("natgrad", "adam"):
        pyro.clear_param_store()
        seed_everything(seed)
        guide = guide_cls(model)
        optim = (NaturalGradient(guide, **NG_OPTIONS) if name == "natgrad"
                 else pyro.optim.Adam({"lr": 0.01}))
        svi = SVI(model, guide, optim, Trace_ELBO())
        with WarningLog():
            out[name] = interleaved({"s": (lambda: None, svi.step)}, repeats)["s"]
        if name == "natgrad":
            optim.detach()
    return ("whole svi.step(), natural gradient vs Adam", med(out["natgrad"]), med(out["adam"]))


def autonormal_case(args, dname, dtype, case, svi_setting, rows, context, profiles, verdicts,
                    want_profile):
    """AutoNormal, n latent dimensions: natural gradient vs Adam."""
    model = plate_model(args.n, dtype)
    log(f"[AutoNormal n={args.n} {dname}] inside SVI steps ...")
    r = in_svi(model, AutoNormal, args.seed, args.repeats)
    log(f"[AutoNormal n={args.n} {dname}] fresh gradients ...")
    s = Setup(model, AutoNormal, args.seed)
    t = interleaved({"ng": (s.prepare, s.ng_call),
                     "adam": (s.prepare, s.adam_call)}, args.repeats)
    ok_all = True
    for setting, ng_t, adam_t in (("fresh gradients", t["ng"], t["adam"]),
                                  (svi_setting, r["ng"], r["adam"])):
        ratio = med(ng_t) / med(adam_t)
        verdicts.append(ratio <= 1.5)
        ok_all &= ratio <= 1.5
        rows.append([case, dname, setting, "NaturalGradient update",
                     "pyro.optim.Adam update", f"{med(ng_t) * 1e3:.1f}",
                     f"{med(adam_t) * 1e3:.1f}", f"{ratio:.2f}", "<= 1.5",
                     verdict(ratio, 1.5)])
    if want_profile(ok_all):
        log(f"[AutoNormal n={args.n} {dname}] profiling ...")
        profiles.append((f"AutoNormal n={args.n} {dname}",
                         profile_call(s.prepare, s.ng_call)))
    if dname == args.dtypes[0]:
        for label, a, b in context_rows(s, args.repeats):
            context.append([case, dname, label, f"{a * 1e3:.1f}", f"{b * 1e3:.1f}",
                            f"{a / b:.2f}"])
        if not args.quick:
            label, a, b = svi_step_rows(model, AutoNormal, args.seed,
                                        max(5, args.repeats // 3))
            context.append([case, dname, label, f"{a * 1e3:.1f}", f"{b * 1e3:.1f}",
                            f"{a / b:.2f}"])
    s.ng.detach()
    del s, r, t
    if not args.quick:
        log(f"[AutoNormal n={args.n} {dname}] latent as one event (no plate) ...")
        e = Setup(event_model(args.n, dtype), AutoNormal, args.seed)
        te = interleaved({"ng": (e.prepare, e.ng_call),
                          "adam": (e.prepare, e.adam_call)}, args.repeats)
        context.append([case, dname, "fresh gradients, latent as one event "
                        "(`.to_event(1)`, no plate): NaturalGradient vs Adam update",
                        f"{med(te['ng']) * 1e3:.1f}", f"{med(te['adam']) * 1e3:.1f}",
                        f"{med(te['ng']) / med(te['adam']):.2f}"])
        e.ng.detach()
        del e, te
    del model


def mvn_case(args, dname, dtype, case, svi_setting, rows, context, profiles, verdicts,
             want_profile):
    """AutoMultivariateNormal, d: natural gradient vs one Cholesky."""
    model = vector_model(args.d, dtype)
    g = seeded_generator(args.seed)
    M = torch.randn(args.d, args.d, generator=g, dtype=dtype)
    spd = M @ M.T / args.d + torch.eye(args.d, dtype=dtype)
    log(f"[AutoMultivariateNormal d={args.d} {dname}] inside SVI steps ...")
    r = in_svi(model, AutoMultivariateNormal, args.seed, args.repeats,
               baseline=lambda: torch.linalg.cholesky(spd))
    log(f"[AutoMultivariateNormal d={args.d} {dname}] fresh gradients ...")
    s = Setup(model, AutoMultivariateNormal, args.seed)
    fresh_paths = []

    def ng_logged(s=s, log_to=fresh_paths):
        mark = LinalgLog.mark()
        s.ng_call()
        log_to.append(LinalgLog.since(mark))

    with LinalgLog():
        t = interleaved({"ng": (s.prepare, ng_logged),
                         "chol": (lambda: None, lambda: torch.linalg.cholesky(spd)),
                         "adam": (s.prepare, s.adam_call)}, args.repeats)
    fresh_paths = fresh_paths[3:]  # the timed calls only
    log(f"[AutoMultivariateNormal d={args.d} {dname}] fresh gradients at the optimum ...")
    s.ng.detach()
    o = Setup(model, AutoMultivariateNormal, args.seed,
              guide_kwargs=model.posterior_guide_kwargs)
    opt_paths = []

    def opt_logged(o=o, log_to=opt_paths):
        mark = LinalgLog.mark()
        o.ng_call()
        log_to.append(LinalgLog.since(mark))

    with LinalgLog():
        to = interleaved({"ng": (o.prepare, opt_logged),
                          "chol": (lambda: None, lambda: torch.linalg.cholesky(spd))},
                         args.repeats)
    opt_paths = opt_paths[3:]
    ok_all = True
    for setting, ng_t, chol_t in (("fresh gradients, guide at its start", t["ng"],
                                   t["chol"]),
                                  ("fresh gradients, guide at the optimum", to["ng"],
                                   to["chol"]),
                                  (svi_setting, r["ng"], r["base"])):
        ratio = med(ng_t) / med(chol_t)
        verdicts.append(ratio <= 5)
        ok_all &= ratio <= 5
        rows.append([case, dname, setting, "NaturalGradient update",
                     "torch.linalg.cholesky (d x d)", f"{med(ng_t) * 1e3:.1f}",
                     f"{med(chol_t) * 1e3:.1f}", f"{ratio:.2f}", "<= 5",
                     verdict(ratio, 5)])
    for setting, times, paths, base in (
            ("fresh gradients, guide at its start", t["ng"], fresh_paths, t["chol"]),
            ("fresh gradients, guide at the optimum", to["ng"], opt_paths, to["chol"]),
            ("inside SVI", r["ng"], r["ng_paths"], r["base"])):
        for path, ts in by_path(times, paths).items():
            context.append([case, dname, f"{setting}: NaturalGradient calls using "
                            f"`{path}` ({len(ts)} of {len(times)}) vs one Cholesky",
                            f"{med(ts) * 1e3:.1f}", f"{med(base) * 1e3:.1f}",
                            f"{med(ts) / med(base):.2f}"])
    for setting, ng_t, adam_t in (("fresh gradients, guide at its start", t["ng"],
                                   t["adam"]),
                                  ("inside SVI", r["ng"], r["adam"])):
        context.append([case, dname, f"{setting}: NaturalGradient update vs "
                        f"pyro.optim.Adam update", f"{med(ng_t) * 1e3:.1f}",
                        f"{med(adam_t) * 1e3:.1f}", f"{med(ng_t) / med(adam_t):.2f}"])
    if want_profile(ok_all):
        log(f"[AutoMultivariateNormal d={args.d} {dname}] profiling ...")
        profiles.append((f"AutoMultivariateNormal d={args.d} {dname}, guide at the "
                         f"optimum (path `{opt_paths[0]}`)",
                         profile_call(o.prepare, o.ng_call)))
        o.ng.detach()
        s = Setup(model, AutoMultivariateNormal, args.seed)
        profiles.append((f"AutoMultivariateNormal d={args.d} {dname}, guide at its start "
                         f"(path `{fresh_paths[0]}`)",
                         profile_call(s.prepare, s.ng_call)))
    o.ng.detach()
    del o
    if dname == args.dtypes[0] and not args.quick:
        label, a, b = svi_step_rows(model, AutoMultivariateNormal, args.seed,
                                    max(5, args.repeats // 3))
        context.append([case, dname, label, f"{a * 1e3:.1f}", f"{b * 1e3:.1f}",
                        f"{a / b:.2f}"])
    s.ng.detach()
    del s, r, t, model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10 ** 6, help="AutoNormal latent size (10^6)")
    p.add_argument("--d", type=int, default=1000, help="AutoMultivariateNormal size (1000)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per contender (default 30; 20 with --quick)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=list(DTYPES))
    p.add_argument("--quick", action="store_true", help="20 repeats, no whole-step rows")
    p.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                   help="profile the natural-gradient update: when a target fails (auto)")
    p.add_argument("--cases", nargs="+", default=["normal", "mvn"], choices=["normal", "mvn"],
                   help="which targets to measure: AutoNormal, AutoMultivariateNormal (both)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--device", default="cpu",
                   help="torch device for the guides and the baselines, e.g. cuda (cpu)")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 20 if args.quick else 30
    check_at_least(p, args, 1, "n", "d", "repeats", "threads")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device {args.device}: {e}")
    # refused here, not at the first tensor made on it (after the setup of the first case)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            p.error(f"--device {args.device}: this torch build ({torch.__version__}) has no "
                    f"usable CUDA device (torch.cuda.is_available() is False); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            p.error(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
    try:  # any other kind (mps, xpu, ...) this build or machine lacks
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        reason = str(e).split(". ")[0]  # torch appends a page of dispatch keys
        p.error(f"--device {args.device}: this torch build or machine cannot make tensors "
                f"there ({reason})")
    return args


def verdict(ratio, limit):
    return "PASS" if ratio <= limit else f"FAIL ({ratio / limit:.2f}x the limit)"


def main(argv=None):
    global _synchronize
    args = parse_args(argv)
    set_threads(args.threads)
    if args.device != "cpu":
        # Not for the CPU: the default-device mode adds Python work to every torch call
        # (hundreds per natural-gradient update, a dozen per Adam update), and CPU users
        # do not set one.
        torch.set_default_device(args.device)
    if torch.device(args.device).type == "cuda":
        _synchronize = torch.cuda.synchronize
        if args.profile != "never":
            log("profiles are of CPU time; not taken with --device cuda")
            args.profile = "never"
    total_start = clock()
    rows, context, profiles, verdicts = [], [], [], []
    want_profile = {"always": lambda ok: True, "never": lambda ok: False,
                    "auto": lambda ok: not ok}[args.profile]
    an_case, mv_case = f"AutoNormal, n = {args.n:,}", f"AutoMultivariateNormal, d = {args.d}"
    svi_setting = f"inside SVI, steps {SVI_SKIP + 1}-{SVI_SKIP + args.repeats}"

    for dname in args.dtypes:
        dtype = DTYPES[dname]
        if "normal" in args.cases:
            autonormal_case(args, dname, dtype, an_case, svi_setting, rows, context, profiles,
                            verdicts, want_profile)
        if "mvn" in args.cases:
            mvn_case(args, dname, dtype, mv_case, svi_setting, rows, context, profiles,
                     verdicts, want_profile)

    print("### Cost of the optimizer's own update\n")
    where = (f"device {torch.cuda.get_device_name()}, each time taken after "
             f"`torch.cuda.synchronize()`" if _synchronize is not None
             else f"torch threads {torch.get_num_threads()}")
    print(f"Only the optimizer call `optim(params)` is timed, never the ELBO; {where}; "
          f"medians of {args.repeats} calls per contender. "
          f"*Fresh gradients*: before each call (untimed) the parameters are restored to the "
          f"same values (the guide after its first SVI step) and one `Trace_ELBO` backward "
          f"pass makes the gradients, so the natural gradient sees the draw behind them; "
          f"calls interleaved after 3 warm-up calls. *Inside SVI*: two guides fitted side by "
          f"side by alternating `svi.step()`s, the optimizer call timed inside each step "
          f"after {SVI_SKIP} untimed steps (the Cholesky baseline timed between steps). "
          f"Absolute times are for orientation only (shared machine); "
          f"the ratios are the result.\n")
    print(markdown_table(["case", "dtype", "setting", "measured", "against", "measured (ms)",
                          "against (ms)", "ratio", "target", "pass"], rows))
    print()
    print(f"**Targets: {sum(verdicts)}/{len(verdicts)} rows pass.**\n")
    if context:
        print("Context (not targets):\n")
        print(markdown_table(["case", "dtype", "comparison", "first (ms)", "second (ms)",
                              "ratio"], context))
        print()
    for title, (py_table, op_table) in profiles:
        print(f"Profile of the natural-gradient update (fresh gradients), {title}, 5 calls:\n")
        print("Python functions by cumulative time (cProfile):\n")
        print("```\n" + py_table + "\n```\n")
        print("Torch ops by self CPU time (torch.profiler, 5 more calls):\n")
        print(op_table + "\n")
    print(f"Environment: {environment_line()}; total wall time "
          f"{clock() - total_start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
