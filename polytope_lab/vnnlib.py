"""VNN-LIB properties in: :func:`read_vnnlib` → a :class:`Property`, a list of :class:`Case`.

A property states the **unsafe** condition: ``sat`` means a counterexample exists, ``unsat`` that the
network is safe. It is normalised to cases, each an input box ``lo ≤ x ≤ hi`` (flat, ``n_inputs``
coordinates, every one bounded) with an output condition that is a disjunction of conjunctions
``A y ≤ b`` (:class:`Disjunct`): the unsafe set is ``{x ∈ box : A_d f(x) ≤ b_d for some disjunct d}``
for some case.

VNN-LIB 1.0 (the 2021–2024 benchmarks) is read by the small S-expression parser of
:mod:`polytope_lab.sexpr`; 2.0 (``(vnnlib-version <2.0>)``, ``declare-network``) is parsed by the
``vnnlib`` package, whose typed AST is then normalised here like a 1.0 file (its ``compat.transform``
is not used: it splits multi-box properties wrongly, see :func:`read_vnnlib`).

Strict comparisons ``<``/``>`` are read as ``≤``/``≥``: the closure of the unsafe set, a superset, so
an ``unsat`` stays sound; ``=`` is two rows. Malformed files raise :class:`VNNLibError` (a
``ValueError``) naming the file, the line and what was expected.
"""
from __future__ import annotations

from fractions import Fraction

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .regions import Box
from .sexpr import Atom, VNNLibError, parse_v1

#: at most this many conjunctions after distributing ``and`` over ``or`` (a guard against blow-up)
MAX_CONJUNCTIONS = 100_000

__all__ = ["read_vnnlib", "parse_vnnlib", "Property", "Case", "Disjunct", "VNNLibError", "vnnlib_version"]


class Disjunct(NamedTuple):
    """One conjunction of the output condition: ``A y ≤ b``, A (k, n_outputs), b (k,), float64 numpy.
    k = 0 is "true": every output of the box is unsafe."""
    A: np.ndarray
    b: np.ndarray


@dataclass(eq=False)
class Case:
    """An input box (``lo``, ``hi``: (n_inputs,) float64 numpy, finite, lo ≤ hi) with its disjuncts."""
    lo: np.ndarray
    hi: np.ndarray
    disjuncts: list = field(default_factory=list)

    @property
    def box(self) -> Box:
        """The input box as a :class:`Box` of one example, shape (1, n_inputs), float64."""
        return Box(torch.from_numpy(self.lo)[None], torch.from_numpy(self.hi)[None])

    def region(self, input_shape=None, dtype=torch.float64, device=None) -> Box:
        """The box reshaped to ``(1, *input_shape)`` (C order) and cast outward to ``dtype``."""
        shape = (1, *(input_shape or self.lo.shape))
        box = Box(torch.from_numpy(self.lo).reshape(shape), torch.from_numpy(self.hi).reshape(shape))
        return box.to(device=device, dtype=dtype)

    def __eq__(self, other):
        if not isinstance(other, Case):
            return NotImplemented
        same = lambda a, b: a.shape == b.shape and np.array_equal(a, b)  # noqa: E731
        return (same(self.lo, other.lo) and same(self.hi, other.hi) and len(self.disjuncts) == len(other.disjuncts)
                and all(same(d.A, e.A) and same(d.b, e.b) for d, e in zip(self.disjuncts, other.disjuncts)))

    def __repr__(self):
        return (f"Case(n_inputs={self.lo.size}, lo in [{self.lo.min():g}, {self.lo.max():g}], "
                f"hi in [{self.hi.min():g}, {self.hi.max():g}], disjuncts={[len(d.b) for d in self.disjuncts]} rows)")


class Property(list):
    """The cases of a property (a list of :class:`Case`); unsafe iff some case has a point in its box
    whose output satisfies one of its disjuncts. ``version`` "1.0" or "2.0"; ``path`` the file read."""

    def __init__(self, cases=(), n_inputs=0, n_outputs=0, version="1.0", path=None):
        super().__init__(cases)
        self.n_inputs, self.n_outputs, self.version, self.path = n_inputs, n_outputs, version, path

    def __eq__(self, other):
        if isinstance(other, Property) and (self.n_inputs, self.n_outputs) != (other.n_inputs, other.n_outputs):
            return False
        return list.__eq__(self, other)

    __hash__ = None

    def __repr__(self):
        return (f"Property({len(self)} case(s), n_inputs={self.n_inputs}, n_outputs={self.n_outputs}, "
                f"version={self.version}, disjuncts per case={[len(c.disjuncts) for c in self]})")


def vnnlib_version(text: str) -> str:
    """"2.0" if the text (comments aside) declares a version or a network, as VNN-LIB 2.0 does; else "1.0"."""
    code = re.sub(r";[^\n]*", "", text)
    return "2.0" if re.search(r"\(\s*(vnnlib-version|declare-network)\b", code) else "1.0"


