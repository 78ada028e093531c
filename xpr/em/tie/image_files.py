"""A focal series from the image files microscopists hold: TIFF, MRC (also a stack, with FEI/Thermo
extended headers), Gatan DigitalMicrograph .dm3/.dm4, or any array file xpr reads.

`input.focal_series` names one file holding the whole series (an MRC or multi-page TIFF stack) or
a list of files, one image each, in the order of `input.defocus_m`. What the files carry is used
for what the settings leave open (settings first, as everywhere in `tie`):

* defocus: `input.defocus_m`, else the `Defocus` field of an MRC's FEI1/FEI2 extended header (one
  per frame; FEI/Thermo write underfocus as negative, xpr's convention is the opposite, so the
  value is negated — `imaging.defocus_sign: -1` undoes that for files that disagree);
* pixel size: `imaging.pixel_size_m`, else the FEI header's `Pixel size X` (m), the MRC voxel size
  (Å), or the DigitalMicrograph calibration (its axis scale and unit);
* accelerating voltage: `imaging.accelerating_voltage_kV`, else the FEI header's `HT` (V) or the
  DigitalMicrograph microscope info (beam energy).

Returns the same tree and attributes as the HDF5 focal-series file, so every later check applies.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from xpr.errors import InputError

DM_SUFFIXES = (".dm3", ".dm4")
MRC_SUFFIXES = (".mrc", ".mrcs", ".st")
SUFFIXES = (".tif", ".tiff", ".npy", ".edf", ".cbf", ".map") + MRC_SUFFIXES + DM_SUFFIXES

LENGTH_UNITS_M = {"m": 1.0, "mm": 1e-3, "µm": 1e-6, "um": 1e-6, "nm": 1e-9, "Å": 1e-10, "A": 1e-10,
                  "pm": 1e-12}


def read_series(paths, defocus_setting, key):
    """(tree, attributes) of a focal series given as image files (see the module docstring)."""
    images, defocus, attributes = [], [], {}
    for path in paths:
        path = Path(str(path)).expanduser()
        if not path.is_file():
            raise InputError("focal-series image file not found", file=path, key=key)
        suffix = path.suffix.lower()
        if suffix in MRC_SUFFIXES:
            stack, frame_defocus, found = _read_mrc(path, key)
        elif suffix in DM_SUFFIXES:
            stack, frame_defocus, found = _read_dm(path, key)
        else:
            from xpr.io import read_array

            stack, frame_defocus, found = np.asarray(read_array(path, key=key), float), None, {}
        stack = np.asarray(stack, dtype=float)
        stack = stack[None] if stack.ndim == 2 else stack
        if stack.ndim != 3:
            raise InputError(f"an image or a stack of images expected, got shape {list(stack.shape)}",
                             file=path, key=key)
        images.extend(stack)
        defocus.extend([None] * len(stack) if frame_defocus is None else list(frame_defocus))
        for name, value in found.items():
            attributes.setdefault(name, value)
    shapes = {image.shape for image in images}
    if len(shapes) != 1:
        raise InputError(f"the images have different shapes {sorted(list(s) for s in shapes)}",
                         file=paths[0], key=key)
    if defocus_setting is not None:
        values = [float(d) for d in defocus_setting]
        if len(values) != len(images):
            raise InputError(f"input.defocus_m has {len(values)} values for {len(images)} images",
                             file=paths[0], key="input.defocus_m")
        defocus = values
    elif any(d is None for d in defocus):
        raise InputError("the defocus of the images is not in their files: give input.defocus_m "
                         "(m, one per image, 0 = in focus, positive = underfocus)", file=paths[0],
                         key="input.defocus_m")
    return {"images": np.stack(images), "defocus_m": np.asarray(defocus, float)}, attributes


def _read_mrc(path, key):
    import mrcfile

    try:
        with mrcfile.open(path, permissive=True) as mrc:
            if mrc.data is None:
                raise InputError("not a readable MRC file", file=path, key=key)
            data = np.array(mrc.data, dtype=float)
            voxel = float(mrc.voxel_size.x)
            extended = None
            if bytes(mrc.header.exttyp).strip(b"\0 ") in (b"FEI1", b"FEI2"):
                extended = mrc.indexed_extended_header
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read the MRC file: {err}", file=path, key=key) from None
    found = {}
    if voxel > 0:
        found["pixel_size_m"] = voxel * 1e-10
    defocus = None
    if extended is not None and len(extended):
        frames = len(data) if data.ndim == 3 else 1
        fields = extended.dtype.names or ()
        if "Defocus" in fields:
            # FEI/Thermo: underfocus negative; xpr: underfocus positive
            defocus = [-float(extended["Defocus"][i]) for i in range(frames)]
        if "Pixel size X" in fields and float(extended["Pixel size X"][0]) > 0:
            found["pixel_size_m"] = float(extended["Pixel size X"][0])
        if "HT" in fields and float(extended["HT"][0]) > 0:
            found["accelerating_voltage_kV"] = float(extended["HT"][0]) / 1e3
    return data, defocus, found


def _read_dm(path, key):
    try:
        from rsciio.digitalmicrograph import file_reader
    except ImportError:
        raise InputError("reading .dm3/.dm4 files needs RosettaSciIO: pip install 'xpr[formats]'",
                         file=path, key=key) from None
    try:
        signals = file_reader(str(path))
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"cannot read the DigitalMicrograph file: {err}", file=path, key=key) from None
    signal = next((s for s in signals if np.ndim(s["data"]) in (2, 3)), None)
    if signal is None:
        raise InputError("no image in the DigitalMicrograph file", file=path, key=key)
    found = {}
    axis = signal["axes"][-1]
    unit = str(axis.get("units", "")).strip()
    if unit in LENGTH_UNITS_M and float(axis.get("scale", 0)) > 0:
        found["pixel_size_m"] = float(axis["scale"]) * LENGTH_UNITS_M[unit]
    tem = signal.get("metadata", {}).get("Acquisition_instrument", {}).get("TEM", {})
    if tem.get("beam_energy"):
        found["accelerating_voltage_kV"] = float(tem["beam_energy"])
    return np.asarray(signal["data"], float), None, found
