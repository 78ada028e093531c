"""Alignment of FXS reconstructions: centring, rotation (+ point inversion / mirror), PRTF.

FXS invariants determine a density only up to a shift, a rotation and the point inversion
rho(x) -> rho(-x) (in 2-D the inversion is the rotation by pi; a mirror is tested on request).
Reconstructions are brought into one frame before averaging:

1. Centring: each density is shifted so that its centre of mass lies at the origin.
   Shifting a density on a polar/spherical grid is an interpolation of rho(x + c); here linear in
   r and (3-D) theta, periodic in phi (scipy.ndimage.map_coordinates).
2. Rotation, by a Fourier method on the angular harmonics of the centred densities over a chosen
   range of radii (r_limit_ids):
   2-D  C(a) = sum_n [sum_r w_r f_n(r) g_n(r)^*] e^{i n a}: one zero-padded inverse FFT gives C on
        a fine angle grid; its maximum is the rotation.
   3-D  C(R) = <f, Lambda_R g> = sum_l sum_mm' f_lm^* D^l_mm'(R) g_lm' with the Wigner matrices
        D^l_mm'(a, b, c) = e^{-i m a} d^l_mm'(b) e^{-i m' c} (Lambda_R g(x) = g(R^-1 x),
        R = R_z(a) R_y(b) R_z(c)); for each b on a grid the sums over l give S_mm'(b) and one 2-D
        FFT over (m, m') gives C on the (a, c) grid (Kostelec & Rockmore's SO(3) correlation).
        The best grid points are refined by a local maximisation of C. The Wigner small-d
        matrices come from the eigen-decomposition of J_y: d^l(b) = exp(-i b J_y).
   The point inversion multiplies g_lm by (-1)^l (g_n by (-1)^n); both candidates are tested.
3. Normalisation to the maximum or the mean, and the phase-retrieval transfer function
   PRTF(q) = sqrt( <|mean_i A_i|^2>_angles / <mean_i |A_i|^2>_angles ) of the aligned set.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, optimize

from xpr.fxs.grids import PhasingGrid


# ----------------------------------------------------------------------------------------------
# resampling a density under a rigid motion
# ----------------------------------------------------------------------------------------------

def _fractional_indices(grid: PhasingGrid, points: np.ndarray, pad: int):
    """Map Cartesian points (..., d) to fractional (phi[, theta], r) indices of the padded grid."""
    r = np.linalg.norm(points, axis=-1)
    r_index = r / grid.dr - 0.5
    n_phi = len(grid.phis)
    if grid.dimensions == 2:
        phi = np.mod(np.arctan2(points[..., 1], points[..., 0]), 2 * np.pi)
        return [phi / (2 * np.pi / n_phi) + pad, r_index]
    theta = np.arccos(np.clip(points[..., 2] / np.maximum(r, 1e-300), -1, 1))
    phi = np.mod(np.arctan2(points[..., 1], points[..., 0]), 2 * np.pi)
    theta_index = np.interp(theta, grid.thetas, np.arange(len(grid.thetas)))
    return [phi / (2 * np.pi / n_phi) + pad, theta_index, r_index]


def resample(density: np.ndarray, grid: PhasingGrid, points: np.ndarray, order: int = 1) -> np.ndarray:
    """Values of a density (*angular, N) at Cartesian points (..., d), interpolated."""
    pad = 3
    padded = np.concatenate([density[-pad:], density, density[:pad]], axis=0)  # periodic in phi
    coordinates = _fractional_indices(grid, points, pad)
    values = ndimage.map_coordinates(padded, [c.ravel() for c in coordinates], order=order, mode="nearest")
    outside = np.linalg.norm(points, axis=-1).ravel() > grid.max_r
    values[outside] = 0.0
    return values.reshape(points.shape[:-1])


def rigid_motion(density: np.ndarray, grid: PhasingGrid, rotation=None, shift=None, order: int = 1):
    """rho'(x) = rho(R^T x - shift'): the density rotated by R about the origin, then moved by shift.

    shift is applied after the rotation: rho'(x) = rho(R^T (x - shift)).
    """
    points = grid.cartesian_points("real")
    if shift is not None:
        points = points - np.asarray(shift)
    if rotation is not None:
        points = points @ np.asarray(rotation)           # R^T x for row vectors
    return resample(density, grid, points, order)


def centre_of_mass(density: np.ndarray, grid: PhasingGrid) -> np.ndarray:
    weights = grid.volume_weights("real")[..., 0, :]
    points = grid.cartesian_points("real")
    mass = np.sum(density * weights)
    return np.tensordot(density * weights, points, axes=density.ndim) / mass


def fourier_shift(density: np.ndarray, transform, shift) -> np.ndarray:
    """rho(x - shift) without interpolation: the amplitude times exp(-i q.shift), transformed back."""
    xp = transform.xp
    q = transform.grid.cartesian_points("reciprocal")
    ramp = np.exp(-1j * (q @ np.asarray(shift, dtype=float)))[..., None, :]
    amplitude = transform.forward(xp.asarray(density[..., None, :]))
    moved = transform.inverse(amplitude * xp.asarray(ramp, dtype=amplitude.dtype))
    return transform.backend.asnumpy(moved).real[..., 0, :]


def centre(density: np.ndarray, grid: PhasingGrid, transform=None):
    """Density shifted so that its centre of mass is at the origin, and the shift applied.

    With a transform the shift is a Fourier phase ramp (exact for the band-limited density);
    without, an interpolation.
    """
    com = centre_of_mass(density, grid)
    if transform is not None:
        return fourier_shift(density, transform, -com), -com
    return rigid_motion(density, grid, shift=-com), -com


def normalise(density: np.ndarray, mode: str, grid: PhasingGrid) -> np.ndarray:
    if mode == "max":
        scale = np.max(density)
    else:                                               # mean over where the density is non-zero
        positive = density > 0
        scale = np.mean(density[positive]) if np.any(positive) else 1.0
    return density / scale if scale else density


# ----------------------------------------------------------------------------------------------
# harmonic coefficients of one density (numpy, small)
# ----------------------------------------------------------------------------------------------

def harmonic_coefficients(density: np.ndarray, transform) -> np.ndarray:
    """Coefficients (M, L+1, N) in 3-D or (M, N) in 2-D of one real density (*angular, N)."""
    coefficients = transform.harmonic(transform.xp.asarray(density[..., None, :], dtype=transform.backend.complex_dtype))
    return transform.backend.asnumpy(coefficients)[..., 0, :]


def from_coefficients(coefficients: np.ndarray, transform) -> np.ndarray:
    values = transform.inverse_harmonic(transform.xp.asarray(coefficients[..., None, :]))
    return transform.backend.asnumpy(values).real[..., 0, :]


# ----------------------------------------------------------------------------------------------
# 2-D rotation
# ----------------------------------------------------------------------------------------------

@dataclass
class Alignment:
    """The motion that brings a density onto the reference: rho_aligned(x) = T rho(x)."""

    rotation: np.ndarray          # aligned(x) = rho_centred(rotation^T x); includes the inversion / mirror
    inverted: bool                # point inversion (3-D) / mirror y -> -y (2-D) was applied
    shift: np.ndarray             # centring shift applied first
    correlation: float            # normalised correlation with the reference after alignment
    angles: tuple = ()


def _rotation_2d(angle):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


def find_rotation_2d(reference_coefficients, coefficients, ms, radial_weights, consider_mirror=True,
                     n_angles: int = 4096):
    """Best rotation angle a (and mirror flag) maximising <f, g rotated by a> over the radii given.

    Rotating g by a multiplies g_n by e^{-i n a}; the mirror y -> -y maps g_n to g_{-n}.
    """
    best = (-np.inf, 0.0, False)
    for mirrored in ([False, True] if consider_mirror else [False]):
        g = coefficients
        if mirrored:
            g = coefficients[[int(np.flatnonzero(ms == -n)[0]) for n in ms]]
        cross = np.sum(reference_coefficients * np.conj(g) * radial_weights, axis=-1)   # per n
        spectrum = np.zeros(n_angles, dtype=complex)
        spectrum[ms % n_angles] = cross
        # C(a) = sum_n cross_n e^{i n a}: the unnormalised inverse FFT
        correlation = np.real(np.fft.ifft(spectrum)) * n_angles
        k = int(np.argmax(correlation))
        # parabolic refinement between neighbouring samples
        left, mid, right = correlation[k - 1], correlation[k], correlation[(k + 1) % n_angles]
        denominator = left - 2 * mid + right
        offset = 0.5 * (left - right) / denominator if denominator != 0 else 0.0
        angle = (k + offset) * 2 * np.pi / n_angles
        if mid > best[0]:
            best = (mid, angle, mirrored)
    return best[1], best[2]


# ----------------------------------------------------------------------------------------------
# 3-D rotation: Wigner matrices and the SO(3) correlation
# ----------------------------------------------------------------------------------------------

class WignerD:
    """Wigner D matrices D^l_mm'(a, b, c) for l <= L (Condon-Shortley, active rotations)."""

    def __init__(self, max_order: int):
        self.max_order = max_order
        self._eig = []
        for l in range(max_order + 1):
            m = np.arange(-l, l + 1)
            # J_+ |l m> = sqrt((l-m)(l+m+1)) |l m+1>; J_y = (J_+ - J_-)/(2i)
            j_plus = np.diag(np.sqrt((l - m[:-1]) * (l + m[:-1] + 1)), -1)
            j_y = (j_plus - j_plus.T) / 2j
            values, vectors = np.linalg.eigh(j_y)
            self._eig.append((values, vectors))

    def small_d(self, l: int, beta: float) -> np.ndarray:
        values, vectors = self._eig[l]
        return ((vectors * np.exp(-1j * beta * values)) @ vectors.conj().T).real

    def matrix(self, l: int, alpha: float, beta: float, gamma: float) -> np.ndarray:
        m = np.arange(-l, l + 1)
        return np.exp(-1j * m * alpha)[:, None] * self.small_d(l, beta) * np.exp(-1j * m * gamma)[None, :]


