"""The reciprocal-space projection of FXS phasing: onto intensities consistent with the invariants.

For a single particle the degree-2 invariants B_l(q1, q2) = sum_m I_lm(q1) I_lm(q2)^* fix the
intensity's harmonic coefficients up to one unknown unitary matrix per order (Kurta et al., Saldin
et al.; Pedrini et al. for the "multi-tiered iterative phasing" used here):

    3-D   I_l(q) = V_l(q) U_l          I_l: N_q x (2l+1),  V_l: N_q x rank (B_l = V_l V_l^dagger),
                                        U_l: rank x (2l+1) with orthonormal rows
    2-D   I_n(q) = v_n(q) e^{i a_n}    v_n: N_q (B_n = v_n v_n^*), one phase a_n per order

Given the current amplitude A (Fourier transform of the current density), the projection

1. computes the intensity |A|^2 and its harmonic coefficients I_lm(q) (I_n(q) in 2-D);
2. for each constrained order finds the U_l that brings V_l U_l closest to I_l in the Frobenius
   norm -- the orthogonal Procrustes problem, solved by the SVD V_l^dagger I_l = W S Z^dagger,
   U_l = W Z^dagger (2-D: a_n = arg(v_n^dagger I_n)) -- and replaces I_l by V_l U_l where the data
   are valid (q mask); order 0 can instead be fixed to the measured average intensity,
   I_00 = sqrt(4 pi) <I>(q) (3-D) or I_0 = <I>(q) (2-D); odd orders can be set to zero
   (the intensity of a real density is centrosymmetric);
3. rebuilds the projected intensity I' = |A|^2 + sum over changed orders of the change, and
4. scales the amplitude's modulus to sqrt(I'), keeping its phase, inside the data's q range.

With N particles in the beam, B_l (l > 0) grows as N and the single-particle V_l is V_l / sqrt(N).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from xpr.fxs.fxs_phasing import FourierTransformPair, integrate


@dataclass
class InvariantConstraint:
    """What the data say, on the reconstruction's reciprocal grid.

    projection_vectors: order -> V_l (N_q x rank) (2-D: v_n, N_q) for the constrained orders.
    q_masks: order -> bool (N_q): where the order is constrained.
    zeroth_order: I_0(q) from the average intensity (harmonic normalisation of the transforms), or None.
    odd_orders_to_zero: constrain odd orders to zero (where their q mask is set).
    data_q_mask: bool (N_q): where the amplitude modulus is replaced at all.
    """

    projection_vectors: dict
    q_masks: dict
    zeroth_order: np.ndarray | None = None
    odd_orders_to_zero: bool = True
    data_q_mask: np.ndarray | None = None
    max_order: int = 0
    extra: dict = field(default_factory=dict)


def procrustes_unitary(V, I, xp=np):
    """U with orthonormal rows minimising ||V U - I||_F, batched: V (Q, r), I (B, Q, k) -> (B, r, k).

    U = W Z^dagger from the SVD V^dagger I = W S Z^dagger (stacked over the batch).
    """
    M = V.conj().T @ I                                                  # (B, r, k), BLAS
    W, _, Zh = xp.linalg.svd(M, full_matrices=False)
    return W @ Zh


def project_coefficients_3d(coefficients, constraint: InvariantConstraint, ms: np.ndarray, xp=np):
    """Change of the intensity coefficients (M, L+1, B, Q) under the projection (same layout).

    Per order l the coefficients I_l (2l+1 rows m, B, Q) are used as they lie: the overlap
    V_l^dagger I_l^T and the fit V_l U_l are matrix products over the stacked batch (BLAS), and
    only the small (B, r, 2l+1) overlaps go through the SVD.
    """
    change = xp.zeros_like(coefficients)
    L = coefficients.shape[1] - 1
    for l in range(L + 1):
        mask = constraint.q_masks.get(l)
        if mask is None or not np.any(mask):
            continue
        rows = np.flatnonzero(np.abs(ms) <= l)
        rows = slice(int(rows[0]), int(rows[-1]) + 1) if l == 0 else xp.asarray(rows)
        current = coefficients[rows, l]                                  # (2l+1, B, Q)
        if l == 0 and constraint.zeroth_order is not None:
            target = xp.asarray(constraint.zeroth_order, dtype=current.dtype)
        elif l % 2 == 1 and constraint.odd_orders_to_zero:
            target = 0
        elif l in constraint.projection_vectors:
            V = xp.asarray(constraint.projection_vectors[l], dtype=current.dtype) * xp.asarray(mask)[:, None]
            U = procrustes_unitary(V, xp.transpose(current, (1, 2, 0)), xp)   # (B, r, 2l+1)
            target = xp.transpose(xp.matmul(V, U), (2, 0, 1))           # (2l+1, B, Q) = (V U)^T
        else:
            continue
        change[rows, l] = xp.where(xp.asarray(mask), target - current, 0)
    return change


def project_coefficients_2d(coefficients, constraint: InvariantConstraint, ms: np.ndarray, xp=np):
    """Change of the intensity coefficients (M, B, Q), n in FFT order, under the projection."""
    change = xp.zeros_like(coefficients)
    for n in range(int(np.max(ms)) + 1):
        mask = constraint.q_masks.get(n)
        if mask is None or not np.any(mask):
            continue
        mask = xp.asarray(mask)
        row = int(np.flatnonzero(ms == n)[0])
        current = coefficients[row]                                      # (B, Q)
        if n == 0 and constraint.zeroth_order is not None:
            target = xp.broadcast_to(xp.asarray(constraint.zeroth_order, dtype=current.dtype), current.shape)
        elif n % 2 == 1 and constraint.odd_orders_to_zero:
            target = xp.zeros_like(current)
        elif n in constraint.projection_vectors:
            v = xp.asarray(constraint.projection_vectors[n], dtype=current.dtype) * mask
            overlap = xp.sum(v.conj() * current, axis=-1, keepdims=True)  # v^dagger I_n per repeat
            phase = xp.where(xp.abs(overlap) > 0, overlap / xp.maximum(xp.abs(overlap), 1e-300), 1)
            target = v * phase
        else:
            continue
        change[row] = xp.where(mask, target - current, 0)
        if n > 0:
            negative = int(np.flatnonzero(ms == -n)[0])
            change[negative] = change[row].conj()                       # real intensity: I_-n = I_n^*
    return change


class InvariantProjection:
    """P_M of FXS phasing: density batch -> (projected density batch, modulus error per repeat)."""

    def __init__(self, transform: FourierTransformPair, constraint: InvariantConstraint):
        self.transform = transform
        self.constraint = constraint
        self.xp = transform.xp
        data_mask = constraint.data_q_mask
        if data_mask is None:
            data_mask = np.ones(transform.grid.n_radial, dtype=bool)
        self.data_q_mask = self.xp.asarray(data_mask)
        self.last_amplitude = None

    def project_intensity(self, intensity):
        """Projected intensity I' (real, same layout) of an intensity."""
        t = self.transform
        coefficients = t.real_harmonic_coefficients(intensity)
        if t.grid.dimensions == 3:
            change = project_coefficients_3d(coefficients, self.constraint, t.ms, self.xp)
        else:
            change = project_coefficients_2d(coefficients, self.constraint, t.ms, self.xp)
        return intensity + t.real_inverse_harmonic(change).astype(intensity.dtype)

    def project_amplitude(self, amplitude):
        """Amplitude with its modulus replaced by sqrt(I') where the data are, and the modulus error."""
        xp = self.xp
        modulus = xp.abs(amplitude)
        projected = self.project_intensity(modulus ** 2)
        projected = xp.sqrt(xp.maximum(projected, 0, out=projected), out=projected)
        new_modulus = xp.where(self.data_q_mask, projected, modulus)     # |A'|
        factor = new_modulus / xp.where(modulus > 0, modulus, 1)
        new = amplitude * factor
        lost = modulus == 0                                               # no phase: take it real
        if bool(xp.any(lost & self.data_q_mask)):
            new = xp.where(lost & self.data_q_mask, new_modulus.astype(amplitude.dtype), new)
        grid = self.transform.grid
        difference = modulus - new_modulus
        mismatch = integrate(difference * difference, grid, "reciprocal", xp)
        norm = integrate(new_modulus * new_modulus, grid, "reciprocal", xp)
        e_mod = xp.sqrt(mismatch / xp.maximum(norm, 1e-30))
        return new, e_mod

    def __call__(self, density):
        amplitude = self.transform.forward(density)
        new, e_mod = self.project_amplitude(amplitude)
        self.last_amplitude = new
        return self.transform.real_inverse(new).astype(density.dtype), e_mod


def invariants_from_coefficients(coefficients, dimensions: int, ms: np.ndarray, xp=np):
    """B_l(q1, q2) = sum_m I_lm(q1) I_lm(q2)^* (3-D) or B_n = I_n(q1) I_n(q2)^* (2-D), n, l >= 0.

    coefficients: (M, L+1, Q) in 3-D or (M, Q) in 2-D for one density. Returns (L+1, Q, Q).
    """
    if dimensions == 3:
        L = coefficients.shape[1] - 1
        out = []
        for l in range(L + 1):
            rows = np.flatnonzero(np.abs(ms) <= l)
            c = coefficients[rows, l]                                     # (2l+1, Q)
            out.append(xp.einsum("mq,mp->qp", c, c.conj()))
        return xp.stack(out)
    orders = np.arange(int(np.max(ms)) + 1)
    c = coefficients[[int(np.flatnonzero(ms == n)[0]) for n in orders]]
    return c[:, :, None] * c[:, None, :].conj()
