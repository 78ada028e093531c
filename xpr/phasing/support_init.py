"""The initial support from the pattern itself: the thresholded autocorrelation (spipy, PyNX).

The inverse Fourier transform of the measured intensity is the object's autocorrelation
A(r) = sum_s x(s) conj(x(s - r)), nonzero only on the difference set S - S of the object's
support S. When S contains its own centre (the object sits around the array centre, as phasing
puts it) S lies inside S - S, so a support bounding A bounds every translate of the object that
phasing may land on: a loose first support whose extent follows the object's, not a fixed disc.

Steps (host side, once per run):

1. A = |IFFT[I]| with the masked pixels (a beamstop, gaps) filled in. A beamstop removes the
   lowest frequencies, which carry most of the power: left at 0 they subtract a broad component
   that swamps A. They are filled by alternating two constraints (Gerchberg-Papoulis): A is zero
   outside its thresholded support, and its transform equals I on the measured pixels and is
   non-negative on the masked ones (`fill_iterations` times, starting from the mean of the
   measured pixels within 2 px of the mask).
2. A is blurred by a Gaussian of width `sigma` pixels; the photon-noise floor (Poisson noise is
   white: a delta of weight sum(I) at r = 0) and the ripple the missing centre leaves near the
   origin are kept out of the reference level by taking the maximum beyond `exclude` pixels
   (default max(2 sigma, N/64)). Pixels where the blurred A >=
   threshold x that level are kept, the connected part holding the origin, holes filled.
3. Scale the set about the centre by `scale`, by default n / (n + 1) in n dimensions (2/3 in
   2-D, 3/4 in 3-D): for a convex object K with its centroid at the origin K is contained in
   -n K (Minkowski), so K - K contains (1 + 1/n) K, i.e. n/(n+1) (K - K) still holds K. The full
   difference set is twice the object's extent -- a support that loose lets HIO/RAAR wander
   (measured: docs/cdi.md).
4. Intersect with the disc/ball of radius a quarter of the smallest side (`bound_radius`): no
   object the pattern oversamples at least twice per axis is larger.

`autocorrelation_support` returns the centred boolean support (zero frequency / origin at index
n//2 per axis, as objects are stored).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from xpr.phasing.projections import fft_radius


def _threshold(a, threshold, sigma, exclude=0.0):
    """Connected, hole-free set (centred) where the blurred |a| >= threshold x its level."""
    shape = a.shape
    if sigma:
        a = ndimage.gaussian_filter(a, float(sigma), mode="wrap")
    centre = tuple(n // 2 for n in shape)
    radius = np.sqrt(sum(((np.arange(n) - n // 2) ** 2)[tuple(slice(None) if i == axis else None
                                                               for i in range(len(shape)))]
                         for axis, n in enumerate(shape)))
    # reference level: the maximum outside the noise delta at the origin (blurred over ~sigma)
    away = radius > max(2.0, 2.0 * float(sigma or 0.0), float(exclude))
    level = float(a[away].max()) if away.any() else float(a.max())
    kept = a >= float(threshold) * level
    labels, _ = ndimage.label(kept)
    kept = labels == labels[centre]
    return ndimage.binary_fill_holes(kept)


def filled_pattern(intensity_fft, measured_fft, threshold=0.04, sigma=2.0, iterations=5, exclude=0.0):
    """The pattern (FFT order) with masked pixels filled so that its autocorrelation is confined."""
    measured = np.asarray(measured_fft, dtype=bool)
    values = np.where(measured, np.asarray(intensity_fft, dtype=np.float64), 0.0)
    if measured.all():
        return values
    masked = ~measured
    ring = ndimage.binary_dilation(masked, iterations=2) & measured
    values[masked] = values[ring].mean() if ring.any() else 0.0
    for _ in range(int(iterations)):
        a = np.fft.ifftn(values)
        kept = np.fft.ifftshift(_threshold(np.abs(np.fft.fftshift(a)), threshold, sigma, exclude))
        spectrum = np.fft.fftn(a * kept).real
        values[masked] = np.clip(spectrum[masked], 0.0, None)
    return values


def autocorrelation_support(intensity_fft, measured_fft, threshold=0.04, sigma=2.0, scale=None,
                            fill_iterations=5, bound_radius="quarter", exclude=None):
    """Boolean support from the thresholded, blurred autocorrelation (see module doc).

    scale None: n / (n + 1); bound_radius "quarter": min(shape) / 4, None: no bound."""
    shape = np.shape(intensity_fft)
    centre = tuple(n // 2 for n in shape)
    exclude = min(shape) / 64.0 if exclude is None else float(exclude)
    filled = filled_pattern(intensity_fft, measured_fft, threshold, sigma, fill_iterations, exclude)
    kept = _threshold(np.abs(np.fft.fftshift(np.fft.ifftn(filled))), threshold, sigma, exclude)
    scale = len(shape) / (len(shape) + 1.0) if scale is None else float(scale)
    if scale != 1.0:
        kept = _scaled(kept, scale)
    if bound_radius is not None:
        radius = min(shape) / 4.0 if bound_radius == "quarter" else float(bound_radius)
        r2 = sum(((np.arange(n) - n // 2) ** 2)[tuple(slice(None) if i == axis else None
                                                      for i in range(len(shape)))]
                 for axis, n in enumerate(shape))
        kept &= r2 <= radius ** 2
    kept[centre] = True
    return kept


#: the thresholded |q|-weighted autocorrelation's area over 2^n runs this many times the object's
#: size (the blur and the threshold widen it): measured 1.26-2.2 (median ~1.4) over the 256^2-512^2
#: family, with or without dead detector lines (docs/cdi.md)
SIZE_CALIBRATION = 1.4


def autocorrelation_size(intensity_fft, measured_fft, threshold=0.04, sigma=2.0, exclude=None):
    """The object's size (pixels/voxels) estimated from its pattern: the area/volume of the
    thresholded |q|-weighted autocorrelation over 2^n and SIZE_CALIBRATION.

    The autocorrelation's support is the difference set S - S, and |S - S| = 2^n |S| for a
    centrally symmetric convex object. Its plain form, IFFT[I], is dominated by the lowest
    frequencies -- the central speckle a beamstop hides -- so behind a beamstop its thresholded
    set follows the fill and the dead detector lines rather than S - S (0.34-0.62 x the size
    without dead lines, 0.76-2.2 x with them, on the family). Weighting the measured intensities
    by |q| (the autocorrelation's gradient, in magnitude) leaves the missing centre with little
    weight and keeps the edge of S - S: 1.26-2.2 x over the same cases either way."""
    shape = np.shape(intensity_fft)
    exclude = min(shape) / 64.0 if exclude is None else float(exclude)
    weighted = np.where(np.asarray(measured_fft, dtype=bool),
                        np.asarray(intensity_fft, dtype=np.float64), 0.0) * fft_radius(shape)
    a = np.abs(np.fft.fftshift(np.fft.ifftn(weighted)))
    kept = _threshold(a, threshold, sigma, exclude)
    return float(np.count_nonzero(kept)) / 2.0 ** len(shape) / SIZE_CALIBRATION


def _scaled(support, scale):
    """support(r / scale): the set shrunk (scale < 1) or grown about the array centre."""
    shape = support.shape
    coords = np.meshgrid(*[(np.arange(n) - n // 2) / scale + n // 2 for n in shape], indexing="ij")
    return ndimage.map_coordinates(support.astype(np.float32), coords, order=1, mode="constant") >= 0.5


def equivalent_radius(support):
    """Radius of the disc/ball with the support's area/volume (pixels)."""
    n = int(np.count_nonzero(support))
    if support.ndim == 2:
        return float(np.sqrt(n / np.pi))
    return float((3.0 * n / (4.0 * np.pi)) ** (1.0 / 3.0))
