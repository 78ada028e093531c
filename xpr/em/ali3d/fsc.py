"""Fourier shell correlation of the two half-set volumes and the reference prepared from it.

FSC(f) = Re Σ_shell V̂₁ V̂₂* / √(Σ |V̂₁|² Σ |V̂₂|²) over shells of width one Fourier pixel; the
resolution at a threshold (0.143 for half sets, Rosenthal & Henderson 2003; 0.5 classically) is
where the curve first falls below it (linear interpolation between shells).

The default reference (SPARX's ref_ali3d, with gold-standard half sets) is each half volume times

    w(f) = √(2F/(1 + F)) · H_tanh(f; f_c, a),    F = FSC (made non-increasing, clipped at 0),

the FSC weight of Rosenthal & Henderson (2003) times SPARX's hyperbolic-tangent low-pass
H = ½ [tanh(π(f + f_c)/(2 a f_c)) − tanh(π(f − f_c)/(2 a f_c))] with f_c the 0.143 frequency and fall-off a,
followed by the mask (a soft sphere of radius ou, or the user's mask).
"""
from __future__ import annotations

import numpy as np

from xpr.em.ali3d.gridding import centred_frequencies


def shell_indices(box: int):
    """Integer shell of every voxel of an n³ fftn array (numpy order)."""
    k = centred_frequencies(box)
    radius = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    return np.rint(radius).astype(np.int64)


def fourier_shell_correlation(volume1, volume2, backend):
    """(frequencies in cycles/pixel, FSC) for shells 0 … n/2."""
    box = volume1.shape[0]
    f1 = backend.asnumpy(backend.fftn(backend.asarray(np.asarray(volume1, np.float32))))
    f2 = backend.asnumpy(backend.fftn(backend.asarray(np.asarray(volume2, np.float32))))
    shells = shell_indices(box).ravel()
    n_shells = box // 2 + 1
    keep = shells < n_shells
    shells = shells[keep]
    f1, f2 = f1.ravel()[keep], f2.ravel()[keep]
    cross = np.bincount(shells, (f1 * np.conj(f2)).real, n_shells)
    p1 = np.bincount(shells, np.abs(f1) ** 2, n_shells)
    p2 = np.bincount(shells, np.abs(f2) ** 2, n_shells)
    fsc = cross / np.sqrt(np.maximum(p1 * p2, 1e-30))
    return np.arange(n_shells) / box, fsc


def resolution_frequency(frequencies, fsc, threshold: float) -> float:
    """First frequency (cycles/pixel) where the FSC falls below `threshold`; Nyquist if never."""
    below = np.nonzero(fsc[1:] < threshold)[0]
    if len(below) == 0:
        return float(frequencies[-1])
    i = below[0] + 1
    f0, f1, c0, c1 = frequencies[i - 1], frequencies[i], fsc[i - 1], fsc[i]
    return float(f0 + (c0 - threshold) / (c0 - c1) * (f1 - f0)) if c0 != c1 else float(f0)


def resolution_A(frequencies, fsc, threshold: float, pixel_size_A: float) -> float:
    return pixel_size_A / max(resolution_frequency(frequencies, fsc, threshold), 1e-6)


def tanh_lowpass(f, cutoff: float, falloff: float):
    """SPARX's filt_tanl transfer function at frequencies f (cycles/pixel)."""
    cutoff = max(cutoff, 1e-3)
    scale = np.pi / (2.0 * falloff * cutoff)
    return 0.5 * (np.tanh(scale * (f + cutoff)) - np.tanh(scale * (f - cutoff)))


def fsc_weights(frequencies, fsc, falloff: float = 0.1, threshold: float = 0.143):
    """w(f) per shell: FSC weight × tanh low-pass at the threshold frequency."""
    monotone = np.minimum.accumulate(np.clip(fsc, 0.0, 1.0))
    weight = np.sqrt(2 * monotone / (1 + monotone))
    cutoff = resolution_frequency(frequencies, fsc, threshold)
    return weight * tanh_lowpass(frequencies, cutoff, falloff)


def apply_shell_filter(volume, weights, backend):
    """Multiply the volume's transform by a per-shell weight (shells beyond n/2 get the last one)."""
    box = volume.shape[0]
    shells = np.minimum(shell_indices(box), len(weights) - 1)
    spectrum = backend.fftn(backend.asarray(np.asarray(volume, np.float32)))
    filtered = backend.ifftn(spectrum * backend.asarray(weights[shells].astype(np.float32)))
    return backend.asnumpy(filtered).real.astype(np.float32)


def soft_sphere(box: int, radius: float, edge: float = 3.0):
    """1 inside `radius` (pixels from n//2), raised-cosine edge of width `edge`, 0 outside."""
    axis = np.arange(box) - box // 2
    r = np.sqrt(axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2)
    ramp = np.clip((r - radius) / edge, 0.0, 1.0)
    return (0.5 * (1 + np.cos(np.pi * ramp))).astype(np.float32)


def circular_mask(box: int, radius: float):
    axis = np.arange(box) - box // 2
    return (axis[:, None] ** 2 + axis[None, :] ** 2 <= radius * radius)


def fsc_weighted_reference(volume, frequencies, fsc, mask, backend, falloff: float = 0.1):
    """The default reference preparation: FSC-weighted tanh low-pass, then the mask.

    Returns (reference, weights per shell)."""
    weights = fsc_weights(frequencies, fsc, falloff)
    return apply_shell_filter(volume, weights, backend) * mask, weights


def adaptive_mask(volume, sphere, threshold: float = 0.05, dilation: float = 2.0, edge: float = 3.0):
    """A soft mask around the particle: the voxels of `volume` (a low-passed map) above
    `threshold` × its maximum inside `sphere`, grown by `dilation` pixels, with a raised-cosine edge
    of `edge` pixels, times `sphere`.  Multiplied into the references it sets the solvent around
    the particle to zero, where the sphere keeps its noise (at SNR 1 most of the reference's noise
    lies outside the particle).  Falls back to `sphere` when nothing is above the threshold."""
    from scipy import ndimage

    inside = np.asarray(volume, np.float32) * sphere
    peak = float(inside.max())
    if peak <= 0:
        return sphere
    support = inside > threshold * peak
    distance = ndimage.distance_transform_edt(~support)
    ramp = np.clip((distance - dilation) / max(edge, 1e-6), 0.0, 1.0)
    return (0.5 * (1 + np.cos(np.pi * ramp))).astype(np.float32) * sphere
