"""Refusing data that cannot be phased, before any work: one place for every command's input.

`check_intensities` is for measured intensities (CDI patterns, fxs patterns, 4D-STEM
diffraction, focal-series images): they must be real numbers, not empty, finite wherever they
are measured (masked pixels may hold anything), and hold some positive signal. Scattered negative
values -- what background-subtracted detector data has -- are clipped to 0 and counted, not
refused. `check_real` is for signed data (particle images, phase maps): real, finite, not empty,
not constant zero.

Each refusal is an InputError (exit 2) naming the file, the settings key, what is wrong and how
many pixels.
"""
from __future__ import annotations

import logging

import numpy as np

from xpr.errors import InputError

_LOG = logging.getLogger("xpr.io.checks")


def _where(array, file, key):
    def fail(problem):
        raise InputError(f"{problem} (array of shape {list(np.shape(array))})", file=file, key=key)
    return fail


def _common(array, file, key):
    """Dtype and emptiness; returns the array as a float numpy array (no copy if it is one)."""
    fail = _where(array, file, key)
    array = np.asarray(array)
    kind = array.dtype.kind
    if kind == "c":
        imag = int(np.count_nonzero(np.imag(array))) if array.size else 0
        fail(f"complex values ({imag} of {array.size} pixels with a non-zero imaginary part): "
             "intensities are real; give |amplitude|^2 or the real part explicitly")
    if kind not in "iuf":
        fail(f"values of type {array.dtype} are not numbers (expected integer or float)")
    if array.size == 0:
        fail("the array is empty (0 pixels)")
    return array


def _mask(mask, shape, file, key):
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != shape:
        if mask.size and np.broadcast_shapes(mask.shape, shape) == shape:
            return np.broadcast_to(mask.astype(bool), shape)
        raise InputError(f"mask shape {list(mask.shape)} differs from the data's {list(shape)}",
                         file=file, key=key)
    return mask.astype(bool)


def check_intensities(array, mask=None, file=None, key=None, log=None, what="intensities",
                      nonfinite_masked=False, negative_masked=False):
    """Measured intensities, checked and cleaned: returns (float array, n_clipped).

    mask: True / nonzero = masked (not measured); its pixels may hold NaN, inf or anything.
    nonfinite_masked: NaN/inf pixels mark masked pixels (fxs patterns carry no mask otherwise).
    negative_masked: negative pixels mark masked pixels too (fxs correlate masks them), so they
    are neither clipped nor logged.
    Refused (InputError, exit 2): complex, non-numeric, empty, NaN or inf outside the mask, all
    zero or no positive value outside the mask. Negative values outside the mask are clipped to
    0, and their count logged (log: a logging.Logger) and returned.
    """
    fail = _where(array, file, key)
    array = _common(array, file, key)
    masked = _mask(mask, array.shape, file, key)
    if nonfinite_masked and array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.any():
            fail(f"no finite {what}: all {array.size} pixels are NaN or infinite")
        masked = ~finite if masked is None else (masked | ~finite)
    below = None
    if negative_masked:
        with np.errstate(invalid="ignore"):
            below = array < 0
        if below.any():
            masked = below if masked is None else (masked | below)
    values = array if masked is None else array[~masked]
    if values.size == 0:
        if below is not None and below.any():
            fail(f"no positive {what}: every pixel is masked or negative ({int(below.sum())} "
                 "negative, which count as masked here)")
        fail(f"every pixel is masked: no measured {what}")
    if array.dtype.kind == "f":
        nan = int(np.count_nonzero(np.isnan(values)))
        inf = int(np.count_nonzero(np.isinf(values)))
        if nan or inf:
            fail(f"{nan} NaN and {inf} infinite values among {values.size} measured pixels "
                 "(mask them: 1 = masked, or fix the file)")
    positive = int(np.count_nonzero(values > 0))
    negative = int(np.count_nonzero(values < 0))
    if positive == 0:
        if negative:
            fail(f"no positive {what}: all {values.size} measured pixels are <= 0 "
                 f"({negative} negative)")
        fail(f"no signal: all {values.size} measured pixels are 0")
    cleaned = np.asarray(array, dtype=np.float64 if array.dtype == np.float64 else np.float32)
    if negative:
        cleaned = np.where(cleaned < 0, 0, cleaned) if masked is None else \
            np.where((cleaned < 0) & ~masked, 0, cleaned)
        (log or _LOG).info("%s: %d of %d measured pixels were negative (down to %.4g): clipped "
                           "to 0", file or key or what, negative, values.size, float(values.min()))
    return cleaned, negative


