"""training.robust_loss: gradients, consistency with the dual bounder, eps = 0, and the real model."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import polytope_lab as pl
from polytope_lab.network import Conv2dOp, LinearOp

from conftest import make_convnet, make_mlp

DT = torch.float64


def _data(shape=(4,), batch=6, n_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(batch, *shape, generator=g, dtype=DT)
    y = torch.randint(0, n_classes, (batch,), generator=g)
    return X, y


def _mlp_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [4, 6, 5, 3]
    return [(torch.randn(b, a, generator=g, dtype=DT) / a ** 0.5, 0.1 * torch.randn(b, generator=g, dtype=DT))
            for a, b in zip(sizes[:-1], sizes[1:])]


def _network(params):
    return pl.Network([LinearOp(w, b) for w, b in params], (4,))


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("clip", [None, (0.0, 1.0)])
def test_gradcheck_weights(which, clip):
    """d(robust loss)/d(W_i) matches finite differences (float64)."""
    params = _mlp_params()
    X, y = _data()

    def loss_of(w):
        ps = [(w, b) if i == which else (W, b) for i, (W, b) in enumerate(params)]
        return pl.robust_loss(_network(ps), 0.1, X, y, clip=clip)[0]

    w = params[which][0].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss_of, (w,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_bias():
    params = _mlp_params(1)
    X, y = _data(seed=1)

    def loss_of(b):
        ps = [(W, b if i == 0 else bb) for i, (W, bb) in enumerate(params)]
        return pl.robust_loss(_network(ps), 0.15, X, y)[0]

    b = params[0][1].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss_of, (b,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_conv_weight():
    g = torch.Generator().manual_seed(2)
    w1 = torch.randn(2, 1, 3, 3, generator=g, dtype=DT) / 3
    b1 = 0.1 * torch.randn(2, generator=g, dtype=DT)
    w2 = torch.randn(2, 2, 3, 3, generator=g, dtype=DT) / 4
    b2 = 0.1 * torch.randn(2, generator=g, dtype=DT)
    w3 = torch.randn(3, 2 * 3 * 3, generator=g, dtype=DT) / 4
    b3 = 0.1 * torch.randn(3, generator=g, dtype=DT)
    X, y = _data(shape=(1, 5, 5), batch=3, seed=2)

    def loss_of(w):
        c1 = Conv2dOp(w, b1, (1, 5, 5), (1, 1), (1, 1))
        c2 = Conv2dOp(w2, b2, c1.out_shape, (2, 2), (1, 1))
        net = pl.Network([c1, c2, LinearOp(w3, b3, c2.out_shape)], (1, 5, 5))
        return pl.robust_loss(net, 0.05, X, y)[0]

    assert torch.autograd.gradcheck(loss_of, (w1.clone().requires_grad_(True),), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradients_reach_every_parameter_of_a_sequential():
    model = make_mlp([4, 6, 5, 3], seed=3)
    X, y = _data(seed=3)
    loss, _ = pl.robust_loss(model, 0.1, X, y)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_gradient_matches_finite_difference_through_sequential():
    """The same check through from_torch (the parameters are referenced, not copied)."""
    model = make_mlp([4, 6, 3], seed=4)
    X, y = _data(seed=4)
    loss, _ = pl.robust_loss(model, 0.1, X, y)
    (grad,) = torch.autograd.grad(loss, model[0].weight)
    h = 1e-6
    for idx in [(0, 0), (3, 2), (5, 1)]:
        with torch.no_grad():
            model[0].weight[idx] += h
            up = pl.robust_loss(model, 0.1, X, y)[0]
            model[0].weight[idx] -= 2 * h
            down = pl.robust_loss(model, 0.1, X, y)[0]
            model[0].weight[idx] += h
        assert (up - down).item() / (2 * h) == pytest.approx(grad[idx].item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.05, 0.3, 2.0])
def test_robust_error_is_a_fraction(eps):
    model = make_mlp([4, 6, 3], seed=5)
    X, y = _data(batch=10, seed=5)
    loss, err = pl.robust_loss(model, eps, X, y)
    assert isinstance(err, float)
    assert 0.0 <= err <= 1.0
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss_n, err_n = pl.robust_loss(model, eps, X, y, reduction="none")
    assert loss_n.shape == (10,) and err_n.shape == (10,) and err_n.dtype == torch.bool
    assert err == pytest.approx(err_n.float().mean().item())
    torch.testing.assert_close(loss, loss_n.mean())
    loss_s, _ = pl.robust_loss(model, eps, X, y, reduction="sum")
    torch.testing.assert_close(loss_s, loss_n.sum())


def test_robust_error_reaches_one_for_huge_eps():
    model = make_mlp([4, 6, 3], seed=5)
    X, y = _data(batch=10, seed=5)
    assert pl.robust_loss(model, 100.0, X, y)[1] == 1.0


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_eps_zero_is_cross_entropy(kind):
    """At eps = 0, f_j = z_j − z_y, and CE(f, y) = CE(z, y) (softmax is shift-invariant)."""
    if kind == "mlp":
        model, (X, y) = make_mlp([4, 6, 5, 3], seed=6), _data(batch=8, seed=6)
    else:
        model, (X, y) = make_convnet((1, 6, 6), seed=6), _data(shape=(1, 6, 6), batch=8, seed=6)
    logits = model(X)
    loss, err = pl.robust_loss(model, 0.0, X, y)
    torch.testing.assert_close(loss, F.cross_entropy(logits, y), rtol=1e-9, atol=1e-9)
    loss_n, err_n = pl.robust_loss(model, 0.0, X, y, reduction="none")
    torch.testing.assert_close(loss_n, F.cross_entropy(logits, y, reduction="none"), rtol=1e-9, atol=1e-9)
    assert torch.equal(err_n, logits.argmax(1) != y)  # no ties in random float64 logits


def test_robust_loss_is_at_least_cross_entropy_and_grows_with_eps():
    model = make_mlp([4, 8, 3], seed=7)
    X, y = _data(batch=8, seed=7)
    ce = F.cross_entropy(model(X), y, reduction="none")
    prev = ce
    for eps in (0.01, 0.05, 0.2):
        loss, _ = pl.robust_loss(model, eps, X, y, reduction="none")
        assert (loss >= prev - 1e-9).all()
        prev = loss


@pytest.mark.parametrize("clip", [None, (0.0, 1.0)])
def test_robust_error_matches_dual_certification(clip):
    """robust_error is exactly "not certified by the dual bounder with the margin matrix"."""
    model = make_convnet((1, 6, 6), seed=8)
    X, y = _data(shape=(1, 6, 6), batch=12, seed=8)
    for eps in (0.005, 0.02, 0.05):
        _, err = pl.robust_loss(model, eps, X, y, clip=clip, reduction="none")
        b = pl.Bounder.create("dual").bound(model, pl.LinfBall(X, eps, clip=clip), C=pl.margin_matrix(y, 3))
        assert torch.equal(err, ~b.certified)
        assert torch.equal(err, ~(b.lower > 0).all(1))


def test_robust_loss_logits_are_minus_dual_lower_bounds():
    """CE of the robust logits with f_j = −J(e_y − e_j) from the dual bounder (f_y = 0)."""
    model = make_mlp([4, 6, 5, 3], seed=9)
    X, y = _data(batch=5, seed=9)
    b = pl.Bounder.create("dual").bound(model, pl.LinfBall(X, 0.1), C=pl.margin_matrix(y, 3))
    f = torch.zeros(5, 3, dtype=DT)
    others = torch.arange(3).expand(5, 3)
    keep = others != y[:, None]
    f[keep] = -b.lower.reshape(-1)
    loss, _ = pl.robust_loss(model, 0.1, X, y, reduction="none")
    torch.testing.assert_close(loss, F.cross_entropy(f, y, reduction="none"), rtol=1e-7, atol=1e-9)


def test_robust_loss_with_l2_region():
    model = make_mlp([4, 6, 3], seed=10)
    X, y = _data(batch=6, seed=10)
    region = pl.L2Ball(X, 0.2)
    loss, err = pl.robust_loss(model, None, X, y, region=region, reduction="none")
    b = pl.Bounder.create("dual").bound(model, region, C=pl.margin_matrix(y, 3))
    assert torch.equal(err, ~b.certified)
    linf, _ = pl.robust_loss(model, 0.2, X, y, reduction="none")
    assert not torch.allclose(loss, linf)


def test_per_example_eps():
    model = make_mlp([4, 6, 3], seed=11)
    X, y = _data(batch=4, seed=11)
    eps = torch.tensor([0.0, 0.05, 0.1, 0.2], dtype=DT)
    loss, _ = pl.robust_loss(model, eps, X, y, reduction="none")
    for i in range(4):
        one, _ = pl.robust_loss(model, float(eps[i]), X[i:i + 1], y[i:i + 1], reduction="none")
        torch.testing.assert_close(loss[i:i + 1], one, rtol=1e-7, atol=1e-9)


def test_robust_loss_does_not_modify_the_model():
    model = make_mlp([4, 6, 3], seed=12)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    X, y = _data(seed=12)
    with torch.no_grad():
        pl.robust_loss(model, 0.1, X, y)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert all(p.grad is None for p in model.parameters())


def test_a_training_step_reduces_the_robust_loss():
    model = make_mlp([4, 16, 3], seed=13)
    X, y = _data(batch=32, seed=13)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    first = pl.robust_loss(model, 0.05, X, y)[0].item()
    for _ in range(20):
        opt.zero_grad()
        loss, _ = pl.robust_loss(model, 0.05, X, y)
        loss.backward()
        opt.step()
    assert pl.robust_loss(model, 0.05, X, y)[0].item() < first


# --------------------------------------------------------------------------------------------------
# the real pretrained model (slow)
# --------------------------------------------------------------------------------------------------

def test_mnist_fixture(mnist_test):
    """The IDX reader in conftest: 10,000 test images in [0, 1] with labels 0..9 (about 1,000 each)."""
    X, y = mnist_test
    assert X.shape == (10000, 1, 28, 28) and X.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert X.min() == 0.0 and X.max() == 1.0
    counts = torch.bincount(y, minlength=10)
    assert counts.numel() == 10 and (counts > 800).all()
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


N_IMAGES = 500
CLEAN_ERRORS = 9     # first 500 MNIST test images, pretrained Wong–Kolter model
ROBUST_ERRORS = 32   # not certified by the dual network at eps = 0.1 (L∞, unclipped)


@pytest.mark.slow
def test_pretrained_clean_and_robust_error_with_robust_loss(pretrained_model, mnist_test):
    X, y = mnist_test
    X, y = X[:N_IMAGES], y[:N_IMAGES]
    with torch.no_grad():
        assert (pretrained_model(X).argmax(1) != y).sum().item() == CLEAN_ERRORS
        errs, losses = [], []
        for s in range(0, N_IMAGES, 100):
            loss, err = pl.robust_loss(pretrained_model, 0.1, X[s:s + 100], y[s:s + 100], reduction="none")
            errs.append(err)
            losses.append(loss)
    err = torch.cat(errs)
    assert err.shape == (N_IMAGES,)
    assert int(err.sum()) == ROBUST_ERRORS
    assert torch.isfinite(torch.cat(losses)).all()


@pytest.mark.slow
def test_pretrained_robust_error_with_dual_bounder(pretrained_model, mnist_test):
    X, y = mnist_test
    X, y = X[:N_IMAGES], y[:N_IMAGES]
    with torch.no_grad():
        b = pl.Bounder.create("dual", device="cpu").bound(pretrained_model, pl.LinfBall(X, 0.1),
                                                          C=pl.margin_matrix(y, 10))
    assert b.lower.shape == (N_IMAGES, 9)
    certified = (b.lower > 0).all(1)
    assert int((~certified).sum()) == ROBUST_ERRORS
    assert torch.equal(certified, b.certified)


@pytest.mark.slow
def test_pretrained_matches_convex_adversarial(pretrained_model, mnist_test):
    ca = pytest.importorskip("convex_adversarial")
    X, y = mnist_test
    X, y = X[:50], y[:50]
    ours, our_err = pl.robust_loss(pretrained_model, 0.1, X, y, reduction="none")
    ref, ref_err = ca.robust_loss(pretrained_model, 0.1, X, y, size_average=False)
    ours, ref = ours.detach(), ref.detach()
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-6), (ours - ref).abs().max()
    # convex_adversarial's error flags an example whose robust logits' argmax is not y
    assert torch.equal(our_err, ref_err)


@pytest.mark.parametrize("batchnorm", [False, True], ids=["plain", "batchnorm"])
def test_training_loop_with_a_network_built_once(batchnorm):
    """``pl.from_torch`` once, then several robust-loss training steps on the Network: each step's
    backward must work and the loss must follow the updated parameters."""
    torch.manual_seed(16)
    mid = [nn.BatchNorm1d(8).eval()] if batchnorm else []
    model = nn.Sequential(nn.Linear(4, 8), *mid, nn.ReLU(), nn.Linear(8, 3)).double().eval()
    net = pl.from_torch(model, (4,))
    X, y = _data(batch=16, seed=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        loss, _ = pl.robust_loss(net, 0.05, X, y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        torch.testing.assert_close(pl.robust_loss(net, 0.05, X, y)[0], pl.robust_loss(model, 0.05, X, y)[0])
