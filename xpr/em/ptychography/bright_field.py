"""Bright-field image helpers shared by tcBF (xpr.em.ptychography.tcbf), the PL-rotation fit
from the parallax (xpr.em.ptychography.rotation) and WDD: the probe spectrum at arbitrary k,
sub-pixel image shifts and their measurement, shift-and-sum, the weak-phase transfer function of
the shift-corrected bright-field sum and its Wiener inverse. Low level: imports no other module of
this package (calibration uses the rotation fit, and tcbf uses calibration).
See tcbf's module docstring for the method.
"""
from __future__ import annotations

import math

import numpy as np

from xpr import backend as backends
from xpr.em import optics


def probe_spectrum_at(ky, kx, wavelength_A, aperture_radius_invA, edge_width_invA, aberrations,
                      xp=np):
    """P̃(k) = A(k) e^{−iχ(k)} at arbitrary (ky, kx) in Å⁻¹, with xpr.em.optics' soft aperture edge
    (linear over one detector pixel, `edge_width_invA`); not normalised."""
    k = xp.sqrt(ky ** 2 + kx ** 2)
    amplitude = xp.clip((aperture_radius_invA - k) / edge_width_invA + 0.5, 0.0, 1.0)
    chi = optics.aberration_phase(kx, ky, wavelength_A, list(aberrations), xp)
    return amplitude * xp.exp(-1j * chi)


def taper(shape, fraction=0.2):
    """Separable Tukey window: flat centre, cosine edges over `fraction` of each side."""
    def one(n):
        w = np.ones(n)
        edge = max(int(fraction * n), 1)
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(edge) + 0.5) / edge)
        w[:edge] = ramp
        w[n - edge:] = ramp[::-1]
        return w
    return one(shape[0])[:, None] * one(shape[1])[None, :]


def fourier_shift(images, shifts_px, backend):
    """images(r) → images(r − s) for each image, s (n, 2) [y, x] in pixels, periodic."""
    xp = backend.xp
    ny, nx = images.shape[-2:]
    q_y = xp.asarray(backend.fftfreq(ny))[None, :, None]
    q_x = xp.asarray(backend.fftfreq(nx))[None, None, :]
    ramp = xp.exp(-2j * math.pi * (q_y * shifts_px[:, 0, None, None] + q_x * shifts_px[:, 1, None, None]))
    return backend.ifftn(backend.fftn(images, axes=(-2, -1)) * ramp, axes=(-2, -1)).real


def _parabolic_offset(minus, centre, plus):
    denominator = np.asarray(minus - 2.0 * centre + plus)
    flat = np.abs(denominator) <= 1e-30       # a flat (or empty) correlation peak: no offset
    return np.divide(0.5 * (minus - plus), denominator, out=np.zeros_like(denominator), where=~flat)


