"""Benchmark part l (experiments.benchmark_bab): BaB and the MILP side by side, per-example results stored as
they go and skipped on ``--resume``. Needs the real MNIST data, the pretrained ConvNet and mnistfc (skipped
otherwise, as the other benchmark tests)."""
import pandas as pd
import pytest

import polytope_lab as pl
from conftest import pretrained_path, real_mnist_dir, real_path
from experiments import benchmark, benchmark_bab, cli


def test_capped_counts_undecided_and_late_runs_as_the_limit():
    assert benchmark_bab.capped([0.5, 3.0, 0.2], ["certified", "certified", "time_limit"], 2.0) == [0.5, 2.0, 2.0]
    with pytest.raises(ValueError):
        benchmark_bab.pieces("mnistfc,nope")


def test_part_l_quick_and_resume(tmp_path, monkeypatch):
    data_dir, model = str(real_mnist_dir().parent), str(pretrained_path())
    folder = real_path("POLYTOPE_LAB_BENCHMARKS", "vnncomp2021", "mnistfc", what="vnncomp2021/mnistfc/")
    argv = ["--quick", "--parts", "l", "--bab-pieces", "pretrained,mnistfc", "--bab-images", "1", "--model", model,
            "--data-dir", data_dir, "--vnncomp-dir", str(folder), "--out", str(tmp_path)]
    df = benchmark.main(argv).set_index("quantity")
    assert set(df["part"]) == {"l"}
    assert df.loc["pretrained: same verdicts where both decided", "polytope_lab"] == "yes"
    assert df.loc["pretrained: BaB subdomains per second", "polytope_lab"] >= 0
    per = pd.read_csv(tmp_path / "bab_per_example.csv")
    assert len(per) == 4 and set(per["backend"]) == {"bab", "milp"}
    assert set(per[per["piece"] == "pretrained"]["status"]) <= {"certified", "counterexample", "time_limit"}
    with cli.result_store(tmp_path, benchmark_bab.TABLE) as store:
        assert len(store) == 4

    def never(*a, **k):
        raise AssertionError("a stored example was run again")

    for cls in (pl.Bounder.registry["bab"], pl.Bounder.registry["milp"]):
        monkeypatch.setattr(cls, "certify", never)
    monkeypatch.setattr(pl, "verify_property", never)
    again = benchmark.main(argv + ["--resume"]).set_index("quantity")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "bab_per_example.csv"), per)
    assert again.loc["pretrained: same verdicts where both decided", "polytope_lab"] == "yes"
    memory = "mnistfc: peak resident memory, MiB"   # resumed: the peak of the run that measured it
    assert again.loc[memory, "polytope_lab"] == df.loc[memory, "polytope_lab"] > 0
