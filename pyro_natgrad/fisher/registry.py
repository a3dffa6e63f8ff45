"""The registry of closed-form Fisher information, in the style of
:func:`torch.distributions.kl.register_kl`.

Usage::

    @register_fisher(MyDistribution)
    def _fisher_my_distribution(d):
        return DiagonalFisher(...)

The function receives a distribution and returns a
:class:`~pyro_natgrad.fisher.operators.FisherOperator` in standard coordinates.
Lookup follows the class hierarchy: a subclass of a registered class uses the
closest registered ancestor in its method resolution order.
"""

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


@lru_cache(maxsize=None)
def _lookup(type_) -> Optional[Callable]:
    for cls in type_.__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def lookup_fisher(type_: Type[Distribution]) -> Optional[Callable]:
    """The registered function for ``type_`` or its closest ancestor, or None."""
    return _lookup(type_)
