"""Step-size schedules for natural-gradient steps.

With exact gradients, a step of 1 on a Gaussian posterior is exact. With
single-sample gradients each step's target is noisy, and a step ``rho`` keeps a
fraction ``rho`` of the new target's noise; decaying ``rho ~ c/t`` turns the
iterates into a weighted running average of the targets, whose noise falls
like ``1/t``. ``c > 1`` weights recent targets more, so early targets (computed
far from the optimum of a non-conjugate model) are forgotten faster.
"""

import math

import torch


class StepSize:
    """``rho_t = clamp(c / (max(t - warmup, 0) + c / initial), floor, initial)`` with
    ``c = decay``: ``initial`` for ``t <= warmup`` (the first ``warmup + 1`` steps, ``t``
    0-based), then decaying like ``c / t``.

    :param float initial: step size of the first steps (1 is exact for a Gaussian
        posterior with exact gradients).
    :param float decay: the ``c`` of ``c/t``; 0 for a constant step.
    :param int warmup: the last ``t`` taken at ``initial`` (``warmup + 1`` steps) before
        the decay starts.
    :param float floor: smallest step size.
    """

    def __init__(self, initial: float = 1.0, decay: float = 2.0, warmup: int = 10,
                 floor: float = 0.0):
        for name, value in (("initial", initial), ("decay", decay), ("warmup", warmup),
                            ("floor", floor)):
            # decay=inf or NaN made every step 0 (a run that never moved, silently)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not math.isfinite(value):
                raise ValueError(f"StepSize: {name} must be a finite number, got {value!r}")
        if not 0 < initial <= 1:
            raise ValueError(f"initial step size must be in (0, 1], got {initial}")
        if decay < 0 or warmup < 0 or not 0 <= floor <= initial:
            raise ValueError("need decay >= 0, warmup >= 0 and 0 <= floor <= initial")
        self.initial, self.decay, self.warmup, self.floor = \
            float(initial), float(decay), warmup, float(floor)

    def __call__(self, t):
        """The step size of step ``t`` (0-based); ``t`` may be a tensor."""
        if self.decay == 0:
            return self.initial if not torch.is_tensor(t) else torch.full_like(t, self.initial)
        k = (t - self.warmup) if not torch.is_tensor(t) else (t - self.warmup).clamp_min(0)
        if not torch.is_tensor(k):
            k = max(k, 0)
        rho = self.decay / (k + self.decay / self.initial)
        if torch.is_tensor(rho):
            return rho.clamp(self.floor, self.initial)
        return min(self.initial, max(self.floor, rho))

    def __repr__(self):
        return (f"StepSize(initial={self.initial}, decay={self.decay}, warmup={self.warmup}, "
                f"floor={self.floor})")


def fraction_taken(used, scheduled):
    """``used / scheduled`` step size, in [0, 1]."""
    used = torch.as_tensor(used, dtype=torch.float64)
    scheduled = torch.as_tensor(scheduled, dtype=torch.float64)
    return (used / scheduled.clamp_min(1e-300)).clamp(0, 1)
