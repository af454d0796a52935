"""Data sets: the paper's 2-D toy points, and the MNIST IDX files checked against pinned SHA-256 checksums.

Data location: an explicit ``root`` argument, else the environment variable ``POLYTOPE_LAB_DATA``, else
``~/.cache/polytope_lab``. MNIST lives in ``<root>/mnist/`` under its original file names, gzipped
(``*.gz``) or not; missing files are downloaded from public mirrors (``MNIST_MIRRORS``, overridden by
``mirrors=`` or ``$POLYTOPE_LAB_MNIST_MIRRORS``) and kept only if their SHA-256 matches.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import struct
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

ENV_VAR = "POLYTOPE_LAB_DATA"
MIRRORS_ENV_VAR = "POLYTOPE_LAB_MNIST_MIRRORS"
DEFAULT_ROOT = Path("~/.cache/polytope_lab")

#: base URLs tried in order for a missing ``<name>.gz`` (the file is ``base + name``)
MNIST_MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]
DOWNLOAD_TIMEOUT = 30.0  # seconds per connection attempt and per read

MNIST_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}

# SHA-256 of the original distribution files: gzipped, and decompressed
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# sizes in bytes of the gzipped files: a download that grows beyond its size is cut off early
MNIST_SIZES = {
    "train-images-idx3-ubyte.gz": 9_912_422,
    "train-labels-idx1-ubyte.gz": 28_881,
    "t10k-images-idx3-ubyte.gz": 1_648_877,
    "t10k-labels-idx1-ubyte.gz": 4_542,
}

# files already verified in this process: (resolved path, size, mtime_ns) -> True
_VERIFIED: dict = {}


def data_root(root=None) -> Path:
    """The data directory: ``root`` if given, else ``$POLYTOPE_LAB_DATA``, else ``~/.cache/polytope_lab``."""
    if root is None:
        root = os.environ.get(ENV_VAR) or DEFAULT_ROOT
    return Path(root).expanduser()


def sha256(path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path) -> None:
    """Check ``path`` against its pinned SHA-256 (once per process); ValueError naming the file if it differs."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if _VERIFIED.get(key):
        return
    expected = MNIST_SHA256[path.name]
    actual = sha256(path)
    if actual != expected:
        raise ValueError(f"checksum mismatch for {path}: SHA-256 is {actual}, expected {expected}. "
                         f"The file is corrupt or not the original MNIST file; replace it.")
    _VERIFIED[key] = True


def _find(directory: Path, name: str):
    """The gzipped or the plain copy of ``name`` in ``directory`` (gzipped preferred), or None."""
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    magic, n = struct.unpack(">II", data[:8])
    if magic == 2051:  # images
        rows, cols = struct.unpack(">II", data[8:16])
        return np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols)
    if magic == 2049:  # labels
        return np.frombuffer(data, np.uint8, offset=8)
    raise ValueError(f"{path} is not an MNIST IDX file (magic number {magic})")


def mirror_list(mirrors=None) -> list:
    """Base URLs to download from: ``mirrors`` if given, else ``$POLYTOPE_LAB_MNIST_MIRRORS`` (comma-separated),
    else ``MNIST_MIRRORS``."""
    if mirrors is None:
        env = os.environ.get(MIRRORS_ENV_VAR)
        mirrors = MNIST_MIRRORS if env is None else env.split(",")
    elif isinstance(mirrors, str):
        mirrors = [mirrors]
    return [m.strip() for m in mirrors if m.strip()]


def _fetch(url: str, target: Path) -> None:
    """Download ``url`` to ``target`` through a temporary file in the same directory, renamed into place only
    when its size and SHA-256 match the pinned ones; any failure raises and leaves no file."""
    expected, size = MNIST_SHA256[target.name], MNIST_SIZES[target.name]
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        h, total = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
            for block in iter(lambda: response.read(1 << 16), b""):
                total += len(block)
                if total > size:
                    raise ValueError(f"more than the expected {size} bytes")
                h.update(block)
                out.write(block)
        if h.hexdigest() != expected:
            raise ValueError(f"checksum mismatch: SHA-256 is {h.hexdigest()}, expected {expected}")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    stat = target.stat()
    _VERIFIED[(str(target.resolve()), stat.st_size, stat.st_mtime_ns)] = True


def download(names, directory, mirrors=None) -> dict:
    """Download the gzipped MNIST files ``names`` (e.g. "t10k-labels-idx1-ubyte.gz") into ``directory``,
    trying each mirror in turn. Returns ``{name: [(url, reason), ...]}`` for the files no mirror delivered
    (empty when all arrived)."""
    directory = Path(directory)
    failures = {}
    for name in names:
        if name not in MNIST_SIZES:
            raise ValueError(f"{name!r} is not a gzipped MNIST file; expected one of {sorted(MNIST_SIZES)}")
        tried = []
        for base in mirror_list(mirrors):
            url = base.rstrip("/") + "/" + name
            try:
                directory.mkdir(parents=True, exist_ok=True)
                _fetch(url, directory / name)
                break
            except (OSError, ValueError, http.client.HTTPException) as e:   # URLError, timeouts: OSErrors
                tried.append((url, f"{type(e).__name__}: {e}"))
        else:
            failures[name] = tried
    return failures


