"""xpr em tie: solvers against exact answers, the acceptance case of issue 7, the statement of
the in-focus intensity, registration, and bad input."""
from __future__ import annotations

import math

import h5py
import numpy as np
import pytest

from xpr.backend import Backend
from xpr.em.tie import focal_series, specimens, solvers as tie_solvers
from xpr.em.optics import electron_wavelength_A
from xpr.io import save_tree

CPU = Backend(False, "double")


def write(tmp_path, name, text):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# Solvers
# ---------------------------------------------------------------------------------------------

def test_tikhonov_inverse_laplacian_damps_each_mode_by_its_filter():
    n, pixel = 64, 1e-9
    y, x = np.mgrid[:n, :n] * pixel
    q_x = 3 / (n * pixel)
    mode = np.cos(2 * math.pi * q_x * x)
    laplacian = -(2 * math.pi * q_x) ** 2 * mode
    exact = tie_solvers.FourierOperators(CPU, (n, n), pixel, q_c=0.0)
    np.testing.assert_allclose(exact.inverse_laplacian(laplacian), mode, atol=1e-12)
    q_c = 2 / (n * pixel)
    damped = tie_solvers.FourierOperators(CPU, (n, n), pixel, q_c=q_c).inverse_laplacian(laplacian)
    np.testing.assert_allclose(damped, mode * q_x ** 4 / (q_x ** 2 + q_c ** 2) ** 2, atol=1e-12)
    cut = tie_solvers.FourierOperators(CPU, (n, n), pixel, q_c=0.0, q_max=2 / (n * pixel))
    np.testing.assert_allclose(cut.inverse_laplacian(laplacian), 0.0, atol=1e-12)


def test_intensity_derivative_is_exact_for_a_quadratic_focal_dependence():
    rng = np.random.default_rng(0)
    a, b, c = rng.random((3, 8, 8))
    defocus = np.array([-4e-6, -1e-6, 0.0, 2e-6, 5e-6])
    images = np.stack([a + b * d + c * d ** 2 for d in defocus])
    derivative, in_focus = tie_solvers.intensity_derivative(np, images, defocus, order=2)
    np.testing.assert_allclose(derivative, b, rtol=1e-8)
    np.testing.assert_allclose(in_focus, a, rtol=1e-8)
    pair_derivative, pair_mean = tie_solvers.intensity_derivative(np, images[[1, 3]], defocus[[1, 3]])
    np.testing.assert_allclose(pair_mean, (images[1] + images[3]) / 2 - (images[3] - images[1])
                               / (defocus[3] - defocus[1]) * (defocus[1] + defocus[3]) / 2, rtol=1e-8)


@pytest.mark.parametrize("boundary", ["none", "mirror", "pad"])
def test_uniform_tie_inverts_first_order_data(boundary):
    """k ∂I/∂Δf = I0 ∇²φ for uniform I0: the solver returns φ (compact φ, any boundary)."""
    n, pixel = 96, 1e-9
    y, x = specimens.pixel_coordinates_m((n, n), pixel)
    width = 8e-9
    r2 = x ** 2 + (y - 4e-9) ** 2
    phase = np.exp(-r2 / (2 * width ** 2))
    laplacian = phase * (r2 / width ** 4 - 2 / width ** 2)
    k = 2 * math.pi / (electron_wavelength_A(300.0) * 1e-10)
    derivative = 0.9 * laplacian / k
    edge = tie_solvers.Boundary(np, boundary, (n, n))
    extended = edge.extend(derivative)
    operators = tie_solvers.FourierOperators(CPU, extended.shape, pixel, q_c=0.0)
    retrieved = edge.crop(tie_solvers.solve_tie_uniform(operators, extended, k, 0.9))
    assert tie_solvers.rms_error_in_window(retrieved, phase, 0.35) < 0.01


