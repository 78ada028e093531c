"""ZYZ Euler angles (RELION / SPIDER / Xmipp, Heymann et al. 2005) and distances between orientations.

A(rot, tilt, psi) = R_z(psi) R_y(tilt) R_z(rot), with R_z(a) = [[cos a, sin a, 0], [−sin a, cos a, 0],
[0, 0, 1]] and R_y(b) = [[cos b, 0, −sin b], [0, 1, 0], [sin b, 0, cos b]].  The rows of A are the
image x axis, the image y axis and the beam direction, written in the volume's frame.
"""
from __future__ import annotations

import numpy as np


def rotation_matrices(rot, tilt, psi):
    """A for arrays (or scalars) of angles in degrees; shape (..., 3, 3)."""
    a, b, g = (np.deg2rad(np.asarray(v, dtype=float)) for v in (rot, tilt, psi))
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    matrix = np.empty(np.broadcast(a, b, g).shape + (3, 3))
    matrix[..., 0, 0] = cg * cb * ca - sg * sa
    matrix[..., 0, 1] = cg * cb * sa + sg * ca
    matrix[..., 0, 2] = -cg * sb
    matrix[..., 1, 0] = -sg * cb * ca - cg * sa
    matrix[..., 1, 1] = -sg * cb * sa + cg * ca
    matrix[..., 1, 2] = sg * sb
    matrix[..., 2, 0] = sb * ca
    matrix[..., 2, 1] = sb * sa
    matrix[..., 2, 2] = cb
    return matrix


def euler_angles(matrices):
    """(rot, tilt, psi) in degrees of rotation matrices (..., 3, 3), with tilt in [0, 180]."""
    m = np.asarray(matrices, dtype=float)
    sin_tilt = np.hypot(m[..., 0, 2], m[..., 1, 2])
    tilt = np.arctan2(sin_tilt, m[..., 2, 2])
    regular = sin_tilt > 1e-9
    rot = np.where(regular, np.arctan2(m[..., 2, 1], m[..., 2, 0]), 0.0)
    # at tilt 0 (or 180) only rot ± psi is defined: put all of it into psi
    psi_gimbal = np.where(m[..., 2, 2] > 0, np.arctan2(m[..., 0, 1], m[..., 0, 0]),
                          np.arctan2(m[..., 0, 1], -m[..., 0, 0]))
    psi = np.where(regular, np.arctan2(m[..., 1, 2], -m[..., 0, 2]), psi_gimbal)
    return np.rad2deg(rot), np.rad2deg(tilt), np.rad2deg(psi)


def random_rotations(rng, n: int):
    """n rotations drawn uniformly from SO(3) (normalised Gaussian quaternions)."""
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def rotation_angle_deg(relative):
    """Rotation angle (degrees) of rotation matrices (..., 3, 3): the geodesic distance on SO(3)."""
    r = np.asarray(relative)
    cosine = 0.5 * (np.trace(r, axis1=-2, axis2=-1) - 1.0)
    axis = np.stack([r[..., 2, 1] - r[..., 1, 2], r[..., 0, 2] - r[..., 2, 0], r[..., 1, 0] - r[..., 0, 1]], -1)
    return np.rad2deg(np.arctan2(0.5 * np.linalg.norm(axis, axis=-1), cosine))


def angular_error_deg(estimated, true, group=None):
    """Geodesic angle between estimated and true orientations (n, 3, 3), minimised over the point
    group: orientations A and A g (g in the group) give identical projections of a symmetric volume."""
    estimated, true = np.asarray(estimated), np.asarray(true)
    if group is None:
        group = np.eye(3)[None]
    relative = np.einsum("nij,gjk,nlk->ngil", estimated, group, true)
    return rotation_angle_deg(relative).min(axis=1)
