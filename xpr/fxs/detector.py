"""Flat-detector geometry of single-shot fxs patterns.

Frame: the beam travels along −z and hits the detector plane z = −D (``sample_distance``) at the
``detector_origin`` [row, column] (pixel coordinates; pixel (i, j) has its centre at row i,
column j). A pixel at in-plane position (x, y) (x along columns, y along rows) at distance
R = √(x²+y²+D²) from the sample records the momentum transfer

    q = k (x/R, y/R, 1 − D/R),   k = 2π/λ,   |q| = 2k sin θ_s,

whose polar angle from +z is θ(q) = arccos(qλ/4π) and whose azimuth is φ = atan2(y, x): the
Ewald-sphere convention of ``grids.ewald_theta``. Its solid angle is ΔΩ = A·D/R³ (A = pixel area).
In 2-D the detector is a flat window on the (q_x, q_y) plane: q = |q|(cos φ, sin φ).

Units in the settings follow xFrame's correlate: pixel size in µm, distance in mm, λ in Å.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xpr.errors import InputError

UM_TO_A = 1.0e4
MM_TO_A = 1.0e7


@dataclass(frozen=True)
class Detector:
    shape: tuple            # (rows, columns)
    pixel_size: float       # µm
    sample_distance: float  # mm
    wavelength: float       # Å
    origin: tuple           # (row, column) of the direct beam, pixels

    @classmethod
    def from_settings(cls, detector_settings, file=None, key_prefix="detector"):
        shape = tuple(int(v) for v in detector_settings.image_dimensions)
        origin = tuple(float(v) for v in detector_settings.detector_origin)
        det = cls(shape, float(detector_settings.pixel_size), float(detector_settings.sample_distance),
                  float(detector_settings.wavelength), origin)
        det.check(file=file, key_prefix=key_prefix)
        return det

    def check(self, file=None, key_prefix="detector"):
        if len(self.shape) != 2 or min(self.shape) < 2:
            raise InputError(f"image_dimensions must be [rows, columns] ≥ 2, got {list(self.shape)}",
                             file=file, key=f"{key_prefix}.image_dimensions")
        if len(self.origin) != 2:
            raise InputError("detector_origin is [row, column]", file=file, key=f"{key_prefix}.detector_origin")
        row, col = self.origin
        if not (0 <= row <= self.shape[0] - 1 and 0 <= col <= self.shape[1] - 1):
            raise InputError(f"detector origin {list(self.origin)} lies outside the "
                             f"{self.shape[0]}×{self.shape[1]} image", file=file,
                             key=f"{key_prefix}.detector_origin")
        for name, value in (("pixel_size", self.pixel_size), ("sample_distance", self.sample_distance),
                            ("wavelength", self.wavelength)):
            if value <= 0:
                raise InputError(f"{name} must be positive, got {value}", file=file, key=f"{key_prefix}.{name}")

    @property
    def k(self) -> float:
        return 2 * np.pi / self.wavelength

    def pixel_positions(self):
        """(x, y) in Å of every pixel centre relative to the origin, arrays of the image shape."""
        rows, cols = np.indices(self.shape, dtype=float)
        return (cols - self.origin[1]) * self.pixel_size * UM_TO_A, (rows - self.origin[0]) * self.pixel_size * UM_TO_A

    def q_vectors(self, dimensions: int = 3) -> np.ndarray:
        """(rows, cols, d) momentum transfer of every pixel, Å⁻¹."""
        x, y = self.pixel_positions()
        d = self.sample_distance * MM_TO_A
        r = np.sqrt(x ** 2 + y ** 2 + d ** 2)
        q3 = self.k * np.stack([x / r, y / r, 1 - d / r], axis=-1)
        if dimensions == 3:
            return q3
        magnitude = np.linalg.norm(q3, axis=-1)
        phi = np.arctan2(y, x)
        return np.stack([magnitude * np.cos(phi), magnitude * np.sin(phi)], axis=-1)

    def solid_angles(self) -> np.ndarray:
        """ΔΩ of every pixel, sr."""
        x, y = self.pixel_positions()
        d = self.sample_distance * MM_TO_A
        area = (self.pixel_size * UM_TO_A) ** 2
        return area * d / (x ** 2 + y ** 2 + d ** 2) ** 1.5

    def radius_of_q(self, q) -> np.ndarray:
        """In-plane distance (Å) from the origin at which momentum transfer q is recorded."""
        s = np.asarray(q, float) * self.wavelength / (4 * np.pi)
        if np.any(s >= 1):
            raise InputError("q beyond 4π/λ cannot be recorded", key="grid.max_q")
        two_theta = 2 * np.arcsin(s)
        return self.sample_distance * MM_TO_A * np.tan(two_theta)

    def polar_coordinates(self, q, phis) -> np.ndarray:
        """(2, N_q, n_φ) fractional pixel coordinates [row, column] of the polar sampling points."""
        radius = self.radius_of_q(q)[:, None] / (self.pixel_size * UM_TO_A)
        rows = self.origin[0] + radius * np.sin(phis)[None, :]
        cols = self.origin[1] + radius * np.cos(phis)[None, :]
        return np.stack([rows, cols])

    def polar_inside(self, q, phis) -> np.ndarray:
        """(N_q, n_φ) True where the polar sampling point lies on the detector."""
        rows, cols = self.polar_coordinates(q, phis)
        return (rows >= 0) & (rows <= self.shape[0] - 1) & (cols >= 0) & (cols <= self.shape[1] - 1)

    def max_full_ring_q(self) -> float:
        """Largest q whose whole ring lies on the detector."""
        row, col = self.origin
        edge = min(row, col, self.shape[0] - 1 - row, self.shape[1] - 1 - col) * self.pixel_size * UM_TO_A
        two_theta = np.arctan(edge / (self.sample_distance * MM_TO_A))
        return 4 * np.pi * np.sin(two_theta / 2) / self.wavelength

    def to_tree(self) -> dict:
        return {"image_dimensions": np.array(self.shape), "pixel_size": self.pixel_size,
                "sample_distance": self.sample_distance, "wavelength": self.wavelength,
                "detector_origin": np.array(self.origin)}
