"""Verify a whole test set, one verdict per example, on a Dask cluster, into a durable result store.

    df = pl.verify_dataset(model, X, y, eps=0.1, clip=(0, 1), backend="milp", store="runs.sqlite")

Engine (``dask.distributed``): without ``client``, an embedded ``LocalCluster`` of ``workers`` worker
processes (default: one per core), one thread each; with ``client`` (a ``Client``, or a scheduler address
``tcp://host:port``) the same job on an existing cluster. The model and the examples go to every worker
once (``scatter``); the examples are submitted in chunks; a task certifies its examples one at a time,
``bounder.certify(model, LinfBall(x, eps, clip), y)``, under one torch thread (a solver's ``threads``
option defaults to 1 too), so that a worker per core does not oversubscribe the machine.

Durability: the records of a chunk are written to ``store`` in one transaction as the chunk completes
(``distributed.as_completed``), keyed by the run's settings hash and the example (:mod:`polytope_lab.runs`):
a driver that dies loses at most the chunks in flight, and a rerun with the same settings computes only the
examples not stored. Faults: a worker that dies mid-task (killed, out of memory) has its tasks rerun on
another worker, at most ``retries`` times (the embedded scheduler's ``allowed-failures``; an existing
cluster uses its own), then the chunk is split into single examples, and an example that still kills its
worker is stored as ``"error: KilledWorker: …"``; a ``certify`` that raises is that example's
``"error: <type>: <message>"`` and the run goes on; a solver's time limit is the status ``"time_limit"``.
A task that fails outside ``certify`` (after ``retries`` reruns: a module missing on the workers, data lost
with every worker) stops the run with a RuntimeError; what arrived before is stored.
"""
from __future__ import annotations

import contextlib
import math
import os
import time

import torch
from distributed import Client, KilledWorker, LocalCluster, as_completed, get_worker
from tqdm.auto import tqdm

from .bounds import Bounder, error_status
from .regions import LinfBall
from .runs import (example_digests, open_store, put_records, record_run, results_frame, run_settings, settings_hash,
                   stored_records)
from .store import ResultStore

#: the default chunk: about this many chunks per worker (balance at the end), at most ``MAX_CHUNK`` examples
CHUNKS_PER_WORKER = 8
MAX_CHUNK = 32
CONNECT_TIMEOUT = 10.0


def default_chunk_size(n_examples: int, n_workers: int) -> int:
    """Examples per task: ``CHUNKS_PER_WORKER`` chunks per worker, 1 to ``MAX_CHUNK`` examples each."""
    return max(1, min(MAX_CHUNK, math.ceil(n_examples / (CHUNKS_PER_WORKER * max(1, n_workers)))))


def _worker_name() -> str:
    try:
        return str(get_worker().name)
    except ValueError:  # not inside a Dask worker
        return "local"


def _records(cert, seconds: float) -> list:
    """Per example of a Certification: status, margin, counterexample (a list, or None), seconds."""
    out = []
    for k, status in enumerate(cert.status):
        found = status == "counterexample"
        out.append({"status": status, "margin": float(cert.margin[k]),
                    "counterexample_margin": float(cert.counterexample_margin[k]),
                    "counterexample": cert.counterexample[k].tolist() if found else None, "seconds": seconds})
    return out


def _certify(bounder: Bounder, model, X, y, part: list, eps, clip, alone: bool) -> list | None:
    """The records of examples ``part`` from one certify call (their seconds: its time, shared equally).
    Whatever it raises is each example's status when ``alone`` (one example), else None (try them alone)."""
    start = time.perf_counter()
    try:
        cert = bounder.certify(model, LinfBall(X[part], eps, clip=clip), y[part])
    except Exception as exc:  # one example's failure is its status: the run goes on
        if not alone:
            return None
        return [{"status": error_status(f"{type(exc).__name__}: {exc}"), "margin": -math.inf,
                 "counterexample_margin": math.nan, "counterexample": None,
                 "seconds": time.perf_counter() - start}]
    return _records(cert, (time.perf_counter() - start) / len(part))


def certify_chunk(bounder: Bounder, model, X, y, indices, digests, eps, clip, batch_size: int = 1) -> list:
    """The task: the records of examples ``indices`` of ``X``, ``y`` (the scattered full set), certified
    ``batch_size`` at a time under one torch thread; a batch whose certify raises is redone one by one."""
    torch.set_num_threads(1)
    records = []
    for s in range(0, len(indices), batch_size):
        part = indices[s:s + batch_size]
        done = _certify(bounder, model, X, y, part, eps, clip, alone=len(part) == 1)
        records += done if done is not None else [r for i in part
                                                  for r in _certify(bounder, model, X, y, [i], eps, clip, True)]
    worker = _worker_name()
    return [{"index": i, "digest": d, "label": int(y[i]), **r, "worker": worker}
            for i, d, r in zip(indices, digests, records)]