def test_full_tie_inverts_first_order_data_of_an_absorbing_object():
    """k ∂I/∂Δf = ∇·(I∇φ) with I∇φ curl-free (φ and I both radial): Teague's solution is exact."""
    n, pixel = 128, 1e-9
    y, x = specimens.pixel_coordinates_m((n, n), pixel)
    r2 = x ** 2 + y ** 2
    phase = 2.0 * np.exp(-r2 / (2 * (10e-9) ** 2))
    intensity = 1.0 - 0.5 * np.exp(-r2 / (2 * (14e-9) ** 2))
    operators = tie_solvers.FourierOperators(CPU, (n, n), pixel, q_c=0.0)
    k = 2 * math.pi / (electron_wavelength_A(300.0) * 1e-10)
    grad_y, grad_x = operators.gradient(phase)
    derivative = operators.divergence(intensity * grad_y, intensity * grad_x) / k
    full = tie_solvers.solve_tie_full(operators, derivative, k, intensity, epsilon=0.0)
    uniform = tie_solvers.solve_tie_uniform(operators, derivative, k, float(intensity.mean()))
    assert tie_solvers.rms_error_in_window(full, phase, 0.35) < 1e-6
    assert tie_solvers.rms_error_in_window(uniform, phase, 0.35) > 0.1


def test_rms_error_ignores_offset_and_outside_of_the_window():
    truth = np.zeros((100, 100))
    retrieved = truth + 3.0
    retrieved[:5, :5] = 100.0                          # corners lie outside radius 0.35·N
    assert tie_solvers.rms_error_in_window(retrieved, truth, 0.35) == pytest.approx(0.0, abs=1e-12)


def test_registration_recovers_a_known_misalignment_across_defocus():
    rng = np.random.default_rng(3)
    n, pixel = 128, 1e-9
    thickness = specimens.random_particles_thickness_m((n, n), pixel, "polyhedra", 5, 12e-9, rng)
    phase, amplitude = specimens.electrostatic_phase_and_amplitude(thickness, 17.0, 3.0, 300.0)
    wavelength = electron_wavelength_A(300.0) * 1e-10
    images = focal_series.focal_series_images(
        CPU, amplitude * np.exp(1j * phase),
        [focal_series.transfer_function(CPU, (n, n), pixel, wavelength, d) for d in (0.0, 2e-6)])
    images = focal_series.add_noise(images, "poisson", 0.01, rng)
    moved = focal_series.similarity_transform(images[1], -2.0, 1.01, (-3.3, 4.2))
    aligned, estimate = focal_series.register_to_reference(images[0], moved)
    assert estimate["rotation_deg"] == pytest.approx(-2.0, abs=0.1)
    assert estimate["scale"] == pytest.approx(1.01, abs=0.004)
    assert estimate["shift_px"] == pytest.approx((-3.3, 4.2), abs=0.1)
    interior = (slice(20, -20), slice(20, -20))
    assert (np.abs(aligned - images[1])[interior].mean()
            < 0.25 * np.abs(moved - images[1])[interior].mean())


@pytest.mark.parametrize("n", [64, 63])
def test_band_limited_magnification_is_exact_for_a_band_limited_image(n):
    """undo_similarity's magnification (the closed-form Dirichlet interpolation matrix) samples a
    periodic band-limited image at scaled positions exactly: a sum of the field's own Fourier
    modes, up to the highest one of odd n (even n: up to n/2 − 1, whose partner −(n/2 − 1) is
    also resolved), equals its analytic values at A (p − c) + c; whole-pixel positions give
    the identity."""
    rng = np.random.default_rng(1)
    centre = (n - 1) / 2.0
    top = (n - 1) // 2 if n % 2 else n // 2 - 1
    modes = [(int(rng.integers(-top, top + 1)), int(rng.integers(-top, top + 1)),
              rng.normal(), rng.uniform(0, 2 * np.pi)) for _ in range(6)] + [(top, -top, 1.0, 0.3)]

    def field(y, x):
        return 2.0 + sum(a * np.cos(2 * np.pi * (ky * y + kx * x) / n + p) for ky, kx, a, p in modes)

    y, x = np.mgrid[:n, :n].astype(float)
    image = field(y, x)
    scale = 1.0037
    out = focal_series.undo_similarity(image, 0.0, scale, (0.0, 0.0), margin_px=0)
    expected = field(scale * (y - centre) + centre, scale * (x - centre) + centre)
    inside = focal_series.valid_after_undo(image.shape, 0.0, scale, (0.0, 0.0), 0)
    np.testing.assert_allclose(out[inside], expected[inside], atol=1e-9)
    identity = focal_series._fourier_resample_matrix(n, np.arange(n, dtype=float))
    np.testing.assert_allclose(identity, np.eye(n), atol=1e-12)


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

