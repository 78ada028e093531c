"""Fourier transforms of densities on polar (2-D) and spherical (3-D) phasing grids.

FXS data constrain the intensity through its angular harmonics, so the phasing iterates on grids
where harmonics are natural: a radial midpoint grid times a polar angle grid (2-D) or a
Gauss-Legendre x equispaced (theta, phi) grid (3-D).

Grids (``grids``: PhasingGrid, build_grid; xFrame's conventions). Reciprocal radii
q_k = (k + 1/2) Q / N, real radii r_k = (k + 1/2) R / N with the reciprocity relation Q R = pi N,
so that dr dq = pi / N.

Fourier transform (as xpr's fxs data side, docs/fxs.md): A(q) = Int rho(x) exp(-i q.x) dx. Expanding
the density in angular harmonics, rho(r, Omega) = sum_lm rho_lm(r) Y_lm(Omega) (3-D, orthonormal
Y_lm with the Condon-Shortley phase) or rho(r, phi) = sum_n rho_n(r) e^{i n phi} (2-D), the plane
wave expansion turns the transform into one Hankel transform per order:

    3-D  A_lm(q) = 4 pi (-i)^l Int rho_lm(r) j_l(q r) r^2 dr,   rho_lm(r) = i^l / (2 pi^2) Int A_lm j_l q^2 dq
    2-D  A_n(q)  = 2 pi (-i)^n Int rho_n(r)  J_n(q r) r dr,      rho_n(r)  = i^n / (2 pi)    Int A_n J_n q dq

(xFrame's files use the unitary transform, (2 pi)^(-d/2) times this one: densities phased from
them come out (2 pi)^(-d/2) times the scale of densities phased from xpr's files.)

The forward integrals are the midpoint rule on the grid (exactly unitary for l = 0, where it is a
DST-IV; 2-D order 0 end-corrected); each inverse is the pseudo-inverse of its forward in the
Parseval metric, so that density -> amplitude -> density is an orthogonal projection (see below).

Harmonic transforms are done here as an FFT over phi followed (3-D) by one matrix product per m
with the normalised associated Legendre functions times the Gauss-Legendre weights. Everything is
batched: real-space arrays have the layout (phi, theta, repeat, r) in 3-D and (phi, repeat, r) in
2-D, coefficient arrays (m, l, repeat, r) and (m, repeat, r), m in FFT order (0..L, -L..-1). With
this layout every step is one FFT along the first axis or one stacked matrix product, on numpy or
cupy alike.

What the phasing loop transforms is real (densities, intensities) or the amplitude of a real
density, so in 3-D it works on the m >= 0 half of the coefficients, (L+1 [m], L+1 [l], repeat, r):

    real field      c_{l,-m} = s_m conj(c_lm)                 (s_m = (-1)^m, Condon-Shortley)
    its amplitude   A_{l,-m} = s_m (-1)^l conj(A_lm)          (the Hankel phase (-i)^l squared)

and only the Legendre rows and Hankel products that exist (l >= m). The amplitude's phi spectrum
is rebuilt from the even-l and odd-l Legendre sums E_m, O_m (row m: E_m + O_m, row -m:
conj(E_m - O_m)); the real part of a density comes from the folded spectrum
(F_m +- conj(F_-m)) / 2 analysed with the even and odd rows. Each step is thus a quarter of the
products of the full complex transforms (fxs_reconstruct.md has the derivation).
"""
from __future__ import annotations

import contextlib

import numpy as np
from scipy import special

from xpr.fxs.grids import PhasingGrid