def mnist(split: str = "test", root=None, download: bool = True, mirrors=None):
    """MNIST ``split`` ("train" or "test") as ``(X, y)``: X float32 (N, 1, 28, 28) in [0, 1], y int64 (N,).

    Files are looked up in ``<root>/mnist/`` (see :func:`data_root`) and checked against their SHA-256.
    Missing ones are downloaded there when ``download`` (see :func:`mirror_list` for ``mirrors``).
    Raises FileNotFoundError naming the missing files, where to put them and, after a failed download,
    every URL tried and why it failed; ValueError on a bad checksum.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = data_root(root) / "mnist"
    names = [MNIST_FILES[(split, "images")], MNIST_FILES[(split, "labels")]]
    paths = {name: _find(directory, name) for name in names}
    missing = [name for name, p in paths.items() if p is None]
    failures = {}
    if missing and download:
        failures = _download([f"{name}.gz" for name in missing], directory, mirrors)
        paths = {name: _find(directory, name) for name in names}
        missing = [name for name, p in paths.items() if p is None]
    if missing:
        wanted = ", ".join(f"{name}.gz" for name in missing)
        message = (f"MNIST {split} split not found: put {wanted} (the original MNIST files, gzipped or not) in "
                   f"{directory}/ — or point the environment variable {ENV_VAR} (or root=) at a directory "
                   f"whose mnist/ subdirectory holds them.")
        if download:
            tried = [f"{url} ({reason})" for name in missing for url, reason in failures.get(f"{name}.gz", [])]
            message += (" Download failed; tried: " + "; ".join(tried) if tried else
                        f" No download mirrors configured (mirrors= or ${MIRRORS_ENV_VAR}).")
        raise FileNotFoundError(message)
    for p in paths.values():
        verify(p)
    images = _read_idx(paths[names[0]])
    labels = _read_idx(paths[names[1]])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"MNIST {split} files in {directory} have inconsistent shapes "
                         f"{images.shape} and {labels.shape}")
    X = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return X, y


_download = download  # ``mnist``'s argument of the same name shadows the function


def toy_points(n=50, min_distance=0.08, seed=0, dim=2):
    """The paper's toy data (§4.1): ``n`` points uniform in [0, 1]^dim, each drawn until it lies at L∞ distance
    ≥ ``min_distance`` from all earlier ones, with labels uniform in {0, 1}; ``(X float32 (n, dim), y int64 (n,))``.

    Deterministic in ``seed``. Raises ValueError when the points cannot be placed: more than fit at that
    spacing, or no room found after ``_TOY_TRIES`` candidates per point.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    d = float(min_distance)
    if not np.isfinite(d) or d < 0:
        raise ValueError(f"min_distance must be a finite number >= 0, got {min_distance!r}")
    if d > 0 and n > (int(np.floor(1 / d)) + 1) ** dim:
        raise ValueError(f"{n} points at L∞ distance >= {d:g} do not fit in [0, 1]^{dim}: "
                         f"at most {(int(np.floor(1 / d)) + 1) ** dim} do")
    rng = np.random.default_rng(int(seed))
    points = np.empty((n, dim))                                        # (n, dim)
    count, misses = 0, 0                                               # misses: candidates since the last point
    while count < n:
        if misses >= _TOY_TRIES:
            raise ValueError(f"could not place {n} points at L∞ distance >= {d:g} in [0, 1]^{dim}: no room for "
                             f"point {count + 1} in {misses} candidates (seed {seed}); lower n or min_distance")
        # (K, dim) candidates, in order; float32 values compared in float64, where their differences are exact
        chunk = rng.random((_TOY_CHUNK, dim), dtype=np.float32).astype(np.float64)
        while count < n and len(chunk):
            dist = np.abs(chunk[:, None, :] - points[None, :count, :]).max(-1)   # (K, count)
            ok = (dist >= d).all(1)
            if not ok.any():
                misses += len(chunk)
                break
            first = int(ok.argmax())
            points[count] = chunk[first]
            count, misses = count + 1, 0
            chunk = chunk[first + 1:]
    y = rng.integers(0, 2, n)
    return torch.from_numpy(points).float(), torch.from_numpy(y).long()


_TOY_CHUNK = 256      # candidates drawn at a time (part of the seeded stream: changing it changes the data)
_TOY_TRIES = 10_000   # candidates per point before giving up


__all__ = ["mnist", "download", "mirror_list", "toy_points", "data_root", "verify", "sha256", "MNIST_SHA256",
           "MNIST_FILES", "MNIST_MIRRORS", "ENV_VAR", "MIRRORS_ENV_VAR"]