def read_vnnlib(path, n_inputs: int, n_outputs: int) -> Property:
    """The property in the VNN-LIB file ``path`` (1.0 or 2.0, detected) for a network with ``n_inputs``
    inputs (flattened in C order) and ``n_outputs`` outputs.

    Raises :class:`VNNLibError` (a ValueError) for a malformed file, an unknown variable, an index out of
    range, a non-finite constant, an input constraint that is not a bound (e.g. ``X_0 ≤ X_1``, or one that
    mixes X and Y), an input left unbounded, or an empty box (lo > hi); an ImportError for a 2.0 file
    when the ``vnnlib`` package is missing.

    2.0 and the ``vnnlib`` package (1.0.2): its ``compat.transform`` does not distribute the assertions'
    conjunction over an output ``(assert (or …))`` when the input bounds come in an ``and`` or in an ``or``
    of boxes (a multi-box property): it returns the output disjuncts on an unbounded box (±inf) plus each
    input box with no output constraint (every point unsafe); it also returns no case at all for an empty
    box. Only the package's parser and typed AST are used here, normalised as for 1.0.
    """
    path = Path(path)
    return parse_vnnlib(path.read_text(), n_inputs, n_outputs, source=str(path))


def parse_vnnlib(text: str, n_inputs: int, n_outputs: int, source: str = "<string>") -> Property:
    """:func:`read_vnnlib` on the text of a file (``source`` names it in errors)."""
    if int(n_inputs) < 1 or int(n_outputs) < 1:
        raise ValueError(f"n_inputs and n_outputs must be >= 1, got {n_inputs}, {n_outputs}")
    sizes = {"X": int(n_inputs), "Y": int(n_outputs)}
    version = vnnlib_version(text)
    if version == "2.0":
        formula = _parse_v2(text, sizes, source)
    else:
        formula = parse_v1(text, sizes, source)
    conjunctions = dnf(formula, source)
    if not conjunctions:
        raise VNNLibError(source, 0, "a satisfiable condition: the assertions form an empty disjunction (or)")
    cases: dict = {}
    for conj in conjunctions:
        lo, hi, disjunct = _split(conj, sizes, source)
        cases.setdefault((lo.tobytes(), hi.tobytes()), Case(lo, hi)).disjuncts.append(disjunct)
    return Property(cases.values(), sizes["X"], sizes["Y"], version, source)


def dnf(formula, source: str = "<formula>") -> list:
    """The conjunctions (tuples of :class:`Atom`) of ``formula`` (an Atom or ``("and"|"or", [children])``)
    in disjunctive normal form; conjuncts with a single disjunct are shared, not multiplied."""
    if isinstance(formula, Atom):
        return [(formula,)]
    op, children = formula
    parts = [dnf(c, source) for c in children]
    if op == "or":
        return [conj for part in parts for conj in part]
    common, product = [], [()]
    for part in parts:
        if len(part) == 1:
            common.extend(part[0])
            continue
        product = [p + q for p in product for q in part]
        if len(product) > MAX_CONJUNCTIONS:
            raise VNNLibError(source, 0, f"at most {MAX_CONJUNCTIONS} disjuncts after distributing and over or")
    return [tuple(common) + p for p in product]


def _split(conj, sizes: dict, source: str):
    """One conjunction → (lo, hi, Disjunct): its X atoms must be bounds of one input each, its Y atoms
    rows of A y ≤ b; every input bounded, lo ≤ hi."""
    n_in, n_out = sizes["X"], sizes["Y"]
    lo, hi = np.full(n_in, -math.inf), np.full(n_in, math.inf)
    lo_line, hi_line = np.zeros(n_in, dtype=np.int64), np.zeros(n_in, dtype=np.int64)
    rows, rhs = [], []
    for atom in conj:
        kinds = {kind for kind, _ in atom.coeffs}
        if kinds == {"Y"}:
            row = np.zeros(n_out)
            for (_, j), a in atom.coeffs.items():
                row[j] = a
            rows.append(row)
            rhs.append(0.0 - atom.const)
        elif kinds == {"X"} and len(atom.coeffs) == 1:
            ((_, i), a), = atom.coeffs.items()
            bound = -atom.const / a
            if a not in (1.0, -1.0) and Fraction(bound) != Fraction(-atom.const) / Fraction(a):
                # the division rounded: widen by one step, so the box never shrinks
                bound = float(np.nextafter(bound, np.inf if a > 0 else -np.inf))
            if a > 0 and bound < hi[i]:
                hi[i], hi_line[i] = bound, atom.line
            elif a < 0 and bound > lo[i]:
                lo[i], lo_line[i] = bound, atom.line
        elif kinds == {"X"}:
            raise VNNLibError(source, atom.line, "a bound of one input (the input set must be a box), got a "
                                                 f"constraint between inputs {_names(atom)}")
        elif kinds:
            raise VNNLibError(source, atom.line, "a constraint on inputs only or on outputs only, got one mixing "
                                                 f"{_names(atom)}")
        else:
            raise VNNLibError(source, atom.line, "a comparison with a variable, got one between constants")
    _check_box(lo, hi, lo_line, hi_line, conj, source)
    A = np.array(rows, dtype=np.float64).reshape(len(rows), n_out)
    return lo, hi, Disjunct(A, np.array(rhs, dtype=np.float64))


