"""VNN-LIB 1.0: a tokenizer and parser of its S-expression grammar (no package parses 1.0).

    file    := command*                  ; comments run from ';' to the end of the line
    command := (declare-const X_i Real) | (declare-const Y_j Real) | (assert bool)
    bool    := (and bool*) | (or bool*) | (op arith arith),   op ∈ <= >= < > =
    arith   := number | X_i | Y_j | (+ arith+) | (- arith+) | (* arith+)   ; linear: one variable per product

Every comparison becomes an :class:`Atom` ``Σ coeffs·v + const ≤ 0``; :mod:`polytope_lab.vnnlib` turns the
formula into boxes and output rows. Errors are :class:`VNNLibError` with the line and what was expected.
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple

__all__ = ["Atom", "VNNLibError", "parse_v1", "tokenize", "read_sexprs"]

_TOKENS = re.compile(r";[^\n]*|\(|\)|[^\s();]+|\n")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_NON_FINITE = re.compile(r"[+-]?(inf|infinity|nan)", re.IGNORECASE)
_VARIABLE = re.compile(r"([XY])_(\d+)")
COMPARISONS = ("<=", ">=", "<", ">", "=")


class VNNLibError(ValueError):
    """A malformed or unsupported property: ``source:line: expected …, got …`` (``line`` 0: not known)."""

    def __init__(self, source: str, line: int, expected: str):
        self.source, self.line = source, int(line)
        super().__init__(f"{source}:{line}: expected {expected}" if line else f"{source}: expected {expected}")


class Atom(NamedTuple):
    """``Σ coeffs[(kind, i)]·v + const ≤ 0`` with kind "X" (input) or "Y" (output); ``line`` where it is."""
    coeffs: dict
    const: float
    line: int

    @staticmethod
    def compare(op: str, left, right, line: int, source: str):
        """``left op right`` for linear sides ``(coeffs, const)``: an Atom, or two for ``=``. Strict
        ``<``/``>`` are read as ``<=``/``>=`` (the closure: a superset of the unsafe set)."""
        if op == "=":
            return ("and", [Atom.compare("<=", left, right, line, source), Atom.compare(">=", left, right, line, source)])
        if op in (">=", ">"):
            left, right = right, left
        coeffs = dict(left[0])
        for key, a in right[0].items():
            coeffs[key] = coeffs.get(key, 0.0) - a
        const = left[1] - right[1]
        if not all(math.isfinite(a) for a in coeffs.values()) or not math.isfinite(const):
            raise VNNLibError(source, line, "finite constants, got a comparison that evaluates to inf or NaN")
        return Atom({k: a for k, a in coeffs.items() if a != 0.0}, const, line)


class Sym(str):
    """A token with the line it is on."""
    line: int = 0


class SList(list):
    """A parenthesised list with the line of its ``(``."""
    line: int = 0


def tokenize(text: str):
    """Yield (token, line): ``(``, ``)`` and symbols; comments dropped."""
    line = 1
    for m in _TOKENS.finditer(text):
        tok = m.group()
        if tok == "\n":
            line += 1
        elif not tok.startswith(";"):
            yield tok, line


def read_sexprs(text: str, source: str) -> list:
    """The top-level S-expressions of ``text`` (SList of SList/Sym), or a VNNLibError for unbalanced
    parentheses or a symbol outside any list."""
    stack = [SList()]
    for tok, line in tokenize(text):
        if tok == "(":
            node = SList()
            node.line = line
            stack[-1].append(node)
            stack.append(node)
        elif tok == ")":
            if len(stack) == 1:
                raise VNNLibError(source, line, "a command '(' … ')', got an unmatched ')'")
            stack.pop()
        elif len(stack) == 1:
            raise VNNLibError(source, line, f"a command '(' … ')', got {tok!r} outside parentheses")
        else:
            sym = Sym(tok)
            sym.line = line
            stack[-1].append(sym)
    if len(stack) > 1:
        raise VNNLibError(source, stack[-1].line, "')' to close the '(' opened on this line, got the end of the file")
    return stack[0]


def parse_v1(text: str, sizes: dict, source: str = "<string>"):
    """A VNN-LIB 1.0 file as one formula ``("and", [...])`` of its assertions; ``sizes`` = {"X": n_inputs,
    "Y": n_outputs} bounds the variable indices."""
    reader = _Reader(sizes, source)
    return ("and", [f for node in read_sexprs(text, source) for f in reader.command(node)])


class _Reader:
    def __init__(self, sizes: dict, source: str):
        self.sizes, self.source, self.declared = sizes, source, {}

    def fail(self, node, expected: str):
        raise VNNLibError(self.source, getattr(node, "line", 0), expected)

    def command(self, node) -> list:
        """The formulas of one top-level command (none for a declaration)."""
        head = node[0] if node and isinstance(node[0], Sym) else None
        if head == "declare-const":
            self.declare(node)
            return []
        if head == "assert":
            if len(node) != 2:
                self.fail(node, f"(assert <condition>) with one condition, got {len(node) - 1}")
            return [self.boolean(node[1])]
        self.fail(node, f"(declare-const …) or (assert …), got {_show(node)}")

    def declare(self, node):
        if len(node) != 3 or not isinstance(node[1], Sym) or node[2] != "Real":
            self.fail(node, f"(declare-const <X_i or Y_j> Real), got {_show(node)}")
        m = _VARIABLE.fullmatch(node[1])
        if m is None:
            self.fail(node, f"a variable named X_<i> (input) or Y_<j> (output), got {node[1]!r}")
        kind, index = m.group(1), int(m.group(2))
        if index >= self.sizes[kind]:
            what = "inputs" if kind == "X" else "outputs"
            self.fail(node, f"an index below {self.sizes[kind]} (the network has {self.sizes[kind]} {what}), "
                            f"got {node[1]}")
        if str(node[1]) in self.declared:
            self.fail(node, f"each variable declared once, got {node[1]} again")
        self.declared[str(node[1])] = (kind, index)

    def boolean(self, node):
        head = node[0] if isinstance(node, SList) and node and isinstance(node[0], Sym) else None
        if head in ("and", "or"):
            return (str(head), [self.boolean(c) for c in node[1:]])
        if head in COMPARISONS:
            if len(node) != 3:
                self.fail(node, f"({head} a b) with two operands, got {len(node) - 1}")
            return Atom.compare(str(head), self.arith(node[1]), self.arith(node[2]), node.line, self.source)
        self.fail(node, f"(and …), (or …) or a comparison ({' | '.join(COMPARISONS)} a b), got {_show(node)}")

    def arith(self, node):
        """``({(kind, index): coefficient}, constant)`` of a linear expression."""
        if isinstance(node, Sym):
            return self.atom(node)
        head = node[0] if node and isinstance(node[0], Sym) else None
        if head not in ("+", "-", "*") or len(node) < 2:
            self.fail(node, f"a number, a declared variable or (+ …), (- …), (* …), got {_show(node)}")
        parts = [self.arith(c) for c in node[1:]]
        if head == "*":
            return self.product(node, parts)
        if head == "-":
            signs = [-1.0] if len(parts) == 1 else [1.0] + [-1.0] * (len(parts) - 1)
        else:
            signs = [1.0] * len(parts)
        coeffs, const = {}, 0.0
        for s, (c, k) in zip(signs, parts):
            for key, a in c.items():
                coeffs[key] = coeffs.get(key, 0.0) + s * a
            const += s * k
        return coeffs, const

    def product(self, node, parts):
        variables = [p for p in parts if p[0]]
        if len(variables) > 1:
            self.fail(node, f"a linear expression (at most one variable in a product), got {_show(node)}")
        scale = math.prod(k for c, k in parts if not c)
        if not variables:
            return {}, scale
        coeffs, const = variables[0]
        return {key: scale * a for key, a in coeffs.items()}, scale * const

    def atom(self, sym: Sym):
        if _NUMBER.fullmatch(sym):
            value = float(sym)
            if not math.isfinite(value):
                self.fail(sym, f"a finite constant, got {sym} (overflows to inf)")
            return {}, value
        if _NON_FINITE.fullmatch(sym):
            self.fail(sym, f"a finite constant, got {sym}")
        if str(sym) not in self.declared:
            self.fail(sym, f"a declared variable (declare-const X_i/Y_j Real) or a number, got unknown {sym!r}")
        return {self.declared[str(sym)]: 1.0}, 0.0


def _show(node, limit: int = 60) -> str:
    """A short rendering of a node for error messages."""
    if isinstance(node, Sym):
        return repr(str(node))
    text = "(" + " ".join(_show(c) if isinstance(c, SList) else str(c) for c in node) + ")"
    return text if len(text) <= limit else text[:limit - 4] + " …)"
