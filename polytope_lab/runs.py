"""The settings of a test-set verification run and its results in a :class:`~polytope_lab.store.ResultStore`.

A run's settings (a fingerprint of the weights, ε, the clip box, the backend and its options, the examples
per certify call, and the versions of polytope_lab, torch and the solvers) hash to one key
(``settings_hash``). Each example's result is one record under ``(settings hash, index, example
digest)``, the digest a hash of the example's bytes and label: runs with other settings never mix, an
example is done once per settings, and a run on the first 200 images is the start of the run on all
10,000 (it resumes from there). The settings themselves go to a companion table ``<table>_runs`` under
their hash, so a store can be queried and exported by settings (``stored_runs``, ``stored_results``,
``export_results``). A stored record also holds the counterexample itself (a nested list, or None):
``store.items(prefix=settings_hash)``.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .bounds import Bounder
from .store import ResultStore

#: packages whose versions enter the settings hash (a new solver release may change a verdict)
VERSIONED = ("polytope_lab", "torch", "numpy", "scipy", "highspy", "pulp", "cvxpy", "clarabel")
#: the columns of a results frame, one row per example
COLUMNS = ["index", "label", "verdict", "status", "margin", "counterexample_found", "counterexample_margin",
           "seconds", "worker"]
#: a Certification status as a verdict: certified → robust, counterexample → not robust, else undecided
VERDICT = {"certified": "robust", "counterexample": "not robust"}
UNDECIDED = "undecided"
#: the table of the records when ``store`` is a path
DEFAULT_TABLE = "verify"
DIGEST_CHARS = 16


def _feed(h, obj, seen: set) -> None:
    """Hash ``obj``'s content into ``h``: tensors and arrays by dtype, shape and bytes, modules by their
    structure and state, other objects by type and attributes (each object once)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"tensor{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        h.update(f"array{obj.dtype}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif obj is None or isinstance(obj, (str, int, float, bool, torch.dtype, torch.device)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}[{len(obj)}]".encode())
        for item in obj:
            _feed(h, item, seen)
    elif isinstance(obj, dict):
        h.update(f"dict[{len(obj)}]".encode())
        for k in sorted(obj, key=repr):
            _feed(h, repr(k), seen)
            _feed(h, obj[k], seen)
    elif id(obj) not in seen:
        seen.add(id(obj))
        h.update(f"{type(obj).__module__}.{type(obj).__qualname__}".encode())
        if isinstance(obj, nn.Module):
            _feed(h, repr(obj), seen)
            _feed(h, dict(obj.state_dict()), seen)
            _feed(h, {k: v for k, v in vars(obj).items() if not k.startswith("_") and k != "training"}, seen)
        elif hasattr(obj, "__dict__"):
            _feed(h, vars(obj), seen)
        else:
            _feed(h, repr(obj), seen)


def fingerprint(obj) -> str:
    """sha256 (hex) of ``obj``'s content: an ``nn.Module`` by its layers and state_dict, a
    :class:`~polytope_lab.network.Network` by its operators' types, shapes and weights."""
    h = hashlib.sha256()
    _feed(h, obj, set())
    return h.hexdigest()


def example_digests(X: torch.Tensor, y: torch.Tensor) -> list:
    """Per example, a short sha256 of its bytes (dtype and shape included) and its label."""
    if len(X) == 0:
        return []
    X = X.detach().cpu().contiguous()
    head = f"{X.dtype}{tuple(X.shape[1:])}".encode()
    raw = X.reshape(len(X), -1).view(torch.uint8).numpy()
    return [hashlib.sha256(head + raw[i].tobytes() + int(label).to_bytes(8, "little", signed=True))
            .hexdigest()[:DIGEST_CHARS] for i, label in enumerate(y.tolist())]


def package_versions() -> dict:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _describe(value):
    """An option's value as JSON: scalars and lists as they are, anything else by type and fingerprint."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in value.items()}
    return f"{type(value).__qualname__}:{fingerprint(value)[:DIGEST_CHARS]}"


def run_settings(model, eps: float, clip, bounder: Bounder, options: dict | None, batch_size: int = 1) -> dict:
    """The settings a result depends on, as JSON. ``options``: those ``bounder`` was created with by name
    (None for a Bounder passed in, whose stored attributes are its options); ``batch_size``: examples per
    certify call."""
    kind = type(bounder)
    registered = Bounder.registry.get(bounder.name) is kind
    return {
        "weights": fingerprint(model),
        "eps": float(eps),
        "clip": None if clip is None else [float(c) for c in clip],
        "backend": bounder.name if registered else f"{kind.__module__}.{kind.__qualname__}",
        "options": _describe(dict(options) if options is not None else dict(vars(bounder))),
        "batch_size": int(batch_size),
        "versions": package_versions(),
    }


def settings_hash(settings: dict) -> str:
    """sha256 (hex) of the settings' canonical JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# -- the store ---------------------------------------------------------------------------------------


