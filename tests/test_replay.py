"""The guide's draws under a JIT-compiled ELBO (pyro_natgrad.replay): the gradient
identity that confirms a replayed draw, and the replay itself.

The identity ``dl/ds + c/s = dl/dloc * w`` is checked on gradients from Pyro's own
``Trace_ELBO`` backward pass, which the optimizer does not compute: it must hold for
the draw behind them and fail for any other draw."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoMultivariateNormal, AutoNormal

from pyro_natgrad import NaturalGradient
from pyro_natgrad.replay import TorchRandomState, gradients_match_draw, replay_guide
from tests.seeding import CPUDraws


@pytest.fixture(autouse=True)
def _clean_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def regression(X, y):
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
    s = pyro.sample("s", dist.LogNormal(X.new_zeros(()), 1.0))  # a constrained latent
    # a local latent in a subsampled plate: its loss terms are scaled by 40 / 10
    with pyro.plate("n", X.shape[0], subsample_size=10) as idx:
        b = pyro.sample("b", dist.Normal(X.new_zeros(()), 0.5))
        pyro.sample("y", dist.Normal(X[idx] @ w + b, s), obs=y[idx])


def full_batch_regression(X, y):
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
    s = pyro.sample("s", dist.LogNormal(X.new_zeros(()), 1.0))
    with pyro.plate("n", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w, s), obs=y)


def data(dtype):
    g = CPUDraws(0)
    X = g.randn(40, 3, dtype=dtype)
    return X, X @ torch.tensor([1.0, -2.0, 0.5], dtype=dtype) + g.randn(40, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal])
def test_gradients_confirm_their_own_draw_and_no_other(guide_cls, dtype):
    X, y = data(dtype)
    # AutoContinuous guides cannot subsample: they get the model without the local b
    model = regression if guide_cls is AutoNormal else full_batch_regression
    pyro.set_rng_seed(1)
    guide = guide_cls(model)
    opt = NaturalGradient(guide)
    guide(X, y)
    for _ in range(3):  # move the guide off its initial values (loc 0, equal scales)
        for p in guide.parameters():
            p.grad = None
        Trace_ELBO().loss_and_grads(model, guide, X, y)
        with torch.no_grad():
            for p in guide.parameters():
                p.add_(0.1 * torch.randn_like(p))
    opt._discover()
    for p in guide.parameters():
        p.grad = None
    for r in opt._recorders:
        r.take()
    Trace_ELBO().loss_and_grads(model, guide, X, y)
    own = [rec for r in opt._recorders for rec in r.take()]
    guide(X, y)  # another draw, its gradients never taken
    other = [rec for r in opt._recorders for rec in r.take()]
    assert len(own) == len(other) == 1
    groups = list(opt._groups.values())
    assert len(groups) == (3 if guide_cls is AutoNormal else 1)
    for group in groups:
        grads = group.grads()
        assert gradients_match_draw(group, grads, own[0]), group.key
        assert not gradients_match_draw(group, grads, other[0]), group.key


def test_replay_makes_the_same_draw_and_leaves_the_random_state():
    X, y = data(torch.float64)

    def model(X, y):
        pyro.sample("w", dist.Normal(X.new_zeros(3), 1.0).to_event(1))

    guide = AutoMultivariateNormal(model)
    opt = NaturalGradient(guide)
    guide(X, y)
    for r in opt._recorders:
        r.take()
    start = TorchRandomState(X.device)  # and CUDA's generator, on a GPU
    with poutine.trace() as tr:
        guide(X, y)
    drawn = tr.trace.nodes["_AutoMultivariateNormal_latent"]["value"].detach()
    for r in opt._recorders:
        r.take()
    after = TorchRandomState(X.device)
    records = replay_guide(guide, opt._recorders, start, (X, y), {})
    now = TorchRandomState(X.device)
    assert torch.equal(now.cpu, after.cpu)
    assert after.cuda is None or torch.equal(now.cuda, after.cuda)
    assert len(records) == 1
    assert torch.equal(records[0]["_AutoMultivariateNormal_latent"][0], drawn)
