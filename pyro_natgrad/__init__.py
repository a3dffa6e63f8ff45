"""Natural-gradient variational inference for Pyro.

* :mod:`pyro_natgrad.fisher`: closed-form Fisher information matrices, in any
  coordinates, with structured products and solves.
"""

from .fisher import (
    FisherFallbackWarning, FisherOperator, fisher_information, fisher_operator, fisher_solve,
    fisher_vp, register_fisher,
)

__version__ = "0.1.0"

__all__ = [
    "FisherFallbackWarning", "FisherOperator", "fisher_information", "fisher_operator",
    "fisher_solve", "fisher_vp", "register_fisher",
]
