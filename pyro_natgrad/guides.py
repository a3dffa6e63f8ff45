"""Reading Pyro guides: which parameters feed which Gaussian, and the draws behind
each gradient.

A *group* is the set of unconstrained parameter tensors of one variational
distribution, with the maps from them to the distribution's parameters:

* :class:`DiagonalGaussianGroup`: ``N(loc, scale^2)`` elementwise (one
  :class:`~pyro.infer.autoguide.AutoNormal` site, or
  :class:`~pyro.infer.autoguide.AutoDiagonalNormal`);
* :class:`FullGaussianGroup`: ``N(loc, L L^T)`` with ``L = diag(scale) U``, ``U`` unit
  lower triangular (:class:`~pyro.infer.autoguide.AutoMultivariateNormal`).

Groups are identified by tensor identity, so they work with the global param
store and with ``pyro.settings.set(module_local_params=True)`` alike.

:class:`DrawRecorder` hooks a guide module and records, for each call, the
auxiliary latent draws and their plates, from which the optimizer forms the
control variate of :mod:`pyro_natgrad.gaussian`.
"""

import weakref
from operator import attrgetter
from typing import Dict, List

import torch
from pyro import poutine
from pyro.infer.autoguide import (
    AutoCallable, AutoDiagonalNormal, AutoGuide, AutoGuideList, AutoLowRankMultivariateNormal,
    AutoMultivariateNormal, AutoNormal,
)
from torch.distributions import Independent, MultivariateNormal, Normal, transform_to
from torch.distributions.transforms import ExpTransform


class DrawRecorder:
    """Forward hooks that trace each call of a guide module and keep the values
    of its auxiliary latent sites and subsampling indices (detached).

    The hooks hold no reference to the optimizer, and pickling drops the
    records, so a hooked guide still saves with ``torch.save``.
    """

    #: Key of a record's ``{site: (scale, version)}``: the scale tensor of the site's
    #: distribution (for the sites of :attr:`scale_params`, ``{site: raw parameter}``)
    #: and the parameter's version counter then, so a step can reuse the guide's own
    #: ``softplus(raw)`` while ``raw`` is unchanged. Not a string: no site name.
    SCALES = ("scales",)
    #: Key of a record's :class:`BackwardFlag`.
    BACKWARD = ("backward",)
    #: Key of a record's ``(args, kwargs)``, those of the guide call that made it: the
    #: model's Hessian at its draws is of the model with these arguments.
    ARGUMENTS = ("arguments",)

    def __init__(self, module: torch.nn.Module, sites, owner=None):
        self.sites = set(sites)
        self.scale_params: Dict[str, torch.Tensor] = {}
        self.records: List[Dict] = []
        self._tracer = None
        # With several recorders on one module (a new optimizer for the same guide), the
        # traces must close in the reverse order of opening: post-hooks are prepended.
        self._handles = [
            module.register_forward_pre_hook(self._pre, with_kwargs=True),
            module.register_forward_hook(self._post, always_call=True, prepend=True),
        ]
        # The hooks go away with the optimizer that placed them (a weak reference, so
        # the guide does not keep a discarded optimizer alive).
        self._owner = weakref.ref(owner) if owner is not None else None

    #: Records kept at most; a guide called many times without an optimizer step
    #: (e.g. in a custom loop) keeps only its latest draws.
    MAX_RECORDS = 64

    def _pre(self, module, args, kwargs):
        if self._owner is not None and self._owner() is None:
            self.remove()
            return
        # Only calls that can produce gradients: Predictive and other sampling run
        # under no_grad, and their draws must not be mistaken for the step's.
        if not torch.is_grad_enabled():
            return
        self._tracer = poutine.trace()
        self._tracer.arguments = (tuple(args), dict(kwargs or {}))
        self._tracer.__enter__()

    def _post(self, module, args, output):
        tracer, self._tracer = self._tracer, None
        if tracer is None:
            return
        tracer.__exit__(None, None, None)
        tr = tracer.trace
        record, drawn = {}, []
        for name, node in tr.nodes.items():
            if node["type"] != "sample":
                continue
            if node["infer"].get("is_auxiliary") or (name in self.sites
                                                     and _gaussian_draw(node["fn"])):
                record[name] = (node["value"].detach(), node["cond_indep_stack"])
                drawn.append(node["value"])
            elif node["fn"].__class__.__name__ == "_Subsample":
                record[name] = node["value"].detach()
        record.update(_master_subsamples(module, record))
        scales = {}
        for name, raw in self.scale_params.items():
            node = tr.nodes.get(name)
            if node is None or node["type"] != "sample":
                continue
            fn = node["fn"]
            while isinstance(fn, Independent):
                fn = fn.base_dist
            scale = getattr(fn, "scale", None)
            if torch.is_tensor(scale):
                scales[name] = (scale.detach(), raw._version)
        if scales:
            record[self.SCALES] = scales
        record[self.BACKWARD] = BackwardFlag(drawn)
        record[self.ARGUMENTS] = tracer.arguments
        self.records.append(record)
        del self.records[:-self.MAX_RECORDS]

    @staticmethod
    def plate_indices(record) -> Dict[str, torch.Tensor]:
        """``{plate name: subsample indices}`` of the subsampled plates of a record."""
        return {k: v for k, v in record.items() if isinstance(k, str) and torch.is_tensor(v)}

    def take(self) -> List[Dict]:
        """The records since the last call that are behind this step's gradients
        (:func:`differentiated`)."""
        records, self.records = self.records, []
        return differentiated(records, lambda r: r[self.BACKWARD])

    def remove(self):
        for h in self._handles:
            h.remove()

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(records=[], _tracer=None, _handles=[], _owner=None, scale_params={})
        return state


