"""polytope_lab.data: MNIST IDX loading, data-root resolution, checksum verification, downloads from
mirrors (served on loopback: no test reaches the internet), and the toy 2-D points.

Tests that need the real MNIST files run when POLYTOPE_LAB_DATA names a directory holding mnist/.
"""
import functools
import gzip
import http.server
import shutil
import socket
import threading
from pathlib import Path

import pytest
import torch

from conftest import real_mnist_dir
from polytope_lab import data

TEST_FILES = ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


@pytest.fixture(autouse=True)
def _no_internet(monkeypatch):
    """No default mirrors: a test that finds files missing downloads only from the loopback mirrors it names."""
    monkeypatch.setenv(data.MIRRORS_ENV_VAR, "")


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


# --------------------------------------------------------------------------------------------------
# downloads, from HTTP servers on loopback
# --------------------------------------------------------------------------------------------------


class Mirror:
    """An HTTP server on 127.0.0.1 serving the files in ``directory`` (read-only); ``.url`` is its base URL,
    ``.requests`` the paths asked for."""

    def __init__(self, directory):
        self.requests = []
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                mirror.requests.append(self.path)

        handler = functools.partial(Handler, directory=str(directory))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve():
    """``serve(directory)``: a running Mirror of ``directory``, shut down after the test."""
    mirrors = []

    def start(directory):
        mirrors.append(Mirror(directory))
        return mirrors[-1]

    yield start
    for m in mirrors:
        m.close()


def corrupt_copy(tmp_path) -> Path:
    """The test-split files, damaged: a flipped byte in the labels, extra bytes after the images."""
    d = tmp_path / "corrupt"
    d.mkdir()
    src = real_mnist_dir()
    labels = bytearray((src / TEST_FILES[1]).read_bytes())
    labels[100] ^= 0xFF
    (d / TEST_FILES[1]).write_bytes(bytes(labels))
    (d / TEST_FILES[0]).write_bytes((src / TEST_FILES[0]).read_bytes() + b"\0" * 100)
    return d


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def test_download_from_a_mirror(tmp_path, serve):
    good = serve(real_mnist_dir())
    X, y = data.mnist("test", root=tmp_path / "data", mirrors=[good.url])
    d = tmp_path / "data" / "mnist"
    assert sorted(p.name for p in d.iterdir()) == TEST_FILES            # no temporary files left behind
    for name in TEST_FILES:
        assert data.sha256(d / name) == data.MNIST_SHA256[name]
    X0, y0 = data.mnist("test", root=real_mnist_dir().parent)
    assert torch.equal(X, X0) and torch.equal(y, y0)
    assert sorted(good.requests) == sorted(f"/{name}" for name in TEST_FILES)
    data.mnist("test", root=tmp_path / "data", mirrors=[good.url])      # present now: nothing fetched again
    assert len(good.requests) == 2


def test_corrupt_mirror_rejected_and_next_used(tmp_path, serve, monkeypatch):
    bad, good = serve(corrupt_copy(tmp_path)), serve(real_mnist_dir())
    monkeypatch.setenv(data.MIRRORS_ENV_VAR, f"{bad.url}, {good.url}")   # mirrors from the environment
    X, y = data.mnist("test", root=tmp_path / "data")
    assert len(bad.requests) == 2 and len(good.requests) == 2
    assert torch.equal(y, data.mnist("test", root=real_mnist_dir().parent)[1])
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == TEST_FILES


def test_all_mirrors_failing_names_files_urls_and_reasons(tmp_path, serve, monkeypatch):
    monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT", 1.0)
    (tmp_path / "empty").mkdir()
    bad, empty = serve(corrupt_copy(tmp_path)), serve(tmp_path / "empty")
    dead = closed_port_url()
    with pytest.raises(FileNotFoundError) as info:
        data.mnist("test", root=tmp_path / "data", mirrors=[bad.url, empty.url, dead])
    message = str(info.value)
    d = tmp_path / "data" / "mnist"
    assert str(d) in message and "POLYTOPE_LAB_DATA" in message
    for name in TEST_FILES:
        assert name in message
        for base in (bad.url, empty.url, dead):
            assert base + name in message
    assert "checksum mismatch" in message and "more than the expected" in message
    assert "404" in message and "refused" in message.lower()
    assert list(d.iterdir()) == []                                        # nothing half-written kept


def test_silent_mirror_times_out(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT", 0.3)
    with socket.socket() as listener:                                     # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        failures = data.download([TEST_FILES[1]], tmp_path, mirrors=url)
    assert [u for u, _ in failures[TEST_FILES[1]]] == [url + TEST_FILES[1]]
    assert "timed out" in failures[TEST_FILES[1]][0][1]


def test_download_false_fetches_nothing(tmp_path, serve):
    good = serve(real_mnist_dir())
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        data.mnist("test", root=tmp_path, download=False, mirrors=[good.url])
    assert good.requests == []


def test_mirror_list_sources(monkeypatch):
    monkeypatch.delenv(data.MIRRORS_ENV_VAR)
    assert data.mirror_list() == data.MNIST_MIRRORS
    monkeypatch.setenv(data.MIRRORS_ENV_VAR, " http://a/ ,http://b/,")
    assert data.mirror_list() == ["http://a/", "http://b/"]
    assert data.mirror_list("http://c/") == ["http://c/"]
    assert data.mirror_list([]) == []
    with pytest.raises(ValueError, match="not a gzipped MNIST file"):
        data.download(["t10k-labels-idx1-ubyte"], "/nonexistent", mirrors=[])


def test_no_mirrors_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="No download mirrors configured"):
        data.mnist("test", root=tmp_path)


# --------------------------------------------------------------------------------------------------
# toy points
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_toy_points_paper_setting(seed):
    X, y = data.toy_points(50, 0.08, seed=seed)
    assert X.shape == (50, 2) and X.dtype == torch.float32
    assert y.shape == (50,) and y.dtype == torch.int64
    assert X.min() >= 0 and X.max() < 1
    dist = (X.double()[:, None] - X.double()[None]).abs().amax(-1) + torch.eye(50, dtype=torch.float64) * 9
    assert dist.min() >= 0.08
    assert set(y.tolist()) == {0, 1}
    assert 10 <= y.sum() <= 40


def test_toy_points_deterministic_in_seed():
    X0, y0 = data.toy_points(seed=3)
    X1, y1 = data.toy_points(seed=3)
    assert torch.equal(X0, X1) and torch.equal(y0, y1)
    assert not torch.equal(X0, data.toy_points(seed=4)[0])


def test_toy_points_other_dimensions_and_no_spacing():
    X, _ = data.toy_points(20, 0.2, seed=0, dim=3)
    dist = (X[:, None] - X[None]).abs().amax(-1) + torch.eye(20) * 9
    assert X.shape == (20, 3) and dist.min() >= 0.2
    assert data.toy_points(5, 0.0)[0].shape == (5, 2)


def test_toy_points_impossible_requests_raise():
    with pytest.raises(ValueError, match="do not fit"):
        data.toy_points(200, 0.08)                          # at most 13 x 13 points at spacing 0.08
    with pytest.raises(ValueError, match="could not place"):
        data.toy_points(150, 0.08)                          # fits in a grid, not by random sequential placement
    for kwargs in (dict(n=0), dict(n=2.5), dict(min_distance=-0.1), dict(min_distance=float("nan")), dict(dim=0)):
        with pytest.raises(ValueError):
            data.toy_points(**kwargs)
