"""Projected electrostatic potentials of atoms and a few built-in crystals.

The electron scattering factor of a neutral atom is Peng's five-Gaussian fit (L.-M. Peng,
G. Ren, S. L. Dudarev & M. J. Whelan, Acta Cryst. A52 (1996) 257–276, table for 0 ≤ s ≤ 6 Å⁻¹):

    f_e(s) = Σ_i a_i exp(−b_i s²),   s = q / 2 = sin θ / λ,   f_e in Å, b_i in Å².

The potential is the Fourier transform of f_e (Kirkland, Advanced Computing in Electron
Microscopy, eq. 5.9) and the projected potential the 2-D transform at q_z = 0:

    v_z(r) = (h² / 2π m₀ e) ∫ f_e(q) exp(2πi q·(r − r_atom)) d²q        [V Å]

On a periodic grid of pixel Δ the integral becomes a sum over the FFT frequencies,
v_z = (h² / 2π m₀ e) / Δ² · IFFT[f_e(|q|) Σ_atoms exp(−2πi q·r_atom)], which places atoms at
sub-pixel positions exactly and is band-limited by construction (no real-space aliasing of the
sharp nuclear cusp).
"""
from __future__ import annotations

import math

import numpy as np

from xpr.em import optics

# h² / (2π m₀ e) in V Å² (non-relativistic rest mass; relativity enters through σ).
POTENTIAL_PREFACTOR_V_A2 = (optics.PLANCK_H ** 2 / (2.0 * math.pi * optics.ELECTRON_MASS
                                                     * optics.ELEMENTARY_CHARGE)) * 1e20

# Peng et al. (1996), 0 ≤ s ≤ 6 Å⁻¹: (a_1..a_5 in Å, b_1..b_5 in Å²).
PENG_PARAMETERS = {
    "H": ((0.0088, 0.0449, 0.1481, 0.2356, 0.0914), (0.1152, 1.0867, 4.9755, 16.5591, 43.2743)),
    "C": ((0.0489, 0.2091, 0.7537, 1.1420, 0.3555), (0.1140, 1.0825, 5.4281, 17.8811, 51.1341)),
    "N": ((0.0267, 0.1328, 0.5301, 1.1020, 0.4215), (0.0541, 0.5165, 2.8207, 10.6297, 34.3764)),
    "O": ((0.0365, 0.1729, 0.5805, 0.8814, 0.3121), (0.0652, 0.6184, 2.9449, 9.6298, 28.2194)),
    "S": ((0.0915, 0.4312, 1.0847, 2.4671, 1.0852), (0.0838, 0.7788, 4.3462, 15.5846, 44.6365)),
    "Ti": ((0.2123, 0.8960, 2.1765, 3.0436, 2.4439), (0.1399, 1.4568, 6.7534, 33.1168, 101.8238)),
    "Sr": ((0.3723, 1.4598, 3.5124, 4.4612, 3.3031), (0.1480, 1.4643, 9.2320, 49.8807, 148.0937)),
    "Mo": ((0.3069, 1.1714, 3.2293, 3.4254, 2.1224), (0.1101, 1.0222, 5.9613, 25.1965, 93.5831)),
}

# Built-in specimens: orthorhombic cell (a_x, a_y, thickness) in Å and atoms as
# (symbol, fractional x, fractional y, z in Å).
CRYSTALS = {
    # graphene, a = 2.46 Å, cell a × a√3
    "graphene": ((2.46, 2.46 * math.sqrt(3.0), 1.0),
                 (("C", 0.0, 0.0, 0.5), ("C", 0.5, 1 / 6, 0.5),
                  ("C", 0.5, 0.5, 0.5), ("C", 0.0, 2 / 3, 0.5))),
    # MoS2 monolayer (2H), a = 3.16 Å, S planes ±1.56 Å from Mo
    "MoS2": ((3.16, 3.16 * math.sqrt(3.0), 6.26),
             (("Mo", 0.0, 0.0, 3.13), ("Mo", 0.5, 0.5, 3.13),
              ("S", 0.5, 1 / 6, 1.57), ("S", 0.5, 1 / 6, 4.69),
              ("S", 0.0, 2 / 3, 1.57), ("S", 0.0, 2 / 3, 4.69))),
    # SrTiO3 viewed along [001], a = 3.905 Å, one unit cell thick (tile in z with `layers`)
    "SrTiO3": ((3.905, 3.905, 3.905),
               (("Sr", 0.0, 0.0, 0.0), ("Ti", 0.5, 0.5, 1.9525), ("O", 0.5, 0.5, 0.0),
                ("O", 0.5, 0.0, 1.9525), ("O", 0.0, 0.5, 1.9525))),
}


