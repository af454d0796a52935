"""verify_dataset on a real LocalCluster of 2 worker processes (one module-scoped cluster): equal to a serial
certify per example (dual, MILP), a worker killed mid-run, interrupt and resume, a raising certify, a bad
scheduler address, several settings in one store; and the experiments.verify command."""
from __future__ import annotations

import math
import os
import signal
import threading
import time

import pytest
import torch
from distributed import Client, LocalCluster

import polytope_lab as pl
from polytope_lab import models, runs
from polytope_lab.dataset import default_chunk_size
from polytope_lab.dual.bounder import DualBounder
from polytope_lab.store import ResultStore

from conftest import make_mlp, random_inputs, real_mnist_dir

EPS = 1.0
N = 16
SLOW_SECONDS = 0.15


class SlowDual(DualBounder):
    """The dual bound, slowed down so that a worker can be killed while its tasks run (not registered)."""

    def _bound(self, network, region, C):
        time.sleep(SLOW_SECONDS)
        return super()._bound(network, region, C)


class FailingDual(DualBounder):
    """The dual bound, raising on a batch with an example whose first input is positive (not registered)."""

    def _bound(self, network, region, C):
        if (region.x[:, 0] > 0).any():
            raise ValueError("boom on a positive first input")
        return super()._bound(network, region, C)


class BrokenOnWorkers(DualBounder):
    """A bounder that cannot be unpickled: every task fails before certify (not registered)."""

    def __setstate__(self, state):
        raise RuntimeError("cannot unpickle here")


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      scheduler_kwargs={"allowed_failures": 3}) as cluster:
        with Client(cluster, set_as_default=False) as c:
            yield c


@pytest.fixture(scope="module")
def problem():
    """A 4-16-16-3 ReLU net and 16 inputs: at ε = 1 the dual certifies 9 of them, the MILP 12 (the first two
    labels are wrong: their centres are counterexamples)."""
    net = make_mlp([4, 16, 16, 3], seed=3)
    X = random_inputs((4,), batch=N, seed=1, low=-8, high=8)
    with torch.no_grad():
        y = net(X).argmax(1)
    y[:2] = (y[:2] + 1) % 3
    return net, X, y


def serial(bounder, net, X, y, eps=EPS, clip=None):
    """(statuses, margins) of ``bounder.certify`` on one example at a time, in this process."""
    certs = [bounder.certify(net, pl.LinfBall(X[i:i + 1], eps, clip=clip), y[i:i + 1]) for i in range(len(X))]
    return [c.status[0] for c in certs], [float(c.margin[0]) for c in certs]


def assert_same(df, statuses, margins):
    assert df["index"].tolist() == list(range(len(statuses)))
    assert df["status"].tolist() == statuses
    for got, want in zip(df["margin"], margins):
        assert got == want or math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize("backend, clip, batch_size", [("dual", None, 1), ("milp", (-8.0, 8.0), 1), ("dual", None, 2)])
def test_equal_to_serial(client, problem, backend, clip, batch_size):
    net, X, y = problem
    df = pl.verify_dataset(net, X, y, EPS, clip=clip, backend=backend, client=client, chunk_size=3,
                           batch_size=batch_size)
    options = {"threads": 1} if backend == "milp" else {}
    statuses, margins = serial(pl.Bounder.create(backend, **options), net, X, y, clip=clip)
    assert_same(df, statuses, margins)
    assert len(set(statuses)) >= 2                                   # a mix of verdicts, not a trivial case
    assert set(df["worker"]) <= {"0", "1"} and df.attrs["computed"] == N and df.attrs["chunk_size"] == 3
    assert (df["counterexample_found"] == (df["verdict"] == "not robust")).all()
    assert df.loc[df["status"] == "certified", "verdict"].eq("robust").all()
    assert (df["margin"][df["verdict"] == "robust"] > 0).all()


def test_worker_killed_mid_run(client, problem, tmp_path):
    """SIGKILL one worker process while tasks run: its tasks are rerun on the other one (and on its restarted
    replacement); every example has exactly one row and the verdicts equal the serial run."""
    net, X, y = problem
    path, out = tmp_path / "kill.sqlite", {}
    before = client.run(os.getpid)
    run = threading.Thread(target=lambda: out.update(df=pl.verify_dataset(
        net, X, y, EPS, backend=SlowDual(), client=client, store=path, chunk_size=1)))
    run.start()
    with ResultStore(path, runs.DEFAULT_TABLE) as watch:
        deadline = time.monotonic() + 30
        while len(watch) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert 2 <= len(watch) < N, "the kill must come mid-run"
    busy = []
    while not busy and time.monotonic() < deadline:                  # a worker with a task in flight
        busy = sorted(address for address, tasks in client.processing().items() if tasks)
    victim = before[busy[0]]
    os.kill(victim, signal.SIGKILL)
    run.join(60)
    assert not run.is_alive()
    df = out["df"]
    statuses, margins = serial(pl.Bounder.create("dual"), net, X, y)
    assert_same(df, statuses, margins)
    with ResultStore(path, runs.DEFAULT_TABLE) as store:
        keys = store.keys()
    assert len(keys) == len(set(keys)) == N and sorted(k[1] for k in keys) == list(range(N))
    client.wait_for_workers(2, timeout=30)
    assert victim not in client.run(os.getpid).values()


