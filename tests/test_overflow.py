"""Steps from a huge but finite float32 gradient: the trust region's step, not none.

A Poisson regression ``y ~ Poisson(exp(10 w))`` with the guide's mean at ``w = 5`` has a
rate of ``e^50`` and a gradient of about ``5e22``: finite in float32, its square is not.
The trust region's sizes were sums of such squares, overflowed to inf, and the allowed
step became 0, silently (or, for the low-rank guide's mean, NaN on the second step). The
reference is the same step from the same state in float64, where nothing overflows
(and, for :func:`~pyro_natgrad.gaussian.step_limit`, the closed-form root).
"""

import contextlib
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoDiagonalNormal, AutoLowRankMultivariateNormal, AutoMultivariateNormal, AutoNormal,
    init_to_value,
)

from pyro_natgrad import NaturalGradient, gaussian
from tests.seeding import generator, rng_state, set_rng_state

F32, F64 = torch.float32, torch.float64
MAX_KL = 10.0


@pytest.fixture(autouse=True)
def _clean_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.fixture
def same_draws(monkeypatch):
    """The guide's standard normal (and gamma) draws made in float64 and rounded, so
    that a float32 and a float64 run from one seed draw the same numbers (torch's
    float32 and float64 normal_ differ from 16 elements on)."""
    import torch.distributions.gamma as gamma
    import torch.distributions.lowrank_multivariate_normal as lowrank
    import torch.distributions.multivariate_normal as mvn
    import torch.distributions.normal as normal

    def standard_normal(shape, dtype, device):
        return torch.empty(shape, dtype=F64, device=device).normal_().to(dtype)

    for module in (normal, mvn, lowrank):
        monkeypatch.setattr(module, "_standard_normal", standard_normal)
    monkeypatch.setattr(gamma, "_standard_gamma",
                        lambda c: torch._standard_gamma(c.to(F64)).to(c.dtype))


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def poisson_model(d):
    def model():
        w = pyro.sample("w", dist.Normal(torch.zeros(d), 1.0).to_event(1))
        pyro.sample("y", dist.Poisson(torch.exp(10 * w)).to_event(1), obs=torch.zeros(d))
    return model


def normal_guide(d):
    def guide():
        loc = pyro.param("w_loc", 5 * torch.ones(d))
        scale = pyro.param("w_scale", 0.1 * torch.ones(d), constraint=dist.constraints.positive)
        pyro.sample("w", dist.Normal(loc, scale).to_event(1))
    return guide


def tril_guide(d):
    def guide():
        loc = pyro.param("w_loc", 5 * torch.ones(d))
        L = pyro.param("w_tril", 0.1 * torch.eye(d), constraint=dist.constraints.lower_cholesky)
        pyro.sample("w", dist.MultivariateNormal(loc, scale_tril=L))
    return guide


def autoguide(cls, **kwargs):
    def make(d):
        model = poisson_model(d)
        return cls(model, init_loc_fn=init_to_value(values={"w": 5 * torch.ones(d)}), **kwargs)
    return make


GUIDES = {
    "AutoNormal": autoguide(AutoNormal),
    "AutoDiagonalNormal": autoguide(AutoDiagonalNormal),
    "AutoMultivariateNormal": autoguide(AutoMultivariateNormal),
    "AutoLowRankMultivariateNormal": autoguide(AutoLowRankMultivariateNormal, rank=1),
    "Normal": normal_guide,
    "MultivariateNormal": tril_guide,
}


