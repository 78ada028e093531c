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

from xpr import backend as backends
from xpr.em.ptychography import direct
from xpr.em import optics
from xpr.em.ptychography import memory_estimate
from xpr.em.ptychography.calibration import BRIGHT_FIELD_THRESHOLD, unpadded_batches
from xpr.em.ptychography.direct import probe_spectrum_at


# --------------------------------------------------------------------------------------------
# bright-field images
# --------------------------------------------------------------------------------------------

def bright_field_images(experiment, bright_field_fraction=0.9):
    """Normalised BF images (n_bf, ny, nx) = I_k/⟨I_k⟩ − 1, and their k (n_bf, 2) [y, x] in Å⁻¹.

    BF pixels: mean pattern above half its maximum and |k| ≤ fraction · k_α (k_α from the
    convergence angle; without it, the disk's equal-area radius).
    """
    if experiment.streamed:                 # the file is read batch by batch below
        mean_pattern = experiment.mean_pattern
    else:
        mean_pattern = experiment.unpadded_patterns.mean(axis=0)
    n_ky, n_kx = mean_pattern.shape
    ky, kx = optics.centred_frequencies((n_ky, n_kx), experiment.rez_pixel_size_invA)
    disk = mean_pattern > BRIGHT_FIELD_THRESHOLD * mean_pattern.max()
    k_disk = experiment.aperture_radius_invA
    if k_disk is None:
        k_disk = math.sqrt(disk.sum() / math.pi) * experiment.rez_pixel_size_invA
    chosen = disk & (np.hypot(ky, kx) <= bright_field_fraction * k_disk)
    values = np.empty((experiment.n_scan, int(chosen.sum())), dtype=np.float32)
    for start, batch in unpadded_batches(experiment):
        values[start:start + len(batch)] = batch[:, chosen]
    images = values.T.reshape((-1,) + tuple(experiment.scan_size))
    means = images.mean(axis=(1, 2), keepdims=True)
    images = images / np.where(means > 0, means, 1.0) - 1.0
    return images, np.stack([ky[chosen], kx[chosen]], axis=1)


def taper(shape, fraction=0.2):
    """Separable Tukey window: flat centre, cosine edges over `fraction` of each side."""
    def one(n):
        w = np.ones(n)
        edge = max(int(fraction * n), 1)
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(edge) + 0.5) / edge)
        w[:edge] = ramp
        w[n - edge:] = ramp[::-1]
        return w
    return one(shape[0])[:, None] * one(shape[1])[None, :]


def fourier_shift(images, shifts_px, backend):
    """images(r) → images(r − s) for each image, s (n, 2) [y, x] in pixels, periodic."""
    xp = backend.xp
    ny, nx = images.shape[-2:]
    q_y = xp.asarray(backend.fftfreq(ny))[None, :, None]
    q_x = xp.asarray(backend.fftfreq(nx))[None, None, :]
    ramp = xp.exp(-2j * math.pi * (q_y * shifts_px[:, 0, None, None] + q_x * shifts_px[:, 1, None, None]))
    return backend.ifftn(backend.fftn(images, axes=(-2, -1)) * ramp, axes=(-2, -1)).real


def _parabolic_offset(minus, centre, plus):
    denominator = minus - 2.0 * centre + plus
    return np.where(np.abs(denominator) > 1e-30, 0.5 * (minus - plus) / denominator, 0.0)