def test_interrupt_and_resume(client, problem, tmp_path):
    """A store holding k results (the rest lost with the driver): the rerun computes only the others."""
    net, X, y = problem
    path = tmp_path / "resume.sqlite"
    first = pl.verify_dataset(net, X, y, EPS, client=client, store=path)
    kept = [0, 3, 4, 9, 15]
    with ResultStore(path, runs.DEFAULT_TABLE) as store:
        for key in store.keys():
            if key[1] not in kept:
                store.delete(key)
        assert len(store) == len(kept)
    again = pl.verify_dataset(net, X, y, EPS, client=client, store=path)
    assert again.attrs["computed"] == N - len(kept) and again.attrs["reused"] == len(kept)
    assert again["seconds"][kept].tolist() == first["seconds"][kept].tolist()        # read back, not recomputed
    assert again["status"].tolist() == first["status"].tolist()
    with ResultStore(path, runs.DEFAULT_TABLE) as store:
        assert len(store) == N
    done = pl.verify_dataset(net, X, y, EPS, client=client, store=path)
    assert done.attrs["computed"] == 0 and done["status"].tolist() == first["status"].tolist()


@pytest.mark.parametrize("batch_size", [1, 4])
def test_raising_certify_is_stored_as_error(client, problem, tmp_path, batch_size):
    """Each example whose certify raises is stored as its error (a batch that raises is redone one by one)."""
    net, X, y = problem
    path = tmp_path / "errors.sqlite"
    df = pl.verify_dataset(net, X, y, EPS, backend=FailingDual(), client=client, store=path, chunk_size=8,
                           batch_size=batch_size)
    positive = (X[:, 0] > 0).tolist()
    assert 0 < sum(positive) < N
    statuses, _ = serial(pl.Bounder.create("dual"), net, X, y)
    for status, want, fails in zip(df["status"], statuses, positive):
        assert status == ("error: ValueError: boom on a positive first input" if fails else want)
    assert df.loc[positive, "verdict"].eq("undecided").all()
    stored = runs.stored_results(path, df.attrs["settings"])
    assert stored["status"].tolist() == df["status"].tolist()
    assert runs.summary(df)["errors"] == sum(positive)


def test_failure_outside_certify_stops_the_run(client, problem, tmp_path):
    net, X, y = problem
    with pytest.raises(RuntimeError, match="failed outside certify"):
        pl.verify_dataset(net, X, y, EPS, backend=BrokenOnWorkers(), client=client, store=tmp_path / "s.sqlite",
                          retries=1, chunk_size=8)
    empty = pl.verify_dataset(net, X[:0], y[:0], EPS, client=client)
    assert list(empty.columns) == runs.COLUMNS and len(empty) == 0 and empty.attrs["computed"] == 0


def test_bad_scheduler_address_fails_fast(problem):
    net, X, y = problem
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="no Dask scheduler answered at tcp://127.0.0.1:1"):
        pl.verify_dataset(net, X, y, EPS, client="tcp://127.0.0.1:1", timeout=1)
    assert time.monotonic() - start < 10
    with pytest.raises(ValueError, match="not a Dask scheduler address"):
        pl.verify_dataset(net, X, y, EPS, client="no-port-here")


