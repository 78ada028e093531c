"""An Eiger-style NeXus file for the tests that read beamline files (tests/inputs, tests/cdi):
written here once, as a detector's control software lays it out."""
from __future__ import annotations

import h5py
import hdf5plugin
import numpy as np


def write_nexus(path, data, pixel_mask=None, name="data", signal=None, compress=True, beam_centre=None):
    """/@default -> entry, entry/@default -> data, an NXdata group holding `data` as `name`
    (@signal = `signal`, by default `name`), compressed with bitshuffle-LZ4 one frame per chunk,
    and the detector's pixel mask in instrument/detector/detectorSpecific/pixel_mask (uint32,
    nonzero = bad). beam_centre (row, column) in pixels also records the geometry: beam_center_y/x
    (x = column), 75 um pixels at 5 m, and incident_wavelength 1.5 A. Returns path."""
    data = np.asarray(data)
    with h5py.File(path, "w") as f:
        f.attrs["default"] = "entry"
        entry = f.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        entry.attrs["default"] = "data"
        group = entry.create_group("data")
        group.attrs["NX_class"] = "NXdata"
        group.attrs["signal"] = signal or name
        chunks = (1,) * (data.ndim - 2) + data.shape[-2:]
        group.create_dataset(name, data=data, chunks=chunks,
                             **(hdf5plugin.Bitshuffle(cname="lz4") if compress else {}))
        group["x_pixel"] = np.arange(data.shape[-1])
        detector = entry.create_group("instrument/detector")
        detector.attrs["NX_class"] = "NXdetector"
        if pixel_mask is not None:
            detector["detectorSpecific/pixel_mask"] = np.asarray(pixel_mask).astype(np.uint32)
        if beam_centre is not None:
            for axis, value in (("y", beam_centre[0]), ("x", beam_centre[1])):
                detector.create_dataset(f"beam_center_{axis}", data=float(value)).attrs["units"] = "pixel"
                detector.create_dataset(f"{axis}_pixel_size", data=75e-6).attrs["units"] = "m"
            detector.create_dataset("detector_distance", data=5.0).attrs["units"] = "m"
            beam = entry.create_group("instrument/beam")
            beam.attrs["NX_class"] = "NXbeam"
            beam.create_dataset("incident_wavelength", data=1.5).attrs["units"] = "angstrom"
    return path
