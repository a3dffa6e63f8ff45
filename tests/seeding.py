"""Seeded random numbers for test data, on torch's default device, and torch's random
state on every device."""

import torch


def generator(seed: int) -> torch.Generator:
    """A generator seeded with ``seed`` on the default device (see conftest.py), so that
    the suite also runs with CUDA as the default device."""
    return torch.Generator(device=torch.empty(0).device).manual_seed(seed)


def rng_state():
    """torch's random state: the CPU generator's and, once CUDA is in use, every GPU's."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])
