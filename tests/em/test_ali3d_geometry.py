"""Euler angles, point groups and the Kaiser–Bessel gridding kernel of local_ali3d."""
import numpy as np
import pytest
from scipy.integrate import quad

from xpr.em.ali3d import euler, symmetry
from xpr.em.ali3d.gridding import KaiserBessel


def test_euler_round_trip_and_beam_direction():
    rng = np.random.default_rng(0)
    matrices = euler.random_rotations(rng, 500)
    back = euler.rotation_matrices(*euler.euler_angles(matrices))
    np.testing.assert_allclose(back, matrices, atol=1e-12)
    # the third row of A is the beam direction at polar angle tilt and azimuth rot (RELION)
    a = euler.rotation_matrices(30.0, 40.0, 75.0)
    t, r = np.deg2rad(40.0), np.deg2rad(30.0)
    np.testing.assert_allclose(a[2], [np.sin(t) * np.cos(r), np.sin(t) * np.sin(r), np.cos(t)], atol=1e-14)
    # gimbal lock: tilt 0 keeps only rot + psi, tilt 180 only psi − rot
    for tilt in (0.0, 180.0):
        m = euler.rotation_matrices(25.0, tilt, 40.0)
        np.testing.assert_allclose(euler.rotation_matrices(*euler.euler_angles(m)), m, atol=1e-12)


def test_angular_error_is_the_rotation_angle():
    a = euler.rotation_matrices(10.0, 50.0, 20.0)
    tilted = euler.rotation_matrices(10.0, 53.0, 20.0)
    assert euler.angular_error_deg(tilted[None], a[None])[0] == pytest.approx(3.0, abs=1e-9)


@pytest.mark.parametrize("symbol, order", [("c1", 1), ("c7", 7), ("d2", 4), ("d5", 10), ("t", 12), ("o", 24),
                                           ("i", 60)])
def test_point_groups_close_with_their_order(symbol, order):
    group = symmetry.group_matrices(symbol)
    assert len(group) == order
    np.testing.assert_allclose(group @ group.transpose(0, 2, 1), np.broadcast_to(np.eye(3), group.shape), atol=1e-12)
    keys = {tuple(np.round(g, 6).ravel() + 0.0) for g in group}
    for g in group[: min(order, 12)]:
        for h in group:
            assert tuple(np.round(g @ h, 6).ravel() + 0.0) in keys
    # equivalent orientations A g have zero error modulo the group
    rng = np.random.default_rng(1)
    a = euler.random_rotations(rng, len(group))
    assert euler.angular_error_deg(a @ group, a, group).max() < 1e-6


@pytest.mark.parametrize("symbol", ["x3", "c0", "d", "i2", "c-2", ""])
def test_unknown_point_groups_are_refused(symbol):
    with pytest.raises(ValueError, match="point group"):
        symmetry.group_matrices(symbol)


def test_kaiser_bessel_apodization_is_the_kernel_transform():
    kb = KaiserBessel(4, 2.0)
    assert kb.beta == pytest.approx(np.pi * np.sqrt(4 * 2.25 - 0.8))
    for xi in (0.0, 0.1, 0.25, 0.4, 0.6):
        numeric, _ = quad(lambda u: kb.kernel(u) * np.cos(2 * np.pi * u * xi), -2, 2, limit=200)
        assert kb.apodization(xi) == pytest.approx(numeric, rel=1e-7, abs=1e-10)
    # the tabulated weights used for interpolation agree with the kernel
    u = np.random.default_rng(2).uniform(-5, 5, 1000)
    first, weights = kb.neighbours(u)
    exact = kb.kernel(u[:, None] - (first[:, None] + np.arange(4)))
    np.testing.assert_allclose(weights, exact, atol=2e-6)
