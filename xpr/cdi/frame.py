"""From the detector's frame to the centred pattern that phasing needs.

Phasing takes zero frequency (the direct beam) at index n//2 of every axis. A measured frame has
it wherever the beam hit the detector, on a frame of the detector's size (Eiger 1028 x 1062,
...), often as a series of frames. Settings (`input.frames`, `input.centre`, `input.crop`,
`input.binning`; none of them changes data that are already centred):

0. Detector sentinels: unsigned integer pixels at their type's maximum (2^32 - 1: what Eiger
   writes into gaps and dead pixels) are masked, in any frame.
1. frames: a stack of exposures (one axis more than the pattern, first) is added up, which
   keeps photon counts counts; a pixel masked in any frame stays masked.
2. centre: given in pixels of the data as read, or `auto`: the beam centre the file records
   (NeXus NXdetector `beam_center_x/y`; xpr.io.h5.recorded_beam_centre), else the centre of the
   pattern's Friedel symmetry (`friedel_centre`). Rounded to a whole pixel.
3. crop: the array is cut (`largest`: the largest array around the centre whose sides are even
   and 2,3,5,7-smooth, so FFTs stay fast) or padded with masked pixels (`pad`: every measured
   pixel kept) so that the centre lands at n//2.
4. binning: b pixels per axis summed into one (counts stay counts); a bin holding a masked pixel
   is masked. With odd b the centre pixel is the middle of the central bin; with even b the
   centre lies half an original pixel off it.

Friedel symmetry. For a real object I(c + d) = I(c - d) about the centre c. The autoconvolution
of the pattern (sum over r of A(r) A(t - r), with A = sqrt(I) on the measured pixels) is the
overlap of A with A reflected through t/2, so its normalised maximum sits at t = 2c
(normalised by sum over r of A(r)^2 w(t - r), w = 1 on measured pixels: Cauchy-Schwarz makes the
ratio <= 1, equal for exact symmetry). Computed with zero-padded FFTs; the peak refined by a
parabola per axis. A complex object breaks the symmetry (I(q) != I(-q) in general), and its
centre is ambiguous in principle: a linear phase ramp across the object shifts the pattern.
Measured (docs/cdi.md, 20 cases each): exact on real objects; median 0.5 px (at most 1.3) off at
+-1 rad, 1.6 px (at most 3.7) at +-1.5 rad, the phased object then carrying the compensating
ramp. For such samples the beam's measured position (input.centre, or the file's) is the one to
use.
"""
from __future__ import annotations

import numpy as np
import scipy.fft

from xpr.backend import default_fft_workers
from xpr.errors import InputError, SettingsError


def sum_frames(data, mask, dimensions, frames, file):
    """(data, mask) with a stack of frames added up when `frames` is 'sum'."""
    if data.ndim != dimensions + 1 or frames is None:
        return data, mask
    data = np.asarray(data, dtype=np.float64)
    finite = np.isfinite(data)
    bad = ~finite.all(axis=0)                     # a pixel non-finite in any frame: masked
    summed = np.where(finite, data, 0.0).sum(axis=0)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim == dimensions + 1:
            if mask.shape != data.shape:
                raise InputError(f"mask stack shape {list(mask.shape)} differs from the frames' "
                                 f"{list(data.shape)}", file=file, key="input.mask_path")
            mask = mask.any(axis=0)
    mask = bad if mask is None else (mask | bad)
    return summed, mask


def detector_sentinels(data):
    """Where unsigned integer data sit at their type's maximum: the value Eiger and other
    counting detectors write into gaps and dead pixels (2^32 - 1, 2^16 - 1); None for other
    types."""
    data = np.asarray(data)
    if data.dtype.kind != "u":
        return None
    return data == np.iinfo(data.dtype).max


def friedel_centre(intensity, masked):
    """(centre, score): the point c about which the pattern is most nearly centrosymmetric,
    in pixels of the array (sub-pixel, per axis), and the normalised overlap there (1 = exact).
    masked: True = not measured."""
    weight = (~np.asarray(masked, dtype=bool)).astype(np.float64)
    A = np.sqrt(np.clip(np.nan_to_num(np.asarray(intensity, dtype=np.float64)), 0.0, None)) * weight
    shape = [scipy.fft.next_fast_len(2 * n - 1, real=True) for n in A.shape]   # zero padding: no wrap
    fft = dict(s=shape, axes=tuple(range(A.ndim)), workers=default_fft_workers())
    FA, Fw = scipy.fft.rfftn(A, **fft), scipy.fft.rfftn(weight, **fft)
    overlap_of_A = scipy.fft.irfftn(FA * FA, **fft)
    energy = scipy.fft.irfftn(scipy.fft.rfftn(A * A, **fft) * Fw, **fft)
    measured_pairs = scipy.fft.irfftn(Fw * Fw, **fft)
    # only centres about which at least a quarter of the measured pixels have a measured mate
    allowed = measured_pairs > 0.25 * weight.sum()
    score = np.where(allowed & (energy > 0), overlap_of_A / np.where(energy > 0, energy, 1.0), -np.inf)
    peak = np.unravel_index(int(np.argmax(score)), score.shape)
    best = float(score[peak])
    if not np.isfinite(best):
        return None, 0.0
    centre = []
    for axis, t in enumerate(peak):
        values = []
        for step in (-1, 0, 1):
            index = list(peak)
            index[axis] = (t + step) % score.shape[axis]
            values.append(score[tuple(index)])
        curvature = values[0] - 2 * values[1] + values[2]
        offset = 0.5 * (values[0] - values[2]) / curvature if np.isfinite(curvature) and curvature < 0 else 0.0
        centre.append((t + float(np.clip(offset, -0.5, 0.5))) / 2.0)
    return np.asarray(centre), best


