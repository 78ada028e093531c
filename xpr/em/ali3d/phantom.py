"""A test particle made of Gaussian blobs, its exact projections, and a simulated data set.

A blob of amplitude a and width σ at p (x, y, z from the box centre) is a exp(−|r − p|²/2σ²); its
projection in orientation A (euler.py) is a √(2π) σ exp(−|x − (A p)_xy|²/2σ²), exactly — so the
projector and the reconstruction can be checked against analytic values.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xpr.em.ali3d import ctf as ctf_model
from xpr.em.ali3d import euler
from xpr.em.ali3d.gridding import irfft2, rfft2


@dataclass(frozen=True)
class Blobs:
    positions: np.ndarray    # (m, 3) x, y, z in pixels from the box centre
    sigmas: np.ndarray       # (m,) pixels
    amplitudes: np.ndarray   # (m,)


def random_blobs(rng, n_blobs: int, box: int, group=None) -> Blobs:
    """n_blobs blobs inside a ball of radius box/4, widths box/24 … box/12; copied by the group."""
    directions = rng.standard_normal((n_blobs, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    positions = directions * (box / 4.0) * rng.uniform(0.2, 1.0, (n_blobs, 1)) ** (1 / 3)
    sigmas = rng.uniform(box / 24.0, box / 12.0, n_blobs)
    amplitudes = rng.uniform(0.5, 1.5, n_blobs)
    if group is not None and len(group) > 1:
        positions = np.concatenate([positions @ g.T for g in group])
        sigmas = np.tile(sigmas, len(group))
        amplitudes = np.tile(amplitudes, len(group))
    return Blobs(positions, sigmas, amplitudes)


def render_volume(blobs: Blobs, box: int):
    """The blobs sampled on an n³ grid [z, y, x], float32."""
    axis = np.arange(box) - box // 2
    volume = np.zeros((box,) * 3)
    for (px, py, pz), sigma, amp in zip(blobs.positions, blobs.sigmas, blobs.amplitudes):
        gx = np.exp(-(axis - px) ** 2 / (2 * sigma ** 2))
        gy = np.exp(-(axis - py) ** 2 / (2 * sigma ** 2))
        gz = np.exp(-(axis - pz) ** 2 / (2 * sigma ** 2))
        volume += amp * gz[:, None, None] * gy[None, :, None] * gx[None, None, :]
    return volume.astype(np.float32)


def analytic_projection(blobs: Blobs, matrix, box: int, shift_px=(0.0, 0.0)):
    """Exact projection in orientation `matrix`, translated by the origin offset shift_px: I(x) = P(x − o)."""
    axis = np.arange(box) - box // 2
    centres = blobs.positions @ np.asarray(matrix).T  # A p
    image = np.zeros((box, box))
    for (cx, cy, _), sigma, amp in zip(centres, blobs.sigmas, blobs.amplitudes):
        gx = np.exp(-(axis - cx - shift_px[0]) ** 2 / (2 * sigma ** 2))
        gy = np.exp(-(axis - cy - shift_px[1]) ** 2 / (2 * sigma ** 2))
        image += amp * np.sqrt(2 * np.pi) * sigma * gy[:, None] * gx[None, :]
    return image.astype(np.float32)


@dataclass
class SimulatedData:
    images: np.ndarray          # (n, box, box) float32
    true_angles: np.ndarray     # (n, 3) rot, tilt, psi degrees
    true_shifts: np.ndarray     # (n, 2) origin offsets in pixels
    start_angles: np.ndarray    # perturbed
    start_shifts: np.ndarray
    volume: np.ndarray          # the phantom on the grid
    ctf: object                 # ctf.CTFParameters or None


def simulate(rng, n_images: int, box: int, n_blobs: int = 10, snr: float = 1.0,
             angle_error_deg: float = 3.0, shift_error_px: float = 1.5, shift_range_px: float = 2.0,
             group=None, defocus_range_A=None, pixel_size_A: float = 1.0, backend=None) -> SimulatedData:
    """Noisy projections of a blob phantom at uniformly random orientations, with perturbed parameters.

    snr is the ratio of the projections' variance to the variance of the white Gaussian noise; the
    start parameters are the true ones plus Gaussian errors of angle_error_deg per Euler angle and
    shift_error_px per shift component.  defocus_range_A = [low, high] multiplies each projection by
    a CTF (300 kV, C_s 2.7 mm, Q 0.1, astigmatism 5 %) with a random defocus in that range
    (backend: the xpr.backend.Backend whose FFTs apply it)."""
    blobs = random_blobs(rng, n_blobs, box, group)
    matrices = euler.random_rotations(rng, n_images)
    true_angles = np.stack(euler.euler_angles(matrices), axis=1)
    true_shifts = rng.uniform(-shift_range_px, shift_range_px, (n_images, 2))
    clean = np.stack([analytic_projection(blobs, m, box, s) for m, s in zip(matrices, true_shifts)])
    ctf = None
    if defocus_range_A is not None:
        defocus = rng.uniform(defocus_range_A[0], defocus_range_A[1], n_images)
        ctf = ctf_model.CTFParameters(defocus * 1.05, defocus * 0.95, rng.uniform(0, 180, n_images),
                                      np.full(n_images, 300.0), np.full(n_images, 2.7),
                                      np.full(n_images, 0.1), np.zeros(n_images))
        ky = np.fft.fftfreq(box, 1.0 / box)[:, None]
        kx = np.arange(box // 2 + 1)[None, :]
        for i in range(n_images):
            modulation = ctf_model.ctf_values(ctf, i, kx, ky, pixel_size_A, box)
            clean[i] = irfft2(backend, rfft2(backend, clean[i]) * modulation, box)
    noise_sigma = np.sqrt(clean.var() / snr) if snr > 0 else 0.0
    images = (clean + noise_sigma * rng.standard_normal(clean.shape)).astype(np.float32)
    start_angles = true_angles + rng.normal(0.0, angle_error_deg, true_angles.shape)
    start_shifts = true_shifts + rng.normal(0.0, shift_error_px, true_shifts.shape)
    return SimulatedData(images, true_angles, true_shifts, start_angles, start_shifts,
                         render_volume(blobs, box), ctf)
