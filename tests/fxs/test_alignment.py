"""Alignment of reconstructions: shift, rotation, point inversion / mirror; PRTF."""
from __future__ import annotations

import numpy as np
import pytest

from xpr.backend import Backend
from xpr.fxs.alignment import (WignerD, align, centre, euler_to_matrix, prtf, relative_error, rigid_motion)
from xpr.fxs.grids import build_grid
from xpr.fxs.grids import gaussian_blobs as blobs
from xpr.fxs.transforms import FourierTransformPair


def rotation_angle_deg(R):
    """Angle of a rotation matrix (2-D or 3-D)."""
    if len(R) == 2:
        return float(abs(np.degrees(np.arctan2(R[1, 0], R[0, 0]))))
    return float(np.degrees(np.arccos(np.clip((np.trace(R) - 1) / 2, -1, 1))))


@pytest.fixture(scope="module")
def backend():
    return Backend(False, "double")


@pytest.mark.parametrize("mirror", [False, True])
def test_2d_rotated_shifted_copy_is_aligned_back(backend, mirror):
    """A copy turned by 137 deg (optionally mirrored; the 2-D point inversion is a turn by pi) and
    shifted by (23, -11) Å comes back within 2 deg and one radial grid step."""
    grid = build_grid(2, 64, 0.5, 48)
    transform = FourierTransformPair(grid, backend)
    model = blobs(grid, [(0, 0), (45, 5), (-15, 35)], [16, 10, 9], [1.0, 2.0, 1.5])
    reference, _ = centre(model, grid, transform)
    angle = np.radians(137.0)
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    motion = turn @ (np.diag([1.0, -1.0]) if mirror else np.eye(2))
    shift = np.array([23.0, -11.0])
    copy = rigid_motion(reference, grid, rotation=motion, shift=shift, order=3)

    aligned, info = align(copy, reference, transform)

    assert info.inverted == mirror
    residual = info.rotation @ motion                         # identity when the motion is undone
    assert rotation_angle_deg(residual) < 2.0
    assert np.linalg.norm(info.shift + shift) < grid.dr       # the centring undid the shift
    assert relative_error(aligned, reference, grid) < 0.05
    assert info.correlation > 0.998


@pytest.mark.parametrize("inverted", [False, True])
def test_3d_rotated_shifted_inverted_copy_is_aligned_back(backend, inverted):
    """SO(3) search (FFT grid over Wigner-D correlations + local refinement) finds an arbitrary
    rotation, with or without the point inversion, to better than 2 deg; the shift to one step."""
    grid = build_grid(3, 32, 0.25, 16)
    transform = FourierTransformPair(grid, backend)
    model = blobs(grid, [(0, 0, 0), (90, 0, 0), (-30, 70, 20), (10, -20, 80)], [25, 18, 18, 15],
                  [30, 50, 20, 40])
    reference, _ = centre(model, grid, transform)
    rotation = euler_to_matrix(2.1, 1.1, -2.0)
    motion = -rotation if inverted else rotation
    shift = np.array([20.0, -10.0, 15.0])
    copy = rigid_motion(reference, grid, rotation=motion, shift=shift, order=3)

    aligned, info = align(copy, reference, transform, search_order=10, wigner=WignerD(16))

    assert info.inverted == inverted
    assert rotation_angle_deg(info.rotation @ motion) < 2.0
    assert np.linalg.norm(info.shift + shift) < grid.dr
    assert relative_error(aligned, reference, grid) < 0.05


def test_wigner_matrices_are_unitary_and_compose():
    """D(R1) D(R2) = D(R1 R2) for the Euler-angle convention used (R = Rz(a) Ry(b) Rz(c))."""
    from scipy.spatial.transform import Rotation

    w = WignerD(6)
    a, b = (0.3, 1.2, -0.8), (1.9, 0.4, 2.5)
    product = euler_to_matrix(*a) @ euler_to_matrix(*b)
    c = Rotation.from_matrix(product).as_euler("ZYZ")
    for l in (1, 4, 6):
        Da, Db, Dc = w.matrix(l, *a), w.matrix(l, *b), w.matrix(l, *c)
        assert np.abs(Da @ Da.conj().T - np.eye(2 * l + 1)).max() < 1e-12
        assert np.abs(Da @ Db - Dc).max() < 1e-10


def test_prtf_is_one_for_consistent_phases_and_falls_as_one_over_sqrt_k_for_random_ones():
    grid = build_grid(2, 16, 0.2, 8)
    rng = np.random.default_rng(0)
    shape = grid.angular_shape + (1, grid.n_radial)
    modulus = rng.random(shape) + 0.5
    same = np.repeat(modulus * np.exp(1j * rng.random(shape)), 5, axis=-2)
    assert np.allclose(prtf(same, grid), 1.0)
    k = 400
    random = modulus * np.exp(2j * np.pi * rng.random(grid.angular_shape + (k, grid.n_radial)))
    assert np.all(np.abs(prtf(random, grid) * np.sqrt(k) - 1) < 0.35)
