"""IDX reading, MNIST resolution and the download path, against a local HTTP server."""

from __future__ import annotations

import gzip
import http.server
import os
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ntkrun.cli import app
from ntkrun.data import (
    MNIST_FILES,
    check_files,
    check_request,
    choose_points,
    download_mnist,
    load_split,
    md5sum,
    read_idx,
    resolve_data_dir,
    split_info,
)
from ntkrun.errors import DataError, DownloadError

REAL_MNIST = os.environ.get("NTKRUN_TEST_MNIST")  # folder of the verified MNIST test split
needs_mnist = pytest.mark.skipif(
    not REAL_MNIST, reason="set NTKRUN_TEST_MNIST to a folder with MNIST (.ci/run does)"
)


def idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_split(folder: Path, n: int = 50, split: str = "t10k", gz: bool = True) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    for stem, arr in ((f"{split}-images-idx3-ubyte", images), (f"{split}-labels-idx1-ubyte", labels)):
        data = idx_bytes(arr)
        (folder / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path, gz):
    write_split(tmp_path, gz=gz)
    X, y = load_split(tmp_path, "test")
    assert X.shape == (50, 28, 28) and y.shape == (50,) and X.dtype == np.uint8


def test_idx_labels_past_the_ten_classes_are_refused_naming_the_file(tmp_path):
    """The labelled experiments' targets have 10 classes: an IDX label file holding 10 or more is
    one DataError naming it (as an .npz's labels are), not an index error inside a unit."""
    write_split(tmp_path, n=20)
    labels = np.arange(20, dtype=np.uint8) % 12
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    message = r"t10k-labels-idx1-ubyte\.gz: holds labels 0\.\.11; they must be 0\.\.9"
    with pytest.raises(DataError, match=message):
        load_split(tmp_path, "test")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x00\x00\x09\x01" + struct.pack(">I", 3) + b"abc", "bad magic number"),
        (
            b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"abc",
            r"payload has 3 bytes, dimensions \(5,\) need 5",
        ),
        (b"\x00\x00\x08\x03" + b"\x00\x00", "truncated IDX header"),
        (b"\x1f\x8bnot gzip at all", "corrupt gzip"),
    ],
)
def test_read_idx_rejects_bad_files(tmp_path, payload, message):
    path = tmp_path / "bad.idx"
    path.write_bytes(payload)
    with pytest.raises(DataError, match=message):
        read_idx(path)


def test_missing_data_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(DataError) as info:
        load_split(tmp_path, "train")
    assert str(tmp_path) in str(info.value) and "ntkrun data download mnist" in str(info.value)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)  # generalization's own data


def test_a_data_dir_that_is_a_file_or_absent_or_test_only_is_named_as_such(tmp_path):
    (tmp_path / "README.md").touch()
    with pytest.raises(DataError, match=r"README\.md: is a file, not a folder; name the folder"):
        load_split(tmp_path / "README.md", "train")
    with pytest.raises(DataError, match=r"not found in \S+/nowhere \(no such folder\)"):
        load_split(tmp_path / "nowhere", "train")
    write_split(tmp_path, n=10, split="t10k")
    with pytest.raises(DataError) as info:
        load_split(tmp_path, "train")
    message = str(info.value)
    assert "the folder holds the test split only" in message and "--set data.split=test" in message
    assert "download" not in message  # the data are there: nothing to download


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("NTKRUN_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("NTKRUN_DATA_DIR")
    assert resolve_data_dir(None) == Path.home() / ".cache" / "ntkrun"


def test_choose_points_is_seeded_and_scaled(tmp_path):
    write_split(tmp_path)
    images, labels = load_split(tmp_path, "test")
    X, _ = choose_points(images, labels, 20, seed=3)
    X2, _ = choose_points(images, labels, 20, seed=3)
    assert X.shape == (20, 784) and 0 <= X.min() and X.max() <= 1 and np.array_equal(X, X2)
    Xs, _ = choose_points(images, labels, 20, seed=3, scaling="standardize")
    assert abs(float(Xs.mean())) < 1e-12
    with pytest.raises(DataError, match="holds only 50"):
        choose_points(images, labels, 51, seed=0)


@needs_mnist
def test_real_mnist_test_split():
    folder = Path(REAL_MNIST)
    status, usable = check_files(folder)
    assert status["t10k-images-idx3-ubyte.gz"] == "ok: published MNIST, MD5 verified (10000x28x28)"
    assert status["t10k-labels-idx1-ubyte.gz"] == "ok: published MNIST, MD5 verified (10000)"
    assert usable == ["test"] and split_info(folder, "test").count == 10000
    X, y = load_split(folder, "test")
    assert X.shape == (10000, 28, 28) and set(np.unique(y)) == set(range(10))
    assert y[:5].tolist() == [7, 2, 1, 0, 4]  # the first test digits, as published


class Server:
    """A threaded HTTP server on 127.0.0.1 serving one folder, with fault injection by name."""

    def __init__(
        self, folder: Path, truncate: set[str] = frozenset(), fail_first: dict | None = None
    ) -> None:
        """truncate: names sent half-way, then the connection closes; fail_first: {name: k}, the
        first k requests of that name get HTTP 503. `requests` counts requests by name."""
        truncated, failing = truncate, dict(fail_first or {})
        requests: dict[str, int] = {}
        self.requests = requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                requests[name] = requests.get(name, 0) + 1
                if requests[name] <= failing.get(name, 0):
                    self.send_error(503, "try again")
                    return
                if name in truncated:
                    data = (folder / name).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])  # then close: a broken transfer
                    return
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@needs_mnist
def test_download_from_a_local_mirror_verifies_md5(tmp_path):
    with Server(Path(REAL_MNIST)) as server:
        result = CliRunner().invoke(
            app,
            [
                "data",
                "download",
                "mnist",
                "--mirror",
                server.url,
                "--split",
                "test",
                "--data-dir",
                str(tmp_path / "d"),
            ],
        )
        assert result.exit_code == 0, result.output
    assert leftovers(tmp_path / "d") == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    check = CliRunner().invoke(app, ["data", "check", "--data-dir", str(tmp_path / "d")])
    assert check.exit_code == 0 and "usable splits: test" in check.stdout


