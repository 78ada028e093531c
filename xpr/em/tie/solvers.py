"""Transport-of-intensity solvers and the forward-model refinement that follows them.

The transport-of-intensity equation in the defocus convention of xpr.em.tie.focal_series
(T_Δf = exp(+iπλΔf q²)) reads, with k = 2π/λ,

    k ∂I/∂Δf = ∇·(I ∇φ)                                                         (1)

* Uniform intensity (I ≈ I0 constant):  φ = (k / I0) ∇⁻² ∂I/∂Δf.
* Full TIE (Teague 1983): with I∇φ = ∇ψ (the curl-free part),
      φ = ∇⁻² ∇·[ (1/I) ∇ ∇⁻² (k ∂I/∂Δf) ],
  1/I regularised as I / (I² + ε² ⟨I⟩²).
* The inverse Laplacian in Fourier space, q in cycles/m, is −1/(4π²q²); Tikhonov-regularised it is
      −q² / (4π² (q² + q_c²)²),
  which equals the exact inverse for q ≫ q_c and goes to zero at q = 0 (the unobservable offset).
  Frequencies above `q_max` are set to zero.
* ∂I/∂Δf by least squares: a polynomial in Δf fitted per pixel to all images; its linear
  coefficient at Δf = 0. With images at ±Δf only this is the central difference (I₊ − I₋)/2Δf.
* Non-periodic fields: mirror symmetrisation (Volkov, Zhu & De Graef 2002) extends the data to
  2N × 2N by reflections, which imposes zero normal derivative at the edges instead of
  periodicity; or padding with the mean intensity (∂I/∂Δf = 0 outside the field).

TIE is exact only as Δf → 0; at finite Δf its error is O(Δf² ∇⁴) (the floor seen at ±5 µm).
The refinement therefore fits the exact forward model to all images, starting from the TIE
phase: a least-squares fit of the in-focus wave ψ = exp(a + iφ),

    L(a, φ) = Σ_j Σ_pixels ( |F⁻¹[F[ψ] T_j]| − √I_j )²,

minimised by L-BFGS (own two-loop implementation, on the backend's device) over (a, φ) directly (φ needs no unwrapping), with the Wirtinger gradient
    g = Σ_j F⁻¹[ conj(T_j) F[ u_j − √I_j u_j/|u_j| ] ],  u_j = F⁻¹[F[ψ] T_j],
    ∂L/∂a = 2 Re(conj(g) ψ),  ∂L/∂φ = 2 Im(g conj(ψ)).
Gerchberg–Saxton–Misell (Misell 1973) is offered too: replace the modulus in each plane in turn.
"""
from __future__ import annotations

import math

import numpy as np


# ---------------------------------------------------------------------------------------------
# Boundary handling: mirror symmetrisation / padding
# ---------------------------------------------------------------------------------------------

def mirror_symmetrise(xp, image):
    """2N × 2N even extension [[f, f(:, ::-1)], [f(::-1, :), f(::-1, ::-1)]]."""
    top = xp.concatenate([image, image[:, ::-1]], axis=1)
    return xp.concatenate([top, top[::-1, :]], axis=0)


def pad_with_mean(xp, image, pad):
    """Pad by `pad` pixels each side with the image's mean (vacuum-like: ∂I/∂Δf → 0 there)."""
    return xp.pad(image, pad, mode="constant", constant_values=float(image.mean()))


class Boundary:
    """Extends fields before the Fourier-space solve and crops the result back."""

    def __init__(self, xp, mode, shape, pad_fraction=0.5):
        self.xp, self.mode, self.shape = xp, mode, tuple(shape)
        self.pad = int(round(pad_fraction * max(shape))) if mode == "pad" else 0

    def extend(self, image):
        if self.mode == "mirror":
            return mirror_symmetrise(self.xp, image)
        if self.mode == "pad":
            return pad_with_mean(self.xp, image, self.pad)
        return image

    def crop(self, image):
        ny, nx = self.shape
        if self.mode == "mirror":
            return image[:ny, :nx]
        if self.mode == "pad":
            return image[self.pad:self.pad + ny, self.pad:self.pad + nx]
        return image


# ---------------------------------------------------------------------------------------------
# Fourier-space operators
# ---------------------------------------------------------------------------------------------