def test_acceptance_sphere_512_default_settings(home, run_xpr, tmp_path):
    """Issue 7: 512², 300 kV, sphere, ±5 µm, 1 % noise; tie's defaults (TIE + GS–Misell)."""
    settings = write(tmp_path, "acceptance", "structure_name: sphere\n")
    result = run_xpr(["-q", "em", "simulate_focal", settings, "tie", settings])
    assert result.exit_code == 0, result.output
    with h5py.File(home / "data/em/tie/sphere.h5") as out, \
         h5py.File(home / "data/em/simulate_focal/sphere.h5") as data:
        assert data["images"].shape == (3, 512, 512)
        exact = data["exact_phase"][()]
        phase, phase_tie = out["phase"][()], out["phase_tie"][()]
        stored_refined = out["errors/rms_refined_rad"][()]
        stored_tie = out["errors/rms_tie_rad"][()]
        assert out.attrs["in_focus_intensity_source"] == "in-focus image"
    refined = tie_solvers.rms_error_in_window(phase, exact, 0.35)
    plain = tie_solvers.rms_error_in_window(phase_tie, exact, 0.35)
    assert refined <= 0.06
    assert 0.08 <= plain <= 0.12                 # TIE's own floor at ±5 µm (0.096–0.10 elsewhere)
    assert refined < 0.5 * plain
    assert stored_refined == pytest.approx(refined, rel=1e-4)
    assert stored_tie == pytest.approx(plain, rel=1e-4)


def _pair_settings(tmp_path):
    simulation = write(tmp_path, "pair_simulation", "structure_name: pair\n"
                       "imaging: {image_size: 128, pixel_size_m: 1.0e-9, defocus_m: [-5.0e-6, 5.0e-6]}\n"
                       "specimen: {radius_m: 2.5e-8}\n")
    return simulation, write(tmp_path, "pair", "structure_name: pair\n")


def test_without_in_focus_image_the_intensity_used_is_stated(home, run_xpr, tmp_path):
    simulation, settings = _pair_settings(tmp_path)
    assert run_xpr(["-q", "em", "simulate_focal", simulation]).exit_code == 0
    errors = {}
    for source in ("auto", "fit"):
        result = run_xpr(["-q", "em", "tie", settings, "-o", f"tie.in_focus_intensity={source}",
                          "-o", "refinement.method=none"])
        assert result.exit_code == 0, result.output
        with h5py.File(home / "data/em/tie/pair.h5") as out:
            errors[source] = out["errors/rms_tie_rad"][()]
            stated = out.attrs["in_focus_intensity_source"]
        log_text = (home / "data/em/tie/pair.h5").resolve().parent.joinpath("run.log").read_text()
        assert "no in-focus image" in log_text and stated in log_text
        assert ("corrected" in stated) == (source == "auto")
    assert "(I₊+I₋)/2" in stated
    # the forward-model correction of the averaged intensity removes much of its error
    assert errors["auto"] < 0.7 * errors["fit"]
    result = run_xpr(["em", "tie", settings, "-o", "tie.in_focus_intensity=image"])
    assert result.exit_code == 2
    assert "defocus 0" in result.output


def test_least_squares_refinement_beats_plain_tie(home, run_xpr, tmp_path):
    simulation = write(tmp_path, "small_simulation", "structure_name: small\n"
                       "imaging: {image_size: 128, pixel_size_m: 1.0e-9}\nspecimen: {radius_m: 2.5e-8}\n")
    settings = write(tmp_path, "small", "structure_name: small\n")
    assert run_xpr(["-q", "em", "simulate_focal", simulation]).exit_code == 0
    result = run_xpr(["-q", "em", "tie", settings, "-o", "refinement.method=least_squares",
                      "-o", "refinement.iterations=60"])
    assert result.exit_code == 0, result.output
    with h5py.File(home / "data/em/tie/small.h5") as out:
        plain, refined = out["errors/rms_tie_rad"][()], out["errors/rms_refined_rad"][()]
    assert refined < 0.5 * plain


