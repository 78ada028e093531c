"""The compiled inner loops of Kaiser–Bessel gridding (numba): spreading samples onto a 3-D Fourier
grid (`spread`), interpolating a Fourier cube at sample points (`interpolate`), and the central
slices of a search, kernel weights included (`slices`, `kernel_weights`).

Each works, for every sample s, with the first grid index (x, y, z) of its W³ neighbourhood and
the W kernel weights along each axis (`KaiserBessel.neighbours`, given, or made by
`kernel_weights` in the same float32 steps); neighbour (a, b, c) — z, y, x — lies at the flat
index ((z₀ + a) · side + y₀ + b) · side + x₀ + c of a cube of `side`³ points and has the weight
c_abc = (wz[a] · wy[b]) · wx[c], formed in float32 as the numpy paths form it.

The loops run without the GIL, so the threads of one insertion (reconstruct.insert_batch) run them
side by side, each into its own arrays.  They replaced np.bincount over queued (index, weight) pairs,
which wrote and read 40 bytes per kernel contribution and spent most of an insertion doing so, and
np.take of W³ neighbours with two matmuls for the slices.  Checked against the sums written out
with np.add.at and einsum in tests/em/test_ali3d_reconstruction.py.
"""
from __future__ import annotations

import numpy as np

from xpr.compiled import compiled

WEIGHTS_NONE, WEIGHTS_COUNT, WEIGHTS_CTF = 0, 1, 2   # spread: D only | D, N and T = N | D, N and T = Σ c t²


@compiled
def kernel_weights(u, table, table_scale, table_size, out):  # pragma: no cover - compiled
    """KaiserBessel.neighbours for one coordinate u (grid units), in the same float32 steps: fills
    out[0:W] with the weights of j0, …, j0 + W − 1 and returns j0 = ceil(u − W/2)."""
    width = out.shape[0]
    first = np.ceil(u - width / 2.0)
    offset = np.float32(u - first)
    for t in range(width):
        position = min(abs(offset - np.float32(t)) * table_scale, table_size)
        index = int(position)
        fraction = position - np.float32(index)
        out[t] = table[index] * (np.float32(1.0) - fraction) + table[index + 1] * fraction
    return int(first)


@compiled
def spread(coordinates, table, table_scale, table_size, width, real, imag, ctf_squared, sign, side,
           data, count, ctf_weight, weights_mode):  # pragma: no cover - compiled
    """Add every sample's kernel contributions to the accumulators, in place:

        D(j) += c · (real + i imag),   and with weights_mode  1: N(j) += sign · c, T(j) += sign · c
                                                              2: N(j) += sign · c, T(j) += c · ctf_squared

    coordinates (3, m): each sample's x, y, z in grid cells (the weights as `kernel_weights` makes
    them; table: KaiserBessel.table, table_scale: float32 2·table_size / W, table_size: float32).
    real, imag, ctf_squared: float32 per sample, the sign (±1: insert or take out) already applied;
    each float32 product c · value is added to the float64 sums.  data: the float64 view of the
    complex128 D (real and imaginary parts interleaved); count, ctf_weight: N and T."""
    wx = np.empty(width, np.float32)
    wy = np.empty(width, np.float32)
    wz = np.empty(width, np.float32)
    for s in range(real.shape[0]):
        x0 = kernel_weights(coordinates[0, s], table, table_scale, table_size, wx)
        y0 = kernel_weights(coordinates[1, s], table, table_scale, table_size, wy)
        z0 = kernel_weights(coordinates[2, s], table, table_scale, table_size, wz)
        re, im = real[s], imag[s]
        t2 = ctf_squared[s] if weights_mode == 2 else np.float32(0.0)
        for a in range(width):
            plane = (z0 + a) * side + y0
            for b in range(width):
                wzy = wz[a] * wy[b]
                row = (plane + b) * side + x0
                for c in range(width):
                    w = wzy * wx[c]
                    j = row + c
                    data[2 * j] += w * re
                    data[2 * j + 1] += w * im
                    if weights_mode != 0:
                        count[j] += sign * w
                        if weights_mode == 1:
                            ctf_weight[j] += sign * w
                        else:
                            ctf_weight[j] += w * t2


@compiled
def slices(cube, side, coordinates, table, table_scale, table_size, width, out):  # pragma: no cover - compiled
    """out[i, s] = Σ_abc c_abc · cube[neighbour abc of point s of slice i] (complex64, summed in
    float64), the kernel weights made from `coordinates` (b, 3, m): the x, y, z of every point in
    cube cells, as KaiserBessel.neighbours makes them (table: KaiserBessel.table; table_scale:
    float32 2·table_size / W; table_size: float32)."""
    wx = np.empty(width, np.float32)
    wy = np.empty(width, np.float32)
    wz = np.empty(width, np.float32)
    for i in range(coordinates.shape[0]):
        for s in range(coordinates.shape[2]):
            x0 = kernel_weights(coordinates[i, 0, s], table, table_scale, table_size, wx)
            y0 = kernel_weights(coordinates[i, 1, s], table, table_scale, table_size, wy)
            z0 = kernel_weights(coordinates[i, 2, s], table, table_scale, table_size, wz)
            re, im = 0.0, 0.0
            for a in range(width):
                plane = (z0 + a) * side + y0
                for b in range(width):
                    wzy = wz[a] * wy[b]
                    row = (plane + b) * side + x0
                    for c in range(width):
                        w = wzy * wx[c]
                        value = cube[row + c]
                        re += w * value.real
                        im += w * value.imag
            out[i, s] = complex(re, im)


def table_arguments(kernel):
    """(table, table_scale, table_size, W) of a KaiserBessel, as the loops above take them."""
    return kernel.table, np.float32(2.0 * kernel.table_size / kernel.width), np.float32(kernel.table_size), kernel.width
