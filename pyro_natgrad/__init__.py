"""Natural-gradient variational inference for Pyro.

* :class:`NaturalGradient`: the optimizer to pass to ``pyro.infer.SVI``.
* :class:`AmortisedNaturalGradient`: natural-gradient steps for network (amortised)
  guide parameters, through the matrix-free Gauss-Newton Fisher and CG.
* :mod:`pyro_natgrad.fisher`: closed-form Fisher information matrices, in any
  coordinates, with structured products and solves.
* :func:`natural_gradient`: the natural gradient of one distribution's parameters.
"""

from .natural import natural_gradient
from .diagnostics import NaturalGradientWarning
from .optim import NaturalGradient
from .amortised import AmortisedNaturalGradient
from .schedule import StepSize
from .fisher import (
    FisherFallbackWarning, FisherOperator, fisher_information, fisher_operator, fisher_solve,
    fisher_vp, register_fisher,
)

__version__ = "0.1.0"

__all__ = [
    "NaturalGradient", "NaturalGradientWarning", "AmortisedNaturalGradient", "StepSize",
    "natural_gradient",
    "FisherFallbackWarning", "FisherOperator", "fisher_information", "fisher_operator",
    "fisher_solve", "fisher_vp", "register_fisher",
]
