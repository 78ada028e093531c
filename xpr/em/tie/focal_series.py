"""The through-focal series: image formation, detector noise, misalignment and its registration.

Convention (fixed by the file interface, PyLorentz's and phase-ret-dl's):
    the image at defocus Δf of the exit wave ψ is  I_Δf = |F⁻¹[ F[ψ] · T_Δf ]|²,
    T_Δf(q) = exp(+iπλΔf|q|² − i(π/2) C_s λ³|q|⁴) · E_s(q) · E_t(q),
q in cycles/m. Δf = 0 is in focus. To first order in Δf this gives the transport-of-intensity
equation in the form xpr.em.tie.solvers solves,  (2π/λ) ∂I/∂Δf = ∇·(I ∇φ).
The envelopes (beam semi-convergence α, defocus spread Δ) are the quasi-coherent damping of the
wave transfer function:
    E_s = exp(−(πα/λ)² (λΔf q + C_s λ³ q³)²),   E_t = exp(−½ (πλΔ)² q⁴).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage, optimize

from xpr.backend import Backend


# ---------------------------------------------------------------------------------------------
# Image formation
# ---------------------------------------------------------------------------------------------

def spatial_frequencies_squared(backend, shape, pixel_size_m):
    """|q|² on the FFT grid, in (cycles/m)², on the backend's device."""
    xp = backend.xp
    q_y = xp.asarray(backend.fftfreq(shape[0], d=pixel_size_m))[:, None]
    q_x = xp.asarray(backend.fftfreq(shape[1], d=pixel_size_m))[None, :]
    return (q_y ** 2 + q_x ** 2).astype(backend.real_dtype)


def transfer_function(backend, shape, pixel_size_m, wavelength_m, defocus_m,
                      spherical_aberration_m=0.0, convergence_semi_angle_rad=0.0,
                      defocus_spread_m=0.0):
    """Wave transfer function T_Δf(q) of the objective lens (see module docstring)."""
    xp = backend.xp
    q2 = spatial_frequencies_squared(backend, shape, pixel_size_m).astype(np.float64)
    chi = (math.pi * wavelength_m * defocus_m * q2
           - 0.5 * math.pi * spherical_aberration_m * wavelength_m ** 3 * q2 ** 2)
    transfer = xp.exp(1j * chi)
    if convergence_semi_angle_rad > 0:
        q = xp.sqrt(q2)
        gradient = wavelength_m * defocus_m * q + spherical_aberration_m * wavelength_m ** 3 * q ** 3
        transfer = transfer * xp.exp(-(math.pi * convergence_semi_angle_rad / wavelength_m) ** 2
                                     * gradient ** 2)
    if defocus_spread_m > 0:
        transfer = transfer * xp.exp(-0.5 * (math.pi * wavelength_m * defocus_spread_m) ** 2 * q2 ** 2)
    return transfer.astype(backend.complex_dtype)


def propagate(backend, wave, transfer):
    """ψ_Δf = F⁻¹[F[ψ] T_Δf]."""
    return backend.ifft2(backend.fft2(wave) * transfer)


def focal_series_images(backend, wave, transfers):
    """Intensities |ψ_Δf|² for each transfer function, stacked (n, y, x), real dtype."""
    xp = backend.xp
    wave_q = backend.fft2(wave)
    return xp.stack([xp.abs(backend.ifft2(wave_q * t)) ** 2 for t in transfers]).astype(
        backend.real_dtype)


# ---------------------------------------------------------------------------------------------
# Detector noise
# ---------------------------------------------------------------------------------------------

def add_noise(images, kind, level, rng):
    """Noise of relative rms `level` at the mean intensity of each image.

    poisson:  counts ~ Poisson(I · D) / D with dose D = 1 / (level² ⟨I⟩) per pixel (shot noise);
    gaussian: I + N(0, (level ⟨I⟩)²) (signal-independent read-out noise);
    none:     the images unchanged.
    """
    if kind == "none" or level <= 0:
        return images.copy()
    noisy = np.empty_like(images)
    for index, image in enumerate(images):
        mean = float(image.mean())
        if kind == "poisson":
            dose = 1.0 / (level ** 2 * mean)
            noisy[index] = rng.poisson(np.clip(image, 0, None) * dose) / dose
        else:
            noisy[index] = image + rng.normal(0.0, level * mean, size=image.shape)
    return noisy


