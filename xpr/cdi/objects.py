"""Model objects for simulated CDI and the far-field pattern they give.

Objects are centred in an array of the detector's shape; their diameter sets the linear
oversampling ratio (array size / object diameter; phasing needs more than 2 per axis in 2-D,
2^(1/3) in volume per axis in 3-D but in practice >= 2).

* disc      -- a uniform disc (2-D) or ball (3-D);
* shapes    -- a few overlapping ellipses / ellipsoids of different densities, inside an
               elliptical envelope (not centrosymmetric, so the twin is a distinct object);
* random_smooth -- Gaussian-correlated random density, positive, inside an elliptical envelope;
* cluster   -- a cluster of touching particles (discs/balls of a few sizes and densities), grown
               from the centre by sticking each new particle onto a random earlier one;
* holes     -- an elliptical body with holes through it and denser inclusions inside;
* polygon   -- a sharp-edged convex polygon / polyhedron (the intersection of random half-planes
               or half-spaces) of uniform density with a uniform inner wedge, no blur.

A complex object multiplies the density by exp(i phi) with phi a smooth random field of peak
|phi| = max_phase (radians).

The far-field pattern is I(q) = |FT[rho](q)|^2, with zero frequency moved to the array centre as
detectors record it.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def _coordinates(shape):
    """Pixel offsets from the array centre (index n//2), one array per axis."""
    return np.meshgrid(*[np.arange(n) - n // 2 for n in shape], indexing="ij")


def ellipsoid(shape, semi_axes, centre=None, rotation=0.0):
    """Boolean ellipse/ellipsoid; rotation (rad) about the last axis pair."""
    coords = _coordinates(shape)
    centre = np.zeros(len(shape)) if centre is None else np.asarray(centre, dtype=float)
    offsets = [c - c0 for c, c0 in zip(coords, centre)]
    if len(shape) >= 2 and rotation:
        a, b = offsets[-2], offsets[-1]
        ca, sa = np.cos(rotation), np.sin(rotation)
        offsets[-2], offsets[-1] = ca * a + sa * b, -sa * a + ca * b
    r2 = sum((o / max(s, 1e-9)) ** 2 for o, s in zip(offsets, semi_axes))
    return r2 <= 1.0


def ball(shape, radius):
    return ellipsoid(shape, [radius] * len(shape))


def _envelope(shape, radius, rng):
    """An ellipse/ellipsoid with an off-centre lobe: of diameter 2*radius, not centrosymmetric."""
    direction = rng.standard_normal(len(shape))
    direction /= np.linalg.norm(direction)
    body = ellipsoid(shape, radius * rng.uniform(0.7, 0.8, len(shape)),
                     centre=-0.2 * radius * direction, rotation=rng.uniform(0, np.pi))
    lobe = ellipsoid(shape, [0.45 * radius] * len(shape), centre=0.5 * radius * direction)
    return body | lobe


def disc(shape, diameter, rng=None):
    return ball(shape, diameter / 2.0).astype(np.float64)


def shapes(shape, diameter, rng, count=5):
    radius = diameter / 2.0
    envelope = _envelope(shape, radius, rng)
    density = 0.3 * envelope.astype(np.float64)
    for _ in range(count):
        centre = rng.uniform(-0.5, 0.5, len(shape)) * radius
        semi_axes = rng.uniform(0.15, 0.45, len(shape)) * radius
        density += rng.uniform(0.3, 1.0) * ellipsoid(shape, semi_axes, centre,
                                                     rng.uniform(0, np.pi))
    return density * envelope


def random_smooth(shape, diameter, rng, correlation_length=2.0):
    envelope = _envelope(shape, diameter / 2.0, rng)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), correlation_length, mode="wrap")
    field /= field[envelope].std() or 1.0
    density = np.clip(1.0 + 0.3 * field, 0.3, None)
    return density * envelope


def cluster(shape, diameter, rng, count=10):
    radius = diameter / 2.0
    sizes = rng.uniform(0.2, 0.34, count) * radius
    centres = [np.zeros(len(shape))]
    for i in range(1, count):
        for _ in range(50):                   # stick onto an earlier particle, inside the envelope
            j = int(rng.integers(max(0, i - 3), i))     # onto a recent one: an extended chain
            direction = rng.standard_normal(len(shape))
            direction /= np.linalg.norm(direction)
            centre = centres[j] + direction * (sizes[i] + sizes[j]) * 0.95
            if np.linalg.norm(centre) + sizes[i] <= radius:
                break
        centres.append(centre)
    density = np.zeros(shape)
    for centre, size in zip(centres, sizes):
        density = np.maximum(density, rng.uniform(0.5, 1.0) * ellipsoid(shape, [size] * len(shape), centre))
    return density


def holes(shape, diameter, rng, count=4):
    radius = diameter / 2.0
    envelope = _envelope(shape, radius, rng)
    density = 0.6 * envelope.astype(np.float64)
    for _ in range(count):
        centre = rng.uniform(-0.45, 0.45, len(shape)) * radius
        density[ellipsoid(shape, rng.uniform(0.08, 0.18, len(shape)) * radius, centre,
                          rng.uniform(0, np.pi))] = 0.0
    for _ in range(count):
        centre = rng.uniform(-0.45, 0.45, len(shape)) * radius
        density += 0.5 * ellipsoid(shape, rng.uniform(0.06, 0.14, len(shape)) * radius, centre)
    return density * envelope


def polygon(shape, diameter, rng, faces=None):
    radius = diameter / 2.0
    coords = _coordinates(shape)
    faces = faces or (7 if len(shape) == 2 else 12)
    inside = ball(shape, radius)
    for _ in range(faces):
        normal = rng.standard_normal(len(shape))
        normal /= np.linalg.norm(normal)
        distance = rng.uniform(0.6, 1.0) * radius
        inside &= sum(c * n for c, n in zip(coords, normal)) <= distance
    normal = rng.standard_normal(len(shape))
    wedge = inside & (sum(c * n for c, n in zip(coords, normal)) > 0.3 * radius)
    return inside.astype(np.float64) + 0.6 * wedge


MODELS = {"disc": disc, "shapes": shapes, "random_smooth": random_smooth, "cluster": cluster,
          "holes": holes, "polygon": polygon}


def model_object(kind, shape, diameter, seed=0, correlation_length=2.0, max_phase=0.0):
    """A centred model object (real, or complex when max_phase > 0)."""
    rng = np.random.default_rng(seed)
    if kind == "random_smooth":
        density = random_smooth(shape, diameter, rng, correlation_length)
    else:
        density = MODELS[kind](shape, diameter, rng)
    if not max_phase:
        return density
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0 * correlation_length,
                                    mode="wrap")
    field *= max_phase / (np.abs(field[density > 0]).max() or 1.0)
    return density * np.exp(1j * field)


def far_field_intensity(obj):
    """|FT[obj]|^2 with zero frequency at the array centre (index n//2)."""
    axes = tuple(range(obj.ndim))
    spectrum = np.fft.fftn(np.fft.ifftshift(obj, axes=axes), axes=axes)
    return np.fft.fftshift(np.abs(spectrum) ** 2, axes=axes)
