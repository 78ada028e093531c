"""3-D scalar fields -> VTK structured grids (.vts) through pyvista, for ParaView users.

Cartesian grids take the axes' coordinates; spherical grids take (r, θ, φ) axes (θ polar angle
from +z, φ azimuth) and are written with their Cartesian point positions, as xFrame does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from xpr.io.atomic import atomic_path


def _points(grid: str, axes):
    if grid == "cartesian":
        x, y, z = np.meshgrid(*axes, indexing="ij")
        return x, y, z
    if grid == "spherical":
        r, theta, phi = np.meshgrid(*axes, indexing="ij")
        return r * np.sin(theta) * np.cos(phi), r * np.sin(theta) * np.sin(phi), r * np.cos(theta)
    raise ValueError(f"grid must be 'cartesian' or 'spherical', not {grid!r}")


def save_vts(path, values, grid: str = "cartesian", axes=None, spacing=(1.0, 1.0, 1.0), origin=None) -> Path:
    """Write one or several 3-D fields (array or dict name -> array) on one grid.

    axes: three 1-D coordinate arrays (cartesian: x, y, z; spherical: r, θ, φ). Without axes a
    cartesian grid of `spacing` centred on the origin (or starting at `origin`) is used.
    Complex fields are written as their modulus (name) and phase (name + '_phase').
    """
    import pyvista

    fields = values if isinstance(values, dict) else {"density": values}
    shape = np.shape(next(iter(fields.values())))
    if len(shape) != 3:
        raise ValueError(f"VTK structured grids need 3-D fields, got shape {shape}")
    if axes is None:
        start = origin if origin is not None else [-(n // 2) * d for n, d in zip(shape, spacing)]
        axes = [s + d * np.arange(n) for s, d, n in zip(start, spacing, shape)]
    x, y, z = _points(grid, [np.asarray(a, dtype=float) for a in axes])
    mesh = pyvista.StructuredGrid(x, y, z)
    for name, field in fields.items():
        field = np.asarray(field)
        if np.iscomplexobj(field):
            mesh.point_data[name] = np.abs(field).ravel(order="F")
            mesh.point_data[name + "_phase"] = np.angle(field).ravel(order="F")
        else:
            mesh.point_data[name] = field.ravel(order="F")
    path = Path(path)
    with atomic_path(path) as tmp:
        mesh.save(str(tmp))
    return path
