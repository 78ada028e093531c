"""The object's pixel size in metres, from the experiment's geometry.

A pattern of N detector pixels of size p at distance z, wavelength lambda, samples the far field
at spacing p / (lambda z) (small angles); its inverse FFT has pixels of

    dx = lambda z / (N p)        per axis, with p the binned pixel (binning x the detector's)

(e.g. 1.5 A, 5 m, 75 um Eiger pixels, N = 512: 19.5 nm). The geometry comes from the settings
(input.wavelength, input.detector_distance, input.pixel_size) or, with `auto`, from what the
data file records (xpr.io.h5.recorded_geometry: NeXus or CXI). Without all three the result
stays in pixels. The PRTF's 1/e crossing at |q| = r pixels then gives the half-period
resolution N dx / (2 r).
"""
from __future__ import annotations

import numpy as np

from xpr.errors import SettingsError
from xpr.io.h5 import recorded_geometry

KEYS = (("wavelength", "input.wavelength"), ("distance", "input.detector_distance"),
        ("pixel_size", "input.pixel_size"))


def geometry(inp, source, dimensions):
    """({wavelength, distance, pixel_size (one per axis)} in m, or None where unknown; where each
    came from)."""
    settings = {"wavelength": inp.get("wavelength"), "distance": inp.get("detector_distance"),
                "pixel_size": inp.get("pixel_size")}
    recorded = None
    values, origin = {}, {}
    for name, key in KEYS:
        value = settings[name]
        if isinstance(value, str):
            if value != "auto":
                raise SettingsError(f"{key} must be a length in metres, auto or null, got '{value}'", key=key)
            if recorded is None:
                recorded = {} if source is None else recorded_geometry(source)
            value, origin[name] = recorded.get(name), "the file"
        else:
            origin[name] = key
        if name == "pixel_size" and value is not None:
            sizes = [value] * dimensions if np.isscalar(value) else list(value)
            if dimensions == 3 and len(sizes) == 2:
                sizes = [sizes[0]] + sizes             # a detector's (row, column) for a volume
            if len(sizes) != dimensions or not all(isinstance(s, (int, float)) and s > 0 for s in sizes):
                raise SettingsError(f"{key} must be one positive length or {dimensions}, got {value!r}", key=key)
            value = [float(s) for s in sizes]
        elif value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                        and value > 0):
            raise SettingsError(f"{key} must be a positive length in metres, got {value!r}", key=key)
        values[name] = value
    return values, origin


def object_pixel_size(values, shape, binning):
    """dx = lambda z / (N p b) per axis in metres, or None when the geometry is incomplete."""
    if any(values[k] is None for k in ("wavelength", "distance", "pixel_size")):
        return None
    return [values["wavelength"] * values["distance"] / (n * p * b)
            for n, p, b in zip(shape, values["pixel_size"], binning)]


def half_period_resolution(shells, prtf, shape, pixel_size, level=1.0 / np.e):
    """(|q| in pixels where the PRTF first falls below `level`, the half-period resolution there
    in metres: N dx / (2 r) with N dx the field of view, the smallest axis's); None when it never
    falls below."""
    shells, prtf = np.asarray(shells, float), np.asarray(prtf, float)
    below = np.nonzero((prtf < level) & (shells > 0))[0]
    if not len(below):
        return None
    radius = float(shells[below[0]])
    if pixel_size is None:
        return radius, None
    field = min(n * dx for n, dx in zip(shape, pixel_size))
    return radius, field / (2.0 * radius)
