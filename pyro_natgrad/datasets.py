"""Gold-standard reference posteriors shipped with the package.

The references come from `posteriordb <https://github.com/stan-dev/posteriordb>`_
(long-run Stan NUTS draws) and from inference-gym ground truths; their data and
provenance live in ``pyro_natgrad/data/`` (see the README there). Each
:class:`Reference` carries the posterior summaries, the (transformed) data as
torch tensors, and a Pyro model written from the reference's description
(``pyro_natgrad.reference_models``)::

    from pyro_natgrad.datasets import list_references, load_reference

    ref = load_reference("kidiq-kidscore_momhsiq")
    guide = AutoNormal(ref.model)
    ...                                  # fit, e.g. with SVI(ref.model, guide, ...)
    draws = Predictive(ref.model, guide=guide, num_samples=1000)()
    flat = ref.extract(draws)            # [1000, 1, n_params], ref.param_names order
    z = (flat.mean(0).squeeze(0).numpy() - ref.mean) / ref.sd

Parameter names follow the reference, with 1-based indices (``beta[1]`` is
element 0 of site ``beta``); values are in the constrained space, as reported.
"""

import functools
import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from .reference_models import MODEL_SPECS, ModelSpec, gp_pois_regr

__all__ = ["Reference", "list_references", "load_reference"]

DATA_DIR = Path(__file__).resolve().parent / "data"

# reference name -> key of MODEL_SPECS
_SPEC_OF_REFERENCE = {
    "arK-arK": "arK",
    "diamonds-diamonds": "diamonds",
    "earnings-logearn_interaction_z": "logearn_interaction_z",
    "eight_schools-eight_schools_noncentered": "eight_schools_noncentered",
    "gp_pois_regr-gp_pois_regr": "gp_pois_regr",
    "kidiq-kidscore_momhsiq": "kidscore_momhsiq",
    "kilpisjarvi_mod-kilpisjarvi": "kilpisjarvi",
    "mesquite-logmesquite_logvash": "logmesquite_logvash",
    "nes2000-nes": "nes",
    "sblrc-blr": "blr",
    "sblri-blr": "blr",
    "german_credit_numeric_logistic_regression": "german_credit_logistic",
    "german_credit_numeric_probit_regression": "german_credit_probit",
    "eight_schools": "eight_schools_centered",
    "radon_contextual_effects_minnesota": "radon_uniform",
    "radon_contextual_effects_minnesota_halfnormal": "radon_halfnormal",
}

_NAME_RE = re.compile(r"^([A-Za-z_]\w*)(?:\[(\d+)\])?$")


def list_references() -> List[str]:
    """Names accepted by :func:`load_reference` (sorted)."""
    return sorted(_SPEC_OF_REFERENCE)


@functools.lru_cache(maxsize=None)
def _read_json(fname: str) -> dict:
    path = DATA_DIR / fname
    opener = gzip.open if fname.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def _layout(param_names):
    """``[(site, index or None), ...]`` and ``{site: length or None}`` from the names."""
    cols, sizes = [], {}
    for p in param_names:
        m = _NAME_RE.match(p)
        if m is None:
            raise ValueError("unsupported parameter name %r" % p)
        site, idx = m.group(1), m.group(2)
        if idx is None:
            if site in sizes:
                raise ValueError("duplicate parameter %r" % p)
            sizes[site] = None
            cols.append((site, None))
        else:
            i = int(idx) - 1
            if sizes.get(site, 0) != i:  # indices must run 1, 2, ... contiguously
                raise ValueError("non-contiguous index in %r" % p)
            sizes[site] = i + 1
            cols.append((site, i))
    return cols, sizes


def _to_torch(value, dtype):
    if isinstance(value, int) and not isinstance(value, bool):
        return value  # a size, e.g. the number of groups
    arr = np.asarray(value)
    if np.issubdtype(arr.dtype, np.integer):
        return torch.as_tensor(arr, dtype=torch.long)
    return torch.as_tensor(arr, dtype=dtype)


def _raw_copy(raw: dict) -> dict:
    """Fresh numpy copies of the stored lists (the parsed json is cached)."""
    return {k: (np.array(v) if isinstance(v, list) else v) for k, v in raw.items()}