def electron_scattering_factor(symbol: str, q_invA, xp=None):
    """f_e(q) in Å for spatial frequency q in Å⁻¹ (q = 2 sin θ / λ)."""
    xp = np if xp is None else xp
    a, b = PENG_PARAMETERS[symbol]
    s2 = (xp.asarray(q_invA) / 2.0) ** 2
    return sum(ai * xp.exp(-bi * s2) for ai, bi in zip(a, b))


def crystal_atoms(name: str, extent_A, layers: int = 1):
    """Atoms of a built-in crystal tiled over extent (ly, lx) Å: (symbols, positions (N,3) x,y,z Å).

    Only atoms with 0 ≤ x < lx, 0 ≤ y < ly are kept; `layers` repeats the cell along z.
    """
    (ax, ay, az), basis = CRYSTALS[name]
    ly, lx = extent_A
    symbols, positions = [], []
    for layer in range(layers):
        for iy in range(int(math.ceil(ly / ay)) + 1):
            for ix in range(int(math.ceil(lx / ax)) + 1):
                for symbol, fx, fy, z in basis:
                    x, y = (ix + fx) * ax, (iy + fy) * ay
                    if x < lx and y < ly:
                        symbols.append(symbol)
                        positions.append((x, y, z + layer * az))
    return symbols, np.asarray(positions, dtype=np.float64).reshape(-1, 3)


def projected_potential(symbols, positions_xy_A, shape, pixel_size_A: float, backend=None):
    """v_z(y, x) in V Å of the given atoms on a periodic grid (shape (ny, nx), pixel in Å).

    positions_xy_A: (N, 2+) array, columns x, y in Å (z ignored). Grid index (i, j) sits at
    (y, x) = (i Δ, j Δ).
    """
    backend = optics._backend(backend)
    xp = backend.xp
    ny, nx = shape
    qy = xp.asarray(np.fft.fftfreq(ny, pixel_size_A))
    qx = xp.asarray(np.fft.fftfreq(nx, pixel_size_A))
    q = xp.sqrt(qy[:, None] ** 2 + qx[None, :] ** 2)
    spectrum = xp.zeros((ny, nx), dtype=xp.complex128)
    symbols = np.asarray(symbols)
    positions = np.asarray(positions_xy_A, dtype=np.float64)
    for symbol in sorted(set(symbols.tolist())):
        where = positions[symbols == symbol]
        phase_y = xp.exp(-2j * math.pi * xp.asarray(where[:, 1])[:, None] * qy[None, :])
        phase_x = xp.exp(-2j * math.pi * xp.asarray(where[:, 0])[:, None] * qx[None, :])
        structure_factor = phase_y.T @ phase_x
        spectrum += electron_scattering_factor(symbol, q, xp) * structure_factor
    potential = backend.ifftn(spectrum, axes=(0, 1)).real
    return (POTENTIAL_PREFACTOR_V_A2 / pixel_size_A ** 2 * potential).astype(xp.float32)


def sliced_projected_potential(symbols, positions_A, shape, pixel_size_A: float,
                               slice_thickness_A: float, backend=None):
    """Projected potential of each slab [k Δz, (k+1) Δz) of the specimen: (n_slices, ny, nx) V Å."""
    positions = np.asarray(positions_A, dtype=np.float64)
    symbols = np.asarray(symbols)
    z = positions[:, 2] - positions[:, 2].min()
    n_slices = max(1, int(math.floor(z.max() / slice_thickness_A)) + 1)
    index = np.minimum((z / slice_thickness_A).astype(int), n_slices - 1)
    backend = optics._backend(backend)
    slices = [projected_potential(symbols[index == k], positions[index == k], shape,
                                  pixel_size_A, backend) if np.any(index == k)
              else backend.xp.zeros(shape, dtype=backend.xp.float32)
              for k in range(n_slices)]
    return backend.xp.stack(slices)
