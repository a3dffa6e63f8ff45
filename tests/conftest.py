"""Shared fixtures for the pyro_natgrad test suite.

Set ``PYRO_NATGRAD_TEST_DEVICE=cuda`` to run the whole suite with CUDA as
torch's default device (how the optimizer was checked on a GPU), and
``PYRO_NATGRAD_TEST_SEED_OFFSET=k`` to run it on other draws (``tests/seeding.py``).
"""

import os

import pyro
import pytest
import torch

from tests.seeding import SEED_OFFSET


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    device = os.environ.get("PYRO_NATGRAD_TEST_DEVICE")
    if device:
        torch.set_default_device(device)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # pytest-xdist runs one worker per core (addopts in pyproject.toml): a worker
        # with a thread per core as well would have them fight over the cores.
        torch.set_num_threads(1)
    if SEED_OFFSET:
        manual_seed = torch.manual_seed  # pyro.set_rng_seed calls it too
        torch.manual_seed = lambda seed: manual_seed(seed + SEED_OFFSET)


@pytest.fixture
def rng():
    """Reset the torch and pyro RNGs so that every test is reproducible on its own."""
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    yield


@pytest.fixture
def float64():
    """Use float64 as the default dtype for the duration of one test only."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield torch.float64
    finally:
        torch.set_default_dtype(old)


@pytest.fixture(autouse=True)
def _restore_global_state():
    """Guard against a test (or the library) leaking global torch/pyro state, the
    param store included: an autoguide reads its parameters from the store by name, so
    one test's ``AutoMultivariateNormal.loc`` of size 3 broke a later test's guide of
    11 latents (``tests/test_curvature.py`` then ``tests/test_docs.py``, run alone)."""
    dtype = torch.get_default_dtype()
    validation = pyro.distributions.is_validation_enabled()
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()
    torch.set_default_dtype(dtype)
    pyro.enable_validation(validation)