# ---------------------------------------------------------------------------------------------
# Misalignment (rotation, scale, shift about the image centre) and its inverse
# ---------------------------------------------------------------------------------------------

def similarity_transform(image, rotation_deg=0.0, scale=1.0, shift_px=(0.0, 0.0), order=3):
    """Rotate by `rotation_deg` (counter-clockwise in (x, y) with y down the rows), magnify by
    `scale` about the centre, then shift by `shift_px` (dy, dx). Outside: the image mean.

    output(p) = input(A⁻¹ (p − c − s) + c) with A = scale · R(θ).
    """
    centre = (np.array(image.shape) - 1) / 2.0
    theta = math.radians(rotation_deg)
    # (row, col) = (y, x); rotation acting on (y, x)
    rotation = np.array([[math.cos(theta), math.sin(theta)],
                         [-math.sin(theta), math.cos(theta)]])
    forward = scale * rotation
    inverse = np.linalg.inv(forward)
    offset = centre - inverse @ (centre + np.asarray(shift_px, float))
    return ndimage.affine_transform(image, inverse, offset=offset, order=order, mode="constant",
                                    cval=float(image.mean()))


def random_misalignment(rng, distribution, rotation_deg, scale, shift_px):
    """One draw of (rotation, scale, (dy, dx)): uniform in ±value or gaussian with σ = value."""
    def draw(width, size=None):
        if width == 0:
            return np.zeros(size) if size else 0.0
        if distribution == "gaussian":
            return rng.normal(0.0, width, size=size)
        return rng.uniform(-width, width, size=size)

    return float(draw(rotation_deg)), 1.0 + float(draw(scale)), tuple(float(s) for s in draw(shift_px, 2))


# ---------------------------------------------------------------------------------------------
# Registration: cross-correlation for the shift, then rotation, scale and shift refined by
# maximising the normalised correlation with the reference
# ---------------------------------------------------------------------------------------------

def _hann2d(shape):
    return np.outer(np.hanning(shape[0]), np.hanning(shape[1]))