@dataclass
class Reference:
    """A reference posterior, its data and a Pyro model.

    :ivar name: reference name (posteriordb ``data-model`` name, or inference-gym target).
    :ivar description: the model description recorded with the reference.
    :ivar data: model data as keyword arguments of :attr:`model`: torch tensors in the
        requested dtype (integer index arrays as ``torch.long``; sizes as ``int``).
        Already transformed as the description says (logs, centring, standardising).
    :ivar param_names: reported parameters, in the reference's order.
    :ivar mean, sd: posterior means / standard deviations, numpy float64 ``[n_params]``.
    :ivar cov: posterior covariance ``[n_params, n_params]`` or ``None``.
    :ivar quantiles: ``{0.05: array, 0.5: array, 0.95: array}`` or ``None``.
    :ivar model: the Pyro model with :attr:`data` bound (keyword arguments may be
        overridden, e.g. ``ref.model(y=new_y)``).
    :ivar kind: ``linear``, ``logistic``, ``probit``, ``poisson``, ``hierarchical`` or
        ``time-series``.
    :ivar gaussian_like: whether the posterior is close to Gaussian (in the
        unconstrained space of the reported parameters).
    :ivar source: ``"posteriordb"`` or ``"inference_gym"``.
    :ivar mean_se: Monte Carlo standard error of :attr:`mean` (``None`` if not recorded).
    :ivar semianalytic: independent 1-D-quadrature cross-check (posteriordb linear
        models; see ``data/README.md``), arrays in :attr:`param_names` order, or ``None``.
    :ivar check: other cross-checks recorded in the source file, or ``None``.
    :ivar provenance: where the reference came from (repository, commit, paths, ...).
    :ivar raw_data: the stored data before the model's transformations (numpy / lists).
    """

    name: str
    description: str
    data: Dict[str, Any] = field(repr=False)
    param_names: List[str] = field(repr=False)
    mean: np.ndarray = field(repr=False)
    sd: np.ndarray = field(repr=False)
    cov: Optional[np.ndarray] = field(default=None, repr=False)
    quantiles: Optional[Dict[float, np.ndarray]] = field(default=None, repr=False)
    model: Optional[Callable] = field(default=None, repr=False)
    kind: str = ""
    gaussian_like: bool = False
    source: str = ""
    mean_se: Optional[np.ndarray] = field(default=None, repr=False)
    semianalytic: Optional[dict] = field(default=None, repr=False)
    check: Optional[dict] = field(default=None, repr=False)
    provenance: dict = field(default_factory=dict, repr=False)
    raw_data: dict = field(default_factory=dict, repr=False)
    dtype: torch.dtype = torch.float64
    spec: Optional[ModelSpec] = field(default=None, repr=False)

    @property
    def n_params(self) -> int:
        return len(self.param_names)

    @property
    def n_data(self) -> int:
        """Number of observations in the likelihood."""
        return int(self.data[self.spec.obs].shape[0])

    def site_sizes(self) -> Dict[str, Optional[int]]:
        """Reported sites: ``{site: length}`` (``None`` for a scalar site)."""
        return _layout(self.param_names)[1]

    def extract(self, samples: Dict[str, Any]) -> torch.Tensor:
        """Map Pyro site values to a flat ``[..., n_params]`` tensor in ``param_names`` order.

        ``samples`` maps site names to constrained values with any leading batch
        shape (e.g. a guide's output, ``Predictive`` draws). Reported quantities
        that are not sample sites (``theta``, ``f``) are taken from ``samples`` if
        present and otherwise recomputed from the latent sites.
        """
        cols, sizes = _layout(self.param_names)
        samples = {k: torch.as_tensor(v) for k, v in samples.items()}
        if any(s not in samples for s in sizes) and self.spec.derive is not None:
            derived = self.spec.derive(samples, self.data)
            samples = {**derived, **samples}
        missing = [s for s in sizes if s not in samples]
        if missing:
            raise KeyError("samples lack site(s) %s" % missing)
        batch_shapes = {}
        for s, n in sizes.items():
            v = samples[s]
            if n is not None and (v.dim() == 0 or v.shape[-1] != n):
                raise ValueError("site %r should end in size %d, got shape %s"
                                 % (s, n, tuple(v.shape)))
            batch_shapes[s] = tuple(v.shape if n is None else v.shape[:-1])
        if len(set(batch_shapes.values())) > 1:
            raise ValueError("sites have different batch shapes: %s" % batch_shapes)
        out = [samples[s] if i is None else samples[s][..., i] for s, i in cols]
        return torch.stack(torch.broadcast_tensors(*out), dim=-1)

    def to_sites(self, flat) -> Dict[str, torch.Tensor]:
        """Inverse of :meth:`extract`: latent sample-site values from a flat ``[..., n_params]``.

        E.g. ``poutine.condition(ref.model, ref.to_sites(ref.mean))`` evaluates the
        model at the reference mean.
        """
        flat = torch.as_tensor(flat, dtype=self.dtype)
        if flat.shape[-1] != self.n_params:
            raise ValueError("expected last dimension %d" % self.n_params)
        cols, sizes = _layout(self.param_names)
        pos = {c: j for j, c in enumerate(cols)}
        out = {}
        for s, n in sizes.items():
            if n is None:
                out[s] = flat[..., pos[(s, None)]]
            else:
                out[s] = flat[..., [pos[(s, i)] for i in range(n)]]
        if self.spec.underive is not None:
            out = self.spec.underive(out, self.data)
        return out


