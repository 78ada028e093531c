"""Sampling grids of the fxs workflow (xFrame's conventions).

Units: lengths in Å, momentum transfer q in Å⁻¹ *with* the 2π (q = 4π sin(θ_s)/λ, θ_s half the
scattering angle), angles in radians.

Radial grids
    Reciprocal space uses the midpoint grid  q_k = (k + ½)·max_q/N,  k = 0 … N−1.
    Real space uses the midpoint grid        r_j = (j + ½)·max_r/N,  with the reciprocity relation
    max_q · max_r = x · N  (x = ``reciprocity_coefficient``, default π, the relation of a Cartesian
    FFT grid; xFrame's ``fourier_transform.reciprocity_coefficient``).

Angular grids (built from the largest harmonic order L = max_order). One rule, two uses:
    a field of band L is analysed exactly on n_phi >= 2L+1 azimuths and (3-D) n_theta >= L+1
    Gauss–Legendre rings; the square of such a field (an intensity |A|² of an amplitude of band L)
    has band 2L, and its harmonics up to L are free of aliasing on n_phi >= 3L+1 azimuths and
    n_theta >= (3L+1)/2 rings.
    * data side (cross-correlations, invariants, the harmonics module): the fields are
      intensities of band L: n_phi = 2(L+1) (`n_phi_for_order`), n_theta = L+1
      (`gauss_legendre_thetas`) — the grid of ducc0's "GL" geometry;
    * phasing (`PhasingGrid`, `build_grid`): amplitudes of band L whose |A|² is analysed up to L:
      n_phi = 3L+2 (`n_phi_for_products`), n_theta = (3L+3)//2, unless given.
    θ are ordered from the north pole θ≈0 to the south pole θ≈π; φ_j = 2π j / n_phi.

Phasing grid layout: real-space arrays (phi, theta, repeat, r) in 3-D and (phi, repeat, r) in
2-D (the layout the transforms of ``transforms`` want; repeats on axis -2).

Ewald sphere
    A detector pixel measuring momentum transfer of magnitude q sees the reciprocal-space point
    whose polar angle (from the +z axis; the beam travels along −z) is θ(q) = arccos(qλ/4π).
    In the flat-Ewald limit (λ → 0) θ(q) = π/2 for all q.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xpr.errors import InputError


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


def n_phi_for_products(max_order: int) -> int:
    """Azimuthal samples 3L+2 on which |A|² of an amplitude of band L has alias-free orders ≤ L."""
    return 3 * max_order + 2


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
class PhasingGrid:
    """The real/reciprocal grid pair of a reconstruction."""

    dimensions: int
    real_radii: np.ndarray          # r_k, Å
    reciprocal_radii: np.ndarray    # q_k, Å^-1 (with the 2 pi)
    max_order: int                  # L: harmonic band limit
    phis: np.ndarray                # azimuths in [0, 2 pi)
    thetas: np.ndarray | None       # polar angles (3-D), Gauss-Legendre nodes in cos(theta)
    theta_weights: np.ndarray | None  # Gauss-Legendre weights (sum 2)

    @property
    def n_radial(self) -> int:
        return len(self.real_radii)

    @property
    def dr(self) -> float:
        return float(self.real_radii[1] - self.real_radii[0]) if self.n_radial > 1 else float(2 * self.real_radii[0])

    @property
    def dq(self) -> float:
        return float(self.reciprocal_radii[1] - self.reciprocal_radii[0]) if self.n_radial > 1 else float(2 * self.reciprocal_radii[0])

    @property
    def angular_shape(self) -> tuple:
        if self.dimensions == 2:
            return (len(self.phis),)
        return (len(self.phis), len(self.thetas))

    @property
    def max_r(self) -> float:
        return self.dr * self.n_radial

    @property
    def max_q(self) -> float:
        return self.dq * self.n_radial

    def angular_weights(self) -> np.ndarray:
        """Quadrature weights of the angular grid (sum 2 pi in 2-D, 4 pi in 3-D), angular shape."""
        n_phi = len(self.phis)
        if self.dimensions == 2:
            return np.full(n_phi, 2 * np.pi / n_phi)
        return np.outer(np.full(n_phi, 2 * np.pi / n_phi), self.theta_weights)

    def volume_weights(self, space: str = "real") -> np.ndarray:
        """Quadrature weights of the full grid, shaped (*angular, 1, N) to broadcast over repeats."""
        radii, step = (self.real_radii, self.dr) if space == "real" else (self.reciprocal_radii, self.dq)
        radial = radii ** (self.dimensions - 1) * step
        angular = self.angular_weights()
        return angular[..., None, None] * radial

    def cartesian_points(self, space: str = "real") -> np.ndarray:
        """Cartesian coordinates of every grid point, shape (*angular, N, d)."""
        radii = self.real_radii if space == "real" else self.reciprocal_radii
        if self.dimensions == 2:
            phi = self.phis[:, None]
            return np.stack([radii * np.cos(phi), radii * np.sin(phi)], axis=-1)
        phi = self.phis[:, None, None]
        theta = self.thetas[None, :, None]
        return np.stack([radii * np.sin(theta) * np.cos(phi),
                         radii * np.sin(theta) * np.sin(phi),
                         radii * np.cos(theta) + 0 * phi], axis=-1)


def gaussian_blobs(grid, centres, widths, heights):
    """A density of Gaussian blobs on the real-space grid: Σ h exp(−|x − c|² / 2w²) (Å), the test
    particle of the fxs tests and benchmarks."""
    x = grid.cartesian_points("real")
    rho = np.zeros(x.shape[:-1])
    for c, w, h in zip(centres, widths, heights):
        rho += h * np.exp(-np.sum((x - np.asarray(c, float)) ** 2, -1) / (2 * w ** 2))
    return rho


def build_grid(dimensions: int, n_radial: int, max_q: float, max_order: int,
               n_theta: int = 0, n_phi: int = 0, reciprocity: float = np.pi) -> PhasingGrid:
    """Midpoint radial grids with Q R = reciprocity * N and the angular grid of band limit L."""
    if dimensions not in (2, 3):
        raise InputError(f"dimensions must be 2 or 3, got {dimensions}", key="dimensions")
    n = int(n_radial)
    q = reciprocal_radial_points(max_q, n)
    r = real_radial_points(max_q, n, reciprocity)
    L = int(max_order)
    # |A|^2 of an amplitude of band L has band 2L; its coefficients up to L are free of aliasing
    # when n_phi >= 3L + 1 and (Gauss-Legendre) n_theta >= (3L + 1)/2: the default grid
    n_phi = int(n_phi) if n_phi else n_phi_for_products(L)
    if n_phi < 2 * L + 1:
        raise InputError(f"n_phi = {n_phi} cannot resolve max_order {L}: need n_phi >= {2 * L + 1}",
                         key="grid.n_phi")
    phis = 2 * np.pi * np.arange(n_phi) / n_phi
    if dimensions == 2:
        return PhasingGrid(2, r, q, L, phis, None, None)
    n_theta = int(n_theta) if n_theta else (3 * L + 3) // 2
    if n_theta < L + 1:
        raise InputError(f"n_theta = {n_theta} cannot resolve max_order {L}: need n_theta >= {L + 1}",
                         key="grid.n_theta")
    x, w = np.polynomial.legendre.leggauss(n_theta)
    order = np.argsort(-x)                     # theta ascending
    return PhasingGrid(3, r, q, L, phis, np.arccos(x[order]), w[order])


def spherical_point(center) -> np.ndarray:
    """Cartesian point of a centre given as (r, θ, φ) [3-D] or (r, φ) [2-D], as in xFrame."""
    c = [float(v) for v in center]
    if len(c) == 2:
        return np.array([c[0] * np.cos(c[1]), c[0] * np.sin(c[1])])
    r, t, p = c
    return np.array([r * np.sin(t) * np.cos(p), r * np.sin(t) * np.sin(p), r * np.cos(t)])
