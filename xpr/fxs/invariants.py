"""Rotational invariants of degree two and the angular cross-correlation they determine.

3-D.  With I(q) = Σ_lm I_lm(q) Y_lm(q̂) (``harmonics`` conventions), the invariants are

        B_l(q1, q2) = Σ_m I_lm(q1) I*_lm(q2)                         (real for a real intensity)

    The orientation-averaged cross-correlation of two Ewald-sphere rings at q1, q2 with azimuth
    difference Δ is (addition theorem)

        C(q1, q2, Δ) = (1/4π) Σ_l B_l(q1, q2) P_l(cos ψ),
        cos ψ = cos θ1 cos θ2 + sin θ1 sin θ2 cos Δ,   θ_i = θ(q_i) = arccos(q_i λ/4π),

    and its Fourier coefficients in Δ (C(Δ) = Σ_n C_n e^{inΔ}) are

        C_n(q1, q2) = Σ_{l ≥ |n|} B_l(q1, q2) P̄_l^{|n|}(cos θ1) P̄_l^{|n|}(cos θ2) / (2l+1),

    with the orthonormal associated Legendre functions P̄_l^m (Y_lm(θ, 0)). In the flat-Ewald
    limit θ = π/2 and cos ψ = cos Δ.

2-D.  With I(q, φ) = Σ_n I_n(q) e^{inφ}:  B_n(q1, q2) = I_n(q1) I*_n(q2), and

        C(q1, q2, Δ) = ⟨I(q1, φ+Δ) I(q2, φ)⟩_φ = Σ_n B_n e^{inΔ},   C_n = B_n.

Arrays: B has shape (L+1, N_q, N_q) (order first, as xFrame's ``deg_2_invariant``); C has shape
(N_q, N_q, n_Δ) on Δ_k = 2πk/n_Δ (as xFrame's ``cross_correlation``). Average intensity
Ī(q) = ⟨I(q, ·)⟩ over directions: 3-D B_0 = 4π Ī Īᵀ, 2-D B_0 = Ī Īᵀ.
"""
from __future__ import annotations

import numpy as np
from scipy.special import sph_legendre_p_all

from xpr.backend import cpu

from .grids import ewald_theta, n_phi_for_order
from .harmonics import SphericalHarmonicTransform, fourier_forward


# ------------------------------------------------------------- intensity → invariants

def deg2_invariants_3d(intensity_lm) -> np.ndarray:
    """(N_q, L+1, 2L+1) I_lm → (L+1, N_q, N_q) B_l = Σ_m I_lm(q1) I*_lm(q2)."""
    per_order = np.ascontiguousarray(np.moveaxis(intensity_lm, 1, 0))          # (L+1, N, 2L+1)
    return per_order @ np.conj(per_order).transpose(0, 2, 1)


def deg2_invariants_2d(intensity_n) -> np.ndarray:
    """(N_q, 2L+1) I_n (index n+L) → (L+1, N_q, N_q) B_n = I_n(q1) I*_n(q2), n = 0 … L."""
    L = (intensity_n.shape[-1] - 1) // 2
    positive = intensity_n[:, L:]
    return np.einsum("an,bn->nab", positive, np.conj(positive))


def average_intensity_from_invariants(b0, dimensions: int) -> np.ndarray:
    """Ī(q) from the diagonal of B_0 (3-D: B_0 = 4π Ī Īᵀ; 2-D: B_0 = Ī Īᵀ)."""
    diag = np.real(np.diagonal(b0)).clip(min=0)
    return np.sqrt(diag / (4 * np.pi)) if dimensions == 3 else np.sqrt(diag)