@needs_mnist
def test_corrupt_truncated_and_missing_files_leave_nothing_behind(tmp_path):
    mirror = tmp_path / "mirror"
    shutil.copytree(REAL_MNIST, mirror)
    labels = mirror / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(labels.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte changed: MD5 mismatch
    labels.write_bytes(bytes(data))
    with Server(mirror) as server:
        with pytest.raises(DownloadError, match="MD5 mismatch"):
            download_mnist(tmp_path / "a", [server.url], ["test"], retries=1)
    assert leftovers(tmp_path / "a") == ["t10k-images-idx3-ubyte.gz"]  # the good file, only
    with Server(Path(REAL_MNIST), truncate={"t10k-images-idx3-ubyte.gz"}) as server:
        with pytest.raises(DownloadError, match="could not download t10k-images"):
            download_mnist(tmp_path / "b", [server.url], ["test"], retries=2, backoff=0.01)
    assert leftovers(tmp_path / "b") == []
    with Server(Path(REAL_MNIST)) as server:  # the mirror has no train files: 404
        with pytest.raises(DownloadError, match="HTTP 404"):
            download_mnist(tmp_path / "c", [server.url], ["train"], retries=3)
    assert leftovers(tmp_path / "c") == []


def test_published_md5s_cover_the_four_files():
    assert sorted(MNIST_FILES) == sorted(
        f"{s}-{k}-idx{d}-ubyte.gz" for s in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))
    )


