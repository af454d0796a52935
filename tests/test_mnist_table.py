"""experiments.mnist_table: one shared ``--quick`` run on real MNIST (skipped without $POLYTOPE_LAB_DATA),
checked for its columns, the orderings clean ≤ FGSM ≤ PGD ≤ bound and PGD ≤ MILP ≤ bound, and resuming."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

import polytope_lab as pl
from conftest import real_mnist_dir
from experiments import cli, mnist_table
from polytope_lab import evaluation, training

R, M = "ball", "ball∩[0,1]"
COLUMNS = ["model", "source", "train images", "epochs", "train s/epoch", "test images", "clean err %",
           f"FGSM err % ({R})", f"PGD err % ({R})", f"bound err % ({R})", "MILP images", "MILP settled %",
           f"MILP exact err % ({M})", "MILP exact err % upper", f"PGD err % on MILP images ({M})",
           f"bound err % on MILP images ({M})", "clean s", "FGSM s", "PGD s", "bound s", "MILP s"]


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as info:
        mnist_table.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ["--seed", "--device", "--out", "--quick", "--eps", "--clip", "--models", "--checkpoint",
                   "--train-size", "--test-size", "--milp-samples", "--milp-time-limit", "--paper", "--data-dir"]:
        assert option in out


@pytest.mark.parametrize("argv", [["--models", "adversarial"], ["--checkpoint", "no-equals-sign"],
                                  ["--checkpoint", "wk=/no/such/file.pth"], ["--models", "none"]])
def test_bad_options_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as info:
        mnist_table.parse_args(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    data_dir = str(real_mnist_dir().parent)
    out = tmp_path_factory.mktemp("mnist_table")
    argv = ["--quick", "--out", str(out), "--data-dir", data_dir]
    mnist_table.main(argv)
    return out, argv


@pytest.mark.slow
def test_quick_run_writes_the_table(quick_run):
    out, _ = quick_run
    table = pd.read_csv(out / "table.csv")
    assert list(table.columns) == COLUMNS
    assert list(table["model"]) == ["standard", "pgd", "robust"]
    assert (table["test images"] == 100).all() and (table["train images"] == 500).all()
    header = (out / "table.md").read_text().splitlines()[0]
    assert [c.strip() for c in header.strip("|").split("|")] == COLUMNS
    assert "Notes:" in (out / "table.md").read_text()
    meta = json.loads((out / "table.json").read_text())["meta"]
    assert meta["pgd_eval"]["steps"] == 100 and meta["pgd_eval"]["step_size"] == 0.001
    for mode in ["standard", "pgd", "robust"]:
        log = pd.read_csv(out / "logs" / f"{mode}.csv")
        assert list(log.columns) == training.LOG_COLUMNS and len(log) == 1
        assert meta["training"]["seconds_per_epoch"][mode] == [round(log["seconds"][0], 2)]
    assert (table["train s/epoch"] > 0).all()
    for seconds in ["clean s", "FGSM s", "PGD s", "bound s"]:
        assert (table[seconds] > 0).all()


@pytest.mark.slow
def test_attacks_lie_below_the_bound(quick_run):
    out, _ = quick_run
    table = pd.read_csv(out / "table.csv")
    clean, fgsm, pgd, bound = (table[c] for c in COLUMNS[6:10])
    assert (clean <= fgsm).all() and (fgsm <= pgd).all() and (pgd <= bound).all()
    assert (bound <= 100).all()
    if "milp" not in pl.Bounder.available():
        assert table["MILP images"].eq(0).all()
        return
    exact, upper, pgd_m, bound_m = (table[c] for c in COLUMNS[12:16])
    assert (table["MILP images"] == 3).all()
    assert ((exact <= upper) & (pgd_m <= upper) & (exact <= bound_m)).all()
    assert table["MILP settled %"].between(0, 100).all()
    meta = json.loads((out / "table.json").read_text())["meta"]
    assert all(all(result.values()) for result in meta["checks"].values()), meta["checks"]
    per_image = pd.concat([pd.read_csv(p) for p in sorted((out / "milp").glob("*.csv"))])
    assert len(per_image) == 9 and set(per_image["image"]) == {0, 1, 2}
    assert list(per_image.columns) == mnist_table.MILP_COLUMNS
    with cli.result_store(out, "milp_images") as store:                  # the resumable copy of those rows
        assert len(store) == 9
    # a verified counterexample is never certified by the sound bound; a MILP-certified image is never attacked
    assert not (per_image["status"].eq("counterexample") & ~per_image["bound_error"]).any()
    assert not (per_image["status"].eq("certified") & per_image["pgd_error"]).any()
    # an image PGD breaks is a counterexample without a solve; every other image went to the solver
    assert (per_image["by"] == per_image["pgd_error"].map({True: "pgd", False: "milp"})).all()
    assert per_image.loc[per_image["by"] == "pgd", "status"].eq("counterexample").all()


def _copy_of_run(out, tmp_path):
    """A copy of the quick run's output folder, and its store of finished cells."""
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    return copy, cli.result_store(copy, "cells")


