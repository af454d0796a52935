"""Networks the experiments train themselves (shared by several experiments). No maths here."""
from __future__ import annotations

import torch
import torch.nn as nn

from polytope_lab import models, training


def robust_mlp(X, y, sizes, *, eps, epochs, directory, seed=0, warmup_epochs=1, clip=(0.0, 1.0),
               flatten_layer=False, resume=True, log_path=None, progress=False):
    """An MLP of widths ``sizes`` trained with the provable objective (``training.train``, mode "robust",
    ε warmed up linearly over ``min(warmup_epochs, epochs)`` epochs, ball ∩ ``clip``) on ``(X, y)``;
    returns ``(model, training log)``. The initial weights come from ``torch.manual_seed(seed)``.
    Checkpointed in ``directory`` after every epoch, so a rerun with ``resume`` continues or reuses it.
    ``flatten_layer``: the model starts with ``nn.Flatten`` and trains on ``X`` as given; else it trains on
    ``X.flatten(1)``."""
    torch.manual_seed(seed)
    net = models.mlp(sizes)
    if flatten_layer:
        net = nn.Sequential(nn.Flatten(), *net)
    log = training.train(net, X if flatten_layer else X.flatten(1), y, mode="robust", eps=eps, epochs=epochs,
                         warmup_epochs=min(warmup_epochs, epochs), clip=clip, seed=seed, checkpoint_dir=directory,
                         log_path=log_path, resume=resume, progress=progress,
                         architecture={"name": "flatten+mlp" if flatten_layer else "mlp", "sizes": list(sizes)})
    return net, log