def euler_to_matrix(alpha, beta, gamma) -> np.ndarray:
    def rz(a):
        c, s = np.cos(a), np.sin(a)
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])

    def ry(b):
        c, s = np.cos(b), np.sin(b)
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])

    return rz(alpha) @ ry(beta) @ rz(gamma)


def _by_order(coefficients, ms, max_order):
    """Dense (l, m = -l..l) list from (M, L+1, N) coefficients."""
    out = []
    for l in range(max_order + 1):
        rows = [int(np.flatnonzero(ms == m)[0]) for m in range(-l, l + 1)]
        out.append(coefficients[rows, l])                               # (2l+1, N)
    return out


def so3_correlation_grid(f_lm, g_lm, wigner: WignerD, radial_weights, n_beta=None, n_angle=None):
    """C(a, b, c) on a grid: a, c in [0, 2 pi) (n_angle each), b at n_beta midpoints of (0, pi)."""
    L = len(f_lm) - 1
    n_angle = n_angle or 2 * L + 2
    n_beta = n_beta or L + 1
    betas = (np.arange(n_beta) + 0.5) * np.pi / n_beta
    # cross_l[m, m'] = sum_r w_r f_lm(r)^* g_lm'(r)
    cross = [np.conj(f) @ (g * radial_weights).T for f, g in zip(f_lm, g_lm)]
    values = np.empty((n_beta, n_angle, n_angle))
    for i, beta in enumerate(betas):
        S = np.zeros((n_angle, n_angle), dtype=complex)
        for l in range(L + 1):
            m = np.arange(-l, l + 1) % n_angle
            S[np.ix_(m, m)] += cross[l] * wigner.small_d(l, beta)
        values[i] = np.real(np.fft.fft2(S))        # sum_mm' S_mm' e^{-i m a} e^{-i m' c}
    angles = 2 * np.pi * np.arange(n_angle) / n_angle
    return values, betas, angles


