"""AmortisedNaturalGradient on unusual guides and runs: JIT-compiled ELBOs over changing
batches, parameters the model reads too, families whose parameters a distribution keeps
inside another object (Beta, LogNormal), sites with no registered Fisher, batch
normalisation, checkpoints, and a second optimizer on the same guide."""

import copy
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO
from pyro.infer.autoguide import AutoGuide, AutoGuideList, AutoNormal
from pyro.nn import PyroModule

from pyro_natgrad import NaturalGradient, NaturalGradientWarning
from pyro_natgrad.amortised import AmortisedNaturalGradient
from tests.seeding import rng_state, set_rng_state

hessian = torch.autograd.functional.hessian


# Seeded; conftest clears the param store around every test.
pytestmark = pytest.mark.usefixtures("rng")


def quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


# ---- an encoder of one input: z_n ~ Normal(a x_n + b, exp(c x_n + d)) ---------------------
class Encoder(torch.nn.Module):
    def __init__(self, family="Normal", batchnorm=False):
        super().__init__()
        self.layer = torch.nn.Linear(1, 2)
        self.family = family
        self.norm = torch.nn.BatchNorm1d(1) if batchnorm else None

    def forward(self, x, y=None):
        pyro.module("enc", self)
        h = x[:, None] if self.norm is None else self.norm(x[:, None])
        out = self.layer(h)
        q = getattr(dist, self.family)(out[:, 0], out[:, 1].exp())
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", q)


def normal_model(x, y=None):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(z, 0.5), obs=x if y is None else y)


def _encoder_fisher(guide, params, x):
    """``sum_n J_n^T F_n J_n`` by autograd: ``J_n`` the Jacobian of the n-th site's
    ``(loc, scale)`` in the flat ``params``, ``F_n = diag(1/scale^2, 2/scale^2)``."""
    names = {p: n for n, p in guide.named_parameters()}
    shapes = [p.shape for p in params]
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def loc_scale(flat):
        values, pos = {}, 0
        for p, shape in zip(params, shapes):
            values[names[p]] = flat[pos:pos + shape.numel()].reshape(shape)
            pos += shape.numel()
        out = torch.func.functional_call(guide.layer, {k.split(".")[-1]: v
                                                       for k, v in values.items()}, x[:, None])
        return out[:, 0], out[:, 1].exp()

    J_loc, J_scale = torch.autograd.functional.jacobian(loc_scale, theta)
    w = loc_scale(theta)[1].square()[:, None]
    return J_loc.T @ (J_loc / w) + 2 * J_scale.T @ (J_scale / w)


def test_jit_steps_take_the_curvature_at_the_batch_being_stepped(float64):
    """Under ``JitTrace_ELBO`` the compiled graph runs no hooks, so the arguments the
    optimizer saw were those of the first (tracing) step: every later step built ``G`` from
    the first batch, silently. After each step the optimizer's ``G`` must be the Fisher at
    that step's batch (a local-latent encoder's ``G`` depends on the batch alone)."""
    guide = Encoder()
    optim = AmortisedNaturalGradient(guide)
    svi = SVI(normal_model, guide, optim, JitTrace_ELBO())
    for i in range(4):
        x = torch.randn(20) * (1 + i) + i
        quiet(svi.step, x, 2 * x)
        G = optim.operator()
        torch.testing.assert_close(G.dense(), _encoder_fisher(guide, G.params, x),
                                   rtol=1e-10, atol=1e-10)


