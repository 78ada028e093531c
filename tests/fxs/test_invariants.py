"""Invariants B_l / B_n and the cross-correlation they determine."""
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from xpr.fxs.grids import ewald_theta, reciprocal_radial_points
from xpr.fxs.invariants import (average_intensity_from_invariants, deg2_invariants_2d, deg2_invariants_3d,
                                ewald_cos_psi, invariants_to_cc, model_intensity_coefficients)
from xpr.fxs.models import model_from_settings


def small_model(dims):
    centers = [(0, 0, 0), (15, 1.2, 0.4), (14, 2.0, 3.0)] if dims == 3 else [(0, 0), (15, 0.4), (14, 3.0)]
    return model_from_settings(dict(types=["sphere", "cube", "tetrahedron"], centers=centers, sizes=[8, 5, 9],
                                    densities=[1, 2, 1.5], random_orientation=[False, True, True]),
                               dims, np.random.default_rng(3))


def invariants(model, q, L):
    c = model_intensity_coefficients(model, q, L)
    return deg2_invariants_3d(c) if model.dimensions == 3 else deg2_invariants_2d(c)


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("dims", [2, 3])
def test_invariants_do_not_change_when_the_particle_turns(dims):
    model = small_model(dims)
    q = reciprocal_radial_points(0.3, 10)
    b = invariants(model, q, 16)
    if dims == 3:
        turn = Rotation.from_euler("zyz", [0.3, 1.1, -0.7]).as_matrix()
    else:
        turn = np.array([[np.cos(1.3), -np.sin(1.3)], [np.sin(1.3), np.cos(1.3)]])
    b_turned = invariants(model.rotated(turn), q, 16)
    for l in range(0, 17, 2):
        assert rel(b_turned[l], b[l]) < 1e-8
    # the harmonic coefficients themselves do change
    assert not np.allclose(model_intensity_coefficients(model, q, 4), model_intensity_coefficients(model.rotated(turn), q, 4))


@pytest.mark.parametrize("dims", [2, 3])
def test_b0_is_the_squared_average_intensity(dims):
    model = small_model(dims)
    q = reciprocal_radial_points(0.3, 6)
    b = invariants(model, q, 8)
    # direct average of |F|² over many random directions on each shell
    rng = np.random.default_rng(0)
    u = rng.normal(size=(200000, dims))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    mean = np.array([model.intensity(qk * u).mean() for qk in q])
    assert np.allclose(average_intensity_from_invariants(b[0], dims), mean, rtol=5e-3)
    # odd orders of the intensity of a real density vanish (Friedel)
    assert all(np.abs(b[l]).max() < 1e-10 * np.abs(b[0]).max() for l in range(1, 9, 2))


def test_curved_cross_correlation_two_routes_and_monte_carlo():
    model = small_model(3)
    q = reciprocal_radial_points(0.3, 6)
    L, lam = 20, 1.5
    b = invariants(model, q, L)
    harmonic = invariants_to_cc(b, q, 3, 2 * (L + 1), lam, "back_substitution")
    direct = invariants_to_cc(b, q, 3, 2 * (L + 1), lam, "lstsq")
    assert np.abs(harmonic - direct).max() < 1e-9 * np.abs(direct).max()
    # against the definition: average over random orientations of I(q1 at θ1, Δ) I(q2 at θ2, 0)
    theta = ewald_theta(q, lam)
    i1, i2, k = 1, 4, 7
    delta = 2 * np.pi * k / (2 * (L + 1))
    v1 = q[i1] * np.array([np.sin(theta[i1]) * np.cos(delta), np.sin(theta[i1]) * np.sin(delta), np.cos(theta[i1])])
    v2 = q[i2] * np.array([np.sin(theta[i2]), 0.0, np.cos(theta[i2])])
    rots = Rotation.random(40000, random_state=5).as_matrix()
    samples = model.intensity(np.einsum("nij,j->ni", rots, v1)) * model.intensity(np.einsum("nij,j->ni", rots, v2))
    error = samples.std() / np.sqrt(len(samples))
    assert abs(samples.mean() - harmonic[i1, i2, k]) < 4 * error
    assert np.isclose(np.cos(np.arccos(ewald_cos_psi(theta[i1], theta[i2], delta))),
                      v1 @ v2 / (q[i1] * q[i2]))


def test_flat_limit_and_2d_cross_correlation():
    model = small_model(3)
    q = reciprocal_radial_points(0.3, 5)
    b = invariants(model, q, 12)
    flat = invariants_to_cc(b, q, 3, 26, 1.5, "legendre")
    tiny_wavelength = invariants_to_cc(b, q, 3, 26, 1e-7, "back_substitution")
    assert np.abs(flat - tiny_wavelength).max() < 1e-6 * np.abs(flat).max()
    # 2-D: C(q1, q2, Δ) = ⟨I(q1, φ+Δ) I(q2, φ)⟩_φ for one orientation (the average over in-plane turns)
    m2 = small_model(2)
    b2 = invariants(m2, q, 40)
    cc = invariants_to_cc(b2, q, 2, 82)
    phi = 2 * np.pi * np.arange(82) / 82
    ring = np.array([m2.intensity(qk * np.stack([np.cos(phi), np.sin(phi)], -1)) for qk in q])
    direct = np.array([[[np.mean(np.roll(ring[a], -k) * ring[c]) for k in range(82)] for c in range(5)] for a in range(5)])
    assert np.abs(cc - direct).max() < 1e-6 * np.abs(direct).max()
