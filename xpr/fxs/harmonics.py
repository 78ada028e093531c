"""Harmonic transforms on the fxs angular grids.

Fourier series (2-D, polar grid)
    f(φ) = Σ_{n=−L}^{L} f_n e^{inφ},   f_n = (1/n_phi) Σ_j f(φ_j) e^{−inφ_j}.
    Coefficient arrays have shape (..., 2L+1); order n sits at index n + L.

Spherical harmonics (3-D, Gauss–Legendre grid, through ducc0.sht)
    f(θ, φ) = Σ_{l≤L} Σ_{|m|≤l} f_lm Y_lm(θ, φ),   f_lm = ∫ f Y*_lm dΩ,
    with orthonormal Y_lm including the Condon–Shortley phase (ducc0 / healpy convention), so
    Y_{l,−m} = (−1)^m Y*_lm and a real f has f_{l,−m} = (−1)^m f*_lm.
    Coefficient arrays have shape (..., L+1, 2L+1): f_lm sits at [..., l, m + L]; entries with
    |m| > l are zero. ``by_order`` turns them into a list of (..., 2l+1) arrays (m = −l … l),
    the layout of xFrame's per-order coefficient tuples.
    Maps have shape (..., L+1, n_phi) on the data side's grid of ``grids`` (L+1 Gauss–Legendre rings θ north→south, n_phi = 2(L+1), φ_j = 2πj/n_phi).

All leading axes (e.g. radial shells) are batched.
"""
from __future__ import annotations

import numpy as np
import ducc0

from xpr.backend import cpu

from .grids import n_phi_for_order, polar_angles, gauss_legendre_thetas


# ---------------------------------------------------------------- Fourier series (2-D)

def fourier_forward(f, max_order: int):
    """(..., n_phi) samples on φ_j = 2πj/n_phi → (..., 2L+1) coefficients f_n (index n+L)."""
    f = np.asarray(f)
    n_phi = f.shape[-1]
    if n_phi < 2 * max_order + 1:
        raise ValueError(f"{n_phi} angular points cannot resolve order {max_order}")
    spectrum = cpu().fft(f, axis=-1) / n_phi
    orders = np.arange(-max_order, max_order + 1)
    return spectrum[..., orders % n_phi]


def fourier_inverse(coefficients, n_phi: int | None = None):
    """(..., 2L+1) coefficients → (..., n_phi) complex samples on φ_j = 2πj/n_phi."""
    c = np.asarray(coefficients)
    max_order = (c.shape[-1] - 1) // 2
    n_phi = n_phi or n_phi_for_order(max_order)
    if n_phi < 2 * max_order + 1:
        raise ValueError(f"{n_phi} angular points cannot hold order {max_order}")
    spectrum = np.zeros(c.shape[:-1] + (n_phi,), dtype=np.result_type(c.dtype, np.complex64))
    spectrum[..., np.arange(-max_order, max_order + 1) % n_phi] = c
    return cpu().ifft(spectrum, axis=-1) * n_phi


# ---------------------------------------------------------------- spherical harmonics (3-D)