def so3_correlation(f_lm, g_lm, wigner: WignerD, radial_weights, alpha, beta, gamma) -> float:
    total = 0.0
    for l, (f, g) in enumerate(zip(f_lm, g_lm)):
        D = wigner.matrix(l, alpha, beta, gamma)
        total += np.real(np.sum(np.conj(f) * (D @ g) * radial_weights))
    return total


def find_rotation_3d(f_lm, g_lm, wigner: WignerD, radial_weights, n_starts: int = 4):
    """Euler angles maximising the SO(3) correlation: coarse FFT grid, then local refinement."""
    values, betas, angles = so3_correlation_grid(f_lm, g_lm, wigner, radial_weights)
    flat = np.argsort(values.ravel())[::-1][:n_starts]
    best = (-np.inf, (0.0, 0.0, 0.0))
    for index in flat:
        i, j, k = np.unravel_index(index, values.shape)
        start = np.array([angles[j], betas[i], angles[k]])
        result = optimize.minimize(lambda p: -so3_correlation(f_lm, g_lm, wigner, radial_weights, *p),
                                   start, method="Nelder-Mead",
                                   options={"xatol": 1e-4, "fatol": 1e-10 * abs(values.max()), "maxiter": 400})
        if -result.fun > best[0]:
            best = (-result.fun, tuple(result.x))
    return best[1], best[0]


