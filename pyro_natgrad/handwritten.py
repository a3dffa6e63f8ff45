"""Reading hand-written guides: which ``pyro.param`` feeds which argument of which
variational distribution.

A hand-written guide is any callable that is not an autoguide, e.g.::

    def guide(X, y):
        loc = pyro.param("w_loc", torch.zeros(d))
        scale = pyro.param("w_scale", torch.ones(d), constraint=constraints.positive)
        pyro.sample("w", dist.Normal(loc, scale).to_event(1))

:func:`read_handwritten` runs the guide once under ``poutine.trace`` (inside
``poutine.block``, with the random state restored afterwards, so nothing leaks and
the run of draws is not disturbed) and follows each sample site's distribution
arguments back through the autograd graph. An argument is *fed by* a parameter
when it is that parameter's value itself, up to broadcasting (``expand``) and,
for categorical families, the normalisation that the distribution applies. The
match is by tensor identity (graph nodes), never by value.

A site takes natural-gradient steps when its family has a closed-form Fisher,
every argument that depends on parameters is fed directly by one, and none of
those parameters is used anywhere else in the guide (another site, a transform,
a second ``pyro.param`` call). Everything else is *rejected*, with the reason,
and goes to the base optimizer. Parameters that the model also uses cannot be
seen from the guide: do not share parameters between model and guide.

Groups (the optimizer's unit of work):

* ``DiagonalGaussianGroup`` (``pyro_natgrad.guides``) for ``Normal(loc, scale)``
  (and ``LogNormal``) with an unconstrained ``loc`` and a ``positive`` or
  ``softplus_positive`` ``scale`` of the same shape: the Gaussian mirror step of
  :mod:`pyro_natgrad.gaussian`.
* ``TrilGaussianSite`` for ``MultivariateNormal(loc, scale_tril=L)`` with
  ``L`` constrained ``lower_cholesky`` (or ``softplus_lower_cholesky``): the full
  Gaussian mirror step.
* ``LowRankSite`` for ``LowRankMultivariateNormal`` with an unconstrained ``loc``:
  the mean step of :mod:`pyro_natgrad.lowrank`; its ``cov_factor`` and ``cov_diag``
  go to the base optimizer (their Fisher step from gradients alone is unstable).
* ``ExpFamSite`` for everything else the Fisher library covers: mirror
  descent in natural parameters for exponential families whose arguments are all
  parameters, otherwise a Fisher-preconditioned step in the parameters' own
  unconstrained coordinates (:mod:`pyro_natgrad.expfam_step`).
"""

import inspect
from typing import Dict, List, Optional, Tuple

import torch
import pyro
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.distributions import constraints
from torch.distributions import constraints as torch_constraints
from pyro.distributions.torch_distribution import ExpandedDistribution
from torch.distributions import Distribution, Independent, StudentT, biject_to, transform_to

from .expfam_step import expfam_site_step, tril_gaussian_step
from .fisher import fisher_operator
from .fisher.expfam import exponential_family_coords
from .fisher.registry import lookup_fisher
from .guides import DiagonalGaussianGroup
from .lowrank import COVARIANCE_REASON, LowRankGaussianGroup

#: Graph nodes that only broadcast or alias a tensor (values unchanged).
_TRANSPARENT = ("ExpandBackward0", "AliasBackward0")
#: Constructor arguments that are fixed counts, never coordinates.
_EXTRA_ARGS = ("total_count",)
_CATEGORICAL_LIKE = ("Categorical", "OneHotCategorical", "Multinomial")


class _Site:
    """A group of parameters feeding one sample site of a hand-written guide."""

    kind = ""

    def __init__(self, key, params, transforms, constraints_):
        self.key = self.site = key
        self.params = params  # role -> unconstrained leaf of the param store
        self.transforms = transforms  # role -> Transform (unconstrained -> constrained)
        self.constraints = constraints_

    def tensors(self):
        return list(self.params.values())

    def grads(self):
        return {k: p.grad for k, p in self.params.items()}


class TrilGaussianSite(_Site):
    """``MultivariateNormal(loc, scale_tril=L)`` with ``loc`` and ``L`` parameters."""

    kind = "full-rank Gaussian"

    def natural_step(self, grads, rho, max_kl):
        return tril_gaussian_step(self, grads, rho, max_kl)