def _master_subsamples(module, record) -> Dict[str, torch.Tensor]:
    """``{plate name: subsample indices}`` of the plates a part of an ``AutoGuideList``
    shares with the list: the list opens them (their subsample sites are in its trace,
    not the part's), and a part's draws over them are of that subsample."""
    master = getattr(module, "master", None)
    plates = getattr(master(), "plates", None) if callable(master) else None
    out = {}
    for name, plate in (plates or {}).items():
        # pyro.plate keeps its subsample as _indices (drawn when the plate is made)
        indices = getattr(plate, "_indices", None)
        if name not in record and torch.is_tensor(indices) and plate.subsample_size is not None \
                and plate.subsample_size < plate.size:
            out[name] = indices.detach()
    return out


def _gaussian_draw(fn) -> bool:
    """Whether a site's value is the Gaussian draw itself (not, say, ``exp`` of it, as for
    a hand-written ``LogNormal`` site whose ``loc`` and ``scale`` are a Gaussian group)."""
    while isinstance(fn, Independent):
        fn = fn.base_dist
    return isinstance(fn, (Normal, MultivariateNormal))


class BackwardFlag:
    """``used`` turns True when a backward pass reaches the watched draws (a tensor hook
    on the first that needs grad); ``tracked``: whether any did."""

    def __init__(self, draws):
        watched = [t for t in draws if torch.is_tensor(t) and t.requires_grad]
        self.tracked, self.used = bool(watched), False
        if watched:
            watched[0].register_hook(self._reached)

    def _reached(self, grad):
        self.used = True


def same_arguments(a, b) -> bool:
    """Whether two guide calls' arguments are the same: the same objects, or equal
    values (tensors of one shape, dtype and device with equal entries), recursively
    through tuples, lists and dicts."""
    if a is b:
        return True
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_arguments, a, b))
    if isinstance(a, dict):
        return (isinstance(b, dict) and a.keys() == b.keys()
                and all(same_arguments(a[k], b[k]) for k in a))
    try:
        return bool(a == b)
    except Exception:  # e.g. objects whose == is elementwise or undefined
        return False


def differentiated(items, flag_of):
    """The ``items`` (guide calls) whose draws a backward pass reached, and the untracked
    ones, if any was reached; else all of them (gradients set by hand). The others come
    from calls whose loss was not differentiated (a validation ``Trace_ELBO().loss``, a
    logging or set-up call): their draws are not behind this step's gradients."""
    if any(flag_of(i).used for i in items):
        return [i for i in items if flag_of(i).used or not flag_of(i).tracked]
    return items


