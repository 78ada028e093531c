"""A reconstruction as a CXI file (CXI 1.6 layout), for CXI viewers and PyNX users.

    cxi_version                      160
    entry_1/                         NXentry, @default = image_1
      program_name, start_time
      image_1/                       NXdata, @signal = data
        data                         the object (complex), zero frequency's conjugate at the centre
        mask                         its support (1 = inside), as PyNX writes it
        data_type, data_space        "object", "real"
        is_fft_shifted               0
        x_pixel_size, y_pixel_size   the object's pixel size in metres (z_ in 3-D), when the
                                     geometry is known (xpr.cdi.geometry)
        process_1/                   NXprocess: program, version, command, the parameters
          configuration/             every resolved setting (numbers as numbers, else text)
          configuration_yaml         the same as one YAML text
          results/prtf, prtf_radius_px   the phase-retrieval transfer function per |q| shell
          note/                      free attributes of the run (schedule, source, ...)
      data_1/data                    soft link to image_1/data (what CXI readers open first)
"""
from __future__ import annotations

import datetime
from pathlib import Path

import h5py
import numpy as np
import yaml

from xpr.io.atomic import atomic_path


def _leaf(group, name, value):
    if value is None:
        group.create_dataset(name, data="null", dtype=h5py.string_dtype())
        return
    if isinstance(value, (bool, np.bool_)):
        group.create_dataset(name, data=np.uint8(value))
        group[name].attrs["type"] = "bool"
        return
    data = np.asarray(value) if isinstance(value, (int, float, list, tuple, np.ndarray, np.number)) else None
    if data is not None and data.dtype.kind in "iufc" and data.size:
        group.create_dataset(name, data=data)
    else:
        group.create_dataset(name, data=str(value), dtype=h5py.string_dtype())


def _tree(group, tree: dict):
    for key, value in tree.items():
        if isinstance(value, dict):
            _tree(group.create_group(str(key)), value)
        else:
            _leaf(group, str(key), value)


def save_cxi_result(path, obj, support, prtf=None, prtf_radius=None, settings: dict | None = None,
                    command: str = "", note: dict | None = None, pixel_size=None) -> Path:
    """Write one reconstruction as a CXI file at `path` (atomically); returns the path.
    pixel_size: the object's pixel size per array axis in metres (image_1/x_pixel_size for the
    last axis, y_pixel_size the one before, z_pixel_size in 3-D), when known."""
    from xpr import __version__

    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("cxi_version", data=np.int64(160))
            f.attrs["default"] = "entry_1"
            entry = f.create_group("entry_1")
            entry.attrs["NX_class"] = "NXentry"
            entry.attrs["default"] = "image_1"
            entry.create_dataset("program_name", data=f"xpr {__version__}", dtype=h5py.string_dtype())
            entry.create_dataset("start_time", data=datetime.datetime.now().astimezone().isoformat(),
                                 dtype=h5py.string_dtype())
            image = entry.create_group("image_1")
            image.attrs["NX_class"] = "NXdata"
            image.attrs["signal"] = "data"
            image.create_dataset("data", data=np.asarray(obj), compression="gzip", shuffle=True)
            image["data"].attrs["interpretation"] = "image"
            image.create_dataset("mask", data=np.asarray(support).astype(np.uint8),
                                 compression="gzip", shuffle=True)
            image["mask"].attrs["note"] = "the support: 1 = inside the object"
            for name, text in (("data_type", "object"), ("data_space", "real")):
                image.create_dataset(name, data=text, dtype=h5py.string_dtype())
            image.create_dataset("is_fft_shifted", data=np.uint8(0))
            if pixel_size is not None:
                for axis, size in zip("xyz", reversed(list(pixel_size))):
                    image.create_dataset(f"{axis}_pixel_size", data=np.float64(size))
                    image[f"{axis}_pixel_size"].attrs["units"] = "m"
            process = image.create_group("process_1")
            process.attrs["NX_class"] = "NXprocess"
            process.create_dataset("program", data="xpr", dtype=h5py.string_dtype())
            process.create_dataset("version", data=str(__version__), dtype=h5py.string_dtype())
            process.create_dataset("command", data=command, dtype=h5py.string_dtype())
            if settings is not None:
                _tree(process.create_group("configuration"), settings)
                process.create_dataset("configuration_yaml", dtype=h5py.string_dtype(),
                                       data=yaml.safe_dump(settings, sort_keys=False))
            if prtf is not None:
                results = process.create_group("results")
                results.create_dataset("prtf", data=np.asarray(prtf, dtype=np.float32))
                if prtf_radius is not None:
                    results.create_dataset("prtf_radius_px", data=np.asarray(prtf_radius))
            if note:
                _tree(process.create_group("note"), note)
            data = entry.create_group("data_1")
            data.attrs["NX_class"] = "NXdata"
            data.attrs["signal"] = "data"
            data["data"] = h5py.SoftLink("/entry_1/image_1/data")
    return path