class LowRankSite(LowRankGaussianGroup):
    """``LowRankMultivariateNormal(loc, cov_factor=W, cov_diag=D)`` with ``loc`` a
    parameter: the mean step of :mod:`pyro_natgrad.lowrank`, through
    ``Sigma = W W^T + diag(D) = diag(s) (C C^T + I) diag(s)``, ``s = sqrt(D)``,
    ``C = W / s``. ``W`` (``(d, k)``) and ``D`` (``(d,)``, the unconstrained leaf if a
    parameter, with ``diag_transform`` to ``D``) go to the base optimizer if they are
    parameters: the covariance's natural step needs the model's Hessian, which the
    optimizer has only for autoguides."""

    def __init__(self, site, loc, cov_factor, cov_diag, diag_transform, covariance_params):
        super().__init__(site, site, loc, cov_factor, cov_diag, diag_transform)
        self.covariance_params = covariance_params
        # a W or D that is no parameter is held as read, and may come from the arguments
        self.reads_arguments = len(covariance_params) < 2

    def own_covariance(self):
        pass  # the projection step that would own it needs the model, unknown here

    def site_tensors(self):
        """Every parameter of the site, owned or not."""
        return [self.params["loc"]] + self.covariance_params

    def factors(self):
        s = self.transforms["scale"](self.scale_raw.detach()).sqrt()
        return self.cov_factor.detach() / s.unsqueeze(-1), s


class ExpFamSite(_Site):
    """A site of any family with a closed-form Fisher.

    :param make: ``{role: constrained value} -> distribution`` (the base family,
        with the site's fixed arguments filled in).
    :param int count: how many independent copies of that distribution the site
        draws (``> 1`` when the parameters are broadcast by ``expand``).
    :param bool mirror: mirror descent in natural parameters (exponential family,
        every argument a parameter), else a Fisher-preconditioned step in the
        unconstrained coordinates.
    """

    def __init__(self, key, params, transforms, constraints_, make, family, count, mirror,
                 reads_arguments=False):
        super().__init__(key, params, transforms, constraints_)
        self.make, self.family, self.count, self.mirror = make, family, count, mirror
        #: ``make`` holds values that are not parameters (fixed arguments, counts, the
        #: number of copies), which the guide's arguments may change
        self.reads_arguments = reads_arguments
        how = "mirror descent" if mirror else "Fisher step"
        self.kind = f"{family}, {how}"

    def natural_step(self, grads, rho, max_kl):
        return expfam_site_step(self, grads, rho, max_kl)


# ---------------------------------------------------------------------------------
# finding the guide's arguments
# ---------------------------------------------------------------------------------
def _svi_step_locals(optim) -> Optional[dict]:
    """The local variables of the ``SVI.step`` call that is running ``optim`` now (as
    SVI's optimizer or as its optimizer's ``base_optimizer``), found by walking up the
    call stack; None if there is none."""
    from pyro.infer import SVI

    frame = inspect.currentframe()
    try:
        while frame is not None:
            loc = frame.f_locals
            owner = loc.get("self")
            runs = getattr(owner, "optim", None)
            if isinstance(owner, SVI) and frame.f_code.co_name == "step" and \
                    (runs is optim or getattr(runs, "base_optimizer", None) is optim):
                return loc
            frame = frame.f_back
        return None
    finally:
        del frame


def find_svi_call(optim) -> Optional[Tuple[object, tuple, dict]]:
    """``(svi, args, kwargs)`` of the ``SVI.step`` call that is running ``optim`` now;
    None if there is none."""
    loc = _svi_step_locals(optim)
    if loc is None:
        return None
    return loc["self"], tuple(loc.get("args", ())), dict(loc.get("kwargs", {}))


def find_svi_args(optim) -> Optional[Tuple[tuple, dict]]:
    """The ``(args, kwargs)`` of the ``SVI.step`` call that is running ``optim`` now;
    None if there is none."""
    call = find_svi_call(optim)
    return None if call is None else call[1:]


def find_svi(optim):
    """The ``SVI`` whose ``step`` is running ``optim`` now; None if there is none."""
    call = find_svi_call(optim)
    return None if call is None else call[0]


