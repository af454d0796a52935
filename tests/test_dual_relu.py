"""``dual/relu.py``: the fixed slopes (eq. 27), the gather of the unstable units I (the one copy the
frontiers and the chunked bounds share) and their terms ``Σ_{j∈I} l_j [ν_j]₊`` in J (eq. 23)."""
from __future__ import annotations

import pytest
import torch

from polytope_lab.dual.relu import lower_slope_terms, max_unstable, relu_slopes, relu_terms, unstable_units


def test_relu_slopes_on_each_kind_of_unit():
    """0 on I⁻ (u ≤ 0, including u = 0), 1 on I⁺ (l ≥ 0, including l = 0), u/(u−l) on I (l < 0 < u)."""
    l = torch.tensor([[-2.0, -1.0, 0.0, 0.5, -1.0, -3.0]], dtype=torch.float64)
    u = torch.tensor([[-1.0, 0.0, 1.0, 2.0, 1.0, 1.0]], dtype=torch.float64)
    d, unstable = relu_slopes(l, u)
    assert unstable.tolist() == [[False, False, False, False, True, True]]
    torch.testing.assert_close(d, torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.5, 0.25]], dtype=torch.float64),
                               rtol=0, atol=0)


def test_relu_slopes_are_finite_for_a_degenerate_interval():
    """l = u = 0 is stable (d = 0), and no 0/0 reaches d or its gradient."""
    l = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    u = torch.tensor([[0.0, 1.0, -1.0]], dtype=torch.float64)
    d, unstable = relu_slopes(l, u)
    d.sum().backward()
    assert not unstable.any() and torch.isfinite(d).all() and torch.isfinite(l.grad).all()


@pytest.mark.parametrize("shape", [(3, 5, 4), (1, 5, 4)])
def test_relu_terms_equal_the_two_clamp_form(shape):
    """``relu_terms`` (one clamp, ``[−a]₊ = [a]₊ − a``) equals ``Σ_q l_q [∓G_q]₊`` entry by entry."""
    g = torch.Generator().manual_seed(0)
    G = torch.randn(*shape, generator=g, dtype=torch.float64)
    lI = -torch.rand(3, shape[2], generator=g, dtype=torch.float64)
    lo, up = relu_terms(G, lI)
    assert lo.shape == up.shape == (3, shape[1])
    for b in range(3):
        Gb = G[b % shape[0]]
        for n in range(shape[1]):
            assert torch.isclose(lo[b, n], sum(lI[b, q] * max(-Gb[n, q], 0) for q in range(shape[2])), atol=1e-14)
            assert torch.isclose(up[b, n], sum(lI[b, q] * max(Gb[n, q], 0) for q in range(shape[2])), atol=1e-14)


def _bounds(seed, B=4, n=9):
    g = torch.Generator().manual_seed(seed)
    l = torch.randn(B, n, generator=g, dtype=torch.float64)
    u = l + 2 * torch.rand(B, n, generator=g, dtype=torch.float64)
    u[0] = l[0].abs() + 1  # some example mostly unstable ...
    l[-1] = 0.1            # ... and one with none
    return l, u


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unstable_units_gathers_each_examples_units_in_order(seed):
    """Per example the units of I in increasing index, with their slope and lower bound, then padding
    (d = l = 0) up to the batch maximum q = max_b |I_b|."""
    l, u = _bounds(seed)
    d, unstable = relu_slopes(l, u)
    units = unstable_units(d, unstable, l)
    q = max(int(row.sum()) for row in unstable)
    assert max_unstable(unstable) == q > 0
    assert units.order.shape == units.d.shape == units.l.shape == (l.shape[0], q)
    for b in range(l.shape[0]):
        idx = torch.nonzero(unstable[b]).flatten().tolist()
        n = len(idx)
        assert units.order[b, :n].tolist() == idx
        assert torch.equal(units.d[b, :n], d[b, idx]) and torch.equal(units.l[b, :n], l[b, idx])
        assert (units.d[b, n:] == 0).all() and (units.l[b, n:] == 0).all()
    assert (units.l[:, :1] < 0).any() and (units.d > 0).sum() == unstable.sum()


def test_unstable_units_of_a_stable_layer_or_an_empty_batch():
    l = torch.ones(2, 5, dtype=torch.float64)
    d, unstable = relu_slopes(l, l + 1)
    units = unstable_units(d, unstable, l)
    assert max_unstable(unstable) == 0 and units.order.shape == (2, 0)
    empty = torch.zeros(0, 5, dtype=torch.float64)
    d, unstable = relu_slopes(empty, empty)
    assert max_unstable(unstable) == 0 and unstable_units(d, unstable, empty).order.shape == (0, 0)


def test_the_gathered_terms_equal_the_terms_over_all_units():
    """The I-terms from the gathered columns equal those of every unit with l set to 0 off I: the padding
    contributes nothing."""
    l, u = _bounds(3)
    d, unstable = relu_slopes(l, u)
    units = unstable_units(d, unstable, l)
    G = torch.randn(l.shape[0], 6, l.shape[1], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    gathered = torch.gather(G, 2, units.order.unsqueeze(1).expand(-1, 6, -1))
    full = relu_terms(G, torch.where(unstable, l, torch.zeros_like(l)))
    for a, b in zip(relu_terms(gathered, units.l), full):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


@pytest.mark.parametrize("shared", [True, False])
def test_the_short_way_without_a_gradient_equals_the_autograd_step(shared):
    """lower_slope_terms without a gradient (terms from [ω̂]₋, in place) gives the autograd path's ω and
    terms, and ω is exactly 0 where α = 0 and ω̂ > 0 on I."""
    g = torch.Generator().manual_seed(3)
    l = torch.randn(2, 7, generator=g, dtype=torch.float64) - 0.3
    u = l + torch.rand(2, 7, generator=g, dtype=torch.float64) + 0.1
    d, unstable = relu_slopes(l, u)
    lI = torch.where(unstable, l, torch.zeros_like(l))
    omega_hat = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    alpha = torch.rand(2, 1 if shared else 5, 7, generator=g, dtype=torch.float64)
    alpha[..., :3] = 0.0
    d3, unstable3 = d.unsqueeze(1), unstable.unsqueeze(1)
    with torch.no_grad():
        omega, lo = lower_slope_terms(omega_hat, alpha, d3, unstable3, lI)
    grad_alpha = alpha.clone().requires_grad_(True)
    want, want_lo = lower_slope_terms(omega_hat, grad_alpha, d3, unstable3, lI)
    torch.testing.assert_close(omega, want.detach(), rtol=0, atol=1e-15)
    torch.testing.assert_close(lo, want_lo.detach(), rtol=1e-12, atol=1e-12)
    zero = (alpha == 0) & unstable3 & (omega_hat > 0)
    assert zero.any() and (omega[zero] == 0).all()
