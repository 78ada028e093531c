"""Fourier transforms between the real and reciprocal fxs grids, order by order.

Conventions (3-D):  F(q) = ∫ ρ(r) e^{−i q·r} d³r,   ρ(r) = (2π)^{−3} ∫ F(q) e^{i q·r} d³q.
Expanding ρ(r) = Σ ρ_lm(r) Y_lm(r̂) and F(q) = Σ F_lm(q) Y_lm(q̂) (plane-wave expansion):

    F_lm(q) = 4π (−i)^l ∫ ρ_lm(r) j_l(qr) r² dr,      ρ_lm(r) = i^l/(2π²) ∫ F_lm(q) j_l(qr) q² dq.

Conventions (2-D):  F(q) = ∫ ρ(r) e^{−i q·r} d²r,   ρ(r) = (2π)^{−2} ∫ F(q) e^{i q·r} d²q, with
ρ(r) = Σ ρ_n(r) e^{inφ}:

    F_n(q) = 2π (−i)^n ∫ ρ_n(r) J_n(qr) r dr,        ρ_n(r) = i^n/(2π) ∫ F_n(q) J_n(qr) q dq.

Both radial integrals use the midpoint rule on the grids of ``grids`` (Δr = max_r/N,
Δq = max_q/N; in 2-D order 0 gets the O(h²) Euler–Maclaurin end correction at the origin, where
its integrand has a non-zero slope), so each order is one N×N matrix: ``forward_matrices[l]`` (N_q × N_r) and
``inverse_matrices[l]`` (N_r × N_q). A density ↔ amplitude round trip is exact to the accuracy of
that quadrature (for l = 0 in 3-D with the reciprocity coefficient π it is exact to rounding: the
kernel is then a DST-IV). Harmonic coefficient layouts are those of ``harmonics``.
"""
from __future__ import annotations

import numpy as np
from scipy.special import spherical_jn, jv

from .grids import PolarGrid, SphericalGrid
from .harmonics import SphericalHarmonicTransform, fourier_forward, fourier_inverse


def spherical_hankel_matrices(q, r, max_order: int):
    """(forward, inverse) arrays of shape (L+1, N_q, N_r) and (L+1, N_r, N_q) for 3-D."""
    q = np.asarray(q, float)
    r = np.asarray(r, float)
    dr = r[1] - r[0] if len(r) > 1 else 2 * r[0]
    dq = q[1] - q[0] if len(q) > 1 else 2 * q[0]
    ls = np.arange(max_order + 1)
    qr = q[:, None] * r[None, :]
    bessel = spherical_jn(ls[:, None, None], qr[None])                 # (L+1, N_q, N_r)
    forward = (4 * np.pi * (-1j) ** ls)[:, None, None] * bessel * (r ** 2 * dr)[None, None, :]
    inverse = ((1j) ** ls / (2 * np.pi ** 2))[:, None, None] * np.swapaxes(bessel, 1, 2) \
        * (q ** 2 * dq)[None, None, :]
    return forward, inverse


def polar_hankel_matrices(q, r, max_order: int):
    """(forward, inverse) arrays for orders n = 0 … L (negative n equal |n|) in 2-D."""
    q = np.asarray(q, float)
    r = np.asarray(r, float)
    dr = r[1] - r[0] if len(r) > 1 else 2 * r[0]
    dq = q[1] - q[0] if len(q) > 1 else 2 * q[0]
    ns = np.arange(max_order + 1)
    qr = q[:, None] * r[None, :]
    bessel = jv(ns[:, None, None], qr[None])
    forward = (2 * np.pi * (-1j) ** ns)[:, None, None] * bessel * (r * dr)[None, None, :]
    inverse = ((1j) ** ns / (2 * np.pi))[:, None, None] * np.swapaxes(bessel, 1, 2) \
        * (q * dq)[None, None, :]
    # Order 0: the integrand g(x) = f(x)·J_0(·x)·x is odd with g'(0) = f(0), so the midpoint rule
    # errs by −(h²/24)·f(0) (Euler–Maclaurin). Subtract it, with f(0) ≈ (9 f(x_0) − f(x_1))/8 from
    # the even expansion f ≈ a + b x² through the first two midpoints.
    if len(r) > 1 and len(q) > 1:
        forward[0, :, 0] -= 2 * np.pi * dr ** 2 / 24 * 9 / 8
        forward[0, :, 1] += 2 * np.pi * dr ** 2 / 24 * 1 / 8
        inverse[0, :, 0] -= dq ** 2 / 24 * 9 / 8 / (2 * np.pi)
        inverse[0, :, 1] += dq ** 2 / 24 * 1 / 8 / (2 * np.pi)
    return forward, inverse


class SphericalFourierTransform:
    """ρ(r, θ, φ) ↔ F(q, θ, φ) on a ``SphericalGrid`` through SHT + spherical Hankel matrices.

    ``forward_coefficients``/``inverse_coefficients`` act on (N, L+1, 2L+1) harmonic coefficients;
    ``forward``/``inverse`` act on (N, L+1, n_phi) maps.
    """

    def __init__(self, grid: SphericalGrid, n_threads: int = 1):
        self.grid = grid
        self.sht = SphericalHarmonicTransform(grid.max_order, n_threads=n_threads)
        self.forward_matrices, self.inverse_matrices = spherical_hankel_matrices(
            grid.q, grid.r, grid.max_order)

    def forward_coefficients(self, rho_lm):
        return np.einsum("lkj,jlm->klm", self.forward_matrices, rho_lm)

    def inverse_coefficients(self, f_lm):
        return np.einsum("ljk,klm->jlm", self.inverse_matrices, f_lm)

    def forward(self, density):
        return self.sht.inverse(self.forward_coefficients(self.sht.forward(density)))

    def inverse(self, amplitude, real: bool = False):
        return self.sht.inverse(self.inverse_coefficients(self.sht.forward(amplitude)), real=real)


class PolarFourierTransform:
    """ρ(r, φ) ↔ F(q, φ) on a ``PolarGrid`` through Fourier series + Bessel J_n matrices."""

    def __init__(self, grid: PolarGrid):
        self.grid = grid
        self.max_order = grid.max_order
        self.forward_matrices, self.inverse_matrices = polar_hankel_matrices(
            grid.q, grid.r, grid.max_order)
        self._order_index = np.abs(np.arange(-grid.max_order, grid.max_order + 1))

    def forward_coefficients(self, rho_n):
        return np.einsum("nkj,jn->kn", self.forward_matrices[self._order_index], rho_n)

    def inverse_coefficients(self, f_n):
        return np.einsum("njk,kn->jn", self.inverse_matrices[self._order_index], f_n)

    def forward(self, density):
        n_phi = np.shape(density)[-1]
        return fourier_inverse(self.forward_coefficients(fourier_forward(density, self.max_order)), n_phi)

    def inverse(self, amplitude, real: bool = False):
        n_phi = np.shape(amplitude)[-1]
        out = fourier_inverse(self.inverse_coefficients(fourier_forward(amplitude, self.max_order)), n_phi)
        return out.real if real else out


def fourier_transform_for(grid, n_threads: int = 1):
    """The transform matching the grid's dimension."""
    if isinstance(grid, SphericalGrid):
        return SphericalFourierTransform(grid, n_threads=n_threads)
    return PolarFourierTransform(grid)