# ---------------------------------------------------------------------------------
# reading the guide
# ---------------------------------------------------------------------------------
def _strip(node, categorical):
    """Skip broadcasting views (and a categorical's normalisation) towards the input."""
    while node is not None:
        name = type(node).__name__
        if name in _TRANSPARENT:
            node = node.next_functions[0][0]
            continue
        if name == "SelectBackward0" and _select_of_stack(node) is not None:
            node = _select_of_stack(node)  # Beta keeps its arguments stacked in a Dirichlet
            continue
        if name == "SelectBackward0" and _select_of_broadcast(node) is not None:
            node = _select_of_broadcast(node)  # LowRankMultivariateNormal's loc, cov_diag
            continue
        if categorical and name in ("DivBackward0", "SubBackward0"):
            (a, _), (b, _) = node.next_functions[:2]
            inner = {"DivBackward0": "SumBackward1", "SubBackward0": "LogsumexpBackward0"}[name]
            if b is not None and type(b).__name__ == inner:
                c = b.next_functions[0][0]
                while c is not None and type(c).__name__ in _TRANSPARENT:
                    c = c.next_functions[0][0]
                if _same(c, a):
                    node, categorical = a, False  # the distribution normalises once
                    continue
        return getattr(node, "variable", node)  # a leaf: the tensor itself
    return None


def _same(a, b) -> bool:
    if a is b:
        return True
    va, vb = getattr(a, "variable", None), getattr(b, "variable", None)
    return va is not None and va is vb


def _select_of_stack(node):
    """For ``torch.stack(xs, dim)[..., i]`` (select along the stacked dim), possibly
    broadcast (``expand``: a Beta in a plate or under ``.expand()``) in between: the node
    of ``xs[i]``, else None."""
    try:
        ndim = len(node._saved_self_sym_sizes)
        inner, stacked_ndim = node.next_functions[0][0], ndim
        while inner is not None and type(inner).__name__ in _TRANSPARENT:
            if type(inner).__name__ == "ExpandBackward0":  # adds leading dims only
                stacked_ndim = len(inner._saved_self_sym_sizes)
            inner = inner.next_functions[0][0]
        if inner is None or type(inner).__name__ != "StackBackward0":
            return None
        sel, stacked = int(node._saved_dim), int(inner._saved_dim)
        if stacked >= 2 ** 63:
            stacked -= 2 ** 64
        index = int(node._saved_index)
    except (AttributeError, TypeError, ValueError):
        return None
    # Both dims counted from the end, where broadcasting leaves them in place.
    if sel % ndim - ndim != stacked % stacked_ndim - stacked_ndim \
            or not 0 <= index < len(inner.next_functions):
        return None
    return inner.next_functions[index][0]


def _select_of_broadcast(node):
    """For ``x.unsqueeze(dim)``, possibly broadcast (``expand``), then ``.select(dim, i)``:
    the node of ``x`` (up to broadcasting), else None. This is how
    :class:`~torch.distributions.LowRankMultivariateNormal` stores ``loc`` and
    ``cov_diag`` after broadcasting them against ``cov_factor``."""
    try:
        ndim = len(node._saved_self_sym_sizes)
        sel = int(node._saved_dim) % ndim - ndim  # counted from the end: expand only
        inner, unsqueezed_ndim = node.next_functions[0][0], ndim  # adds leading dims
        while inner is not None and type(inner).__name__ in _TRANSPARENT:
            if type(inner).__name__ == "ExpandBackward0":
                unsqueezed_ndim = len(inner._saved_self_sym_sizes)
            inner = inner.next_functions[0][0]
        if inner is None or type(inner).__name__ != "UnsqueezeBackward0":
            return None
        added = int(inner._saved_dim)
    except (AttributeError, IndexError, TypeError, ValueError, ZeroDivisionError):
        return None
    if added >= 2 ** 63:
        added -= 2 ** 64
    if added >= 0:
        added -= unsqueezed_ndim
    return inner.next_functions[0][0] if added == sel else None


class _ParamCalls(Messenger):
    """Records the value of every ``pyro.param`` call, as ``(name, value)``."""

    def __init__(self):
        super().__init__()
        self.values = []

    def _postprocess_message(self, msg):
        if msg["type"] == "param" and torch.is_tensor(msg["value"]):
            self.values.append((msg["name"], msg["value"]))


class _Drawn(torch.Tensor):
    """A value drawn in the guide's read run, and (torch carries a subclass through
    every operation, indexing by it included) all that is computed from it."""