def test_registration_in_tie_undoes_a_misaligned_series(home, run_xpr, tmp_path):
    simulation = write(tmp_path, "parts_simulation", "structure_name: parts\n"
                       "imaging: {image_size: 128, pixel_size_m: 1.0e-9, defocus_m: [-2.0e-6, 0.0, 2.0e-6]}\n"
                       "specimen: {kind: particles, radius_m: 1.2e-8, absorption_potential_V: 3.0,"
                       " particles: {count: 5}}\nseed: 3\n"
                       "misalignment: {rotation_deg: 2.0, scale: 0.01, shift_px: 3.0}\n")
    settings = write(tmp_path, "parts", "structure_name: parts\nrefinement: {method: none}\n")
    assert run_xpr(["-q", "em", "simulate_focal", simulation]).exit_code == 0
    errors = {}
    for enabled in ("false", "true"):
        # the correlation estimates alone (the misfit refinement is the slow test's subject)
        result = run_xpr(["-q", "em", "tie", settings, "-o", f"registration.enabled={enabled}",
                          "-o", "registration.refine=none"])
        assert result.exit_code == 0, result.output
        with h5py.File(home / "data/em/tie/parts.h5") as out:
            errors[enabled] = out["errors/rms_tie_rad"][()]
            if enabled == "true":
                estimated = out["registration/images/shift_px"][()]
    with h5py.File(home / "data/em/simulate_focal/parts.h5") as data:
        applied = data["misalignment/images/shift_px"][()]
    np.testing.assert_allclose(estimated, applied, atol=0.3)
    assert errors["true"] < 0.15 * errors["false"]


def _tie_aligned_unregistered_registered(home, run_xpr, settings, aligned, moved, options=()):
    """`em tie` on the aligned series, and on the moved one without and with registration (more
    `-o` options for all three in `options`). Returns the rms phase errors by label, the
    registered shifts, the applied shifts and which candidate the registration kept."""
    errors = {}
    for label, name, enabled in (("aligned", aligned, "false"), ("unregistered", moved, "false"),
                                 ("registered", moved, "true")):
        extra = [item for option in options for item in ("-o", option)]
        result = run_xpr(["-q", "em", "tie", settings, "-o", f"structure_name={name}",
                          "-o", f"registration.enabled={enabled}", *extra])
        assert result.exit_code == 0, result.output
        with h5py.File(home / f"data/em/tie/{name}.h5") as out:
            errors[label] = out["errors/rms_refined_rad"][()]
            if enabled == "true":
                estimated = out["registration/images/shift_px"][()]
                kept = out["registration/images/kept"][()]
    with h5py.File(home / f"data/em/simulate_focal/{moved}.h5") as data:
        applied = data["misalignment/images/shift_px"][()]
    return errors, estimated, applied, kept.decode() if isinstance(kept, bytes) else str(kept)


@pytest.mark.slow
def test_registration_of_a_strong_phase_object_matches_the_aligned_series(home, run_xpr, tmp_path):
    """Issue 19: ±5 µm series of a 40 nm sphere (phase 4 rad: its defocused images are lensed and
    fringed, unlike the in-focus one), 300 kV, 0.5 nm pixels, 1 % noise, the defocused images off
    by up to 3 px, 0.4° and 0.4 %. Registration used to make it worse (0.55 → 1.2 rad, a false
    scale of 1.17); now the result is within 20 % of the aligned series' and below 0.08 rad."""
    imaging = "imaging: {image_size: 256, pixel_size_m: 5.0e-10, defocus_m: [-5.0e-6, 0.0, 5.0e-6]}\n"
    write(tmp_path, "sphere_aligned", "structure_name: aligned\n" + imaging + "specimen: {radius_m: 2.0e-8}\n")
    write(tmp_path, "sphere_moved", "structure_name: moved\n" + imaging + "specimen: {radius_m: 2.0e-8}\n"
          "misalignment: {rotation_deg: 0.4, scale: 0.004, shift_px: 3.0}\n")
    settings = write(tmp_path, "sphere_tie", "structure_name: moved\n")
    for name in ("sphere_aligned", "sphere_moved"):
        assert run_xpr(["-q", "em", "simulate_focal", tmp_path / f"{name}.yaml"]).exit_code == 0
    errors, estimated, applied, kept = _tie_aligned_unregistered_registered(home, run_xpr, settings,
                                                                            "aligned", "moved")
    assert kept in ("refined", "registered", "shifts_only")
    np.testing.assert_allclose(estimated, applied, atol=0.25)
    assert errors["registered"] <= 0.08
    assert errors["registered"] <= 1.2 * errors["aligned"]
    assert errors["registered"] < 0.2 * errors["unregistered"]


