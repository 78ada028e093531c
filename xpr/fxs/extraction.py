"""From an averaged angular cross-correlation to the invariants B_l / B_n and projection data.

Method (conventions of ``invariants``):

1. Optionally subtract Ī(q1)Ī(q2) (the uncorrelated part; B_0 is then restored as 4πĪĪᵀ in
   3-D, ĪĪᵀ in 2-D, as xFrame does), and fill masked Δ samples by periodic linear interpolation.
2. Fourier coefficients C_n(q1, q2) = (1/n_Δ) Σ_k C(Δ_k) e^{−inΔ_k}, n = 0 … L (needs n_Δ ≥ 2L).
3. 2-D: B_n = C_n (complex). 3-D B_l are real for a real intensity; their real part is kept.
   3-D ``back_substitution``: for each (q1, q2) the system C_n = Σ_{l≥n} A_l[n] B_l with
   A_l[n] = P̄_l^n(θ1)P̄_l^n(θ2)/(2l+1) is upper triangular in (n, l); solve it from l = L down.
   With ``assume_zero_odd_orders`` only even l and even n enter (stride 2).
   ``legendre``: the same in the flat-Ewald limit θ = π/2 (B_l are then 4π·(2l+1)/2 times the
   Legendre coefficients of C(cos Δ)).
   ``lstsq``: least squares of C(q1,q2,Δ_k) = (1/4π) Σ_l B_l P_l(cos ψ_k) over the unmasked Δ_k.
4. Per-order q limits give the masks of B_l and the q-range of the projection matrices.
5. Projection matrices: 3-D V_l = U_l Λ_l^{1/2} from the eigendecomposition of B_l restricted to
   its q range, keeping the rank ≤ 2l+1 largest eigenvalues (negative ones set to 0), so that
   B_l ≈ V_l V_l†; 2-D v_n = u_n λ_n^{1/2} (rank 1).
"""
from __future__ import annotations

import numpy as np
import scipy.linalg

from xpr.backend import cpu
from .grids import ewald_theta
from .invariants import ewald_coupling_tables, harmonic_cc_to_cc


EXTRACTION_METHODS = ("back_substitution", "lstsq", "legendre")


def max_supported_order(n_delta: int) -> int:
    """Largest harmonic order a cross-correlation with n_Δ angles resolves (n_Δ ≥ 2L)."""
    return n_delta // 2


def cc_to_harmonic_cc(cc, max_order: int) -> np.ndarray:
    """(N, N, n_Δ) real C(Δ) → (N, N, L+1) C_n = (1/n_Δ) Σ_k C(Δ_k) e^{−inΔ_k}."""
    n_delta = cc.shape[-1]
    return (cpu().rfft(np.real(cc), axis=-1) / n_delta)[..., :max_order + 1] if not np.iscomplexobj(cc) \
        else (cpu().fft(cc, axis=-1) / n_delta)[..., :max_order + 1]


def pixel_custom_cc_mask(shape, fraction_delta: float) -> np.ndarray:
    """True = usable. Masks the fraction ``fraction_delta`` of Δ samples centred on Δ = 0."""
    mask = np.ones(shape, dtype=bool)
    n_delta = shape[-1]
    half = int(round(fraction_delta * n_delta / 2))
    if half > 0:
        mask[..., :half + 1] = False
        mask[..., n_delta - half:] = False
    return mask


def interpolate_masked_delta(cc, cc_mask) -> np.ndarray:
    """Replace masked Δ samples by periodic linear interpolation of the unmasked ones."""
    if cc_mask is None or cc_mask.all():
        return cc
    out = np.array(cc, copy=True)
    n_delta = cc.shape[-1]
    delta = np.arange(n_delta)
    flat, mflat = out.reshape(-1, n_delta), cc_mask.reshape(-1, n_delta)
    for row, m in zip(flat, mflat):
        if m.all() or not m.any():
            continue
        row[~m] = np.interp(delta[~m], delta[m], row[m], period=n_delta)
    return out