class _MarkDraws(Messenger):
    """Makes every latent draw of the read run a :class:`_Drawn`, so that a site whose
    arguments are computed from another site's draw (``Normal(loc, 0.01 + s)`` with a
    Bernoulli ``s``, ``scales[k]`` with a Categorical ``k``, data indexed by a subsample)
    can be told apart from one with constant arguments: without a gradient such an
    argument read as fixed, and the step kept the read run's value of it."""

    def _postprocess_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"] and torch.is_tensor(msg["value"]):
            msg["value"] = msg["value"].as_subclass(_Drawn)


def _node_of(t: torch.Tensor):
    """The graph node standing for ``t``: its ``grad_fn``, or for a leaf the leaf itself."""
    return t.grad_fn if t.grad_fn is not None else t


def _leaves(tensors) -> set:
    """ids of the leaf tensors (requiring grad) that ``tensors`` depend on."""
    # ``seen`` maps id -> node, keeping each node's Python wrapper alive: a wrapper that
    # is freed may hand its id to a different node, which would then be skipped.
    out, seen = set(), {}
    stack = []
    for t in tensors:
        if not torch.is_tensor(t) or not t.requires_grad:
            continue
        if t.grad_fn is None:
            out.add(id(t))
        else:
            stack.append(t.grad_fn)
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        var = getattr(node, "variable", None)
        if var is not None:
            out.add(id(var))
        stack.extend(n for n, _ in node.next_functions)
    return out


def _unwrap(fn) -> Tuple[Distribution, Optional[str]]:
    """The base family under ``Independent``/``ExpandedDistribution`` wrappers."""
    while True:
        if isinstance(fn, Independent):
            fn = fn.base_dist
        elif isinstance(fn, ExpandedDistribution):
            fn = fn.base_dist
        else:
            return fn, None


def _positive_scale(c) -> bool:
    return isinstance(c, torch_constraints._GreaterThan) and float(c.lower_bound) == 0.0


def read_handwritten(guide, args=(), kwargs=None):
    """The natural-gradient groups of a hand-written guide.

    :returns: ``(groups, names, rejected)``: the groups; ``{id(leaf): (leaf, name)}``
        of every parameter the guide uses; ``{id(leaf): reason}`` for the parameters
        that go to the base optimizer.
    """
    kwargs = kwargs or {}
    store = pyro.get_param_store()
    rng = pyro.util.get_rng_state()
    # pyro's RNG state is the CPU generator's: fork the CUDA ones too, so that reading a
    # guide on a GPU leaves the draws of the run unchanged.
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    calls = _ParamCalls()
    try:
        with torch.random.fork_rng(devices=cuda), torch.enable_grad(), poutine.block():
            with calls, _MarkDraws():
                trace = poutine.trace(guide).get_trace(*args, **kwargs)
    finally:
        pyro.util.set_rng_state(rng)

    params = {}  # param name -> (constrained value, leaf, constraint)
    for name, node in trace.nodes.items():
        if node["type"] != "param":
            continue
        value = node["value"]
        ref = getattr(value, "unconstrained", None)
        leaf = ref() if callable(ref) else None
        if leaf is None:
            leaf = store._params.get(name, value)
        # A PyroModule's local parameter (module_local_params=True) is not in the store,
        # and the call carries its constraint; a store parameter's call carries ``real``.
        constraint = node["kwargs"].get("constraint", constraints.real)
        if type(constraint) is type(constraints.real):
            constraint = store._constraints.get(name, constraints.real)
        params[name] = (value, leaf, constraint)
    names = {id(leaf): (leaf, name) for name, (_, leaf, _) in params.items()}
    # id(node) -> name, for every pyro.param call: a trace keeps only a name's last value.
    # ``nodes`` keeps the wrappers (and so the ids) alive.
    by_node = {}
    nodes = [_node_of(value) for _, value in calls.values]
    for (name, _), node in zip(calls.values, nodes):
        by_node[id(node)] = name

    rejected: Dict[int, str] = {}
    uses: Dict[int, int] = {}
    candidates = []
    for site_name, node in trace.nodes.items():
        if node["type"] != "sample":
            continue
        fn = node["fn"]
        scaling = _leaves([node["scale"]])
        for i in scaling:
            rejected.setdefault(i, f"scales site {site_name!r} (poutine.scale)")
        try:
            # The value and a poutine.scale factor too: a Delta's log_prob ((x == v).log())
            # carries no gradient, so Delta(m) was no second use of m.
            deps = _leaves([fn.log_prob(node["value"].detach()), node["value"]]) | scaling
        except Exception:  # noqa: BLE001 - anything unusual: assume it uses everything
            deps = set(names)
        for i in deps:
            uses[i] = uses.get(i, 0) + 1
        if node["is_observed"] or not deps:
            for i in deps:
                rejected.setdefault(i, f"used in observed site {site_name!r} of the guide")
            continue
        site, reason = _read_site(site_name, node, params, by_node)
        if site is None:
            for i in deps:
                rejected.setdefault(i, reason)
        else:
            candidates.append((site, deps))

    groups = []
    for site, deps in candidates:
        tensors = site.site_tensors() if isinstance(site, LowRankSite) else site.tensors()
        mine = {id(p) for p in tensors}
        shared = [i for i in mine if uses.get(i, 0) > 1]
        extra = deps - mine
        if shared or extra or len(mine) != len(tensors):
            reason = (_shared_reason(site.key, mine, uses, names)
                      if shared or len(mine) != len(tensors)
                      else f"site {site.key!r}: its distribution depends on parameters "
                           f"through something other than its own arguments")
            for i in deps:
                rejected.setdefault(i, reason)
            continue
        groups.append(site)
        if isinstance(site, LowRankSite):
            for p in site.covariance_params:
                rejected.setdefault(id(p), COVARIANCE_REASON.format(site=site.key))
    groups = [g for g in groups if not any(id(p) in rejected for p in g.tensors())]
    owned = {id(p) for g in groups for p in g.tensors()}
    for i in names:
        if i not in owned:
            rejected.setdefault(i, "feeds no sample site of the guide directly")
    return groups, names, {i: r for i, r in rejected.items() if i not in owned}


