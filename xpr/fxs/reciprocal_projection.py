"""The reciprocal-space projection of FXS phasing: onto intensities consistent with the invariants.

For a single particle the degree-2 invariants B_l(q1, q2) = sum_m I_lm(q1) I_lm(q2)^* fix the
intensity's harmonic coefficients up to one unknown unitary matrix per order (Kurta et al., Saldin
et al.; Pedrini et al. for the "multi-tiered iterative phasing" used here):

    3-D   I_l(q) = V_l(q) U_l          I_l: N_q x (2l+1),  V_l: N_q x rank (B_l = V_l V_l^dagger),
                                        U_l: rank x (2l+1) with orthonormal rows
    2-D   I_n(q) = v_n(q) e^{i a_n}    v_n: N_q (B_n = v_n v_n^*), one phase a_n per order

Given the current amplitude A (Fourier transform of the current density), the projection

1. computes the intensity |A|^2 and its harmonic coefficients I_lm(q) (I_n(q) in 2-D);
2. for each constrained order finds the U_l that brings V_l U_l closest to I_l in the metric of
   the modulus error (below) -- a weighted orthogonal Procrustes problem, solved by the SVD
   V_l^dagger D I_l = W S Z^dagger, U_l = W Z^dagger with D = diag w(q) (2-D:
   a_n = arg(v_n^dagger D I_n)) -- and replaces I_l by V_l U_l where the data
   are valid (q mask); order 0 can instead be fixed to the measured average intensity,
   I_00 = sqrt(4 pi) <I>(q) (3-D) or I_0 = <I>(q) (2-D); odd orders can be set to zero
   (the intensity of a real density is centrosymmetric);
3. rebuilds the projected intensity I' = |A|^2 + sum over changed orders of the change, and
4. scales the amplitude's modulus to sqrt(I'), keeping its phase, inside the data's q range.

With N particles in the beam, B_l (l > 0) grows as N and the single-particle V_l is V_l / sqrt(N).

The metric of step 2. The loop measures (and the real-space step reduces) the modulus error
int (|A| - |A'|)^2 q^(d-1) dq dOmega. A small change dI of the intensity changes the modulus by
dI / (2 |A|), so that error is int dI^2 / (4 I) q^(d-1) dq dOmega; with I(q, Omega) replaced by
its shell average Ibar(q) it is, by Parseval on the sphere, sum_q w(q) sum_m |dI_lm(q)|^2 with

    w(q) = q^(d-1) / Ibar(q)          (constant factors dropped: they do not move the optimum),

and the weighted problem keeps the SVD solution above. The plain Frobenius fit (w = 1) weighs
the low-q shells, where Ibar is orders of magnitude larger, almost alone: its U_l then disagree
with what the modulus step measures, the composite map is no longer a projection, and error
reduction drifts away from an exact solution (measured: modulus error 4e-4 -> 2.5e-2 in 100 ER
iterations started at the solution; with w(q) it stays at the level the support allows).
Far from a solution the plain fit can search better: the strong low-q shells, which fix the
particle's overall shape, then lead. The phasing loop therefore picks the metric per algorithm
(``InvariantProjection.use_metric``; reconstruct's projections.reciprocal.fit_metric): by default
the plain fit for the exploring HIO/RAAR/DM steps and w(q) for error reduction.

The pointwise refinement of the modulus metric. Replacing I(q, Omega) by its shell average Ibar(q)
is exact only for an angularly flat intensity; a real one varies by orders of magnitude within a
shell (speckle), and then the composite map is an oblique, not an orthogonal, projection near a
solution: RAAR and HIO started at an exact solution drift away from it (measured: modulus error
5.5e-4 -> 2.1e-2 in 400 RAAR iterations, where the same loop with the whole intensity known stays
at 1.3e-5). The misfit the loop measures is, to second order, sum_{q,Omega} omega (I' - I)^2 with
omega = q^(d-1) / (4 I); its gradient in the intensity coefficients, preconditioned by the shell
metric omegabar = q^(d-1) / (4 Ibar) that the fit already solves exactly, gives the refinement

    c~ = c' - tau * H[ rho * (I' - I) ],   rho = Ibar / I clipped to [0, rho_max],
    c' <- the shell-metric fit of c~ (the same SVD),

with c' the fitted coefficients, I' the intensity they give and H the harmonic analysis
(``PointwiseRefinement``: steps, tau = step_size, rho_max = max_weight_ratio). For an angularly
flat intensity (rho = 1) c~ lies between c and its fit, whose fit is the fit itself, so the step
changes nothing there. One step with tau = 0.5 and rho_max = 3 keeps RAAR started at the solution
at 1.6e-3 after 400 iterations (benchmarks/bench_fxs_reconstruct.py --quality); it costs one
harmonic synthesis + analysis and one more fit per projection, and only in the modulus metric.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from xpr.fxs.extraction import projection_matrices_3d, projection_vectors_2d
from xpr.fxs.transforms import FourierTransformPair, angular_integral, integrate


@dataclass
class InvariantConstraint:
    """What the data say, on the reconstruction's reciprocal grid.

    projection_vectors: order -> V_l (N_q x rank) (2-D: v_n, N_q) for the constrained orders.
    q_masks: order -> bool (N_q): where the order is constrained.
    zeroth_order: I_0(q) from the average intensity (harmonic normalisation of the transforms), or None.
    odd_orders_to_zero: constrain odd orders to zero (where their q mask is set).
    data_q_mask: bool (N_q): where the amplitude modulus is replaced at all.
    fixed_phase_orders: 2-D only: orders n whose unknown phase is fixed, a_n := 0 (I_n = v_n)
        instead of fitted. The invariants fix each a_n only up to a common rotation of the
        particle (a rotation by b multiplies I_n by e^{-inb}); fixing one order's phase removes
        that freedom up to rotations by multiples of 2 pi / n (xFrame's SO_freedom).
    """

    projection_vectors: dict
    q_masks: dict
    zeroth_order: np.ndarray | None = None
    odd_orders_to_zero: bool = True
    data_q_mask: np.ndarray | None = None
    max_order: int = 0
    extra: dict = field(default_factory=dict)
    fixed_phase_orders: tuple = ()


@dataclass(frozen=True)
class PointwiseRefinement:
    """Refinement steps of the modulus-metric fit toward the pointwise metric (module docstring):
    steps (0: off), step_size tau, max_weight_ratio rho_max (the largest Ibar / I that counts)."""

    steps: int = 1
    step_size: float = 0.5
    max_weight_ratio: float = 3.0


def procrustes_unitary(V, I, xp=np):
    """U with orthonormal rows minimising ||V U - I||_F, batched: V (Q, r), I (B, Q, k) -> (B, r, k).

    U = W Z^dagger from the SVD V^dagger I = W S Z^dagger (stacked over the batch).
    """
    M = V.conj().T @ I                                                  # (B, r, k), BLAS
    W, _, Zh = xp.linalg.svd(M, full_matrices=False)
    return W @ Zh


def real_projection_matrix(V, rank_tolerance: float = 0.0) -> np.ndarray:
    """Real V_l with V_l V_l^T = B_l, from projection matrices of any column phases (3-D).

    In the real spherical-harmonic basis (below) a real intensity has real coefficients, so
    B_l = Re(V V^dagger) is real symmetric and its eigenvectors times sqrt(eigenvalue) are a real
    V_l; xFrame likewise keeps only the real part of its 3-D projection matrices. Columns whose
    eigenvalue is below rank_tolerance x the largest carry nothing B_l resolves (at
    rank_tolerance = the working precision's epsilon they are below its rounding) and are dropped,
    which shrinks the Procrustes SVDs from (2l+1)^2 to rank x (2l+1).

    The cut is never below n x eps(B) of the largest (n = len(B)): a symmetric eigensolver
    returns eigenvalues only to about n eps ||B||, so below that they are round-off whose value,
    and so whether such a column is kept, depends on the LAPACK build. (With a cut at eps alone,
    numpy 2.3+'s OpenBLAS 0.3.31 kept other noise columns than 2.2's 0.3.29, and the noise
    columns raised the modulus error of an exact solution from 2.6e-6 to 1.5e-5 on the 3-D test
    grid; with the n eps floor both give the same ranks and 3.1e-6.)
    """
    V = np.asarray(V)
    B = np.real(V @ V.conj().T)
    values, vectors = np.linalg.eigh((B + B.T) / 2)
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    largest = max(float(values[0]), 0.0) if len(values) else 0.0
    round_off = len(B) * float(np.finfo(B.dtype).eps)
    keep = values > max(max(rank_tolerance, round_off) * largest, 0.0)
    keep[0] = True                                   # one column at least (zero for zero data)
    return vectors[:, keep] * np.sqrt(np.clip(values[keep], 0, None))


class RealHarmonicOrder:
    """The m >= 0 coefficients c_l0 .. c_ll of one order of a real field, as the 2l+1 real
    coefficients of the real spherical-harmonic basis:

        x_0 = c_l0,   x_m = sqrt(2) Re c_lm,   x_{l+m} = sqrt(2) Im c_lm   (m = 1 .. l).

    With c_{l,-m} = s_m conj(c_lm) (|s_m| = 1) this map is orthogonal: sum_{|m|<=l} |c_lm|^2 =
    sum x^2, so B_l(q1, q2) = x(q1) . x(q2) and the Procrustes problem is real.
    """

    @staticmethod
    def pack(half_l, xp):
        """(l+1, B, Q) complex -> (2l+1, B, Q) real."""
        root2 = np.sqrt(2.0)
        return xp.concatenate([half_l[:1].real, root2 * half_l[1:].real, root2 * half_l[1:].imag])

    @staticmethod
    def unpack(x, xp):
        """(2l+1, B, Q) real -> (l+1, B, Q) complex."""
        l = (x.shape[0] - 1) // 2
        out = xp.empty((l + 1,) + x.shape[1:], dtype=xp.result_type(x.dtype, xp.complex64))
        out[0] = x[0]
        out[1:] = (x[1:l + 1] + 1j * x[l + 1:]) / np.sqrt(2.0)
        return out


def modulus_metric_weights(constraint: InvariantConstraint, reciprocal_radii, dimensions: int) -> np.ndarray:
    """w(q) = q^(d-1) / Ibar(q), normalised to max 1: the per-shell weights under which the
    Procrustes fit minimises the modulus error (module docstring). Ibar(q) is the average
    intensity: the zeroth order of the data if given, else sqrt(B_0(q, q)) = |V_0(q)|; without
    either, w = q^(d-1). Shells where Ibar < 1e-6 x its maximum count as 1e-6 x the maximum."""
    q = np.asarray(reciprocal_radii, float)
    weights = q ** (dimensions - 1)
    average = None
    if constraint.zeroth_order is not None:
        average = np.abs(np.asarray(constraint.zeroth_order, float))
    elif 0 in constraint.projection_vectors:
        v0 = np.asarray(constraint.projection_vectors[0])
        average = np.sqrt(np.sum(np.abs(v0.reshape(len(q), -1)) ** 2, axis=1))
    if average is not None and np.max(average) > 0:
        weights = weights / np.maximum(average, 1e-6 * np.max(average))
    return weights / np.max(weights)


def procrustes_fit_real(V, x, xp=np, weights=None):
    """V U with U (r x k, orthonormal rows) minimising sum_q w(q) ||(V U - X)_q||^2 for each
    repeat, all real (w = 1 without weights: the Frobenius norm).

    V (Q, r); x (k, B, Q), X_b = x[:, b, :]^T (Q x k). The overlap V^T D X_b (D = diag w) is one
    matrix product over the stacked batch; its SVD W S Z^T gives U = W Z^T (since U U^T = 1, the
    weighted misfit is a constant minus 2 tr(U^T V^T D X_b)); returns V U in x's layout (k, B, Q).
    """
    k, B, Q = x.shape
    weighted_V = V if weights is None else weights[:, None] * V
    overlap_t = (x.reshape(k * B, Q) @ weighted_V).reshape(k, B, -1)     # (k, B, r) = (V^T D X_b)^T
    Z, _, Wt = xp.linalg.svd(xp.transpose(overlap_t, (1, 0, 2)), full_matrices=False)   # (B, k, r)
    unitary_t = Z @ Wt                                                  # (B, k, r) = U^T
    fit = unitary_t @ V.T                                               # (B, k, Q) = (V U)^T
    return xp.transpose(fit, (1, 0, 2))


class OrderConstraints3D:
    """Per order l, what the projection does with the m >= 0 intensity coefficients c_lm (3-D):
    'average' (l = 0 from the average intensity), 'zero' (odd l) or 'fit' (Procrustes on a real
    V_l), each only where the order's q mask is set; on the device, prepared once."""

    def __init__(self, constraint: InvariantConstraint, max_order: int, backend, rank_tolerance=None):
        xp = backend.xp
        eps = float(np.finfo(backend.real_dtype).eps) if rank_tolerance is None else float(rank_tolerance)
        self.orders = []
        n_q = len(next(iter(constraint.q_masks.values()))) if constraint.q_masks else 1   # 1 broadcasts
        constrained = np.zeros((max_order + 1, max_order + 1, 1, n_q), bool)   # m, l, (batch), q
        for l in range(max_order + 1):
            mask = constraint.q_masks.get(l)
            if mask is None or not np.any(mask):
                continue
            mask_device = xp.asarray(np.asarray(mask, bool))
            if l == 0 and constraint.zeroth_order is not None:
                target = np.asarray(constraint.zeroth_order, float) * mask
                self.orders.append((l, "average", mask_device, xp.asarray(target, dtype=backend.real_dtype)))
            elif l % 2 == 1 and constraint.odd_orders_to_zero:
                self.orders.append((l, "zero", mask_device, None))
            elif l in constraint.projection_vectors:
                V = real_projection_matrix(constraint.projection_vectors[l], eps) * np.asarray(mask)[:, None]
                self.orders.append((l, "fit", mask_device, xp.asarray(V, dtype=backend.real_dtype)))
            else:
                continue
            constrained[:l + 1, l, 0] = np.asarray(mask, bool)
        self.constrained = xp.asarray(constrained)      # the m >= 0 coefficients the projection sets

    def change(self, half, xp=np, weights=None):
        """Change of the m >= 0 coefficients (L+1 [m], L+1 [l], B, Q) under the projection, the
        fits in the metric diag(weights) over q (None: the plain Frobenius norm)."""
        change = xp.zeros_like(half)
        for l, kind, mask, data in self.orders:
            current = half[:l + 1, l]                                    # (l+1, B, Q)
            if kind == "average":                                       # data: I_00(q)
                change[0, l] = xp.where(mask, data.astype(current.dtype) - current[0], 0)
                continue
            if kind == "zero":
                change[:l + 1, l] = xp.where(mask, -current, 0)
                continue
            fit = procrustes_fit_real(data, RealHarmonicOrder.pack(current, xp), xp, weights)
            fit = RealHarmonicOrder.unpack(fit, xp)
            change[:l + 1, l] = xp.where(mask, fit.astype(current.dtype) - current, 0)
        return change


def project_coefficients_2d(coefficients, constraint: InvariantConstraint, ms: np.ndarray, xp=np, weights=None):
    """Change of the intensity coefficients (M, B, Q), n in FFT order, under the projection.

    Per order n the target is v_n e^{i a_n} with a_n = arg(v_n^dagger D I_n) the best phase in
    the metric D = diag(weights) (1 without), or a_n = 0 for the orders in
    constraint.fixed_phase_orders.
    """
    change = xp.zeros_like(coefficients)
    for n in range(int(np.max(ms)) + 1):
        kind = order_kind_2d(n, constraint)
        if kind is None:
            continue
        mask = xp.asarray(constraint.q_masks[n])
        row = int(np.flatnonzero(ms == n)[0])
        current = coefficients[row]                                      # (B, Q)
        if kind == "average":
            target = xp.broadcast_to(xp.asarray(constraint.zeroth_order, dtype=current.dtype), current.shape)
        elif kind == "zero":
            target = xp.zeros_like(current)
        elif kind == "fixed phase":
            v = xp.asarray(constraint.projection_vectors[n], dtype=current.dtype) * mask
            target = xp.broadcast_to(v, current.shape)                   # a_n := 0 for every repeat
        else:
            v = xp.asarray(constraint.projection_vectors[n], dtype=current.dtype) * mask
            weighted = v if weights is None else v * weights
            overlap = xp.sum(weighted.conj() * current, axis=-1, keepdims=True)   # v^dagger D I_n per repeat
            phase = xp.where(xp.abs(overlap) > 0, overlap / xp.maximum(xp.abs(overlap), 1e-300), 1)
            target = v * phase
        change[row] = xp.where(mask, target - current, 0)
        if n > 0:
            negative = int(np.flatnonzero(ms == -n)[0])
            change[negative] = change[row].conj()                       # real intensity: I_-n = I_n^*
    return change


def order_kind_2d(n: int, constraint: InvariantConstraint):
    """What the projection does with order n >= 0 in 2-D: 'average' (n = 0 from the average
    intensity), 'zero' (odd n), 'fixed phase' (a_n := 0), 'fit' (the best phase), or None (not
    constrained: no q mask set, or no data for it)."""
    mask = constraint.q_masks.get(n)
    if mask is None or not np.any(mask):
        return None
    if n == 0 and constraint.zeroth_order is not None:
        return "average"
    if n % 2 == 1 and constraint.odd_orders_to_zero:
        return "zero"
    if n in constraint.projection_vectors:
        return "fixed phase" if n in constraint.fixed_phase_orders else "fit"
    return None


def constrained_rows_2d(constraint: InvariantConstraint, ms: np.ndarray) -> np.ndarray:
    """Bool (M, 1, Q), n in FFT order: the intensity coefficients project_coefficients_2d sets."""
    n_q = len(next(iter(constraint.q_masks.values()))) if constraint.q_masks else 1   # 1 broadcasts
    constrained = np.zeros((len(ms), 1, n_q), bool)
    for n in range(int(np.max(ms)) + 1):
        if order_kind_2d(n, constraint) is not None:
            constrained[ms == n, 0] = constrained[ms == -n, 0] = np.asarray(constraint.q_masks[n], bool)
    return constrained


class InvariantProjection:
    """P_M of FXS phasing: density batch -> (projected density batch, modulus error per repeat)."""

    def __init__(self, transform: FourierTransformPair, constraint: InvariantConstraint,
                 refinement: PointwiseRefinement = PointwiseRefinement()):
        self.transform = transform
        self.refinement = refinement
        self.constraint = constraint
        self.xp = transform.xp
        data_mask = constraint.data_q_mask
        if data_mask is None:
            data_mask = np.ones(transform.grid.n_radial, dtype=bool)
        self.data_q_mask = self.xp.asarray(data_mask)
        self._constrains_every_q = bool(np.all(data_mask))
        grid = transform.grid
        if grid.dimensions == 3:
            self.orders_3d = OrderConstraints3D(constraint, grid.max_order, transform.backend)
            self.constrained = self.orders_3d.constrained
        else:
            self.constrained = self.xp.asarray(constrained_rows_2d(constraint, transform.ms))
        weights = modulus_metric_weights(constraint, grid.reciprocal_radii, grid.dimensions)
        self._weights_by_metric = {"modulus": self.xp.asarray(weights, dtype=transform.backend.real_dtype),
                                   "intensity": None}
        self.fit_weights = self._weights_by_metric["modulus"]
        self.last_amplitude = None

    def use_metric(self, metric: str):
        """Metric of the Procrustes fits from now on: 'modulus' (the weights w(q) of the module
        docstring; the default) or 'intensity' (the plain Frobenius fit of I_lm, xFrame's)."""
        self.fit_weights = self._weights_by_metric[metric]

    def project_intensity(self, intensity):
        """Projected intensity I' (real, same layout) of an intensity: the fit of its constrained
        harmonic coefficients, refined toward the pointwise metric in the modulus metric (module
        docstring)."""
        xp = self.xp
        coefficients = self._coefficients(intensity)
        change = self._change(coefficients)
        steps = self.refinement.steps if self.fit_weights is not None else 0
        if steps:
            ratio = self._weight_ratio(intensity)
            for _ in range(steps):
                gradient = self._coefficients(ratio * self._field(change, intensity.dtype))   # H[rho (I' - I)]
                moved = xp.where(self.constrained, change - self.refinement.step_size * gradient, 0)
                change = moved + self._change(coefficients + moved)     # fit of c~, relative to c
        return intensity + self._field(change, intensity.dtype)

    def _coefficients(self, field):
        """Harmonic coefficients of a real field: the m >= 0 half in 3-D, every n in 2-D."""
        t = self.transform
        return t.harmonic_half_of_real(field) if t.grid.dimensions == 3 else t.real_harmonic_coefficients(field)

    def _field(self, coefficients, dtype):
        t = self.transform
        field = t.real_field_of_half(coefficients) if t.grid.dimensions == 3 else t.real_inverse_harmonic(coefficients)
        return field.astype(dtype)

    def _change(self, coefficients):
        """Fit minus coefficients on the constrained entries (0 elsewhere), in the current metric."""
        if self.transform.grid.dimensions == 3:
            return self.orders_3d.change(coefficients, self.xp, self.fit_weights)
        return project_coefficients_2d(coefficients, self.constraint, self.transform.ms, self.xp, self.fit_weights)

    def _weight_ratio(self, intensity):
        """rho = Ibar(q) / I(q, Omega) per repeat, clipped to [0, max_weight_ratio]."""
        xp, grid = self.xp, self.transform.grid
        average = angular_integral(intensity, grid, xp) / (2 * np.pi if grid.dimensions == 2 else 4 * np.pi)
        largest = self.refinement.max_weight_ratio
        floor = xp.maximum(intensity, average / largest)
        return xp.where(floor > 0, average / xp.where(floor > 0, floor, 1), 0).astype(intensity.dtype)

    def project_amplitude(self, amplitude):
        """Amplitude with its modulus replaced by sqrt(I') where the data are, and the modulus error."""
        xp = self.xp
        modulus = xp.abs(amplitude)
        scratch = modulus * modulus                                       # |A|^2, later reused
        projected = self.project_intensity(scratch)
        new_modulus = xp.sqrt(xp.maximum(projected, 0, out=projected), out=projected)   # |A'|
        if not self._constrains_every_q:
            new_modulus = xp.where(self.data_q_mask, new_modulus, modulus)
        lost = modulus == 0                                               # no phase there: take A' real
        any_lost = bool(xp.any(lost))
        factor = new_modulus / (xp.where(lost, 1, modulus) if any_lost else modulus)
        new = amplitude * factor
        if any_lost:
            new = xp.where(lost & self.data_q_mask, new_modulus.astype(amplitude.dtype), new)
        grid = self.transform.grid
        difference = xp.subtract(modulus, new_modulus, out=scratch)
        mismatch = integrate(xp.multiply(difference, difference, out=difference), grid, "reciprocal", xp)
        norm = integrate(xp.multiply(new_modulus, new_modulus, out=factor), grid, "reciprocal", xp)
        e_mod = xp.sqrt(mismatch / xp.maximum(norm, 1e-30))
        return new, e_mod

    def __call__(self, density):
        amplitude = self.transform.forward(density)
        new, e_mod = self.project_amplitude(amplitude)
        self.last_amplitude = new
        return self.transform.real_inverse(new).astype(density.dtype), e_mod


class KnownIntensityProjection:
    """P_M for a known intensity I(q, Omega) on the grid: the limit of FXS phasing in which every
    U_l is known (plain CDI on the spherical / polar grid). A -> sqrt(I) A / |A| (A' = sqrt(I)
    where |A| = 0), with the modulus error of InvariantProjection. It is the reference that
    separates what the grid, the transforms and the real-space steps do from what the invariant
    projection does: started at a solution, RAAR, HIO and ER stay there with this projection
    (tests/fxs/test_reciprocal_projection.py, benchmarks/bench_fxs_reconstruct.py --quality)."""

    def __init__(self, transform: FourierTransformPair, intensity):
        self.transform = transform
        self.xp = transform.xp
        self.modulus = self.xp.sqrt(self.xp.maximum(self.xp.asarray(intensity), 0))
        self.last_amplitude = None

    def use_metric(self, metric: str):
        """No fit, so no metric: accepted for the phasing loop's per-algorithm switch."""

    def __call__(self, density):
        xp, grid = self.xp, self.transform.grid
        amplitude = self.transform.forward(density)
        modulus = xp.abs(amplitude)
        lost = modulus == 0
        new = xp.where(lost, self.modulus.astype(amplitude.dtype), amplitude * (self.modulus / xp.where(lost, 1, modulus)))
        mismatch = integrate((modulus - self.modulus) ** 2, grid, "reciprocal", xp)
        norm = integrate(xp.broadcast_to(self.modulus ** 2, modulus.shape), grid, "reciprocal", xp)
        self.last_amplitude = new
        return self.transform.real_inverse(new).astype(density.dtype), xp.sqrt(mismatch / xp.maximum(norm, 1e-30))


def constraint_from_density(density, transform: FourierTransformPair):
    """Exact invariant data of one density (*angular, N) on the transform's grid, as extract makes
    them from data: B_l of its intensity and V_l from their eigen-decomposition
    (``extraction.projection_matrices_3d`` / ``projection_vectors_2d``), every q constrained,
    order 0 from I_00 (the average intensity). Returns (constraint, B_l)."""
    xp, d = transform.xp, transform.grid.dimensions
    intensity = xp.abs(transform.forward(xp.asarray(density)[..., None, :])) ** 2
    coefficients = transform.backend.asnumpy(transform.real_harmonic_coefficients(intensity))[..., 0, :]
    coefficients = coefficients.astype(np.complex128)               # B_l ~ |I|^2 overflows float32
    invariants = invariants_from_coefficients(coefficients, d, transform.ms)
    vectors = projection_matrices_3d(invariants) if d == 3 else projection_vectors_2d(invariants)
    n_q = transform.grid.n_radial
    zeroth = (coefficients[0, 0] if d == 3 else coefficients[0]).real
    constraint = InvariantConstraint(dict(enumerate(vectors)), {l: np.ones(n_q, bool) for l in range(len(vectors))},
                                     zeroth_order=zeroth, max_order=transform.grid.max_order)
    return constraint, invariants


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
