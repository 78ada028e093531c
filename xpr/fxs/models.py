"""Model particles for fxs simulations: unions of homogeneous spheres, cubes and tetrahedra
(disks, squares and triangles in 2-D), as in xFrame's ``shapes`` settings.

Each shape has a centre given in spherical (r, θ, φ) [3-D] or polar (r, φ) [2-D] coordinates,
a size in Å and a density (electrons per Å³, or any consistent unit):

* ``sphere``      radius = size                       (2-D: disk of radius size)
* ``cube``        half edge = size (an ∞-norm ball)   (2-D: square)
* ``tetrahedron`` regular, circumradius = size        (2-D: equilateral triangle)

Unrotated orientation: cube faces normal to x, y, z; tetrahedron vertices along (1,1,1),
(1,−1,−1), (−1,1,−1), (−1,−1,1); triangle vertices at 90°, 210°, 330°. ``random_orientation``
rotates the shape about its own centre by a uniformly random rotation (seeded).

Overlapping shapes add their densities. The scattering amplitude of the model is analytic:

    F(q) = ∫ ρ(r) e^{−i q·r} dr = Σ_shapes ρ_s · FormFactor_s(q) · e^{−i q·c_s},

(sphere: V·3(sin x − x cos x)/x³, disk: A·2J_1(x)/x, cube/square: products of sinc, simplex:
the divided-difference formula d!·V·Σ_j e^{a_j}/Π_{k≠j}(a_j−a_k), a_j = −i q·v_j), so the
intensity |F(q)|² can be evaluated exactly at any q — on the reciprocal grid for
``simulate_ccd`` and at the detector pixels of ``simulate_patterns``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import factorial

import numpy as np
from scipy.spatial.transform import Rotation
from scipy.special import j1

from xpr.errors import InputError
from .grids import spherical_point

SHAPE_TYPES = ("sphere", "cube", "tetrahedron")


def _tetrahedron_vertices(circumradius: float) -> np.ndarray:
    v = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], float) / np.sqrt(3)
    return v * circumradius


def _triangle_vertices(circumradius: float) -> np.ndarray:
    a = np.deg2rad([90.0, 210.0, 330.0])
    return circumradius * np.stack([np.cos(a), np.sin(a)], axis=-1)


def random_rotation(dimensions: int, rng) -> np.ndarray:
    """Uniformly random rotation matrix (d × d) drawn from ``rng`` (numpy Generator)."""
    if dimensions == 3:
        return Rotation.random(random_state=rng).as_matrix()
    angle = rng.uniform(0, 2 * np.pi)
    return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])


def exp_divided_difference(a: np.ndarray) -> np.ndarray:
    """Divided difference e[a_0, …, a_d] of exp over the last axis of a (complex).

    Closed form Σ_j e^{a_j}/Π_{k≠j}(a_j−a_k) where the nodes are well separated; for nearly
    coinciding nodes the (0, d) element of exp of the bidiagonal matrix (diag a, superdiag 1),
    which is the same number without cancellation.
    """
    a = np.asarray(a, dtype=np.complex128)
    d = a.shape[-1] - 1
    flat = a.reshape(-1, d + 1)
    diff = flat[:, :, None] - flat[:, None, :]
    off_diagonal = ~np.eye(d + 1, dtype=bool)
    separation = np.abs(diff[:, off_diagonal]).min(axis=-1)
    np.einsum("nii->ni", diff)[...] = 1.0
    close = separation < 2e-2
    out = np.empty(flat.shape[0], dtype=np.complex128)
    good = ~close
    if good.any():
        out[good] = (np.exp(flat[good]) / diff[good].prod(axis=-1)).sum(axis=-1)
    if close.any():
        m = np.zeros((int(close.sum()), d + 1, d + 1), dtype=np.complex128)
        idx = np.arange(d + 1)
        m[:, idx, idx] = flat[close]
        m[:, idx[:-1], idx[1:]] = 1.0
        out[close] = _batched_expm(m)[:, 0, d]
    return out.reshape(a.shape[:-1])


def _batched_expm(m: np.ndarray, order: int = 18) -> np.ndarray:
    """exp of a stack of small matrices: Taylor series of degree ``order`` after scaling by 2^−s
    (‖m/2^s‖ ≤ ½), then s squarings."""
    norm = np.abs(m).sum(axis=-2).max(axis=-1).max(initial=0.0)
    s = max(0, int(np.ceil(np.log2(norm / 0.5)))) if norm > 0.5 else 0
    scaled = m / 2.0 ** s
    eye = np.broadcast_to(np.eye(m.shape[-1], dtype=m.dtype), m.shape)
    result = eye.copy()
    term = eye.copy()
    for k in range(1, order + 1):
        term = term @ scaled / k
        result = result + term
    for _ in range(s):
        result = result @ result
    return result


@dataclass
class Shape:
    """One homogeneous shape: kind, centre (Cartesian, Å), size (Å), density, rotation matrix."""
    kind: str
    center: np.ndarray
    size: float
    density: float
    rotation: np.ndarray

    @property
    def dimensions(self) -> int:
        return len(self.center)

    def vertices(self) -> np.ndarray:
        """Absolute vertex positions of a simplex (tetrahedron/triangle)."""
        local = (_tetrahedron_vertices if self.dimensions == 3 else _triangle_vertices)(self.size)
        return local @ self.rotation.T + self.center

    @property
    def volume(self) -> float:
        d, s = self.dimensions, self.size
        if self.kind == "sphere":
            return 4 / 3 * np.pi * s ** 3 if d == 3 else np.pi * s ** 2
        if self.kind == "cube":
            return (2 * s) ** d
        v = self.vertices()
        return abs(np.linalg.det(v[1:] - v[0])) / factorial(d)

    @property
    def extent(self) -> float:
        """Largest distance of a point of the shape from the model origin."""
        if self.kind == "sphere":
            return float(np.linalg.norm(self.center) + self.size)
        if self.kind == "cube":
            return float(np.linalg.norm(self.center) + self.size * np.sqrt(self.dimensions))
        return float(np.linalg.norm(self.vertices(), axis=-1).max())

    def indicator(self, points: np.ndarray) -> np.ndarray:
        """1 inside, 0 outside for points (..., d) in Å."""
        local = (points - self.center) @ self.rotation          # body frame
        if self.kind == "sphere":
            return (np.sum(local ** 2, axis=-1) <= self.size ** 2).astype(float)
        if self.kind == "cube":
            return (np.max(np.abs(local), axis=-1) <= self.size).astype(float)
        v = self.vertices()
        t = np.linalg.inv((v[1:] - v[0]).T)                    # barycentric coordinates
        lam = (points - v[0]) @ t.T
        inside = np.all(lam >= 0, axis=-1) & (np.sum(lam, axis=-1) <= 1)
        return inside.astype(float)

    def amplitude(self, q: np.ndarray) -> np.ndarray:
        """Analytic ∫_shape ρ e^{−i q·r} dr at momentum transfers q (..., d), Å⁻¹."""
        q = np.asarray(q, float)
        d = self.dimensions
        if self.kind == "tetrahedron":
            a = -1j * (q @ self.vertices().T)                     # (..., d+1)
            return self.density * factorial(d) * self.volume * exp_divided_difference(a)
        phase = np.exp(-1j * (q @ self.center))
        if self.kind == "sphere":
            x = np.linalg.norm(q, axis=-1) * self.size
            small = x < 1e-3
            xs = np.where(small, 1.0, x)
            if d == 3:
                form = np.where(small, 1 - x ** 2 / 10, 3 * (np.sin(xs) - xs * np.cos(xs)) / xs ** 3)
            else:
                form = np.where(small, 1 - x ** 2 / 8, 2 * j1(xs) / xs)
            return self.density * self.volume * form * phase
        local = q @ self.rotation                                 # q in the body frame
        form = np.prod(np.sinc(local * self.size / np.pi), axis=-1)
        return self.density * self.volume * form * phase


@dataclass
class ParticleModel:
    """A particle made of shapes; density and amplitude are sums over them."""
    shapes: list = field(default_factory=list)

    @property
    def dimensions(self) -> int:
        return self.shapes[0].dimensions

    @property
    def extent(self) -> float:
        return max(s.extent for s in self.shapes)

    def density(self, points) -> np.ndarray:
        points = np.asarray(points, float)
        return sum(s.density * s.indicator(points) for s in self.shapes)

    def amplitude(self, q) -> np.ndarray:
        q = np.asarray(q, float)
        return sum(s.amplitude(q) for s in self.shapes)

    def intensity(self, q) -> np.ndarray:
        return np.abs(self.amplitude(q)) ** 2

    def rotated(self, rotation: np.ndarray) -> "ParticleModel":
        """The whole particle turned about the origin by ``rotation`` (active)."""
        return ParticleModel([Shape(s.kind, rotation @ s.center, s.size, s.density,
                                    rotation @ s.rotation) for s in self.shapes])


def model_from_settings(shapes_settings, dimensions: int, rng=None, file=None) -> ParticleModel:
    """Build the model from xFrame-style ``shapes`` settings (types, centers, sizes, densities,
    random_orientation); ``rng`` (numpy Generator) draws the random orientations."""
    rng = rng if rng is not None else np.random.default_rng(0)
    keys = ("types", "centers", "sizes", "densities", "random_orientation")
    values = {k: list(shapes_settings[k]) if not isinstance(shapes_settings[k], (str, bytes))
              else [shapes_settings[k]] for k in keys}
    n = len(values["types"])
    for k in keys:
        if len(values[k]) != n:
            raise InputError(f"shapes.{k} has {len(values[k])} entries but shapes.types has {n}; "
                             "give one entry per shape", file=file, key=f"shapes.{k}")
    if n == 0:
        raise InputError("no shapes given", file=file, key="shapes.types")
    shapes = []
    for i in range(n):
        kind = str(values["types"][i]).lower()
        if kind == "thetrahedron":          # xFrame's spelling
            kind = "tetrahedron"
        if kind not in SHAPE_TYPES:
            raise InputError(f"unknown shape type {kind!r}; choose from {list(SHAPE_TYPES)}",
                             file=file, key=f"shapes.types[{i}]")
        center = np.atleast_1d(np.asarray(values["centers"][i], float))
        if len(center) != dimensions:
            raise InputError(f"centre {tuple(center)} has {len(center)} coordinates; "
                             f"{dimensions}-D centres are {'(r, theta, phi)' if dimensions == 3 else '(r, phi)'}",
                             file=file, key=f"shapes.centers[{i}]")
        size = float(values["sizes"][i])
        if size <= 0:
            raise InputError(f"shape size must be positive, got {size}", file=file, key=f"shapes.sizes[{i}]")
        rotation = random_rotation(dimensions, rng) if bool(values["random_orientation"][i]) \
            else np.eye(dimensions)
        shapes.append(Shape(kind, spherical_point(center), size, float(values["densities"][i]), rotation))
    return ParticleModel(shapes)