@pytest.mark.slow
def test_registration_of_misaligned_particles_is_within_20_percent_of_the_aligned_series(home, run_xpr,
                                                                                     tmp_path):
    """Issue 19 item 1: 5 particles, 128², 1 nm pixels, ±5 µm + 0, 1 % noise, the defocused images
    off by up to 3 px, 0.5° and 0.4 %. The correlation estimates of rotation and scale are biased
    by the lens effect (0.055 rad registered vs 0.034 aligned before); with the joint refinement
    of shifts and magnifications on the series misfit (`registration.refine: shifts_scale`) within
    20 % of the aligned series (measured 0.034 vs 0.034)."""
    imaging = ("imaging: {image_size: 128, pixel_size_m: 1.0e-9, defocus_m: [-5.0e-6, 0.0, 5.0e-6]}\n"
               "specimen: {kind: particles, radius_m: 1.2e-8, particles: {count: 5}}\nseed: 3\n")
    write(tmp_path, "aligned", "structure_name: aligned\n" + imaging)
    write(tmp_path, "moved", "structure_name: moved\n" + imaging
          + "misalignment: {rotation_deg: 0.5, scale: 0.004, shift_px: 3.0}\n")
    settings = write(tmp_path, "particles_tie", "structure_name: moved\n")
    for name in ("aligned", "moved"):
        assert run_xpr(["-q", "em", "simulate_focal", tmp_path / f"{name}.yaml"]).exit_code == 0
    # the refinement as it was measured: from each candidate's TIE, 150 evaluations
    errors, estimated, applied, _ = _tie_aligned_unregistered_registered(
        home, run_xpr, settings, "aligned", "moved",
        options=("registration.refine=shifts_scale", "registration.refine_start=tie",
                 "registration.coarse_search_px=0", "registration.refine_evaluations=150"))
    with h5py.File(home / "data/em/tie/moved.h5") as out:
        scale = out["registration/images/scale"][()]
    with h5py.File(home / "data/em/simulate_focal/moved.h5") as data:
        applied_scale = data["misalignment/images/scale"][()]
    np.testing.assert_allclose(estimated, applied, atol=0.15)
    np.testing.assert_allclose(scale, applied_scale, atol=0.002)
    assert errors["registered"] <= 0.08
    assert errors["registered"] <= 1.2 * errors["aligned"]
    assert errors["registered"] < 0.2 * errors["unregistered"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["absorbing_seed3", "particles_seed4", "absorbing_seed7",
                                  "particles_seed7"])
def test_default_registration_is_within_20_percent_of_the_aligned_series(home, run_xpr, tmp_path, case):
    """Issue 19 item 1 with `tie`'s default registration (registration.enabled: true, all else
    default): 5 absorbing particles (V_i = 3 V, ±2 µm + 0, off by up to 3 px, 2°, 1 %), which the
    correlation estimates alone left at 0.147 rad (aligned 0.077), and 5 particles at ±5 µm
    (seed 4) whose correlation shifts were a pixel off (0.127 rad, aligned 0.043; the misfit
    refinement from them alone 0.087–0.095). Measured with the defaults: 0.077 and 0.045. Seed 7
    of each class was drawn after the defaults were chosen: 0.0715 (aligned 0.077, correlation
    only 0.063) and 0.030 (aligned 0.029, correlation only 0.053)."""
    kind, seed = case.split("_seed")
    if kind == "absorbing":
        imaging = ("imaging: {image_size: 128, pixel_size_m: 1.0e-9, defocus_m: [-2.0e-6, 0.0, 2.0e-6]}\n"
                   "specimen: {kind: particles, radius_m: 1.2e-8, absorption_potential_V: 3.0, "
                   "particles: {count: 5}}\n")
        misalignment = "misalignment: {rotation_deg: 2.0, scale: 0.01, shift_px: 3.0}\n"
    else:
        imaging = ("imaging: {image_size: 128, pixel_size_m: 1.0e-9, defocus_m: [-5.0e-6, 0.0, 5.0e-6]}\n"
                   "specimen: {kind: particles, radius_m: 1.2e-8, particles: {count: 5}}\n")
        misalignment = "misalignment: {rotation_deg: 0.5, scale: 0.004, shift_px: 3.0}\n"
    imaging += f"seed: {seed}\n"
    write(tmp_path, "aligned", "structure_name: aligned\n" + imaging)
    write(tmp_path, "moved", "structure_name: moved\n" + imaging + misalignment)
    settings = write(tmp_path, "tie", "structure_name: moved\n")
    for name in ("aligned", "moved"):
        assert run_xpr(["-q", "em", "simulate_focal", tmp_path / f"{name}.yaml"]).exit_code == 0
    errors, estimated, applied, _ = _tie_aligned_unregistered_registered(home, run_xpr, settings,
                                                                         "aligned", "moved")
    np.testing.assert_allclose(estimated, applied, atol=0.3)
    assert errors["registered"] <= 0.08
    assert errors["registered"] <= 1.2 * errors["aligned"]
    # unregistered: 2.48 and 0.217 rad (seed 4's misalignment is mild: registered 0.045); seed 7
    # 1.48 and 0.204
    assert errors["registered"] < 0.25 * errors["unregistered"]