def test_bad_input_fails_before_any_work(problem):
    net, X, y = problem
    with pytest.raises(ValueError, match="labels"):
        pl.verify_dataset(net, X, y[:-1], EPS, client="tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="no option"):
        pl.verify_dataset(net, X, y, EPS, options={"nonsense": 1}, client="tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="lie in"):
        pl.verify_dataset(net, X, y + 3, EPS, client="tcp://127.0.0.1:1")


def test_other_settings_kept_apart(client, problem, tmp_path):
    """Two ε and another network in one store: three runs, each with its own N results; a query by settings
    gives each run back, and a CSV/Markdown export of it reads back."""
    net, X, y = problem
    path = tmp_path / "many.sqlite"
    wide = pl.verify_dataset(net, X, y, EPS, client=client, store=path)
    narrow = pl.verify_dataset(net, X, y, EPS / 4, client=client, store=path)
    other = pl.verify_dataset(make_mlp([4, 16, 16, 3], seed=4), X, y, EPS, client=client, store=path)
    assert narrow.attrs["computed"] == other.attrs["computed"] == N
    keys = {wide.attrs["settings"], narrow.attrs["settings"], other.attrs["settings"]}
    assert len(keys) == 3
    table = runs.stored_runs(path)
    assert set(table["settings"]) == keys and table["results"].tolist() == [N] * 3
    assert table.loc[table["settings"] == narrow.attrs["settings"], "eps"].item() == EPS / 4
    for df in (wide, narrow):
        back = runs.stored_results(path, df.attrs["settings"][:12])
        assert back["status"].tolist() == df["status"].tolist()
    assert (narrow["verdict"] == "robust").sum() > (wide["verdict"] == "robust").sum()
    csv, md = runs.export_results(wide, tmp_path / "export" / "wide")
    assert len(csv.read_text().splitlines()) == N + 1 and md.read_text().startswith("|")


def test_settings_hash_follows_the_weights_and_the_examples(problem):
    net, X, y = problem
    bounder = pl.Bounder.create("dual")
    key = runs.settings_hash(runs.run_settings(net, EPS, None, bounder, {}))
    assert key == runs.settings_hash(runs.run_settings(make_mlp([4, 16, 16, 3], seed=3), EPS, None, bounder, {}))
    changed = make_mlp([4, 16, 16, 3], seed=3)
    with torch.no_grad():
        changed[0].bias[0] += 1e-12
    assert key != runs.settings_hash(runs.run_settings(changed, EPS, None, bounder, {}))
    assert key != runs.settings_hash(runs.run_settings(net, EPS, (0.0, 1.0), bounder, {}))
    digests = runs.example_digests(X, y)
    assert len(set(digests)) == N
    assert runs.example_digests(X, (y + 1) % 3)[0] != digests[0]
    assert runs.example_digests(X.float(), y)[0] != digests[0]
    assert default_chunk_size(10_000, 2) == 32 and default_chunk_size(200, 2) == 13 and default_chunk_size(3, 8) == 1


def test_store_prefix_query_and_batch_put(tmp_path):
    with ResultStore(tmp_path / "s.sqlite", "t") as store:
        store.put_many([(("a", 1), {"v": 1}), (("a", 2), {"v": 2}), (("ab", 1), {"v": 3}), ("a", {"v": 4})])
        assert store.items(prefix="a") == [(("a", 1), {"v": 1}), (("a", 2), {"v": 2})]
        assert store.items(prefix=("a", 2)) == [] and len(store) == 4


# -- the command ---------------------------------------------------------------------------------------------


def test_cli_help(capsys):
    from experiments import verify

    with pytest.raises(SystemExit) as exit_:
        verify.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--arch", "--eps", "--clip", "--backend", "--first", "--store", "--scheduler", "--workers"):
        assert flag in text
    assert "milp" in text


def test_cli_tiny_run(client, tmp_path, capsys):
    """A random 784-10-10 MLP on the first 6 MNIST test images, on the test cluster; a rerun reuses them."""
    from experiments import verify

    real_mnist_dir()
    weights = tmp_path / "mlp.pth"
    torch.manual_seed(0)
    torch.save(models.mlp([784, 10, 10]).state_dict(), weights)
    argv = ["--model", str(weights), "--arch", "mlp:784-10-10", "--eps", "0.001", "--clip", "0", "1",
            "--backend", "dual", "--first", "6", "--store", str(tmp_path / "cli.sqlite"),
            "--scheduler", client.scheduler.address, "--out", str(tmp_path / "out")]
    df = verify.main(argv)
    text = capsys.readouterr().out
    assert len(df) == 6 and df.attrs["computed"] == 6 and "robust error" in text
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert any(name.endswith(".csv") for name in written) and any(name.endswith(".md") for name in written)
    assert verify.main(argv).attrs["computed"] == 0


def test_benchmark_part_j(tmp_path):
    """Part j on a tiny net and 4 inputs: both runs agree, the rows are there and the timings positive."""
    from types import SimpleNamespace

    from experiments import benchmark_cluster

    net = make_mlp([4, 16, 16, 3], seed=3)
    X = random_inputs((4,), batch=5, seed=2)
    with torch.no_grad():
        y = net(X).argmax(1)
    rows = benchmark_cluster.part_j(net, X, y, 0.05, SimpleNamespace(cluster_images=4, cluster_chunk=None,
                                                                      out=str(tmp_path)))
    values = {row["quantity"]: row["polytope_lab"] for row in rows}
    assert len(rows) == 6 and all(row["part"] == "j" for row in rows)
    assert values["same verdicts with 1 and 2 workers"] == "yes"
    assert all(v > 0 for q, v in values.items() if "wall s" in q or "speed-up" in q)
    assert len((tmp_path / "cluster_per_image.csv").read_text().splitlines()) == 5