def _is_softplus(transform) -> bool:
    return type(transform).__name__ == "SoftplusTransform" and \
        type(transform).__module__.startswith(("pyro.", "torch."))


def _elementwise_derivative(transform, x, y=None):
    """``d transform(x) / dx`` of an elementwise transform; ``y = transform(x)`` if known.
    Closed forms for softplus (the sigmoid) and exp, a forward-mode derivative otherwise."""
    if _is_softplus(transform):
        return torch.sigmoid(x)
    if isinstance(transform, ExpTransform):
        return torch.exp(x) if y is None else y
    _, d = torch.func.jvp(transform, (x,), (torch.ones_like(x),))
    return d


class _Group:
    kind = ""

    def __init__(self, key: str, site: str, params: Dict[str, torch.Tensor], transforms):
        self.key, self.site = key, site
        self.params = params  # role -> unconstrained tensor (a leaf of the param store)
        self.transforms = transforms  # role -> Transform (unconstrained -> constrained)

    def tensors(self):
        return list(self.params.values())

    def work(self, shapes, dtype, device):
        """Scratch tensors of these shapes for the optimizer's step, kept between steps
        (so that a large step allocates no memory)."""
        key = (tuple(shapes), dtype, device)
        work = getattr(self, "_work", None)
        if work is None or work[0] != key:
            self._work = None  # free the old ones first
            work = self._work = (key, [torch.empty(n, dtype=dtype, device=device)
                                       for n in shapes])
        return work[1]

    def grads(self):
        return {k: p.grad for k, p in self.params.items()}


class DiagonalGaussianGroup(_Group):
    """``N(loc, T(scale_raw)^2)`` elementwise; ``plates`` maps a tensor dim to the
    name of a plate that may subsample it."""

    kind = "diagonal Gaussian"

    def __init__(self, key, site, loc, scale_raw, scale_transform, event_dim, plates=None):
        super().__init__(key, site, {"loc": loc, "scale": scale_raw},
                         {"scale": scale_transform})
        self.event_dim = event_dim
        self.plates = plates or {}

    def scale(self):
        raw = self.params["scale"].detach()
        scale = self.transforms["scale"](raw)
        return scale, _elementwise_derivative(self.transforms["scale"], raw, scale)

    def softplus(self) -> bool:
        """Whether ``scale = softplus(raw)`` (Pyro's default), which has a fused step."""
        return _is_softplus(self.transforms["scale"])

    def subsample_index(self, record):
        """``[(dim of loc, indices)]`` of the subsampled plates of this step's draw."""
        index = []
        for frame in record[self.site][1]:
            if frame.full_size is not None and frame.full_size != frame.size \
                    and frame.name in record:
                index.append((frame.dim - self.event_dim, record[frame.name]))
        return index

    def draw_count(self, records) -> int:
        """How many draws of the site the records hold (vectorised particles count each)."""
        count = 0
        for record in records:
            if self.site in record:
                value = record[self.site][0]
                lead = value.dim() - self.params["loc"].dim()
                count += value.shape[:lead].numel() if lead > 0 else 1
        return count

    def eps_moments(self, records, loc, scale):
        """``(E[eps], E[eps^2], visits)`` over the recorded draws, full-size tensors
        (elements outside a subsample get 0, 1 and 0); None without records."""
        m1 = torch.zeros_like(loc)
        m2 = torch.zeros_like(loc)
        visits = torch.zeros_like(loc)
        found = False
        for record in records:
            if self.site not in record:
                continue
            value, stack = record[self.site]
            index = self.subsample_index(record)
            loc_s, scale_s = loc, scale
            for dim, idx in index:
                loc_s, scale_s = loc_s.index_select(dim, idx), scale_s.index_select(dim, idx)
            eps = (value - loc_s) / scale_s
            lead = eps.dim() - loc.dim()  # vectorised particles
            n = eps.shape[:lead].numel() if lead > 0 else 1
            e1 = eps.reshape((-1,) + eps.shape[lead:]).sum(0) if lead else eps
            e2 = eps.square().reshape((-1,) + eps.shape[lead:]).sum(0) if lead else eps.square()
            ones = torch.full_like(e1, float(n))
            if index:
                e1, e2, ones = (_scatter(loc, x, index) for x in (e1, e2, ones))
            m1, m2, visits = m1 + e1, m2 + e2, visits + ones
            found = True
        if not found:
            return None
        seen = visits > 0
        denom = visits.clamp_min(1)
        return m1 / denom, torch.where(seen, m2 / denom, torch.ones_like(m2)), visits