def test_coarse_search_on_the_series_misfit_finds_shifts_a_pixel_off():
    """The self-consistency of the series judges whole-pixel errors of a shift estimate (issue
    19: on particles at ±5 µm the correlation estimates were 1 px off): of the misaligned
    defocused images of a 64² particle series (1 % noise), the one started a pixel off its true
    shift in both directions is moved back to it exactly by the coarse search on the series
    misfit (TIE + 5 sweeps), and the one started right stays."""
    from xpr.em.tie import tie
    from xpr.settings import Frozen, Schema

    rng = np.random.default_rng(5)
    n, pixel, defocus = 64, 1e-9, np.array([-5e-6, 0.0, 5e-6])
    thickness = specimens.random_particles_thickness_m((n, n), pixel, "polyhedra", 3, 10e-9, rng)
    phase, amplitude = specimens.electrostatic_phase_and_amplitude(thickness, 17.0, 1.0, 300.0)
    wavelength = electron_wavelength_A(300.0) * 1e-10
    images = focal_series.focal_series_images(
        CPU, amplitude * np.exp(1j * phase),
        [focal_series.transfer_function(CPU, (n, n), pixel, wavelength, d) for d in defocus])
    images = focal_series.add_noise(images, "poisson", 0.01, rng)
    true_shift = np.array([[1.3, -0.8], [0.0, 0.0], [-0.6, 1.7]])
    moved = images.copy()
    for i in (0, 2):
        moved[i] = focal_series.similarity_transform(images[i], 0.0, 1.0, tuple(true_shift[i]))
    series = focal_series.FocalSeries(path="simulated", images=moved, defocus_m=defocus,
                                      accelerating_voltage_kV=300.0, pixel_size_m=pixel)
    settings = Frozen(Schema.for_command("em", "tie").defaults)

    def undo(image, rotation=0.0, scale=1.0, shift=(0.0, 0.0)):
        return focal_series.undo_similarity(image, rotation, scale, tuple(shift), fill=moved[1])

    def misfit(candidate):
        return tie.series_misfit(CPU, series, candidate, settings, tie._NullArchive(), 5)

    start = (np.zeros(3), np.ones(3), true_shift + [[1.0, -1.0], [0.0, 0.0], [0.0, 0.0]])
    _, _, found = tie.coarse_shift_search(moved, [0, 2], start, undo, misfit, 2)
    np.testing.assert_allclose(found, true_shift, atol=1e-9)


def test_implausible_rotation_scale_estimates_fall_back_to_the_shift():
    """An estimate on its bound (the sphere's lensed image 'magnified') keeps the shift only."""
    n, pixel = 128, 1e-9
    thickness = specimens.sphere_thickness_m((n, n), pixel, 25e-9)
    phase, amplitude = specimens.electrostatic_phase_and_amplitude(thickness, 17.0, 1.0, 300.0)
    wavelength = electron_wavelength_A(300.0) * 1e-10
    images = focal_series.focal_series_images(
        CPU, amplitude * np.exp(1j * phase),
        [focal_series.transfer_function(CPU, (n, n), pixel, wavelength, d) for d in (0.0, -5e-6)])
    moved = focal_series.similarity_transform(images[1], 0.0, 1.0, (1.5, -2.0))
    estimate = focal_series.similarity_search(images[0], moved, (1.5, -2.0), 2.0, 20, 1.0, 0.01)
    assert "at its limit" in estimate["fallback"]
    assert estimate["scale"] == 1.0 and estimate["rotation_deg"] == 0.0
    assert estimate["shift_px"] == (1.5, -2.0)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def _series_file(path, images, defocus=(-5e-6, 0.0, 5e-6)):
    save_tree(path, {"images": images, "defocus_m": np.asarray(defocus)},
              attrs={"accelerating_voltage_kV": 300.0, "pixel_size_m": 1e-9})
    return path


