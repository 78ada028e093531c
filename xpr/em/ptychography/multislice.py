"""Multislice: the specimen as thin phase gratings separated by Fresnel free-space propagation.

A slab of projected potential v_z transmits t(r) = exp(iσ v_z(r)) (σ: interaction constant,
optics.interaction_constant). Between slabs the wave travels Δz in vacuum:

    ψ_{s+1} = IFFT[ FFT[ψ_s t_s] · K_Δz ],      K_Δz(k) = exp(−iπλΔz|k|²) · B(k)

with B the 2/3 band limit (|k| ≤ (2/3) k_Nyquist), which keeps the product ψ·t from aliasing
(Kirkland, Advanced Computing in Electron Microscopy, ch. 6). Kernels here are in FFT order
(zero frequency at index 0), the order the FFTs work in; only user-facing arrays are centred.
"""
from __future__ import annotations

import math

from xpr.em import optics


def fft_frequencies(shape, pixel_size_A: float, xp):
    """(ky, kx) in Å⁻¹ of an FFT-ordered grid, as broadcastable column and row."""
    ny, nx = shape
    ky = xp.fft.fftfreq(ny, pixel_size_A).astype(xp.float64)
    kx = xp.fft.fftfreq(nx, pixel_size_A).astype(xp.float64)
    return ky[:, None], kx[None, :]


def band_limit(shape, xp, fraction: float = 2.0 / 3.0):
    """1 inside |k| ≤ fraction · k_Nyquist (the smaller axis' Nyquist), else 0; FFT order."""
    ky, kx = fft_frequencies(shape, 1.0, xp)
    return (ky ** 2 + kx ** 2 <= (fraction * 0.5) ** 2).astype(xp.float32)


def fresnel_propagator(shape, pixel_size_A: float, wavelength_A: float, distance_A: float, xp,
                       tilt_mrad=(0.0, 0.0), band_limit_fraction: float = 2.0 / 3.0,
                       dtype=None):
    """K_Δz(k) = exp(−iπλΔz|k|² − 2πiΔz(k·θ)) · B(k), complex64 (or `dtype`), FFT order.

    tilt_mrad (y, x) tilts the beam relative to the slices (a shift of θΔz per slice).
    """
    ky, kx = fft_frequencies(shape, pixel_size_A, xp)
    phase = -math.pi * wavelength_A * distance_A * (kx ** 2 + ky ** 2)
    phase = phase - 2.0 * math.pi * distance_A * (ky * tilt_mrad[0] + kx * tilt_mrad[1]) * 1e-3
    kernel = xp.exp(1j * phase) * band_limit(shape, xp, band_limit_fraction)
    return kernel.astype(xp.complex64 if dtype is None else dtype)


def transmission(projected_potential_VA, acc_voltage_kV: float, xp):
    """Phase grating t = exp(iσ v_z) of projected potential(s) in V Å, complex64."""
    sigma = optics.interaction_constant(acc_voltage_kV)
    return xp.exp(1j * sigma * xp.asarray(projected_potential_VA, dtype=xp.float64)).astype(
        xp.complex64)
