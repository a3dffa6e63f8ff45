"""Fisher library checks beyond the cross-check table: NegativeBinomial against exact sums,
and regressions."""

import decimal

import pytest
import torch
import pyro.distributions as dist

from pyro_natgrad.fisher import fisher_information, fisher_operator


def _exact_fisher(r, param, name):
    """E[s^2] by summing over k = 0..K-1, the score by autograd through torch's log_prob
    (one leaf copy of the parameter per k gives every score in one backward pass)."""
    k = torch.arange(0, 1500, dtype=torch.float64)
    theta = param.detach().expand(k.shape).clone().requires_grad_()
    logp = dist.NegativeBinomial(r, **{name: theta}).log_prob(k)
    (scores,) = torch.autograd.grad(logp.sum(), theta)
    probs = logp.detach().exp()
    assert abs(float(probs.sum()) - 1) < 1e-10  # the truncation loses nothing
    return float((probs * scores.square()).sum())


@pytest.mark.parametrize("name,value", [("probs", 0.3), ("probs", 0.8), ("logits", -1.0),
                                        ("logits", 0.7)])
@pytest.mark.parametrize("r", [0.5, 3.0, 20.0])
def test_negative_binomial_matches_exact_sum(name, value, r):
    param = torch.tensor(value, dtype=torch.float64)
    d = dist.NegativeBinomial(torch.tensor(r, dtype=torch.float64), **{name: param})
    F = fisher_information(d)
    assert F.shape == (1, 1)
    assert float(F) == pytest.approx(_exact_fisher(r, param, name), rel=1e-9)


def test_negative_binomial_natural_coordinates_are_log_p():
    # eta = log p, A(eta) = -r log(1 - e^eta): F_eta = A'' = r p / (1 - p)^2.
    r, p = 4.0, torch.tensor(0.35, dtype=torch.float64)
    F = fisher_information(dist.NegativeBinomial(r, probs=p), coords="natural")
    assert float(F) == pytest.approx(float(r * p / (1 - p) ** 2), rel=1e-12)
    Fm = fisher_information(dist.NegativeBinomial(r, probs=p), coords="mean")
    assert float(Fm) == pytest.approx(1 / float(F), rel=1e-10)


def test_dict_coords_with_an_expanded_untransformed_parameter():
    # Regression: an expanded (stride-0) parameter left in standard coordinates used to
    # make torch.func.jvp fail. F_loc in loc = 2u is 4 / sigma^2; scale is untouched.
    from torch.distributions.transforms import AffineTransform

    d = dist.Normal(torch.zeros(3, dtype=torch.float64),
                    torch.tensor(0.5, dtype=torch.float64).expand(3))
    F = fisher_information(d, coords={"loc": AffineTransform(0.0, 2.0)})
    expected = torch.diag(torch.tensor([16.0, 8.0], dtype=torch.float64)).expand(3, 2, 2)
    assert torch.allclose(F, expected)


def _exact_logits_fisher_product(logits, n, x, digits=50):
    """``n (diag(p) - p p^T) x`` with ``p = softmax(logits)``, in decimal arithmetic."""
    with decimal.localcontext() as ctx:
        ctx.prec = digits
        e = [decimal.Decimal(float(v)).exp() for v in logits]
        p = [v / sum(e) for v in e]
        xs = [decimal.Decimal(float(v)) for v in x]
        px = sum(pi * xi for pi, xi in zip(p, xs))
        return [float(n * pi * (xi - px)) for pi, xi in zip(p, xs)]


@pytest.mark.parametrize("logits,n", [([14.0, -10.0, 0.0], 7), ([-3.0, 0.5, 12.0, -8.0], 1)])
def test_logits_fisher_keeps_its_accuracy_near_a_certain_category(logits, n):
    """With one probability within e^-14 of 1, ``n p (x - p^T x)`` computed as written
    loses ``eps / (1 - p_max)`` (1e-10) of relative accuracy; the operator keeps ~eps,
    against a 50-digit product, has ``1`` in its null space exactly, and its damped
    solve inverts its product."""
    logits_t = torch.tensor(logits, dtype=torch.float64)
    d = (dist.Multinomial(n, logits=logits_t) if n > 1 else dist.Categorical(logits=logits_t))
    op = fisher_operator(d)
    x = torch.tensor([0.3, -1.1, 0.7, 0.2][: len(logits)], dtype=torch.float64)
    exact = torch.tensor(_exact_logits_fisher_product(logits, n, x.tolist()),
                         dtype=torch.float64)
    got = op.mv(x)
    assert ((got - exact).abs() <= 1e-13 * exact.abs()).all(), (got, exact)
    assert torch.equal(op.mv(torch.ones_like(x)), torch.zeros_like(x))
    lam = 1e-3 * n
    back = op.solve(op.mv(x) + lam * x, damping=lam)
    assert (back - x).norm() <= 1e-12 * x.norm()
