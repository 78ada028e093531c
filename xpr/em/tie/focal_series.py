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


def register_to_reference(reference, moving, rotation_scale=True, upsample=20, smoothing_px=2.0):
    """Estimate the similarity transform T with moving ≈ T(reference) and undo it.

    1. shift from the cross-correlation of the low-passed images (Gaussian σ = smoothing_px,
       which suppresses the defocus-dependent fringes);
    2. with `rotation_scale`, (rotation, log scale, shift) refined by maximising the normalised
       correlation of T(reference) with `moving` in the central 80 % (Powell's method).
    Returns the aligned image (T⁻¹ applied to `moving`) and the estimate of T.
    """
    cpu = Backend(use_gpu=False, precision="double")
    reference, moving = np.asarray(reference, float), np.asarray(moving, float)
    smooth_reference = ndimage.gaussian_filter(reference, smoothing_px)
    smooth_moving = ndimage.gaussian_filter(moving, smoothing_px)
    shift = correlation_shift(cpu, smooth_reference, smooth_moving, upsample)
    rotation_deg, scale = 0.0, 1.0
    if rotation_scale:
        ny, nx = reference.shape
        interior = np.zeros(reference.shape, bool)
        interior[ny // 10:ny - ny // 10, nx // 10:nx - nx // 10] = True

        def mismatch(parameters):
            angle, log_scale, dy, dx = parameters
            model = similarity_transform(smooth_reference, angle, math.exp(log_scale), (dy, dx), order=1)
            return -_normalised_correlation(model, smooth_moving, interior)

        result = optimize.minimize(mismatch, np.array([0.0, 0.0, shift[0], shift[1]]),
                                   method="Powell",
                                   options={"xtol": 1e-3 / upsample, "ftol": 1e-10, "maxfev": 2000})
        angle, log_scale, dy, dx = result.x
        rotation_deg, scale, shift = float(angle), math.exp(float(log_scale)), (float(dy), float(dx))
    aligned = inverse_similarity_transform(moving, rotation_deg, scale, shift)
    return aligned, {"rotation_deg": rotation_deg, "scale": scale, "shift_px": shift}


def inverse_similarity_transform(image, rotation_deg=0.0, scale=1.0, shift_px=(0.0, 0.0), order=3):
    """T⁻¹ of similarity_transform: output(p) = input(A (p − c) + c + s)."""
    centre = (np.array(image.shape) - 1) / 2.0
    theta = math.radians(rotation_deg)
    forward = scale * np.array([[math.cos(theta), math.sin(theta)],
                                [-math.sin(theta), math.cos(theta)]])
    offset = centre + np.asarray(shift_px, float) - forward @ centre
    return ndimage.affine_transform(image, forward, offset=offset, order=order, mode="constant",
                                    cval=float(image.mean()))


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