def check_dtype(array, file=None, key=None):
    """Refuse complex, non-numeric and empty data from its dtype and shape alone (a lazy array:
    h5py dataset, memmap, dask), before a reader casts it."""
    fail = _where(array, file, key)
    kind = np.dtype(array.dtype).kind
    size = int(np.prod(array.shape))
    if kind == "c":
        fail(f"complex values in all {size} pixels: intensities are real; give |amplitude|^2 "
             "or the real part explicitly")
    if kind not in "iuf":
        fail(f"values of type {array.dtype} are not numbers (expected integer or float)")
    if size == 0:
        fail("the array is empty (0 pixels)")


def check_intensity_frames(array, file=None, key=None, log=None, what="intensities",
                           chunk_bytes=1 << 27):
    """check_intensities for a large stack (e.g. 4-D STEM data, possibly a read-only memmap),
    counted frame block by frame block along axis 0 so no full-size temporary is made. Returns
    the array itself, or a clipped copy when it holds negative values (counted and logged)."""
    fail = _where(array, file, key)
    if not hasattr(array, "dtype") or not hasattr(array, "shape"):
        array = np.asarray(array)
    check_dtype(array, file, key)
    rows = max(1, int(chunk_bytes // max(1, array[0:1].nbytes))) if array.ndim else 1
    nan = inf = positive = negative = 0
    low = 0.0
    for start in range(0, array.shape[0] if array.ndim else 1, rows):
        block = np.asarray(array[start:start + rows] if array.ndim else array)
        if block.dtype.kind == "f":
            nan += int(np.count_nonzero(np.isnan(block)))
            inf += int(np.count_nonzero(np.isinf(block)))
        positive += int(np.count_nonzero(block > 0))
        below = block < 0
        if below.any():
            negative += int(np.count_nonzero(below))
            low = min(low, float(block[below].min()))
    if nan or inf:
        fail(f"{nan} NaN and {inf} infinite values among {array.size} pixels")
    if positive == 0:
        if negative:
            fail(f"no positive {what}: all {array.size} pixels are <= 0 ({negative} negative)")
        fail(f"no signal: all {array.size} pixels are 0")
    if negative:
        (log or _LOG).info("%s: %d of %d pixels were negative (down to %.4g): clipped to 0",
                           file or key or what, negative, array.size, low)
        return np.maximum(array, 0)
    return array


def check_real(array, file=None, key=None, what="values"):
    """Signed real data (e.g. particle images): refused when complex, non-numeric, empty,
    holding NaN/inf, or all zero. Returns the array as float."""
    fail = _where(array, file, key)
    array = _common(array, file, key)
    if array.dtype.kind == "f":
        nan = int(np.count_nonzero(np.isnan(array)))
        inf = int(np.count_nonzero(np.isinf(array)))
        if nan or inf:
            fail(f"{nan} NaN and {inf} infinite {what} among {array.size} pixels")
    if not np.any(array):
        fail(f"no signal: all {array.size} pixels are 0")
    return np.asarray(array, dtype=np.float64 if array.dtype == np.float64 else np.float32)


def check_stack(dataset, file=None, key=None, frames="ends", **options):
    """check_intensities on a stacked HDF5 dataset (frames along axis 0) without reading it
    all: frames="ends" checks the first and the last frame, "all" every frame. A frame that
    cannot be read (a corrupt chunk) is left to the workers, which record such failures; its
    dtype and emptiness are still checked."""
    shape = f"(dataset of shape {list(dataset.shape)})"
    if dataset.dtype.kind == "c":
        raise InputError(f"complex values: intensities are real {shape}", file=file, key=key)
    if dataset.dtype.kind not in "iuf":
        raise InputError(f"values of type {dataset.dtype} are not numbers (expected integer or "
                         f"float) {shape}", file=file, key=key)
    if dataset.size == 0:
        raise InputError(f"the dataset is empty (0 pixels) {shape}", file=file, key=key)
    if dataset.ndim < 3:
        indices = [None]
    elif frames == "all":
        indices = range(dataset.shape[0])
    else:
        indices = sorted({0, dataset.shape[0] - 1})
    for index in indices:
        try:
            frame = dataset[()] if index is None else dataset[index]
        except OSError:
            continue
        where = key if index is None else f"{key} (frame {index})"
        check_intensities(frame, file=file, key=where, **options)
