"""polytope_lab.data: MNIST IDX loading, data-root resolution, checksum verification.

Tests that need the real MNIST files run when POLYTOPE_LAB_DATA names a directory holding mnist/.
"""
import gzip
import os
import shutil
from pathlib import Path

import pytest
import torch

from polytope_lab import data

TEST_FILES = ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def real_mnist_dir() -> Path:
    root = os.environ.get("POLYTOPE_LAB_DATA")
    if not root:
        pytest.skip("POLYTOPE_LAB_DATA is not set (needs the real MNIST files)")
    d = Path(root) / "mnist"
    if not d.is_dir():
        pytest.fail(f"POLYTOPE_LAB_DATA is set but {d} does not exist")
    return d


def copy_test_split(tmp_path, compressed=True) -> Path:
    """A copy of the real test-split files in tmp_path/mnist/ (decompressed when compressed=False)."""
    src, dst = real_mnist_dir(), tmp_path / "mnist"
    dst.mkdir()
    for name in TEST_FILES:
        if compressed:
            shutil.copyfile(src / name, dst / name)
        else:
            with gzip.open(src / name, "rb") as f:
                (dst / name[:-3]).write_bytes(f.read())
    return dst


def test_real_files_match_their_checksums():
    d = real_mnist_dir()
    for name in ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", *TEST_FILES]:
        assert data.sha256(d / name) == data.MNIST_SHA256[name], name
        data.verify(d / name)


def test_real_test_split_loads():
    real_mnist_dir()
    X, y = data.mnist("test")  # root from POLYTOPE_LAB_DATA
    assert X.shape == (10000, 1, 28, 28) and X.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert X.min() == 0.0 and X.max() == 1.0
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert torch.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_real_train_split_loads():
    real_mnist_dir()
    X, y = data.mnist("train")
    assert X.shape == (60000, 1, 28, 28) and y.shape == (60000,)
    assert y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert abs(X.mean().item() - 0.1306605) < 1e-5


def test_uncompressed_copy_loads_identically(tmp_path):
    plain = copy_test_split(tmp_path, compressed=False)
    assert sorted(p.name for p in plain.iterdir()) == [n[:-3] for n in TEST_FILES]
    X1, y1 = data.mnist("test", root=tmp_path)
    X0, y0 = data.mnist("test", root=real_mnist_dir().parent)
    assert torch.equal(X0, X1) and torch.equal(y0, y1)


def test_tampered_real_copy_raises_value_error_naming_the_file(tmp_path):
    d = copy_test_split(tmp_path)
    labels = d / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(labels.read_bytes())
    raw[-10] ^= 0xFF
    labels.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz"):
        data.mnist("test", root=tmp_path)


def test_tampered_uncompressed_copy_raises(tmp_path):
    d = copy_test_split(tmp_path, compressed=False)
    images = d / "t10k-images-idx3-ubyte"
    raw = bytearray(images.read_bytes())
    raw[5000] ^= 0x01
    images.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte"):
        data.mnist("test", root=tmp_path)


def test_fake_file_fails_its_checksum(tmp_path):
    d = tmp_path / "mnist"
    d.mkdir()
    for name in TEST_FILES:
        with gzip.open(d / name, "wb") as f:
            f.write(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07")  # a valid IDX labels file, but not MNIST's
    with pytest.raises(ValueError, match=r"checksum mismatch.*t10k-images-idx3-ubyte\.gz"):
        data.mnist("test", root=tmp_path)


def test_missing_directory_names_the_files_and_where(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        data.mnist("test", root=tmp_path / "nowhere")
    message = str(info.value)
    for name in TEST_FILES:
        assert name in message
    assert str(tmp_path / "nowhere" / "mnist") in message
    assert "POLYTOPE_LAB_DATA" in message


def test_missing_one_file_names_only_that_one(tmp_path):
    d = tmp_path / "mnist"
    d.mkdir()
    (d / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as info:
        data.mnist("train", root=tmp_path)
    assert "train-labels-idx1-ubyte.gz" in str(info.value)
    assert "train-images" not in str(info.value)


def test_bad_split_rejected(tmp_path):
    with pytest.raises(ValueError, match="split"):
        data.mnist("validation", root=tmp_path)


def test_root_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYTOPE_LAB_DATA", str(tmp_path / "env"))
    assert data.data_root() == tmp_path / "env"
    assert data.data_root(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("POLYTOPE_LAB_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.data_root() == tmp_path / "home" / ".cache" / "polytope_lab"


def test_checksums_are_computed_once_per_file(tmp_path, monkeypatch):
    copy_test_split(tmp_path)
    calls = []
    real = data.sha256
    monkeypatch.setattr(data, "sha256", lambda p: calls.append(Path(p).name) or real(p))
    data.mnist("test", root=tmp_path)
    data.mnist("test", root=tmp_path)
    assert sorted(calls) == sorted(TEST_FILES)