class FourierOperators:
    """Gradient, divergence and the regularised inverse Laplacian on one grid (q in cycles/m)."""

    def __init__(self, backend, shape, pixel_size_m, q_c, q_max=None):
        xp = backend.xp
        self.backend = backend
        self.q_y = xp.asarray(backend.fftfreq(shape[0], d=pixel_size_m))[:, None]
        self.q_x = xp.asarray(backend.fftfreq(shape[1], d=pixel_size_m))[None, :]
        q2 = self.q_y ** 2 + self.q_x ** 2
        denominator = (q2 + q_c ** 2) ** 2
        denominator[0, 0] = 1.0                      # the q = 0 term is zero in either case
        kernel = -q2 / (4 * math.pi ** 2 * denominator)
        if q_max is not None:
            kernel = xp.where(q2 <= q_max ** 2, kernel, 0.0)
        self.inverse_laplacian_kernel = kernel

    def inverse_laplacian(self, field):
        be = self.backend
        return be.ifft2(be.fft2(field) * self.inverse_laplacian_kernel).real

    def gradient(self, field):
        be = self.backend
        f = be.fft2(field)
        return (be.ifft2(2j * math.pi * self.q_y * f).real, be.ifft2(2j * math.pi * self.q_x * f).real)

    def divergence(self, field_y, field_x):
        be = self.backend
        return be.ifft2(2j * math.pi * (self.q_y * be.fft2(field_y) + self.q_x * be.fft2(field_x))).real


# ---------------------------------------------------------------------------------------------
# The axial derivative of the intensity
# ---------------------------------------------------------------------------------------------

def intensity_derivative(xp, images, defocus_m, order=None):
    """∂I/∂Δf at Δf = 0 by a per-pixel least-squares polynomial fit in Δf (order ≤ n − 1, ≤ 2).

    Returns (derivative, fitted in-focus intensity). Least squares over several defocus pairs
    averages noise; order 2 removes the even (Δf²) term that (I₊ + I₋)/2 would carry.
    """
    defocus = np.asarray(defocus_m, float)
    n = len(defocus)
    if order is None:
        order = min(2, n - 1)
    scale = float(np.max(np.abs(defocus)))
    design = np.vander(defocus / scale, order + 1, increasing=True)       # columns 1, Δf, Δf²
    pseudo_inverse = xp.asarray(np.linalg.pinv(design))                   # (order+1, n)
    coefficients = xp.tensordot(pseudo_inverse, images, axes=(1, 0))
    return coefficients[1] / scale, coefficients[0]


# ---------------------------------------------------------------------------------------------
# TIE solutions
# ---------------------------------------------------------------------------------------------

def solve_tie_uniform(operators, derivative, wavenumber, mean_intensity):
    """φ = (k / I0) ∇⁻² ∂I/∂Δf."""
    return operators.inverse_laplacian(wavenumber * derivative / mean_intensity)


def solve_tie_full(operators, derivative, wavenumber, in_focus_intensity, epsilon):
    """φ = ∇⁻² ∇·[ (1/I) ∇ ∇⁻² (k ∂I/∂Δf) ], 1/I → I / (I² + ε²⟨I⟩²)."""
    auxiliary = operators.inverse_laplacian(wavenumber * derivative)
    grad_y, grad_x = operators.gradient(auxiliary)
    mean = float(in_focus_intensity.mean())
    inverse_intensity = in_focus_intensity / (in_focus_intensity ** 2 + (epsilon * mean) ** 2)
    return operators.inverse_laplacian(operators.divergence(grad_y * inverse_intensity,
                                                            grad_x * inverse_intensity))


# ---------------------------------------------------------------------------------------------
# Error measure (phase-ret-dl's): rms in a centred disk after removing the mean offset there
# ---------------------------------------------------------------------------------------------

