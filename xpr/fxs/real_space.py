"""Real space of fxs phasing: starting densities, radial fields, the Gaussian blur and the
shrink-wrap support update, on a PhasingGrid (layout (*angular, repeat, r))."""
from __future__ import annotations

import numpy as np

from xpr.fxs.grids import PhasingGrid
from xpr.fxs.transforms import FourierTransformPair, integrate


def radial_field(grid: PhasingGrid, values_of_r, n_repeats: int, xp=np):
    """A field depending on r only, broadcast to the layout (*angular, B, N)."""
    values = np.asarray(values_of_r, dtype=float)
    shape = grid.angular_shape + (n_repeats, grid.n_radial)
    return xp.asarray(np.broadcast_to(values, shape).copy())


def density_guess(grid: PhasingGrid, n_repeats: int, radius: float, kind: str, slope: float,
                  amplitude: str, snr: float, rng, target_norm: float, xp=np):
    """Starting densities: an envelope (bump or ball) times random values of a given SNR.

    The bump is exp(-slope R^2 / (R^2 - r^2)) inside R (a smooth test function). Each density is
    scaled so that its integral of rho^2 equals target_norm (Parseval with the data).
    """
    r = grid.real_radii
    inside = r < radius
    if kind == "bump":
        envelope = np.zeros_like(r)
        envelope[inside] = np.exp(-slope * radius ** 2 / (radius ** 2 - r[inside] ** 2) + slope)
    else:
        envelope = inside.astype(float)
    shape = grid.angular_shape + (n_repeats, grid.n_radial)
    field = np.broadcast_to(envelope, shape).copy()
    if amplitude == "random":
        field *= np.clip(1 + rng.standard_normal(shape) / snr, 0, None)
    field = xp.asarray(field)
    norm = integrate(field ** 2, grid, "real", xp)
    scale = xp.sqrt(target_norm / xp.maximum(norm, 1e-300))
    return field * scale[:, None]


def gaussian_blur(density, transform: FourierTransformPair, sigma: float):
    """Density convolved with a Gaussian of width sigma (Å): multiply its transform by exp(-q^2 s^2/2)."""
    xp = transform.xp
    q = transform.grid.reciprocal_radii
    damping = xp.asarray(np.exp(-0.5 * (q * sigma) ** 2))
    return transform.real_inverse(transform.forward(density) * damping)


def shrink_wrap(density, transform: FourierTransformPair, sigma: float, threshold: float,
                confine_to=None):
    """New support: where the blurred |density| exceeds threshold x its maximum (per repeat)."""
    xp = transform.xp
    blurred = gaussian_blur(xp.abs(density), transform, sigma)
    axes = tuple(range(len(transform.grid.angular_shape))) + (density.ndim - 1,)
    peak = xp.max(blurred, axis=axes, keepdims=True)
    support = blurred >= threshold * peak
    if confine_to is not None:
        support &= confine_to
    return support
