"""Data sets: the MNIST IDX files, checked against pinned SHA-256 checksums.

Data location: an explicit ``root`` argument, else the environment variable ``POLYTOPE_LAB_DATA``, else
``~/.cache/polytope_lab``. MNIST lives in ``<root>/mnist/`` under its original file names, gzipped
(``*.gz``) or not. Nothing is downloaded.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
from pathlib import Path

import numpy as np
import torch

ENV_VAR = "POLYTOPE_LAB_DATA"
DEFAULT_ROOT = Path("~/.cache/polytope_lab")

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


def mnist(split: str = "test", root=None):
    """MNIST ``split`` ("train" or "test") as ``(X, y)``: X float32 (N, 1, 28, 28) in [0, 1], y int64 (N,).

    Files are looked up in ``<root>/mnist/`` (see :func:`data_root`) and checked against their SHA-256.
    Raises FileNotFoundError naming the missing files and where to put them, ValueError on a bad checksum.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = data_root(root) / "mnist"
    names = [MNIST_FILES[(split, "images")], MNIST_FILES[(split, "labels")]]
    paths = {name: _find(directory, name) for name in names}
    missing = [name for name, p in paths.items() if p is None]
    if missing:
        wanted = ", ".join(f"{name}.gz" for name in missing)
        raise FileNotFoundError(
            f"MNIST {split} split not found: put {wanted} (the original MNIST files, gzipped or not) in "
            f"{directory}/ — or point the environment variable {ENV_VAR} (or root=) at a directory "
            f"whose mnist/ subdirectory holds them.")
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


__all__ = ["mnist", "data_root", "verify", "sha256", "MNIST_SHA256", "MNIST_FILES", "ENV_VAR"]