def test_images_of_different_shapes_are_refused(home, run_xpr, tmp_path):
    data = _series_file(tmp_path / "mixed.h5", [np.ones((32, 32)), np.ones((32, 32)), np.ones((30, 32))])
    result = run_xpr(["em", "tie", "tutorial", "-o", f"input.focal_series={data}"])
    assert result.exit_code == 2
    assert "different shapes" in result.output


def test_zero_intensity_image_is_refused(home, run_xpr, tmp_path):
    images = np.ones((3, 32, 32))
    images[2] = 0.0
    data = _series_file(tmp_path / "dark.h5", images)
    result = run_xpr(["em", "tie", "tutorial", "-o", f"input.focal_series={data}"])
    assert result.exit_code == 2
    assert "zero intensity" in result.output


def test_defocus_of_the_opposite_sign_convention_is_detected(home, run_xpr, tmp_path):
    simulation = write(tmp_path, "sign_simulation", "structure_name: sign\n"
                       "imaging: {image_size: 128, pixel_size_m: 1.0e-9}\nspecimen: {radius_m: 2.5e-8}\n")
    settings = write(tmp_path, "sign", "structure_name: sign\n")
    assert run_xpr(["-q", "em", "simulate_focal", simulation]).exit_code == 0
    source = home / "data/em/simulate_focal/sign.h5"
    with h5py.File(source) as f:
        images, defocus = f["images"][()], f["defocus_m"][()]
    flipped_convention = _series_file(tmp_path / "opposite.h5", images, -defocus)
    result = run_xpr(["em", "tie", settings, "-o", f"input.focal_series={flipped_convention}"])
    assert result.exit_code == 2
    assert "sign convention" in result.output and "imaging.defocus_sign" in result.output
    # told so, tie reads the opposite convention and recovers the phase
    result = run_xpr(["-q", "em", "tie", settings, "-o", f"input.focal_series={flipped_convention}",
                      "-o", "imaging.defocus_sign=-1"])
    assert result.exit_code == 0, result.output
    with h5py.File(home / "data/em/tie/sign.h5") as out, h5py.File(source) as data:
        assert tie_solvers.rms_error_in_window(out["phase"][()], data["exact_phase"][()], 0.35) < 0.1


def test_missing_optics_are_refused(home, run_xpr, tmp_path):
    path = tmp_path / "bare.h5"
    save_tree(path, {"images": np.ones((2, 16, 16)), "defocus_m": np.array([-1e-6, 1e-6])})
    result = run_xpr(["em", "tie", "tutorial", "-o", f"input.focal_series={path}"])
    assert result.exit_code == 2
    assert "accelerating_voltage_kV" in result.output


# ---------------------------------------------------------------------------------------------
# Optional learned correction (extra `ml`)
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_learned_correction_improves_held_out_phases_and_round_trips(home, run_xpr, tmp_path):
    pytest.importorskip("torch")
    simulation = write(tmp_path, "ml_simulation", "structure_name: ml\n"
                       "imaging: {image_size: 64, pixel_size_m: 1.0e-9}\n"
                       "specimen: {kind: particles, radius_m: 1.2e-8, particles: {count: 3}}\nseed: 11\n")
    settings = write(tmp_path, "ml", "structure_name: ml\nrefinement: {method: none}\n"
                     "learned_correction:\n  train: true\n"
                     "  training: {pairs: 24, held_out: 6, image_size: 48, epochs: 60}\n")
    assert run_xpr(["-q", "em", "simulate_focal", simulation]).exit_code == 0
    result = run_xpr(["-q", "em", "tie", settings])
    assert result.exit_code == 0, result.output
    trained_file = (home / "data/em/tie/ml.h5").resolve()
    with h5py.File(trained_file) as out:
        without = out["errors/learned_held_out_without_rad"][()]
        with_correction = out["errors/learned_held_out_with_rad"][()]
        learned_phase = out["phase_learned"][()]
        assert out["errors/rms_learned_rad"][()] < out["errors/rms_tie_rad"][()]
    assert with_correction < 0.85 * without           # on pairs never trained on
    model = trained_file.parent / "learned_correction.pt"
    result = run_xpr(["-q", "em", "tie", "tutorial", "-o", "structure_name=ml",
                      "-o", "refinement.method=none", "-o", f"learned_correction.model={model}"])
    assert result.exit_code == 0, result.output
    with h5py.File(home / "data/em/tie/ml.h5") as out:
        np.testing.assert_allclose(out["phase_learned"][()], learned_phase, atol=1e-5)


