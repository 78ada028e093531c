"""Electron optics: relativistic wavelength, interaction constant, aberrations, probes.

Conventions (stated once, used everywhere in xpr.em):
  * lengths in Å, reciprocal lengths in Å⁻¹ (no 2π: k = 1/d), angles in mrad where named so;
  * aberrations in Krivanek notation, list [C10, C12a, C12b, C21a, C21b, C23a, C23b, C30, ...] in Å;
    C10 is −defocus (positive defocus = underfocus in PyPty's convention).
"""
from __future__ import annotations

import math

import numpy as np

# CODATA 2018
PLANCK_H = 6.62607015e-34          # J s
ELECTRON_MASS = 9.1093837015e-31   # kg
ELEMENTARY_CHARGE = 1.602176634e-19  # C
SPEED_OF_LIGHT = 299792458.0       # m/s


def electron_wavelength_A(acc_voltage_kV: float) -> float:
    """Relativistic de Broglie wavelength λ = h / sqrt(2 m e V (1 + e V / 2 m c²)), in Å."""
    volts = acc_voltage_kV * 1e3
    energy = ELEMENTARY_CHARGE * volts
    momentum = math.sqrt(2.0 * ELECTRON_MASS * energy
                         * (1.0 + energy / (2.0 * ELECTRON_MASS * SPEED_OF_LIGHT ** 2)))
    return PLANCK_H / momentum * 1e10


def interaction_constant(acc_voltage_kV: float) -> float:
    """σ = 2π m e λ / h² (relativistic mass), in rad / (V Å): phase = σ · projected potential."""
    volts = acc_voltage_kV * 1e3
    wavelength_m = electron_wavelength_A(acc_voltage_kV) * 1e-10
    relativistic_mass = ELECTRON_MASS + ELEMENTARY_CHARGE * volts / SPEED_OF_LIGHT ** 2
    sigma_per_V_m = 2.0 * math.pi * relativistic_mass * ELEMENTARY_CHARGE * wavelength_m / PLANCK_H ** 2
    return sigma_per_V_m * 1e-10


# ---------------------------------------------------------------------------------------------
# Aberrations
#
# The aberration function of a round lens with the Krivanek coefficients C_nm (a: cosine, b: sine
# component), α = λ|k| the scattering angle and φ the azimuth of k:
#
#     χ(k) = (2π/λ) Σ_{n,m} α^(n+1)/(n+1) · (C_nm,a cos mφ + C_nm,b sin mφ)
#
# The list runs over n = 1, 2, 3, … and, within n, over m = (n+1) mod 2, …, n+1 in steps of two;
# m = 0 has one coefficient, m > 0 two (a, b):
#     C10, C12a, C12b, C21a, C21b, C23a, C23b, C30, C32a, C32b, C34a, C34b, C41a, …
# The probe in the aperture plane is A(k)·exp(−iχ(k)); C10 > 0 propagates the focused probe by
# C10 Å downstream (Fresnel kernel exp(−iπλzk²)), i.e. defocus = −C10 > 0 puts the crossover
# below the entrance surface (underfocus).
# ---------------------------------------------------------------------------------------------

def krivanek_terms(count: int) -> list[tuple[int, int, str]]:
    """(n, m, component) of the first `count` entries of the Krivanek list; component 'a'/'b'."""
    terms: list[tuple[int, int, str]] = []
    order = 1
    while len(terms) < count:
        for m in range((order + 1) % 2, order + 2, 2):
            terms.extend([(order, 0, "a")] if m == 0 else [(order, m, "a"), (order, m, "b")])
        order += 1
    return terms[:count]


def krivanek_name(n: int, m: int, component: str) -> str:
    return f"C{n}{m}" if m == 0 else f"C{n}{m}{component}"


def krivanek_index(name: str) -> int:
    """Position of a coefficient's name (C10, C12a, C30, …) in the Krivanek list; ValueError if
    it is not one (a name of order ≤ 6)."""
    for index, term in enumerate(krivanek_terms(48)):
        if krivanek_name(*term) == name:
            return index
    raise ValueError(f"{name!r} is not a Krivanek coefficient (C10, C12a, C12b, C21a, C21b, "
                     f"C23a, C23b, C30, …)")


