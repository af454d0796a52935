"""Training: the provably robust objective (paper eq. 35), the ε warm-up schedule, and a training loop for
standard, PGD-adversarial (Madry et al.) and provably robust training with CSV logs and resumable checkpoints."""
from __future__ import annotations

import functools
import hashlib
import json
import math
import numbers
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .attacks import pgd
from .bounds import check_objective, margin_matrix
from .dual import dual_objective, intermediate_bounds
from .dual.projections import check_proj
from .convert import as_network
from .regions import LinfBall


def robust_loss(model, eps, X, y, clip=None, reduction="mean", region=None, proj=None, generator=None):
    """``(loss, robust_error)``: cross-entropy on ``−J(e_y − e_j)`` over j (eq. 34–35), differentiable in
    the model's parameters — a drop-in for ``nn.CrossEntropyLoss`` in a training loop.

    The row for j = y is 0 by construction, so the example is certified iff every other coordinate is
    negative; ``robust_error`` is the fraction (or, with ``reduction="none"``, the per-example flags) of
    examples not certified. ``region`` overrides the default ``LinfBall(X, eps, clip)`` (e.g. an L2Ball).

    ``proj=k`` (for training, Wong et al. 2018b): the intermediate bounds are estimated with k random
    projections drawn from ``generator`` (torch's global generator when None), under the rule of
    ``DualBounder(proj=k)``; J is exact given them. The loss and ``robust_error`` are then estimates,
    not certificates (the reference's training logs report the same estimate): report robust errors
    with ``proj=None`` or a Bounder.
    """
    if region is None:
        region = LinfBall(X, eps, clip=clip)
    network = as_network(model, region.input_shape)
    if region.x.dtype != network.dtype:
        region = region.to(dtype=network.dtype)
    y = torch.as_tensor(y, device=region.x.device).long()
    n = network.output_size
    C = torch.eye(n, device=region.x.device, dtype=region.x.dtype)
    C = C[y].unsqueeze(1) - C.unsqueeze(0)                          # (B, n, n): rows e_y − e_j, row y = 0
    C = check_objective(C, network, region)
    bounds, frontier = intermediate_bounds(network, region, return_frontier=True, proj=proj, generator=generator)
    J, _ = dual_objective(network, region, bounds, C, frontier=frontier)
    f = -J                                                          # (B, n): f_j ≥ max (z_j − z_y)
    err = (f.scatter(1, y[:, None], float("-inf")) >= 0).any(1)     # some j ≠ y not provably below y
    loss = F.cross_entropy(f, y, reduction=reduction)
    if reduction == "none":
        return loss, err
    return loss, err.float().mean().item()


MODES = ("standard", "pgd", "robust")
LOG_COLUMNS = ["epoch", "eps", "loss", "error", "robust_loss", "robust_error", "seconds"]
CHECKPOINT = "checkpoint.pt"        # {"state_dict", "optimizer", "rng", "epoch", "log", "settings", "architecture"}
CHECKPOINT_JSON = "checkpoint.json"  # the same without tensors, for people and scripts


