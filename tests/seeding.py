"""Seeded random numbers for test data, on torch's default device, and torch's random
state on every device."""

import os

import torch

#: Added to the seeds of the suite's generators and to every ``torch.manual_seed`` (and
#: so ``pyro.set_rng_seed``) call once conftest.py has run:
#: ``PYRO_NATGRAD_TEST_SEED_OFFSET=k pytest ...`` runs the tests on other draws, to check
#: that their assertions are not tuned to one.
SEED_OFFSET = int(os.environ.get("PYRO_NATGRAD_TEST_SEED_OFFSET", "0"))


def generator(seed: int) -> torch.Generator:
    """A generator seeded with ``seed`` on the default device (see conftest.py), so that
    the suite also runs with CUDA as the default device."""
    return torch.Generator(device=torch.empty(0).device).manual_seed(seed + SEED_OFFSET)


class CPUDraws:
    """Draws from a CPU generator seeded with ``seed``, moved to the default device: the
    same numbers whatever the device, for tests whose premise holds for these draws (a
    singular matrix's Cholesky that used to succeed, an indefinite draw). ``fixed``: the
    same draws at every ``SEED_OFFSET`` too, for data whose properties a test assumes."""

    def __init__(self, seed: int, fixed: bool = False):
        self.generator = torch.Generator().manual_seed(seed + (0 if fixed else SEED_OFFSET))

    def randn(self, *shape, dtype=None) -> torch.Tensor:
        return self._moved(torch.randn(*shape, generator=self.generator, dtype=dtype,
                                       device="cpu"))

    def rand(self, *shape, dtype=None) -> torch.Tensor:
        return self._moved(torch.rand(*shape, generator=self.generator, dtype=dtype,
                                      device="cpu"))

    @staticmethod
    def _moved(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.empty(0).device)


def rng_state():
    """torch's random state: the CPU generator's and, once CUDA is in use, every GPU's."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])