def back_substitution_3d(cn, theta, max_order: int, odd_orders_zero: bool) -> np.ndarray:
    """Solve C_n = Σ_{l≥n} P̄_l^n(θ1)P̄_l^n(θ2)/(2l+1) B_l for B (L+1, N, N), l from L down."""
    table = ewald_coupling_tables(theta, max_order)                 # [l, n, q] = P̄_l^n/√(2l+1)
    step = 2 if odd_orders_zero else 1
    residual = np.ascontiguousarray(np.moveaxis(np.asarray(cn[..., :max_order + 1], dtype=np.complex128), -1, 0))
    b = np.zeros((max_order + 1,) + cn.shape[:2], dtype=np.complex128)
    first = max_order - (max_order % step) if odd_orders_zero else max_order
    for l in range(first, -1, -step):
        diagonal = table[l, l][:, None] * table[l, l][None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            b[l] = np.where(diagonal != 0, residual[l] / diagonal, 0)
        if l > 0:
            t = table[l, l % step:l:step]                            # (n, q) for n < l of l's parity class
            residual[l % step:l:step] -= b[l][None] * (t[:, :, None] * t[:, None, :])
    return b


def lstsq_3d(cc, q, xray_wavelength, max_order: int, odd_orders_zero: bool, cc_mask=None) -> np.ndarray:
    """Least-squares B_l from C(q1,q2,Δ_k) = (1/4π) Σ_l B_l P_l(cos ψ_k) per (q1, q2).

    The design columns (1/4π) P_l(cos ψ(Δ_k)) are synthesised from their Fourier coefficients
    A_l[n] (identical numbers for n_Δ > 2L; at n_Δ = 2L they carry the Nyquist order the way
    the data do, see ``invariants.harmonic_cc_to_cc``).
    """
    n_q, _, n_delta = cc.shape
    table = ewald_coupling_tables(ewald_theta(q, xray_wavelength), max_order)     # [l, n, q]
    orders = np.arange(0, max_order + 1, 2 if odd_orders_zero else 1)
    b = np.zeros((max_order + 1, n_q, n_q))
    for i in range(n_q):
        coupling = table[orders][:, :, i, None] * table[orders]                    # (l, n, q2)
        design = harmonic_cc_to_cc(np.transpose(coupling, (2, 0, 1)), n_delta)     # (q2, l, Δ)
        design = np.moveaxis(design, 1, 2)                                          # (q2, Δ, l)
        data = np.real(cc[i])
        if cc_mask is not None:
            w = cc_mask[i].astype(float)
            design = design * w[..., None]
            data = data * w
        qm, rm = np.linalg.qr(design)
        rhs = np.einsum("bdl,bd->bl", qm, data)
        b[orders, i, :] = np.linalg.solve(rm, rhs[..., None])[..., 0].T
    return b


def extract_from_cc(cc, q, dimensions: int, max_order: int, method: str = "back_substitution",
                    xray_wavelength=None, odd_orders_zero: bool = True, average_intensity=None,
                    subtract_average_intensity: bool = True, cc_mask=None) -> np.ndarray:
    """B (L+1, N, N) complex from a cross-correlation (N, N, n_Δ) on Δ_k = 2πk/n_Δ."""
    if max_order > max_supported_order(cc.shape[-1]):
        raise ValueError(f"max_order {max_order} needs at least {2 * max_order} angular points, "
                         f"the cross-correlation has {cc.shape[-1]}")
    cc = np.array(cc, copy=True)
    subtract = subtract_average_intensity and average_intensity is not None
    if subtract:
        ai = np.asarray(average_intensity, float)
        cc -= ai[:, None, None] * ai[None, :, None]
    if method != "lstsq" or dimensions == 2:
        cc = interpolate_masked_delta(cc, cc_mask)
    if dimensions == 2:
        b = np.moveaxis(cc_to_harmonic_cc(cc, max_order), -1, 0).astype(np.complex128)
        if odd_orders_zero:
            b[1::2] = 0
    elif method == "lstsq":
        b = lstsq_3d(cc, q, xray_wavelength, max_order, odd_orders_zero, cc_mask).astype(np.complex128)
    elif method in ("back_substitution", "legendre"):
        wavelength = None if method == "legendre" else xray_wavelength
        b = back_substitution_3d(cc_to_harmonic_cc(cc, max_order), ewald_theta(q, wavelength),
                                 max_order, odd_orders_zero)
    else:
        raise ValueError(f"unknown extraction method {method!r}; choose from {EXTRACTION_METHODS}")
    if dimensions == 3 and not np.iscomplexobj(cc):
        # a real intensity has real B_l; Im C_n of a real, Δ-symmetric cc is rounding noise
        b = b.real.astype(np.complex128)
    if subtract:
        b[0] = np.outer(ai, ai) * (4 * np.pi if dimensions == 3 else 1.0)
    return b


# ------------------------------------------------------------- q limits and masks

def line_q_limit(line, orders) -> np.ndarray:
    """q on the straight line through two (order, q) points, evaluated at each order."""
    (l0, q0), (l1, q1) = line
    if l1 == l0:
        return np.full(len(orders), float(q0))
    return q0 + (np.asarray(orders, float) - l0) * (q1 - q0) / (l1 - l0)


def q_limit_masks(q, max_order: int, min_line=None, max_line=None):
    """Per-order masks (L+1, N, N) and q_id_limits (L+1, 2, 2) ([q1|q2], [start, stop)).

    ``min_line``/``max_line``: None or [[l0, q0], [l1, q1]]; order l keeps q between the lines.
    """
    q = np.asarray(q, float)
    orders = np.arange(max_order + 1)
    keep = np.ones((max_order + 1, len(q)), dtype=bool)
    if min_line is not None:
        keep &= q[None, :] >= line_q_limit(min_line, orders)[:, None]
    if max_line is not None:
        keep &= q[None, :] <= line_q_limit(max_line, orders)[:, None]
    masks = keep[:, :, None] & keep[:, None, :]
    limits = np.zeros((max_order + 1, 2, 2), dtype=np.int64)
    for l in orders:
        ids = np.flatnonzero(keep[l])
        start, stop = (ids[0], ids[-1] + 1) if len(ids) else (0, 0)
        limits[l, :, 0], limits[l, :, 1] = start, stop
    return masks, limits


# ------------------------------------------------------------- projection matrices

def _sorted_eigh(matrix, count: int | None = None):
    """Largest ``count`` eigenpairs of the Hermitian part of matrix, largest first (real
    arithmetic when the matrix is real, as B_l of a real intensity is)."""
    matrix = (matrix + matrix.conj().T) / 2
    if np.abs(matrix.imag).max(initial=0.0) <= 1e-13 * np.abs(matrix).max(initial=0.0):
        matrix = matrix.real
    n = matrix.shape[0]
    count = n if count is None else min(count, n)
    values, vectors = scipy.linalg.eigh(matrix, subset_by_index=[n - count, n - 1])
    return values[::-1], vectors[:, ::-1]


def projection_matrices_3d(b, q_id_limits=None) -> list:
    """[V_l (N, min(N, 2l+1)) complex] with B_l ≈ V_l V_l† on the order's q range."""
    n_orders, n_q = b.shape[0], b.shape[1]
    out = []
    for l in range(n_orders):
        start, stop = (0, n_q) if q_id_limits is None else q_id_limits[l, 0]
        rank_full = min(n_q, 2 * l + 1)
        v = np.zeros((n_q, rank_full), dtype=np.complex128)
        block = b[l, start:stop, start:stop]
        if block.size and np.any(block != 0):
            values, vectors = _sorted_eigh(block, 2 * l + 1)
            rank = len(values)
            values = np.clip(values[:rank], 0, None)
            v[start:stop, :rank] = vectors[:, :rank] * np.sqrt(values)[None, :]
        out.append(v)
    return out


def projection_vectors_2d(b, q_id_limits=None) -> list:
    """[v_n (N,)] with B_n ≈ v_n v_n† (largest eigenpair; 0 if it is negative)."""
    n_orders, n_q = b.shape[0], b.shape[1]
    out = []
    for n in range(n_orders):
        start, stop = (0, n_q) if q_id_limits is None else q_id_limits[n, 0]
        v = np.zeros(n_q, dtype=np.complex128)
        block = b[n, start:stop, start:stop]
        if block.size and np.any(block != 0):
            values, vectors = _sorted_eigh(block, 1)
            if values[0] > 0:
                v[start:stop] = vectors[:, 0] * np.sqrt(values[0])
        out.append(v)
    return out


def invariants_from_projection(projection) -> np.ndarray:
    """B_l = V_l V_l† (3-D list of (N, r)) or B_n = v_n v_n† (2-D list of (N,))."""
    return np.array([np.outer(p, p.conj()) if p.ndim == 1 else p @ p.conj().T for p in projection])


def projection_error_estimates(b, projection, rebuilt=None) -> np.ndarray:
    """|B − V V†|/|B| element-wise where B ≠ 0, −1 elsewhere (xFrame's estimate)."""
    rebuilt = invariants_from_projection(projection) if rebuilt is None else rebuilt
    err = np.full(b.shape, -1.0, dtype=np.complex128)
    nz = b != 0
    err[nz] = np.abs(b[nz] - rebuilt[nz]) / np.abs(b[nz])
    return err
