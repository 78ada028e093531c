"""xpr em simulate_focal: specimen geometry, electrostatic phase, image formation and its sign
convention, noise, and the file `tie` reads."""
from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from xpr.backend import Backend
from xpr.em.tie import focal_series, specimens
from xpr.em.optics import electron_wavelength_A, interaction_constant

CPU = Backend(False, "double")


def test_sphere_phase_is_interaction_constant_times_potential_times_chord():
    shape, pixel, radius = (64, 64), 1e-9, 20e-9
    thickness = specimens.sphere_thickness_m(shape, pixel, radius)
    phase, amplitude = specimens.electrostatic_phase_and_amplitude(thickness, 17.0, 1.0, 300.0)
    sigma_per_V_m = interaction_constant(300.0) * 1e10
    assert thickness[32, 32] == pytest.approx(2 * radius)                  # centre pixel, r = 0
    assert phase[32, 32] == pytest.approx(sigma_per_V_m * 17.0 * 2 * radius, rel=1e-12)
    assert amplitude[32, 32] == pytest.approx(math.exp(-sigma_per_V_m * 1.0 * 2 * radius))
    # volume: Σ t · pixel² = 4/3 π R³ (to the pixel sampling)
    assert thickness.sum() * pixel ** 2 == pytest.approx(4 / 3 * math.pi * radius ** 3, rel=0.01)


def test_polyhedron_and_ellipsoid_chords_integrate_to_their_volumes():
    shape, pixel = (200, 200), 0.5e-9
    rotation = Rotation.from_euler("xyz", [0.4, 0.7, 0.2]).as_matrix()
    side = 30e-9
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]) * side / 2
    cube = specimens.convex_polyhedron_thickness_m(shape, pixel, corners @ rotation.T)
    assert cube.sum() * pixel ** 2 == pytest.approx(side ** 3, rel=0.01)
    assert cube.max() <= side * math.sqrt(3) * (1 + 1e-9)                   # the body diagonal
    axes = (20e-9, 12e-9, 8e-9)
    ellipsoid = specimens.ellipsoid_thickness_m(shape, pixel, axes, rotation, (3e-9, -5e-9))
    assert ellipsoid.sum() * pixel ** 2 == pytest.approx(4 / 3 * math.pi * np.prod(axes), rel=0.01)


def test_images_conserve_the_electron_count():
    shape, pixel = (64, 64), 1e-9
    thickness = specimens.sphere_thickness_m(shape, pixel, 15e-9)
    phase, amplitude = specimens.electrostatic_phase_and_amplitude(thickness, 17.0, 1.0, 300.0)
    wavelength = electron_wavelength_A(300.0) * 1e-10
    transfers = [focal_series.transfer_function(CPU, shape, pixel, wavelength, d,
                                                spherical_aberration_m=1e-3)
                 for d in (-5e-6, 0.0, 3e-6)]
    images = focal_series.focal_series_images(CPU, amplitude * np.exp(1j * phase), transfers)
    np.testing.assert_allclose(images.mean(axis=(1, 2)), np.mean(amplitude ** 2), rtol=1e-10)


def test_defocus_sign_convention_gives_the_transport_of_intensity_equation():
    """With T = exp(+iπλΔf q²), (I₊ − I₋)/2Δf → (λ/2π) ∇·(I∇φ) as Δf → 0."""
    shape, pixel = (128, 128), 1e-9
    y, x = specimens.pixel_coordinates_m(shape, pixel)
    phase = 0.8 * np.exp(-(x ** 2 + (y - 5e-9) ** 2) / (2 * (12e-9) ** 2))
    intensity = 1.0 - 0.3 * np.exp(-((x - 8e-9) ** 2 + y ** 2) / (2 * (15e-9) ** 2))
    wavelength = electron_wavelength_A(300.0) * 1e-10
    defocus = 20e-9
    images = focal_series.focal_series_images(
        CPU, np.sqrt(intensity) * np.exp(1j * phase),
        [focal_series.transfer_function(CPU, shape, pixel, wavelength, d) for d in (-defocus, defocus)])
    derivative = (images[1] - images[0]) / (2 * defocus)
    grad_y, grad_x = np.gradient(phase, pixel)
    flux = np.gradient(intensity * grad_y, pixel, axis=0) + np.gradient(intensity * grad_x, pixel, axis=1)
    expected = wavelength / (2 * math.pi) * flux
    assert np.sqrt(np.mean((derivative - expected) ** 2)) < 0.01 * np.abs(expected).max()


