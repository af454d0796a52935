"""Benchmark part k (experiments.benchmark_tight): the tight-bound table on the fixed bench networks. Needs
the real MNIST data, the pretrained ConvNet and ``bench_nets/`` (skipped otherwise, as the other benchmark
tests)."""
from conftest import pretrained_path, real_mnist_dir, real_path
from experiments import benchmark, benchmark_tight


def test_side_by_side_timing_repeats_cheap_calls_more():
    calls = {"a": 0, "b": 0}

    def count(name):
        calls[name] += 1
        return name

    out, n = benchmark_tight.timed_side_by_side({k: (lambda k=k: count(k)) for k in calls}, reps=3, budget=0.01)
    assert 3 <= n <= benchmark_tight.MAX_FAST_REPS and calls == {"a": n + 1, "b": n + 1}  # + the warm-up
    assert out["a"][0] == "a" and out["b"][1] >= 0


def test_part_k_quick_on_the_toy_net(tmp_path):
    data_dir, model = str(real_mnist_dir().parent), str(pretrained_path())
    nets = real_path("POLYTOPE_LAB_BENCHMARKS", "bench_nets", what="bench_nets/ (toy.json, toy.pt, peer_widths.json)")
    argv = ["--quick", "--parts", "k", "--bench-nets", str(nets), "--tight-nets", "toy", "--tight-images", "0",
            "--model", model, "--data-dir", data_dir, "--out", str(tmp_path)]
    df = benchmark.main(argv).set_index("quantity")
    for eps in (0.05, 0.1, 0.25):
        row = lambda label: df.loc[f"toy ε={eps}: {label}"]                       # noqa: E731
        fixed, tight, lp_all = (float(row(k)["polytope_lab"]) for k in
                                ("dual fixed", "tight mode (alpha='optimized')", "LP-ALL"))
        reference = float(row("wong_kolter_dual (stored, not re-measured)")["stored, not re-measured"])
        alpha_crown = float(row("alpha_crown (stored, not re-measured)")["stored, not re-measured"])
        assert abs(fixed - reference) <= 1e-4 * reference          # the paper's dual = the reference code
        assert lp_all <= tight + 1e-7 and tight <= alpha_crown     # the barrier below, α-CROWN above
        assert "interleaved" in row("dual adaptive slopes")["note"] and row("dual adaptive slopes")["seconds"] > 0
