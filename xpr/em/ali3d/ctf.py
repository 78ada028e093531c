"""Contrast transfer function of the electron microscope (RELION's model) and its corrections.

    CTF(k) = sin(χ(k)),   χ = π λ Δf(α) k² − (π/2) C_s λ³ k⁴ + w + φ,
    Δf(α) = (Δf_U + Δf_V)/2 + (Δf_U − Δf_V)/2 · cos 2(α − α_ast),   w = arctan(Q / √(1 − Q²)),

with k in Å⁻¹, α the azimuth of k, Δf > 0 underfocus (Å), C_s in Å (given in mm), Q the amplitude
contrast and φ an extra phase shift (phase plate).  CTF(0) = Q; for underfocus the low frequencies
transfer with positive sign.  Two corrections use it:

* phase flipping: the image's Fourier transform is multiplied by sign(CTF), the projection of the
  reference by |CTF|; the reconstruction weights every sample by |CTF| (Wiener weights on |CTF|);
* Wiener weighting: the projection is multiplied by CTF; the reconstruction is
  V̂ = Σ c·CTF·Î / Σ c·(CTF² + 1/snr), c the gridding kernel weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xpr.em.optics import electron_wavelength_A

CTF_COLUMNS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage",
               "rlnSphericalAberration", "rlnAmplitudeContrast")


@dataclass(frozen=True)
class CTFParameters:
    """Per-image optics: arrays of length n_images (defocus in Å, angle in degrees, kV, mm)."""
    defocus_u: np.ndarray
    defocus_v: np.ndarray
    defocus_angle: np.ndarray
    voltage: np.ndarray
    cs_mm: np.ndarray
    amplitude_contrast: np.ndarray
    phase_shift: np.ndarray

    def take(self, index):
        return CTFParameters(*(np.asarray(getattr(self, f))[index] for f in self.__dataclass_fields__))

    def __len__(self):
        return len(self.defocus_u)


def ctf_values(params: CTFParameters, index: int, kx, ky, pixel_size_A: float, box: int):
    """CTF of image `index` at integer frequencies (kx, ky) of a box of `box` pixels."""
    sx = np.asarray(kx, dtype=float) / (box * pixel_size_A)
    sy = np.asarray(ky, dtype=float) / (box * pixel_size_A)
    s2 = sx * sx + sy * sy
    wavelength = electron_wavelength_A(float(params.voltage[index]))
    cs = float(params.cs_mm[index]) * 1e7
    azimuth = np.arctan2(sy, sx)
    du, dv = float(params.defocus_u[index]), float(params.defocus_v[index])
    astigmatism_angle = np.deg2rad(float(params.defocus_angle[index]))
    defocus = 0.5 * (du + dv) + 0.5 * (du - dv) * np.cos(2.0 * (azimuth - astigmatism_angle))
    q = float(params.amplitude_contrast[index])
    w = np.arctan(q / np.sqrt(max(1.0 - q * q, 1e-12)))
    chi = (np.pi * wavelength * defocus * s2 - 0.5 * np.pi * cs * wavelength ** 3 * s2 * s2
           + w + np.deg2rad(float(params.phase_shift[index])))
    return np.sin(chi)


def projection_weight(ctf, mode: str):
    """What multiplies the reference projection before it is compared with a (corrected) image."""
    if mode == "phase_flip":
        return np.abs(ctf)
    if mode == "wiener":
        return ctf
    return np.ones_like(ctf)


def image_correction(ctf, mode: str):
    """What multiplies the image's Fourier transform when it is read (phase flipping only)."""
    if mode == "phase_flip":
        return np.where(ctf < 0, -1.0, 1.0)
    return np.ones_like(ctf)
