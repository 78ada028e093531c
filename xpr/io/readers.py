"""Input arrays from the formats users bring: .npy, .bin (raw with a shape), .mat (v5 through
scipy, v7.3 through h5py), HDF5/CXI/NeXus (h5py with the detector filters of hdf5plugin; the
signal found as xpr.io.h5.find_signal says), .mrc, TIFF (tifffile), EDF/CBF (fabio)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from xpr.errors import InputError
from xpr.io.h5 import HDF5_SUFFIXES, open_h5, read_dataset


SUFFIXES = (".npy", ".bin", ".mat") + HDF5_SUFFIXES + (".mrc", ".mrcs", ".map", ".tif", ".tiff",
                                                       ".edf", ".cbf")


def read_array(path, dataset: str | None = None, shape=None, dtype="float32", key: str | None = None):
    """Read one array.

    path:    file; the suffix picks the reader.
    dataset: HDF5 dataset path (.h5/.hdf5/.cxi/.nxs) or variable name (.mat); default: the
             CXI pattern, the NeXus signal, a root dataset `data`, or the only one.
    shape:   required for .bin (raw binary, C order, `dtype`); checked for the others when given.
    key:     the settings key that named the file, for error messages.
    """
    return read_input(path, dataset=dataset, shape=shape, dtype=dtype, key=key)[0]


def read_input(path, dataset: str | None = None, shape=None, dtype="float32", key: str | None = None,
               prefer=("data",)):
    """(array, mask or None, dataset path or None): read_array plus the detector mask a CXI or
    NeXus file carries with its signal (nonzero = bad), or the `mask` beside a root `data`
    dataset (xpr's own files). No mask is guessed for a named dataset."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise InputError("input file not found", file=path, key=key)
    suffix = path.suffix.lower()
    mask = name = None
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
        elif suffix in HDF5_SUFFIXES:
            array, mask, name = read_dataset(path, dataset=dataset, key=key, prefer=prefer)
        elif suffix in (".mrc", ".mrcs", ".map"):
            array = _read_mrc(path, key)
        elif suffix in (".tif", ".tiff"):
            import tifffile
            array = tifffile.imread(path)
        elif suffix in (".edf", ".cbf"):
            array = _read_fabio(path, key)
        else:
            raise InputError(f"unknown file type '{suffix}' (expected one of {' '.join(SUFFIXES)})",
                             file=path, key=key)
    except (OSError, ValueError, EOFError) as err:
        raise InputError(f"cannot read the file: {err}", file=path, key=key) from None
    array = np.asarray(array)
    if shape is not None and tuple(array.shape) != tuple(shape):
        raise InputError(f"array has shape {list(array.shape)}, expected {list(shape)}", file=path, key=key)
    return array, (None if mask is None else np.asarray(mask)), name


def _read_mat(path, name, key):
    import h5py
    import scipy.io

    if h5py.is_hdf5(path):          # MATLAB v7.3 (save -v7.3) is HDF5
        return _read_mat73(path, name, key)
    contents = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
    if name is None:
        if len(contents) != 1:
            raise InputError(f"the .mat file holds {sorted(contents)}: name one", file=path, key=key)
        return next(iter(contents.values()))
    if name not in contents:
        raise InputError(f"no variable '{name}' in the .mat file (has {sorted(contents)})", file=path, key=key)
    return contents[name]


def _read_mat73(path, name, key):
    """A v7.3 .mat file: each variable a root dataset, stored column-major (so transposed back
    to MATLAB's shape), complex as a compound of `real` and `imag`."""
    import h5py

    with open_h5(path, key) as f:
        variables = sorted(k for k in f if not k.startswith("#") and isinstance(f[k], h5py.Dataset))
        if name is None:
            if len(variables) != 1:
                raise InputError(f"the v7.3 .mat file holds {variables}: name one", file=path, key=key)
            name = variables[0]
        if name not in variables:
            raise InputError(f"no variable '{name}' in the v7.3 .mat file (has {variables})",
                             file=path, key=key)
        data = f[name][()]
    if data.dtype.names and {"real", "imag"} <= set(data.dtype.names):
        data = data["real"] + 1j * data["imag"]
    return np.asarray(data).T


def _read_fabio(path, key):
    try:
        import fabio
    except ImportError:
        raise InputError("reading EDF/CBF needs the 'fabio' package (pip install fabio)",
                         file=path, key=key) from None
    image = fabio.open(str(path))
    if getattr(image, "nframes", 1) > 1:
        return np.stack([image.getframe(i).data for i in range(image.nframes)])
    return np.asarray(image.data)


def _read_mrc(path, key):
    try:
        import mrcfile
    except ImportError:
        raise InputError("reading .mrc needs the 'mrcfile' package (pip install mrcfile)",
                         file=path, key=key) from None
    with mrcfile.open(path, permissive=True) as mrc:
        return np.array(mrc.data)


def read_pattern(path, dataset=None, mask_path=None, mask_dataset=None, shape=None,
                 key="input.data_path", mask_key="input.mask_path"):
    """(data, mask as bool or None, description) of a measured pattern and its mask (True = bad).

    The mask: the file `mask_path` (its `mask_dataset`, or its CXI/NeXus mask, `mask` or only
    dataset) when given; else `mask_dataset` inside the data file; else the detector mask the
    data file carries (CXI entry_1/instrument_1/detector_1/mask, NeXus pixel_mask, xpr's `mask`).
    """
    data, mask, name = read_input(path, dataset=dataset, shape=shape, key=key)
    where = f"{path}" + (f" [{name}]" if name else "")
    if mask_path is not None:
        mask_data, carried, mask_name = read_input(mask_path, dataset=mask_dataset, shape=None,
                                                   key=mask_key, prefer=("mask", "data"))
        mask = mask_data if mask_dataset is not None or carried is None else carried
    elif mask_dataset is not None:
        if not str(path).lower().endswith(HDF5_SUFFIXES):
            raise InputError("input.mask_dataset needs an HDF5 data file (or input.mask_path)",
                             file=path, key="input.mask_dataset")
        mask = read_input(path, dataset=mask_dataset, key="input.mask_dataset")[0]
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype.kind not in "biuf":
            raise InputError(f"the mask holds {mask.dtype} values, expected integers or booleans "
                             "(nonzero = masked)", file=mask_path or path, key=mask_key)
        mask = mask != 0
    return data, mask, where
