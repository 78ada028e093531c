"""Number of particles per shot from the invariants: xFrame's negative-volume heuristic.

With N identical particles per shot, scattering incoherently in random orientations, the data are

    Ī_data = N Ī,    B_l,data = N B_l (l > 0)   =>   V_l,data = sqrt(N) V_l,   I_00,data = N I_00,

so an intensity built from the data's coefficients, I_data(q, Ω) = N I_00 Y_00 + sqrt(N) Σ_{l>0}
V_l U_l Y_l, equals sqrt(N) times a single-particle intensity only once its order-0 part is divided
by s = sqrt(N). Dividing by a larger s leaves too little order 0 to keep it non-negative. xFrame
(``fxs_invariant_tools.estimate_number_of_particles``) therefore

1. sets the unknown unitaries to the identity: I_lm(q) = the columns of V_l (3-D; column k is
   m = k - l), I_n = v_n with zero phase (2-D, I_-n = I_n^*);
2. synthesises I_s(q, Ω) = I_00 Y_00 / s + Σ_{l>0} I_lm Y_lm (the real part) on an angular grid for
   each scale s of the search space [start, stop, n_points];
3. measures the "negative volume" V(s), the fraction of grid points where I_s < 0, and takes its
   inflection point, s* = argmax |dV/ds|, as sqrt(N): N ≈ s*².

Differences from xFrame, each measured to matter:

* dV/ds is a kernel density estimate of the thresholds (below), Gaussian of width 0.2 in log s,
  not the raw finite difference of V: V is a sum of steps, and the maximum of its raw derivative
  jumped by factors up to 2 between N = 1, 4, 16 and between angular samplings of one data set.
* V(s) is averaged over 16 seeded draws of random phases of the columns of V_l (of v_n). Those
  phases are arbitrary (each eigenvector of B_l is defined up to one), yet with identity unknowns
  they change the synthesised intensity: on the same data, eigenvectors that differ only in
  their phases gave N = 0.62 and 1.32 (3-D tutorial, single draws ranging 0.53-1.38); the
  average over draws is reproducible to about +-10 %.
* Grid points are weighted by their solid angle (Gauss-Legendre weights in 3-D, equal in 2-D;
  every shell equally), and V(s) is exact for every s at once: a point is negative at s exactly
  when s exceeds its threshold c(q)/(-g), c = I_00 Y_00 and g the l > 0 part (g < 0), so V is
  the cumulative distribution of the thresholds.

Accuracy. The estimate is scale-equivariant: V_N(s) = V_1(s / sqrt(N)), so estimate(N) =
N x estimate(1) up to the spacing of the scan, and its relative error is a property of the
particle (and of the orders and q range used), not of N. It is a heuristic: with identity (or
random) unknowns the synthesised "intensity" is not the particle's, which goes negative already
below s = 1; with the true unknowns negatives would start exactly at s = sqrt(N), and even then
the inflection gave 1.1-1.4 N (measured on the same test particles). Measured estimate(N)/N
(tests/fxs/test_reconstruct_options.py): 2-D Gaussian blobs 1.12-1.15, xFrame's three discs
0.80-1.01 (max_order 16-32), 3-D Gaussian blobs 1.36-1.47, the 3-D tutorial cluster through
simulate_ccd + extract 0.73-0.88, and, the poor regime, the 2-D tutorial cluster of triangles
(85 % of its l > 0 power in orders 2 and 10) 0.40-0.44. It tells 1 from 4 from 16 particles; it
does not give N to 10 %.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xpr.errors import InputError


@dataclass
class ParticleNumberEstimate:
    """The estimate and the curve it came from."""

    n_particles: float              # s*^2
    scales: np.ndarray              # the scan of s
    negative_fraction: np.ndarray   # V(s): weighted fraction of grid points with I_s < 0
    gradient: np.ndarray            # dV/ds


def check_search_space(search_space, key="projections.reciprocal.number_of_particles.search_space"):
    """(start, stop, n_points) of the scale scan, validated: 0 < start < stop, n_points >= 3."""
    try:
        start, stop, n = search_space
        start, stop = float(start), float(stop)
        if float(n) != int(n):
            raise ValueError
        n = int(n)
    except (TypeError, ValueError):
        shown = list(search_space) if isinstance(search_space, (list, tuple)) else search_space
        raise InputError(f"search_space must be [start, stop, n_points] (numbers, n_points an integer), got "
                         f"{shown!r}", key=key) from None
    if not (0 < start < stop) or n < 3:
        raise InputError(f"search_space [start, stop, n_points] needs 0 < start < stop and n_points >= 3, got "
                         f"{list(search_space)!r}", key=key)
    return start, stop, n


def _l_positive_part(vectors: dict, n_q: int, dimensions: int, oversampling: int, shells):
    """Yield (shell index, g on the angular grid, solid-angle weights / full angle) for each shell:
    g = sum_{l>0} I_lm Y_lm with the unknowns set to the identity (real part)."""
    L = max([l for l in vectors if l > 0], default=0)
    L_grid = max(oversampling * L, 1)
    if dimensions == 2:
        n_phi = 2 * L_grid + 2
        weights = np.full(n_phi, 1.0 / n_phi)
        shells = np.asarray(list(shells), int)
        spectrum = np.zeros((len(shells), n_phi), dtype=complex)
        for n, v in vectors.items():
            if n > 0:
                value = np.asarray(v).reshape(n_q)[shells]
                spectrum[:, n], spectrum[:, -n] = value, np.conj(value)     # a_n = 0: I_n = v_n
        values = np.fft.ifft(spectrum, axis=-1).real * n_phi
        for k, g in zip(shells, values):
            yield k, g, weights
        return
    from xpr.fxs.harmonics import SphericalHarmonicTransform

    transform = SphericalHarmonicTransform(L_grid)
    weights = np.broadcast_to((transform.theta_weights / (2 * transform.n_phi))[:, None],
                              (transform.n_theta, transform.n_phi))            # solid angle / 4 pi
    shells = list(shells)
    chunk = 16
    for first in range(0, len(shells), chunk):
        ids = shells[first:first + chunk]
        coefficients = np.zeros((len(ids), L_grid + 1, 2 * L_grid + 1), dtype=complex)
        for l, V in vectors.items():
            if l == 0:
                continue
            V = np.asarray(V).reshape(n_q, -1)[ids]
            rank = min(V.shape[1], 2 * l + 1)
            coefficients[:, l, L_grid - l:L_grid - l + rank] = V[:, :rank]   # U_l = identity, m from -l
        values = transform.inverse(coefficients, real=True)                    # (chunk, T, P)
        for k, g in zip(ids, values):
            yield k, g, weights


def _random_phases(vectors: dict, rng) -> dict:
    """Each column of each V_l (each v_n) times a random phase: another equally valid V_l."""
    out = {}
    for l, V in vectors.items():
        V = np.asarray(V)
        columns = 1 if V.ndim == 1 else V.shape[-1]
        phases = np.exp(2j * np.pi * rng.random(columns))
        out[l] = V * (phases[0] if V.ndim == 1 else phases[None, :])
    return out


def estimate_number_of_particles(vectors: dict, zeroth, dimensions: int, search_space=(0.5, 10.0, 400),
                                 q_mask=None, oversampling: int = 1, smoothing: float = 0.2,
                                 phase_draws: int = 16, seed: int = 0) -> ParticleNumberEstimate:
    """N from the data's projection matrices and order-0 coefficient (see the module docstring).

    vectors: order -> V_l (N_q, rank) (3-D) or v_n (N_q,) (2-D), as measured (not divided by
        sqrt(N)); order 0, if present, is ignored.
    zeroth: the order-0 intensity coefficient of the data, N_q values: 3-D I_00 = sqrt(4 pi) Ī,
        2-D I_0 = Ī (the average intensity).
    search_space: (start, stop, n_points) of the scale s = sqrt(N).
    q_mask: bool (N_q): the shells used (default: every shell).
    oversampling: the angular grid resolves band oversampling x L (the negative set is not
        band-limited; 2 instead of 1 changed the phase-averaged estimate by up to 10 %, measured).
    smoothing: width in log s of the Gaussian kernel that estimates dV/ds (0.2: 20 % in s; narrower
        kernels let the maximum jump between the bumps of a broad distribution).
    phase_draws: 0 = the columns of V_l as given (xFrame); K > 0 = V(s) averaged over K random
        phases of each column (seeded by `seed`), which removes the dependence on the arbitrary
        phases of the eigenvectors V_l is made of.
    """
    start, stop, n = check_search_space(search_space)
    if dimensions not in (2, 3):
        raise ValueError(f"dimensions must be 2 or 3, got {dimensions}")
    zeroth = np.asarray(zeroth, float).reshape(-1)
    c = zeroth / np.sqrt(4 * np.pi) if dimensions == 3 else zeroth          # I_00 Y_00 (3-D), I_0 (2-D)
    mask = np.ones(len(zeroth), bool) if q_mask is None else np.asarray(q_mask, bool).reshape(-1)
    scales = np.linspace(start, stop, n)
    # V(s) exactly at the scan points; dV/ds as a kernel density of the thresholds in log s
    # (Gaussian of width `smoothing`, on a fine log grid): the raw derivative of V, a sum of steps,
    # is too noisy for its maximum to mean anything.
    bin_width = smoothing / 8
    edges = np.arange(np.log(start) - 5 * smoothing, np.log(stop) + 5 * smoothing + bin_width, bin_width)
    steps = np.zeros(n + 1)
    density = np.zeros(len(edges) - 1)
    n_shells = max(int(np.sum(mask)), 1)
    rng = np.random.default_rng(seed)
    n_draws = max(int(phase_draws), 1)
    for draw in range(n_draws):
        drawn = vectors if phase_draws <= 0 else _random_phases(vectors, rng)
        for k, shell, weights in _l_positive_part(drawn, len(zeroth), dimensions, oversampling, np.flatnonzero(mask)):
            w = np.broadcast_to(weights, shell.shape)
            negative = shell < 0
            if c[k] > 0:
                thresholds = c[k] / -shell[negative]            # c/s + g < 0  <=>  s > c / (-g)
            else:                                                # no order 0: negative at every s > 0
                thresholds = np.zeros(int(np.sum(negative)))
            first = np.searchsorted(scales, thresholds, side="right")   # first scale s_i > threshold
            steps += np.bincount(first, weights=w[negative], minlength=n + 1)
            with np.errstate(divide="ignore"):
                density += np.histogram(np.log(thresholds), bins=edges, weights=w[negative])[0]
    n_shells *= n_draws
    fraction = np.cumsum(steps)[:n] / n_shells
    from scipy.ndimage import gaussian_filter1d

    per_log_s = gaussian_filter1d(density, smoothing / bin_width, mode="constant") / (bin_width * n_shells)
    centres = (edges[:-1] + edges[1:]) / 2
    gradient = np.interp(np.log(scales), centres, per_log_s) / scales          # dV/ds = (dV/dlog s) / s
    best = int(np.argmax(np.abs(gradient)))
    return ParticleNumberEstimate(float(scales[best] ** 2), scales, fraction, gradient)
