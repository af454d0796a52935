"""Model zoo: the paper's MNIST ConvNet, plain and residual MLPs, the skip-connection containers, and
checkpoint loading."""
from __future__ import annotations

import torch
import torch.nn as nn


def mnist_convnet() -> nn.Sequential:
    """The paper's MNIST ConvNet (eq. 38): Conv(1,16,4,s2,p1)-ReLU-Conv(16,32,4,s2,p1)-ReLU-FC(100)-ReLU-FC(10).

    Layer indices match the seed authors' checkpoint (keys ``0.*, 2.*, 5.*, 7.*``).
    """
    return nn.Sequential(
        nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 100), nn.ReLU(),
        nn.Linear(100, 10),
    )


def mlp(sizes) -> nn.Sequential:
    """Fully connected ReLU network with layer widths ``sizes`` (input first, output last)."""
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or any(s <= 0 for s in sizes):
        raise ValueError(f"sizes must list at least two positive widths, got {sizes}")
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def random_mlp(sizes, generator: torch.Generator) -> nn.Sequential:
    """The paper's random network (§4.1): an :func:`mlp` in float64 with weights N(0, 1/fan_in) (std
    1/√fan_in) and biases N(0, 1), drawn layer by layer from ``generator``; parameters frozen, eval mode."""
    net = mlp(sizes).double()
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, nn.Linear):
                layer.weight.normal_(0.0, layer.in_features ** -0.5, generator=generator)
                layer.bias.normal_(0.0, 1.0, generator=generator)
    return net.requires_grad_(False).eval()


def random_network(sizes, seed: int):
    """The paper's random network (§4.1) and its centre: ``(random_mlp(sizes, g), x₀)`` with x₀ ~ U[0, 1]^n0
    (shape (1, sizes[0]), float64), both drawn from one generator seeded with ``seed``, the network first."""
    g = torch.Generator().manual_seed(seed)
    net = random_mlp(sizes, g)
    return net, torch.rand(1, sizes[0], generator=g, dtype=torch.float64)


class Dense(nn.Module):
    """A layer with skip connections, for :class:`DenseSequential`: ``Dense(m_1, ..., m_K)`` applies
    ``m_K`` to the latest output, ``m_{K-1}`` to the one before, ... (``None`` skips an output) and adds
    the results. ``Dense(conv_a, None, conv_b)`` reads two and three steps back; a residual block is
    ``Dense(nn.Identity(), None, conv)``. The modules must be affine (Linear, Conv2d, BatchNorm in eval
    mode, Flatten, Identity, or an nn.Sequential of those) for the bounders."""

    def __init__(self, *modules):
        super().__init__()
        if not modules or all(m is None for m in modules):
            raise ValueError("Dense needs at least one module (None entries skip an output)")
        self.layers = nn.ModuleList([nn.Identity() if m is None else m for m in modules])
        self.used = [m is not None for m in modules]

    def forward(self, *outputs):
        if len(outputs) < len(self.layers):
            raise ValueError(f"Dense with {len(self.layers)} modules needs that many earlier outputs, "
                             f"got {len(outputs)}")
        pairs = zip(self.layers, self.used, outputs[len(outputs) - len(self.layers):])
        return sum(m(x) for m, used, x in pairs if used)


class DenseSequential(nn.Sequential):
    """``nn.Sequential`` that also takes :class:`Dense` layers, which read several earlier outputs (the
    input counts as output 0). Other layers read the latest output, as in ``nn.Sequential``."""

    def forward(self, x):
        outputs = [x]
        for layer in self:
            outputs.append(layer(*outputs) if isinstance(layer, Dense) else layer(outputs[-1]))
        return outputs[-1]


def residual_mlp(width: int, blocks: int, n_in: int, n_out: int) -> DenseSequential:
    """``x → Linear(n_in, width) → [z ← ReLU(z + Linear(ReLU(Linear(z))))] × blocks → Linear(width, n_out)``:
    fully connected residual blocks (identity skips over two layers)."""
    layers = [nn.Linear(n_in, width), nn.ReLU()]
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.ReLU(), Dense(nn.Identity(), None, nn.Linear(width, width)),
                   nn.ReLU()]
    return DenseSequential(*layers, nn.Linear(width, n_out))


def load_state(model: nn.Module, path) -> nn.Module:
    """Load the state_dict at ``path`` (mapped to the CPU) into ``model``; returns it in eval mode."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and not any(torch.is_tensor(v) for v in state.values()):
        state = state["state_dict"]
    model.load_state_dict(state)
    return model.eval()


__all__ = ["mnist_convnet", "mlp", "random_mlp", "random_network", "Dense", "DenseSequential", "residual_mlp",
           "load_state"]