def _boom(*args, **kwargs):
    raise AssertionError("a finished cell or training was recomputed")


@pytest.mark.slow
def test_rerun_skips_finished_cells(quick_run, tmp_path, monkeypatch):
    out, argv = quick_run
    copy, cells = _copy_of_run(out, tmp_path)
    assert len(cells) == 15                                           # 3 models × 5 columns
    removed = cells.get(("robust", "fgsm"))
    assert cells.delete(("robust", "fgsm"))
    cells.close()
    checkpoints = {p: p.stat().st_mtime_ns for p in copy.glob("checkpoints/*/checkpoint.pt")}
    assert len(checkpoints) == 3
    for module, name in [(pl, "pgd"), (training, "pgd"), (training, "robust_loss")]:
        monkeypatch.setattr(module, name, _boom)
    monkeypatch.setattr(pl.Bounder, "create", _boom)
    monkeypatch.setitem(evaluation.ATTACKS, "pgd", _boom)
    mnist_table.main(argv[:1] + ["--out", str(copy)] + argv[3:])   # only robust's FGSM cell is computed again
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints
    with cli.result_store(copy, "cells") as redone:
        again = redone.get(("robust", "fgsm"))
    assert (again["errors"], again["n"], again["key"]) == (removed["errors"], removed["n"], removed["key"])
    a, b = pd.read_csv(out / "table.csv"), pd.read_csv(copy / "table.csv")
    values = [c for c in COLUMNS if not c.endswith(" s")]
    pd.testing.assert_frame_equal(a[values], b[values])


@pytest.mark.slow
def test_missing_milp_backend_is_noted(quick_run, tmp_path, monkeypatch):
    out, argv = quick_run
    copy, cells = _copy_of_run(out, tmp_path)
    for model in ("standard", "pgd", "robust"):
        assert cells.delete((model, "milp"))
    cells.close()
    monkeypatch.setattr(pl.Bounder, "available", classmethod(lambda cls: ["interval", "dual"]))
    table = mnist_table.main(argv[:1] + ["--out", str(copy)] + argv[3:])
    assert table["MILP images"].eq(0).all() and table[COLUMNS[12]].isna().all()
    assert "MILP columns skipped" in (copy / "table.md").read_text()



def test_exact_option_chooses_the_exact_backend():
    """``--exact bab``: the exact ("MILP") columns by branch and bound with the same time limit; the key of
    those cells changes (no mixing with stored MILP cells), the others' keys do not; the notes say so."""
    from polytope_lab.bab import BaBBounder
    from polytope_lab.milp import MILPBounder
    milp_args, bab_args = mnist_table.parse_args(["--quick"]), mnist_table.parse_args(["--quick", "--exact", "bab"])
    assert milp_args.exact == "milp" and bab_args.exact == "bab"
    milp, bab = mnist_table.exact_bounder(milp_args), mnist_table.exact_bounder(bab_args)
    assert isinstance(milp, MILPBounder) and isinstance(bab, BaBBounder)
    assert bab.time_limit == milp.time_limit == milp_args.milp_time_limit
    spec = {"mode": "standard"}
    a, b = mnist_table.cell_keys(spec, milp_args, None), mnist_table.cell_keys(spec, bab_args, None)
    assert a["milp"] != b["milp"] and all(a[k] == b[k] for k in a if k != "milp")
    assert any("branch and bound" in line for line in mnist_table.notes(bab_args, True))
    assert not any("branch and bound" in line for line in mnist_table.notes(milp_args, True))
