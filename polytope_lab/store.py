"""A resumable result store: keyed JSON records in one SQLite table, durable after every write.

    store = ResultStore("out/results.sqlite", table="milp_per_image")
    if ("HIGHS", 7) not in store:
        store.put(("HIGHS", 7), {"status": "certified", "seconds": 1.2})
    store.frame()                                  # pandas DataFrame of the records, in insertion order

A key is a string or a tuple of JSON scalars (str, int, float, bool, None; numpy and torch scalars are
converted); a record is any JSON-serialisable value (NaN and ±inf allowed; numpy and torch scalars and
arrays become numbers and lists). Every ``put`` commits (WAL journal: readers never block, and a crash
loses at most the write in flight); reopening the same path and table resumes where the last run stopped.
Several tables (one per experiment or part) share one file; several connections, in one process or many,
may read and write the same table (writes wait up to ``timeout`` seconds for the lock). The library
writes only at the path its caller passes.
"""
from __future__ import annotations

import json
import math
import re
import sqlite3
from pathlib import Path

_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SCALARS = (str, int, float, bool, type(None))


def _encode_key(key) -> str:
    parts = list(key) if isinstance(key, (tuple, list)) else [key]
    parts = [p.item() if hasattr(p, "item") and not isinstance(p, _SCALARS) else p for p in parts]  # numpy, torch
    for part in parts:
        if not isinstance(part, _SCALARS) or (isinstance(part, float) and not math.isfinite(part)):
            raise TypeError(f"key parts must be str, int, finite float, bool or None; got {part!r} in {key!r}")
    return json.dumps(parts, separators=(",", ":"))


def _plain(obj):
    """json's fallback: numpy and torch scalars and arrays as Python numbers and lists."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"a record must be JSON-serialisable; got {type(obj).__name__}")


def _decode_key(text: str):
    parts = json.loads(text)
    return tuple(parts) if len(parts) != 1 else parts[0]


class ResultStore:
    """Keyed JSON records in table ``table`` of the SQLite file ``path`` (created with its folder).

    ``get(key, default)``, ``put(key, record)``, ``put_many(items)`` (one transaction), ``key in store``,
    ``len``, ``keys()``, ``items(prefix=None)`` (all, or the keys that start with ``prefix``), ``records()``,
    ``frame()`` (a DataFrame), ``delete(key)``, ``clear()``; a context manager that closes.
    A one-part key reads back as the part itself, a longer one as a tuple.
    """

    def __init__(self, path, table: str = "results", timeout: float = 60.0):
        if not _TABLE.fullmatch(table):
            raise ValueError(f"table must be an identifier (letters, digits, '_'), got {table!r}")
        self.path, self.table = Path(path), table
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(f'CREATE TABLE IF NOT EXISTS "{table}" '
                         "(id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE, record TEXT NOT NULL)")

    # -- writing ---------------------------------------------------------------------------------
    def put(self, key, record) -> None:
        """Store ``record`` under ``key`` (replacing an earlier one, which keeps its place); committed."""
        text = json.dumps(record, allow_nan=True, default=_plain)
        with self._db:
            self._db.execute(f'INSERT INTO "{self.table}" (key, record) VALUES (?, ?) '
                             "ON CONFLICT(key) DO UPDATE SET record = excluded.record", (_encode_key(key), text))

    def put_many(self, items) -> None:
        """Store every ``(key, record)`` of ``items`` in one transaction: all of them or, on a crash, none."""
        rows = [(_encode_key(key), json.dumps(record, allow_nan=True, default=_plain)) for key, record in items]
        with self._db:
            self._db.executemany(f'INSERT INTO "{self.table}" (key, record) VALUES (?, ?) '
                                 "ON CONFLICT(key) DO UPDATE SET record = excluded.record", rows)

    def delete(self, key) -> bool:
        """Remove ``key``'s record; whether there was one."""
        with self._db:
            return self._db.execute(f'DELETE FROM "{self.table}" WHERE key = ?', (_encode_key(key),)).rowcount > 0

    def clear(self) -> None:
        """Remove every record of this table (other tables in the file are kept)."""
        with self._db:
            self._db.execute(f'DELETE FROM "{self.table}"')

    # -- reading ---------------------------------------------------------------------------------
    def get(self, key, default=None):
        row = self._db.execute(f'SELECT record FROM "{self.table}" WHERE key = ?', (_encode_key(key),)).fetchone()
        return default if row is None else json.loads(row[0])

    def __contains__(self, key) -> bool:
        return self._db.execute(f'SELECT 1 FROM "{self.table}" WHERE key = ?', (_encode_key(key),)).fetchone() \
            is not None

    def __len__(self) -> int:
        return self._db.execute(f'SELECT COUNT(*) FROM "{self.table}"').fetchone()[0]

    def items(self, prefix=None) -> list:
        """(key, record) pairs in the order the keys were first stored; with ``prefix`` (a tuple of key
        parts, or one part) only the keys longer than it that start with it."""
        if prefix is None:
            rows = self._db.execute(f'SELECT key, record FROM "{self.table}" ORDER BY id').fetchall()
        else:
            start = _encode_key(prefix)[:-1] + ","  # '["a",1]' -> '["a",1,': the encoding of every longer key
            rows = self._db.execute(f'SELECT key, record FROM "{self.table}" WHERE substr(key, 1, ?) = ? ORDER BY id',
                                    (len(start), start)).fetchall()
        return [(_decode_key(k), json.loads(r)) for k, r in rows]

    def keys(self) -> list:
        return [k for k, _ in self.items()]

    def records(self) -> list:
        return [r for _, r in self.items()]

    def frame(self, columns=None):
        """The records (dicts) as a pandas DataFrame, one row each in insertion order; ``columns`` reindexes
        (an empty store gives an empty frame with those columns)."""
        import pandas as pd

        df = pd.DataFrame(self.records())
        return df if columns is None else df.reindex(columns=list(columns))

    # -- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"ResultStore({str(self.path)!r}, table={self.table!r})"


__all__ = ["ResultStore"]