@pytest.mark.parametrize("kind", ["poisson", "gaussian"])
def test_noise_has_the_stated_relative_level(kind):
    rng = np.random.default_rng(5)
    clean = np.full((1, 256, 256), 2.0)
    noisy = focal_series.add_noise(clean, kind, 0.01, rng)
    assert np.std(noisy - clean) / clean.mean() == pytest.approx(0.01, rel=0.03)


def test_misalignment_round_trip():
    rng = np.random.default_rng(2)
    from scipy import ndimage

    image = ndimage.gaussian_filter(np.pad(rng.random((40, 40)), 30, constant_values=0.5), 2.0)
    moved = focal_series.similarity_transform(image, 2.0, 1.02, (1.5, -2.0))
    back = focal_series.inverse_similarity_transform(moved, 2.0, 1.02, (1.5, -2.0))
    interior = (slice(30, 70), slice(30, 70))
    assert np.sqrt(np.mean((back - image)[interior] ** 2)) < 0.02 * image[interior].std()
    assert np.sqrt(np.mean((moved - image)[interior] ** 2)) > 0.5 * image[interior].std()


def test_simulate_focal_writes_what_tie_reads(home, run_xpr, tmp_path):
    settings = tmp_path / "small.yaml"
    settings.write_text("structure_name: small\nimaging: {image_size: 64, pixel_size_m: 1.0e-9}\n"
                        "specimen: {radius_m: 1.5e-8}\nflip_series: true\nnoise: {kind: none}\n")
    result = run_xpr(["-q", "em", "simulate_focal", settings])
    assert result.exit_code == 0, result.output
    with h5py.File(home / "data/em/simulate_focal/small.h5") as f:
        images, defocus = f["images"][()], f["defocus_m"][()]
        flipped, exact = f["images_flipped"][()], f["exact_phase"][()]
        assert f.attrs["accelerating_voltage_kV"] == 300.0
        assert f.attrs["pixel_size_m"] == pytest.approx(1e-9)
    np.testing.assert_allclose(defocus, [-5e-6, 0.0, 5e-6])
    assert images.shape == flipped.shape == (3, 64, 64)
    sigma_per_V_m = interaction_constant(300.0) * 1e10
    assert exact.max() == pytest.approx(sigma_per_V_m * 17.0 * 3e-8, rel=1e-5)
    # electrostatic sphere: the turned-over specimen's images are the mirrored images
    np.testing.assert_allclose(flipped, images[:, :, ::-1], rtol=1e-5, atol=1e-6)
    # in focus the image is the exit wave's intensity, exp(−2σV_i t)
    in_focus = images[1]
    assert in_focus.min() == pytest.approx(math.exp(-2 * sigma_per_V_m * 1.0 * 3e-8), rel=1e-4)


def test_projected_potential_from_a_file(home, run_xpr, tmp_path):
    """specimen.kind file: φ = σ Re∫V dz, amplitude exp(−σ Im∫V dz), ∫V dz in V·Å."""
    y, x = np.mgrid[:48, :48] - 24
    projected = (300.0 + 20.0j) * np.exp(-(x ** 2 + y ** 2) / 50.0)
    np.save(tmp_path / "potential.npy", projected)
    settings = tmp_path / "fromfile.yaml"
    settings.write_text(f"structure_name: fromfile\nimaging: {{image_size: 48, pixel_size_m: 1.0e-9}}\n"
                        f"specimen: {{kind: file, potential_file: {tmp_path / 'potential.npy'}}}\n"
                        "noise: {kind: none}\n")
    result = run_xpr(["-q", "em", "simulate_focal", settings])
    assert result.exit_code == 0, result.output
    sigma = interaction_constant(300.0)
    with h5py.File(home / "data/em/simulate_focal/fromfile.h5") as f:
        np.testing.assert_allclose(f["exact_phase"][()], sigma * projected.real, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(f["exact_amplitude"][()], np.exp(-sigma * projected.imag), rtol=1e-5)
        np.testing.assert_allclose(f["images"][1], np.exp(-2 * sigma * projected.imag), rtol=1e-4)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(settings.read_text().replace("image_size: 48", "image_size: 64"))
    result = run_xpr(["em", "simulate_focal", wrong])
    assert result.exit_code == 2 and "shape" in result.output
