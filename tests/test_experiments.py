"""The experiment scripts run end to end and write their tables.

The benchmark (and the demo on the pretrained ConvNet) need the real data and weights: they run when
POLYTOPE_LAB_DATA (directory holding mnist/) and POLYTOPE_LAB_MODELS (directory holding
wong_kolter_mnist_eps0.1.pth) are set, and are skipped otherwise.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import polytope_lab as pl
from conftest import pretrained_path, real_mnist_dir
from experiments import benchmark, cli, demo, mnist_table, tightness, toy2d
from polytope_lab import data, models

PRETRAINED = "wong_kolter_mnist_eps0.1.pth"
DEMO_COLUMNS = ["model", "method", "eps", "images", "mean lower margin", "certified", "seconds"]


def real_inputs():
    return str(real_mnist_dir().parent), str(pretrained_path())


EXPERIMENTS = [demo, benchmark, mnist_table, tightness, toy2d]
COMMON = ["--data-dir", "--model", "--threads", "--device", "--seed", "--out", "--quick"]


@pytest.mark.parametrize("module", EXPERIMENTS, ids=lambda m: m.__name__)
def test_help_exits_cleanly(module, capsys):
    with pytest.raises(SystemExit) as info:
        module.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in COMMON:
        assert option in out


def test_one_quick_mechanism_explicit_flags_win():
    parser = cli.ExperimentParser("t", out="o", defaults=dict(n=5, sizes=[2, 3], lr=0.1), quick=dict(n=2, sizes=[1]))
    parser.preset("--paper", dict(n=9, lr=0.5), help="paper")
    parser.setting("--n", type=int, help="n")
    parser.setting("--lr", type=float, help="lr")
    assert "(default: 5; --quick: 2; --paper: 9)" in " ".join(parser.format_help().split())
    settings = lambda argv: parser.settings(parser.parse_args(argv))  # noqa: E731
    assert settings([]) == {"threads": None, "seed": 0, "device": "cpu", "n": 5, "sizes": [2, 3], "lr": 0.1}
    assert settings(["--quick"])["n"] == 2 and settings(["--quick"])["sizes"] == [1]
    assert settings(["--quick", "--n", "7"])["n"] == 7                    # an explicit flag wins over --quick
    assert settings(["--paper"])["n"] == 9 and settings(["--paper", "--quick"])["n"] == 2
    assert settings(["--paper", "--quick"])["lr"] == 0.5 and settings(["--paper", "--lr", "1"])["lr"] == 1.0
    args = parser.parse_args(["--threads", "3", "--seed", "4", "--data-dir", "d"])
    assert (args.threads, args.seed, args.data_dir, args.out, args.quick) == (3, 4, "d", "o", False)
    with pytest.raises(ValueError, match="DEFAULTS"):
        parser.setting("--undeclared", type=int)


def test_no_hidden_argv_entry_points():
    """Only the experiments and measure_memory read argv, each through argparse (``main(argv=None)``)."""
    root = Path(__file__).resolve().parents[1] / "experiments"
    for path in root.glob("*.py"):
        text = path.read_text()
        assert "CHILD" not in text and 'argv[:1] ==' not in text, path.name
    import experiments.benchmark_scaling as scaling
    assert not hasattr(scaling, "main")          # parts g, h: `benchmark --parts gh` (no cycle: test_architecture)


def test_measure_memory_has_its_own_help():
    out = subprocess.run([sys.executable, "-m", "experiments.measure_memory", "--help"], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parents[1],
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    for option in ["--model", "--inputs", "--eps", "--threads", "--options"]:
        assert option in out.stdout


def test_demo_writes_its_table(tmp_path, capsys):
    df = demo.main(["--quick", "--out", str(tmp_path)])
    table = pd.read_csv(tmp_path / "demo.csv")
    assert list(table.columns) == DEMO_COLUMNS
    header = (tmp_path / "demo.md").read_text().splitlines()[0]
    assert [c.strip() for c in header.strip("|").split("|")] == DEMO_COLUMNS
    assert set(table["method"]) >= set(pl.Bounder.available()) | {"dual-optimized"}
    assert len(table) == len(df) and (table["images"] == 3).all()
    # on the same inputs the dual bound certifies at least what interval bounds certify
    by_method = table.set_index("method")
    if "interval" in by_method.index:
        assert by_method.loc["dual", "certified"] >= by_method.loc["interval", "certified"]
        assert by_method.loc["dual", "mean lower margin"] >= by_method.loc["interval", "mean lower margin"]
    assert by_method.loc["dual-optimized", "mean lower margin"] >= by_method.loc["dual", "mean lower margin"] - 1e-5
    assert "method" in capsys.readouterr().out.splitlines()[0]
    with cli.result_store(tmp_path, "demo") as store:                   # the same rows in the result store
        stored = store.frame(DEMO_COLUMNS)
    assert len(stored) == len(table) and list(stored["method"]) == list(table["method"])


def test_demo_rejects_unknown_backend(tmp_path):
    with pytest.raises(SystemExit, match="unknown backend"):
        demo.main(["--quick", "--out", str(tmp_path), "--methods", "no-such-backend"])


@pytest.mark.slow
def test_demo_on_the_pretrained_convnet(tmp_path):
    data_dir, model = real_inputs()
    demo.main(["--quick", "--out", str(tmp_path), "--model", model, "--data-dir", data_dir,
               "--methods", "dual"])
    table = pd.read_csv(tmp_path / "demo.csv")
    convnet = table[table["model"].str.contains("ConvNet")]
    assert set(convnet["method"]) == {"dual", "dual-optimized"}
    # the first three test images are certified at eps = 0.1 by the published model
    assert (convnet["certified"] == 3).all()


def check_skip_part(table):
    """Part i: both libraries' dual bounds on the residual nets lie below the exact MILP minimum and below
    PGD and agree with each other (when the reference is installed); projections speed up the training step."""
    rows = table[table["part"] == "i"].set_index("quantity")
    who = [w for w in ("polytope_lab", "convex_adversarial") if rows[w].notna().all()]
    above = rows.loc[next(q for q in rows.index if q.startswith("skip net 1×5×5"))]
    pgd = rows.loc["residual ConvNet: margin rows where PGD goes below the bound"]
    for w in who:
        assert float(above[w]) <= 1e-9 and float(pgd[w]) == 0, w
    if "convex_adversarial" in who:
        agreement = [float(n.split("max |ours − reference| ")[1].split(";")[0]) for n in rows["note"]
                     if "max |ours − reference|" in n]
        assert len(agreement) == 2 and agreement[0] < 1e-9 and agreement[1] < 1e-4, agreement
    assert float(rows.loc[next(q for q in rows.index if "ms/image" in q), "polytope_lab"]) > 0
    speedup = rows.loc[next(q for q in rows.index if "speed-up with proj" in q), "polytope_lab"]
    assert float(speedup) > 1


def test_benchmark_quick(tmp_path):
    data_dir, model = real_inputs()
    df = benchmark.main(["--quick", "--model", model, "--data-dir", data_dir, "--out", str(tmp_path)])
    for name in ["results.csv", "results.md", "results.json"]:
        assert (tmp_path / name).is_file()
    table = pd.read_csv(tmp_path / "results.csv")
    assert list(table.columns)[:len(benchmark.COLUMNS)] == benchmark.COLUMNS
    assert len(table) == len(df)
    assert set(table["part"]) == set("abcdefghi")
    with cli.result_store(tmp_path, "benchmark") as store:
        assert len(store) == len(table) and (table["part"].iloc[0], table["quantity"].iloc[0]) in store
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert meta["quick"] and meta["n_images"] == 20
    rows = table.set_index("quantity")
    check_exact_parts(tmp_path, table, data_dir, model)
    check_scaling_parts(table)
    check_skip_part(table)
    timing = rows.loc["dual bounds, ms/image (batches of 10)"]
    assert timing["polytope_lab"] > 0
    if importlib.util.find_spec("convex_adversarial") is None:
        pytest.skip("convex-adversarial (the [bench] extra) is not installed: the comparison with the reference "
                    "was not checked (the benchmark's own parts were)")
    # same bounds as the reference, same robust errors
    assert rows.loc["max relative difference of the bounds", "polytope_lab"] < 1e-3
    errors = rows.loc["robust errors / 20"]
    assert float(errors["polytope_lab"]) == float(errors["convex_adversarial"])
    assert timing["convex_adversarial"] > 0


def check_exact_parts(out, table, data_dir, model_path):
    """Parts e and f of a --quick benchmark: MILP verdicts agree with the dual and the data; LP ≥ dual."""
    per_image = pd.read_csv(out / "milp_per_image.csv")
    assert list(per_image["image"]) == [0, 1, 2] and set(per_image["solver"]) == {"HIGHS"}
    assert set(per_image["status"]) <= {"certified", "counterexample"}
    assert (per_image.loc[per_image["status"] == "certified", "margin"] > 0).all()
    assert (per_image.loc[per_image["status"] == "counterexample", "counterexample_margin"] <= 0).all()
    with cli.result_store(out, "milp_per_image") as store:                 # the resumable copy
        assert sorted(store.keys()) == [("HIGHS", i) for i in range(3)]
    X, y = data.mnist("test", root=data_dir)
    net = models.load_state(models.mnist_convnet(), model_path)
    dual = pl.Bounder.create("dual").bound(net, pl.LinfBall(X[:3], 0.1, clip=(0, 1)), pl.margin_matrix(y[:3], 10))
    # a sound dual certificate can never meet an exact counterexample
    assert not (dual.certified & torch.tensor(list(per_image["status"] == "counterexample"))).any()
    rows = table[table["part"] == "e"].set_index("quantity")
    settled = rows[rows.index.str.contains("fraction settled")]["polytope_lab"]
    assert len(settled) == 1 and float(settled.iloc[0]) == 1.0
    f = table[table["part"] == "f"].set_index("quantity")
    for net_name in ["ConvNet", "MLP 784-100-100-10"]:
        for k in ["dual", "dual-optimized"]:
            assert float(f.loc[f"{net_name}: LP − {k} margin lower bound, mean (max)", "polytope_lab"]) >= -1e-4
        assert float(f.loc[f"{net_name}: lp, s/example (lower and upper of 9 margins)", "polytope_lab"]) > 0


def check_scaling_parts(table):
    """Parts g and h of a --quick benchmark: both training variants timed, losses finite and the estimate
    labelled; column chunking bounds the same images with the same verdicts as the unchunked bound."""
    g = table[table["part"] == "g"].set_index("quantity")
    steps = g[g.index.str.startswith("robust training step")]["polytope_lab"].astype(float)
    assert len(steps) == 2 and (steps > 0).all()
    speedup = float(g.loc["training step speed-up with proj=50 (exact / projected, wall)", "polytope_lab"])
    assert speedup == pytest.approx(steps.iloc[0] / steps.iloc[1])
    exact_loss = float(g.loc["robust loss on the first batch (exact)", "polytope_lab"])
    assert 0 < exact_loss < 1  # the pretrained model is robust on most of its training images at ε = 0.1
    assert "not a certified error" in g.loc["robust loss on the first batch (proj=50)", "note"]
    h = table[table["part"] == "h"].set_index("quantity")
    unchunked = h.loc["exact bound, batch 10, unchunked: peak memory, MiB"]
    columns = h.loc["exact bound, batch 10, column chunks (column_chunk 64): peak memory, MiB"]
    assert float(unchunked["polytope_lab"]) > 0 and float(columns["polytope_lab"]) > 0
    certified = [note.split("; ")[2] for note in (unchunked["note"], columns["note"])]
    assert certified[0] == certified[1] and certified[0].endswith("/10 certified")