def test_check_names_valid_idx_files_that_are_not_the_published_mnist(tmp_path):
    """Fashion-MNIST or any IDX set: valid, usable, but not MNIST's published files."""
    write_split(tmp_path, n=50, split="t10k")
    write_split(tmp_path, n=30, split="train", gz=False)
    status, usable = check_files(tmp_path)
    assert status["t10k-images-idx3-ubyte.gz"] == "valid IDX (50x28x28), not the published MNIST file"
    assert status["train-labels-idx1-ubyte"] == "valid IDX (30), not the published MNIST file"
    assert usable == ["train", "test"]
    result = CliRunner().invoke(app, ["data", "check", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0 and "usable splits: train, test" in result.stdout
    assert "MD5 mismatch" not in result.stdout


def test_check_reports_invalid_and_mismatched_files(tmp_path):
    write_split(tmp_path, n=50, split="t10k")
    labels = np.zeros(40, dtype=np.uint8)  # 40 labels for 50 images
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip, not idx")
    status, usable = check_files(tmp_path)
    assert status["train-images-idx3-ubyte.gz"].startswith("invalid: not an unsigned-byte IDX file")
    assert status["train-labels-idx1-ubyte.gz"] == "missing"
    assert usable == []
    with pytest.raises(DataError, match=r"holds \(40,\) labels but t10k-images-idx3-ubyte.gz holds 50"):
        split_info(tmp_path, "test")
    result = CliRunner().invoke(app, ["data", "check", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1 and "usable splits: none" in result.stdout


def test_a_request_the_split_cannot_satisfy_is_refused(tmp_path):
    write_split(tmp_path, n=50, split="t10k")
    info = split_info(tmp_path, "test")
    assert (info.count, info.rows, info.cols, info.pixels) == (50, 28, 28, 784)
    check_request(info, "test", 50, "data.n_points", n0=784)  # exactly what it holds: fine
    with pytest.raises(DataError, match=r"data.n_points: 51 points asked for, but the test split .* 50"):
        check_request(info, "test", 51, "data.n_points")
    with pytest.raises(DataError, match=r"takes 100 inputs, but the test split holds 28x28 = 784-number"):
        check_request(info, "test", 10, "data.n_points", n0=100)


def synthetic_mirror(folder: Path) -> dict[str, str]:
    """A mirror folder with a synthetic test split; -> the checksums to verify it against."""
    folder.mkdir(parents=True)
    write_split(folder, n=60, split="t10k")
    return {p.name: md5sum(p) for p in sorted(folder.iterdir())}


def test_download_retries_then_falls_back_across_mirrors(tmp_path):
    """Mirror A has nothing (404: not retried, next mirror); mirror B answers 503 twice for the
    images (retried with backoff, then served). Both files arrive verified, nothing else is left."""
    sums = synthetic_mirror(tmp_path / "b")
    (tmp_path / "a").mkdir()
    images, labels = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
    with Server(tmp_path / "a") as a, Server(tmp_path / "b", fail_first={images: 2}) as b:
        got = download_mnist(
            tmp_path / "d", [a.url, b.url], ["test"], retries=3, backoff=0.001, checksums=sums
        )
    assert [p.name for p in got] == [images, labels]
    assert a.requests == {images: 1, labels: 1} and b.requests == {images: 3, labels: 1}
    assert leftovers(tmp_path / "d") == [images, labels]
    assert {p.name: md5sum(p) for p in got} == sums


def test_download_faults_leave_nothing_behind(tmp_path):
    """A corrupt file (MD5 mismatch: the next mirror, not a retry), a transfer cut half-way
    (retried, then given up), a file on no mirror (404), and a wrong file already in place that
    no mirror can replace: each is an error naming the file, and no temporary file stays."""
    sums = synthetic_mirror(tmp_path / "m")
    images, labels = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "m", bad)
    data = bytearray((bad / labels).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / labels).write_bytes(bytes(data))
    with Server(bad) as server:
        with pytest.raises(DownloadError, match="MD5 mismatch"):
            download_mnist(tmp_path / "a", [server.url], ["test"], retries=3, checksums=sums)
        assert server.requests[labels] == 1
    assert leftovers(tmp_path / "a") == [images]  # the good file only
    with Server(tmp_path / "m", truncate={images}) as server:
        with pytest.raises(DownloadError, match=f"could not download {images}: .*truncated"):
            download_mnist(tmp_path / "b", [server.url], ["test"], retries=2, backoff=0.001, checksums=sums)
        assert server.requests[images] == 2
    assert leftovers(tmp_path / "b") == []
    with Server(tmp_path / "m") as server:
        with pytest.raises(DownloadError, match="HTTP 404"):
            download_mnist(tmp_path / "c", [server.url], ["train"], retries=3, checksums=MNIST_FILES)
    assert leftovers(tmp_path / "c") == []
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / images).write_bytes(b"an old, wrong file")
    (tmp_path / "empty").mkdir()
    with Server(tmp_path / "empty") as server:  # 404 for everything
        with pytest.raises(DownloadError, match=f"could not download {images}"):
            download_mnist(tmp_path / "e", [server.url], ["test"], retries=1, checksums=sums)


def test_nested_choices_are_prefixes_of_one_order(tmp_path):
    """Learning curves: the first m of a nested choice are the same m points whatever n is."""
    write_split(tmp_path, n=50)
    images, labels = load_split(tmp_path, "test")
    small, _ = choose_points(images, labels, 10, seed=3, nested=True)
    large, _ = choose_points(images, labels, 40, seed=3, nested=True)
    assert torch.equal(large[:10], small)
    assert not torch.equal(large[:10], choose_points(images, labels, 10, seed=4, nested=True)[0])