def measure_shifts(images, reference, window, backend, predicted_px=None, search_radius_px=None):
    """Shift s (n, 2) [y, x] px of each image against the reference: image(r) ≈ reference(r − s).

    The cross-correlation peak is searched within `search_radius_px` of the predicted shifts
    (everywhere when None) — on a crystal the correlation repeats with the lattice, and only the
    peak near the model's prediction is the right one. Sub-pixel by a parabola through the peak.
    """
    xp = backend.xp
    ny, nx = reference.shape
    ref_spectrum = xp.conj(backend.fftn(reference * window))
    correlation = backend.ifftn(backend.fftn(images * window, axes=(-2, -1)) * ref_spectrum,
                                axes=(-2, -1)).real
    correlation = backend.asnumpy(correlation)
    searched = correlation
    if predicted_px is not None and search_radius_px is not None:
        lag_y = (np.arange(ny) + ny // 2) % ny - ny // 2
        lag_x = (np.arange(nx) + nx // 2) % nx - nx // 2
        dy = lag_y[None, :, None] - predicted_px[:, 0, None, None]
        dx = lag_x[None, None, :] - predicted_px[:, 1, None, None]
        searched = np.where(dy ** 2 + dx ** 2 <= search_radius_px ** 2, correlation, -np.inf)
    flat_peak = searched.reshape(len(correlation), -1).argmax(axis=1)
    py, px = np.unravel_index(flat_peak, (ny, nx))
    rows = np.arange(len(correlation))
    c0 = correlation[rows, py, px]
    dy = _parabolic_offset(correlation[rows, (py - 1) % ny, px], c0, correlation[rows, (py + 1) % ny, px])
    dx = _parabolic_offset(correlation[rows, py, (px - 1) % nx], c0, correlation[rows, py, (px + 1) % nx])
    sy = (py + ny // 2) % ny - ny // 2 + np.clip(dy, -0.5, 0.5)
    sx = (px + nx // 2) % nx - nx // 2 + np.clip(dx, -0.5, 0.5)
    return np.stack([sy, sx], axis=1)


def rotate_yx(vectors, angle_deg):
    """R(angle) applied to (n, 2) [y, x] vectors (R(θ) = [[cos, −sin], [sin, cos]] on (x, y))."""
    theta = math.radians(angle_deg)
    y, x = vectors[:, 0], vectors[:, 1]
    return np.stack([math.sin(theta) * x + math.cos(theta) * y,
                     math.cos(theta) * x - math.sin(theta) * y], axis=1)


def shift_and_sum(images, shifts_px, upsample):
    """Upsampled tcBF image: sample I_k(r_p) placed at r_p − s_k on a grid `upsample` × finer."""
    n_bf, ny, nx = images.shape
    my, mx = ny * upsample, nx * upsample
    grid_y, grid_x = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    y = ((grid_y[None] - shifts_px[:, 0, None, None]) * upsample).ravel()
    x = ((grid_x[None] - shifts_px[:, 1, None, None]) * upsample).ravel()
    values = images.ravel()
    y0, x0 = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    fy, fx = y - y0, x - x0
    total = np.zeros(my * mx)
    weight = np.zeros(my * mx)
    for oy, wy in ((0, 1.0 - fy), (1, fy)):
        for ox, wx in ((0, 1.0 - fx), (1, fx)):
            yy, xx = y0 + oy, x0 + ox
            inside = (yy >= 0) & (yy < my) & (xx >= 0) & (xx < mx)
            index = yy[inside] * mx + xx[inside]
            w = (wy * wx)[inside]
            total += np.bincount(index, w * values[inside], minlength=my * mx)
            weight += np.bincount(index, w, minlength=my * mx)
    image = np.where(weight > 1e-3 * weight.max(), total / np.maximum(weight, 1e-30), 0.0)
    return image.reshape(my, mx), weight.reshape(my, mx)


# values (bright-field pixel × grid pixel) of the transfer function's terms summed at once
VALUES_PER_CHUNK = 4_000_000


def transfer_function(shape, pixel_A, k_yx, detector_shifts_A, experiment, aberrations, angle_deg,
                      values_per_chunk=VALUES_PER_CHUNK):
    """T(q) of the shift-corrected BF sum on a grid (scan frame, pixel_A), weak phase object."""
    my, mx = shape
    chunk = max(1, values_per_chunk // (my * mx))
    q_y, q_x = np.meshgrid(np.fft.fftfreq(my, pixel_A), np.fft.fftfreq(mx, pixel_A), indexing="ij")
    q_det = rotate_yx(np.stack([q_y.ravel(), q_x.ravel()], axis=1), angle_deg)
    qy, qx = q_det[:, 0][None], q_det[:, 1][None]
    args = dict(wavelength_A=experiment.wavelength_A,
                aperture_radius_invA=experiment.aperture_radius_invA,
                edge_width_invA=experiment.rez_pixel_size_invA, aberrations=aberrations)
    total = np.zeros(my * mx, dtype=np.complex128)
    for start in range(0, len(k_yx), chunk):
        ky = k_yx[start:start + chunk, 0][:, None]
        kx = k_yx[start:start + chunk, 1][:, None]
        d = detector_shifts_A[start:start + chunk]
        p_k = probe_spectrum_at(ky, kx, **args)
        term = 1j * (np.conj(p_k) * probe_spectrum_at(ky - qy, kx - qx, **args)
                     - p_k * np.conj(probe_spectrum_at(ky + qy, kx + qx, **args)))
        term *= np.exp(2j * math.pi * (qy * d[:, 0, None] + qx * d[:, 1, None]))
        total += (term / np.maximum(np.abs(p_k) ** 2, 1e-12)).sum(axis=0)
    return (total / len(k_yx)).reshape(my, mx)


def wiener_phase(image, transfer, epsilon):
    """φ = F⁻¹[F[f] T* / (|T|² + ε max|T|²)] — the phase from the tcBF image (host arrays)."""
    fft = backends.cpu()
    power = np.abs(transfer) ** 2
    spectrum = fft.fftn(image - image.mean()) * np.conj(transfer) / (power + epsilon * power.max())
    return fft.ifftn(spectrum).real
