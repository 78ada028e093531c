"""Merging independent repeats: select, align against a reference, average, PRTF.

A diffraction pattern determines an object only up to

* a translation (the modulus of a Fourier transform ignores a phase ramp),
* a global phase factor exp(i phi), and
* the twin: the centrosymmetric inversion with complex conjugation, x(r) -> conj(x(-r)),
  which has the same Fourier modulus.

Each repeat is brought onto a reference (the repeat with the lowest final modulus error) by
trying the repeat and its twin, locating the peak of their complex cross-correlation with the
reference (sub-pixel by a three-point parabola on each axis), shifting by a Fourier phase ramp,
and taking the global phase of the overlap. The aligned repeats are averaged.

The phase-retrieval transfer function (Chapman et al. 2006) measures how reproducibly each
Fourier component was phased:

    PRTF(q) = | sum_j F_j(q) | / sum_j |F_j(q)|,  averaged over measured pixels in shells of |q|,

with F_j the transform of aligned repeat j: 1 where every repeat agrees, small where phases are
random.
"""
from __future__ import annotations

import numpy as np

from xpr.phasing.projections import fft_radius


def twin(x, xp=np):
    """The centrosymmetric twin conj(x(-r)) of one object (up to a translation)."""
    return xp.conj(xp.flip(x))


def _parabolic_offset(minus, centre, plus):
    denominator = minus - 2.0 * centre + plus
    if denominator >= 0 or not np.isfinite(denominator):
        return 0.0
    return float(np.clip(0.5 * (minus - plus) / denominator, -0.5, 0.5))


def correlation_peak(reference, y, backend):
    """(peak height, shift s such that y(r - s) best matches reference(r)) for one pair."""
    xp = backend.xp
    correlation = xp.abs(backend.ifftn(backend.fftn(reference) * xp.conj(backend.fftn(y))))
    correlation = backend.asnumpy(correlation)
    peak = np.unravel_index(int(np.argmax(correlation)), correlation.shape)
    shift = []
    for axis, n in enumerate(correlation.shape):
        index = list(peak)
        index[axis] = (peak[axis] - 1) % n
        minus = correlation[tuple(index)]
        index[axis] = (peak[axis] + 1) % n
        plus = correlation[tuple(index)]
        s = peak[axis] + _parabolic_offset(minus, correlation[peak], plus)
        shift.append(s - n if s > n / 2 else s)
    return float(correlation[peak]), np.array(shift)


def translate(y, shift, backend):
    """y(r - shift) by a Fourier phase ramp (sub-pixel, periodic)."""
    xp = backend.xp
    ramp = 0.0
    for axis, (n, s) in enumerate(zip(y.shape, shift)):
        q = np.fft.fftfreq(n)
        expand = [None] * y.ndim
        expand[axis] = slice(None)
        ramp = ramp + (q * s)[tuple(expand)]
    phase = xp.asarray(np.exp(-2j * np.pi * ramp).astype(backend.complex_dtype))
    out = backend.ifftn(backend.fftn(y) * phase)
    if not xp.iscomplexobj(y):
        out = out.real
    return out.astype(y.dtype)


def align(reference, y, backend, allow_twin=True):
    """y with translation, twin and global phase removed against reference; and what was done."""
    xp = backend.xp
    candidates = [(False, y)] + ([(True, twin(y, xp))] if allow_twin else [])
    best = None
    for is_twin, candidate in candidates:
        height, shift = correlation_peak(reference, candidate, backend)
        if best is None or height > best[0]:
            best = (height, is_twin, candidate, shift)
    _, is_twin, candidate, shift = best
    moved = translate(candidate.astype(backend.complex_dtype), shift, backend)
    overlap = complex(xp.vdot(moved, reference))
    phase = float(np.angle(overlap))
    moved = moved * np.complex64(np.exp(1j * phase))
    return moved, {"twin": is_twin, "shift": shift, "phase": phase}


def real_space_error(recovered, truth, backend, allow_twin=True):
    """min over translation, twin and a complex scale c of ||c x - truth|| / ||truth||."""
    xp = backend.xp
    truth = xp.asarray(truth).astype(backend.complex_dtype)
    moved, _ = align(truth, xp.asarray(recovered), backend, allow_twin=allow_twin)
    scale = complex(xp.vdot(moved, truth)) / max(float(xp.vdot(moved, moved).real), 1e-30)
    residual = moved * np.complex64(scale) - truth
    return float(xp.sqrt(xp.vdot(residual, residual).real / xp.vdot(truth, truth).real))


def select(final_errors, keep_fraction=1.0, tolerance=None):
    """Indices of the repeats to merge, lowest final error first.

    At most ceil(keep_fraction x repeats) of them, and with a tolerance only those whose error is
    within (1 + tolerance) x the lowest: failed repeats (stagnated, collapsed support) have a
    clearly higher modulus error and would only blur the average.
    """
    errors = np.asarray(final_errors, dtype=float)
    order = np.argsort(errors, kind="stable")
    n = max(1, min(int(np.ceil(keep_fraction * len(order))), len(order)))
    chosen = order[:n]
    if tolerance is not None:
        chosen = chosen[errors[chosen] <= (1.0 + tolerance) * errors[order[0]]]
    return chosen


def merge_repeats(objects, selected, backend, allow_twin=True):
    """(mean of the aligned selected repeats, the aligned repeats); selected[0] is the reference."""
    xp = backend.xp
    reference = xp.asarray(objects[selected[0]]).astype(backend.complex_dtype)
    aligned = [reference]
    for i in selected[1:]:
        moved, _ = align(reference, xp.asarray(objects[i]), backend, allow_twin=allow_twin)
        aligned.append(moved)
    aligned = xp.stack(aligned)
    return aligned.mean(axis=0), aligned


def prtf(aligned, measured, backend):
    """(shell radius in pixels, PRTF per shell) from aligned repeats; measured in FFT order."""
    xp = backend.xp
    axes = tuple(range(1, aligned.ndim))
    spectra = backend.fftn(aligned, axes=axes)
    coherent = xp.abs(spectra.sum(axis=0))
    incoherent = xp.abs(spectra).sum(axis=0)
    ratio = coherent / xp.maximum(incoherent, 1e-30)
    ratio = backend.asnumpy(ratio)
    measured = np.asarray(backend.asnumpy(measured), dtype=bool)
    shell = np.rint(np.asarray(fft_radius(ratio.shape))).astype(np.int64)
    n_shells = int(shell.max()) + 1
    weights = measured.ravel().astype(np.float64)
    sums = np.bincount(shell.ravel(), weights=ratio.ravel() * weights, minlength=n_shells)
    counts = np.bincount(shell.ravel(), weights=weights, minlength=n_shells)
    radius = np.arange(n_shells)
    keep = counts > 0
    return radius[keep], (sums[keep] / counts[keep]).astype(np.float32)