def _shared_reason(site_name, deps, uses, names) -> str:
    """The reason for a site whose parameters (``deps``) include one that another site
    or a second argument also uses."""
    shared = [i for i in deps if uses.get(i, 0) > 1]
    culprits = ", ".join(repr(names[i][1]) for i in shared if i in names)
    return (f"site {site_name!r}: a parameter{' (' + culprits + ')' if culprits else ''} is "
            f"shared with another site or used twice")


def refuse_shared_across_parts(groups, parts, rejected):
    """The ``groups`` of an ``AutoGuideList``'s hand-written parts less those holding a
    parameter that several parts use (``parts``: ``{id(parameter): [part indices]}``),
    with the reasons added to ``rejected``. Each part is read alone and cannot see another
    part's use of a parameter: both would step it, each from the whole gradient and its
    own site's Fisher."""
    for i, used in parts.items():
        if len(used) > 1:
            rejected[i] = (f"used by parts {used} of the AutoGuideList (a parameter shared "
                           f"between sites)")
    kept = []
    for g in groups:
        if not any(len(parts.get(id(t), ())) > 1 for t in g.tensors()):
            kept.append(g)
            continue
        for t in g.tensors():
            rejected.setdefault(id(t), f"site {g.key!r} shares a parameter with another "
                                       f"part of the AutoGuideList")
    return kept


