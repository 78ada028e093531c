"""Priors added to the data loss; each returns (value, Wirtinger gradient).

* phase_l1:      w Σ √(φ² + ε²),  φ = arg O      favours a flat (zero) phase between atoms
* total_variation: w Σ √(|∂x O|² + |∂y O|² + ε²) per slice (periodic forward differences)
* probe_window:  w Σ (1 − W(r)) |p(r)|²           keeps the probe inside a disc of the window
Gradients follow the same convention as the data term, g = 2 ∂L/∂z̄.
"""
from __future__ import annotations


def phase_l1(object_slices, weight: float, epsilon: float, xp):
    phase = xp.angle(object_slices)
    smooth = xp.sqrt(phase ** 2 + epsilon ** 2)
    value = weight * float(xp.sum(smooth, dtype=xp.float64))
    safe = xp.where(xp.abs(object_slices) > 1e-12, object_slices, 1e-12)
    gradient = weight * (phase / smooth) * 1j / xp.conj(safe)
    return value, gradient.astype(object_slices.dtype)


def total_variation(object_slices, weight: float, epsilon: float, xp):
    dx = xp.roll(object_slices, -1, axis=-1) - object_slices
    dy = xp.roll(object_slices, -1, axis=-2) - object_slices
    smooth = xp.sqrt(xp.abs(dx) ** 2 + xp.abs(dy) ** 2 + epsilon ** 2)
    value = weight * float(xp.sum(smooth, dtype=xp.float64))
    ux, uy = dx / smooth, dy / smooth
    gradient = weight * (xp.roll(ux, 1, axis=-1) - ux + xp.roll(uy, 1, axis=-2) - uy)
    return value, gradient.astype(object_slices.dtype)


def window_mask(n: int, radius_fraction: float, xp):
    """1 outside a centred disc of radius radius_fraction · n/2, 0 inside (the penalised area)."""
    coordinate = xp.arange(n) - n // 2
    radius = xp.sqrt(coordinate[:, None] ** 2 + coordinate[None, :] ** 2)
    return (radius > radius_fraction * n / 2).astype(xp.float32)


def probe_window(probe, weight: float, radius_fraction: float, xp):
    outside = window_mask(probe.shape[-1], radius_fraction, xp)
    value = weight * float(xp.sum(outside * xp.abs(probe) ** 2, dtype=xp.float64))
    return value, (2.0 * weight * outside * probe).astype(probe.dtype)
