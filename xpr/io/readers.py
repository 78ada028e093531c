"""Input arrays from the formats users bring: .npy, .bin (raw with a shape), .mat, .h5, .mrc."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from xpr.errors import InputError


def read_array(path, dataset: str | None = None, shape=None, dtype="float32", key: str | None = None):
    """Read one array.

    path:    file; the suffix picks the reader.
    dataset: HDF5 dataset path (.h5/.hdf5/.cxi/.nxs) or variable name (.mat); default: the only one.
    shape:   required for .bin (raw binary, C order, `dtype`); checked for the others when given.
    key:     the settings key that named the file, for error messages.
    """
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise InputError("input file not found", file=path, key=key)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        elif suffix == ".bin":
            if shape is None:
                raise InputError("a .bin file needs its shape (e.g. input.shape: [ny, nx])", file=path, key=key)
            array = np.fromfile(path, dtype=dtype)
            if array.size != int(np.prod(shape)):
                raise InputError(f"{array.size} values of {dtype} do not fill shape {list(shape)}",
                                 file=path, key=key)
            array = array.reshape(shape)
        elif suffix == ".mat":
            array = _read_mat(path, dataset, key)
        elif suffix in (".h5", ".hdf5", ".cxi", ".nxs"):
            array = _read_h5(path, dataset, key)
        elif suffix in (".mrc", ".mrcs", ".map"):
            array = _read_mrc(path, key)
        else:
            raise InputError(f"unknown file type '{suffix}' (expected .npy .bin .mat .h5 .mrc)",
                             file=path, key=key)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read the file: {err}", file=path, key=key) from None
    if shape is not None and tuple(array.shape) != tuple(shape):
        raise InputError(f"array has shape {list(array.shape)}, expected {list(shape)}", file=path, key=key)
    return array


def _read_mat(path, name, key):
    import scipy.io

    contents = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
    if name is None:
        if len(contents) != 1:
            raise InputError(f"the .mat file holds {sorted(contents)}: name one", file=path, key=key)
        return next(iter(contents.values()))
    if name not in contents:
        raise InputError(f"no variable '{name}' in the .mat file (has {sorted(contents)})", file=path, key=key)
    return contents[name]


def _read_h5(path, name, key):
    import h5py

    with h5py.File(path, "r") as f:
        if name is None:
            names = []
            f.visititems(lambda n, obj: names.append(n) if isinstance(obj, h5py.Dataset) else None)
            if len(names) != 1:
                raise InputError(f"the HDF5 file holds {len(names)} datasets: name one", file=path, key=key)
            name = names[0]
        if name not in f or not isinstance(f[name], h5py.Dataset):
            raise InputError(f"no dataset '{name}' in the HDF5 file", file=path, key=key)
        return f[name][()]


def _read_mrc(path, key):
    try:
        import mrcfile
    except ImportError:
        raise InputError("reading .mrc needs the 'mrcfile' package (pip install mrcfile)",
                         file=path, key=key) from None
    with mrcfile.open(path, permissive=True) as mrc:
        return np.array(mrc.data)
