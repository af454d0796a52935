"""Model zoo: the paper's MNIST ConvNet, plain MLPs, and checkpoint loading."""
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


def load_state(model: nn.Module, path) -> nn.Module:
    """Load the state_dict at ``path`` (mapped to the CPU) into ``model``; returns it in eval mode."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and not any(torch.is_tensor(v) for v in state.values()):
        state = state["state_dict"]
    model.load_state_dict(state)
    return model.eval()


__all__ = ["mnist_convnet", "mlp", "random_mlp", "load_state"]