def smooth_length(n, up=False):
    """The nearest even length <= n (>= n with up) whose only prime factors are 2, 3, 5, 7."""
    n = int(n)
    n += n % 2 if up else -(n % 2)
    while n > 2:
        m = n
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 2 if up else -2
    return 2


def window(length, centre, binning, crop):
    """(start, binned length) of one axis: bins of `binning` pixels from `start` (which may lie
    outside [0, length): padding), the central bin n'//2 holding pixel `centre` in its middle
    (odd binning) or just right of it (even)."""
    def start_for(binned):
        return centre - (binned // 2) * binning - (binning - 1) // 2

    def inside(binned):
        return start_for(binned) >= 0 and start_for(binned) + binned * binning <= length

    def covers(binned):
        return start_for(binned) <= 0 and start_for(binned) + binned * binning >= length

    if crop == "pad":
        binned = 2
        while not covers(binned):
            binned += 2
        binned = smooth_length(binned, up=True)      # longer still covers: the ends move apart
        return start_for(binned), binned
    binned = smooth_length(max(length // binning, 2))
    while binned > 2 and not inside(binned):
        binned = smooth_length(binned - 2)
    return start_for(binned), binned


def recentre(intensity, masked, centre, crop="largest", binning=1):
    """(intensity, masked) cut or padded around the integer `centre` (one per axis) and binned,
    zero frequency at index n//2; padded pixels are masked. Binned pixels are sums; a bin with a
    masked pixel is masked."""
    binnings = [int(binning)] * intensity.ndim if np.isscalar(binning) else [int(b) for b in binning]
    out_slices, in_slices, full = [], [], []
    for length, c, b in zip(intensity.shape, centre, binnings):
        start, binned = window(length, int(c), b, crop)
        size = binned * b
        full.append(size)
        lo, hi = max(start, 0), min(start + size, length)
        in_slices.append(slice(lo, hi))
        out_slices.append(slice(lo - start, hi - start))
    values = np.zeros(full)
    bad = np.ones(full, dtype=bool)
    values[tuple(out_slices)] = intensity[tuple(in_slices)]
    bad[tuple(out_slices)] = masked[tuple(in_slices)]
    values = np.where(bad, 0.0, values)
    if any(b > 1 for b in binnings):
        blocks = []
        for size, b in zip(full, binnings):
            blocks += [size // b, b]
        odd_axes = tuple(range(1, 2 * len(full), 2))
        values = values.reshape(blocks).sum(axis=odd_axes)
        bad = bad.reshape(blocks).any(axis=odd_axes)
        values[bad] = 0.0
    return values, bad


def resolve_centre(setting, intensity, masked, dimensions, recorded, file):
    """(integer centre per axis, how it was found) from `input.centre`: a list, or auto
    (`recorded`, the file's beam centre, else Friedel symmetry)."""
    if isinstance(setting, str):
        if setting != "auto":
            raise SettingsError(f"input.centre must be auto, null or a list of {dimensions} pixel "
                                f"positions, got '{setting}'", key="input.centre")
        if recorded is not None and len(recorded) == dimensions:
            return [int(round(c)) for c in recorded], f"the file's beam centre {[round(float(c), 2) for c in recorded]}"
        centre, score = friedel_centre(intensity, masked)
        if centre is None:
            raise InputError("input.centre auto: too few measured pixels to find the pattern's "
                             "centre of symmetry; give input.centre", file=file, key="input.centre")
        return [int(round(c)) for c in centre], (f"the pattern's Friedel symmetry at "
                                                 f"{[round(float(c), 2) for c in centre]} (overlap {score:.3f})")
    values = list(setting) if isinstance(setting, (list, tuple)) else None
    if values is None or len(values) != dimensions or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise SettingsError(f"input.centre must be auto, null or a list of {dimensions} pixel "
                            f"positions, got {setting!r}", key="input.centre")
    for v, n in zip(values, intensity.shape):
        if not 0 <= v < n:
            raise InputError(f"input.centre {values} lies outside the pattern of shape "
                             f"{list(intensity.shape)}", file=file, key="input.centre")
    return [int(round(v)) for v in values], "input.centre"


def binning_factors(setting, dimensions):
    """One binning factor per axis from `input.binning` (a whole number >= 1, or a list)."""
    values = [setting] * dimensions if not isinstance(setting, (list, tuple)) else list(setting)
    if len(values) != dimensions or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                            for v in values):
        raise SettingsError(f"input.binning must be a whole number >= 1 or a list of {dimensions}, "
                            f"got {setting!r}", key="input.binning")
    return values


def binning_setting(inp):
    value = inp.get("binning", 1)
    return 1 if value is None else value


def shape_bound(shape, inp, dimensions):
    """An upper bound on the phased array's shape from the file's (header) shape, before the
    data are read: padding around an unknown centre at most doubles an axis."""
    factors = binning_factors(binning_setting(inp), dimensions)
    if inp.get("centre") is None and all(b == 1 for b in factors):
        return tuple(shape)
    grow = 2 if inp.get("crop", "largest") == "pad" else 1
    return tuple(max(2, grow * n // b + 2) for n, b in zip(shape, factors))
