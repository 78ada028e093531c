"""The PL rotation (detector vs scan) from the parallax of the bright-field images.

Why not only the centre of mass: the CoM field of a thin specimen is weak. On abTEM's MoS2
monolayer (200 kV, 25 mrad, C10 = −100 Å, 0.5 Å step, 25 000 e⁻/pattern) the CoM signal is about
half its Poisson noise, and the noise (curl and divergence alike) makes the curl-free criterion
flat to 10 % over all angles: it fitted 6.8° for a true 0° (r 0.88 instead of 0.95).

The parallax (the tcBF principle, xpr.em.ptychography.tcbf): for a weak phase object every
bright-field pixel k records one image shifted by s(k) = −∇χ(k)/2π; for a defocused probe that is
s = −λ C10 k in the detector frame, seen in the scan frame rotated by −θ:

    s_scan(k) = −λ C10 R(−θ) k + t .

The shifts of all BF images (hundreds of cross-correlations against their shift-corrected mean)
are measured far above the noise wherever the probe is defocused by more than a few nm, the
regime where the CoM signal is weakest. A linear map s = B k + t is fitted (least squares; the
measured set grows from the inner pixels, whose shifts are small, to the whole disk, as in tcBF).
B's rotation part c·R(−θ) (c = −λ C10) gives θ; its symmetric traceless part is two-fold
astigmatism — or a mirror: B of a transposed detector is c·R(−θ)·M (M swaps ky, kx), which is
symmetric traceless, so with `transposed: auto` the transposition whose rotation part is larger
is taken. The shifts fix θ modulo 180° (θ, C10) ≡ (θ + 180°, −C10); the branch is taken from the
sign of a known C10, else by the caller (the dark-field rule of calibration.fit_pl_rotation).

Reliability: the standard error of θ from the misfit of the rotation-plus-astigmatism model,
σ_θ = σ_s / (|c| √Σ|k|²), and the shift at the disk edge (|c| k_max, in scan steps): with a
focused probe there is no parallax and the CoM fit is used instead.
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np

from xpr.em import optics
from xpr.em.ptychography.bright_field import (fourier_shift, measure_shifts, probe_spectrum_at,
                                              rotate_yx, shift_and_sum, taper, transfer_function,
                                              wiener_phase)

BRIGHT_FIELD_FRACTION = 0.9     # BF pixels used: |k| ≤ this × the disk radius
MIN_EDGE_SHIFT_STEPS = 1.0      # parallax at the disk edge needed to trust the fit (scan steps)
# standard error of θ above which the fit is not used; the estimate is optimistic by about 2×
# (simulated 16² and 20² scans, 100 Å defocus, 1000–5000 e⁻/pattern: errors 0.1–2.2° for
# estimates 0.34–1.1°)
MAX_UNCERTAINTY_DEG = 2.0
# rms shift misfit (scan steps) above which the shifts are not images of one object: with a
# focused probe the BF images are no shifted copies and the cross-correlations lock onto noise or
# the lattice (simulated in-focus scans: misfit 1.1 steps and a spurious 130 Å "defocus"; pure
# Poisson noise: 1.03 steps, with a standard error of only 0.5° — the feedback of the model into
# the measurement makes noise look linear; 0.2–0.65 with 80–100 Å defocus at ≥ 1000 e⁻/pattern)
MAX_MISFIT_STEPS = 0.75
# when the CoM fit is unreliable too, the parallax is still taken up to this uncertainty
FALLBACK_UNCERTAINTY_DEG = 5.0
# difference of the two branches' dark-field correlations below which the 180° choice is flagged
# (simulated random-atom phase objects at 2000 e⁻/pattern: 0.02–0.05, chosen wrong in 1 of 4;
# noise-free 0.48; abTEM MoS2 at 25 000 e⁻/pattern: see docs/em_ptycho.md)
BRANCH_MARGIN = 0.1
BRANCH_CROP = 48                # scan points per side used for the branch choice at most
# BF pixels × scan points kept for the rotation fit (the measurement's FFTs hold ≈ 6 complex128
# copies: ≈ 0.2 GB at this size), and the central scan points used at most per side
MAX_BRIGHT_FIELD_VALUES = 2_000_000
MAX_SCAN_SIDE = 64


class ParallaxFit(NamedTuple):
    angle_deg: float          # θ of the branch with C10 = c10_A (the other: θ + 180°, −C10)
    transposed: bool          # detector axes swapped relative to the scan
    c10_A: float              # defocus coefficient of the branch (C10 = −defocus)
    edge_shift_steps: float   # |parallax| at the edge of the BF pixels used, in scan steps
    misfit_steps: float       # rms misfit of the measured shifts, in scan steps
    uncertainty_deg: float    # standard error of θ
    n_bright_field: int
    branch_score: float = float("nan")   # chosen minus other branch: dark-field r (or skewness)

    @property
    def usable(self) -> bool:
        """Worth taking when the centre-of-mass fit is unreliable too."""
        return (self.edge_shift_steps >= MIN_EDGE_SHIFT_STEPS
                and self.misfit_steps <= MAX_MISFIT_STEPS
                and self.uncertainty_deg <= FALLBACK_UNCERTAINTY_DEG)

    @property
    def reliable(self) -> bool:
        return (self.edge_shift_steps >= MIN_EDGE_SHIFT_STEPS
                and self.misfit_steps <= MAX_MISFIT_STEPS
                and self.uncertainty_deg <= MAX_UNCERTAINTY_DEG)

    def other_branch(self) -> "ParallaxFit":
        angle = (self.angle_deg + 360.0) % 360.0 - 180.0
        return self._replace(angle_deg=angle, c10_A=-self.c10_A)


def central_window(shape, max_side=None):
    """(rows, cols) slices of the central max_side × max_side part of a 2-D grid (all of it
    when max_side is None or larger)."""
    if max_side is None:
        return tuple(slice(0, n) for n in shape)
    return tuple(slice((n - min(n, max_side)) // 2, (n - min(n, max_side)) // 2 + min(n, max_side))
                 for n in shape)


def bright_field_stack(batches, mean_pattern, rez_invA, disk_radius_invA, scan_size,
                       threshold, fraction=BRIGHT_FIELD_FRACTION,
                       max_values=MAX_BRIGHT_FIELD_VALUES, max_side=None):
    """Normalised BF images (n_bf, my, mx) = I_k/⟨I_k⟩ − 1 and their k (n_bf, 2) [y, x] in Å⁻¹.

    `batches` yields (start, (B, ky, kx) unpadded patterns) in raster order over the
    `scan_size` grid; BF pixels: mean pattern above `threshold` × its maximum and |k| ≤ fraction ×
    the disk radius (the disk's equal-area radius when `disk_radius_invA` is None); every few
    pixels only when the images would hold more than `max_values` values (None: all). With
    `max_side`, only the central max_side × max_side scan points are kept (the rotation fit
    needs no more; each image's FFT work arrays are then bounded too).
    """
    ny, nx = scan_size
    rows, cols = central_window(scan_size, max_side)
    (y0, y1), (x0, x1) = (rows.start, rows.stop), (cols.start, cols.stop)
    my, mx = y1 - y0, x1 - x0
    n_ky, n_kx = mean_pattern.shape
    ky, kx = optics.centred_frequencies((n_ky, n_kx), rez_invA)
    disk = mean_pattern > threshold * mean_pattern.max()
    if disk_radius_invA is None:
        disk_radius_invA = math.sqrt(disk.sum() / math.pi) * rez_invA
    chosen = disk & (np.hypot(ky, kx) <= fraction * disk_radius_invA)
    stride = 1 if max_values is None else int(math.ceil(chosen.sum() * my * mx / max_values))
    if stride > 1:                  # a large scan: every stride-th BF pixel is enough for θ
        kept = np.flatnonzero(chosen)[::stride]
        chosen = np.zeros_like(chosen)
        chosen.flat[kept] = True
    values = np.empty((my * mx, int(chosen.sum())), dtype=np.float32)
    for start, batch in batches:
        index = np.arange(start, start + len(batch))
        iy, ix = index // nx, index % nx
        inside = (iy >= y0) & (iy < y1) & (ix >= x0) & (ix < x1)
        if inside.any():
            values[(iy[inside] - y0) * mx + ix[inside] - x0] = batch[inside][:, chosen]
    images = values.T.reshape((-1, my, mx))
    means = images.mean(axis=(1, 2), keepdims=True)
    images = images / np.where(means > 0, means, 1.0) - 1.0
    return images, np.stack([ky[chosen], kx[chosen]], axis=1)


def _fit_linear(shifts, k_yx):
    """Least squares s ≈ B k + t for (n, 2) shifts and k: (B (2, 2), t (2,), residuals (n, 2))."""
    design = np.hstack([k_yx, np.ones((len(k_yx), 1))])
    solution, *_ = np.linalg.lstsq(design, shifts, rcond=None)
    return solution[:2].T, solution[2], shifts - design @ solution


def _rotation_part(matrix):
    """(a, b) of the part a·I + b·J of a 2×2 map on [y, x] (J = [[0, 1], [−1, 0]]): the scaled
    rotation m·Q(φ) with Q(φ) = [[cos φ, sin φ], [−sin φ, cos φ]] (tcbf.rotate_yx(·, φ)),
    a = m cos φ, b = m sin φ."""
    return 0.5 * (matrix[0, 0] + matrix[1, 1]), 0.5 * (matrix[0, 1] - matrix[1, 0])


def measure_parallax(images, k_yx, backend, iterations=6, search_radius_steps=2.0):
    """BF image shifts (n_bf, 2) [y, x] in scan steps with the fitted linear model (B, t).

    As tcbf.reconstruct: the first reference is the mean of the inner images; then each image is
    moved back by its predicted shift, the residual shift measured within `search_radius_steps`
    of zero against the shift-corrected mean, and the model refitted on a growing set.
    """
    xp = backend.xp
    window = xp.asarray(taper(images.shape[1:]))
    images_dev = xp.asarray(images)
    k_norm = np.hypot(k_yx[:, 0], k_yx[:, 1])
    ramp = max(iterations - 2, 1)
    predicted = np.zeros((len(k_yx), 2))
    for iteration in range(iterations):
        fraction = min((iteration + 1) / ramp, 1.0)
        if iteration == 0:
            inner = xp.asarray(k_norm <= k_norm.max() / ramp + 1e-12)
            measured = measure_shifts(images_dev, images_dev[inner].mean(axis=0), window, backend)
        else:
            aligned = fourier_shift(images_dev, xp.asarray(-predicted), backend)
            residual = measure_shifts(aligned, aligned.mean(axis=0), window, backend,
                                      np.zeros_like(predicted), search_radius_steps)
            measured = predicted + residual
        used = k_norm <= k_norm.max() * fraction + 1e-12
        matrix, offset, _ = _fit_linear(measured[used], k_yx[used])
        predicted = k_yx @ matrix.T + offset
    return measured, matrix, offset


def parallax_fit(images, k_yx, scan_step_A, wavelength_A, rez_invA, backend, transposed="auto",
                 known_c10_A=None, dark_field=None, aperture_radius_invA=None,
                 iterations=6) -> ParallaxFit:
    """θ (and, with transposed "auto", the transposition) from the BF images' parallax.

    images, k_yx: from bright_field_stack (detector as prepared: a transposition already applied
    is not undone). transposed: False (never swapped), or "auto" (swapped when the mirrored
    rotation part is larger). The 180° branch: from the sign of `known_c10_A` (the probe's
    calibrated C10) when given and nonzero; else choose_branch (the tcBF phase of each branch
    against the `dark_field` counts on the images' scan points); `branch_score` says how clear.
    """
    measured, matrix, offset = measure_parallax(images, k_yx, backend, iterations)
    matrix = matrix * scan_step_A                       # Å of shift per Å⁻¹ of k
    swap = np.array([[0.0, 1.0], [1.0, 0.0]])
    options = [(False, matrix)]
    if transposed == "auto":
        options.append((True, matrix @ swap))           # k_true = M k_measured
    swapped, rotation = max(options, key=lambda o: math.hypot(*_rotation_part(o[1])))
    k_true = k_yx @ swap if swapped else k_yx
    a, b = _rotation_part(rotation)
    scale = math.hypot(a, b)                            # |λ C10|
    # s_scan = −λ C10 Q(−θ) k  ⇒  m Q(φ) with m = −λ C10, φ = −θ; branch m > 0: C10 < 0
    theta = -math.degrees(math.atan2(b, a))
    theta = (theta + 180.0) % 360.0 - 180.0
    # misfit of rotation + astigmatism (+ offset), i.e. of the full linear model, in steps
    _, _, residual = _fit_linear(measured * scan_step_A, k_true)
    n = len(k_yx)
    sigma_A = math.sqrt(float(np.sum(residual ** 2)) / max(2 * n - 6, 1))
    k_sum = math.sqrt(float(np.sum(k_yx ** 2)))
    uncertainty = math.degrees(sigma_A / max(scale * k_sum, 1e-300))
    edge = scale * float(np.hypot(k_yx[:, 0], k_yx[:, 1]).max()) / scan_step_A
    fit = ParallaxFit(float(theta), bool(swapped), float(-scale / wavelength_A), float(edge),
                      float(sigma_A / scan_step_A), float(min(uncertainty, 180.0)), int(n))
    if known_c10_A is not None and abs(known_c10_A) > 1e-6:
        return fit.other_branch() if known_c10_A > 0 else fit
    shifts_px = k_yx @ (matrix / scan_step_A).T + offset
    return choose_branch(fit, images, k_true, shifts_px, scan_step_A, wavelength_A, rez_invA,
                         aperture_radius_invA, dark_field)


def choose_branch(fit, images, k_yx, shifts_px, scan_step_A, wavelength_A, rez_invA,
                  aperture_radius_invA, dark_field=None):
    """θ or θ + 180° (with −C10) when the C10 sign is unknown: both explain the shifts, and the
    tcBF phase of one is minus that of the other (rotated by 180°).

    The dark-field counts of a scan point are |P|² ⋆ d with d ≥ 0 peaked on the atoms, whose
    phase is positive: the branch whose tcBF phase (tcbf's shift-and-sum on the scan grid,
    Wiener-deconvolved by its weak-phase transfer function), blurred by the same probe intensity
    |P|², correlates better with the dark field is taken. (The blur matters: a defocused probe's
    |P|² transfers some lattice frequencies with a negative sign, and the sharp phase correlated
    the wrong way with the dark field of abTEM's MoS2.) Without dark-field pixels, the branch
    whose phase is positively skewed (sharp positive peaks on atoms). The central ≤ 48² scan
    points suffice. Returns the branch with `branch_score` = the two scores' difference.
    """
    crop = central_window(images.shape[1:], BRANCH_CROP)
    images = images[(slice(None),) + crop]
    if dark_field is not None:          # (the images' grid)
        dark_field = dark_field[crop] - dark_field[crop].mean()
    image, _ = shift_and_sum(images, shifts_px, 1)
    aperture = aperture_radius_invA or (float(np.hypot(k_yx[:, 0], k_yx[:, 1]).max())
                                        / BRIGHT_FIELD_FRACTION)
    optics_of = SimpleNamespace(wavelength_A=wavelength_A, rez_pixel_size_invA=rez_invA,
                                aperture_radius_invA=aperture)
    blur = probe_intensity_transfer(image.shape, scan_step_A, wavelength_A, aperture, rez_invA,
                                    fit.c10_A)
    scores = []
    for branch in (fit, fit.other_branch()):
        detector_shifts = rotate_yx(shifts_px * scan_step_A, branch.angle_deg)
        transfer = transfer_function(image.shape, scan_step_A, k_yx, detector_shifts, optics_of,
                                     [branch.c10_A], branch.angle_deg)
        phase = wiener_phase(image, transfer, 0.05)
        phase = phase - phase.mean()
        if dark_field is not None:
            blurred = np.fft.ifft2(np.fft.fft2(phase) * blur).real
            blurred -= blurred.mean()
            scores.append(float(np.sum(blurred * dark_field) / math.sqrt(
                np.sum(blurred ** 2) * np.sum(dark_field ** 2) + 1e-300)))
        else:
            scores.append(float(np.mean(phase ** 3) / max(np.mean(phase ** 2), 1e-300) ** 1.5))
    chosen = fit if scores[0] >= scores[1] else fit.other_branch()
    return chosen._replace(branch_score=abs(scores[0] - scores[1]))


def probe_intensity_transfer(shape, step_A, wavelength_A, aperture_radius_invA, rez_invA, c10_A,
                             values_per_chunk=4_000_000):
    """Fourier transform of the probe intensity |P|² (pure defocus C10: radially symmetric, the
    same for ±C10) on the FFT grid of a `shape` map of `step_A` pixels, 1 at q = 0:
    the autocorrelation Σ_k P̃*(k) P̃(k + q) over the aperture (detector pixels of rez_invA)."""
    m = int(math.ceil(aperture_radius_invA / rez_invA)) + 1
    ky, kx = np.meshgrid(np.arange(-m, m + 1) * rez_invA, np.arange(-m, m + 1) * rez_invA,
                         indexing="ij")
    inside = np.hypot(ky, kx) <= aperture_radius_invA + rez_invA
    ky, kx = ky[inside][None], kx[inside][None]
    args = (wavelength_A, aperture_radius_invA, rez_invA, [c10_A])
    p_conj = np.conj(probe_spectrum_at(ky, kx, *args))
    q_y, q_x = np.meshgrid(np.fft.fftfreq(shape[0], step_A), np.fft.fftfreq(shape[1], step_A),
                           indexing="ij")
    q_y, q_x = q_y.ravel()[:, None], q_x.ravel()[:, None]
    out = np.empty(len(q_y), dtype=np.complex128)
    chunk = max(1, values_per_chunk // ky.size)
    for start in range(0, len(q_y), chunk):
        part = slice(start, start + chunk)
        out[part] = (p_conj * probe_spectrum_at(ky + q_y[part], kx + q_x[part], *args)).sum(axis=1)
    return (out / out[0]).reshape(shape)