def _names(atom: Atom) -> str:
    return ", ".join(f"{k}_{i}" for k, i in atom.coeffs)


def _check_box(lo, hi, lo_line, hi_line, conj, source):
    line = min((a.line for a in conj), default=0)
    for bounds, side in ((lo, "a lower"), (hi, "an upper")):
        missing = np.flatnonzero(~np.isfinite(bounds))
        if missing.size:
            raise VNNLibError(source, line, f"{side} bound on every input: X_{missing[0]} has none "
                                            f"({missing.size} input(s) unbounded) in the disjunct starting here")
    empty = np.flatnonzero(lo > hi)
    if empty.size:
        i = empty[0]
        raise VNNLibError(source, int(hi_line[i]), f"a non-empty box: X_{i} >= {float(lo[i])!r} (line {lo_line[i]}) "
                                                   f"and X_{i} <= {float(hi[i])!r} leave no value (lo > hi)")


# ---------------------------------------------------------------------------------------- VNN-LIB 2.0


def _parse_v2(text: str, sizes: dict, source: str):
    """The assertions of a 2.0 file as one ``("and", [...])`` formula, through the ``vnnlib`` package."""
    try:
        import vnnlib as v2
    except ImportError as e:
        raise ImportError("reading VNN-LIB 2.0 needs the 'vnnlib' package (pip install 'vnnlib>=1.0.2,<1.1')") from e
    try:
        query = v2.parse_query_string(text)
    except (v2.VNNLibException, IndexError, ValueError, RuntimeError) as e:   # C++ out_of_range: IndexError
        what = "" if isinstance(e, v2.VNNLibException) else f"{type(e).__name__} (e.g. a constant beyond float64): "
        raise VNNLibError(source, 0, f"a valid VNN-LIB 2.0 query; the vnnlib package reports: {what}{e}") from None
    if len(query.networks) != 1:
        raise VNNLibError(source, 0, f"one declare-network, got {len(query.networks)}")
    net = query.networks[0]
    if len(net.inputs) != 1 or len(net.outputs) != 1 or len(net.hidden):
        raise VNNLibError(source, 0, f"one declare-input, one declare-output and no hidden variables, got "
                                     f"{len(net.inputs)}, {len(net.outputs)} and {len(net.hidden)}")
    shapes = {}
    for decl, kind in ((net.inputs[0], "X"), (net.outputs[0], "Y")):
        shape = tuple(int(s) for s in decl.shape)
        if int(np.prod(shape)) != sizes[kind]:
            raise VNNLibError(source, 0, f"{decl.name} with {sizes[kind]} values (shape {list(shape)} has "
                                         f"{int(np.prod(shape))})")
        shapes[kind] = shape
    return ("and", [_v2_formula(v2, a.expr, shapes, source) for a in query.assertions])


def _v2_formula(v2, expr, shapes, source):
    if isinstance(expr, v2.And) or isinstance(expr, v2.Or):
        return ("and" if isinstance(expr, v2.And) else "or", [_v2_formula(v2, a, shapes, source) for a in expr.args])
    ops = ((v2.LessEqual, "<="), (v2.LessThan, "<="), (v2.GreaterEqual, ">="), (v2.GreaterThan, ">="),
           (v2.Equal, "="))
    op = next((name for cls, name in ops if isinstance(expr, cls)), None)
    if op is None:
        raise VNNLibError(source, 0, f"and, or or a comparison <=, <, >=, >, ==, got {type(expr).__name__}: {expr}")
    (left, line), (right, line2) = (_v2_linear(side, shapes, source) for side in (expr.lhs, expr.rhs))
    return Atom.compare(op, left, right, line or line2, source)


def _v2_linear(side, shapes, source):
    """({(kind, flat index): coefficient}, constant) of one side, and the line of its first variable."""
    lin = side.to_linear_expr()
    coeffs, line = {}, 0
    for term in lin.terms:
        var = term.var
        kind = {"Input": "X", "Output": "Y"}.get(var.kind.name)
        if kind is None:
            raise VNNLibError(source, var.line, f"an input or output variable, got {term.var_name}")
        shape = shapes[kind]
        idx = tuple(int(i) for i in var.indices)
        if len(idx) != len(shape) or any(not 0 <= i < s for i, s in zip(idx, shape)):
            raise VNNLibError(source, var.line, f"an index in {list(shape)}, got {term.var_name}")
        key = (kind, int(np.ravel_multi_index(idx, shape)) if shape else 0)
        coeffs[key] = coeffs.get(key, 0.0) + float(term.coeff)
        line = line or var.line
    return (coeffs, float(lin.constant)), line