def _killed(indices, digests, exc) -> list:
    """Records of examples that killed their worker process (out of memory, ...) more than ``retries`` times."""
    status = error_status(f"{type(exc).__name__}: {exc}")
    return [{"index": i, "digest": digests[i], "label": None, "status": status, "margin": -math.inf,
             "counterexample_margin": math.nan, "counterexample": None, "seconds": math.nan, "worker": None}
            for i in indices]


def connect(address: str, timeout: float = CONNECT_TIMEOUT) -> Client:
    """A Client of the scheduler at ``address``; ConnectionError within ``timeout`` s if none answers there,
    ValueError if ``address`` is not an address."""
    try:
        return Client(address, timeout=timeout, set_as_default=False)
    except ValueError as exc:
        raise ValueError(f"{address!r} is not a Dask scheduler address (e.g. tcp://host:8786): {exc}") from exc
    except (OSError, TimeoutError) as exc:
        raise ConnectionError(f"no Dask scheduler answered at {address} within {timeout} s ({exc}); start one "
                              f"with `dask scheduler` and workers with `dask worker {address}`") from exc


@contextlib.contextmanager
def cluster_client(client=None, workers: int | None = None, retries: int = 3, timeout: float = CONNECT_TIMEOUT,
                   at_most: int | None = None):
    """The Client to run on: ``client`` itself, one connected to an address, or an embedded LocalCluster of
    ``workers`` processes (default one per core, but no more than ``at_most``), one thread each, whose
    scheduler reruns a task whose worker died at most ``retries`` times; closed afterwards."""
    if client is not None and workers is not None:
        raise ValueError("workers= sizes the embedded cluster; with client= the cluster has its own workers")
    if isinstance(client, str):
        with connect(client, timeout) as c:
            yield c
        return
    if client is not None:
        if not isinstance(client, Client):
            raise TypeError(f"client must be a dask.distributed Client or a scheduler address, got "
                            f"{type(client).__name__}")
        yield client
        return
    n = min((os.cpu_count() or 1), at_most or math.inf) if workers is None else int(workers)
    if n < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                      scheduler_kwargs={"allowed_failures": retries}) as cluster:
        with Client(cluster, set_as_default=False) as c:
            yield c


def run_chunks(client: Client, bounder, model, X, y, todo: list, digests: list, eps, clip, chunk_size: int,
               retries: int, batch_size: int = 1):
    """Yield each chunk's records as the chunk completes (scatter once, submit, ``as_completed``); pending
    tasks are cancelled when the caller stops early."""
    model_f, X_f, y_f = client.scatter([model, X, y], broadcast=True)
    chunks = {}

    def submit(indices):
        future = client.submit(certify_chunk, bounder, model_f, X_f, y_f, indices, [digests[i] for i in indices],
                               eps, clip, batch_size, retries=retries, pure=False)
        chunks[future.key] = (future, indices)
        return future

    pending = as_completed([submit(todo[s:s + chunk_size]) for s in range(0, len(todo), chunk_size)],
                           loop=client.loop)
    try:
        for future in pending:
            _, indices = chunks.pop(future.key)
            try:
                records = future.result()
            except KilledWorker as exc:
                if len(indices) > 1:  # find the example that kills its worker: each on its own
                    for i in indices:
                        pending.add(submit([i]))
                    continue
                records = _killed(indices, digests, exc)
            except Exception as exc:  # outside certify: the setup is broken (a module missing on the workers, ...)
                raise RuntimeError(f"a task failed outside certify (rerun up to {retries} times): {type(exc).__name__}: {exc}; "
                                   "the results that arrived before are stored, a rerun resumes") from exc
            future.release()
            yield records
    finally:
        client.cancel([f for f, _ in chunks.values()])


def _bounder(backend, options):
    """(bounder, the options it was created with by name, or None for a Bounder given)."""
    if isinstance(backend, Bounder):
        if options:
            raise ValueError("options= applies to a backend given by name; a Bounder carries its own")
        return backend, None
    options = dict(options or {})
    if "threads" in Bounder.registry.get(backend, Bounder).options():
        options.setdefault("threads", 1)  # one solver thread per worker process
    return Bounder.create(backend, **options), options


