"""A labelled image dataset in one NumPy .npz file: x_train, y_train, x_test, y_test.

The bring-your-own-data path beside IDX folders (docs/data.md): `--data-dir my.npz` or
`data.dir: my.npz`. Images are (N, rows, cols) (one channel), (N, C, rows, cols) (channels
first, as torch takes them) or (N, rows, cols, C) with C in 1, 3, 4 where the first reading
cannot be meant (rows and cols above 4): CIFAR as Keras saves it. uint8 images are pixels 0..255
(scaled by 1/255, as IDX files are); floating-point images are taken as they are. Labels are
integers 0..9, one per image. Shapes are read from the archive's headers, without loading it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ntkrun.errors import DataError

KEYS = {"train": ("x_train", "y_train"), "test": ("x_test", "y_test")}
CLASSES = 10


def is_npz(path: Path) -> bool:
    return path.suffix == ".npz"


def headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{array name: (shape, dtype)} of an .npz, from its members' .npy headers. Raises DataError."""
    out = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if not name.endswith(".npy"):
                    continue
                with archive.open(name) as member:
                    version = np.lib.format.read_magic(member)
                    fmt = np.lib.format
                    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                    shape, _, dtype = read(member)
                out[name.removesuffix(".npy")] = (tuple(shape), dtype)
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except (OSError, zipfile.BadZipFile, ValueError) as err:
        raise DataError(f"{path}: not a readable .npz archive ({err})") from None
    return out


def image_shape(path: Path, key: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(channels, rows, cols) of one image of array `key` of this shape. Raises DataError."""
    if len(shape) == 3:
        return (1, shape[1], shape[2])
    if len(shape) == 4 and shape[3] in (1, 3, 4) and min(shape[1], shape[2]) > 4:
        return (shape[3], shape[1], shape[2])  # channels last
    if len(shape) == 4:
        return (shape[1], shape[2], shape[3])
    raise DataError(
        f"{path}: {key} has shape {shape}; images are (N, rows, cols), (N, C, rows, cols) or "
        "(N, rows, cols, C)"
    )


def split_shape(path: Path, split: str) -> tuple[int, tuple[int, int, int]]:
    """(count, (channels, rows, cols)) of a split, checked against its labels (read: N integers,
    each 0..9). Raises DataError."""
    arrays = headers(path)
    x, y = KEYS[split]
    missing = [key for key in (x, y) if key not in arrays]
    if missing:
        held = ", ".join(sorted(arrays)) or "no arrays"
        raise DataError(
            f"{path}: has no {' or '.join(missing)} (it holds {held}); a dataset .npz holds x_train, "
            "y_train, x_test, y_test"
        )
    (x_shape, x_dtype), (y_shape, y_dtype) = arrays[x], arrays[y]
    if x_dtype.kind not in "uif":
        raise DataError(f"{path}: {x} holds {x_dtype}, not numbers")
    if len(y_shape) != 1 or y_dtype.kind not in "ui" or y_shape[0] != x_shape[0]:
        raise DataError(
            f"{path}: {y} has shape {y_shape} ({y_dtype}); it must be {x_shape[0]} integer labels, one "
            f"per image of {x}"
        )
    shape = image_shape(path, x, x_shape)
    labels = _array(path, y)
    if labels.size and (labels.min() < 0 or labels.max() >= CLASSES):
        raise DataError(
            f"{path}: {y} holds labels {labels.min()}..{labels.max()}; they must be 0..{CLASSES - 1}"
        )
    return x_shape[0], shape


def _array(path: Path, key: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as archive:
        return archive[key]


def load(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, C, rows, cols), labels (N,) int64) of a split. Raises DataError."""
    shape = split_shape(path, split)[1]
    x_key, y_key = KEYS[split]
    X, y = _array(path, x_key), _array(path, y_key).astype(np.int64)
    if X.ndim == 3:
        X = X[:, None]
    elif X.shape[1:] != shape:
        X = np.ascontiguousarray(X.transpose(0, 3, 1, 2))
    if X.dtype.kind == "f" and not np.isfinite(X).all():
        raise DataError(f"{path}: {x_key} holds non-finite values")
    return X, y


def check(path: Path) -> tuple[dict[str, str], list[str]]:
    """({"x_train, y_train": state, ...}, usable splits), as ntkrun.data.check_files for IDX."""
    states, usable = {}, []
    for split, (x, y) in KEYS.items():
        try:
            count, shape = split_shape(path, split)
            size = "x".join(str(d) for d in (shape if shape[0] > 1 else shape[1:]))
            states[f"{x}, {y}"] = f"ok: {count} images of {size}"
            usable.append(split)
        except DataError as err:
            states[f"{x}, {y}"] = f"invalid: {str(err).removeprefix(f'{path}: ')}"
    return states, usable