def test_a_guide_parameter_the_model_reads_too_goes_to_the_other_optimizer(float64):
    """``a`` is the model's offset and nudges the guide's loc by ``1e-3 a``. ``G`` sees only
    that nudge, and the damped solve moved ``a`` by ``g / lambda``: 0.08, 0.93, 7.4, -158.
    It takes the other optimizer's steps (Adam at lr 0.01: 0.01 a step, towards 3)."""
    N = 100
    x = torch.randn(N)
    y = 2 * x + 3.0 + 0.3 * torch.randn(N)

    class Nudged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

        def forward(self, x, y):
            pyro.module("enc", self)
            out = self.layer(torch.stack([x, y], -1))
            loc = out[:, 0] + 1e-3 * pyro.param("a", torch.tensor(0.0))
            with pyro.plate("data", N):
                pyro.sample("z", dist.Normal(loc, out[:, 1].exp()))

    def model(x, y):
        a = pyro.param("a", torch.tensor(0.0))
        with pyro.plate("data", N):
            z = pyro.sample("z", dist.Normal(2 * x, 1.0))
            pyro.sample("y", dist.Normal(z + a, 0.3), obs=y)

    guide = Nudged()
    optim = AmortisedNaturalGradient(guide)
    svi = SVI(model, guide, optim, Trace_ELBO())
    with pytest.warns(NaturalGradientWarning, match="the model reads too"):
        svi.step(x, y)
    path = [float(pyro.param("a").detach())]
    for _ in range(9):
        quiet(svi.step, x, y)
        path.append(float(pyro.param("a").detach()))
    routes = optim.routing()
    assert routes["a"] == "other optimizer (Adam)", routes
    assert routes["enc$$$layer.weight"] == "natural gradient (GGN)", routes
    steps = torch.tensor(path).diff().abs()
    assert 0 < path[0] <= 0.0101 and steps.max() <= 0.0101, path  # Adam's steps of lr 0.01


def _kl_hessian(family, v0):
    """The Hessian in ``v`` of ``sum KL(q_v0 || q_v)`` at ``v0``, where ``q_v`` is the
    family's distribution with arguments ``(v[0], exp(v[1]))`` (Beta: ``exp`` of both)."""
    def make(v):
        if family == "Beta":
            return dist.Beta(v[0].exp(), v[1].exp())
        return dist.LogNormal(v[0], v[1].exp())

    q0 = make(v0)
    return hessian(lambda v: torch.distributions.kl_divergence(q0, make(v)), v0)