def aberration_phase(kx, ky, wavelength_A: float, aberrations, xp=None):
    """χ(k) in radians for spatial frequencies kx, ky (Å⁻¹, no 2π) and a Krivanek list (Å).

    `aberrations` may have any length (an empty list gives χ = 0). kx, ky broadcast together.
    """
    xp = np if xp is None else xp
    kx = xp.asarray(kx, dtype=xp.float64)
    ky = xp.asarray(ky, dtype=xp.float64)
    alpha = wavelength_A * xp.sqrt(kx ** 2 + ky ** 2)
    azimuth = xp.arctan2(ky, kx)
    chi = xp.zeros(xp.broadcast_shapes(kx.shape, ky.shape), dtype=xp.float64)
    for coefficient, (n, m, component) in zip(aberrations, krivanek_terms(len(aberrations))):
        if coefficient == 0:
            continue
        angular = xp.cos(m * azimuth) if component == "a" else xp.sin(m * azimuth)
        chi = chi + float(coefficient) * alpha ** (n + 1) / (n + 1) * angular
    return 2.0 * math.pi / wavelength_A * chi


def with_defocus(aberrations, defocus_A: float) -> list[float]:
    """The Krivanek list with an extra defocus folded in: C10 → C10 − defocus."""
    folded = [float(c) for c in aberrations] or [0.0]
    folded[0] -= float(defocus_A)
    return folded


# ---------------------------------------------------------------------------------------------
# Grids and the aperture probe
# ---------------------------------------------------------------------------------------------

