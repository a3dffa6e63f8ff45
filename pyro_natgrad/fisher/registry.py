"""The registry of closed-form Fisher information, in the style of
:func:`torch.distributions.kl.register_kl`.

Usage::

    @register_fisher(MyDistribution)
    def _fisher_my_distribution(d):
        return DiagonalFisher(...)

The function receives a distribution and returns a
:class:`~pyro_natgrad.fisher.operators.FisherOperator` in standard coordinates.
Lookup follows the class hierarchy, but only through subclasses with the same
parameters (see :func:`same_parameters`): a KL divergence survives a change of
parameterisation, a Fisher matrix does not (``Chi2(df)`` is a ``Gamma``, but its
Fisher is ``1 x 1`` over ``df``, not ``2 x 2`` over ``(concentration, rate)``).
"""

import inspect
import warnings
from functools import lru_cache
from typing import Callable, Optional, Type

from torch.distributions import Distribution

_REGISTRY = {}


def register_fisher(type_: Type[Distribution]):
    """Decorator registering a closed-form Fisher information for ``type_``.

    :param type_: a subclass of :class:`torch.distributions.Distribution`.
    """
    if not (isinstance(type_, type) and issubclass(type_, Distribution)):
        raise TypeError(f"register_fisher expects a Distribution subclass, got {type_!r}")

    def decorator(fn: Callable):
        _REGISTRY[type_] = fn
        _lookup.cache_clear()
        return fn

    return decorator


def same_parameters(sub: type, ancestor: type) -> bool:
    """Whether ``sub`` is parameterised like ``ancestor``, so that the ancestor's
    Fisher (over the ancestor's constructor arguments) is the subclass's too.

    True when every name in ``sub.arg_constraints`` is one of the ancestor's and is
    an argument of ``sub.__init__`` (pyro's wrappers of torch classes, ``ExtendedBinomial``,
    ``OMTMultivariateNormal(loc, scale_tril)``). False for ``Chi2(df)`` under ``Gamma``,
    ``OrderedLogistic(predictor, cutpoints)`` under ``Categorical``, or a
    ``Normal`` subclass built from ``(loc, precision)``. A subclass whose law depends
    on arguments outside ``arg_constraints`` cannot be told apart: register it.
    """
    if sub is ancestor:
        return True
    sub_args, anc_args = _class_arg_constraints(sub), _class_arg_constraints(ancestor)
    if sub_args is None or anc_args is None:
        return False  # arg_constraints is a property: cannot check at class level
    if not set(sub_args) <= set(anc_args):
        return False
    params = inspect.signature(sub.__init__).parameters.values()
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return True  # forwards its arguments; names cannot be checked
    return set(sub_args) <= {p.name for p in params}


def _class_arg_constraints(cls):
    """``cls.arg_constraints`` when it is a plain dict on the class, else None."""
    for klass in cls.__mro__:
        if "arg_constraints" in vars(klass):
            value = vars(klass)["arg_constraints"]
            return value if isinstance(value, dict) else None
    return None


def inherited(registry: dict, type_: type):
    """``registry[cls]`` for the closest ``cls`` in ``type_``'s MRO, provided ``type_``
    has the same parameters as ``cls`` (:func:`same_parameters`); else None. Where
    ``type_`` also inherits another registration, not ``cls``'s own ancestor's (a class
    deriving from two registered families), it warns once, as ``register_kl`` does for
    an ambiguous pair: the MRO's choice may not be the one meant."""
    for cls in type_.__mro__:
        if cls in registry:
            rivals = [c.__name__ for c in type_.__mro__ if c in registry and c is not cls
                      and not issubclass(cls, c) and registry[c] is not registry[cls]]
            if rivals and (id(registry), type_) not in _WARNED_AMBIGUOUS:
                _WARNED_AMBIGUOUS.add((id(registry), type_))
                warnings.warn(
                    f"{type_.__name__} inherits registrations of both {cls.__name__} and "
                    f"{', '.join(rivals)}; {cls.__name__}'s is used (first in its method "
                    f"resolution order). Register {type_.__name__} itself to choose.",
                    RuntimeWarning)
            return registry[cls] if same_parameters(type_, cls) else None
    return None


_WARNED_AMBIGUOUS = set()


@lru_cache(maxsize=None)
def _lookup(type_) -> Optional[Callable]:
    return inherited(_REGISTRY, type_)


def lookup_fisher(type_: Type[Distribution]) -> Optional[Callable]:
    """The registered function for ``type_`` or an ancestor with the same parameters
    (:func:`same_parameters`), or None."""
    return _lookup(type_)
