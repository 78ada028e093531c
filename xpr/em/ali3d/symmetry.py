"""Point groups of single particles: cn, dn and the platonic groups t, o, i, as rotation matrices.

Orientation of the symmetry axes (RELION's defaults):
  cn  the n-fold axis along z;
  dn  cn plus a two-fold axis along x;
  t   two-fold axes along x, y, z and three-fold axes along the body diagonals (±1, ±1, ±1);
  o   four-fold axes along x, y, z;
  i   two-fold axes along x, y, z and five-fold axes through the vertices (0, ±1, ±φ) and their
      cyclic permutations (the Crowther 222 setting, RELION's I2).
Each group is generated from its generators by closure, so its order (n, 2n, 12, 24, 60) is a check.
"""
from __future__ import annotations

import re

import numpy as np

_SYMBOL = re.compile(r"^([cd])(\d+)$|^([toi])$")


def axis_rotation(axis, angle_rad: float):
    """Right-handed rotation by angle about a unit vector (Rodrigues)."""
    u = np.asarray(axis, dtype=float)
    u = u / np.linalg.norm(u)
    cross = np.array([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]])
    return np.eye(3) + np.sin(angle_rad) * cross + (1.0 - np.cos(angle_rad)) * cross @ cross


def parse(symbol: str) -> str:
    """Normalised symbol ('c1', 'd2', 't', 'o', 'i'); ValueError for anything else."""
    text = str(symbol).strip().lower()
    match = _SYMBOL.match(text)
    if not match or (match.group(2) is not None and int(match.group(2)) < 1):
        raise ValueError(f"unknown point group '{symbol}' (expected cN, dN with N >= 1, t, o or i)")
    return text


def generators(symbol: str) -> list:
    symbol = parse(symbol)
    z, x, y = (0, 0, 1), (1, 0, 0), (0, 1, 0)
    if symbol[0] in "cd":
        n = int(symbol[1:])
        gens = [axis_rotation(z, 2 * np.pi / n)]
        if symbol[0] == "d":
            gens.append(axis_rotation(x, np.pi))
        return gens
    if symbol == "t":
        return [axis_rotation(z, np.pi), axis_rotation(x, np.pi), axis_rotation((1, 1, 1), 2 * np.pi / 3)]
    if symbol == "o":
        return [axis_rotation(z, np.pi / 2), axis_rotation(x, np.pi / 2)]
    golden = (1 + np.sqrt(5)) / 2
    return [axis_rotation(z, np.pi), axis_rotation(x, np.pi), axis_rotation(y, np.pi),
            axis_rotation((0, 1, golden), 2 * np.pi / 5)]


def group_matrices(symbol: str, max_order: int = 120):
    """All rotations of the group, identity first; shape (order, 3, 3)."""
    elements = [np.eye(3)]
    keys = {tuple(np.round(np.eye(3), 6).ravel())}
    frontier = list(elements)
    gens = generators(symbol)
    while frontier:
        new = []
        for element in frontier:
            for gen in gens:
                product = gen @ element
                key = tuple(np.round(product, 6).ravel() + 0.0)
                if key not in keys:
                    keys.add(key)
                    new.append(product)
        elements.extend(new)
        frontier = new
        if len(elements) > max_order:
            raise ValueError(f"the generators of '{symbol}' do not close into a finite group")
    return np.array(elements)


def symmetrize_volume(volume, group):
    """Average of the volume over the group's rotations (trilinear, about the box centre n // 2)."""
    from scipy.ndimage import affine_transform

    n = volume.shape[0]
    centre = np.full(3, n // 2, dtype=float)
    total = np.zeros(volume.shape, dtype=float)
    for g in group:
        # array axes are (z, y, x): conjugate the (x, y, z) matrix by the axis reversal
        g_zyx = g[::-1, ::-1]
        total += affine_transform(volume, g_zyx, offset=centre - g_zyx @ centre, order=1)
    return (total / len(group)).astype(volume.dtype)


def point_group(symbol, key):
    """group_matrices(symbol), a bad symbol an InputError naming the settings `key` (exit 2)."""
    from xpr.errors import InputError

    try:
        return group_matrices(symbol)
    except ValueError as err:
        raise InputError(str(err), key=key) from None