def centred_frequencies(shape, rez_pixel_size_invA: float, xp=None):
    """(ky, kx) meshes in Å⁻¹ of a centred grid: k = (index − n//2) · Δk."""
    xp = np if xp is None else xp
    ny, nx = shape
    ky = (xp.arange(ny) - ny // 2) * rez_pixel_size_invA
    kx = (xp.arange(nx) - nx // 2) * rez_pixel_size_invA
    return xp.meshgrid(ky, kx, indexing="ij")


def real_space_pixel_size_A(shape, rez_pixel_size_invA: float) -> float:
    """Pixel of the real-space grid conjugate to a square detector grid: 1 / (n Δk), in Å."""
    return 1.0 / (shape[-1] * rez_pixel_size_invA)


def aperture(shape, rez_pixel_size_invA: float, wavelength_A: float, conv_semiangle_mrad: float,
             xp=None):
    """Circular condenser aperture on the centred grid, with a one-pixel linear edge (no aliasing)."""
    xp = np if xp is None else xp
    ky, kx = centred_frequencies(shape, rez_pixel_size_invA, xp)
    k_cut = conv_semiangle_mrad * 1e-3 / wavelength_A
    k = xp.sqrt(kx ** 2 + ky ** 2)
    return xp.clip((k_cut - k) / rez_pixel_size_invA + 0.5, 0.0, 1.0)


def probe_fourier(shape, rez_pixel_size_invA: float, wavelength_A: float,
                  conv_semiangle_mrad: float, aberrations=(), xp=None):
    """Probe in the aperture plane, A(k)·exp(−iχ(k)), centred, Σ|P|² = 1, complex64."""
    xp = np if xp is None else xp
    ky, kx = centred_frequencies(shape, rez_pixel_size_invA, xp)
    chi = aberration_phase(kx, ky, wavelength_A, list(aberrations), xp)
    probe = aperture(shape, rez_pixel_size_invA, wavelength_A, conv_semiangle_mrad, xp) \
        * xp.exp(-1j * chi)
    probe = probe / xp.sqrt(xp.sum(xp.abs(probe) ** 2))
    return probe.astype(xp.complex64)


def fourier_to_real(probe_k, backend=None):
    """Centred Fourier array → centred real-space array with Σ|p|² = Σ|P|² (unitary transform)."""
    backend = _backend(backend)
    ny, nx = probe_k.shape[-2:]
    p = backend.fftshift(backend.ifftn(backend.ifftshift(probe_k, axes=(-2, -1)), axes=(-2, -1)),
                         axes=(-2, -1))
    return (p * math.sqrt(ny * nx)).astype(probe_k.dtype)


def real_to_fourier(probe_r, backend=None):
    """Inverse of fourier_to_real."""
    backend = _backend(backend)
    ny, nx = probe_r.shape[-2:]
    p = backend.fftshift(backend.fftn(backend.ifftshift(probe_r, axes=(-2, -1)), axes=(-2, -1)),
                         axes=(-2, -1))
    return (p / math.sqrt(ny * nx)).astype(probe_r.dtype)


def probe_real(shape, rez_pixel_size_invA: float, wavelength_A: float, conv_semiangle_mrad: float,
               aberrations=(), backend=None):
    """Probe in the specimen plane, centred on pixel (ny//2, nx//2), Σ|p|² = 1, complex64.

    Real-space pixel size is real_space_pixel_size_A(shape, rez_pixel_size_invA).
    """
    backend = _backend(backend)
    probe_k = probe_fourier(shape, rez_pixel_size_invA, wavelength_A, conv_semiangle_mrad,
                            aberrations, backend.xp)
    return fourier_to_real(probe_k, backend)


def _backend(backend):
    if backend is not None:
        return backend
    from xpr import backend as backends      # the CPU backend when a caller passes none

    return backends.cpu()


# ---------------------------------------------------------------------------------------------
# Partial coherence: probe modes (mixed state ρ = Σ_m |p_m⟩⟨p_m|, total intensity Σ_m ‖p_m‖² = 1)
# ---------------------------------------------------------------------------------------------

def defocus_spread_modes(shape, rez_pixel_size_invA: float, wavelength_A: float,
                         conv_semiangle_mrad: float, aberrations, focal_spread_A: float,
                         n_modes: int, backend=None):
    """Temporal incoherence: a Gaussian focal spread (rms focal_spread_A) sampled at Gauss–Hermite
    nodes. Mode i is the probe at C10 + √2 σ x_i with intensity weight w_i/√π; returns (M, ny, nx)
    in real space, Σ_m ‖p_m‖² = 1.
    """
    backend = _backend(backend)
    xp = backend.xp
    nodes, weights = np.polynomial.hermite.hermgauss(n_modes)
    weights = weights / weights.sum()
    modes = []
    for node, weight in zip(nodes, weights):
        shifted = list(aberrations) or [0.0]
        shifted = [float(c) for c in shifted]
        shifted[0] += math.sqrt(2.0) * focal_spread_A * node
        p = probe_real(shape, rez_pixel_size_invA, wavelength_A, conv_semiangle_mrad, shifted,
                       backend)
        modes.append(p * math.sqrt(weight))
    return xp.stack(modes).astype(xp.complex64)


def hermite_modes(main_probe, n_modes: int, higher_mode_power: float = 0.1, xp=None):
    """Modes for unknown partial coherence: the main probe times Hermite polynomials H_a(x)H_b(y)
    of its own rms width (a + b = 1, 2, …), orthonormalised (QR); mode 0 keeps
    1 − higher_mode_power of the intensity, the others share the rest equally. (M, ny, nx).
    """
    xp = np if xp is None else xp
    ny, nx = main_probe.shape
    if n_modes == 1:
        return main_probe[None].astype(xp.complex64)
    intensity = xp.abs(main_probe) ** 2
    total = float(intensity.sum())
    y = xp.arange(ny, dtype=xp.float64)[:, None]
    x = xp.arange(nx, dtype=xp.float64)[None, :]
    cy = float((intensity * y).sum() / total)
    cx = float((intensity * x).sum() / total)
    sy = math.sqrt(float((intensity * (y - cy) ** 2).sum() / total))
    sx = math.sqrt(float((intensity * (x - cx) ** 2).sum() / total))
    orders = [(a, s - a) for s in range(0, n_modes + 1) for a in range(s, -1, -1)][:n_modes]
    basis = []
    for a, b in orders:
        hy = np.polynomial.hermite.Hermite.basis(b)((y - cy) / sy) if b else 1.0
        hx = np.polynomial.hermite.Hermite.basis(a)((x - cx) / sx) if a else 1.0
        basis.append((main_probe * (hx * hy)).ravel())
    q, _ = xp.linalg.qr(xp.stack(basis, axis=1))
    q = q * (xp.vdot(q[:, 0], main_probe.ravel()) / abs(xp.vdot(q[:, 0], main_probe.ravel())))
    powers = [1.0 - higher_mode_power] + [higher_mode_power / (n_modes - 1)] * (n_modes - 1)
    scale = math.sqrt(total)
    modes = [q[:, i].reshape(ny, nx) * math.sqrt(p) * scale for i, p in enumerate(powers)]
    return xp.stack(modes).astype(xp.complex64)
