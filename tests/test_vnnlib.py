"""VNN-LIB in (polytope_lab.vnnlib, .sexpr) and properties as objectives (polytope_lab.properties).

The 30 shared mnistfc properties parse to what their text says (checked against an independent regex
reading); 1.0 and 2.0 renderings of one property give the same Property, multi-box files included;
malformed files raise errors with their line; and bounds over a case's box refute a disjunct only where
sampling, PGD and the MILP find no unsafe point.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import polytope_lab as pl
from polytope_lab import properties
from polytope_lab.vnnlib import Case, Disjunct, Property, VNNLibError, parse_vnnlib, vnnlib_version

from conftest import make_mlp, real_path

# --------------------------------------------------------------------------------------------------
# the shared VNN-COMP 2021 mnistfc properties
# --------------------------------------------------------------------------------------------------

MNISTFC = [f"prop_{i}_{eps}.vnnlib" for i in range(15) for eps in ("0.03", "0.05")]


def mnistfc_dir():
    return real_path("POLYTOPE_LAB_BENCHMARKS", "vnncomp2021", "mnistfc",
                     what="vnncomp2021/mnistfc/ (the VNN-COMP 2021 mnistfc network and its 30 properties)")


def regex_reading(text: str):
    """An independent reading of a mnistfc file: the label, lo, hi and the (j, label) pairs of Y_j >= Y_label."""
    label = int(re.search(r"label: (\d+)", text).group(1))
    lo, hi = np.full(784, np.nan), np.full(784, np.nan)
    for op, i, v in re.findall(r"\(assert \((<=|>=) X_(\d+) ([-+0-9.eE]+)\)\)", text):
        (hi if op == "<=" else lo)[int(i)] = float(v)
    pairs = [(int(j), int(k)) for j, k in re.findall(r"\(and \(>= Y_(\d+) Y_(\d+)\)\)", text)]
    return label, lo, hi, pairs


@pytest.mark.parametrize("name", MNISTFC)
def test_shared_mnistfc_properties_parse_to_what_the_file_says(name):
    path = mnistfc_dir() / name
    prop = pl.read_vnnlib(path, 784, 10)
    label, lo, hi, pairs = regex_reading(path.read_text())
    eps = float(name.rsplit("_", 1)[1].removesuffix(".vnnlib"))
    assert prop.version == "1.0" and prop.n_inputs == 784 and prop.n_outputs == 10
    assert len(prop) == 1
    case = prop[0]
    assert case.lo.shape == (784,) and (case.lo >= 0).all() and (case.hi <= 1).all()
    np.testing.assert_array_equal(case.lo, lo)      # every bound exactly as written (no NaN left)
    np.testing.assert_array_equal(case.hi, hi)
    width = case.hi - case.lo
    assert width.max() <= 2 * eps + 1e-6 and width.max() >= 2 * eps - 1e-6   # clipped to [0, 1] somewhere
    assert (width < 2 * eps - 1e-6).any()
    assert len(case.disjuncts) == 9 and sorted(j for j, _ in pairs) == [j for j in range(10) if j != label]
    for d, (j, k) in zip(case.disjuncts, pairs):    # Y_j >= Y_label  <=>  Y_label - Y_j <= 0
        assert k == label
        expected = np.zeros((1, 10))
        expected[0, label], expected[0, j] = 1.0, -1.0
        np.testing.assert_array_equal(d.A, expected)
        np.testing.assert_array_equal(d.b, [0.0])
    box = case.region((784, 1), dtype=torch.float32)   # the ONNX input [1, 784, 1] less its batch dim
    assert box.input_shape == (784, 1) and box.batch_size == 1
    assert (box.box()[0].double().reshape(-1).numpy() <= case.lo).all()
    assert (box.box()[1].double().reshape(-1).numpy() >= case.hi).all()


# --------------------------------------------------------------------------------------------------
# 1.0 and 2.0 renderings of the same properties
# --------------------------------------------------------------------------------------------------

V1_SINGLE = """; one box, an or of ands
(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const X_2 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(assert (>= X_0 -0.5))
(assert (<= X_0 0.5))
(assert (and (>= X_1 0.0) (<= X_1 1.0)))
(assert (<= X_2 2.0))
(assert (>= X_2 2.0))
(assert (or
    (and (>= Y_0 Y_1) (<= Y_1 0.25))
    (and (<= (+ Y_0 (* -2.0 Y_1)) 1.5))
    (and (>= Y_1 -3))))
"""

V2_HEADER = """(vnnlib-version <2.0>)
(declare-network net
    (declare-input X float64 [3])
    (declare-output Y float64 [2]))
"""

V2_SINGLE = V2_HEADER + """(assert (>= X[0] -0.5))
(assert (<= X[0] 0.5))
(assert (and (>= X[1] 0.0) (<= X[1] 1.0)))
(assert (<= X[2] 2.0))
(assert (>= X[2] 2.0))
(assert (or
    (and (>= Y[0] Y[1]) (<= Y[1] 0.25))
    (and (<= (+ Y[0] (* -2.0 Y[1])) 1.5))
    (and (>= Y[1] -3.0))))
"""


def _case(lo, hi, *disjuncts):
    return Case(np.array(lo, dtype=float), np.array(hi, dtype=float),
                [Disjunct(np.array(A, dtype=float).reshape(-1, 2), np.array(b, dtype=float)) for A, b in disjuncts])


SINGLE = Property([_case([-0.5, 0.0, 2.0], [0.5, 1.0, 2.0],
                         ([[-1, 1], [0, 1]], [0, 0.25]), ([[1, -2]], [1.5]), ([[0, -1]], [3.0]))], 3, 2)

V1_MULTI = """(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const X_2 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(assert (or
    (and (>= X_0 0.0) (<= X_0 1.0) (>= X_1 0.0) (<= X_1 1.0) (>= X_2 0.0) (<= X_2 1.0) (>= Y_0 Y_1))
    (and (>= X_0 2.0) (<= X_0 3.0) (>= X_1 0.0) (<= X_1 1.0) (>= X_2 -1.0) (<= X_2 0.0) (<= Y_1 0.5))
    (and (>= X_0 2.0) (<= X_0 3.0) (>= X_1 0.0) (<= X_1 1.0) (>= X_2 -1.0) (<= X_2 0.0) (<= Y_0 -0.5))))
"""

V2_MULTI = V2_HEADER + re.sub(r"([XY])_(\d)", r"\1[\2]", V1_MULTI.split("\n", 5)[5])

MULTI = Property([_case([0, 0, 0], [1, 1, 1], ([[-1, 1]], [0])),
                  _case([2, 0, -1], [3, 1, 0], ([[0, 1]], [0.5]), ([[1, 0]], [-0.5]))], 3, 2)


@pytest.mark.parametrize("v1, v2, expected", [(V1_SINGLE, V2_SINGLE, SINGLE), (V1_MULTI, V2_MULTI, MULTI)],
                         ids=["one-box", "multi-box"])
def test_v1_and_v2_renderings_give_the_same_property(v1, v2, expected, tmp_path):
    (tmp_path / "p1.vnnlib").write_text(v1)
    (tmp_path / "p2.vnnlib").write_text(v2)
    p1 = pl.read_vnnlib(tmp_path / "p1.vnnlib", 3, 2)
    p2 = pl.read_vnnlib(tmp_path / "p2.vnnlib", 3, 2)
    assert (p1.version, p2.version) == ("1.0", "2.0")
    assert p1 == expected, p1
    assert p2 == expected, p2
    assert p1 != Property(expected[:1], 3, 2) or len(expected) == 1


def test_the_vnnlib_packages_compat_transform_mishandles_multi_box_properties():
    """Why only the package's AST is used: for input boxes in an ``or`` (or one box in an ``and``) next to
    an output ``(assert (or …))``, its compat.transform (1.0.2) returns the output disjuncts on an unbounded
    box plus each box with no output constraint (every point unsafe). We distribute: every box gets both."""
    vnnlib = pytest.importorskip("vnnlib")
    from vnnlib import compat
    box1 = "(>= X[0] 0.0) (<= X[0] 1.0) (>= X[1] 0.0) (<= X[1] 1.0) (>= X[2] 0.0) (<= X[2] 1.0)"
    box2 = "(>= X[0] 2.0) (<= X[0] 3.0) (>= X[1] 0.0) (<= X[1] 1.0) (>= X[2] -1.0) (<= X[2] 0.0)"
    outputs = "(assert (or (>= Y[0] Y[1]) (<= Y[1] 0.5)))\n"
    two = V2_HEADER + f"(assert (or (and {box1}) (and {box2})))\n" + outputs
    one = V2_HEADER + f"(assert (and {box1}))\n" + outputs
    disjuncts = (([[-1, 1]], [0]), ([[0, 1]], [0.5]))
    assert parse_vnnlib(two, 3, 2) == Property([_case([0, 0, 0], [1, 1, 1], *disjuncts),
                                                _case([2, 0, -1], [3, 1, 0], *disjuncts)], 3, 2)
    assert parse_vnnlib(one, 3, 2) == Property([_case([0, 0, 0], [1, 1, 1], *disjuncts)], 3, 2)
    for text, n_boxes in ((two, 2), (one, 1)):
        theirs = compat.transform(vnnlib.parse_query_string(text))
        unbounded = [c for c in theirs if np.isinf(np.array(c.input_box)).all()]
        empty = [c for c in theirs if [len(p.rhs) for p in c.output_constraints] == [0]]
        assert len(theirs) == n_boxes + 1 and len(unbounded) == 1 and len(empty) == n_boxes, \
            "vnnlib's compat.transform changed: re-check read_vnnlib's docstring"


def test_multi_box_product_and_shared_output_condition():
    """An ``or`` of input boxes next to a separate output ``or``: every box gets every disjunct."""
    text = "\n".join(f"(declare-const {v} Real)" for v in ("X_0", "X_1", "Y_0", "Y_1")) + """
(assert (or (and (>= X_0 0) (<= X_0 1) (>= X_1 0) (<= X_1 1))
            (and (>= X_0 1) (<= X_0 2) (>= X_1 0) (<= X_1 1))))
(assert (or (>= Y_0 Y_1) (and (<= Y_0 0.5) (<= Y_1 0.5))))
"""
    prop = parse_vnnlib(text, 2, 2)
    assert len(prop) == 2
    assert prop[0].lo.tolist() == [0, 0] and prop[1].lo.tolist() == [1, 0]
    for case in prop:
        assert [d.A.tolist() for d in case.disjuncts] == [[[-1, 1]], [[1, 0], [0, 1]]]
        assert [d.b.tolist() for d in case.disjuncts] == [[0], [0.5, 0.5]]


def test_version_detection_and_comments():
    assert vnnlib_version(V1_SINGLE) == "1.0" and vnnlib_version(V2_SINGLE) == "2.0"
    assert vnnlib_version("; (declare-network in a comment)\n" + V1_SINGLE) == "1.0"


def test_strict_and_equal_comparisons():
    """``<``, ``>`` read as their closures (a superset: an unsat stays sound); ``=`` is two rows."""
    text = "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (= X_0 0.25))\n" \
           "(assert (or (< Y_0 1) (> Y_0 2)))\n"
    case, = parse_vnnlib(text, 1, 1)
    assert case.lo.tolist() == [0.25] and case.hi.tolist() == [0.25]
    assert [(d.A.tolist(), d.b.tolist()) for d in case.disjuncts] == [([[1.0]], [1.0]), ([[-1.0]], [-2.0])]


# --------------------------------------------------------------------------------------------------
# malformed files
# --------------------------------------------------------------------------------------------------

HEAD = "(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"   # lines 1-3
BOX = "(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (>= X_1 0))\n(assert (<= X_1 1))\n"   # lines 4-7

MALFORMED = {
    "unclosed": (HEAD + BOX + "(assert (<= Y_0 1)\n", 8, r"'\)' to close the '\(' opened on this line"),
    "extra-paren": (HEAD + BOX + "(assert (<= Y_0 1)))\n", 8, r"unmatched '\)'"),
    "unknown-command": (HEAD + "(declare-fun Y_1 () Real)\n" + BOX, 4, r"\(declare-const …\) or \(assert …\), got"),
    "bad-type": (HEAD + "(declare-const Y_1 Int)\n" + BOX, 4, r"\(declare-const <X_i or Y_j> Real\)"),
    "bad-name": (HEAD + "(declare-const Z_0 Real)\n" + BOX, 4, r"X_<i> \(input\) or Y_<j> \(output\), got 'Z_0'"),
    "index-range": (HEAD + "(declare-const X_2 Real)\n" + BOX, 4, r"index below 2 \(the network has 2 inputs\)"),
    "redeclared": (HEAD + "(declare-const X_0 Real)\n" + BOX, 4, r"declared once, got X_0 again"),
    "unknown-var": (HEAD + BOX + "(assert (<= Y_1 1))\n", 8, r"declared variable .* got unknown 'Y_1'"),
    "inf": (HEAD + BOX + "(assert (<= Y_0 inf))\n", 8, r"finite constant, got inf"),
    "nan": (HEAD + BOX + "(assert (<= Y_0 NaN))\n", 8, r"finite constant, got NaN"),
    "overflow": (HEAD + BOX + "(assert (<= Y_0 1e999))\n", 8, r"finite constant, got 1e999"),
    "one-operand": (HEAD + BOX + "(assert (<= Y_0))\n", 8, r"\(<= a b\) with two operands, got 1"),
    "bad-operator": (HEAD + BOX + "(assert (== Y_0 1))\n", 8, r"\(and …\), \(or …\) or a comparison"),
    "assert-arity": (HEAD + BOX + "(assert (<= Y_0 1) (<= Y_0 2))\n", 8, r"one condition, got 2"),
    "nonlinear": (HEAD + BOX + "(assert (<= (* X_0 X_1) 1))\n", 8, r"at most one variable in a product"),
    "outside": (HEAD + "X_0\n" + BOX, 4, r"got 'X_0' outside parentheses"),
    "empty-box": (HEAD + BOX + "(assert (>= X_1 2))\n", 7, r"non-empty box: X_1 >= 2.0 \(line 8\).*lo > hi"),
    "unbounded": (HEAD + BOX.replace("(assert (<= X_1 1))\n", ""), 4, r"upper bound on every input: X_1 has none"),
    "input-input": (HEAD + BOX + "(assert (<= X_0 X_1))\n", 8, r"bound of one input .* between inputs X_0, X_1"),
    "mixed": (HEAD + BOX + "(assert (<= X_0 Y_0))\n", 8, r"mixing X_0, Y_0"),
    "constants": (HEAD + BOX + "(assert (<= 1 2))\n", 8, r"comparison with a variable"),
    "empty-or": (HEAD + BOX + "(assert (or))\n", 0, r"empty disjunction"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_v1_files_raise_with_the_line(name, tmp_path):
    text, line, message = MALFORMED[name]
    path = tmp_path / f"{name}.vnnlib"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        pl.read_vnnlib(path, 2, 1)
    assert isinstance(info.value, VNNLibError) and info.value.line == line, str(info.value)
    assert str(info.value).startswith(f"{path}:{line}: expected " if line else f"{path}: expected ")


V2_ONE = V2_HEADER.replace("[3]", "[1]").replace("[2]", "[1]")
V2_MALFORMED = {
    "syntax": (V2_ONE + "(assert (andd (>= X[0] 0.0)))\n", r"(?s)vnnlib package reports: .*line 5"),
    "index": (V2_ONE + "(assert (>= X[3] 0.0))\n", r"(?s)vnnlib package reports: .*IndexOutOfBounds"),
    "overflow": (V2_ONE + "(assert (<= X[0] 1" + "0" * 400 + ".0))\n", r"reports: IndexError .*beyond float64"),
    "shape": (V2_HEADER + "(assert (>= X[0] 0.0))\n", r"X with 1 values \(shape \[3\] has 3\)"),
    "unbounded": (V2_ONE + "(assert (>= X[0] 0.0))\n(assert (<= Y[0] 0.0))\n", r":5: expected an upper bound"),
    "empty-box": (V2_ONE + "(assert (>= X[0] 1.0))\n(assert (<= X[0] 0.0))\n", r":6: expected a non-empty box"),
}


@pytest.mark.parametrize("name", sorted(V2_MALFORMED))
def test_malformed_v2_files_raise_clearly(name):
    pytest.importorskip("vnnlib")
    text, message = V2_MALFORMED[name]
    with pytest.raises(VNNLibError, match=message):
        parse_vnnlib(text, 1, 1)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="n_inputs and n_outputs must be >= 1"):
        parse_vnnlib(V1_SINGLE, 0, 2)
    with pytest.raises(VNNLibError, match="index below 2"):
        parse_vnnlib(V1_SINGLE, 2, 2)       # declares X_2


# --------------------------------------------------------------------------------------------------
# properties as objectives, end to end
# --------------------------------------------------------------------------------------------------

def _v1_text(lo, hi, disjuncts) -> str:
    """A VNN-LIB 1.0 rendering of one box and its disjuncts (rows ``A y <= b``), constants exact (repr)."""
    n_out = disjuncts[0][0].shape[1]
    lines = [f"(declare-const X_{i} Real)" for i in range(len(lo))]
    lines += [f"(declare-const Y_{j} Real)" for j in range(n_out)]
    for i, (a, b) in enumerate(zip(lo, hi)):
        lines += [f"(assert (>= X_{i} {float(a)!r}))", f"(assert (<= X_{i} {float(b)!r}))"]

    def row(r, b):
        terms = " ".join(f"(* {float(c)!r} Y_{j})" for j, c in enumerate(r))
        return f"(<= (+ {terms}) {float(b)!r})"
    conj = [f"(and {' '.join(row(r, b) for r, b in zip(A, bs))})" for A, bs in disjuncts]
    return "\n".join(lines + [f"(assert (or {' '.join(conj)}))", ""])


def _unsafe_points(model, case, n=3000, seed=0):
    """Points of the case's box: uniform samples, every vertex, and PGD minimisers of every row."""
    box = case.box
    lo, hi = box.box()
    g = torch.Generator().manual_seed(seed)
    pts = [lo + (hi - lo) * torch.rand(n, lo.shape[1], generator=g, dtype=lo.dtype)]
    d = lo.shape[1]
    bits = torch.tensor([[(k >> i) & 1 for i in range(d)] for k in range(2 ** d)], dtype=lo.dtype)
    pts.append(lo + (hi - lo) * bits)
    C, _, _ = properties.case_objective(case)
    _, argmins = pl.pgd_minimize(model, box, C, steps=100, restarts=3)
    pts.append(argmins.reshape(-1, d))
    x = torch.cat(pts)
    assert ((x >= lo) & (x <= hi)).all()
    with torch.no_grad():
        return properties.satisfied(case, model(x))   # (N, n_disjuncts)


@pytest.fixture(scope="module")
def refutation_problem():
    """A tiny random net, a non-cubic box and four disjuncts placed around the exact row minima (MILP):
    0: one row well below its minimum (no unsafe point); 1: one row above it (unsafe points exist);
    2: a satisfiable row and an unsatisfiable one (no unsafe point, refutable row by row);
    3: ``r f <= t`` and ``r f >= t + gap`` (each satisfiable, jointly not: never refuted row by row)."""
    model = make_mlp([3, 10, 10, 3], seed=7)
    lo = np.array([-0.4, 0.1, 0.0])
    hi = np.array([0.3, 0.2, 0.9])
    g = torch.Generator().manual_seed(3)
    R = torch.randn(3, 3, generator=g, dtype=torch.float64)
    box = pl.Box(torch.from_numpy(lo)[None], torch.from_numpy(hi)[None])
    exact = pl.Bounder.create("milp", threads=1).bound(model, box, C=R)
    assert exact.status == ["optimal"]
    m, M = exact.lower[0].numpy(), exact.upper[0].numpy()
    gap = 0.1 * (M - m)
    Rn = R.numpy()
    mid = (m[2] + M[2]) / 2
    below = m[0] - 10 * gap[0]   # far enough below the minimum for the dual bound to see it
    disjuncts = [(Rn[:1], [below]), (Rn[1:2], [m[1] + gap[1]]),
                 (Rn[[1, 0]], [m[1] + gap[1], below]),
                 (np.stack([Rn[2], -Rn[2]]), [mid, -(mid + gap[2])])]
    disjuncts = [(np.asarray(A, dtype=float), np.asarray(b, dtype=float)) for A, b in disjuncts]
    prop = parse_vnnlib(_v1_text(lo, hi, disjuncts), 3, 3)
    return model, prop


@pytest.mark.parametrize("backend, options", [("interval", {}), ("dual", {}), ("dual", {"alpha": "optimized"}),
                                              ("lp", {}), ("milp", {"threads": 1})],
                         ids=["interval", "dual", "dual-optimized", "lp", "milp"])
def test_bounds_refute_a_disjunct_only_where_no_unsafe_point_is_found(refutation_problem, backend, options):
    model, prop = refutation_problem
    case, = prop
    assert [len(d.b) for d in case.disjuncts] == [1, 1, 2, 2]
    C, offset, groups = properties.case_objective(case)
    assert C.shape == (6, 3) and [g.stop - g.start for g in groups] == [1, 1, 2, 2]
    bounds = pl.Bounder.create(backend, **options).bound(model, case.region(), C=C)
    refuted = properties.refuted(case, bounds)
    found = _unsafe_points(model, case).any(0)
    assert found.tolist() == [False, True, False, False]       # the construction, checked by sampling and PGD
    assert not (refuted & found).any(), (backend, refuted, found)   # soundness: never refute a reachable disjunct
    assert not refuted[3]                                      # sufficient, not necessary: rows are refuted alone
    assert properties.verified(case, bounds) is False
    if backend != "interval":                                  # each refutable disjunct is refuted
        assert refuted.tolist() == [True, False, True, False]


def test_a_case_is_verified_when_every_disjunct_is_refuted(refutation_problem):
    model, prop = refutation_problem
    case = prop[0]
    safe = Case(case.lo, case.hi, [case.disjuncts[0], case.disjuncts[2]])
    C, _, _ = properties.case_objective(safe)
    bounds = pl.Bounder.create("milp", threads=1).bound(model, safe.region(), C=C)
    assert properties.verified(safe, bounds) is True
    estimated = pl.Bounder.create("dual", proj=1).bound(model, safe.region(), C=C)
    if not estimated.sound:
        with pytest.raises(ValueError, match="sound"):
            properties.refuted(safe, estimated)
    with pytest.raises(ValueError, match=r"expected \(1, 3\)"):
        properties.refuted(safe, pl.Bounder.create("interval").bound(model, safe.region(), C=C[:2]))


def test_satisfied_reads_the_unsafe_direction():
    """mnistfc's ``(>= Y_j Y_label)`` is unsafe when another logit reaches the label's."""
    text = "(declare-const X_0 Real)\n" + "".join(f"(declare-const Y_{j} Real)\n" for j in range(3)) + \
           "(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (or (and (>= Y_0 Y_2)) (and (>= Y_1 Y_2))))\n"
    case, = parse_vnnlib(text, 1, 3)
    y = torch.tensor([[0.0, 0.0, 1.0], [2.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    assert properties.satisfied(case, y).tolist() == [[False, False], [True, False], [False, True]]


def test_distributing_and_over_or_is_bounded():
    text = HEAD + BOX + "(assert (or (<= Y_0 1) (<= Y_0 2)))\n" * 17     # 2^17 conjunctions
    with pytest.raises(VNNLibError, match="at most 100000 disjuncts"):
        parse_vnnlib(text, 2, 1)
    case, = parse_vnnlib(HEAD + BOX + "(assert (or (<= Y_0 1) (<= Y_0 2)))\n" * 3, 2, 1)
    assert len(case.disjuncts) == 8 and all(d.A.shape == (3, 1) for d in case.disjuncts)


def test_a_rounded_division_never_shrinks_the_box():
    """``0.1·X_0 ≤ 0.3`` is X_0 ≤ 3, but 0.3/0.1 rounds to 2.9999999999999996: the bound is widened."""
    text = "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (>= (* 0.1 X_0) 0.1))\n" \
           "(assert (<= (* 0.1 X_0) 0.3))\n(assert (<= Y_0 0))\n"
    case = parse_vnnlib(text, 1, 1)[0]
    assert case.hi[0] >= 3.0 and case.lo[0] <= 1.0


def test_strict_satisfaction_rejects_ties():
    case = parse_vnnlib("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
                        "(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (< Y_0 Y_1))\n", 1, 2)[0]
    tie, below = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert properties.satisfied(case, tie).tolist() == [[True]]          # read as ≤ (sound for unsat)
    assert properties.satisfied(case, tie, strict=True).tolist() == [[False]]
    assert properties.satisfied(case, below, strict=True).tolist() == [[True]]