@pytest.mark.parametrize("family", ["Beta", "LogNormal"])
def test_beta_and_lognormal_sites_take_steps_with_their_fisher(float64, family):
    """Beta keeps its arguments in a Dirichlet and LogNormal in its base Normal, so the
    routing found no parameter reaching them: all went to Adam. ``G`` must equal the
    Hessian of the KL divergence (autograd, an independent route)."""
    class Site(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.v = torch.nn.Parameter(torch.tensor([0.3, -0.2]))

        def forward(self):
            pyro.module("site", self)
            first = self.v[0].exp() if family == "Beta" else self.v[0]
            pyro.sample("z", getattr(dist, family)(first, self.v[1].exp()))

    def model():
        pyro.sample("z", getattr(dist, family)(torch.tensor(1.5), torch.tensor(2.0)))

    guide = Site()
    optim = AmortisedNaturalGradient(guide)
    svi = SVI(model, guide, optim, Trace_ELBO())
    with warnings.catch_warnings():
        warnings.simplefilter("error", NaturalGradientWarning)  # nothing goes to Adam
        svi.step()
    assert optim.routing() == {"site$$$v": "natural gradient (GGN)"}
    assert optim.last_step.taken
    G = optim.operator().dense()
    expected = _kl_hessian(family, guide.v.detach().clone())
    torch.testing.assert_close(G, expected, rtol=1e-10, atol=1e-12)


def test_a_site_without_a_fisher_sends_its_parameters_to_the_other_optimizer(float64):
    """A Cauchy site has no registered Fisher: the step raised NotImplementedError after
    the other optimizer had stepped the model's parameter. Its parameters now take the
    other optimizer's steps, as the warning says."""
    def model(x):
        w = pyro.param("w", torch.tensor(1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(w * z, 0.5), obs=x)

    x = torch.randn(10)
    guide = Encoder("Cauchy")
    optim = AmortisedNaturalGradient(guide)
    svi = SVI(model, guide, optim, Trace_ELBO())
    before = [p.detach().clone() for p in guide.parameters()]
    with pytest.warns(NaturalGradientWarning, match="no registered Fisher"):
        svi.step(x)
    assert set(optim.routing().values()) == {"other optimizer (Adam)"}
    for p, p0 in zip(guide.parameters(), before):  # one Adam step: lr 0.01 per element
        assert torch.allclose((p.detach() - p0).abs(), torch.full_like(p0, 0.01), rtol=1e-6)


def test_batch_normalisation_in_training_mode_is_refused_before_anything_changes(float64):
    """Each replay of the guide updated the running statistics again (4 updates for one
    step), and torch.func then raised an in-place error from deep inside. The error
    names the fix, and the statistics and parameters are those of the ELBO's one call."""
    x = torch.randn(30) + 5
    guide = Encoder(batchnorm=True)
    optim = AmortisedNaturalGradient(guide)
    svi = SVI(normal_model, guide, optim, Trace_ELBO())
    params = [p.detach().clone() for p in guide.parameters()]
    with pytest.raises(RuntimeError, match=r"BatchNorm1d.*eval\(\) mode"):
        quiet(svi.step, x)
    assert int(guide.norm.num_batches_tracked) == 1
    torch.testing.assert_close(guide.norm.running_mean, 0.1 * x.mean().reshape(1))
    assert all(torch.equal(p, p0) for p, p0 in zip(guide.parameters(), params))
    # The refused step's gradients and draws are gone: they were kept, and the next
    # step, after the fix, stepped on the sum of two steps' gradients.
    assert all(p.grad is None for p in guide.parameters()) and optim._draws == []
    guide.norm.eval()
    quiet(svi.step, x)
    assert optim.last_step.taken


# ---- checkpoints ------------------------------------------------------------------------
def shifted_model(x):
    w = pyro.param("w", torch.ones(2))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(w.sum() * z, 0.5), obs=x)


def _store():
    """The unconstrained values in the param store (the encoder's weights among them)."""
    return {k: v.detach().clone() for k, v in pyro.get_param_store()._params.items()}


def _three_steps():
    """``(x, guide, optimizer, svi)`` after three steps on :func:`shifted_model`."""
    x = torch.randn(10)
    guide = Encoder()
    optim = AmortisedNaturalGradient(guide)
    svi = SVI(shifted_model, guide, optim, Trace_ELBO())
    for _ in range(3):
        quiet(svi.step, x)
    return x, guide, optim, svi


def test_a_checkpoint_restored_twice_into_the_live_optimizer_repeats_the_run(float64):
    """``set_state`` kept the checkpoint's tensors (the other optimizer's moments), which
    the resumed run then changed in place, and Pyro's ``set_state`` does not reach
    parameters it has already stepped: a rollback of the live optimizer did not repeat
    the run. Both resumed runs must equal the uninterrupted one to the last bit."""
    x, guide, optim, svi = _three_steps()
    state, params = copy.deepcopy(optim.get_state()), _store()
    rng = rng_state()  # the CPU generator's and, on a GPU, CUDA's (Pyro's is the CPU's)
    finals = []
    for _ in range(3):  # the uninterrupted run, then two rollbacks of the live optimizer
        for _ in range(4):
            quiet(svi.step, x)
        finals.append(_store())
        with torch.no_grad():
            for name, value in params.items():
                pyro.get_param_store()._params[name].copy_(value)
        optim.set_state(state)
        set_rng_state(rng)
    for final in finals[1:]:
        assert final.keys() == finals[0].keys()
        assert all(torch.equal(final[k], finals[0][k]) for k in final)


def test_foreign_checkpoints_are_refused_and_leave_the_run_as_it_was(float64):
    """A Pyro optimizer's state was taken as a checkpoint (and reset the step count); one
    of a model whose ``w`` has 2 elements was accepted for one with 3, and every step then
    failed inside torch's Adam."""
    x, guide, optim, svi = _three_steps()
    t = optim.t
    with pytest.raises(ValueError, match="not a checkpoint"):
        optim.set_state(pyro.optim.Adam({"lr": 0.1}).get_state())
    assert optim.t == t
    state = optim.get_state()

    pyro.clear_param_store()
    guide = Encoder()

    def wider(x):
        w = pyro.param("w", torch.ones(3))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(w.sum() * z, 0.5), obs=x)

    optim = AmortisedNaturalGradient(guide)
    optim.set_state(state)  # "w" is not in the store yet: checked at the step
    svi = SVI(wider, guide, optim, Trace_ELBO())
    with torch.no_grad():
        Trace_ELBO().loss(wider, guide, x)  # creates the parameters
    params = _store()
    with pytest.raises(ValueError, match=r"'w' has shape \(2,\) there and \(3,\) here"):
        quiet(svi.step, x)
    assert all(torch.equal(v, params[k]) for k, v in _store().items())
    assert optim.t == 0.0
    quiet(svi.step, x)  # the refused checkpoint is gone: a fresh start
    assert optim.last_step.taken and math.isfinite(optim.t)