def rotate_coefficients_3d(coefficients, ms, wigner: WignerD, euler):
    """Coefficients (M, L+1, N) of Lambda_R g (g rotated by R(euler))."""
    out = np.zeros_like(coefficients)
    L = coefficients.shape[1] - 1
    for l in range(min(L, wigner.max_order) + 1):
        rows = [int(np.flatnonzero(ms == m)[0]) for m in range(-l, l + 1)]
        out[rows, l] = wigner.matrix(l, *euler) @ coefficients[rows, l]
    return out


# ----------------------------------------------------------------------------------------------
# one density onto a reference
# ----------------------------------------------------------------------------------------------

def correlation(a: np.ndarray, b: np.ndarray, grid: PhasingGrid) -> float:
    w = grid.volume_weights("real")[..., 0, :]
    return float(np.sum(a * b * w) / np.sqrt(np.sum(a * a * w) * np.sum(b * b * w)))


def align(density, reference, transform, r_limit_ids=None, consider_inversion=True, search_order=None,
          wigner: WignerD | None = None, centre_first=True):
    """Centre `density` and rotate (and invert / mirror) it onto the centred `reference`.

    search_order: band limit of the 3-D rotation search (default: the grid's); wigner: Wigner
    matrices up to the grid's band limit (made when not given). Returns the aligned density and
    the Alignment.
    """
    grid = transform.grid
    ms = transform.ms
    if centre_first:
        centred, shift = centre(density, grid, transform)
    else:
        centred, shift = density, np.zeros(grid.dimensions)
    radial_weights = grid.real_radii ** (grid.dimensions - 1) * grid.dr
    if r_limit_ids is not None:
        ids = np.asarray(r_limit_ids, int)
        keep = np.zeros(grid.n_radial, bool)
        keep[ids[(ids >= 0) & (ids < grid.n_radial)]] = True
        radial_weights = radial_weights * keep
    f = harmonic_coefficients(reference, transform)
    g = harmonic_coefficients(centred, transform)
    if grid.dimensions == 2:
        angle, mirrored = find_rotation_2d(f, g, ms, radial_weights, consider_mirror=consider_inversion)
        if mirrored:
            g = g[[int(np.flatnonzero(ms == -n)[0]) for n in ms]]
        aligned = from_coefficients(g * np.exp(-1j * ms * angle)[:, None], transform)
        rotation, angles, inverted = _rotation_2d(angle), (angle,), mirrored
        if mirrored:
            rotation = rotation @ np.diag([1.0, -1.0])
    else:
        wigner = wigner or WignerD(grid.max_order)
        L = min(search_order or grid.max_order, grid.max_order)
        f_lm = _by_order(f, ms, L)
        parity = ((-1.0) ** np.arange(g.shape[1]))[None, :, None]
        best = (-np.inf, None, False)
        for inverted_try in ([False, True] if consider_inversion else [False]):
            g_try = g * parity if inverted_try else g
            euler, value = find_rotation_3d(f_lm, _by_order(g_try, ms, L), wigner, radial_weights)
            if value > best[0]:
                best = (value, euler, inverted_try)
        _, euler, inverted = best
        g_use = g * parity if inverted else g
        aligned = from_coefficients(rotate_coefficients_3d(g_use, ms, wigner, euler), transform)
        rotation = euler_to_matrix(*euler) @ (-np.eye(3) if inverted else np.eye(3))
        angles = tuple(euler)
    return aligned, Alignment(rotation, bool(inverted), shift, correlation(aligned, reference, grid), angles)


# ----------------------------------------------------------------------------------------------
# resolution
# ----------------------------------------------------------------------------------------------

def prtf(amplitudes: np.ndarray, grid: PhasingGrid) -> np.ndarray:
    """PRTF(q) of aligned reconstructions' amplitudes, shape (*angular, K, N) -> (N,)."""
    weights = grid.angular_weights()[..., None]
    mean = np.mean(amplitudes, axis=-2)
    coherent = np.sum(np.abs(mean) ** 2 * weights, axis=tuple(range(len(grid.angular_shape))))
    total = np.sum(np.mean(np.abs(amplitudes) ** 2, axis=-2) * weights, axis=tuple(range(len(grid.angular_shape))))
    return np.sqrt(coherent / np.maximum(total, 1e-300))


def relative_error(a, b, grid: PhasingGrid) -> float:
    """||a - b|| / ||b|| with the grid's quadrature weights."""
    w = grid.volume_weights("real")[..., 0, :]
    return float(np.sqrt(np.sum((a - b) ** 2 * w) / np.sum(b * b * w)))