def circular_window(shape, radius_fraction):
    """Disk of radius `radius_fraction`·width about the array centre N//2."""
    ny, nx = shape
    y, x = np.ogrid[:ny, :nx]
    return (y - ny // 2) ** 2 + (x - nx // 2) ** 2 <= (radius_fraction * min(ny, nx)) ** 2


def rms_error_in_window(phase, exact_phase, radius_fraction):
    window = circular_window(phase.shape, radius_fraction)
    difference = (np.asarray(phase, float) - np.asarray(exact_phase, float))[window]
    difference -= difference.mean()
    return float(np.sqrt(np.mean(difference ** 2)))


# ---------------------------------------------------------------------------------------------
# Refinement with the exact forward model
# ---------------------------------------------------------------------------------------------

def _amplitude_residual_gradient(backend, wave, transfers, amplitudes, blurs=None):
    """Loss Σ_j ‖√(G_j ∗ |T_j ψ|²) − √I_j‖² and its Wirtinger gradient g = ∂L/∂ψ* (up to the
    factor 2). `blurs`: the Fourier transforms Ĝ_j of the flux-preserving partial-coherence
    blur of each image (real, even, Ĝ_j(0) = 1), or None for coherent images (G_j = δ)."""
    xp = backend.xp
    wave_q = backend.fft2(wave)
    loss = 0.0
    gradient_q = xp.zeros_like(wave_q)
    for index, (transfer, amplitude) in enumerate(zip(transfers, amplitudes)):
        exit_plane = backend.ifft2(wave_q * transfer)
        blur = None if blurs is None else blurs[index]
        if blur is None:
            modulus = xp.abs(exit_plane)
            loss += float(xp.sum((modulus - amplitude) ** 2))
            residual = exit_plane - amplitude * exit_plane / xp.maximum(modulus, 1e-12)
        else:
            # I_b = G ∗ |u|²; ∂L/∂I_b = (√I_b − A)/√I_b; ∂L/∂|u|² = G ∗ that (G even); ∂L/∂u* = · u
            blurred = backend.ifft2(backend.fft2(xp.abs(exit_plane) ** 2) * blur).real
            modulus = xp.sqrt(xp.maximum(blurred, 1e-24))
            loss += float(xp.sum((modulus - amplitude) ** 2))
            weight = backend.ifft2(backend.fft2((modulus - amplitude) / modulus) * blur).real
            residual = weight * exit_plane
        gradient_q += xp.conj(transfer) * backend.fft2(residual)
    return loss, backend.ifft2(gradient_q)


def coherence_blurs(backend, shape, pixel_size_m, defocus_m, alpha_rad):
    """Ĝ_j(q) = exp(−(π α Δf_j |q|)²): Koch's flux-preserving model of partial spatial coherence
    in a focal series, as PyPty's near-field mode applies it (its `alpha_near_field`). An
    illumination whose directions spread as exp(−θ²/α²) shifts the image at defocus Δf by
    Δf·θ, so the recorded intensity is the coherent one convolved with a Gaussian of that
    spread: its total (the flux, Ĝ(0) = 1) is kept, unlike the quasi-coherent damping of the
    wave's transfer function. None for α = 0."""
    if alpha_rad <= 0:
        return None
    from xpr.em.tie.focal_series import spatial_frequencies_squared

    q2 = spatial_frequencies_squared(backend, shape, pixel_size_m)
    xp = backend.xp
    return [xp.exp(-(math.pi * alpha_rad * float(d)) ** 2 * q2).astype(backend.real_dtype)
            for d in defocus_m]


def refine_least_squares(backend, phase, log_amplitude, transfers, amplitudes, iterations,
                         fit_amplitude=True, on_iteration=None, blurs=None):
    """Fit ψ = exp(a + iφ) to all images by L-BFGS from (a, φ) = TIE start; returns (φ, a, loss).
    With `blurs` (coherence_blurs) the model images are G_j ∗ |T_j ψ|² (near-field mode).

    The parameters stay on the backend's device (numpy or cupy); `on_iteration(k, loss)` is
    called after each iteration. Loss: mean squared amplitude misfit per pixel and plane.
    """
    xp = backend.xp
    n_values = float(np.prod(phase.shape)) * len(transfers)
    fixed_log_amplitude = xp.asarray(log_amplitude, dtype=backend.real_dtype)

    def loss_and_gradient(parameters):
        a = parameters[1] if fit_amplitude else fixed_log_amplitude
        wave = xp.exp(a + 1j * parameters[0]).astype(backend.complex_dtype)
        loss, gradient = _amplitude_residual_gradient(backend, wave, transfers, amplitudes,
                                                      blurs)
        parts = [2 * xp.imag(gradient * xp.conj(wave))]
        if fit_amplitude:
            parts.append(2 * xp.real(xp.conj(gradient) * wave))
        return loss / n_values, xp.stack(parts).astype(backend.real_dtype) / n_values

    start = [xp.asarray(phase, dtype=backend.real_dtype)]
    if fit_amplitude:
        start.append(fixed_log_amplitude)
    parameters, loss = minimise_lbfgs(xp, loss_and_gradient, xp.stack(start), int(iterations),
                                      on_iteration=on_iteration)
    return parameters[0], (parameters[1] if fit_amplitude else fixed_log_amplitude), loss


def minimise_lbfgs(xp, loss_and_gradient, start, iterations, memory=10, first_step=0.1,
                   on_iteration=None):
    """Limited-memory BFGS (Nocedal 1980, two-loop recursion) with a backtracking Armijo line
    search, on arrays of any shape on any device. The first step moves no parameter by more
    than `first_step`."""
    def dot(u, v):
        return float(xp.sum(u.astype(xp.float64) * v.astype(xp.float64)))

    x = start
    loss, gradient = loss_and_gradient(x)
    history = []                                     # (s, y, 1 / yᵀs)
    for iteration in range(iterations):
        direction = gradient.copy()
        alphas = []
        for s, y, rho in reversed(history):
            alpha = rho * dot(s, direction)
            direction -= alpha * y
            alphas.append(alpha)
        if history:
            s, y, _ = history[-1]
            direction *= dot(s, y) / dot(y, y)
        else:
            direction *= first_step / max(float(xp.abs(gradient).max()), 1e-30)
        for (s, y, rho), alpha in zip(history, reversed(alphas)):
            direction += s * (alpha - rho * dot(y, direction))
        direction = -direction
        slope = dot(gradient, direction)
        if slope >= 0:                               # not a descent direction: restart
            history.clear()
            direction = -gradient * (first_step / max(float(xp.abs(gradient).max()), 1e-30))
            slope = dot(gradient, direction)
        step = 1.0
        for _ in range(30):
            candidate = x + step * direction
            new_loss, new_gradient = loss_and_gradient(candidate)
            if new_loss <= loss + 1e-4 * step * slope:
                break
            step *= 0.5
        else:
            break                                    # no decrease possible: converged
        s, y = candidate - x, new_gradient - gradient
        curvature = dot(s, y)
        if curvature > 1e-12 * math.sqrt(dot(s, s) * dot(y, y)):
            history.append((s, y, 1.0 / curvature))
            history = history[-memory:]
        x, loss, gradient = candidate, new_loss, new_gradient
        if on_iteration is not None:
            on_iteration(iteration + 1, loss)
    return x, loss


def refine_gs_misell(backend, phase, log_amplitude, transfers, amplitudes, iterations,
                     on_iteration=None):
    """Gerchberg–Saxton–Misell: propagate to each plane in turn, impose its modulus, go back.

    The phase is tracked unwrapped by accumulating the (small) per-sweep change
    arg(ψ_new / ψ_old) on top of the TIE start.
    """
    xp = backend.xp
    phi = xp.asarray(phase, dtype=backend.real_dtype)
    wave = xp.exp(log_amplitude + 1j * phi).astype(backend.complex_dtype)
    # the wave stays in Fourier space between the planes (F[ψ] ← F[plane] T*, then the next
    # plane is F⁻¹[F[ψ] T]): 2 FFTs per plane and one per sweep back to ψ, not 4 per plane
    wave_q = backend.fft2(wave)
    loss = float("nan")
    for iteration in range(int(iterations)):
        previous = wave
        loss = 0.0
        for transfer, amplitude in zip(transfers, amplitudes):
            plane = backend.ifft2(wave_q * transfer)
            modulus = xp.abs(plane)
            loss += float(xp.sum((modulus - amplitude) ** 2))
            plane = amplitude * plane / xp.maximum(modulus, 1e-12)
            wave_q = backend.fft2(plane) * xp.conj(transfer)
        wave = backend.ifft2(wave_q)
        phi = phi + xp.angle(wave * xp.conj(previous))
        loss /= float(np.prod(phase.shape)) * len(transfers)
        if on_iteration is not None:
            on_iteration(iteration + 1, loss)
    return phi, xp.log(xp.maximum(xp.abs(wave), 1e-12)), loss