def test_a_second_optimizer_on_the_same_guide_takes_over_with_a_warning(float64):
    """Both optimizers' hooks traced each call, nested in the wrong order: Pyro raised
    "This Messenger is not on the bottom of the stack" (re-running a notebook cell)."""
    x = torch.randn(30)
    guide = Encoder()
    quiet(SVI(normal_model, guide, AmortisedNaturalGradient(guide), Trace_ELBO()).step, x)
    with pytest.warns(NaturalGradientWarning, match="takes over"):
        optim = AmortisedNaturalGradient(guide)
    svi = SVI(normal_model, guide, optim, Trace_ELBO())
    quiet(svi.step, x)
    assert optim.last_step.taken


def test_a_parameter_behind_an_argument_outside_the_fisher_goes_to_the_other_optimizer(
        float64):
    """A negative binomial site whose ``total_count`` a layer learns: ``G`` covers only its
    ``logits`` and took ``total_count`` as fixed, so the layer's steps along it were
    ``g / lambda``. The layer goes to ``other_optimizer``; one that feeds only the logits
    keeps its GGN steps; a ``GuideGGN`` built over the first is refused."""
    from pyro_natgrad.amortised import GuideGGN

    class Counts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.for_logits = torch.nn.Linear(1, 1)
            self.for_count = torch.nn.Linear(1, 1)

        def forward(self, x):
            pyro.module("counts", self)
            logits = self.for_logits(x[:, None]).squeeze(-1)
            total = self.for_count(x[:, None]).squeeze(-1).exp()
            with pyro.plate("data", x.shape[0]):
                pyro.sample("k", dist.NegativeBinomial(total, logits=logits))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("k", dist.Poisson(torch.full_like(x, 3.0)))

    x = torch.randn(12)
    guide = Counts()
    optim = AmortisedNaturalGradient(guide)
    with pytest.warns(NaturalGradientWarning, match="for_count"):
        SVI(model, guide, optim, Trace_ELBO()).step(x)
    routes = optim.routing()
    assert routes["counts$$$for_count.weight"] == "other optimizer (Adam)", routes
    assert routes["counts$$$for_logits.weight"] == "natural gradient (GGN)", routes
    with pytest.raises(ValueError, match="'total_count' depends on the parameters"):
        GuideGGN(optim._runner, [guide.for_count.weight],
                 {guide.for_count.weight: ("module", "for_count.weight")},
                 [optim._fresh_draw()], (x,))


class _PartEncoder(AutoGuide):
    """An amortised part beside an ``AutoNormal`` one: ``z_i ~ N(a x_i + b, e^(c x_i + d))``."""

    def __init__(self, model):
        super().__init__(poutine.block(model, expose=["z"]))
        self.loc = PyroModule[torch.nn.Linear](1, 1)
        self.log_scale = PyroModule[torch.nn.Linear](1, 1)

    def forward(self, x):
        if self.prototype_trace is None:
            self._setup_prototype(x)
        with self._create_plates(x)["data"]:
            u = x.unsqueeze(-1)
            pyro.sample("z", dist.Normal(self.loc(u).squeeze(-1),
                                         self.log_scale(u).squeeze(-1).exp()))
        return {}


