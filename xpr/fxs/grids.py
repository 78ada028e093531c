"""Sampling grids of the fxs workflow (xFrame's conventions).

Units: lengths in Å, momentum transfer q in Å⁻¹ *with* the 2π (q = 4π sin(θ_s)/λ, θ_s half the
scattering angle), angles in radians.

Radial grids
    Reciprocal space uses the midpoint grid  q_k = (k + ½)·max_q/N,  k = 0 … N−1.
    Real space uses the midpoint grid        r_j = (j + ½)·max_r/N,  with the reciprocity relation
    max_q · max_r = x · N  (x = ``reciprocity_coefficient``, default π, the relation of a Cartesian
    FFT grid; xFrame's ``fourier_transform.reciprocity_coefficient``).

Angular grids (built from the largest harmonic order L = max_order)
    2-D: polar angle φ_j = 2π j / n_phi, n_phi = 2(L+1), so a Fourier series in φ with orders
         |n| ≤ L is sampled without aliasing.
    3-D: Gauss–Legendre rings θ_i (n_theta = L+1 rings, ordered from the north pole θ≈0 to the
         south pole θ≈π) × φ_j = 2π j / n_phi, n_phi = 2(L+1). This is the grid ducc0's "GL"
         geometry uses, on which the spherical-harmonic analysis of a band-limited function is
         exact.

Ewald sphere
    A detector pixel measuring momentum transfer of magnitude q sees the reciprocal-space point
    whose polar angle (from the +z axis; the beam travels along −z) is θ(q) = arccos(qλ/4π).
    In the flat-Ewald limit (λ → 0) θ(q) = π/2 for all q.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def reciprocal_radial_points(max_q: float, n_radial_points: int) -> np.ndarray:
    """Midpoint radial grid q_k = (k+½)·max_q/N in Å⁻¹ (with 2π)."""
    return (np.arange(n_radial_points) + 0.5) * (max_q / n_radial_points)


def real_max_r(max_q: float, n_radial_points: int, reciprocity_coefficient: float = np.pi) -> float:
    """Real-space radial extent max_r from max_q·max_r = x·N."""
    return reciprocity_coefficient * n_radial_points / max_q


def real_radial_points(max_q: float, n_radial_points: int,
                       reciprocity_coefficient: float = np.pi) -> np.ndarray:
    """Midpoint radial grid r_j = (j+½)·max_r/N in Å, max_r from the reciprocity relation."""
    max_r = real_max_r(max_q, n_radial_points, reciprocity_coefficient)
    return (np.arange(n_radial_points) + 0.5) * (max_r / n_radial_points)


def n_phi_for_order(max_order: int) -> int:
    """Number of azimuthal samples, 2(L+1): resolves Fourier/SH orders |m| ≤ L."""
    return 2 * (max_order + 1)


def polar_angles(max_order: int) -> np.ndarray:
    """Azimuths φ_j = 2πj/n_phi of the polar grid (and of cross-correlation Δ's)."""
    n_phi = n_phi_for_order(max_order)
    return 2 * np.pi * np.arange(n_phi) / n_phi


def gauss_legendre_thetas(max_order: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Legendre polar angles θ_i (north → south) and their weights in cos θ (sum 2)."""
    x, w = np.polynomial.legendre.leggauss(max_order + 1)
    order = np.argsort(x)[::-1]          # cos θ descending = θ ascending
    return np.arccos(x[order]), w[order]


def ewald_theta(q, xray_wavelength: float | None):
    """Polar angle θ(q) = arccos(qλ/4π) of the Ewald-sphere point with momentum transfer q.

    ``xray_wavelength`` None or 0 gives the flat-Ewald limit θ = π/2.
    """
    q = np.asarray(q, dtype=float)
    if not xray_wavelength:
        return np.full(q.shape, np.pi / 2)
    return np.arccos(q * xray_wavelength / (4 * np.pi))


@dataclass(frozen=True)
class _RadialGridPair:
    """The radial half of a real/reciprocal grid pair: q_k = (k+½)·max_q/N and its real partner."""
    max_q: float
    n_radial_points: int
    max_order: int
    reciprocity_coefficient: float = np.pi

    @property
    def q(self):
        return reciprocal_radial_points(self.max_q, self.n_radial_points)

    @property
    def r(self):
        return real_radial_points(self.max_q, self.n_radial_points, self.reciprocity_coefficient)


@dataclass(frozen=True)
class PolarGrid(_RadialGridPair):
    """2-D grid pair: real (r, φ) and reciprocal (q, φ); arrays shaped (N, n_phi)."""

    @property
    def phi(self):
        return polar_angles(self.max_order)

    @property
    def shape(self):
        return (self.n_radial_points, n_phi_for_order(self.max_order))

    def real_cartesian(self) -> np.ndarray:
        """(N, n_phi, 2) Cartesian points (x, y) of the real-space grid, Å."""
        return polar_to_cartesian(self.r, self.phi)

    def reciprocal_cartesian(self) -> np.ndarray:
        """(N, n_phi, 2) Cartesian points of the reciprocal grid, Å⁻¹."""
        return polar_to_cartesian(self.q, self.phi)


@dataclass(frozen=True)
class SphericalGrid(_RadialGridPair):
    """3-D grid pair: real (r, θ, φ) and reciprocal (q, θ, φ); arrays shaped (N, L+1, 2(L+1)).

    θ are Gauss–Legendre nodes (ducc0 "GL" geometry), φ_j = 2πj/n_phi.
    """

    @property
    def theta(self):
        return gauss_legendre_thetas(self.max_order)[0]

    @property
    def phi(self):
        return polar_angles(self.max_order)

    @property
    def shape(self):
        return (self.n_radial_points, self.max_order + 1, n_phi_for_order(self.max_order))

    def solid_angle_weights(self) -> np.ndarray:
        """(L+1, n_phi) quadrature weights on the unit sphere (sum 4π)."""
        w = gauss_legendre_thetas(self.max_order)[1]
        n_phi = n_phi_for_order(self.max_order)
        return np.repeat(w[:, None] * (2 * np.pi / n_phi), n_phi, axis=1)

    def real_cartesian(self) -> np.ndarray:
        """(N, L+1, n_phi, 3) Cartesian points of the real-space grid, Å."""
        return spherical_to_cartesian(self.r, self.theta, self.phi)

    def reciprocal_cartesian(self) -> np.ndarray:
        """(N, L+1, n_phi, 3) Cartesian points of the reciprocal grid, Å⁻¹."""
        return spherical_to_cartesian(self.q, self.theta, self.phi)


def make_grid(dimensions: int, max_q: float, n_radial_points: int, max_order: int,
              reciprocity_coefficient: float = np.pi):
    """PolarGrid (2-D) or SphericalGrid (3-D)."""
    cls = PolarGrid if dimensions == 2 else SphericalGrid
    return cls(float(max_q), int(n_radial_points), int(max_order), float(reciprocity_coefficient))


def polar_to_cartesian(r, phi) -> np.ndarray:
    r = np.asarray(r, float)[:, None]
    phi = np.asarray(phi, float)[None, :]
    return np.stack(np.broadcast_arrays(r * np.cos(phi), r * np.sin(phi)), axis=-1)


def spherical_to_cartesian(r, theta, phi) -> np.ndarray:
    r = np.asarray(r, float)[:, None, None]
    st = np.sin(np.asarray(theta, float))[None, :, None]
    ct = np.cos(np.asarray(theta, float))[None, :, None]
    cp = np.cos(np.asarray(phi, float))[None, None, :]
    sp = np.sin(np.asarray(phi, float))[None, None, :]
    return np.stack(np.broadcast_arrays(r * st * cp, r * st * sp, r * ct), axis=-1)


def spherical_point(center) -> np.ndarray:
    """Cartesian point of a centre given as (r, θ, φ) [3-D] or (r, φ) [2-D], as in xFrame."""
    c = [float(v) for v in center]
    if len(c) == 2:
        return np.array([c[0] * np.cos(c[1]), c[0] * np.sin(c[1])])
    r, t, p = c
    return np.array([r * np.sin(t) * np.cos(p), r * np.sin(t) * np.sin(p), r * np.cos(t)])
