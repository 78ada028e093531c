"""The ptychographic forward model and its analytic gradients.

For scan position j with window corner r_j + f_j (integer part r_j, sub-pixel part f_j, pixels):

    ψ_j,m^(0)  = IFFT[ P_m(k) · exp(−2πi k·f_j) ]                probe mode m shifted by f_j
    φ_j,m^(s)  = ψ_j,m^(s) · O_s(r_j + r)                          slice s of the object
    ψ_j,m^(s+1) = IFFT[ FFT[φ_j,m^(s)] · K_Δz ]                   Fresnel step (2/3 band limit)
    Ψ_j,m      = FFT[φ_j,m^(S−1)] / n                              far field (unitary transform)
    I_j        = Σ_m |Ψ_j,m|²                                      incoherent sum of modes

P_m = FFT[p_m] with p_m the real-space probe modes (centred in the n × n window). The loss is
L = Σ_j ℓ(I_j, D_j). Gradients are Wirtinger gradients g = ∂L/∂Re z + i ∂L/∂Im z (= 2∂L/∂z̄),
obtained by applying the adjoint of each linear step to g_Ψ = 2 ∂ℓ/∂I · Ψ:

    g_φ^(S−1) = n · IFFT[g_Ψ]                          (adjoint of the unitary FFT)
    g_O_s    += Σ_m conj(ψ^(s)) g_φ^(s)                (scattered back to the object window)
    g_ψ^(s)   = conj(O_s) g_φ^(s);  g_φ^(s−1) = IFFT[FFT[g_ψ^(s)] · conj(K_Δz)]
    g_p_m     = IFFT[ Σ_j conj(R_j) · FFT[g_ψ_j,m^(0)] ]   (R_j = exp(−2πi k·f_j))
    ∂L/∂f_j   = (2π / n²) Σ_{m,k} k · Im( conj(G_j,m) P_m R_j ),   G = FFT[g_ψ^(0)]

All arrays are complex64 on the backend's device; sums that feed the optimiser are float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from xpr.em import multislice
from xpr.em.ptychography import losses


@dataclass
class Model:
    """Geometry and fixed physics of a reconstruction (everything that is not optimised)."""

    backend: object
    window: int                 # n: pattern (and probe window) size in pixels, after padding
    pixel_size_A: float         # real-space pixel of the window grid
    wavelength_A: float
    slice_thickness_A: float
    n_slices: int
    band_limit_fraction: float = 2.0 / 3.0
    complex_dtype: str = "complex64"   # complex128 for gradient checks

    def __post_init__(self):
        xp = self.backend.xp
        n = self.window
        self.complex_dtype = xp.dtype(self.complex_dtype)
        self.real_dtype = xp.float64 if self.complex_dtype == xp.complex128 else xp.float32
        self.frequencies = xp.fft.fftfreq(n).astype(self.real_dtype)      # cycles / pixel
        self.propagator = None
        if self.n_slices > 1:
            self.propagator = multislice.fresnel_propagator(
                (n, n), self.pixel_size_A, self.wavelength_A, self.slice_thickness_A, xp,
                band_limit_fraction=self.band_limit_fraction).astype(self.complex_dtype)

    # -- building blocks ---------------------------------------------------------------------
    def fft2(self, a):
        return self.backend.fftn(a, axes=(-2, -1))

    def ifft2(self, a):
        return self.backend.ifftn(a, axes=(-2, -1))

    def ramps(self, fractional):
        """R_j(k) = exp(−2πi k·f_j) for sub-pixel parts f (B, 2) → (B, n, n) complex64."""
        xp = self.backend.xp
        f = xp.asarray(fractional, dtype=self.real_dtype)
        ramp_y = xp.exp(-2j * math.pi * f[:, 0:1] * self.frequencies[None, :])
        ramp_x = xp.exp(-2j * math.pi * f[:, 1:2] * self.frequencies[None, :])
        ramp_y, ramp_x = ramp_y.astype(self.complex_dtype), ramp_x.astype(self.complex_dtype)
        return ramp_y[:, :, None] * ramp_x[:, None, :]

    def split_positions(self, positions):
        """Window corners (B, 2) float → integer corners (numpy int) and sub-pixel parts."""
        import numpy as np

        positions = np.asarray(self.backend.asnumpy(positions), dtype=np.float64)
        corners = np.floor(positions + 0.5).astype(np.int64)
        return corners, positions - corners

    def gather(self, object_slice, corners):
        """Object windows O(r_j + r) for integer corners: (B, n, n) (a copy)."""
        xp = self.backend.xp
        n = self.window
        stride_tricks = getattr(getattr(xp, "lib", None), "stride_tricks", None)
        if stride_tricks is not None and hasattr(stride_tricks, "sliding_window_view"):
            view = stride_tricks.sliding_window_view(object_slice, (n, n))
            return view[xp.asarray(corners[:, 0]), xp.asarray(corners[:, 1])]
        rows = xp.asarray(corners[:, 0])[:, None] + xp.arange(n)[None, :]
        cols = xp.asarray(corners[:, 1])[:, None] + xp.arange(n)[None, :]
        return object_slice[rows[:, :, None], cols[:, None, :]]

    def scatter_add(self, target, windows, corners):
        """target[r_j + r] += windows_j (adjoint of gather)."""
        n = self.window
        for (row, col), window in zip(corners.tolist(), windows):
            target[row:row + n, col:col + n] += window

    @staticmethod
    def shift_groups(fractional):
        """Scan points sharing a sub-pixel shift (a raster on a commensurate grid has few).

        Returns (unique shifts (G, 2), group index of each point (B,)).
        """
        import numpy as np

        keys = np.round(np.asarray(fractional) * 1e6).astype(np.int64)
        unique, inverse = np.unique(keys, axis=0, return_inverse=True)
        return unique.astype(np.float64) * 1e-6, inverse.reshape(-1)

    @staticmethod
    def mode_sum(a):
        """Σ over the mode axis (1) without a reduction when there is one mode."""
        return a[:, 0] if a.shape[1] == 1 else a.sum(axis=1)

    def power(self, a):
        """|a|² as a new real array (abs is a fast vectorised hypot; squaring in place)."""
        xp = self.backend.xp
        result = xp.abs(a)
        result *= result
        return result

    # -- model and gradient ------------------------------------------------------------------
    def incident_waves(self, probe_k, fractional, grouped):
        """ψ⁽⁰⁾ (B, M, n, n): probe modes shifted by sub-pixel f_j; computed once per distinct
        shift when `grouped` (then also returns the group data), else per point."""
        xp = self.backend.xp
        if grouped is None:
            ramps = self.ramps(fractional)
            return self.ifft2(probe_k[None] * ramps[:, None]), ramps
        unique, inverse = grouped
        shifted = self.ifft2(probe_k[None] * self.ramps(unique)[:, None])
        return shifted[xp.asarray(inverse)], None

    def far_field(self, object_slices, probe_k, corners, fractional, keep=False, grouped=None):
        """Unnormalised far field FFT[φ⁽ˢ⁻¹⁾] (B, M, n, n) = n Ψ; with keep=True also the
        per-slice incident waves and object windows, and the ramps (None when grouped)."""
        psi, ramps = self.incident_waves(probe_k, fractional, grouped)
        incident, windows = [], []
        for s in range(self.n_slices):
            window = self.gather(object_slices[s], corners)
            if keep:
                incident.append(psi)
                windows.append(window)
            phi = psi * window[:, None, :, :]
            if s < self.n_slices - 1:
                spectrum = self.fft2(phi)
                spectrum *= self.propagator
                psi = self.ifft2(spectrum)
        return self.fft2(phi), (ramps, incident, windows)

    def intensities(self, object_slices, probe, positions):
        """Model diffraction intensities (B, n, n), FFT order, for real-space probe modes."""
        corners, fractional = self.split_positions(positions)
        far, _ = self.far_field(object_slices, self.fft2(probe), corners, fractional)
        intensity = self.mode_sum(self.power(far))
        intensity *= 1.0 / self.window ** 2
        return intensity

    def loss_and_gradients(self, params, counts, loss_name, refine, batch_size, mask=None,
                           with_validation=False):
        """L and its Wirtinger gradients for {'object', 'probe', 'positions'} over all patterns
        (and, with_validation, the loss on the held-out pixels as a third value).

        params: object (S, H, W) complex64, probe (M, n, n) complex64, positions (N, 2) float64.
        counts: (N, n, n) float32 in FFT order, or a losses.Measurements holding them.
        refine: names to return gradients for. mask: (n, n) detector mask in FFT order
        (1 measured, 0 padding) or None.
        """
        xp = self.backend.xp
        measured = counts if isinstance(counts, losses.Measurements) else \
            losses.Measurements(counts, mask)
        loss_fn = losses.by_name(loss_name)
        object_slices, probe, positions = params["object"], params["probe"], params["positions"]
        probe_k = self.fft2(probe)
        want_probe = "probe" in refine
        want_positions = "positions" in refine
        grad_object = xp.zeros_like(object_slices) if "object" in refine else None
        grad_probe_k = xp.zeros_like(probe_k) if want_probe else None
        grad_positions = xp.zeros(positions.shape, dtype=xp.float64) if want_positions else None
        n = self.window
        total = validation = 0.0
        corners_all, fractional_all = self.split_positions(positions)
        for start in range(0, measured.counts.shape[0], batch_size):
            batch = slice(start, start + batch_size)
            corners, fractional = corners_all[batch], fractional_all[batch]
            grouped = None
            if not want_positions:
                unique, inverse = self.shift_groups(fractional)
                if 2 * len(unique) <= len(fractional):
                    grouped = (unique, inverse)
            far, (ramps, incident, windows) = self.far_field(
                object_slices, probe_k, corners, fractional, keep=True, grouped=grouped)
            intensity = self.mode_sum(self.power(far))
            intensity *= 1.0 / n ** 2
            value, d_intensity, held_out = loss_fn(intensity, measured, batch, xp)
            total += value
            validation += held_out
            # g_φ = n IFFT[g_Ψ] with g_Ψ = 2 ∂ℓ/∂I · Ψ and Ψ = far / n:  g_φ = IFFT[2 ∂ℓ/∂I · far]
            d_intensity *= 2.0
            far *= d_intensity[:, None, :, :]
            g_phi = self.ifft2(far)
            del far, intensity, d_intensity
            for s in range(self.n_slices - 1, -1, -1):
                need_wave_gradient = s > 0 or want_probe or want_positions
                if need_wave_gradient:
                    window = windows[s]
                    xp.conjugate(window, out=window)
                if grad_object is not None:
                    psi = incident[s]
                    xp.conjugate(psi, out=psi)
                    psi *= g_phi
                    self.scatter_add(grad_object[s], self.mode_sum(psi), corners)
                    del psi
                incident[s] = None
                if not need_wave_gradient:
                    break
                g_phi *= window[:, None, :, :]               # now g_ψ⁽ˢ⁾
                if s > 0:
                    spectrum = self.fft2(g_phi)
                    spectrum *= xp.conj(self.propagator)
                    g_phi = self.ifft2(spectrum)
            if want_probe and grouped is not None:
                unique, inverse = grouped
                summed = xp.stack([g_phi[xp.asarray(inverse == g)].sum(axis=0)
                                   for g in range(len(unique))])
                grad_probe_k += xp.einsum("gmyx,gyx->myx", self.fft2(summed),
                                          xp.conj(self.ramps(unique)))
            elif want_probe or want_positions:
                g_big = self.fft2(g_phi)
                if want_probe:
                    grad_probe_k += xp.einsum("bmyx,byx->myx", g_big, xp.conj(ramps))
                if want_positions:
                    xp.conjugate(g_big, out=g_big)
                    g_big *= probe_k[None]
                    g_big *= ramps[:, None]
                    torque = self.mode_sum(g_big).imag
                    k = self.frequencies
                    scale = 2.0 * math.pi / n ** 2
                    grad_positions[batch, 0] = scale * xp.sum(torque * k[None, :, None],
                                                              axis=(1, 2), dtype=xp.float64)
                    grad_positions[batch, 1] = scale * xp.sum(torque * k[None, None, :],
                                                              axis=(1, 2), dtype=xp.float64)
        gradients = {}
        if grad_object is not None:
            gradients["object"] = grad_object
        if want_probe:
            gradients["probe"] = self.ifft2(grad_probe_k).astype(self.complex_dtype)
        if want_positions:
            gradients["positions"] = grad_positions
        if with_validation:
            return total, gradients, validation
        return total, gradients