def load_reference(name: str, dtype: torch.dtype = torch.float64) -> Reference:
    """Load a packaged reference posterior (see :func:`list_references`).

    :param str name: reference name.
    :param torch.dtype dtype: floating dtype of the data tensors (and of
        :attr:`Reference.to_sites` output): ``torch.float64`` or ``torch.float32``
        (``gp_pois_regr-gp_pois_regr`` needs float64).
    """
    if name not in _SPEC_OF_REFERENCE:
        raise KeyError("unknown reference %r; see list_references()" % name)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        # An integer dtype truncated the data (earnings' log incomes became 10, 11, ...),
        # and the model then ran on it without complaint.
        raise TypeError(f"dtype must be a real floating dtype such as torch.float64 or "
                        f"torch.float32, got {dtype!r}")
    spec = MODEL_SPECS[_SPEC_OF_REFERENCE[name]]
    if spec.fn is gp_pois_regr and dtype != torch.float64:
        raise ValueError(
            f"{name} needs float64: its kernel matrix's jitter (1e-10, as in the Stan "
            f"model) is below {dtype}'s resolution, and the Cholesky factorisation fails "
            f"(also in to_sites and extract). Load it with dtype=torch.float64; to fit in "
            f"{dtype}, call pyro_natgrad.reference_models.gp_pois_regr(x, k, jitter=1e-5) "
            f"on its data converted to {dtype}")
    meta = _read_json(name + ".json")
    raw = _raw_copy(meta["data"] if "data" in meta else _read_json(meta["data_file"]))
    data = {k: _to_torch(v, dtype) for k, v in spec.prepare(raw).items()}
    names = list(meta["param_names"])
    _layout(names)  # validates the names

    def arr(x):
        return None if x is None else np.asarray(x, dtype=np.float64)

    quantiles = meta.get("quantiles")
    if quantiles is not None:
        quantiles = {float(q): arr(v) for q, v in quantiles.items()}
    semi = meta.get("semianalytic")
    if semi is not None:
        semi = {k: (arr(v) if isinstance(v, list) else v) for k, v in semi.items()}
    check = meta.get("check")
    if check is not None:
        check = {k: (arr(v) if isinstance(v, list) else v) for k, v in check.items()}
    provenance = dict(meta.get("provenance", {}))
    if "data_file" in meta:
        provenance["packaged_data_file"] = meta["data_file"]

    return Reference(
        name=name,
        description=meta["description"],
        data=data,
        param_names=names,
        mean=arr(meta["mean"]),
        sd=arr(meta["sd"]),
        cov=arr(meta.get("cov")),
        quantiles=quantiles,
        model=functools.partial(spec.fn, **data),
        kind=meta["kind"],
        gaussian_like=bool(meta["gaussian_like"]),
        source=meta["source"],
        mean_se=arr(meta.get("mean_se")),
        semianalytic=semi,
        check=check,
        provenance=provenance,
        raw_data=raw,
        dtype=dtype,
        spec=spec,
    )