def _check(bounder: Bounder, model, X, y, eps, clip):
    """X, y as tensors, checked on the driver (shapes, labels, ε and clip) before anything is sent."""
    X, y = torch.as_tensor(X), torch.as_tensor(y).long().reshape(-1)
    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} examples but y has {len(y)} labels")
    if len(X):
        network, _ = bounder.prepare(model, LinfBall(X[:1], eps, clip=clip))
        if tuple(X.shape[1:]) != tuple(network.input_shape):
            raise ValueError(f"examples have shape {tuple(X.shape[1:])} but the network takes {network.input_shape}")
        if ((y < 0) | (y >= network.output_size)).any():
            raise ValueError(f"labels must lie in [0, {network.output_size}), got {y.min().item()}..{y.max().item()}")
    return X, y


def verify_dataset(model, X, y, eps, clip=None, backend="dual", options=None, client=None, workers=None,
                   store=None, progress: bool = False, chunk_size: int | None = None, batch_size: int = 1,
                   retries: int = 3, timeout: float = CONNECT_TIMEOUT):
    """Certify every ``LinfBall(X[i], eps, clip)`` for label ``y[i]`` with ``backend`` (a registered name
    with ``options``, or a Bounder) on a Dask cluster (module docstring); a pandas DataFrame, one row per
    example in input order: ``index, label, verdict`` (robust, not robust, undecided), ``status`` (the
    Certification's), ``margin`` (proven lower bound of ``min_j f_y − f_j``), ``counterexample_found``,
    ``counterexample_margin``, ``seconds`` (of its certify) and ``worker``.

    ``client``: a ``dask.distributed.Client`` or a scheduler address (ConnectionError within ``timeout``
    s if none answers); else an embedded cluster of ``workers`` processes. ``store``: a
    :class:`~polytope_lab.store.ResultStore` or a path (table ``"verify"``); examples already stored under
    the same settings are not certified again. ``chunk_size``: examples per task (default
    :func:`default_chunk_size`). ``batch_size``: examples per certify call within a task (default 1: each
    example's result and time its own; the dual bound is several times faster per example in batches, and
    its margins then differ by rounding, so the batch size is a setting of the run). ``retries``: reruns of
    a task whose worker died. ``progress``: a tqdm bar with the running robust error. ``df.attrs``:
    ``settings`` (the hash), ``computed``, ``reused`` (from the store), ``wall_seconds``, ``chunk_size``.
    """
    started = time.perf_counter()
    if client is not None and workers is not None:
        raise ValueError("workers= sizes the embedded cluster; with client= the cluster has its own workers")
    if int(batch_size) < 1 or int(retries) < 0:
        raise ValueError(f"batch_size must be >= 1 and retries >= 0, got {batch_size!r} and {retries!r}")
    bounder, given = _bounder(backend, options)
    X, y = _check(bounder, model, X, y, eps, clip)
    settings = run_settings(model, eps, clip, bounder, given, batch_size=int(batch_size))
    key, digests = settings_hash(settings), example_digests(X, y)
    opened = store is not None and not isinstance(store, ResultStore)
    store = open_store(store)
    try:
        done = {} if store is None else stored_records(store, key)
        records = {i: done[(i, d)] for i, d in enumerate(digests) if (i, d) in done}
        todo = [i for i in range(len(X)) if i not in records]
        attrs = {"settings": key, "computed": len(todo), "reused": len(records), "chunk_size": None}
        if store is not None:
            record_run(store, key, settings)
        if todo:
            with cluster_client(client, workers, retries, timeout, at_most=len(todo)) as c:
                size = chunk_size or default_chunk_size(len(todo), len(c.nthreads()))
                if size < 1:
                    raise ValueError(f"chunk_size must be None or >= 1, got {chunk_size!r}")
                attrs["chunk_size"] = size
                unproven = sum(r["status"] != "certified" for r in records.values())
                bar = tqdm(total=len(X), initial=len(records), desc=f"verify ({bounder.name})", disable=not progress)
                with bar:
                    for chunk in run_chunks(c, bounder, model, X, y, todo, digests, eps, clip, size, retries,
                                            int(batch_size)):
                        if store is not None:
                            put_records(store, key, chunk)
                        records.update((r["index"], r) for r in chunk)
                        unproven += sum(r["status"] != "certified" for r in chunk)
                        bar.update(len(chunk))
                        bar.set_postfix(robust_error=f"{unproven / len(records):.2%}")
    finally:
        if opened:
            store.close()
    frame = results_frame([records[i] for i in range(len(X))])
    frame.attrs.update(attrs, wall_seconds=time.perf_counter() - started)
    return frame


__all__ = ["verify_dataset", "certify_chunk", "cluster_client", "connect", "default_chunk_size", "run_chunks"]