def blas_threads(n: int = 1):
    """Context limiting BLAS threads. The transforms are stacks of small matrix products, which
    multi-threaded BLAS slows down (13x measured on a busy 2-core machine); parallelism comes from
    processes and batches instead."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:                       # optional: without it BLAS keeps its own threading
        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")



def m_values(max_order: int) -> np.ndarray:
    """Harmonic orders m (or n in 2-D) in FFT order: 0..L, -L..-1."""
    return np.concatenate([np.arange(max_order + 1), np.arange(-max_order, 0)])


def legendre_table(max_order: int, thetas: np.ndarray) -> np.ndarray:
    """P[m, l, t] = Y_lm(theta_t, phi=0): normalised associated Legendre functions, 0 for l < |m|."""
    ms = m_values(max_order)
    ls = np.arange(max_order + 1)
    table = np.zeros((len(ms), max_order + 1, len(thetas)))
    for i, m in enumerate(ms):
        valid = ls >= abs(m)
        table[i, valid] = special.sph_harm_y(ls[valid, None], m, thetas[None, :], 0.0).real
    return table



class FourierTransformPair:
    """Harmonic + Hankel transforms between densities and amplitudes on a PhasingGrid.

    backend: an xpr.backend.Backend (numpy/cupy, FFTs, dtypes).
    """

    def __init__(self, grid: PhasingGrid, backend):
        self.grid = grid
        self.backend = backend
        xp = backend.xp
        self.xp = xp
        L = grid.max_order
        self.ms = m_values(L)
        self.n_phi = len(grid.phis)
        self.m_slots = xp.asarray(self.ms % self.n_phi)
        cdtype = backend.complex_dtype
        r, q = grid.real_radii, grid.reciprocal_radii
        qr = q[:, None] * r[None, :]
        if grid.dimensions == 3:
            table = legendre_table(L, grid.thetas)                           # (M, L+1, T)
            analysis = table * grid.theta_weights[None, None, :] * (2 * np.pi / self.n_phi)
            orders = np.arange(L + 1)
            bessel = special.spherical_jn(orders[:, None, None], qr[None])  # (L+1, Q, R)
            forward = 4 * np.pi * bessel * (r ** 2 * grid.dr)[None, None, :]
            phase_forward = (-1j) ** orders
        else:
            orders = self.ms
            bessel = special.jv(orders[:, None, None], qr[None])            # (M, Q, R)
            forward = 2 * np.pi * bessel * (r * grid.dr)[None, None, :]
            # n = 0: the integrand rho_0(r) J_0(qr) r has a non-zero slope at r = 0, which costs
            # the midpoint rule O(h^2); the Euler-Maclaurin term -h^2/24 g'(0), with
            # g'(0) = rho_0(0) extrapolated as (9 rho_0(r_0) - rho_0(r_1))/8, restores O(h^4)
            zero = int(np.flatnonzero(orders == 0)[0])
            if len(r) > 1:
                forward[zero, :, :2] += 2 * np.pi * np.array([-9.0, 1.0]) * grid.dr ** 2 / 192
            phase_forward = (-1j) ** orders.astype(float)
        # The midpoint inverse is not the inverse of the midpoint forward for l > 0: near r = 0 and
        # q = 0 the Bessel functions of high order vanish, so a few radial profiles carry (almost)
        # no amplitude and K_l H_l has singular values from 0 to ~1.9; iterated, that amplifies
        # them. The inverse used is therefore the pseudo-inverse of the forward in the Parseval
        # metric (weights r^{d-1} dr and q^{d-1} dq): K_l H_l is then the orthogonal projection
        # onto the profiles the grid can carry, exact on them (round trips of well-sampled
        # densities are unchanged), and the null profiles are removed rather than amplified.
        inverse = self._pseudo_inverse(forward, r ** (grid.dimensions - 1) * grid.dr,
                                       q ** (grid.dimensions - 1) * grid.dq)
        # Real matrices (orders, out, in) act on complex coefficients viewed as interleaved real
        # pairs (half the work of complex products); the phases (-i)^l, i^l are applied apart.
        rdtype = backend.real_dtype
        self.hankel_forward = xp.ascontiguousarray(xp.asarray(forward, dtype=rdtype))     # (orders, Q, R)
        self.hankel_inverse = xp.ascontiguousarray(xp.asarray(inverse, dtype=rdtype))     # (orders, R, Q)
        self.phase_forward = xp.asarray(phase_forward, dtype=cdtype)
        self.phase_inverse = xp.asarray(np.conj(phase_forward), dtype=cdtype)
        # Real fields (densities, intensities) have c_{l,-m} = s_m conj(c_lm) with s_m the ratio of
        # the Legendre rows -m and m ((-1)^m with the Condon-Shortley phase; read off the table):
        # their transforms need only m >= 0 (a real FFT and half the Legendre products).
        self.negative_m_sign = np.ones(L + 1)
        if grid.dimensions == 3:
            self.synthesis_matrix = xp.ascontiguousarray(xp.asarray(np.transpose(table, (0, 2, 1)), dtype=rdtype))
            self.analysis_matrix = xp.ascontiguousarray(xp.asarray(analysis, dtype=rdtype))
            for m in range(1, L + 1):
                self.negative_m_sign[m] = np.sign(np.sum(table[m] * table[len(self.ms) - m]))
            self.synthesis_matrix_nonnegative = self.synthesis_matrix[:L + 1]
            self.analysis_matrix_nonnegative = self.analysis_matrix[:L + 1]
            self._legendre_blocks(L)
        self._negative_sign = xp.asarray(self.negative_m_sign[1:][::-1], dtype=rdtype)   # rows -L..-1

    def _legendre_blocks(self, L):
        """Per m >= 0 the Legendre rows that exist (l >= m), all together and split by the parity
        of l, as contiguous matrices: the half-spectrum transforms multiply only these."""
        xp = self.xp
        analysis, synthesis = self.analysis_matrix_nonnegative, self.synthesis_matrix_nonnegative
        self._analysis_blocks, self._synthesis_blocks = [], []
        self._analysis_parity_blocks, self._synthesis_parity_blocks = [], []
        for m in range(L + 1):
            rows = slice(m, L + 1)
            self._analysis_blocks.append((rows, xp.ascontiguousarray(analysis[m, rows, :])))
            self._synthesis_blocks.append((rows, xp.ascontiguousarray(synthesis[m, :, rows])))
            by_parity_a, by_parity_s = [], []
            for parity in (0, 1):
                start = m if m % 2 == parity else m + 1
                if start > L:
                    continue
                rows = slice(start, L + 1, 2)
                by_parity_a.append((parity, rows, xp.ascontiguousarray(analysis[m, rows, :])))
                by_parity_s.append((parity, rows, xp.ascontiguousarray(synthesis[m, :, rows])))
            self._analysis_parity_blocks.append(by_parity_a)
            self._synthesis_parity_blocks.append(by_parity_s)

    def _analysis_half(self, spectrum, odd_spectrum=None):
        """c[m, l] = sum_t a_lm(t) X_m(t) for 0 <= m <= l: (L+1, T, ...) FFT rows m -> (L+1, L+1, ...).
        With odd_spectrum, X is `spectrum` for even l and `odd_spectrum` for odd l."""
        xp = self.xp
        Lp1, T = spectrum.shape[:2]
        rest = spectrum.shape[2:]
        out = xp.zeros((Lp1, Lp1) + rest, dtype=self.backend.complex_dtype)
        for m in range(Lp1):
            if odd_spectrum is None:
                rows, matrix = self._analysis_blocks[m]
                out[m, rows] = self._real_matmul(matrix, spectrum[m].reshape(T, -1)).reshape((-1,) + rest)
                continue
            for parity, rows, matrix in self._analysis_parity_blocks[m]:
                source = spectrum if parity == 0 else odd_spectrum
                out[m, rows] = self._real_matmul(matrix, source[m].reshape(T, -1)).reshape((-1,) + rest)
        return out

    def _synthesis_half(self, coefficients, by_parity=False):
        """v_m(t) = sum_{l >= m} P_lm(t) c[m, l] for m = 0..L: (L+1, L+1, ...) -> (L+1, T, ...);
        by_parity: the sums over even and over odd l apart."""
        xp = self.xp
        Lp1 = coefficients.shape[0]
        rest = coefficients.shape[2:]
        T = self.synthesis_matrix.shape[1]
        shape = (Lp1, T) + rest
        if not by_parity:
            out = xp.empty(shape, dtype=self.backend.complex_dtype)
            for m in range(Lp1):
                rows, matrix = self._synthesis_blocks[m]
                out[m] = self._real_matmul(matrix, coefficients[m, rows].reshape(matrix.shape[1], -1)).reshape((T,) + rest)
            return out
        even = xp.zeros(shape, dtype=self.backend.complex_dtype)
        odd = xp.zeros(shape, dtype=self.backend.complex_dtype)
        for m in range(Lp1):
            for parity, rows, matrix in self._synthesis_parity_blocks[m]:
                target = even if parity == 0 else odd
                target[m] = self._real_matmul(matrix, coefficients[m, rows].reshape(matrix.shape[1], -1)).reshape((T,) + rest)
        return even, odd

    @staticmethod
    def _pseudo_inverse(forward, real_weights, reciprocal_weights, rcond=0.5):
        sqrt_r, sqrt_q = np.sqrt(real_weights), np.sqrt(reciprocal_weights)
        out = np.empty(forward.shape[:1] + forward.shape[:0:-1], dtype=forward.dtype)
        for k, H in enumerate(forward):
            scaled = sqrt_q[:, None] * H / sqrt_r[None, :]
            out[k] = np.linalg.pinv(scaled, rcond=rcond) * sqrt_q[None, :] / sqrt_r[:, None]
        return out

    # --- helpers -----------------------------------------------------------------------------
    def _real_matmul(self, matrix, values):
        """matrix (..., a, b) real @ values (..., b, X) complex, via the interleaved real view."""
        xp = self.xp
        values = xp.ascontiguousarray(values, dtype=self.backend.complex_dtype)
        shape = values.shape
        as_real = values.view(self.backend.real_dtype).reshape(shape[:-1] + (2 * shape[-1],))
        out = xp.ascontiguousarray(matrix @ as_real)
        return out.view(self.backend.complex_dtype).reshape(out.shape[:-1] + (shape[-1],))

    # --- harmonic transforms -----------------------------------------------------------------
    def harmonic(self, field):
        """Angular harmonic coefficients: 3-D (M, L+1, B, N) from (P, T, B, N); 2-D (M, B, N) from (P, B, N)."""
        spectrum = self.backend.fft(field, axis=0)[self.m_slots]
        if self.grid.dimensions == 2:
            return spectrum / self.n_phi
        M, T = spectrum.shape[:2]
        coefficients = self._real_matmul(self.analysis_matrix, spectrum.reshape(M, T, -1))
        return coefficients.reshape((M, -1) + spectrum.shape[2:])

    def harmonic_half_of_real(self, field):
        """The m >= 0 half of harmonic() for a real field (real FFT): 3-D (L+1, L+1, B, N), 2-D (L+1, B, N).

        The rest follows from c_{l,-m} = s_m conj(c_lm); rows m = 0 are real."""
        L = self.grid.max_order
        half = self.backend.rfft(field, axis=0)[:L + 1]
        if self.grid.dimensions == 2:
            return half / self.n_phi
        return self._analysis_half(half)

    def harmonic_of_real(self, field):
        """harmonic() of a real field, from its m >= 0 half (real FFT); same output layout."""
        xp = self.xp
        L = self.grid.max_order
        positive = self.harmonic_half_of_real(field)
        out = xp.empty((2 * L + 1,) + positive.shape[1:], dtype=positive.dtype)
        out[:L + 1] = positive
        sign = self._negative_sign.reshape((L,) + (1,) * (positive.ndim - 1))
        out[L + 1:] = sign * positive[L:0:-1].conj()
        return out

    def real_field_of_half(self, positive):
        """The real field whose m >= 0 coefficients are `positive` (layout of harmonic_half_of_real;
        the imaginary parts of the m = 0 rows are ignored): Legendre synthesis and an inverse real FFT."""
        xp = self.xp
        L = self.grid.max_order
        if self.grid.dimensions == 2:
            values = positive * self.n_phi
        else:
            values = self._synthesis_half(positive) * self.n_phi
        spectrum = xp.zeros((self.n_phi // 2 + 1,) + values.shape[1:], dtype=values.dtype)
        spectrum[:L + 1] = values
        spectrum[0] = spectrum[0].real
        return self.backend.irfft(spectrum, axis=0, n=self.n_phi)

    def real_inverse_harmonic(self, coefficients):
        """Re(inverse_harmonic(coefficients)), from the Hermitian part of the m >= 0 half (inverse real FFT)."""
        L = self.grid.max_order
        positive = coefficients[:L + 1].copy()
        sign = self._negative_sign.reshape((L,) + (1,) * (coefficients.ndim - 1))
        positive[1:] += sign[::-1] * coefficients[:L:-1].conj()          # rows -1..-L for m = 1..L
        positive[1:] *= 0.5
        return self.real_field_of_half(positive)

    def inverse_harmonic(self, coefficients):
        """Field on the angular grid from harmonic coefficients (complex)."""
        xp = self.xp
        if self.grid.dimensions == 2:
            values = coefficients * self.n_phi
        else:
            M, Lp1 = coefficients.shape[:2]
            values = self._real_matmul(self.synthesis_matrix, coefficients.reshape(M, Lp1, -1))
            values = values.reshape((M, -1) + coefficients.shape[2:]) * self.n_phi
        spectrum = xp.zeros((self.n_phi,) + values.shape[1:], dtype=values.dtype)
        spectrum[self.m_slots] = values
        return self.backend.ifft(spectrum, axis=0)

    # --- Hankel transforms -------------------------------------------------------------------
    def _apply_per_order(self, coefficients, matrices, phases):
        """Per order k: out[k] = phase_k * (matrices[k] @ profiles[k]) over the radial axis."""
        xp = self.xp
        if self.grid.dimensions == 2:                                    # (M, B, N)
            profiles = xp.transpose(coefficients, (0, 2, 1))             # (M, N, B)
            out = self._real_matmul(matrices, profiles) * phases[:, None, None]
            return xp.ascontiguousarray(xp.transpose(out, (0, 2, 1)))
        return self._apply_per_order_3d(coefficients, matrices, phases)

    def _apply_per_order_3d(self, coefficients, matrices, phases):
        """3-D: out[m, l] = phase_l * matrices[l] @ coefficients[m, l] (radial axis), for |m| <= l only.

        coefficients: (M, L+1, B, N), m in FFT order (full) or m = 0..L (M = L+1, half). Y_lm
        exists only for |m| <= l, so each order multiplies just its 2l+1 (half: l+1) columns: half
        the products of one stacked matrix product over all m."""
        xp = self.xp
        M, Lp1, B, N = coefficients.shape
        rdtype, cdtype = self.backend.real_dtype, self.backend.complex_dtype
        profiles = xp.ascontiguousarray(xp.transpose(coefficients, (1, 3, 0, 2)), dtype=cdtype)  # (l, N, m, B)
        real = profiles.view(rdtype).reshape(Lp1, N, 2 * M * B)
        n_out = matrices.shape[1]
        out = xp.zeros((Lp1, n_out, 2 * M * B), dtype=rdtype)
        for l in range(Lp1):
            positive = 2 * B * (l + 1)                                   # columns of m = 0..l
            out[l, :, :positive] = matrices[l] @ real[l, :, :positive]
            if M > Lp1 and l > 0:                                        # m = -l..-1 at the end
                negative = 2 * B * (M - l)
                out[l, :, negative:] = matrices[l] @ real[l, :, negative:]
        out = out.view(cdtype).reshape(Lp1, n_out, M, B) * phases[:, None, None, None]
        return xp.ascontiguousarray(xp.transpose(out, (2, 0, 3, 1)))

    def hankel(self, coefficients):
        return self._apply_per_order(coefficients, self.hankel_forward, self.phase_forward)

    def inverse_hankel(self, coefficients):
        return self._apply_per_order(coefficients, self.hankel_inverse, self.phase_inverse)

    def _amplitude_of_half(self, half):
        """Amplitude field of a real density from its m >= 0 coefficients. With E_m, O_m the
        Legendre sums over even and odd l, row m of the phi spectrum is E_m + O_m and row -m is
        conj(E_m - O_m) (from A_{l,-m} = s_m (-1)^l conj(A_lm) and P_{l,-m} = s_m P_lm)."""
        xp = self.xp
        L = self.grid.max_order
        even, odd = self._synthesis_half(half, by_parity=True)
        spectrum = xp.zeros((self.n_phi,) + even.shape[1:], dtype=self.backend.complex_dtype)
        spectrum[:L + 1] = even + odd
        spectrum[self.n_phi - L:] = (even[L:0:-1] - odd[L:0:-1]).conj()
        spectrum *= self.n_phi
        return self.backend.ifft(spectrum, axis=0, overwrite_x=True)

    def _real_part_half_of_field(self, field):
        """m >= 0 half of the amplitude coefficients whose inverse Hankel gives Re(density), from the
        phi spectrum F of the amplitude field. That half is (A_lm + (-1)^l s_m conj(A_{l,-m})) / 2,
        which needs only G+-_m = (F_m +- conj(F_-m)) / 2 analysed with the even (+) and odd (-) l rows."""
        xp = self.xp
        L = self.grid.max_order
        spectrum = self.backend.fft(field, axis=0)
        positive = spectrum[:L + 1]
        negative = xp.concatenate([spectrum[:1], spectrum[:self.n_phi - L - 1:-1]]).conj()   # conj F_-m, m = 0..L
        plus = (positive + negative) * 0.5
        minus = (positive - negative) * 0.5
        return self._analysis_half(plus, minus)

    # --- full transforms ---------------------------------------------------------------------
    def forward(self, density):
        """Amplitude A(q, angles) of a density (same layout)."""
        xp = self.xp
        if xp.iscomplexobj(density):
            return self.inverse_harmonic(self.hankel(self.harmonic(density.astype(self.backend.complex_dtype))))
        density = density.astype(self.backend.real_dtype)
        if self.grid.dimensions == 3:                  # m >= 0 half through the Hankel step
            half = self._apply_per_order_3d(self.harmonic_half_of_real(density), self.hankel_forward,
                                            self.phase_forward)
            return self._amplitude_of_half(half)
        return self.inverse_harmonic(self.hankel(self.harmonic_of_real(density)))

    def inverse(self, amplitude):
        """Density (complex) of an amplitude."""
        return self.inverse_harmonic(self.inverse_hankel(self.harmonic(amplitude)))

    def real_harmonic_coefficients(self, field):
        """Harmonic coefficients of a real field (e.g. an intensity)."""
        return self.harmonic_of_real(self.xp.real(field).astype(self.backend.real_dtype))

    def real_inverse(self, amplitude):
        """Re(inverse(amplitude)): the real part of the density of an amplitude."""
        if self.grid.dimensions == 3:                  # fold to the m >= 0 half before the Hankel step
            half = self._real_part_half_of_field(amplitude)
            return self.real_field_of_half(self._apply_per_order_3d(half, self.hankel_inverse, self.phase_inverse))
        return self.real_inverse_harmonic(self.inverse_hankel(self.harmonic(amplitude)))

    def order_of_coefficients(self) -> np.ndarray:
        """For 3-D: l of axis 1; for 2-D: n of axis 0."""
        return np.arange(self.grid.max_order + 1) if self.grid.dimensions == 3 else self.ms


def integrate(values, grid: PhasingGrid, space: str, xp=np):
    """Integral over the grid of each repeat: values (*angular, B, N) real -> (B,).

    The weights factor into angular x radial ones, so the sum is two contractions (BLAS, in the
    values' precision) and no full-grid weight array or temporary is made.
    """
    radii, step = (grid.real_radii, grid.dr) if space == "real" else (grid.reciprocal_radii, grid.dq)
    radial = xp.asarray(radii ** (grid.dimensions - 1) * step, dtype=values.dtype)
    return angular_integral(values, grid, xp) @ radial


def angular_integral(values, grid: PhasingGrid, xp=np):
    """Integral over the angles on each shell: values (*angular, B, N) real -> (B, N) (one
    contraction, in the values' precision)."""
    n_angular = len(grid.angular_shape)
    angular = xp.asarray(grid.angular_weights(), dtype=values.dtype)
    return xp.tensordot(angular, values, axes=(tuple(range(n_angular)), tuple(range(n_angular))))
