"""The reciprocal projection of FXS phasing and the transforms it runs on."""
from __future__ import annotations

import numpy as np
import pytest

from xpr.backend import Backend
from xpr.fxs.alignment import WignerD, harmonic_coefficients, from_coefficients, rotate_coefficients_3d
from xpr.fxs.fxs_phasing import FourierTransformPair, build_grid
from xpr.fxs.fxs_phasing import gaussian_blobs as blobs
from xpr.fxs.reciprocal_projection import (InvariantProjection, constraint_from_density, invariants_from_coefficients,
                                           procrustes_unitary)


@pytest.fixture(scope="module")
def backend():
    return Backend(False, "double")


@pytest.mark.parametrize("dimensions,tolerance_forward,tolerance_round_trip", [(3, 1e-10, 1e-10), (2, 3e-3, 5e-3)])
def test_gaussian_transform_matches_analytic(backend, dimensions, tolerance_forward, tolerance_round_trip):
    """F(q) = Int rho e^{-iq.x}: an off-centre Gaussian has F = (2 pi)^{d/2} s^d e^{-q^2 s^2/2} e^{-iq.c}."""
    grid = build_grid(dimensions, 48, 0.25, 24)
    transform = FourierTransformPair(grid, backend)
    centre, s = np.array([60.0, 20.0, -30.0][:dimensions]), 40.0
    rho = blobs(grid, [centre], [s], [1.0])[..., None, :]
    amplitude = transform.forward(rho)[..., 0, :]
    q = grid.cartesian_points("reciprocal")
    exact = (2 * np.pi) ** (dimensions / 2) * s ** dimensions * np.exp(-np.sum(q ** 2, -1) * s ** 2 / 2) \
        * np.exp(-1j * q @ centre)
    assert np.linalg.norm(amplitude - exact) / np.linalg.norm(exact) < tolerance_forward
    back = transform.inverse(transform.forward(rho)).real
    assert np.linalg.norm(back - rho) / np.linalg.norm(rho) < tolerance_round_trip


def test_procrustes_recovers_the_unitary_factor():
    """I = V U0 exactly: the SVD solution of min ||V U - I|| is U0 itself."""
    rng = np.random.default_rng(3)
    n_q, rank, k = 20, 5, 7
    V = rng.standard_normal((n_q, rank)) + 1j * rng.standard_normal((n_q, rank))
    Q, _ = np.linalg.qr(rng.standard_normal((k, k)) + 1j * rng.standard_normal((k, k)))
    U0 = Q[:rank]                                               # orthonormal rows
    U = procrustes_unitary(V, (V @ U0)[None])[0]
    assert np.abs(U - U0).max() < 1e-10
    assert np.abs(U @ U.conj().T - np.eye(rank)).max() < 1e-12


@pytest.mark.parametrize("dimensions", [3, 2])
def test_projection_keeps_every_rotation_of_the_solution(backend, dimensions):
    """The constraint holds only invariants: the model and any rotation of it are fixed points
    (modulus error ~ 0), while a different density is changed and afterwards reproduces B_l."""
    grid = build_grid(dimensions, 32, 0.3, 12)
    transform = FourierTransformPair(grid, backend)
    model = blobs(grid, [(0, 0, 0)[:dimensions], (60, 10, 0)[:dimensions], (-20, 50, 30)[:dimensions]],
                  [25, 15, 15], [1.0, 2.0, 1.5])
    model = from_coefficients(harmonic_coefficients(model, transform), transform)   # band-limited to L
    constraint, invariants = constraint_from_density(model, transform)
    projection = InvariantProjection(transform, constraint)
    coefficients = harmonic_coefficients(model, transform)
    if dimensions == 3:
        turned = from_coefficients(rotate_coefficients_3d(coefficients, transform.ms, WignerD(12), (0.4, 1.0, -0.7)),
                                   transform)
    else:
        turned = from_coefficients(coefficients * np.exp(-1j * transform.ms * 0.9)[:, None], transform)
    for density in (model, turned):
        projected, e_mod = projection(density[..., None, :])
        assert e_mod[0] < 1e-5          # numerically 0 (sqrt of I near its zeros amplifies round-off)
        assert np.linalg.norm(projected[..., 0, :] - density) / np.linalg.norm(density) < 1e-3

    other = blobs(grid, [(30, 0, 0)[:dimensions]], [30], [1.0])[..., None, :]
    _, e_mod = projection(other)
    assert e_mod[0] > 0.05
    intensity = np.abs(transform.forward(other)) ** 2
    projected_intensity = projection.project_intensity(intensity)
    c = transform.real_harmonic_coefficients(projected_intensity)[..., 0, :]
    b = invariants_from_coefficients(c, dimensions, transform.ms)
    for l in range(2, 9, 2):
        assert np.linalg.norm(b[l] - invariants[l]) / np.linalg.norm(invariants[l]) < 1e-8


@pytest.mark.parametrize("dimensions", [2, 3])
def test_real_field_transforms_equal_the_complex_ones(dimensions):
    """The m >= 0 paths for real fields: harmonic_of_real == harmonic, real_inverse_harmonic ==
    Re(inverse_harmonic) for any coefficients (not only Hermitian ones), real_inverse ==
    Re(inverse), to round-off (1e-12 in double precision)."""
    grid = build_grid(dimensions, 16, 0.3, 7)
    transform = FourierTransformPair(grid, Backend(False, "double"))
    rng = np.random.default_rng(5)
    field = rng.standard_normal(grid.angular_shape + (2, 16))
    full = transform.harmonic(field.astype(complex))
    assert np.max(np.abs(transform.harmonic_of_real(field) - full)) < 1e-12 * np.max(np.abs(full))
    coefficients = rng.standard_normal(full.shape) + 1j * rng.standard_normal(full.shape)
    synthesis = transform.inverse_harmonic(coefficients).real
    assert np.max(np.abs(transform.real_inverse_harmonic(coefficients) - synthesis)) < 1e-12 * np.max(np.abs(synthesis))
    amplitude = transform.forward(field)
    density = transform.inverse(amplitude).real
    assert np.max(np.abs(transform.real_inverse(amplitude) - density)) < 1e-12 * np.max(np.abs(density))