def correlation_shift(cpu, reference, moving, upsample=20):
    """Translation (dy, dx) with moving ≈ reference shifted by (dy, dx), sub-pixel.

    Plain (not whitened) cross-correlation of the windowed images: images at different defocus
    share their low-frequency content (the specimen's outline, its absorption) but not their
    fine Fresnel fringes, which whitening would emphasise. The integer peak is refined by
    evaluating the inverse DFT on an `upsample`-times finer grid around it.
    """
    window = _hann2d(reference.shape)
    f_ref = cpu.fft2((reference - reference.mean()) * window)
    f_mov = cpu.fft2((moving - moving.mean()) * window)
    cross = f_mov * np.conj(f_ref)
    correlation = cpu.ifft2(cross).real
    peak = np.array(np.unravel_index(np.argmax(correlation), correlation.shape), float)
    shape = np.array(correlation.shape)
    peak = np.where(peak > shape // 2, peak - shape, peak)
    if upsample > 1:
        peak = _refine_peak(cpu, cross, peak, upsample)
    return float(peak[0]), float(peak[1])


def _refine_peak(cpu, cross_power, peak, upsample):
    """Evaluate the inverse DFT of `cross_power` on a fine grid of ±1.5 px around `peak`."""
    ny, nx = cross_power.shape
    offsets = np.arange(-1.5, 1.5 + 1e-9, 1.0 / upsample)
    ys, xs = peak[0] + offsets, peak[1] + offsets
    ky, kx = cpu.fftfreq(ny), cpu.fftfreq(nx)
    kernel_y = np.exp(2j * np.pi * np.outer(ys, ky))
    kernel_x = np.exp(2j * np.pi * np.outer(kx, xs))
    fine = (kernel_y @ cross_power @ kernel_x).real
    iy, ix = np.unravel_index(np.argmax(fine), fine.shape)
    return np.array([ys[iy], xs[ix]])


def _normalised_correlation(a, b, interior):
    a, b = a[interior], b[interior]
    a, b = a - a.mean(), b - b.mean()
    return float(np.sum(a * b) / math.sqrt(np.sum(a * a) * np.sum(b * b) + 1e-300))


def fresnel_smoothing_px(wavelength_m, defocus_difference_m, pixel_size_m, floor_px=2.0,
                         fresnel_fraction=0.7):
    """Gaussian σ (px) that removes the Fresnel fringes of a defocus difference Δ: the fringes
    of an edge have the period √(λ|Δ|) near it, so σ = fraction · √(λ|Δ|) / pixel (at least
    `floor_px`). At ±5 µm and 300 kV that is 3.1 nm: 6 px of 0.5 nm, σ ≈ 4.4 px."""
    fresnel_px = math.sqrt(wavelength_m * abs(defocus_difference_m)) / pixel_size_m
    return max(float(floor_px), float(fresnel_fraction) * fresnel_px)


def shift_candidates(reference, moving, smoothing_px=2.0, upsample=20):
    """Shifts (dy, dx) of `moving` relative to `reference` from three comparisons of images at
    different defocus, each right where the others fail:

    * `low_pass`: the images low-passed with σ = smoothing_px (their common outline and
      absorption);
    * `strong_low_pass`: σ doubled (what is left when a strong phase object's defocused image
      is dominated by its lens effect at the scale of the fringes);
    * `gradient`: the gradient magnitudes |∇(G_σ * I)| — edges, whose phase contrast changes
      sign between over- and underfocus while its position does not.
    """
    cpu = Backend(use_gpu=False, precision="double")
    reference, moving = np.asarray(reference, float), np.asarray(moving, float)
    s = float(smoothing_px)
    return {
        "low_pass": correlation_shift(cpu, ndimage.gaussian_filter(reference, s),
                                      ndimage.gaussian_filter(moving, s), upsample),
        "strong_low_pass": correlation_shift(cpu, ndimage.gaussian_filter(reference, 2 * s),
                                             ndimage.gaussian_filter(moving, 2 * s), upsample),
        "gradient": correlation_shift(cpu, ndimage.gaussian_gradient_magnitude(reference, s),
                                      ndimage.gaussian_gradient_magnitude(moving, s), upsample),
    }


def similarity_search(reference, moving, shift, smoothing_px=2.0, upsample=20,
                      max_rotation_deg=3.0, max_scale=0.03, shift_window_px=3.0):
    """Bounded search of the similarity transform T with moving ≈ T(reference), started at
    `shift`: (rotation, log scale, shift) maximise the normalised correlation of the low-passed
    T(reference) with `moving` in the central 80 % (Powell), within |rotation| ≤
    max_rotation_deg, |scale − 1| ≤ max_scale and shift_window_px of the start.

    Plausibility: an estimate that ends on (within 5 % of) its rotation or scale bound is what a
    genuine difference between the images — the lens effect of a strong phase object, which
    magnifies its defocused images — does to the fit, not a stage error; then rotation and
    scale are dropped, the start shift is kept and `fallback` says why."""
    reference, moving = np.asarray(reference, float), np.asarray(moving, float)
    smooth_reference = ndimage.gaussian_filter(reference, smoothing_px)
    smooth_moving = ndimage.gaussian_filter(moving, smoothing_px)
    ny, nx = reference.shape
    interior = np.zeros(reference.shape, bool)
    interior[ny // 10:ny - ny // 10, nx // 10:nx - nx // 10] = True

    def mismatch(parameters):
        angle, log_scale, dy, dx = parameters
        model = similarity_transform(smooth_reference, angle, math.exp(log_scale), (dy, dx), order=1)
        return -_normalised_correlation(model, smooth_moving, interior)

    log_bound = math.log1p(max_scale) if max_scale > 0 else 0.0
    bounds = [(-max_rotation_deg, max_rotation_deg), (-log_bound, log_bound),
              (shift[0] - shift_window_px, shift[0] + shift_window_px),
              (shift[1] - shift_window_px, shift[1] + shift_window_px)]
    result = optimize.minimize(mismatch, np.array([0.0, 0.0, shift[0], shift[1]]), method="Powell",
                               bounds=bounds,
                               options={"xtol": 1e-3 / upsample, "ftol": 1e-10, "maxfev": 2000})
    angle, log_scale, dy, dx = (float(v) for v in result.x)
    limits = []
    if max_rotation_deg > 0 and abs(angle) >= 0.95 * max_rotation_deg:
        limits.append(f"rotation {angle:.3f}° at its limit ±{max_rotation_deg:g}°")
    if max_scale > 0 and abs(log_scale) >= 0.95 * log_bound:
        limits.append(f"scale {math.exp(log_scale):.4f} at its limit 1 ± {max_scale:g}")
    if limits:
        return {"rotation_deg": 0.0, "scale": 1.0, "shift_px": tuple(shift),
                "fallback": "; ".join(limits)}
    return {"rotation_deg": angle, "scale": math.exp(log_scale), "shift_px": (dy, dx), "fallback": ""}


def register_to_reference(reference, moving, rotation_scale=True, upsample=20, smoothing_px=2.0,
                          max_rotation_deg=3.0, max_scale=0.03, shift_window_px=3.0):
    """Estimate the similarity transform T with moving ≈ T(reference) and undo it: the shift
    from the cross-correlation of the low-passed images (Gaussian σ = smoothing_px; give it
    `fresnel_smoothing_px` so that the defocus-dependent fringes are gone), then, with
    `rotation_scale`, `similarity_search`. Returns the aligned image (T⁻¹ applied to `moving`)
    and the estimate of T."""
    shift = shift_candidates(reference, moving, smoothing_px, upsample)["low_pass"]
    estimate = {"rotation_deg": 0.0, "scale": 1.0, "shift_px": shift, "fallback": ""}
    if rotation_scale and (max_rotation_deg > 0 or max_scale > 0):
        estimate = similarity_search(reference, moving, shift, smoothing_px, upsample,
                                     max_rotation_deg, max_scale, shift_window_px)
    estimate["correlation_shift_px"] = shift
    aligned = inverse_similarity_transform(moving, estimate["rotation_deg"], estimate["scale"],
                                           estimate["shift_px"])
    return aligned, estimate


def inverse_similarity_transform(image, rotation_deg=0.0, scale=1.0, shift_px=(0.0, 0.0), order=3):
    """T⁻¹ of similarity_transform: output(p) = input(A (p − c) + c + s)."""
    centre = (np.array(image.shape) - 1) / 2.0
    theta = math.radians(rotation_deg)
    forward = scale * np.array([[math.cos(theta), math.sin(theta)],
                                [-math.sin(theta), math.cos(theta)]])
    offset = centre + np.asarray(shift_px, float) - forward @ centre
    return ndimage.affine_transform(image, forward, offset=offset, order=order, mode="constant",
                                    cval=float(image.mean()))


def _fourier_shear(xp, image, axis, amounts):
    """image(y + amounts[x], x) (axis 0) or image(y, x + amounts[y]) (axis 1) by a phase ramp
    along `axis` per column/row: exact for band-limited, periodic images."""
    n = image.shape[axis]
    frequencies = xp.fft.fftfreq(n)
    if axis == 0:
        ramp = xp.exp(2j * math.pi * frequencies[:, None] * amounts[None, :])
    else:
        ramp = xp.exp(2j * math.pi * amounts[:, None] * frequencies[None, :])
    return xp.fft.ifft(xp.fft.fft(image, axis=axis) * ramp, axis=axis).real


def _fourier_resample_matrix(n, positions):
    """(len(positions), n) matrix of the periodic band-limited (Dirichlet) interpolation of a
    length-n signal at `positions` (pixels): the real part of (1/n) Σ_k exp(2πi k d / n) over
    the FFT's frequencies k, d = position − j, in closed form — sin(πd) / (n sin(πd/n)), times
    cos(πd/n) for even n (whose frequencies run from −n/2 to n/2 − 1), and 1 where d is a
    multiple of n. (Summed as the product of the two exponential matrices it cost a complex
    n × n matrix product per call: 36 % of a registration's time at 128².)"""
    d = np.asarray(positions, float)[:, None] - np.arange(n)[None, :]
    sine = np.sin(np.pi * d / n)
    on_sample = np.abs(sine) < 1e-12
    kernel = np.sin(np.pi * d) / (n * np.where(on_sample, 1.0, sine))
    if n % 2 == 0:
        kernel = kernel * np.cos(np.pi * d / n)
    return np.where(on_sample, 1.0, kernel)


def undo_similarity(image, rotation_deg=0.0, scale=1.0, shift_px=(0.0, 0.0), fill=None,
                    margin_px=3):
    """T⁻¹ of similarity_transform by band-limited (Fourier) interpolation:
    output(p) = input(A (p − c) + c + s), A = scale · R(θ).

    Cubic-spline resampling averages the noise of a sub-pixel position, so the noise of an image
    resampled at (say) half a pixel is lower than at a whole one, and a fit that compares
    resampled noisy images prefers sub-pixel shifts, rotations and magnifications for that
    reason alone. Band-limited resampling keeps the noise variance: the shift by a Fourier
    phase ramp, the magnification by separable Dirichlet interpolation, the rotation by three
    Fourier shears (R(θ) = X(a) Y(−sin θ) X(a), a = tan(θ/2); Unser, Thévenaz & Yaroslavsky 1995).
    Pixels whose source lies outside the image (less `margin_px`, where the periodic
    interpolation rings) take the value of `fill` there (e.g. the reference image: no change
    of intensity across focus), or the image's mean."""
    image = np.asarray(image, float)
    ny, nx = image.shape
    centre = (np.array(image.shape) - 1) / 2.0
    ky, kx = np.fft.fftfreq(ny)[:, None], np.fft.fftfreq(nx)[None, :]
    dy, dx = (float(v) for v in shift_px)
    # g1(x) = input(x + s)
    out = np.fft.ifft2(np.fft.fft2(image) * np.exp(2j * np.pi * (ky * dy + kx * dx))).real
    # g2(x) = g1(scale (x − c) + c), separable
    if scale != 1.0:
        rows = _fourier_resample_matrix(ny, scale * (np.arange(ny) - centre[0]) + centre[0])
        cols = _fourier_resample_matrix(nx, scale * (np.arange(nx) - centre[1]) + centre[1])
        out = rows @ out @ cols.T
    # g3(x) = g2(R (x − c) + c), R = [[cos, sin], [−sin, cos]] on (y, x) = X(a) Y(−sin) X(a)
    theta = math.radians(rotation_deg)
    if theta != 0.0:
        a = math.tan(theta / 2)
        y_offsets, x_offsets = np.arange(ny) - centre[0], np.arange(nx) - centre[1]
        out = _fourier_shear(np, out, 0, a * x_offsets)                  # (y + a x, x)
        out = _fourier_shear(np, out, 1, -math.sin(theta) * y_offsets)   # (y, x − sin θ y)
        out = _fourier_shear(np, out, 0, a * x_offsets)
    inside = valid_after_undo(image.shape, rotation_deg, scale, shift_px, margin_px)
    out[~inside] = (float(image.mean()) if fill is None else np.asarray(fill, float)[~inside])
    return out


def valid_after_undo(shape, rotation_deg=0.0, scale=1.0, shift_px=(0.0, 0.0), margin_px=3):
    """Pixels p of T⁻¹(image) whose source A (p − c) + c + s lies inside the image, at least
    `margin_px` from its edge."""
    ny, nx = shape
    centre = (np.array(shape) - 1) / 2.0
    theta = math.radians(rotation_deg)
    forward = scale * np.array([[math.cos(theta), math.sin(theta)],
                                [-math.sin(theta), math.cos(theta)]])
    y, x = np.mgrid[:ny, :nx].astype(float)
    points = np.stack([y - centre[0], x - centre[1]])
    source = np.tensordot(forward, points, axes=(1, 0)) + (centre + np.asarray(shift_px, float))[:, None, None]
    return ((source[0] >= margin_px) & (source[0] <= ny - 1 - margin_px)
            & (source[1] >= margin_px) & (source[1] <= nx - 1 - margin_px))


@dataclass
class FocalSeries:
    """What `tie` reads from its input file."""
    path: str
    images: np.ndarray                     # (n, y, x), float64
    defocus_m: np.ndarray                  # (n,), xpr's sign convention
    accelerating_voltage_kV: float
    pixel_size_m: float
    spherical_aberration_m: float = 0.0
    images_flipped: np.ndarray | None = None
    flip_axis: str = "x"
    truth: dict = field(default_factory=dict)   # exact_phase[_electrostatic|_magnetic]

    @property
    def reference_index(self) -> int:
        return int(np.argmin(np.abs(self.defocus_m)))

    @property
    def has_in_focus_image(self) -> bool:
        return bool(np.any(self.defocus_m == 0.0))

    def transfer_functions(self, backend, shape) -> list:
        """The objective's transfer function at every image's defocus, on a grid of `shape`."""
        from xpr.em.optics import electron_wavelength_A

        wavelength_m = electron_wavelength_A(self.accelerating_voltage_kV) * 1e-10
        return [transfer_function(backend, shape, self.pixel_size_m, wavelength_m, d,
                                  spherical_aberration_m=self.spherical_aberration_m)
                for d in self.defocus_m]