def _scatter(full, x, index):
    """Embed ``x`` (indexed along ``index``'s dims) into zeros shaped like ``full``."""
    out = x
    for dim, idx in reversed(index):
        shape = list(out.shape)
        shape[dim] = full.shape[dim]
        out = out.new_zeros(shape).index_add(dim, idx, out)
    return out


class FullGaussianGroup(_Group):
    """``N(loc, L L^T)``, ``L = diag(T(scale_raw)) U``, ``U`` unit lower triangular
    (the parameterisation of ``AutoMultivariateNormal``)."""

    kind = "full-rank Gaussian"

    def __init__(self, key, site, loc, scale_raw, scale_transform, tril_raw, tril_transform):
        super().__init__(key, site, {"loc": loc, "scale": scale_raw, "scale_tril": tril_raw},
                         {"scale": scale_transform, "scale_tril": tril_transform})

    def scale(self):
        """``(scale, d scale / d raw)``."""
        raw = self.params["scale"].detach()
        s = self.transforms["scale"](raw)
        return s, _elementwise_derivative(self.transforms["scale"], raw, s)

    def unit_tril(self) -> bool:
        """Whether ``U = tril(raw, -1) + I`` (Pyro's parameterisation)."""
        return type(self.transforms["scale_tril"]).__name__ == "UnitLowerCholeskyTransform"

    def factors(self):
        raw = self.params["scale"].detach()
        s = self.transforms["scale"](raw)
        ds = _elementwise_derivative(self.transforms["scale"], raw, s)
        U = self.transforms["scale_tril"](self.params["scale_tril"].detach())
        return s, ds, U

    def eps_draws(self, records, loc, L):
        """The whitened draws ``L^{-1}(z - loc)`` of the recorded guide calls, ``(n, d)``;
        None without any."""
        zs = []
        for record in records:
            if self.site in record:
                z = record[self.site][0]
                zs.append(z.reshape((-1, z.shape[-1])))
        if not zs:
            return None
        z = torch.cat(zs) if len(zs) > 1 else zs[0]
        return torch.linalg.solve_triangular(L, (z - loc).mT, upper=False).mT

    def eps_moments(self, records, loc, L):
        eps = self.eps_draws(records, loc, L)
        if eps is None:
            return None
        return eps.mean(0), eps.mT @ eps / eps.shape[0]


def _pyro_param(module, name):
    """The unconstrained tensor and constraint of a PyroParam or nn.Parameter."""
    owner_path, _, leaf = name.rpartition(".")
    owner = attrgetter(owner_path)(module) if owner_path else module
    if leaf in getattr(owner, "_pyro_params", {}):
        constraint, event_dim = owner._pyro_params[leaf]
        return getattr(owner, leaf + "_unconstrained"), constraint
    from torch.distributions import constraints

    return owner._parameters[leaf], constraints.real