class SphericalHarmonicTransform:
    """Forward/inverse SHT up to degree L on the data side's Gauss–Legendre grid (``grids``)."""

    def __init__(self, max_order: int, n_threads: int = 1):
        self.max_order = L = int(max_order)
        self.n_threads = int(n_threads)
        self.thetas, self.theta_weights = gauss_legendre_thetas(L)
        self.phis = polar_angles(L)
        self.n_theta, self.n_phi = L + 1, n_phi_for_order(L)
        ls, ms = [], []
        for m in range(L + 1):               # healpy storage: m-major, l = m … L
            ls.extend(range(m, L + 1))
            ms.extend([m] * (L + 1 - m))
        self._l = np.array(ls)
        self._m = np.array(ms)
        self._sign = (-1.0) ** self._m

    # real maps <-> healpy alm (m >= 0)
    def _analysis_real(self, maps):
        out = np.empty((maps.shape[0], len(self._l)), dtype=np.complex128)
        for i, m in enumerate(maps):
            out[i] = ducc0.sht.analysis_2d(map=m[None].astype(np.float64), spin=0,
                                           lmax=self.max_order, geometry="GL",
                                           nthreads=self.n_threads)[0]
        return out

    def _synthesis_real(self, alms):
        out = np.empty((alms.shape[0], self.n_theta, self.n_phi))
        for i, a in enumerate(alms):
            out[i] = ducc0.sht.synthesis_2d(alm=a[None].astype(np.complex128), spin=0,
                                            lmax=self.max_order, geometry="GL",
                                            ntheta=self.n_theta, nphi=self.n_phi,
                                            nthreads=self.n_threads)[0]
        return out

    def _to_full(self, alm_re, alm_im):
        """healpy alms of Re f and Im f → full (…, L+1, 2L+1) coefficients of f."""
        L = self.max_order
        full = np.zeros(alm_re.shape[:-1] + (L + 1, 2 * L + 1), dtype=np.complex128)
        full[..., self._l, self._m + L] = alm_re + 1j * alm_im
        full[..., self._l, -self._m + L] = self._sign * (np.conj(alm_re) + 1j * np.conj(alm_im))
        return full

    def _from_full(self, full):
        L = self.max_order
        plus = full[..., self._l, self._m + L]
        minus = self._sign * np.conj(full[..., self._l, -self._m + L])
        alm_re = (plus + minus) / 2
        alm_im = (plus - minus) / 2j
        m0 = self._m == 0                      # exact reality of m=0 terms
        alm_re[..., m0] = alm_re[..., m0].real
        alm_im[..., m0] = alm_im[..., m0].real
        return alm_re, alm_im

    def forward(self, maps):
        """(..., L+1, n_phi) real or complex map → (..., L+1, 2L+1) complex f_lm."""
        maps = np.asarray(maps)
        lead = maps.shape[:-2]
        flat = maps.reshape((-1,) + maps.shape[-2:])
        alm_re = self._analysis_real(flat.real)
        if np.iscomplexobj(flat):
            alm_im = self._analysis_real(flat.imag)
        else:
            alm_im = np.zeros_like(alm_re)
        return self._to_full(alm_re, alm_im).reshape(lead + (self.max_order + 1, 2 * self.max_order + 1))

    def inverse(self, coefficients, real: bool = False):
        """(..., L+1, 2L+1) f_lm → (..., L+1, n_phi) map (complex, or real part if ``real``)."""
        c = np.asarray(coefficients)
        lead = c.shape[:-2]
        flat = c.reshape((-1,) + c.shape[-2:])
        alm_re, alm_im = self._from_full(flat)
        out = self._synthesis_real(alm_re)
        if not real:
            out = out + 1j * self._synthesis_real(alm_im)
        return out.reshape(lead + (self.n_theta, self.n_phi))

    def to_healpy(self, coefficients):
        """Coefficients of a *real* function → ducc0/healpy alm (m ≥ 0), shape (..., n_alm)."""
        return np.asarray(coefficients)[..., self._l, self._m + self.max_order]

    def from_healpy(self, alm):
        """ducc0/healpy alm of a real function → full (..., L+1, 2L+1) coefficients."""
        return self._to_full(np.asarray(alm), np.zeros_like(alm))


def by_order(coefficients) -> list:
    """(..., L+1, 2L+1) → [ (..., 2l+1) for l = 0 … L ], columns m = −l … l."""
    c = np.asarray(coefficients)
    L = c.shape[-2] - 1
    return [c[..., l, L - l:L + l + 1] for l in range(L + 1)]


def from_orders(per_order) -> np.ndarray:
    """Inverse of ``by_order``."""
    L = len(per_order) - 1
    lead = np.asarray(per_order[0]).shape[:-1]
    out = np.zeros(lead + (L + 1, 2 * L + 1), dtype=np.complex128)
    for l, c in enumerate(per_order):
        out[..., l, L - l:L + l + 1] = c
    return out