def eps_schedule(eps, warmup_epochs, epoch, fraction=1.0) -> float:
    """ε after ``fraction`` ∈ [0, 1] of epoch ``epoch`` (0-based): a linear ramp from 0 reaching ``eps`` at the
    end of epoch ``warmup_epochs − 1``, then ``eps`` (no warm-up when ``warmup_epochs`` is 0)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    if epoch < 0 or warmup_epochs < 0:
        raise ValueError(f"epoch and warmup_epochs must be >= 0, got {epoch} and {warmup_epochs}")
    if warmup_epochs == 0:
        return float(eps)
    return float(eps) * min(1.0, (epoch + fraction) / warmup_epochs)


def _number(name, value, positive) -> float:
    """``value`` as a finite float, > 0 if ``positive`` else >= 0; ValueError naming ``name`` otherwise."""
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {value!r}")
    return number


def _check_inputs(X, y, mode, epochs, batch_size, warmup_epochs, clip, attack_steps):
    """Clear errors for bad settings or data; returns ``(X, y, clip)`` as tensors and a float pair (or None)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("warmup_epochs", warmup_epochs, 0),
                             ("attack_steps", attack_steps, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    if X.dim() < 2 or X.shape[0] == 0:
        raise ValueError(f"X must be a non-empty batch, shape (N, *input_shape); got {tuple(X.shape)}")
    if not X.is_floating_point():
        raise ValueError(f"X must be floating point, got {X.dtype}")
    if not torch.isfinite(X).all():
        raise ValueError("X contains NaN or inf")
    if y.dim() != 1 or y.shape[0] != X.shape[0]:
        raise ValueError(f"y must have shape ({X.shape[0]},) to match X {tuple(X.shape)}; got {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"y must hold integer class labels, got {y.dtype}")
    if clip is not None:
        try:
            lo, hi = (float(c) for c in clip)
        except (TypeError, ValueError):
            raise ValueError(f"clip must be None or a pair (lo, hi) of numbers, got {clip!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ValueError(f"clip must be a finite (lo, hi) with lo <= hi, got {clip!r}")
        if X.min() < lo or X.max() > hi:
            raise ValueError(f"X has values in [{X.min().item():g}, {X.max().item():g}], outside clip {clip!r}")
        clip = (lo, hi)
    return X, y.long(), clip


def _fingerprint(X, y) -> str:
    """SHA-256 of the training data (shapes, dtypes and bytes): a checkpoint resumes only on the same data."""
    h = hashlib.sha256()
    for t in (X, y):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_checkpoint(directory: Path, state: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / CHECKPOINT, lambda p: torch.save(state, p))
    readable = {k: state[k] for k in ("architecture", "settings", "epoch")}
    readable["log"] = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
                       for row in state["log"]]
    _atomic_write(directory / CHECKPOINT_JSON, lambda p: Path(p).write_text(json.dumps(readable, indent=1)))


def _write_csv(path: Path, records, header: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(records, columns=LOG_COLUMNS).to_csv(path, mode="w" if header else "a", header=header,
                                                      index=False)


def _robust_step(model, eps, xb, yb, clip, proj, generator, chunk_size, sums) -> float:
    """Backward of the batch's mean robust loss, chunk by chunk (``chunk_size`` examples; all at once when
    None); adds the loss and error sums to ``sums`` and returns the batch's loss."""
    c = len(xb) if chunk_size is None else chunk_size
    total = 0.0
    for start in range(0, len(xb), c):
        xc, yc = xb[start:start + c], yb[start:start + c]
        loss, err = robust_loss(model, eps, xc, yc, clip=clip, proj=proj,
                                generator=generator if proj is not None else None)
        (loss * (len(xc) / len(xb))).backward()
        total += loss.item() * len(xc)
        sums["robust_loss"] += loss.item() * len(xc)
        sums["robust_error"] += err * len(xc)
    return total / len(xb)


def train(model, X, y, *, mode="standard", eps=0.1, epochs=10, batch_size=50, lr=1e-3, warmup_epochs=0,
          clip=None, attack_steps=40, attack_step_size=None, seed=0, device=None, log_path=None,
          checkpoint_dir=None, resume=True, progress=True, architecture=None, proj=None,
          chunk_size=None) -> pd.DataFrame:
    """Train ``model`` in place on ``(X, y)`` with Adam; returns the per-epoch log (columns ``LOG_COLUMNS``).

    ``mode``: "standard" (cross-entropy), "pgd" (cross-entropy on PGD points of ``LinfBall(x, ε_t, clip)``,
    ``attack_steps`` sign steps) or "robust" (:func:`robust_loss` at ε_t). ε_t follows :func:`eps_schedule`
    per batch. Mini-batches are shuffled by a generator seeded with ``seed``. Log rows, averaged over the
    epoch's examples: ``epoch`` (1-based), ``eps`` (ε_t at the epoch's end), ``loss``/``error`` (cross-entropy
    and error on the inputs trained on: clean, or the PGD points in "pgd"), ``robust_loss``/``robust_error``
    (in "robust", else NaN), ``seconds``. ``log_path``: CSV rewritten at the start, appended per epoch.
    ``checkpoint_dir``: model, optimizer and generator state after every epoch, with ``architecture`` and the
    settings; with ``resume`` training continues from a checkpoint found there (same settings and data
    required), so an interrupted run ends as an uninterrupted one would (randomness inside the model, e.g.
    dropout, uses torch's global generator and is not restored). The model is left in eval mode.
    ``proj=k`` ("robust" mode): :func:`robust_loss` with k random projections drawn from the shuffling
    generator (so runs stay reproducible and resumable); the logged ``robust_loss``/``robust_error`` are
    then estimates, not certified errors. ``chunk_size=c`` ("robust" mode): bound at most c examples at a
    time and accumulate the batch's gradient over the chunks — the same step as one pass over the batch
    (up to rounding; with ``proj`` each chunk draws its own projections), with the autograd graph of only
    c examples alive at once (exact bounds of a residual ConvNet hold about 0.3 GiB per MNIST image).
    """
    eps, lr = _number("eps", eps, positive=False), _number("lr", lr, positive=True)
    if attack_step_size is not None:
        attack_step_size = _number("attack_step_size", attack_step_size, positive=True)
    X, y, clip = _check_inputs(X, y, mode, epochs, batch_size, warmup_epochs, clip, attack_steps)
    check_proj(proj)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")
    epochs, batch_size, warmup_epochs, attack_steps = map(int, (epochs, batch_size, warmup_epochs, attack_steps))
    X, y, device = _on_model_device(model, X, y, device)
    settings = {"mode": mode, "eps": eps, "batch_size": batch_size, "lr": lr,
                "warmup_epochs": warmup_epochs, "clip": None if clip is None else list(clip),
                "attack_steps": attack_steps, "attack_step_size": attack_step_size, "seed": int(seed), "proj": proj,
                "data": _fingerprint(X, y)}
    if chunk_size is not None and proj is not None:  # the draws depend on the chunks
        settings["chunk_size"] = int(chunk_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(int(seed))
    records, start = [], 0
    checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
    if checkpoint_dir is not None and resume and (checkpoint_dir / CHECKPOINT).is_file():
        records, start = _resume(checkpoint_dir, model, optimizer, generator, settings, architecture, epochs)
    if log_path is not None:
        _write_csv(Path(log_path), records, header=True)
    step = functools.partial(_train_batch, model, optimizer, generator, mode=mode, clip=clip,
                             attack_steps=attack_steps, attack_step_size=attack_step_size, proj=proj,
                             chunk_size=chunk_size)
    n, n_batches = X.shape[0], -(-X.shape[0] // batch_size)
    bar = tqdm(total=(epochs - start) * n_batches, desc=f"train ({mode})", disable=not progress, leave=False)
    try:
        for epoch in range(start, epochs):
            began = time.perf_counter()
            sums = dict.fromkeys(("loss", "error", "robust_loss", "robust_error"), 0.0)
            order = torch.randperm(n, generator=generator).to(device)
            for b in range(n_batches):
                idx = order[b * batch_size:(b + 1) * batch_size]
                eps_t = eps_schedule(eps, warmup_epochs, epoch, (b + 1) / n_batches)
                value = step(X[idx], y[idx], eps_t, sums)
                bar.update()
                bar.set_postfix(epoch=epoch + 1, eps=f"{eps_t:.3g}", loss=f"{value:.3g}")
            row = {"epoch": epoch + 1, "eps": eps_schedule(eps, warmup_epochs, epoch),
                   **{k: v / n for k, v in sums.items()}, "seconds": time.perf_counter() - began}
            if mode != "robust":
                row["robust_loss"] = row["robust_error"] = float("nan")
            records.append(row)
            if checkpoint_dir is not None:
                _save_checkpoint(checkpoint_dir, {
                    "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "rng": {"generator": generator.get_state()}, "epoch": epoch + 1, "log": records,
                    "settings": settings, "architecture": architecture})
            if log_path is not None:
                _write_csv(Path(log_path), [row], header=False)
    finally:
        bar.close()
        model.eval()
    return pd.DataFrame(records, columns=LOG_COLUMNS)


def _on_model_device(model, X, y, device):
    """(X, y, device): the data on the training device in the model's dtype, checked against the model."""
    params = list(model.parameters())
    if not params:
        raise ValueError("model has no parameters to train")
    device = torch.device(device) if device is not None else params[0].device
    model.to(device)
    X, y = X.to(device=device, dtype=params[0].dtype), y.to(device)
    with torch.no_grad():
        try:
            n_classes = model(X[:1]).reshape(1, -1).shape[1]
        except RuntimeError as e:
            raise ValueError(f"model cannot take inputs of shape {tuple(X.shape[1:])}: {e}") from e
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"labels must lie in [0, {n_classes}) for a model with {n_classes} outputs, "
                         f"got range [{y.min().item()}, {y.max().item()}]")
    return X, y, device


def _resume(checkpoint_dir: Path, model, optimizer, generator, settings, architecture, epochs):
    """Load the checkpoint into model, optimizer and generator after checking it fits; (log records, epoch)."""
    state = torch.load(checkpoint_dir / CHECKPOINT, map_location="cpu", weights_only=True)
    changed = sorted(k for k in settings if state["settings"].get(k) != settings[k])
    if changed:
        raise ValueError(f"checkpoint in {checkpoint_dir} was made with other settings ({', '.join(changed)}); "
                         f"use another checkpoint_dir or resume=False")
    if architecture is not None and state["architecture"] is not None and state["architecture"] != architecture:
        raise ValueError(f"checkpoint in {checkpoint_dir} is for architecture {state['architecture']}, "
                         f"not {architecture}")
    if state["epoch"] > epochs:
        raise ValueError(f"checkpoint in {checkpoint_dir} is at epoch {state['epoch']}, beyond epochs={epochs}")
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint in {checkpoint_dir} does not fit this model: {e}") from e
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["rng"]["generator"])
    return list(state["log"]), state["epoch"]


def _train_batch(model, optimizer, generator, xb, yb, eps_t, sums, *, mode, clip, attack_steps, attack_step_size,
                 proj, chunk_size) -> float:
    """One optimizer step on the batch ``(xb, yb)`` at ε_t; adds the logged sums and returns the batch's loss."""
    if mode == "pgd":
        attack_seed = int(torch.randint(2 ** 62, (1,), generator=generator))
        model.eval()
        xb, _ = pgd(model, xb, yb, eps_t, steps=attack_steps, step_size=attack_step_size, clip=clip,
                    seed=attack_seed)
    model.train()
    with torch.set_grad_enabled(mode != "robust"):   # robust: the clean loss is only logged
        logits = model(xb).reshape(len(xb), -1)                          # (b, n_classes)
        loss = objective = F.cross_entropy(logits, yb)
    sums["loss"] += loss.item() * len(xb)
    sums["error"] += (logits.argmax(1) != yb).float().sum().item()
    optimizer.zero_grad()
    if mode == "robust":
        value = _robust_step(model, eps_t, xb, yb, clip, proj, generator, chunk_size, sums)
    else:
        objective.backward()
        value = objective.item()
    optimizer.step()
    return value


__all__ = ["robust_loss", "margin_matrix", "train", "eps_schedule", "MODES", "LOG_COLUMNS"]
