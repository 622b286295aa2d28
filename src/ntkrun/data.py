"""Inputs of the experiments: circle points, Gaussian training sets, IDX datasets (MNIST) and .npz ones."""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ntkrun import npzdata
from ntkrun.atomic import atomic_write
from ntkrun.errors import DataError, DownloadError


def seeded_generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for `stream` of `seed`, independent of the network init stream (seed alone)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, stream]).generate_state(1)[0]))


def circle(gammas: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """(G,) angles -> (G, 2) points (cos g, sin g), float64."""
    g = torch.as_tensor(gammas, dtype=torch.float64)
    return torch.stack([torch.cos(g), torch.sin(g)], dim=1)


def grid_angles(n: int) -> torch.Tensor:
    """n angles evenly spaced in [-pi, pi), float64."""
    return -math.pi + 2 * math.pi * torch.arange(n, dtype=torch.float64) / n


def gaussian_inputs(n: int, dim: int, seed: int) -> torch.Tensor:
    """(n, dim) inputs x ~ N(0, I), float64, drawn from the data stream of `seed`."""
    return torch.randn(n, dim, generator=seeded_generator(seed, 1), dtype=torch.float64)


def product_target(X: torch.Tensor) -> torch.Tensor:
    """f*(x) = x1 x2: (N, >=2) -> (N,)."""
    return X[:, 0] * X[:, 1]


# --------------------------------------------------------------------------- IDX datasets (MNIST)

MNIST_FILES = {  # the published MD5s of the four standard files
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DATA_ENV = "NTKRUN_DATA_DIR"


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or raw): unsigned-byte data with its dimensions. Checks the
    magic number and that the payload holds exactly the product of the dimensions."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DataError(f"{path}: corrupt gzip data ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX payload has {len(raw) - header} bytes, dimensions {dims} need {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def idx_dims(path: Path) -> tuple[int, ...]:
    """The dimensions in an IDX file's header (gzipped or raw); checks the magic number and the
    payload's size (which reads, and decompresses, the whole file: the answer is cached per path,
    size and modification time, as `digest` is, for runners that ask once per unit). Raises DataError."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err})") from None
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIMS:
        _DIMS[key] = _read_idx_dims(path)
    return _DIMS[key]


def _read_idx_dims(path: Path) -> tuple[int, ...]:
    with open(path, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    opener = gzip.open if gzipped else open
    try:
        with opener(path, "rb") as fh:
            magic = fh.read(4)
            if len(magic) < 4 or magic[:3] != b"\x00\x00\x08":
                raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number {magic.hex()})")
            raw = fh.read(4 * magic[3])
            if len(raw) < 4 * magic[3]:
                raise DataError(f"{path}: truncated IDX header")
            dims = struct.unpack(f">{magic[3]}I", raw)
            payload = 0
            for block in iter(lambda: fh.read(1 << 20), b""):
                payload += len(block)
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: corrupt gzip data ({err})") from None
    if payload != int(np.prod(dims)):
        need = int(np.prod(dims))
        raise DataError(f"{path}: IDX payload has {payload} bytes, dimensions {dims} need {need}")
    return dims


@dataclass(frozen=True)
class Split:
    """One split of an image dataset (IDX files or an .npz), from its headers: `count` images of
    channels x rows x cols."""

    images: Path
    labels: Path
    count: int
    rows: int
    cols: int
    channels: int = 1

    @property
    def pixels(self) -> int:
        """Numbers per image."""
        return self.channels * self.rows * self.cols

    @property
    def shape(self) -> tuple[int, int, int]:
        """One image's (channels, rows, cols), as a network takes it."""
        return (self.channels, self.rows, self.cols)

    @property
    def size(self) -> str:
        """ "28x28" or "3x32x32"."""
        return "x".join(str(d) for d in (self.shape if self.channels > 1 else self.shape[1:]))


def split_info(folder: Path, split: str) -> Split:
    """The split's files and sizes, read from the IDX headers only. Raises DataError when a file
    is missing or invalid, the images are not 2-D, or the label count differs from the image count."""
    images, labels = split_files(folder, split)
    if npzdata.is_npz(folder):
        count, (channels, rows, cols) = npzdata.split_shape(folder, split)
        return Split(images, labels, count, rows, cols, channels)
    dims, label_dims = idx_dims(images), idx_dims(labels)
    if len(dims) != 3:
        raise DataError(f"{images}: expected images (count, rows, cols), the header says {dims}")
    if len(label_dims) != 1 or label_dims[0] != dims[0]:
        raise DataError(f"{labels}: holds {label_dims} labels but {images.name} holds {dims[0]} images")
    return Split(images, labels, dims[0], dims[1], dims[2])


def check_request(info: Split, split: str, n_points: int, key: str, n0: int | None = None) -> None:
    """Refuse a request the split cannot satisfy: `key` asks for more points than it holds, or a
    network input dimension n0 that is not its image size. Raises DataError."""
    if n_points > info.count:
        raise DataError(
            f"{key}: {n_points} points asked for, but the {split} split ({info.images}) holds {info.count}"
        )
    if n0 is not None and n0 != info.pixels:
        raise DataError(
            f"{key}: the network takes {n0} inputs, but the {split} split holds {info.size} "
            f"= {info.pixels}-number images ({info.images})"
        )


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """--data-dir / spec, then $NTKRUN_DATA_DIR, then ~/.cache/ntkrun."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return Path.home() / ".cache" / "ntkrun"


def _find(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def split_files(folder: Path, split: str) -> tuple[Path, Path]:
    """The (images, labels) files of a split in folder (an .npz: itself, twice); DataError saying how
    to get them if absent."""
    where = f"(looked in --data-dir / spec data.dir, ${DATA_ENV}, ~/.cache/ntkrun)"
    if npzdata.is_npz(folder):
        if not folder.is_file():
            raise DataError(f"{folder}: not found {where}")
        return folder, folder
    if folder.exists() and not folder.is_dir():
        raise DataError(
            f"{folder}: is a file, not a folder; name the folder of the IDX files, or an .npz of x_train, "
            f"y_train, x_test, y_test {where}"
        )
    img_stem, lbl_stem = SPLIT_FILES[split]
    images, labels = _find(folder, img_stem), _find(folder, lbl_stem)
    if images is None or labels is None:
        missing = img_stem if images is None else lbl_stem
        other = "test" if split == "train" else "train"
        if folder.is_dir() and all(_find(folder, stem) for stem in SPLIT_FILES[other]):
            hint = (
                f"the folder holds the {other} split only: an experiment with a data.split key runs on "
                f"it with --set data.split={other}; `ntkrun data check --data-dir {folder}` lists its files"
            )
        else:
            hint = (
                f"get MNIST with: ntkrun data download mnist --data-dir {folder}; Fashion-MNIST with: "
                "apt-get install dataset-fashion-mnist (then --data-dir /usr/share/datasets/fashion-mnist)"
            )
        there = "" if folder.is_dir() else " (no such folder)"
        raise DataError(f"{missing}(.gz) not found in {folder}{there} {where}; {hint}")
    return images, labels


def files_of(data_dir: str | Path | None, splits: Sequence[str]) -> list[Path]:
    """The (images, labels) files of each split, found as resolve_data_dir finds the folder."""
    folder = resolve_data_dir(data_dir)
    return list(dict.fromkeys(path for split in splits for path in split_files(folder, split)))


def load_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (M, rows, cols) uint8 of an IDX folder, or (M, C, rows, cols) of an .npz; labels (M,))
    of one split."""
    if npzdata.is_npz(folder):
        return npzdata.load(folder, split)
    images, labels = split_files(folder, split)
    X, y = read_idx(images), read_idx(labels)
    if X.ndim != 3 or y.ndim != 1 or X.shape[0] != y.shape[0]:
        raise DataError(
            f"{images}, {labels}: shapes {X.shape} and {y.shape} do not form a labelled image set"
        )
    if y.size and y.max() >= npzdata.CLASSES:  # as an .npz's: the experiments' targets have 10 classes
        raise DataError(f"{labels}: holds labels 0..{y.max()}; they must be 0..{npzdata.CLASSES - 1}")
    return X, y


def flat_pixels(images: np.ndarray) -> torch.Tensor:
    """(n, ...) images -> (n, numbers) float64: uint8 pixels / 255, floating-point ones as they are."""
    X = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float64))
    return X / 255.0 if images.dtype == np.uint8 else X