def open_store(store) -> ResultStore | None:
    """``store`` as a ResultStore: one already, a path (table ``DEFAULT_TABLE``) or None."""
    if store is None or isinstance(store, ResultStore):
        return store
    if isinstance(store, (str, Path)):
        return ResultStore(store, DEFAULT_TABLE)
    raise TypeError(f"store must be a ResultStore, a path or None, got {type(store).__name__}")


def runs_table(store: ResultStore) -> ResultStore:
    """The companion table holding each run's settings under its hash."""
    return ResultStore(store.path, f"{store.table}_runs")


def record_run(store: ResultStore, key: str, settings: dict) -> None:
    with runs_table(store) as runs:
        if key not in runs:
            runs.put(key, settings)


def stored_records(store: ResultStore, key: str) -> dict:
    """{(index, digest): record} of the examples done under settings hash ``key``."""
    return {(k[1], k[2]): record for k, record in store.items(prefix=key)}


def put_records(store: ResultStore, key: str, records: list) -> None:
    """Store finished examples' records in one transaction."""
    store.put_many(((key, r["index"], r["digest"]), r) for r in records)


def _settings_key(store: ResultStore, settings) -> str:
    """A settings hash, its unique prefix among the store's runs, or a settings dict → the full hash."""
    if isinstance(settings, dict):
        return settings_hash(settings)
    with runs_table(store) as runs:
        matches = [k for k in runs.keys() if k.startswith(str(settings))]
    if len(matches) != 1:
        raise ValueError(f"settings {settings!r} match {len(matches)} runs of {store} (see stored_runs)")
    return matches[0]


def results_frame(records: list):
    """Records (dicts) as a DataFrame with ``COLUMNS``, one row each in the order given."""
    import pandas as pd

    rows = [{**r, "verdict": VERDICT.get(r["status"], UNDECIDED), "counterexample_found": r["status"] == "counterexample"}
            for r in records]
    return pd.DataFrame(rows).reindex(columns=COLUMNS)


def stored_results(store, settings):
    """Every stored result of the run with ``settings`` (its hash, a unique prefix of it, or the settings
    dict), as a results frame ordered by index."""
    store = open_store(store)
    key = _settings_key(store, settings)
    records = sorted(stored_records(store, key).values(), key=lambda r: r["index"])
    frame = results_frame(records)
    frame.attrs["settings"] = key
    return frame


def stored_runs(store):
    """One row per run in ``store``: its settings hash, settings, and the number of results stored."""
    import pandas as pd

    store = open_store(store)
    with runs_table(store) as runs:
        rows = [{"settings": key, **{k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in s.items()},
                 "results": len(store.items(prefix=key))} for key, s in runs.items()]
    return pd.DataFrame(rows)


def summary(frame) -> dict:
    """Counts and rates of a results frame: robust error = 1 − certified / n (what no backend proves
    robust), its lower end the counterexamples / n, the undecided examples (unknown, time limits, errors),
    and the seconds spent certifying (summed over examples)."""
    n = len(frame)
    certified = int((frame["verdict"] == "robust").sum())
    refuted = int((frame["verdict"] == "not robust").sum())
    errors = int(frame["status"].astype(str).str.startswith("error").sum())
    return {"examples": n, "certified": certified, "counterexamples": refuted, "undecided": n - certified - refuted,
            "errors": errors, "robust_error": (n - certified) / n if n else math.nan,
            "adversarial_error_at_least": refuted / n if n else math.nan,
            "certify_seconds": float(frame["seconds"].sum())}


def export_results(frame, path) -> list:
    """Write a results frame as ``<path>.csv`` and ``<path>.md`` (pandas ``to_csv`` / ``to_markdown``);
    the paths written."""
    stem = Path(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".md")]
    frame.to_csv(paths[0], index=False)
    paths[1].write_text(frame.to_markdown(index=False) + "\n")
    return paths


__all__ = ["COLUMNS", "VERDICT", "fingerprint", "example_digests", "run_settings", "settings_hash",
           "open_store", "stored_results", "stored_runs", "summary", "export_results"]