def test_group_of_images_with_different_shapes_is_refused(home, run_xpr, tmp_path):
    path = tmp_path / "group.h5"
    with h5py.File(path, "w") as f:
        f["images/0"] = np.ones((16, 16))
        f["images/1"] = np.ones((16, 18))
        f["defocus_m"] = np.array([-1e-6, 1e-6])
        f.attrs["accelerating_voltage_kV"] = 300.0
        f.attrs["pixel_size_m"] = 1e-9
    result = run_xpr(["em", "tie", "tutorial", "-o", f"input.focal_series={path}"])
    assert result.exit_code == 2
    assert "different shapes" in result.output and "[16, 18]" in result.output


def _sphere_series(n=96, pixel=1e-9, defocus=(-4e-6, 0.0, 4e-6)):
    thickness = specimens.sphere_thickness_m((n, n), pixel, 25e-9)
    phase, amplitude = specimens.electrostatic_phase_and_amplitude(thickness, 17.0, 1.0, 300.0)
    wavelength = electron_wavelength_A(300.0) * 1e-10
    images = focal_series.focal_series_images(
        CPU, amplitude * np.exp(1j * phase),
        [focal_series.transfer_function(CPU, (n, n), pixel, wavelength, d) for d in defocus])
    return np.asarray(images), phase


def test_focal_series_from_tiff_files_and_an_fei_mrc_stack(home, run_xpr, tmp_path):
    """The same series as a list of TIFF files (defocus and optics from the settings) and as one
    MRC stack with an FEI1 extended header (defocus, pixel size and voltage from the header, FEI's
    underfocus-negative sign): both give the phase the HDF5 file gives, to float32 precision."""
    import mrcfile
    import tifffile

    defocus = (-4e-6, 0.0, 4e-6)
    images, exact = _sphere_series(defocus=defocus)
    save_tree(tmp_path / "series.h5", {"images": images, "defocus_m": np.asarray(defocus)},
              attrs={"accelerating_voltage_kV": 300.0, "pixel_size_m": 1e-9})
    names = []
    for index, image in enumerate(images):
        names.append(str(tmp_path / f"image_{index}.tif"))
        tifffile.imwrite(names[-1], image.astype(np.float32))
    header_type = mrcfile.dtypes.get_ext_header_dtype(b"FEI1")
    extended = np.zeros(len(images), dtype=header_type)
    extended["Metadata size"] = header_type.itemsize
    extended["Defocus"] = [-d for d in defocus]         # FEI: underfocus negative
    extended["Pixel size X"] = 1e-9
    extended["HT"] = 300e3
    with mrcfile.new(tmp_path / "series.mrcs", overwrite=True) as mrc:
        mrc.set_data(images.astype(np.float32))
        mrc.set_image_stack()
        mrc.header.exttyp = b"FEI1"
        mrc.set_extended_header(extended)
        mrc.voxel_size = 20.0                            # wrong on purpose: the FEI header wins
    settings = write(tmp_path, "files", "structure_name: files\nrefinement: {method: none}\n")
    phases = {}
    for label, overrides in (
            ("h5", [f"input.focal_series={tmp_path / 'series.h5'}"]),
            ("tiff", [f"input.focal_series=[{', '.join(names)}]", f"input.defocus_m={list(defocus)}",
                      "imaging.accelerating_voltage_kV=300", "imaging.pixel_size_m=1.0e-9"]),
            ("mrc", [f"input.focal_series={tmp_path / 'series.mrcs'}"])):
        arguments = ["-q", "em", "tie", settings]
        for override in overrides:
            arguments += ["-o", override]
        result = run_xpr(arguments)
        assert result.exit_code == 0, result.output
        with h5py.File(home / "data/em/tie/files.h5") as out:
            phases[label] = out["phase_tie"][()]
            assert out["defocus_m"][()] == pytest.approx(defocus)
    assert tie_solvers.rms_error_in_window(phases["h5"], exact, 0.35) < 0.3
    for label in ("tiff", "mrc"):
        assert tie_solvers.rms_error_in_window(phases[label], phases["h5"], 0.35) < 1e-3
    # without defocus values anywhere: exit 2 naming input.defocus_m
    result = run_xpr(["em", "tie", settings, "-o", f"input.focal_series=[{', '.join(names)}]",
                      "-o", "imaging.accelerating_voltage_kV=300", "-o", "imaging.pixel_size_m=1.0e-9"])
    assert result.exit_code == 2
    assert "input.defocus_m" in result.output