def measure_shifts(images, reference, window, backend, predicted_px=None, search_radius_px=None):
    """Shift s (n, 2) [y, x] px of each image against the reference: image(r) ≈ reference(r − s).

    The cross-correlation peak is searched within `search_radius_px` of the predicted shifts
    (everywhere when None) — on a crystal the correlation repeats with the lattice, and only the
    peak near the model's prediction is the right one. Sub-pixel by a parabola through the peak.
    """
    xp = backend.xp
    ny, nx = reference.shape
    ref_spectrum = xp.conj(backend.fftn(reference * window))
    correlation = backend.ifftn(backend.fftn(images * window, axes=(-2, -1)) * ref_spectrum,
                                axes=(-2, -1)).real
    correlation = backend.asnumpy(correlation)
    searched = correlation
    if predicted_px is not None and search_radius_px is not None:
        lag_y = (np.arange(ny) + ny // 2) % ny - ny // 2
        lag_x = (np.arange(nx) + nx // 2) % nx - nx // 2
        dy = lag_y[None, :, None] - predicted_px[:, 0, None, None]
        dx = lag_x[None, None, :] - predicted_px[:, 1, None, None]
        searched = np.where(dy ** 2 + dx ** 2 <= search_radius_px ** 2, correlation, -np.inf)
    flat_peak = searched.reshape(len(correlation), -1).argmax(axis=1)
    py, px = np.unravel_index(flat_peak, (ny, nx))
    rows = np.arange(len(correlation))
    c0 = correlation[rows, py, px]
    dy = _parabolic_offset(correlation[rows, (py - 1) % ny, px], c0, correlation[rows, (py + 1) % ny, px])
    dx = _parabolic_offset(correlation[rows, py, (px - 1) % nx], c0, correlation[rows, py, (px + 1) % nx])
    sy = (py + ny // 2) % ny - ny // 2 + np.clip(dy, -0.5, 0.5)
    sx = (px + nx // 2) % nx - nx // 2 + np.clip(dx, -0.5, 0.5)
    return np.stack([sy, sx], axis=1)


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


def rotate_yx(vectors, angle_deg):
    """R(angle) applied to (n, 2) [y, x] vectors (R(θ) = [[cos, −sin], [sin, cos]] on (x, y))."""
    theta = math.radians(angle_deg)
    y, x = vectors[:, 0], vectors[:, 1]
    return np.stack([math.sin(theta) * x + math.cos(theta) * y,
                     math.cos(theta) * x - math.sin(theta) * y], axis=1)


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
# shift-and-sum and the transfer function
# --------------------------------------------------------------------------------------------

def shift_and_sum(images, shifts_px, upsample):
    """Upsampled tcBF image: sample I_k(r_p) placed at r_p − s_k on a grid `upsample` × finer."""
    n_bf, ny, nx = images.shape
    my, mx = ny * upsample, nx * upsample
    grid_y, grid_x = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    y = ((grid_y[None] - shifts_px[:, 0, None, None]) * upsample).ravel()
    x = ((grid_x[None] - shifts_px[:, 1, None, None]) * upsample).ravel()
    values = images.ravel()
    y0, x0 = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    fy, fx = y - y0, x - x0
    total = np.zeros(my * mx)
    weight = np.zeros(my * mx)
    for oy, wy in ((0, 1.0 - fy), (1, fy)):
        for ox, wx in ((0, 1.0 - fx), (1, fx)):
            yy, xx = y0 + oy, x0 + ox
            inside = (yy >= 0) & (yy < my) & (xx >= 0) & (xx < mx)
            index = yy[inside] * mx + xx[inside]
            w = (wy * wx)[inside]
            total += np.bincount(index, w * values[inside], minlength=my * mx)
            weight += np.bincount(index, w, minlength=my * mx)
    image = np.where(weight > 1e-3 * weight.max(), total / np.maximum(weight, 1e-30), 0.0)
    return image.reshape(my, mx), weight.reshape(my, mx)


# values (bright-field pixel × grid pixel) of the transfer function's terms summed at once
VALUES_PER_CHUNK = 4_000_000


def transfer_function(shape, pixel_A, k_yx, detector_shifts_A, experiment, aberrations, angle_deg,
                      values_per_chunk=VALUES_PER_CHUNK):
    """T(q) of the shift-corrected BF sum on a grid (scan frame, pixel_A), weak phase object."""
    my, mx = shape
    chunk = max(1, values_per_chunk // (my * mx))
    q_y, q_x = np.meshgrid(np.fft.fftfreq(my, pixel_A), np.fft.fftfreq(mx, pixel_A), indexing="ij")
    q_det = rotate_yx(np.stack([q_y.ravel(), q_x.ravel()], axis=1), angle_deg)
    qy, qx = q_det[:, 0][None], q_det[:, 1][None]
    args = dict(wavelength_A=experiment.wavelength_A,
                aperture_radius_invA=experiment.aperture_radius_invA,
                edge_width_invA=experiment.rez_pixel_size_invA, aberrations=aberrations)
    total = np.zeros(my * mx, dtype=np.complex128)
    for start in range(0, len(k_yx), chunk):
        ky = k_yx[start:start + chunk, 0][:, None]
        kx = k_yx[start:start + chunk, 1][:, None]
        d = detector_shifts_A[start:start + chunk]
        p_k = probe_spectrum_at(ky, kx, **args)
        term = 1j * (np.conj(p_k) * probe_spectrum_at(ky - qy, kx - qx, **args)
                     - p_k * np.conj(probe_spectrum_at(ky + qy, kx + qx, **args)))
        term *= np.exp(2j * math.pi * (qy * d[:, 0, None] + qx * d[:, 1, None]))
        total += (term / np.maximum(np.abs(p_k) ** 2, 1e-12)).sum(axis=0)
    return (total / len(k_yx)).reshape(my, mx)


def wiener_phase(image, transfer, epsilon):
    """φ = F⁻¹[F[f] T* / (|T|² + ε max|T|²)] — the phase from the tcBF image (host arrays)."""
    fft = backends.cpu()
    power = np.abs(transfer) ** 2
    spectrum = fft.fftn(image - image.mean()) * np.conj(transfer) / (power + epsilon * power.max())
    return fft.ifftn(spectrum).real


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
