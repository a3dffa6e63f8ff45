"""The checkpoint of :meth:`NaturalGradient.get_state
<pyro_natgrad.NaturalGradient.get_state>`: its form, and the checks that it fits the
guide and the param store before any of it is restored (a checkpoint of another guide
raises and changes nothing). Shared with :class:`~pyro_natgrad.AmortisedNaturalGradient`
for its base optimizer's state.
"""

from typing import Dict

import pyro
import torch
from pyro.optim import PyroOptim

from .diagnostics import optimizer_name
from .lowrank import LowRankGaussianGroup


#: The keys of :meth:`NaturalGradient.get_state`'s checkpoint.
CHECKPOINT_KEYS = ("natural_gradient", "base", "base_shapes", "skipped", "layout")


def check_format(state) -> None:
    """A ValueError unless ``state`` has the form of :meth:`NaturalGradient.get_state`'s
    checkpoint: a dict with ``natural_gradient`` (``{group: {name: value}}``) and at
    most the other :data:`CHECKPOINT_KEYS`, of their types."""
    what = None
    if not isinstance(state, dict):
        what = f"a {type(state).__name__}"
    elif "natural_gradient" not in state or not set(state) <= set(CHECKPOINT_KEYS):
        what = f"a dict with the keys {sorted(map(str, state))[:6]}"
    elif not isinstance(state["natural_gradient"], dict) or not all(
            isinstance(v, dict) for v in state["natural_gradient"].values()):
        what = "a dict whose 'natural_gradient' is not {group: {name: value}}"
    elif not all(isinstance(state.get(k, {}), dict) for k in ("base", "base_shapes")) or \
            not isinstance(state.get("skipped", 0), int):
        what = "a dict whose 'base', 'base_shapes' or 'skipped' has another type"
    if what is not None:
        raise ValueError(
            f"NaturalGradient.set_state expects the dict of NaturalGradient.get_state() (keys "
            f"{', '.join(CHECKPOINT_KEYS)}), got {what}; nothing was changed. A Pyro "
            f"optimizer's get_state() (keyed by parameter names) belongs to that optimizer")


def refuse_unnamed_state(optim: PyroOptim) -> None:
    """A ValueError if a parameter that ``optim`` has stepped has no name in the param
    store (a ``PyroModule``'s own parameter under ``module_local_params=True``): its
    state could not be saved under a name and restored to it."""
    store = pyro.get_param_store()
    unnamed = [tuple(p.shape) for p in getattr(optim, "optim_objs", {})
               if store.param_name(p) is None]
    if unnamed:
        raise ValueError(
            f"get_state: {len(unnamed)} parameter(s) taking {optimizer_name(optim)} steps "
            f"(shapes {unnamed[:4]}) have no name in the param store (PyroModule parameters "
            f"under module_local_params=True), so their optimizer state cannot be saved "
            f"under a name and restored to them (Pyro's own optimizers save it under "
            f"None). Checkpoint with module_local_params=False, or give those parameters "
            f"to another optimizer")


def named_shapes(optim: PyroOptim) -> Dict[str, tuple]:
    """``{param store name: shape}`` of the parameters ``optim`` has stepped."""
    store = pyro.get_param_store()
    return {store.param_name(p): tuple(p.shape) for p in getattr(optim, "optim_objs", {})}


def replace_base_state(optim: PyroOptim, state: Dict) -> None:
    """``optim.set_state(state)`` in place of its current state. ``PyroOptim.set_state``
    alone reaches only parameters it has not stepped yet (and merges with pending state):
    a rollback kept the live moments of every parameter already stepped."""
    for attr in ("optim_objs", "grad_clip", "_state_waiting_to_be_consumed"):
        objs = getattr(optim, attr, None)
        if isinstance(objs, dict):
            objs.clear()  # rebuilt at the parameter's next step, from the waiting state
    optim.set_state(state)


def check_base_shapes(shapes) -> None:
    """A ValueError unless each parameter a checkpoint's base-optimizer state was made for
    has that shape in the param store, where it is there already (it steps last: a wrong
    shape raised only after the natural-gradient groups had been written)."""
    store = pyro.get_param_store()._params
    problems = [f"{name!r} has shape {tuple(shape)} there and {tuple(store[name].shape)} here"
                for name, shape in shapes.items()
                if name in store and tuple(store[name].shape) != tuple(shape)]
    if problems:
        raise ValueError(
            f"set_state: the checkpoint's base-optimizer state was made for other parameters "
            f"({'; '.join(problems[:4])}); nothing was restored. Load a checkpoint of this "
            f"model and guide, or start this optimizer afresh")


def group_layout(groups) -> Dict[str, Dict[str, tuple]]:
    """``{group key: {role: shape}}``, what a checkpoint's state was made for (a low-rank
    group's covariance factors included, owned or not)."""
    out = {}
    for key, g in groups.items():
        params = dict(g.params)
        if isinstance(g, LowRankGaussianGroup):
            params.update(cov_factor=g.cov_factor, scale=g.scale_raw)
        out[key] = {role: tuple(p.shape) for role, p in params.items()}
    return out


def check_layout(saved, current, ng_state) -> None:
    """A ValueError unless a checkpoint made for the groups ``saved`` fits ``current``:
    the same shapes for each group both have, no group only the checkpoint has, and, if
    it carries the curvature's running precision (over all the groups' latents), the
    same groups."""
    problems = [f"group {k!r} is not in this guide" for k in saved if k not in current]
    problems += [f"group {k!r} has parameters {dict(saved[k])} there and {dict(current[k])} "
                 f"here" for k in saved if k in current and
                 {r: tuple(v) for r, v in saved[k].items()} != current[k]]
    curvature = ng_state.get("curvature", {})
    if not problems and set(saved) != set(current) and any(
            torch.is_tensor(v) for v in curvature.values()):
        problems.append(f"its curvature state is over groups {sorted(saved)}, and this "
                        f"guide's are {sorted(current)}")
    if problems:
        raise ValueError(
            f"set_state: the checkpoint was made for another guide ({'; '.join(problems)}); "
            f"nothing was restored. Load a checkpoint of this guide, or start this optimizer "
            f"afresh")