def _read_site(site_name, node, params, by_node):
    """One site's group, or ``(None, reason)``."""
    scale = node["scale"]
    if scale is not None and not bool((torch.as_tensor(scale) == 1).all()):
        return None, f"site {site_name!r} is scaled (poutine.scale or a subsampled plate)"
    base, _ = _unwrap(node["fn"])
    family = type(base).__name__
    if type(base).__name__ == "Delta" or lookup_fisher(type(base)) is None:
        return None, f"site {site_name!r}: no closed-form Fisher for {family}"
    try:
        op = fisher_operator(base)
    except Exception as e:  # noqa: BLE001
        return None, f"site {site_name!r}: {family}: {e}"
    categorical = family in _CATEGORICAL_LIKE
    # Name a fixed argument first: a parameter broadcast against it is drawn too.
    drawn = sorted((r for r in op.names if isinstance(getattr(base, r), _Drawn)),
                   key=lambda r: getattr(base, r).requires_grad)
    if drawn:
        return None, (f"site {site_name!r}: argument {drawn[0]!r} of {family} depends on "
                      f"another site's draw (its Fisher changes from draw to draw)")
    fed, fixed = {}, {}
    for role in op.names:
        arg = getattr(base, role)
        if not arg.requires_grad:
            fixed[role] = arg
            continue
        src = _strip(arg.grad_fn, categorical) if arg.grad_fn is not None else arg
        name = by_node.get(id(src))
        if name is None:
            return None, (f"site {site_name!r}: argument {role!r} of {family} is computed "
                          f"from parameters, not a pyro.param value itself")
        value = params[name][0]
        try:
            same = value.expand(arg.shape)
        except RuntimeError:
            return None, f"site {site_name!r}: argument {role!r} is a reshaped parameter"
        if not categorical and not torch.equal(same, arg):
            return None, f"site {site_name!r}: argument {role!r} does not equal {name!r}"
        fed[role] = name
    if not fed:
        return None, f"site {site_name!r} has no parameters"
    if isinstance(base, StudentT) and "df" in fed:
        # Its Fisher in log df falls like 1/df^2, so single-draw natural gradients in df
        # are huge: 1-nat steps took df from 86 to 5e-36 or to 1e107 (where torch's
        # gradient in df is NaN) in 6 of 6 seeds, and heavy tails below df = 2 then blew
        # up the loc and scale steps; Adam kept every seed near the optimum.
        return None, (f"site {site_name!r}: StudentT with df a parameter (single-draw "
                      f"natural-gradient steps in df are unstable); hold df fixed for "
                      f"natural-gradient steps of loc and scale")
    leaves = {role: params[name][1] for role, name in fed.items()}
    cons = {role: params[name][2] for role, name in fed.items()}
    transforms = {role: transform_to(c) for role, c in cons.items()}
    extra = {k: getattr(base, k) for k in _EXTRA_ARGS if k in vars(base)}
    cls = type(base)

    full_shape = all(params[n][0].shape == getattr(base, r).shape for r, n in fed.items())
    count = 1
    if full_shape:
        def make(theta, _fixed=dict(fixed), _extra=extra):
            return cls(**theta, **_fixed, **_extra, validate_args=False)
    else:
        if fixed or any(torch.is_tensor(v) and v.dim() > 0 for v in extra.values()):
            return None, (f"site {site_name!r}: parameters broadcast against fixed arguments "
                          f"of {family}")

        def make(theta, _extra=extra):
            return cls(**theta, **_extra, validate_args=False)
    # The rebuilt distribution must be the traced one (up to the broadcast copies).
    try:
        theta0 = {r: params[n][0].detach() for r, n in fed.items()}
        rebuilt = make(theta0)
        for r, n in fed.items():
            if getattr(rebuilt, r).shape != params[n][0].shape:
                return None, f"site {site_name!r}: parameters of {family} broadcast each other"
        if not full_shape:
            n_red = rebuilt.batch_shape.numel()
            n_all = base.batch_shape.numel()
            if rebuilt.event_shape != base.event_shape or n_all % max(n_red, 1):
                return None, f"site {site_name!r}: cannot rebuild {family}"
            count = n_all // n_red
        elif rebuilt.batch_shape != base.batch_shape or rebuilt.event_shape != base.event_shape:
            return None, f"site {site_name!r}: cannot rebuild {family}"
    except Exception as e:  # noqa: BLE001
        return None, f"site {site_name!r}: cannot rebuild {family} ({e})"
    mask = node["mask"]
    if count > 1 and mask is not None and not bool(torch.as_tensor(mask).all()):
        # The step divides the gradient by the number of copies, which a mask changes
        # copy by copy (the masked ones carry no entropy term).
        return None, (f"site {site_name!r} is masked (poutine.mask) and its parameters are "
                      f"broadcast over {count} copies of {family}")

    roles = set(fed)
    loc_real = "loc" in cons and type(cons["loc"]).__name__ == "_Real"
    if count == 1 and not fixed and family in ("Normal", "LogNormal") \
            and roles == {"loc", "scale"} and loc_real and _positive_scale(cons["scale"]) \
            and leaves["loc"].shape == leaves["scale"].shape:
        return DiagonalGaussianGroup(site_name, site_name, leaves["loc"], leaves["scale"],
                                     transforms["scale"], 0), None
    if count == 1 and not fixed and family == "MultivariateNormal" \
            and roles == {"loc", "scale_tril"} and loc_real \
            and isinstance(cons["scale_tril"], torch_constraints._LowerCholesky):
        return TrilGaussianSite(site_name, leaves, transforms, cons), None
    if family == "LowRankMultivariateNormal":
        return _lowrank_site(site_name, base, fed, leaves, transforms, cons, count)
    narrower = _narrower(base, fed, params) or _coupling(base, fed, params)
    if narrower is not None:
        return None, f"site {site_name!r}: {narrower}"
    mirror = not fixed and exponential_family_coords(rebuilt) is not None
    return ExpFamSite(site_name, leaves, transforms, cons, make, family, count, mirror,
                      reads_arguments=bool(fixed or extra) or count > 1), None