def _global_and_local(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("y", dist.Normal(z, 0.5), obs=x)


def _composed():
    guide = AutoGuideList(_global_and_local)
    guide.append(AutoNormal(poutine.block(_global_and_local, expose=["mu"])))
    guide.append(_PartEncoder(_global_and_local))
    amortised = AmortisedNaturalGradient(guide)
    optim = NaturalGradient(guide, base_optimizer=amortised)
    return guide, amortised, optim, SVI(_global_and_local, guide, optim, Trace_ELBO())


def test_a_composed_optimizer_refuses_a_foreign_base_state_whole(float64):
    """``NaturalGradient(base_optimizer=AmortisedNaturalGradient)`` given the checkpoint of
    a ``NaturalGradient`` with Adam as its base: the amortised optimizer refuses its share,
    and the natural gradient's clocks had already been replaced by then (0.25 -> 0.10).
    Now the base's share is applied first, and a refusal leaves both as they were."""
    x = torch.randn(20) + 1.5
    guide, amortised, optim, svi = _composed()
    for _ in range(6):
        quiet(svi.step, x)
    before = optim.get_state()
    pyro.clear_param_store()
    other = AutoGuideList(_global_and_local)
    other.append(AutoNormal(poutine.block(_global_and_local, expose=["mu"])))
    other.append(_PartEncoder(_global_and_local))
    adam_based = NaturalGradient(other)
    other_svi = SVI(_global_and_local, other, adam_based, Trace_ELBO())
    for _ in range(3):
        quiet(other_svi.step, x)
    with pytest.raises(ValueError):
        optim.set_state(adam_based.get_state())
    after = optim.get_state()
    for key, value in before["natural_gradient"].items():
        for name, v in value.items():
            w = after["natural_gradient"][key][name]
            assert torch.equal(v, w) if torch.is_tensor(v) else v == w, (key, name)


def test_a_refused_composed_step_drops_the_base_optimizers_draws_too(float64):
    """A step ``NaturalGradient`` refuses (a loss that is not the KL ELBO) dropped its own
    gradients and draws but not its amortised base optimizer's: its next step built its
    curvature from the refused step's draws too."""
    x = torch.randn(20) + 1.5
    guide, amortised, optim, svi = _composed()
    quiet(svi.step, x)
    renyi = SVI(_global_and_local, guide, optim, pyro.infer.RenyiELBO())
    with pytest.raises(ValueError, match="RenyiELBO"):
        quiet(renyi.step, x)
    assert amortised._draws == []
    assert all(p.grad is None for p in guide.parameters())


class _NormalisedPartEncoder(_PartEncoder):
    """:class:`_PartEncoder` with a batch normalisation of its input (training mode)."""

    def __init__(self, model):
        super().__init__(model)
        self.bn = torch.nn.BatchNorm1d(1)

    def forward(self, x):
        return super().forward(self.bn(x.unsqueeze(-1)).squeeze(-1))


def test_a_step_the_amortised_base_optimizer_refuses_is_refused_whole(float64):
    """With ``AmortisedNaturalGradient`` as ``NaturalGradient``'s base optimizer, the base
    refused (a BatchNorm in training mode) only after the natural-gradient groups had
    stepped: the ``AutoNormal`` part moved and its clock ran. Its checks now run first
    (``check_step``): nothing moves, the gradients are dropped, and after the fix (eval
    mode) the run steps."""
    x = torch.randn(20) + 1.5
    guide = AutoGuideList(_global_and_local)
    guide.append(AutoNormal(poutine.block(_global_and_local, expose=["mu"])))
    guide.append(_NormalisedPartEncoder(_global_and_local))
    guide[1].bn.eval()
    amortised = AmortisedNaturalGradient(guide)
    optim = NaturalGradient(guide, base_optimizer=amortised)
    svi = SVI(_global_and_local, guide, optim, Trace_ELBO())
    quiet(svi.step, x)
    guide[1].bn.train()
    store = pyro.get_param_store()
    before = {k: v.unconstrained().detach().clone() for k, v in store.items()}
    clocks = {k: v["t"] for k, v in optim.get_state()["natural_gradient"].items()}
    with pytest.raises(RuntimeError, match="BatchNorm1d"):
        quiet(svi.step, x)
    assert all(torch.equal(v.unconstrained(), before[k]) for k, v in store.items())
    assert {k: v["t"] for k, v in optim.get_state()["natural_gradient"].items()} == clocks
    assert all(p.grad is None for p in guide.parameters())
    guide[1].bn.eval()
    quiet(svi.step, x)
    assert not torch.equal(store["AutoGuideList.0.locs.mu"].detach(),
                           before["AutoGuideList.0.locs.mu"])
