"""Error rates of a classifier over a dataset, batched: clean, under attack, certified (the dual bound or
any backend), and per-example robustness verdicts with an optional resumable store.

Each function returns per-example results (a (N,) bool tensor on the CPU: True where the example counts as
an error); ``flags.float().mean()`` is the error rate. Nothing is printed; ``progress=True`` shows a tqdm
bar. ``batch_size=None`` handles all examples in one batch.
"""
from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from .attacks import fgsm, pgd
from .bounds import Bounder, margin_matrix
from .regions import LinfBall

ATTACKS = {"fgsm": fgsm, "pgd": pgd}


def batches(n: int, batch_size: int | None) -> list:
    """Slices covering ``range(n)`` in order, ``batch_size`` at a time (None: one slice)."""
    size = n if batch_size is None else int(batch_size)
    if size < 1 and n:
        raise ValueError(f"batch_size must be None or >= 1, got {batch_size!r}")
    return [slice(i, min(i + size, n)) for i in range(0, n, max(size, 1))]


def _bar(items, desc, progress):
    return tqdm(items, desc=desc, leave=False) if progress else items


def _logits(model, X) -> torch.Tensor:
    with torch.no_grad():
        out = model(X)
    return out.reshape(len(X), -1)


def clean_errors(model, X, y, batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
    """(N,) bool: the model's prediction on ``X[i]`` is not ``y[i]``."""
    flags = [_logits(model, X[s]).argmax(1) != y[s] for s in _bar(batches(len(X), batch_size), "clean", progress)]
    return torch.cat(flags).cpu() if flags else torch.zeros(0, dtype=torch.bool)


def attack_errors(model, X, y, eps, attack: str = "pgd", clip=None, batch_size: int | None = None,
                  count_clean: bool = True, progress: bool = False, **attack_options) -> torch.Tensor:
    """(N,) bool: the attack (``"fgsm"`` or ``"pgd"``, with ``attack_options``) over ``LinfBall(X, eps,
    clip)`` finds a misclassified point — or, with ``count_clean``, the image itself (it lies in the ball)
    is misclassified, so that clean error ≤ attack error always holds. An attack's ``seed`` restarts per
    batch."""
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {sorted(ATTACKS)}, got {attack!r}")
    flags = []
    for s in _bar(batches(len(X), batch_size), attack, progress):
        hit = ATTACKS[attack](model, X[s], y[s], eps, clip=clip, **attack_options)[1]
        flags.append(hit | (_logits(model, X[s]).argmax(1) != y[s]) if count_clean else hit)
    return torch.cat(flags).cpu() if flags else torch.zeros(0, dtype=torch.bool)


def robust_errors(model, X, y, eps, bounder="dual", clip=None, n_classes: int | None = None,
                  batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
    """(N,) bool: not certified — some lower bound of ``f_y − f_j`` (j ≠ y) over ``LinfBall(X[i], eps, clip)``
    is ≤ 0. ``bounder``: a :class:`Bounder` or a registered name (default the dual bound, fixed α);
    ``n_classes`` defaults to the model's output size. Bounds run under ``torch.no_grad``."""
    bounder = Bounder.create(bounder) if isinstance(bounder, str) else bounder
    if n_classes is None and len(X):
        n_classes = _logits(model, X[:1]).shape[1]
    flags = []
    for s in _bar(batches(len(X), batch_size), "bound", progress):
        xb, yb = X[s], y[s]
        with torch.no_grad():
            C = margin_matrix(yb.cpu(), n_classes).to(xb)
            flags.append(~bounder.bound(model, LinfBall(xb, eps, clip=clip), C).certified)
    return torch.cat(flags).cpu() if flags else torch.zeros(0, dtype=torch.bool)


def certify_each(bounder, model, X, y, eps, clip=None, store=None, prefix=(), known: dict | None = None,
                 progress: bool = False, **certify_options) -> list:
    """``bounder.certify`` one example at a time (the whole call timed): a record per example,
    ``{"image", "label", "status", "seconds", "margin", "counterexample_margin"}`` (the verdict, the proven
    lower bound of ``min_j f_y − f_j`` and the margin at the counterexample, as in ``Certification``).

    ``store``: a :class:`~polytope_lab.store.ResultStore`; each record is put under ``(*prefix, image)`` as
    soon as it is made, and an example already there is not certified again (resume). ``known``: {image:
    partial record} of examples decided elsewhere (e.g. a verified attack point), stored without a call.
    """
    records = []
    for i in _bar(range(len(X)), "certify", progress):
        key = (*prefix, i)
        if store is not None and key in store:
            records.append(store.get(key))
            continue
        record = {"image": i, "label": int(y[i])}
        if known is not None and i in known:
            record.update({"status": "counterexample", "seconds": 0.0, "margin": math.nan,
                           "counterexample_margin": math.nan, **known[i]})
        else:
            start = time.perf_counter()
            cert = bounder.certify(model, LinfBall(X[i:i + 1], eps, clip=clip), y[i:i + 1], **certify_options)
            record.update({"status": cert.status[0], "seconds": time.perf_counter() - start,
                           "margin": float(cert.margin[0]),
                           "counterexample_margin": float(cert.counterexample_margin[0])})
        if store is not None:
            store.put(key, record)
        records.append(record)
    return records


__all__ = ["batches", "clean_errors", "attack_errors", "robust_errors", "certify_each"]
