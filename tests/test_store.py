"""polytope_lab.store.ResultStore: keyed JSON records in SQLite, durable per write, resumable, shared."""
import math
import sqlite3
import threading

import pandas as pd
import pytest

from polytope_lab.store import ResultStore


def test_put_get_contains_and_order(tmp_path):
    with ResultStore(tmp_path / "r.sqlite", "part_a") as store:
        assert len(store) == 0 and store.get("x") is None and store.get("x", 3) == 3
        store.put(("HIGHS", 2), {"status": "certified", "seconds": 0.5})
        store.put(("HIGHS", 1), {"status": "counterexample", "margin": math.nan, "upper": math.inf})
        store.put("alone", [1, 2])
        assert ("HIGHS", 2) in store and ["HIGHS", 1] in store and ("HIGHS", 3) not in store
        assert store.keys() == [("HIGHS", 2), ("HIGHS", 1), "alone"]
        record = store.get(("HIGHS", 1))
        assert math.isnan(record["margin"]) and record["upper"] == math.inf
        store.put(("HIGHS", 2), {"status": "time_limit"})              # replaced, keeps its place
        assert store.keys()[0] == ("HIGHS", 2) and store.get(("HIGHS", 2)) == {"status": "time_limit"}
        assert store.delete("alone") and not store.delete("alone") and len(store) == 2


def test_frame_and_empty_frame(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    empty = store.frame(columns=["a", "b"])
    assert list(empty.columns) == ["a", "b"] and len(empty) == 0
    for i in range(3):
        store.put(i, {"a": i, "b": 2.0 * i})
    pd.testing.assert_frame_equal(store.frame(), pd.DataFrame({"a": [0, 1, 2], "b": [0.0, 2.0, 4.0]}))
    store.close()


def test_resume_after_reopen_and_tables_are_separate(tmp_path):
    path = tmp_path / "sub" / "results.sqlite"
    first = ResultStore(path, "cells")
    first.put(("robust", "fgsm"), {"errors": 3, "n": 100})
    other = ResultStore(path, "milp_images")
    other.put(("robust", 0), {"status": "certified"})
    del first, other                                                     # dropped without close(): committed
    again = ResultStore(path, "cells")
    assert again.records() == [{"errors": 3, "n": 100}] and ("robust", 0) not in again
    assert ResultStore(path, "milp_images").get(("robust", 0)) == {"status": "certified"}
    again.clear()
    assert len(again) == 0 and len(ResultStore(path, "milp_images")) == 1
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_two_connections_write_concurrently(tmp_path):
    path = tmp_path / "results.sqlite"
    stores = [ResultStore(path, "shared"), ResultStore(path, "shared")]

    def write(k):
        for i in range(50):
            stores[k].put((k, i), {"writer": k, "i": i})

    threads = [threading.Thread(target=write, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for store in stores:
        assert len(store) == 100
        assert sorted(store.keys()) == sorted((k, i) for k in range(2) for i in range(50))
    assert stores[0].get((1, 49)) == {"writer": 1, "i": 49}


def test_numpy_and_torch_values_become_plain(tmp_path):
    import numpy as np
    import torch
    with ResultStore(tmp_path / "r.sqlite") as store:
        store.put("k", {"i": np.int64(3), "f": np.float32(0.5), "t": torch.tensor(2.0), "a": np.arange(3)})
        assert store.get("k") == {"i": 3, "f": 0.5, "t": 2.0, "a": [0, 1, 2]}
        store.put((np.int64(2), np.float64(0.5)), {})
        assert (2, 0.5) in store and store.keys()[-1] == (2, 0.5)


def test_bad_keys_records_and_tables_are_refused(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    with pytest.raises(TypeError):
        store.put((1, [2]), {})
    with pytest.raises(TypeError):
        store.put(math.nan, {})
    with pytest.raises(TypeError):
        store.put("k", {"x": object()})
    with pytest.raises(ValueError, match="identifier"):
        ResultStore(tmp_path / "r.sqlite", 'x"; DROP TABLE results; --')
    assert len(store) == 0
