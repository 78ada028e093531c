"""`xpr em tcbf`: tilt-corrected bright field — aberrations from image shifts, then shift-and-sum.

Method. Each bright-field detector pixel k records a virtual bright-field image I_k(r_p). For a
weak phase object φ and the probe P̃(k) = A(k) e^{ia(k)} (a = −χ, xpr.em.optics), the part of I_k
linear in φ is

    I_k(r_p) − ⟨I_k⟩ = Σ_q φ̃(q) e^{2πi q·r_p} · i[P̃*(k)P̃(k − q) − P̃(k)P̃*(k + q)] ,

and to first order in q, P̃*(k)P̃(k − q) ≈ |P̃(k)|² e^{−i q·∇a(k)}: every BF image is one image
f shifted by d(k) = ∇a(k)/2π = −∇χ(k)/2π (Å; for pure defocus d = −λ C10 k), i.e.
I_k(r_p) = f(r_p − d(k)). So:

1. Measure the shift of each BF image against a reference by cross-correlation (sub-pixel,
   parabolic peak), iterating: the reference is the shift-corrected mean, and the measured set grows
   from the inner pixels (small shifts) to the whole disk (`iterations`).
2. Fit the shifts with the aberration model: s(k) = R(−θ) Σ_j C_j ∇a_j(k)/2π + t, linear in the
   Krivanek coefficients C_j (the first `fit_aberrations` of C10, C12a, C12b, C21a, ...) for a
   fixed rotation θ; θ is found by a 1-D search (`fit_rotation`) on the branch nearest the
   calibrated PL rotation (θ and θ + 180° with −C fit equally). Defocus = −C10.
3. Shift-and-sum on an `upsample`-times finer grid: each sample I_k(r_p) is placed at r_p − s(k)
   (bilinear weights) and the weighted mean taken — the BF pixels' different shifts sample the
   image more finely than the scan step.
4. The phase: the tcBF image is φ filtered by the transfer function of the shift-corrected sum,
   T(q) = mean_k i[P̃*(k)P̃(k − q) − P̃(k)P̃*(k + q)] e^{2πi q·d(k)} / |P̃(k)|² (exact for a weak
   phase object, aperture cut-offs included), undone by a Wiener filter (`wiener_epsilon`).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import optimize

from xpr.em.ptychography import direct, rotation
from xpr.em import optics
from xpr.em.ptychography import memory_estimate
from xpr.em.ptychography.calibration import BRIGHT_FIELD_THRESHOLD, unpadded_batches
from xpr.em.ptychography.bright_field import (  # noqa: F401  (tcbf's names, as before)
    VALUES_PER_CHUNK, fourier_shift, measure_shifts, rotate_yx, shift_and_sum, taper,
    transfer_function, wiener_phase)


# --------------------------------------------------------------------------------------------
# bright-field images
# --------------------------------------------------------------------------------------------

def bright_field_images(experiment, bright_field_fraction=0.9):
    """Normalised BF images (n_bf, ny, nx) = I_k/⟨I_k⟩ − 1, and their k (n_bf, 2) [y, x] in Å⁻¹.

    BF pixels: mean pattern above half its maximum and |k| ≤ fraction · k_α (k_α from the
    convergence angle; without it, the disk's equal-area radius). All of them
    (rotation.bright_field_stack without its cap).
    """
    if experiment.streamed:                 # the file is read batch by batch
        mean_pattern = experiment.mean_pattern
    else:
        mean_pattern = experiment.unpadded_patterns.mean(axis=0)
    return rotation.bright_field_stack(unpadded_batches(experiment), mean_pattern,
                                       experiment.rez_pixel_size_invA,
                                       experiment.aperture_radius_invA,
                                       experiment.scan_size, BRIGHT_FIELD_THRESHOLD,
                                       bright_field_fraction, max_values=None)


# --------------------------------------------------------------------------------------------
# the aberration model of the shifts
# --------------------------------------------------------------------------------------------

def shift_basis(k_yx, wavelength_A, n_coefficients, step_invA=1e-5):
    """∇a_j(k)/2π for unit Krivanek coefficients j < n (a = −χ): (n, n_bf, 2) [y, x] in Å per Å."""
    ky, kx = k_yx[:, 0], k_yx[:, 1]
    basis = np.empty((n_coefficients, len(k_yx), 2))
    for j in range(n_coefficients):
        unit = [0.0] * n_coefficients
        unit[j] = 1.0
        def a(y, x):
            return -optics.aberration_phase(x, y, wavelength_A, unit)
        basis[j, :, 0] = (a(ky + step_invA, kx) - a(ky - step_invA, kx)) / (2 * step_invA)
        basis[j, :, 1] = (a(ky, kx + step_invA) - a(ky, kx - step_invA)) / (2 * step_invA)
    return basis / (2 * math.pi)


def fit_coefficients(shifts_A, basis, angle_deg, weights=None):
    """Least squares C_j and offset t for fixed θ: R(θ) s = Σ C_j b_j + t. Returns (C, t, rss)."""
    detector_shifts = rotate_yx(shifts_A, angle_deg)
    n_coefficients, n_bf, _ = basis.shape
    design = np.zeros((2 * n_bf, n_coefficients + 2))
    design[:, :n_coefficients] = basis.transpose(1, 2, 0).reshape(2 * n_bf, n_coefficients)
    design[0::2, n_coefficients] = 1.0
    design[1::2, n_coefficients + 1] = 1.0
    target = detector_shifts.reshape(-1)
    if weights is not None:
        w = np.repeat(np.sqrt(weights), 2)
        design, target = design * w[:, None], target * w
    solution, *_ = np.linalg.lstsq(design, target, rcond=None)
    residual = target - design @ solution
    return solution[:n_coefficients], solution[n_coefficients:], float(residual @ residual)


def fit_shift_model(shifts_A, basis, angle_deg, fit_rotation):
    """(θ, C, t): coefficients for the calibrated θ, or θ searched near it when fit_rotation."""
    if not fit_rotation:
        coefficients, offset, _ = fit_coefficients(shifts_A, basis, angle_deg)
        return angle_deg, coefficients, offset
    grid = angle_deg + np.arange(-90.0, 90.0, 1.0)
    costs = [fit_coefficients(shifts_A, basis, t)[2] for t in grid]
    start = grid[int(np.argmin(costs))]
    best = optimize.minimize_scalar(lambda t: fit_coefficients(shifts_A, basis, t)[2],
                                    bounds=(start - 1.0, start + 1.0), method="bounded",
                                    options={"xatol": 1e-4})
    theta = float(best.x)
    coefficients, offset, _ = fit_coefficients(shifts_A, basis, theta)
    return theta, coefficients, offset


def model_shifts_A(basis, coefficients, offset, angle_deg):
    """Scan-frame shifts s = R(−θ)(Σ C_j b_j + t), (n_bf, 2) [y, x] in Å."""
    detector = np.tensordot(coefficients, basis, axes=(0, 0)) + offset[None, :]
    return rotate_yx(detector, -angle_deg)


# --------------------------------------------------------------------------------------------
# the whole reconstruction
# --------------------------------------------------------------------------------------------

def reconstruct(experiment, backend, fit_aberrations=3, fit_rotation=True, iterations=6,
                bright_field_fraction=0.9, upsample=2, wiener_epsilon=0.05, search_radius_px=2.0,
                log=None, pixels_per_pass=None):
    """tcBF of a calibrated experiment: dict of the images, shifts and fitted aberrations;
    `pixels_per_pass`: bright-field pixels whose transfer-function terms are summed at once
    (None: VALUES_PER_CHUNK values)."""
    xp = backend.xp
    images, k_yx = bright_field_images(experiment, bright_field_fraction)
    step = experiment.scan_step_A
    window = xp.asarray(taper(images.shape[1:]))
    images_dev = xp.asarray(images)
    basis = shift_basis(k_yx, experiment.wavelength_A, fit_aberrations)
    k_norm = np.hypot(k_yx[:, 0], k_yx[:, 1])
    predicted_px = np.zeros((len(k_yx), 2))
    ramp = max(iterations - 2, 1)          # passes over which the measured set grows to the disk
    for iteration in range(iterations):
        fraction = min((iteration + 1) / ramp, 1.0)
        if iteration == 0:
            # the inner pixels barely shift: their plain mean is the first reference
            reference = images_dev[xp.asarray(k_norm <= k_norm.max() / ramp + 1e-12)].mean(axis=0)
            measured_px = measure_shifts(images_dev, reference, window, backend)
        else:
            # the shift-corrected mean is the reference; each image is first moved back by its
            # predicted shift, so only a small residual is measured (a fixed window biases large
            # shifts towards zero) and only near zero (crystals repeat)
            aligned = fourier_shift(images_dev, xp.asarray(-predicted_px), backend)
            reference = aligned.mean(axis=0)
            residual = measure_shifts(aligned, reference, window, backend,
                                      np.zeros_like(predicted_px), search_radius_px)
            measured_px = predicted_px + residual
        used = k_norm <= k_norm.max() * fraction + 1e-12
        theta, coefficients, offset = fit_shift_model(
            measured_px[used] * step, basis[:, used], experiment.pl_rotation_deg,
            fit_rotation and fraction == 1.0)
        predicted_px = model_shifts_A(basis, coefficients, offset, theta) / step
        if log:
            log.info("tcBF pass %d: %d BF pixels, C10 = %.2f Å, θ = %.2f°, rms misfit %.3f px",
                     iteration + 1, int(used.sum()), coefficients[0], theta,
                     float(np.sqrt(np.mean((measured_px[used] - predicted_px[used]) ** 2))))

    aberrations = coefficients.tolist()
    bright_field, weight = shift_and_sum(images, predicted_px, upsample)
    fine_pixel = step / upsample
    detector_shifts = rotate_yx(predicted_px * step, theta)
    values = VALUES_PER_CHUNK if pixels_per_pass is None \
        else int(pixels_per_pass) * bright_field.shape[0] * bright_field.shape[1]
    transfer = transfer_function(bright_field.shape, fine_pixel, k_yx, detector_shifts, experiment,
                                 aberrations, theta, values_per_chunk=values)
    phase = wiener_phase(bright_field, transfer, wiener_epsilon)
    names = [optics.krivanek_name(*term) for term in optics.krivanek_terms(fit_aberrations)]
    return {"phase": phase.astype(np.float32), "bright_field": bright_field.astype(np.float32),
            "weight": weight.astype(np.float32),
            "shifts_measured_A": (measured_px * step).astype(np.float32),
            "shifts_fitted_A": (predicted_px * step).astype(np.float32),
            "k_bright_field_invA": k_yx.astype(np.float32),
            "aberrations_fitted": np.asarray(aberrations), "aberration_names": names,
            "defocus_A": float(-coefficients[0]), "pl_rotation_deg_fitted": float(theta),
            "pixel_size_A": fine_pixel}


def validate(settings):
    """Exit 2 before the run folder exists when the scan could not fit even streamed."""
    memory_estimate.validate_direct("tcbf", settings)


def run(settings, archive):
    """Calibrate, align the BF images, fit aberrations and rotation, shift-and-sum, deconvolve."""
    options = settings["tcbf"]
    plan = memory_estimate.plan_direct("tcbf", settings, direct.default_data_path(settings, archive),
                                       log=archive.log)
    backend, experiment, data_path = direct.prepare(settings, archive, plan["memory_GB"])
    if backend.is_gpu:
        archive.log.info("tcbf: bright-field image alignment on %s; shift-and-sum and the Wiener deconvolution "
                         "on the CPU by design (one image of the scan's size)", backend)
    result = reconstruct(experiment, backend, fit_aberrations=int(options["fit_aberrations"]),
                         fit_rotation=bool(options["fit_rotation"]),
                         iterations=int(options["iterations"]),
                         bright_field_fraction=float(options["bright_field_fraction"]),
                         upsample=int(options["upsample"]),
                         wiener_epsilon=float(options["wiener_epsilon"]),
                         search_radius_px=float(options["search_radius_px"]), log=archive.log,
                         pixels_per_pass=plan["chunk"])
    archive.log.info("tcBF fit: defocus %.2f Å, PL rotation %.2f°, aberrations %s",
                     result["defocus_A"], result["pl_rotation_deg_fitted"],
                     ", ".join(f"{name} = {value:.2f} Å" for name, value in
                               zip(result["aberration_names"], result["aberrations_fitted"])))
    pixel = result.pop("pixel_size_A")
    direct.save_products(archive, "tcbf", experiment, data_path, result, pixel_size_A=pixel,
                         images={"phase": "tcBF phase (rad)", "bright_field": "tcBF image"})
    _plot_shifts(archive, result)
    return result


def _plot_shifts(archive, result):
    from xpr import plot

    fig, ax = plot.figure(1, 1, size=(4.5, 4.0))
    k = result["k_bright_field_invA"]
    for name, colour in (("shifts_measured_A", "k"), ("shifts_fitted_A", "r")):
        s = result[name]
        ax.quiver(k[:, 1], k[:, 0], s[:, 1], s[:, 0], color=colour, angles="xy", label=name)
    ax.set_xlabel("kx (Å⁻¹)")
    ax.set_ylabel("ky (Å⁻¹)")
    ax.set_title(f"BF image shifts; defocus {result['defocus_A']:.1f} Å")
    ax.legend(fontsize=7)
    archive.savefig(fig, "tcbf_shifts.png")
