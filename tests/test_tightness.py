"""experiments.tightness: the CLI, part A end to end on a small random net (the sandwich of ranges in its
CSV, resuming, seeds), the checks' failure messages, and part B on real MNIST when POLYTOPE_LAB_DATA is set."""

import pandas as pd
import pytest
import torch

import polytope_lab as pl
from polytope_lab.milp import MILPBounder
from conftest import real_mnist_dir
from experiments import tightness
from polytope_lab import checks

#: loosest to tightest: each range must contain the next (the grid's values are attained)
ORDER = ["interval", "dual", "dual-optimized", "lp", "milp", "grid"]
TOL = 1e-5


def contains(outer, inner, tol=TOL):
    return checks.containment_gap(outer["lower"], outer["upper"], inner["lower"], inner["upper"], tol) <= 0


def no_recomputation(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a row already in the CSV was recomputed")
    monkeypatch.setattr(pl.Bounder, "bound", fail)
    monkeypatch.setattr(MILPBounder, "certify", fail)


def test_help_lists_the_common_options(capsys):
    with pytest.raises(SystemExit) as info:
        tightness.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ["--seed", "--device", "--out", "--quick", "--eps", "--methods", "--model", "--overwrite"]:
        assert option in out


@pytest.fixture(scope="module")
def quick_a(tmp_path_factory):
    out = tmp_path_factory.mktemp("tightness")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as conftest does for each test: on a loaded 2-core machine, 10x faster
    try:
        tables = tightness.main(["--quick", "--parts", "A", "--eps", "0.05", "0.25", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return out, tables["random_net"]


def test_part_a_writes_its_files_and_the_ranges_nest(quick_a):
    out, table = quick_a
    for name in ["random_net.csv", "random_net.md", "random_net.json", "random_net.png", "settings.json"]:
        assert (out / name).is_file(), name
    csv = pd.read_csv(out / "random_net.csv")
    assert list(csv.columns) == tightness.A_COLUMNS
    assert len(csv) == len(table) == 2 * 2 * len(ORDER)                     # ε × coordinates × methods
    for (eps, j), group in csv.groupby(["eps", "coordinate"]):
        by = group.set_index("method")
        assert by.loc["milp", "status"] == "optimal"
        for outer, inner in zip(ORDER, ORDER[1:]):
            assert contains(by.loc[outer], by.loc[inner]), f"ε={eps}, z{j}: {outer} ⊉ {inner}"
        assert by.loc["milp", "width / true width"] == 1.0
        assert by.loc["grid", "width / true width"] > 0.9                  # the MILP's range is attained
        assert by.loc["interval", "width / true width"] > 2                # and far inside the interval one
    assert csv["check"].str.match(r"ok|reference").all(), csv["check"].tolist()
    assert "| eps |" in (out / "random_net.md").read_text().replace("   ", " ").replace("  ", " ")


def test_part_a_resumes_without_recomputing(quick_a, monkeypatch):
    out, _ = quick_a
    before = pd.read_csv(out / "random_net.csv")
    assert (out / "results.sqlite").is_file()
    no_recomputation(monkeypatch)
    tightness.main(["--quick", "--parts", "A", "--eps", "0.05", "0.25", "--out", str(out)])
    pd.testing.assert_frame_equal(pd.read_csv(out / "random_net.csv"), before)


def test_same_seed_same_numbers(quick_a, tmp_path):
    _, first = quick_a
    methods = ["interval", "dual", "milp"]
    args = ["--quick", "--parts", "A", "--eps", "0.05", "--methods", *methods]
    again = tightness.main([*args, "--out", str(tmp_path / "same")])["random_net"]
    other = tightness.main([*args, "--seed", "1", "--out", str(tmp_path / "other")])["random_net"]
    key = ["eps", "coordinate", "method"]
    ref = first[first["eps"] == 0.05].set_index(key).loc[again.set_index(key).index]
    for col in ["lower", "upper"]:
        assert (again.set_index(key)[col] - ref[col]).abs().max() < 1e-9
        assert (other.set_index(key)[col] - ref[col]).abs().max() > 1e-3


def test_other_settings_are_not_mixed_into_old_results(quick_a):
    out, _ = quick_a
    with pytest.raises(SystemExit, match="--overwrite"):
        tightness.main(["--quick", "--parts", "A", "--seed", "7", "--out", str(out)])


def test_checks_report_violations():
    rows = [{"eps": 0.1, "coordinate": 1, "method": m, "lower": lo, "upper": hi, "width": hi - lo, "seconds": 0.0,
             "status": "optimal"}
            for m, lo, hi in [("dual", 0.0, 1.0), ("lp", -0.5, 1.0), ("milp", 0.2, 0.8), ("grid", 0.2, 0.8)]]
    checks = tightness.finish_a(pd.DataFrame(rows), [0.1], TOL).set_index("method")["check"]
    assert checks["dual"].startswith("does not contain lp")
    assert checks["lp"].startswith("ok")
    images = [{"network": "n", "eps": 0.1, "method": m, "image": 0, "label": 3, "margin lower bound": v,
               "certified": c, "status": s, "seconds": 0.0}
              for m, v, c, s in [("dual", 0.5, True, "ok"), ("dual-optimized", 0.4, True, "ok"),
                                 ("milp", float("nan"), False, "counterexample")]]
    checks = tightness.summarise(pd.DataFrame(images), ["n"], [0.1], tightness.METHODS, 1, TOL).set_index("method")
    assert "margin above dual-optimized's" in checks.loc["dual", "check"]
    assert "UNSOUND" in checks.loc["dual-optimized", "check"]
    assert checks.loc["milp", "check"] == "exact"


def test_part_b_on_mnist(tmp_path, monkeypatch):
    real_mnist_dir()
    args = ["--quick", "--parts", "B", "--eps", "0.05", "--samples", "2", "--methods", "dual", "dual-optimized", "milp",
            "--out", str(tmp_path)]
    summary = tightness.main(args)["mnist"]
    for name in ["mnist.csv", "mnist.md", "mnist_images.csv", "mnist_certified.png"]:
        assert (tmp_path / name).is_file(), name
    assert list(pd.read_csv(tmp_path / "mnist.csv").columns) == tightness.B_COLUMNS
    by = summary.set_index("method")
    assert list(by.index) == ["dual", "dual-optimized", "milp"] and (by["images"] == 2).all()
    assert by.loc["dual-optimized", "mean margin lower bound"] >= by.loc["dual", "mean margin lower bound"] - 1e-5
    assert by.loc["milp", "certified fraction"] >= by.loc["dual-optimized", "certified fraction"]
    assert summary["check"].isin(["ok", "exact"]).all(), summary["check"].tolist()
    assert list(tmp_path.glob("mlp_*/checkpoint.json"))
    before = pd.read_csv(tmp_path / "mnist_images.csv")
    no_recomputation(monkeypatch)
    tightness.main(args)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "mnist_images.csv"), before)


def test_exact_column_by_bab_equals_the_milp(quick_a, tmp_path):
    """``--exact bab``: part A's exact column (label "milp") by branch and bound: the same ranges as the
    MILP's within bab's tolerance, "optimal", and recorded in settings.json."""
    _, first = quick_a
    args = ["--quick", "--parts", "A", "--eps", "0.05", "--methods", "dual", "milp", "--exact", "bab"]
    table = tightness.main([*args, "--out", str(tmp_path / "bab")])["random_net"]
    key = ["eps", "coordinate", "method"]
    bab = table[table["method"] == "milp"].set_index(key)
    milp = first.set_index(key).loc[bab.index]
    assert (bab["status"] == "optimal").all()
    for col in ["lower", "upper"]:
        assert ((bab[col] - milp[col]).abs() <= 1e-4 * milp[col].abs().clip(lower=1)).all(), (bab, milp)
    assert '"exact": "bab"' in (tmp_path / "bab" / "settings.json").read_text()