def one_step(name, curvature, d, dtype):
    """The guide's parameters (float64, constrained) before and after one step."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with default_dtype(dtype):
        model, guide = poisson_model(d), GUIDES[name](d)
        svi = SVI(model, guide, NaturalGradient(guide, curvature=curvature), Trace_ELBO())
        guide()  # the parameters, before the step's draw
        if isinstance(guide, AutoLowRankMultivariateNormal):
            # Pyro draws the factor's start in the guide's dtype, and on a GPU float32's
            # draw is not float64's (on the CPU they agree below 16 elements)
            with torch.no_grad():
                start = torch.randn(guide.cov_factor.shape, dtype=F64,
                                    generator=generator(0), device=guide.cov_factor.device)
                guide.cov_factor.copy_(start)
        store = pyro.get_param_store()
        before = {k: v.detach().to(F64).clone() for k, v in store.items()}
        svi.step()
        after = {k: v.detach().to(F64).clone() for k, v in store.items()}
    return before, after


CASES = [(name, "none", d) for name in GUIDES for d in (3, 100)
         if d == 3 or name in ("AutoNormal", "AutoDiagonalNormal")]
CASES += [(name, "auto", 3) for name in GUIDES if name.startswith("Auto")]


@pytest.mark.filterwarnings("ignore::pyro_natgrad.NaturalGradientWarning")
@pytest.mark.parametrize("name,curvature,d", CASES)
def test_huge_gradient_takes_the_float64_step(same_draws, name, curvature, d):
    """One step from the same state in float32 and float64: the same parameters after
    it (the mean moved by the trust region's step, at most about sqrt(max_kl) sds; in
    float32 it did not move at all). 100 mean-field latents take the fused step's
    leave-one-out control variate, 3 a fixed one."""
    before32, after32 = one_step(name, curvature, d, F32)
    before64, after64 = one_step(name, curvature, d, F64)
    loc = next(k for k in before64 if k.endswith("loc") or k.endswith("locs.w"))
    move64 = after64[loc] - before64[loc]
    assert float(move64.abs().max()) > 0.005, move64  # a step to match
    # Without the model's curvature the low-rank covariance takes Adam's steps, which
    # overflow in float32 too (its second moment is the gradient's square).
    owned = [loc] if (name, curvature) == ("AutoLowRankMultivariateNormal", "none") else before64
    for k in owned:
        torch.testing.assert_close(before32[k], before64[k], rtol=1e-6, atol=1e-7)
        scale = float((after64[k] - before64[k]).abs().max()) + 1e-3
        torch.testing.assert_close(after32[k] - before32[k], after64[k] - before64[k],
                                   rtol=1e-3, atol=1e-3 * scale, msg=f"{name}: {k}")


def gamma_guide():
    a = pyro.param("a", torch.tensor(2.0), constraint=dist.constraints.positive)
    b = pyro.param("b", torch.tensor(1.0), constraint=dist.constraints.positive)
    pyro.sample("lam", dist.Gamma(a, b))


def gamma_model():
    lam = pyro.sample("lam", dist.Gamma(2.0, 1.0))
    pyro.sample("y", dist.Poisson(1e22 * lam), obs=torch.tensor(0.0))


def test_huge_gradient_exponential_family_site(same_draws):
    """A hand-written Gamma site's mirror step (gradients of about 1e22 in float32): the
    float64 step from the same state, not none."""
    runs = {}
    for dtype in (F32, F64):
        pyro.clear_param_store()
        pyro.set_rng_seed(1)
        with default_dtype(dtype):
            svi = SVI(gamma_model, gamma_guide, NaturalGradient(gamma_guide), Trace_ELBO())
            gamma_guide()
            store = pyro.get_param_store()
            before = {k: float(store[k].detach()) for k in ("a", "b")}
            svi.step()
            runs[dtype] = {k: (before[k], float(store[k].detach())) for k in ("a", "b")}
    moved = []
    for k in ("a", "b"):
        (b32, a32), (b64, a64) = runs[F32][k], runs[F64][k]
        assert b32 == b64 and a32 == pytest.approx(a64, rel=1e-4), runs
        moved.append(abs(a64 - b64) / b64)
    assert max(moved) > 0.05, runs  # a step to match (which of a, b moves is the draw's)


def test_step_limit_huge_gradient():
    """:func:`step_limit` in float32 for ``|w|`` and ``|S|`` up to 1e30: the positive root
    of ``rho a (1 + rho b) = k``, ``k = sqrt(max_kl)``, ``2 k / (a + sqrt(a^2 + 4 k a b))``
    computed in float64, where ``a^2`` does not overflow."""
    gen = generator(5)
    w = (torch.randn(200, generator=gen, dtype=F64) * 10 ** (
        torch.rand(200, generator=gen, dtype=F64) * 30)).to(F32)
    S = (torch.randn(200, generator=gen, dtype=F64) * 10 ** (
        torch.rand(200, generator=gen, dtype=F64) * 30)).to(F32)
    limit = gaussian.step_limit(w, S, MAX_KL)
    a, b, k = w.to(F64).abs(), S.to(F64).abs(), math.sqrt(MAX_KL)
    mean = 2 * k / (a + (a.square() + 4 * k * a * b).sqrt())
    expected = torch.minimum(mean, math.sqrt(2) * k / b)
    assert bool((expected > 0).all()) and float(a.max()) > 1e29
    torch.testing.assert_close(limit.to(F64), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("cv", [1.0, None])
def test_fused_step_huge_gradient(cv):
    """The fused AutoNormal step in float32 with whitened gradients of about 1e22: the
    general step in float64 on the same numbers (its trust-region step; the fused one
    took no step at all)."""
    from pyro.distributions.transforms import SoftplusTransform

    n = 500
    gen = generator(7)

    def draw(scale):
        return (scale * torch.randn(n, generator=gen, dtype=F64)).to(F32)

    raw, loc = draw(0.5) - 2, draw(1.0) + 5
    g_loc, g_raw = draw(1e22), draw(1e21)
    scale = SoftplusTransform()(raw)
    sample = loc + scale * draw(1.0)
    out_loc, out_raw = torch.empty_like(loc), torch.empty_like(loc)
    work = [torch.empty(n, dtype=F32) for _ in range(6)]
    previous = draw(1e22)  # the hold test's sample of the last step's w (stride 1 here)
    last = previous.to(F64)
    sums = gaussian.softplus_diagonal_step(loc, raw, g_loc, g_raw, sample, 1.0, MAX_KL,
                                           out_loc, out_raw, work, scale=scale, cv=cv,
                                           previous=previous)
    assert math.isfinite(float(sums.check))
    x = {k: v.to(F64) for k, v in dict(loc=loc, raw=raw, g_loc=g_loc, g_raw=g_raw,
                                        scale=scale, sample=sample).items()}
    eps = (x["sample"] - x["loc"]) / x["scale"]
    g_scale = x["g_raw"] / torch.sigmoid(x["raw"])
    c = gaussian.leave_one_out_cv(x["scale"] * g_scale, eps.square()) if cv is None else cv
    ref = gaussian.diagonal_gaussian_step(x["loc"], x["scale"], x["g_loc"], g_scale, 1.0,
                                          (eps, eps.square()), MAX_KL, cv=c)
    move = ref.loc - x["loc"]
    # nearly every element moves (the few whose gradients are near 0 cannot), so the
    # comparison below fails on a fused step that is not taken
    assert float((move.abs() > 1e-3).double().mean()) > 0.9
    torch.testing.assert_close(out_loc.to(F64) - x["loc"], move, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(SoftplusTransform()(out_raw).to(F64), ref.scale_tril,
                               rtol=1e-4, atol=0)
    torch.testing.assert_close(float(sums.taken), float(ref.rho.sum()), rtol=1e-4, atol=0)
    # the hold test's sums (they overflowed to inf, and the step-size clock advanced)
    w = x["scale"] * x["g_loc"] - c * eps
    assert gaussian.hold_stride(n) == 1
    torch.testing.assert_close(float(sums.norm2), float(w @ w), rtol=1e-4, atol=0)
    torch.testing.assert_close(float(sums.agreement), float(w @ last), rtol=1e-3, atol=0)


def test_batched_full_step_huge_gradient():
    """:func:`full_gaussian_step` over a batch of Gaussians in float32 with gradients of
    about 1e22: the float64 step on the same numbers."""
    gen = generator(9)
    batch, d = 4, 3

    def draw(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=F64)).to(F32)

    loc = draw(batch, d)
    L = (0.1 * torch.eye(d, dtype=F64) + 0.01 * draw(batch, d, d).to(F64).tril()).to(F32)
    g_loc, G = draw(batch, d, scale=1e22), draw(batch, d, d, scale=1e21).tril()
    step32 = gaussian.full_gaussian_step(loc, L, g_loc, G, 1.0, None, MAX_KL)
    step64 = gaussian.full_gaussian_step(*(t.to(F64) for t in (loc, L, g_loc, G)), 1.0, None,
                                         MAX_KL)
    move = step64.loc - loc.to(F64)
    assert float(move.abs().max()) > 1e-3
    torch.testing.assert_close(step32.loc.to(F64) - loc.to(F64), move, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(step32.scale_tril.to(F64), step64.scale_tril, rtol=1e-3,
                               atol=1e-6)
    torch.testing.assert_close(step32.rho.to(F64), step64.rho, rtol=1e-4, atol=0)


@pytest.mark.filterwarnings("ignore::pyro_natgrad.NaturalGradientWarning")
@pytest.mark.parametrize("name", ["AutoNormal", "AutoLowRankMultivariateNormal"])
def test_a_newton_step_that_overflows_changes_nothing_and_steps_from_gradients(name):
    """float32, the model's Hessian (the default), then one gradient of 3e38 on the means
    (finite): the Newton step's output overflows. It raised FloatingPointError ("this is
    a bug") after storing its running precision. Now nothing of it is kept (the running
    precision is bit for bit the one before) and the step is the gradient-only one,
    whose trust region keeps every parameter finite. (The low-rank guide's mean step
    from gradients alone overflowed too, in Sigma g: it now moves the mean.)"""
    from pyro.infer.autoguide import AutoLowRankMultivariateNormal as LowRank

    g = generator(3)
    with default_dtype(F32):
        X = torch.randn(3, 3, generator=g)
        y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.5 * torch.randn(3, generator=g)

        def model():
            w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
            with pyro.plate("data", 3):
                pyro.sample("y", dist.Normal(X @ w, 0.5), obs=y)

        pyro.set_rng_seed(0)
        guide = AutoNormal(model, init_scale=10.0) if name == "AutoNormal" else \
            LowRank(model, init_scale=10.0, rank=1)
        opt = NaturalGradient(guide)
        svi = SVI(model, guide, opt, Trace_ELBO())
        svi.step()
        precision = opt.get_state()["natural_gradient"]["curvature"]["precision"]
        loc = guide.locs.w_unconstrained if name == "AutoNormal" else guide.loc
        hook = loc.register_hook(lambda grad: torch.full_like(grad, 3e38))
        before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
        svi.step()
        hook.remove()
        after = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    assert torch.equal(opt.get_state()["natural_gradient"]["curvature"]["precision"], precision)
    assert all(bool(torch.isfinite(v).all()) for v in after.values())
    if name != "AutoNormal":  # (its whitened gradient, scale * 3e38, is inf: no step)
        key = next(k for k in before if k.endswith(".loc"))
        assert not torch.equal(before[key], after[key])


def _factor_model(k, n=2):
    w = pyro.sample("w", dist.Normal(torch.zeros(n), 1.0).to_event(1))
    pyro.factor("f", -k * w.sum())  # dl/dw = k: finite in float32 below 3.4e38


def _subsampled_model(k, n=8):
    with pyro.plate("items", n, subsample_size=4) as idx:
        w = pyro.sample("w", dist.Normal(torch.zeros(len(idx)), 1.0))
        pyro.factor("f", -k * w.sum())


def _tril_guide(k, n=2):
    loc = pyro.param("loc", torch.zeros(n))
    L = pyro.param("L", 30 * torch.eye(n), constraint=dist.constraints.lower_cholesky)
    pyro.sample("w", dist.MultivariateNormal(loc, scale_tril=L))


@pytest.mark.parametrize("case", ["full-rank", "full-rank none", "subsampled",
                                  "hand-written tril"])
def test_a_step_that_overflows_is_skipped_with_a_warning(case):
    """A finite gradient of 1e36 times a factor of scale 30 overflows the full-rank step's
    products (``L^T g``): the step was NaN and the run died with a FloatingPointError that
    called itself a bug (after 66 skipped NaN losses, a float32 Poisson regression from
    ``init_scale=30`` met its first finite gradient, 2.7e38, so). Now that group's step is
    skipped and counted, with a warning, and every parameter keeps its value bit for bit;
    the next step with a moderate gradient goes on."""
    model, guide, curvature = {
        "full-rank": (_factor_model, AutoMultivariateNormal(_factor_model, init_scale=30.0),
                      "auto"),
        "full-rank none": (_factor_model,
                           AutoMultivariateNormal(_factor_model, init_scale=30.0), "none"),
        "subsampled": (_subsampled_model, AutoNormal(_subsampled_model, init_scale=30.0),
                       "none"),
        "hand-written tril": (_factor_model, _tril_guide, "auto"),
    }[case]
    pyro.set_rng_seed(0)
    svi = SVI(model, guide, NaturalGradient(guide, curvature=curvature), Trace_ELBO())
    svi.step(1.0)  # creates the parameters
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    with pytest.warns(UserWarning, match="skipped"):
        svi.step(1e36)
    for k, v in pyro.get_param_store().items():
        assert torch.equal(v.detach(), before[k]), k
    svi.step(1.0)
    assert any(not torch.equal(v.detach(), before[k])
               for k, v in pyro.get_param_store().items())


def _two_site_model(X, y):
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w + a, 0.5), obs=y)


def test_an_hvp_step_that_overflows_in_one_group_writes_no_group():
    """``curvature="hvp"`` steps every mean-field group as one Newton step. When one
    group's variance step overflowed (a scale gradient of 3e38 in float32), the groups
    before it had been written with the Newton mean, the rest not. Now the step falls
    back to the gradient-only steps of ``curvature="none"``, which skip the overflowing
    group: the other group's values equal those of a ``"none"`` optimizer's first step
    from the same state and draws, bit for bit, and the Newton step's state is
    unchanged."""
    gen = generator(3)
    X = torch.randn(5, 3, generator=gen)
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.5 * torch.randn(5, generator=gen)
    pyro.set_rng_seed(0)
    guide = AutoNormal(_two_site_model, init_scale=10.0)
    opt = NaturalGradient(guide, curvature="hvp")
    svi = SVI(_two_site_model, guide, opt, Trace_ELBO())
    svi.step(X, y)
    curvature_before = dict(opt.get_state()["natural_gradient"]["curvature"])
    store = pyro.get_param_store()
    before = {k: v.detach().clone() for k, v in store.items()}
    raw = {k: v.unconstrained().detach().clone() for k, v in store.items()}
    rng = rng_state()

    def overflowing_step(svi):
        set_rng_state(rng)
        hook = guide.scales.w_unconstrained.register_hook(lambda g: torch.full_like(g, 3e38))
        try:
            with pytest.warns(UserWarning, match="overflowed"):
                svi.step(X, y)
        finally:
            hook.remove()
        return {k: v.detach().clone() for k, v in store.items()}

    after = overflowing_step(svi)
    assert torch.equal(after["AutoNormal.locs.w"], before["AutoNormal.locs.w"])
    assert torch.equal(after["AutoNormal.scales.w"], before["AutoNormal.scales.w"])
    curvature_after = opt.get_state()["natural_gradient"]["curvature"]
    assert curvature_after["t"] == curvature_before["t"]
    with torch.no_grad():
        for k, v in store.items():
            v.unconstrained().copy_(before[k])
    opt.detach()  # the first optimizer's hooks off the guide
    none = SVI(_two_site_model, guide, NaturalGradient(guide, curvature="none"), Trace_ELBO())
    none.step(X, y)  # reads the guide, so that its next step records the draws too
    with torch.no_grad():
        for k, v in store.items():
            v.unconstrained().copy_(raw[k])
    reference = overflowing_step(none)  # at rho = 1 still (the first 11 steps)
    assert not torch.equal(reference["AutoNormal.locs.a"], before["AutoNormal.locs.a"])
    for k in ("AutoNormal.locs.a", "AutoNormal.scales.a"):
        assert torch.equal(after[k], reference[k]), k