def choose_points(
    images: np.ndarray,
    labels: np.ndarray,
    n_points: int,
    seed: int,
    scaling: str = "unit",
    nested: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded choice of n_points images, flattened: -> (X (n, C*rows*cols) float64, labels (n,)).

    scaling 'unit': pixel / 255 (uint8 images; floating-point ones as they are); 'standardize':
    each pixel to mean 0 and std 1 over the chosen set (constant pixels stay 0). nested=True keeps
    the images in their random order, so that every prefix X[:m] is itself a uniform choice of m
    (learning curves on nested training sets); otherwise they come in file order."""
    if n_points > images.shape[0]:
        raise DataError(f"n_points = {n_points} but the split holds only {images.shape[0]} images")
    rng = np.random.default_rng(seed)
    if nested:  # a prefix of one permutation: the same first m points whatever n_points is
        idx = rng.permutation(images.shape[0])[:n_points]
    else:
        idx = np.sort(rng.choice(images.shape[0], size=n_points, replace=False))
    X = flat_pixels(images[idx])
    if scaling == "standardize":
        std = X.std(0)
        X = (X - X.mean(0)) / torch.where(std > 0, std, 1.0)
    return X, torch.from_numpy(labels[idx].astype(np.int64))


_DIGESTS: dict[tuple[str, int, int], str] = {}
_DIMS: dict[tuple[str, int, int], tuple[int, ...]] = {}  # idx_dims by (path, size, mtime)


def digest(path: Path) -> str:
    """16 hex digits of the SHA-256 of an IDX file's content, decompressed: the same for a gzipped
    and a raw copy wherever it lies, so it identifies the data a run read (cached per path, size
    and modification time). Raises DataError if the file cannot be read."""
    path = Path(path)
    try:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _DIGESTS:
            with open(path, "rb") as fh:
                gzipped = fh.read(2) == b"\x1f\x8b"
            sha = hashlib.sha256()
            with (gzip.open if gzipped else open)(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    sha.update(block)
            _DIGESTS[key] = sha.hexdigest()[:16]
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot be read ({err})") from None
    return _DIGESTS[key]


def digests(files: list[Path]) -> dict[str, str]:
    """{file name without .gz: digest} of the files a run reads."""
    return {Path(f).name.removesuffix(".gz"): digest(f) for f in files}


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_files(folder: Path) -> tuple[dict[str, str], list[str]]:
    """({file: state}, usable splits) for the four standard files of an IDX dataset in folder.

    A state is "ok (published MNIST, MD5 verified)", "valid IDX <dims>, not the published MNIST
    file" (e.g. Fashion-MNIST), "missing" or "invalid: <reason>". A split is usable when both its
    files are valid IDX and their counts agree. An .npz: its splits' arrays, valid or why not."""
    if npzdata.is_npz(folder):
        return npzdata.check(folder)
    states: dict[str, str] = {}
    for stems in SPLIT_FILES.values():
        for stem in stems:
            path = _find(folder, stem)
            name = path.name if path is not None else f"{stem}.gz"
            if path is None:
                states[name] = "missing"
                continue
            try:
                dims = idx_dims(path)
            except DataError as err:
                states[name] = f"invalid: {str(err).removeprefix(f'{path}: ')}"
                continue
            shape = "x".join(str(d) for d in dims)
            published = MNIST_FILES.get(name)
            if published is not None and md5sum(path) == published:
                states[name] = f"ok: published MNIST, MD5 verified ({shape})"
            else:
                states[name] = f"valid IDX ({shape}), not the published MNIST file"
    usable = []
    for split in SPLIT_FILES:
        try:
            split_info(folder, split)
            usable.append(split)
        except DataError:
            pass
    return states, usable


def download_mnist(
    folder: Path,
    mirrors: Sequence[str] = MNIST_MIRRORS,
    splits: Sequence[str] = ("train", "test"),
    retries: int = 3,
    timeout: float = 30.0,
    backoff: float = 1.0,
    log: Callable[[str], None] = lambda _: None,
    checksums: dict[str, str] = MNIST_FILES,
) -> list[Path]:
    """Download the files of `splits` into folder, checking each against its MD5 in `checksums`
    (MNIST's published ones). A file is written under a temporary name and renamed only once
    verified; files already verified are kept. Per mirror, a failed transfer is retried with
    exponential backoff; a 404 or a corrupt file moves on to the next mirror."""
    folder.mkdir(parents=True, exist_ok=True)
    done = []
    wanted = {f"{stem}.gz" for split in splits for stem in SPLIT_FILES[split]}
    for name, md5 in checksums.items():
        if name not in wanted:
            continue
        target = folder / name
        if target.is_file() and md5sum(target) == md5:
            log(f"{name}: present, MD5 ok")
            done.append(target)
            continue
        errors: list[str] = []
        fetched = False  # a file already there with another MD5 is replaced, never taken as done
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + name
            for attempt in range(1, retries + 1):
                try:
                    _fetch(url, target, md5, timeout)
                    log(f"{name}: downloaded from {url}, MD5 ok")
                    fetched = True
                    break
                except DataError as err:  # corrupt download: the next mirror, not a retry
                    errors.append(str(err))
                    break
                except urllib.error.HTTPError as err:
                    errors.append(f"{url}: HTTP {err.code} {err.reason}")
                    if err.code == 404:  # not on this mirror: retrying will not help
                        break
                    time.sleep(backoff * 2.0 ** (attempt - 1))
                except (OSError, urllib.error.URLError) as err:
                    reason = getattr(err, "reason", None) or err
                    errors.append(f"{url}: {reason} (attempt {attempt}/{retries})")
                    time.sleep(backoff * 2.0 ** (attempt - 1))
            if fetched:
                break
        if not fetched:
            raise DownloadError(f"could not download {name}: " + "; ".join(errors))
        done.append(target)
    return done


def _fetch(url: str, target: Path, md5: str, timeout: float) -> None:
    """Download url to target, renamed into place only once complete and its MD5 verified."""

    def download(tmp: Path) -> None:
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            expected = response.headers.get("Content-Length")
            written = 0
            for block in iter(lambda: response.read(1 << 16), b""):
                out.write(block)
                written += len(block)
        if expected is not None and written != int(expected):
            raise OSError(f"truncated: got {written} of {expected} bytes")
        got = md5sum(tmp)
        if got != md5:
            raise DataError(f"{url}: MD5 mismatch (got {got}, published {md5})")

    atomic_write(target, download)