def read_guide(guide, prefix="") -> List[_Group]:
    """The Gaussian groups of an autoguide (recursing into ``AutoGuideList``).

    :raises RuntimeError: if the guide has not been run yet.
    """
    if isinstance(guide, AutoGuideList):
        groups = []
        for i, part in enumerate(guide):
            groups += read_guide(part, prefix=f"{prefix}{i}.")
        return groups
    if isinstance(guide, AutoCallable):
        return []  # a hand-written part: read by pyro_natgrad.handwritten
    if isinstance(guide, AutoGuide) and getattr(guide, "prototype_trace", None) is None:
        raise RuntimeError(
            f"{type(guide).__name__} has not been run yet, so its parameters do not exist; "
            f"the optimizer can be built before that, but routing() and read_guide() need "
            f"one call of the guide first (svi.step(...), or the guide itself). Inside "
            f"svi.step, this means the optimizer was built for another guide than the one "
            f"SVI runs: pass SVI's guide to NaturalGradient")
    if reads_as_autonormal(guide):
        groups = []
        for name, site in guide.prototype_trace.iter_stochastic_nodes():
            loc, _ = _pyro_param(guide.locs, name)
            raw, constraint = _pyro_param(guide.scales, name)
            event_dim = guide._event_dims[name]
            plates = {f.dim - event_dim: f.name for f in site["cond_indep_stack"]
                      if f.vectorized}
            groups.append(DiagonalGaussianGroup(
                f"{prefix}{name}", name + "_unconstrained", loc, raw, transform_to(constraint),
                event_dim, plates))
        return groups
    latent = f"_{getattr(guide, '_pyro_name', '')}_latent"
    if type(guide) is AutoDiagonalNormal:
        loc, _ = _pyro_param(guide, "loc")
        raw, constraint = _pyro_param(guide, "scale")
        return [DiagonalGaussianGroup(f"{prefix}latent", latent, loc, raw,
                                      transform_to(constraint), 1)]
    if type(guide) is AutoMultivariateNormal:
        loc, _ = _pyro_param(guide, "loc")
        raw, constraint = _pyro_param(guide, "scale")
        tril, tril_constraint = _pyro_param(guide, "scale_tril")
        return [FullGaussianGroup(f"{prefix}latent", latent, loc, raw, transform_to(constraint),
                                  tril, transform_to(tril_constraint))]
    return []


#: The autoguides that :func:`read_guide` and :func:`~pyro_natgrad.lowrank.read_lowrank`
#: read (exact types: a subclass may parameterise its posterior differently; for
#: ``AutoNormal`` see :func:`reads_as_autonormal`).
SUPPORTED_AUTOGUIDES = (AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal,
                        AutoLowRankMultivariateNormal)

#: The methods by which an ``AutoNormal`` builds its parameters and its distribution.
_AUTONORMAL_METHODS = ("_setup_prototype", "_get_loc_and_scale", "forward")


def reads_as_autonormal(guide) -> bool:
    """Whether ``guide`` samples each site from ``Normal(locs.<site>, scales.<site>)``
    as ``AutoNormal`` does: an ``AutoNormal`` or a subclass that keeps its methods (one that
    only changes ``scale_constraint`` or the initial values, say). A subclass that builds
    its distribution otherwise (``loc + 1``, ``2 * scale``) would get steps for a
    distribution it does not sample from."""
    return isinstance(guide, AutoNormal) and all(
        getattr(type(guide), m) is getattr(AutoNormal, m) for m in _AUTONORMAL_METHODS)


def unsupported_parts(guide, prefix="") -> List[tuple]:
    """``[(name, part)]``: the autoguides in ``guide`` (recursing into ``AutoGuideList``)
    whose parameters no natural-gradient step reads, e.g. ``AutoDelta`` or
    ``AutoIAFNormal``; ``name`` is the part's index path, ``"1."`` for ``guide[1]``."""
    if isinstance(guide, AutoGuideList):
        out = []
        for i, part in enumerate(guide):
            out += unsupported_parts(part, prefix=f"{prefix}{i}.")
        return out
    if (isinstance(guide, AutoCallable) or reads_as_autonormal(guide)
            or type(guide) in SUPPORTED_AUTOGUIDES):
        return []
    return [(prefix, guide)]


def unsupported_reason(name, part) -> str:
    """Why the parameters of an unsupported autoguide take base-optimizer steps."""
    where = f"part {name[:-1]} of the AutoGuideList, " if name else ""
    if isinstance(part, AutoNormal):
        changed = [m for m in _AUTONORMAL_METHODS
                   if getattr(type(part), m) is not getattr(AutoNormal, m)]
        return (f"{where}{type(part).__name__}: a subclass of AutoNormal that overrides "
                f"{', '.join(changed)}, so its distribution may not be Normal(locs, scales), "
                f"whose natural-gradient steps NaturalGradient takes")
    return (f"{where}{type(part).__name__}: not a guide NaturalGradient reads (it reads "
            f"{', '.join(t.__name__ for t in SUPPORTED_AUTOGUIDES)} and hand-written guides)")


def aux_sites(groups) -> List[str]:
    return [g.site for g in groups]