def model_intensity_coefficients(model, q, max_order: int, n_threads: int = 1,
                                 progress=None) -> np.ndarray:
    """Harmonic coefficients of the model's exact intensity |F(q)|² on radial shells q.

    3-D: I_lm (N_q, L+1, 2L+1); 2-D: I_n (N_q, 2L+1). The intensity is sampled on an angular grid
    fine enough for its band limit (≈ 2 q·extent) so that the coefficients up to L are free of
    aliasing, then truncated to L.
    """
    q = np.asarray(q, float)
    band = int(np.ceil(2 * q.max() * model.extent)) + 16
    dims = model.dimensions
    shells = range(len(q)) if progress is None else progress(range(len(q)), desc="intensity")
    if dims == 2:
        n_int = max(max_order, band)
        n_phi = n_phi_for_order(n_int)
        phi = 2 * np.pi * np.arange(n_phi) / n_phi
        direction = np.stack([np.cos(phi), np.sin(phi)], axis=-1)
        out = np.empty((len(q), 2 * max_order + 1), dtype=np.complex128)
        for k in shells:
            out[k] = fourier_forward(model.intensity(q[k] * direction), max_order)
        return out
    L_int = max(max_order, (band + max_order + 1) // 2)
    sht = SphericalHarmonicTransform(L_int, n_threads=n_threads)
    st, ct = np.sin(sht.thetas)[:, None], np.cos(sht.thetas)[:, None]
    direction = np.stack(np.broadcast_arrays(st * np.cos(sht.phis), st * np.sin(sht.phis), ct), -1)
    out = np.empty((len(q), max_order + 1, 2 * max_order + 1), dtype=np.complex128)
    for k in shells:
        coeff = sht.forward(model.intensity(q[k] * direction)[None])[0]
        out[k] = coeff[:max_order + 1, L_int - max_order:L_int + max_order + 1]
    return out


# ------------------------------------------------------------- invariants → cross-correlation

def normalized_legendre_table(theta, max_order: int) -> np.ndarray:
    """P̄_l^m(cos θ) for 0 ≤ m ≤ l ≤ L: array (L+1, L+1, len θ) indexed [l, m, i] (0 for m > l)."""
    p = sph_legendre_p_all(max_order, max_order, np.asarray(theta, float))[0]
    return p[:, :max_order + 1]


def ewald_coupling(theta, max_order: int, l: int) -> np.ndarray:
    """A_l[n, q1, q2] = P̄_l^n(θ1) P̄_l^n(θ2)/(2l+1) for n = 0 … l: column l of the triangular
    system C_n = Σ_{l≥n} A_l[n] B_l."""
    p = normalized_legendre_table(theta, max_order)[l, :l + 1]       # (l+1, N)
    return p[:, :, None] * p[:, None, :] / (2 * l + 1)


def ewald_coupling_tables(theta, max_order: int) -> np.ndarray:
    """P̄_l^n(θ_q)/√(2l+1) as (L+1 [l], L+1 [n], N_q); A_l[n] is the outer product over q."""
    p = normalized_legendre_table(theta, max_order)
    return p / np.sqrt(2 * np.arange(max_order + 1) + 1)[:, None, None]


def invariants_to_harmonic_cc_3d(b, q, xray_wavelength) -> np.ndarray:
    """(L+1, N, N) B_l → (N, N, L+1) C_n, n = 0 … L (curved Ewald; λ = 0/None: flat)."""
    L = b.shape[0] - 1
    table = ewald_coupling_tables(ewald_theta(q, xray_wavelength), L)      # [l, n, q]
    cn = np.zeros(b.shape[1:] + (L + 1,), dtype=np.result_type(b.dtype, np.float64))
    for l in range(L + 1):
        t = table[l, :l + 1]                                                 # (n, q)
        cn[..., :l + 1] += b[l][:, :, None] * (t[:, :, None] * t[:, None, :]).transpose(1, 2, 0)
    return cn


def harmonic_cc_to_cc(cn, n_delta: int) -> np.ndarray:
    """(N, N, L+1) C_n of a cc with C_{−n} = C_n* → (N, N, n_Δ) real C(Δ_k), Δ_k = 2πk/n_Δ.

    n_Δ ≥ 2L+1 represents C exactly; n_Δ = 2L (xFrame's choice) keeps only Re C_L·cos(LΔ) of the
    Nyquist order, which the forward transform ``cc_to_harmonic_cc`` returns unchanged.
    """
    L = cn.shape[-1] - 1
    if n_delta < 2 * L:
        raise ValueError(f"{n_delta} angles cannot hold order {L}")
    spectrum = np.zeros(cn.shape[:-1] + (n_delta // 2 + 1,), dtype=np.complex128)
    spectrum[..., :L + 1] = cn
    return cpu().irfft(spectrum * n_delta, axis=-1, n=n_delta)


def legendre_polynomials(x, max_order: int) -> np.ndarray:
    """P_l(x), l = 0 … L, stacked on a new first axis (Bonnet recurrence)."""
    x = np.asarray(x, float)
    out = np.empty((max_order + 1,) + x.shape)
    out[0] = 1.0
    if max_order >= 1:
        out[1] = x
    for l in range(1, max_order):
        out[l + 1] = ((2 * l + 1) * x * out[l] - l * out[l - 1]) / (l + 1)
    return out


def ewald_cos_psi(theta1, theta2, delta):
    """cos ψ between two Ewald-sphere points at polar angles θ1, θ2 and azimuth difference Δ."""
    return np.clip(np.cos(theta1) * np.cos(theta2) + np.sin(theta1) * np.sin(theta2) * np.cos(delta),
                   -1.0, 1.0)


def invariants_to_cc_direct_3d(b, q, xray_wavelength, n_delta: int) -> np.ndarray:
    """C(q1,q2,Δ) = (1/4π) Σ_l B_l P_l(cos ψ) summed directly (the route of ``lstsq``)."""
    L = b.shape[0] - 1
    theta = ewald_theta(q, xray_wavelength)
    delta = 2 * np.pi * np.arange(n_delta) / n_delta
    cc = np.empty(b.shape[1:] + (n_delta,))
    for i in range(len(q)):
        x = ewald_cos_psi(theta[i], theta[:, None], delta[None, :])        # (N, n_Δ)
        p = legendre_polynomials(x, L)                                       # (L+1, N, n_Δ)
        cc[i] = np.einsum("lb,lbd->bd", np.real(b[:, i, :]), p) / (4 * np.pi)
    return cc


def invariants_to_cc(b, q, dimensions: int, n_delta: int, xray_wavelength=None,
                     method: str = "back_substitution") -> np.ndarray:
    """The cross-correlation (N, N, n_Δ) of invariants b.

    3-D ``back_substitution``: through the harmonic coefficients C_n (curved Ewald);
    ``lstsq``: the direct Legendre sum (curved Ewald; same numbers, other route);
    ``legendre``: flat-Ewald limit (θ = π/2). 2-D: C = Σ_n B_n e^{inΔ} (method ignored).
    """
    if dimensions == 2:
        return harmonic_cc_to_cc(np.moveaxis(b, 0, -1), n_delta)
    if method == "lstsq":
        return invariants_to_cc_direct_3d(b, q, xray_wavelength, n_delta)
    wavelength = None if method == "legendre" else xray_wavelength
    return harmonic_cc_to_cc(invariants_to_harmonic_cc_3d(np.real(b), q, wavelength), n_delta)
