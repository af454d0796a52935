"""One VNN-COMP instance, shared by ``run`` and ``bench`` (:mod:`experiments.vnncomp`): load it, verify it
with :func:`polytope_lab.pipeline.verify_property`, check a counterexample as the competition does
(onnxruntime on X as written, X in its box, a disjunct on onnxruntime's Y) and render the results file.
Light at import (numpy only): ``run`` starts its watchdog before torch is imported."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VERDICTS = ("sat", "unsat", "timeout", "unknown", "error")
#: configurations of the pipeline (``verify_property`` keyword arguments) that ``bench`` can compare
CONFIGS = {"default": {}, "no-attack": {"stages": ("dual", "dual-optimized", "exact")}}
#: seconds kept back from the pipeline's budget for the onnxruntime check and the results file
MARGIN_SECONDS, MARGIN_FRACTION = 0.5, 0.02


# ---------------------------------------------------------------------------------------- loading


@dataclass
class Instance:
    """A loaded instance: the network (normal form), the property, the onnxruntime session."""
    network: object
    prop: object
    session: object
    input_name: str
    input_shape: tuple
    input_dtype: type


def ort_session(onnx_path):
    """(session, input name, input shape with the batch as 1, numpy input dtype) of the original network."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in inp.shape)
    dtype = {"tensor(float)": np.float32, "tensor(double)": np.float64}.get(inp.type)
    if dtype is None:
        raise ValueError(f"{onnx_path}: input {inp.name!r} has type {inp.type}; only float/double inputs")
    return session, inp.name, shape, dtype


def load_instance(onnx_path, vnnlib_path, networks: dict | None = None) -> Instance:
    """Load (or take from the cache ``networks``) the network and its session, and parse the property."""
    import polytope_lab as pl
    for path in (onnx_path, vnnlib_path):
        if not Path(path).is_file():
            raise FileNotFoundError(f"no such file: {path}")
    key = str(Path(onnx_path).resolve())
    if networks is None or key not in networks:
        loaded = (pl.load_onnx(onnx_path), *ort_session(onnx_path))
        if networks is not None:
            networks[key] = loaded
    network, session, name, shape, dtype = networks[key] if networks is not None else loaded
    prop = pl.read_vnnlib(vnnlib_path, network.input_size, network.output_size)
    return Instance(network, prop, session, name, shape, dtype)


# ---------------------------------------------------------------------------------------- the witness


def witness(inst: Instance, case, x) -> tuple:
    """``(X, Y, "")`` to write for the counterexample ``x`` of ``case``, or ``(None, None, reason)``.

    X is x in the input's dtype, nudged by one ulp where rounding left the box, and must lie in the box
    (float64 comparison); Y is onnxruntime's output on X, flattened in C order; Y must satisfy every row of
    a disjunct of ``case`` strictly (the parser reads ``<`` as ``≤``: a tie is written as ``unknown``)."""
    from polytope_lab.properties import satisfied
    X = np.asarray(x, dtype=np.float64).reshape(-1).astype(inst.input_dtype)
    lo, hi = case.lo.astype(inst.input_dtype), case.hi.astype(inst.input_dtype)
    X = np.where(X.astype(np.float64) < case.lo, np.nextafter(X, lo.dtype.type(np.inf)), X)
    X = np.where(X.astype(np.float64) > case.hi, np.nextafter(X, hi.dtype.type(-np.inf)), X)
    if X.size != case.lo.size or not np.isfinite(X).all():
        return None, None, f"the counterexample has {X.size} finite-or-not values, the box {case.lo.size}"
    if (X.astype(np.float64) < case.lo).any() or (X.astype(np.float64) > case.hi).any():
        return None, None, "the counterexample, in the input's dtype, leaves the box"
    out = inst.session.run(None, {inst.input_name: X.reshape(inst.input_shape)})[0]
    Y = np.asarray(out).reshape(-1)
    if Y.size != inst.network.output_size or not np.isfinite(Y).all():
        return None, None, f"onnxruntime gave {Y.size} outputs (finite: {bool(np.isfinite(Y).all())})"
    if not bool(satisfied(case, Y.astype(np.float64)[None], strict=True)[0].any()):  # a tie may break a `<`
        return None, None, "onnxruntime's output on the counterexample satisfies no disjunct strictly"
    return X, Y, ""


def results_text(verdict: str, X=None, Y=None) -> str:
    """The results file's content: the verdict line, and after ``sat`` the ``((X_i v) … (Y_j v))`` list."""
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    if verdict != "sat":
        return verdict + "\n"
    entries = [f"(X_{i} {float(v)!r})" for i, v in enumerate(X)] + [f"(Y_{j} {float(v)!r})" for j, v in enumerate(Y)]
    return "sat\n(" + "\n ".join(entries) + ")\n"


def write_results(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file beside it, renamed)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- solving


@dataclass
class Outcome:
    """One instance's answer: the verdict, the stage that decided, the seconds, the results file's text,
    and a message (why unknown/error, what was left open)."""
    verdict: str
    stage: str | None
    seconds: float
    text: str
    message: str = ""


def solve(inst: Instance, time_limit: float, config: str = "default", seed: int = 0, threads=None) -> Outcome:
    """Verify a loaded instance within ``time_limit`` seconds; a sat only with a checked witness."""
    from polytope_lab.pipeline import verify_property
    start = time.monotonic()
    if time_limit <= 0:
        return Outcome("timeout", None, 0.0, results_text("timeout"), "no time left after loading")
    result = verify_property(inst.network, inst.prop, time_limit, seed=seed, threads=threads, **CONFIGS[config])
    verdict, message = result.verdict, result.message
    text = results_text(verdict) if verdict != "sat" else None
    if verdict == "sat":
        cex = result.counterexample
        X, Y, reason = witness(inst, inst.prop[cex.case], cex.x)
        if X is None:
            verdict, message = "unknown", f"counterexample rejected by the onnxruntime check: {reason}"
            text = results_text("unknown")
        else:
            text = results_text("sat", X, Y)
    return Outcome(verdict, result.stage, time.monotonic() - start, text, message)


def budget(timeout: float, age: float) -> float:
    """The pipeline's seconds: the timeout less the process's age and the margin for check and write."""
    return timeout - age - MARGIN_SECONDS - MARGIN_FRACTION * timeout