def _unconstrained_size(constraint, shape) -> Optional[int]:
    """The dimension of the set ``constraint`` of tensors of ``shape``: the inverse shape
    of its bijection (``transform_to(simplex)``, a softmax, has one coordinate too many)."""
    for registry in (biject_to, transform_to):
        try:
            return torch.Size(registry(constraint).inverse_shape(shape)).numel()
        except Exception:  # noqa: BLE001 - none registered, or no inverse_shape
            continue
    return None


def _narrower(base, fed, params) -> Optional[str]:
    """Why a parameter's constraint confines it to a set of fewer dimensions than its
    argument's own (``corr_cholesky`` for a ``scale_tril``, ``simplex`` for a Dirichlet's
    concentration), or None: the Fisher step moves in all the argument's directions and
    leaves such a set, and backtracking then halves nearly every step (it froze)."""
    for role, name in fed.items():
        own = base.arg_constraints.get(role)
        if own is None or constraints.is_dependent(own):
            continue
        value, _, constraint = params[name]
        mine = _unconstrained_size(constraint, value.shape)
        theirs = _unconstrained_size(own, value.shape)
        if mine is not None and theirs is not None and mine < theirs:
            return (f"{name!r} is constrained {constraint}, a set of fewer dimensions than "
                    f"{type(base).__name__}'s {role!r} ({own}), which the Fisher step "
                    f"would leave")
    return None


def _coupling(base, fed, params) -> Optional[str]:
    """Why a parameter's constraint ties entries that its argument takes as separate batch
    elements (``ordered_vector`` for a ``Normal``'s ``loc``), or None: the Fisher is built
    element by element, and its unconstrained coordinates would mix elements."""
    for role, name in fed.items():
        own = base.arg_constraints.get(role)
        own_dim = 0 if own is None or constraints.is_dependent(own) else own.event_dim
        constraint = params[name][2]
        if constraint.event_dim > own_dim:
            return (f"{name!r} is constrained {constraint}, which ties entries that "
                    f"{type(base).__name__}'s {role!r} takes as separate elements")
    return None


def _lowrank_site(site_name, base, fed, leaves, transforms, cons, count):
    """A :class:`LowRankSite`, or ``(None, reason)``. Its Fisher step in ``(W, D)`` from
    gradients alone diverged (the Fisher of ``W`` vanishes with ``W``: see
    :mod:`pyro_natgrad.lowrank`), so it takes the low-rank group's steps instead."""
    where = f"site {site_name!r}: LowRankMultivariateNormal"
    if count != 1 or base.batch_shape != ():
        return None, f"{where} with batch shape {tuple(base.batch_shape)} (only () is supported)"
    if "loc" not in fed or type(cons["loc"]).__name__ != "_Real":
        return None, (f"{where} needs loc to be an unconstrained pyro.param: its covariance "
                      f"alone has no stable natural-gradient step")
    if "cov_factor" in fed and type(cons["cov_factor"]).__name__ != "_Real":
        return None, f"{where}: a constrained cov_factor is not supported"
    if "cov_diag" in fed and not _positive_scale(cons["cov_diag"]):
        return None, f"{where}: cov_diag must be constrained positive (or softplus_positive)"
    W = leaves["cov_factor"] if "cov_factor" in fed else base.cov_factor.detach()
    if "cov_diag" in fed:
        D, to_diag = leaves["cov_diag"], transforms["cov_diag"]
    else:
        D, to_diag = base.cov_diag.detach(), torch.distributions.transforms.identity_transform
    covariance = [leaves[r] for r in ("cov_factor", "cov_diag") if r in fed]
    return LowRankSite(site_name, leaves["loc"], W, D, to_diag, covariance), None


def describe_rejected(rejected, names, params) -> List[str]:
    """``name (reason)`` for the given fallback parameters, for the one warning;
    ``names``: ``{tensor: name}``."""
    out = []
    store = pyro.get_param_store()
    for p in params:
        name = names.get(p) or store.param_name(p) or f"<tensor {tuple(p.shape)}>"
        reason = rejected.get(id(p), "not the guide's: expected for model parameters")
        out.append(f"{name} ({reason})")
    return out
