"""experiments.toy2d: the CLI, the files of a --quick run, the sandwich of its numbers, determinism."""
import json

import numpy as np
import pandas as pd
import pytest

import polytope_lab as pl
from experiments import cli, toy2d
from polytope_lab import models

FILES = ["polytopes.png", "polytopes_box.png", "classifiers.png", "training.png", "polytopes.csv", "polytopes.md",
         "polytopes.json", "classifiers.csv", "classifiers.md", "classifiers.json", "training_log.csv", "toy2d.json"]
TIMING = ["s_true", "s_dual", "s_lp", "s_milp", "seconds"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy2d")
    summary = toy2d.main(["--quick", "--out", str(out), "--seed", "3"])
    return out, summary


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as info:
        toy2d.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ["--seed", "--device", "--out", "--quick", "--epochs-robust", "--milp-time-limit"]:
        assert option in out


def test_bad_options_are_rejected(tmp_path):
    with pytest.raises(SystemExit):
        toy2d.main(["--quick", "--out", str(tmp_path), "--directions", "1"])


def test_quick_run_writes_every_file(quick):
    out, summary = quick
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    saved = json.loads((out / "toy2d.json").read_text())
    assert saved["settings"]["seed"] == 3 and saved["settings"]["epochs_robust"] == summary["settings"]["epochs_robust"]
    assert sorted(saved["files"]) == sorted(n for n in FILES if n.endswith(".png"))
    poly = pd.read_csv(out / "polytopes.csv")
    cfg = saved["settings"]
    assert len(poly) == cfg["nets"] * len(cfg["eps"]) and sorted(set(poly["eps"])) == sorted(cfg["eps"])
    log = pd.read_csv(out / "training_log.csv")
    assert log.groupby("training")["epoch"].max().to_dict() == {"standard": cfg["epochs_standard"],
                                                                "robust": cfg["epochs_robust"]}
    assert log.loc[log["training"] == "robust", "robust_loss"].notna().all()
    with cli.result_store(out, "polytopes") as store:                  # the table's rows in the result store
        assert sorted(store.keys()) == sorted(zip(poly["eps"], poly["net"]))


def test_polytope_sandwich(quick):
    """true ⊆ LP ⊆ dual ⊆ interval box: every sampled output inside every outer set, areas ordered."""
    poly = pd.read_csv(quick[0] / "polytopes.csv")
    assert (poly["max_violation"] <= 1e-6).all()                     # sampled true points inside all outer bounds
    assert (poly["area_true"] > 0).all()
    assert (poly["area_true"] <= poly["area_hull"] * 1.05).all()      # raster vs exact hull of the samples
    assert (poly["area_hull"] <= poly["area_lp"] * (1 + 1e-6)).all()
    assert (poly["lp_tighter_by"] >= -1e-7).all()                    # per direction: LP optimum ≥ dual bound
    assert (poly["area_lp"] <= poly["area_dual"] * (1 + 1e-9)).all()
    assert (poly["area_dual"] <= poly["area_box"] * (1 + 1e-9)).all()
    assert (poly["dual_w1"] <= poly["box_w1"] + 1e-9).all() and (poly["true_w1"] <= poly["dual_w1"] + 1e-9).all()
    # the MILP's support lines are exact: each touches the sampled set (up to the grid's resolution)
    assert (poly["milp_optimal"] == "4/4").all()
    assert (poly["milp_touch_gap"] <= 0.05 * poly[["true_w1", "true_w2"]].max(axis=1)).all()
    # looser with ε: the dual's area ratio to the true set grows from the smallest to the largest ε
    by_eps = poly.groupby("eps")["dual/true"].mean()
    assert by_eps.iloc[-1] > by_eps.iloc[0]


def test_classifier_numbers_are_consistent(quick):
    clf = pd.read_csv(quick[0] / "classifiers.csv").set_index("training")
    assert list(clf.index) == ["standard", "robust"]
    for col in ("clean_error", "pgd_error", "grid_attack_error", "robust_error_bound"):
        assert clf[col].between(0, 1).all()
    # attacks find real adversarial points: a certified point is never attacked
    assert (clf["robust_error_bound"] >= clf[["pgd_error", "grid_attack_error", "clean_error"]].max(axis=1)).all()


def test_same_seed_same_numbers(quick, tmp_path):
    toy2d.main(["--quick", "--out", str(tmp_path), "--seed", "3"])
    for name in ("polytopes.csv", "classifiers.csv", "training_log.csv"):
        a, b = (pd.read_csv(d / name) for d in (quick[0], tmp_path))
        keep = [c for c in a.columns if c not in TIMING]
        pd.testing.assert_frame_equal(a[keep], b[keep], check_exact=True)


def test_exact_support_lines_by_bab_equal_the_milp():
    """``--exact bab``: the exact support lines (max of cᵀf over the box per direction) by branch and bound
    are the MILP's, both optimal, and touch the true set (the grid's image)."""
    args, cfg = toy2d.parse_args(["--quick", "--exact", "bab"])
    assert cfg["exact"] == "bab"
    net, x0 = models.random_network(cfg["sizes"], 3)
    region = pl.LinfBall(x0, 0.1)
    shapes = {}
    for exact in ("milp", "bab"):
        cfg = {**cfg, "exact": exact}
        row, shapes[exact] = toy2d.outer_bounds(net, region, cfg, toy2d.make_bounders(cfg, "cpu"), "cpu")
        assert row["milp_optimal"] == f"{2 * cfg['milp_directions']}/{2 * cfg['milp_directions']}"
        assert row["max_violation"] <= 1e-6 and row["milp_touch_gap"] <= 0.05
    np.testing.assert_allclose(shapes["bab"]["milp"]["values"], shapes["milp"]["milp"]["values"], atol=1e-4)
