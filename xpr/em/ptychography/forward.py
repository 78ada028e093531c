"""The ptychographic forward model and its analytic gradients.

For scan position j with window corner r_j + f_j (integer part r_j, sub-pixel part f_j, pixels):

    ψ_j,m^(0)  = IFFT[ P_m(k) · exp(−2πi k·f_j) ]                probe mode m shifted by f_j
    φ_j,m^(s)  = ψ_j,m^(s) · O_s(r_j + r)                          slice s of the object
    ψ_j,m^(s+1) = IFFT[ FFT[φ_j,m^(s)] · K_Δz ]                   Fresnel step (2/3 band limit)
    Ψ_j,m      = FFT[φ_j,m^(S−1)] / n                              far field (unitary transform)
    Ψ_j,m      = IFFT[ FFT[φ_j,m^(S−1)] · K_z ]                    or near field: Fresnel
                                                                   propagation to the detector
    I_j        = Σ_m |Ψ_j,m|²                                      incoherent sum of modes

P_m = FFT[p_m] with p_m the real-space probe modes (centred in the n × n window). The loss is
L = Σ_j ℓ(I_j, D_j). Gradients are Wirtinger gradients g = ∂L/∂Re z + i ∂L/∂Im z (= 2∂L/∂z̄),
obtained by applying the adjoint of each linear step to g_Ψ = 2 ∂ℓ/∂I · Ψ:

    g_φ^(S−1) = n · IFFT[g_Ψ]                          (adjoint of the unitary FFT)
    g_φ^(S−1) = IFFT[ FFT[g_Ψ] · conj(K_z) ]          (near field: adjoint of the propagation)
    g_O_s    += Σ_m conj(ψ^(s)) g_φ^(s)                (scattered back to the object window)
    g_ψ^(s)   = conj(O_s) g_φ^(s);  g_φ^(s−1) = IFFT[FFT[g_ψ^(s)] · conj(K_Δz)]
    g_p_m     = IFFT[ Σ_j conj(R_j) · FFT[g_ψ_j,m^(0)] ]   (R_j = exp(−2πi k·f_j))
    ∂L/∂f_j   = (2π / n²) Σ_{m,k} k · Im( conj(G_j,m) P_m R_j ),   G = FFT[g_ψ^(0)]

Near field. The detector sits a distance z behind the specimen (for a diverging beam, z is
the effective distance of the Fresnel scaling theorem, z₁z₂/(z₁+z₂), and the pixel the
detector pixel divided by the magnification): the measured image is |Ψ|² on the object grid,
in natural pixel order (not FFT order), K_z = exp(−iπλz|k|²) without a band limit. It costs
one more FFT pair forward and one in the adjoint than the far field.

Defocus as an unknown. With an extra defocus Δf (Å, PyPty's sign: C10 → C10 − Δf, so the
aberration phase χ changes by −πλΔf|k|²) the probe modes seen by the model are

    P'_m(k) = P_m(k) · F(k),   F(k) = exp(iπλΔf |k|²)            (k in Å⁻¹)

and, with g_P' = Σ_j conj(R_j) G_j / n² the Wirtinger gradient with respect to P',

    ∂L/∂Δf   = −πλ Σ_{m,k} |k|² Im( conj(g_P'_m) P'_m ),      g_p_m = n² IFFT[conj(F) g_P'_m]

Further aberrations as unknowns. Changes δC_c (Å) of named Krivanek coefficients (C12a, C21b,
C30, …; optics.aberration_phase) change the aberration phase by δχ = Σ_c δC_c B_c(k), with
B_c(k) = (2π/λ) α^(n+1)/(n+1) · (cos or sin)(mφ) the phase of a unit coefficient (α = λ|k|,
φ the azimuth of k), and multiply the probe by F_a(k) = exp(−i δχ(k)). Then

    ∂L/∂δC_c = Σ_{m,k} B_c(k) Im( conj(g_P'_m) P'_m )

(for C10, B = πλ|k|² and δC10 = −Δf: the defocus formula above).

Specimen tilt as an unknown (multislice). A tilt θ (mrad, [y, x]) of the beam relative to the
slices shifts the wave by θΔz per slice: K_Δz(k) → K_Δz(k)·exp(−2πiΔz k·θ·10⁻³). With
Ψ_s = FFT[ψ⁽ˢ⁾] the spectrum of the wave entering slice s ≥ 1 (= FFT[φ⁽ˢ⁻¹⁾]·K) and
G_s = FFT[g_ψ⁽ˢ⁾],

    ∂L/∂θ = (2πΔz·10⁻³ / n²) Σ_{s≥1} Σ_{j,m,k} k · Im( conj(G_s) Ψ_s )

Computation. Patterns are processed in batches small enough for the batch's work arrays to
stay in the processor cache on a CPU (ptycho.batch_size_for); every element-wise step is then a
pass over cached data and an epoch costs little more than its FFTs. The batches are shared
out over threads (Model.lanes; numpy and the FFTs release the GIL), each with its own sums.
Object windows are read through a strided (sliding-window) view and gradients scattered back
with one vectorised unbuffered add over precomputed flat indices. On a raster whose sub-pixel
shifts repeat, the shifted probes are computed once per distinct shift for all patterns, and
the probe gradient is summed per shift in real space across all batches before a single FFT
per shift.

All arrays are complex64 on the backend's device; sums that feed the optimiser are float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np                     # host-side bookkeeping only (positions, groups)

from xpr.em.ptychography import multislice
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
    geometry: str = "far_field"        # far_field or near_field
    detector_distance_A: float = 0.0   # near field: (effective) specimen–detector distance
    aberration_names: tuple = ()       # Krivanek coefficients refined as params["aberrations"]

    def __post_init__(self):
        xp = self.backend.xp
        n = self.window
        self.complex_dtype = xp.dtype(self.complex_dtype)
        self.real_dtype = xp.float64 if self.complex_dtype == xp.complex128 else xp.float32
        self.frequencies = xp.fft.fftfreq(n).astype(self.real_dtype)      # cycles / pixel
        self.propagator = None
        self.detector_propagator = None
        if self.geometry not in ("far_field", "near_field"):
            raise ValueError(f"geometry must be far_field or near_field, not {self.geometry!r}")
        if self.geometry == "near_field":
            # band_limit_fraction 2: |k| ≤ 1 cycle/pixel, i.e. every frequency of the grid
            self.detector_propagator = multislice.fresnel_propagator(
                (n, n), self.pixel_size_A, self.wavelength_A, self.detector_distance_A, xp,
                band_limit_fraction=2.0).astype(self.complex_dtype)
        if self.n_slices > 1:
            self.propagator = multislice.fresnel_propagator(
                (n, n), self.pixel_size_A, self.wavelength_A, self.slice_thickness_A, xp,
                band_limit_fraction=self.band_limit_fraction).astype(self.complex_dtype)
            self.propagator_adjoint = xp.conj(self.propagator)
        self.aberration_names = tuple(self.aberration_names)
        self._aberration_basis = self._basis() if self.aberration_names else None

    # -- building blocks ---------------------------------------------------------------------
    def fft2(self, a):
        """2-D FFT over the last two axes. (Not overwrite_x: in this pipeline the in-place
        transforms measured three times slower, scipy 1.17.)"""
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
        positions = np.asarray(self.backend.asnumpy(positions), dtype=np.float64)
        corners = np.floor(positions + 0.5).astype(np.int64)
        return corners, positions - corners

    def window_indices(self, corners, width: int):
        """Flat indices (B, n, n) of the object pixels r_j + r in an object of `width` columns."""
        xp = self.backend.xp
        n = self.window
        offsets = xp.arange(n)[:, None] * width + xp.arange(n)[None, :]
        starts = xp.asarray(corners[:, 0] * width + corners[:, 1])
        return starts[:, None, None] + offsets[None]

    def window_views(self, object_slices):
        """Per slice, the strided view (H−n+1, W−n+1, n, n) of all n × n windows (no copy), or
        the slice itself where the array module has no sliding_window_view."""
        xp = self.backend.xp
        stride_tricks = getattr(getattr(xp, "lib", None), "stride_tricks", None)
        if stride_tricks is None or not hasattr(stride_tricks, "sliding_window_view"):
            return list(object_slices)
        n = self.window
        return [stride_tricks.sliding_window_view(slice_, (n, n)) for slice_ in object_slices]

    def gather(self, object_slice, corners):
        """Object windows O(r_j + r) for integer corners: (B, n, n) (a copy). `object_slice`
        is a slice (H, W) or its window view from window_views (then no index arrays)."""
        xp = self.backend.xp
        if object_slice.ndim == 2:
            views = self.window_views(object_slice[None])[0]
            if views.ndim == 2:
                return object_slice.reshape(-1)[self.window_indices(corners,
                                                                    object_slice.shape[-1])]
            object_slice = views
        return object_slice[xp.asarray(corners[:, 0]), xp.asarray(corners[:, 1])]

    def scatter_add(self, target, windows, corners, indices=None):
        """target[r_j + r] += windows_j (adjoint of gather), one unbuffered vectorised add
        (overlapping windows accumulate); `indices` from window_indices if already formed."""
        xp = self.backend.xp
        if indices is None:
            indices = self.window_indices(corners, target.shape[-1])
        flat = target.reshape(-1)                      # a view of a contiguous target
        self.backend.scatter_add(flat, indices.reshape(-1), windows.reshape(-1))   # numpy / cupy add.at
        if not xp.may_share_memory(flat, target):
            target[...] = flat.reshape(target.shape)

    @staticmethod
    def shift_groups(fractional):
        """Scan points sharing a sub-pixel shift (a raster on a commensurate grid has few).

        Returns (unique shifts (G, 2), group index of each point (B,)).
        """
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

    def defocus_factor(self, defocus_A):
        """F(k) = exp(iπλΔf|k|²) (n, n), FFT order: the extra defocus Δf (Å) on the probe."""
        xp = self.backend.xp
        k = self.frequencies.astype(xp.float64) / self.pixel_size_A
        k2 = k[:, None] ** 2 + k[None, :] ** 2
        delta = float(xp.asarray(defocus_A).reshape(-1)[0])
        return xp.exp(1j * math.pi * self.wavelength_A * delta * k2).astype(self.complex_dtype)

    def aberration_basis(self):
        """B_c(k) (K, n, n) float64, FFT order: the phase (rad) of a unit change (1 Å) of each
        coefficient in aberration_names (optics.aberration_phase)."""
        return self._aberration_basis

    def _basis(self):
        from xpr.em import optics

        xp = self.backend.xp
        k = self.frequencies.astype(xp.float64) / self.pixel_size_A
        ky, kx = k[:, None], k[None, :]
        basis = xp.zeros((len(self.aberration_names), self.window, self.window), dtype=xp.float64)
        for index, name in enumerate(self.aberration_names):
            position = optics.krivanek_index(name)
            unit = [0.0] * position + [1.0]
            basis[index] = optics.aberration_phase(kx, ky, self.wavelength_A, unit, xp)
        return basis

    def aberration_factor(self, changes_A, basis=None):
        """F_a(k) = exp(−i Σ_c δC_c B_c(k)) (n, n), FFT order, for changes δC (K,) in Å."""
        xp = self.backend.xp
        basis = self._aberration_basis if basis is None else basis
        changes = xp.asarray(changes_A, dtype=xp.float64).reshape(-1, 1, 1)
        return xp.exp(-1j * xp.sum(changes * basis, axis=0)).astype(self.complex_dtype)

    def propagators(self, tilt_mrad):
        """(K_Δz, conj K_Δz) for a specimen tilt (y, x) in mrad (multislice)."""
        xp = self.backend.xp
        tilt = tuple(float(t) for t in self.backend.asnumpy(xp.asarray(tilt_mrad)).reshape(-1))
        kernel = multislice.fresnel_propagator(
            (self.window, self.window), self.pixel_size_A, self.wavelength_A,
            self.slice_thickness_A, xp, tilt_mrad=tilt,
            band_limit_fraction=self.band_limit_fraction, dtype=self.complex_dtype)
        return kernel, xp.conj(kernel)

    def probe_factor(self, params):
        """The product of the defocus and aberration factors params asks for, or None."""
        factor = None
        if params.get("defocus") is not None:
            factor = self.defocus_factor(params["defocus"])
        if params.get("aberrations") is not None and len(self.aberration_names):
            extra = self.aberration_factor(params["aberrations"])
            factor = extra if factor is None else factor * extra
        return factor

    def squared_frequencies_invA(self):
        """|k|² in Å⁻² on the FFT-ordered grid (n, n), float64."""
        xp = self.backend.xp
        k = self.frequencies.astype(xp.float64) / self.pixel_size_A
        return k[:, None] ** 2 + k[None, :] ** 2

    def detector_wave(self, phi):
        """n Ψ from the exit wave φ: FFT[φ] (far field) or n IFFT[FFT[φ] K_z] (near field)."""
        spectrum = self.fft2(phi)
        if self.detector_propagator is None:
            return spectrum
        spectrum *= self.detector_propagator
        wave = self.ifft2(spectrum)
        wave *= self.window
        return wave

    def detector_adjoint(self, weighted):
        """g_φ from `weighted` = 2 ∂ℓ/∂I · nΨ (the adjoint of detector_wave, divided by n²)."""
        if self.detector_propagator is None:
            return self.ifft2(weighted)
        spectrum = self.fft2(weighted)
        spectrum *= self.backend.xp.conj(self.detector_propagator)
        wave = self.ifft2(spectrum)
        wave *= 1.0 / self.window
        return wave

    # -- model and gradient ------------------------------------------------------------------
    def incident_waves(self, probe_k, fractional, grouped):
        """ψ⁽⁰⁾ (B, M, n, n): probe modes shifted by sub-pixel f_j, and the ramps (B, n, n);
        with `grouped` = (shifted probes per distinct shift (G, M, n, n), group of each point)
        they are looked up instead (ramps None)."""
        xp = self.backend.xp
        if grouped is None:
            ramps = self.ramps(fractional)
            return self.ifft2(probe_k[None] * ramps[:, None]), ramps
        shifted, inverse = grouped
        return shifted[xp.asarray(inverse)], None

    def shifted_probes(self, probe_k, fractional):
        """(unique shifts, shifted probe modes per shift (G, M, n, n), group of each point) when
        at most half as many distinct sub-pixel shifts as points, else None."""
        unique, inverse = self.shift_groups(fractional)
        if 2 * len(unique) > len(fractional):
            return None
        shifted = self.ifft2(probe_k[None] * self.ramps(unique)[:, None])
        return unique, shifted, inverse

    def far_field(self, object_slices, probe_k, corners, fractional, keep=False, grouped=None,
                  views=None, propagator=None):
        """n Ψ (B, M, n, n): the unnormalised far field FFT[φ⁽ˢ⁻¹⁾], or the near-field wave
        (detector_wave); with keep=True also the
        per-slice incident waves and object windows, and the ramps (None when grouped)."""
        psi, ramps = self.incident_waves(probe_k, fractional, grouped)
        incident, windows = [], []
        for s in range(self.n_slices):
            window = self.gather(object_slices[s] if views is None else views[s], corners)
            if keep:
                incident.append(psi)
                windows.append(window)
            phi = psi * window[:, None, :, :]
            if s < self.n_slices - 1:
                spectrum = self.fft2(phi)
                spectrum *= self.propagator if propagator is None else propagator
                psi = self.ifft2(spectrum)
        return self.detector_wave(phi), (ramps, incident, windows)

    def intensities(self, object_slices, probe, positions, defocus_A=None, aberrations_A=None,
                    tilt_mrad=None):
        """Model intensities (B, n, n) — FFT order in the far field, image order in the near
        field — for real-space probe modes (with
        an extra defocus Δf in Å and aberration changes δC in Å if given)."""
        corners, fractional = self.split_positions(positions)
        probe_k = self.fft2(probe)
        factor = self.probe_factor({"defocus": defocus_A, "aberrations": aberrations_A})
        if factor is not None:
            probe_k = probe_k * factor
        propagator = None if tilt_mrad is None or self.n_slices == 1 else \
            self.propagators(tilt_mrad)[0]
        far, _ = self.far_field(object_slices, probe_k, corners, fractional,
                                propagator=propagator)
        intensity = self.mode_sum(self.power(far))
        intensity *= 1.0 / self.window ** 2
        return intensity

    def loss_and_gradients(self, params, counts, loss_name, refine, batch_size, mask=None,
                           with_validation=False):
        """L and its Wirtinger gradients for {'object', 'probe', 'positions', 'defocus',
        'aberrations', 'tilt'} over all patterns (and, with_validation, the loss on the
        held-out pixels as a third value).

        params: object (S, H, W) complex64, probe (M, n, n) complex64, positions (N, 2) float64,
        optionally defocus (1,) float64 (extra defocus Δf in Å applied to the probe) and
        aberrations (K,) float64 (changes of the coefficients aberration_names, Å) and tilt
        (2,) float64 (specimen tilt [y, x] in mrad, multislice).
        counts: (N, n, n) float32 in FFT order (near field: image order), or a
        losses.Measurements holding them.
        refine: names to return gradients for. mask: (n, n) detector mask in FFT order
        (1 measured, 0 padding) or None.

        On a CPU the batches are shared out over `lanes` threads (numpy and the FFTs release
        the GIL, so the element-wise work uses every core too): lane i takes batches i,
        i + lanes, …, into its own sums, added up in lane order — the result does not depend
        on the timing of the threads.
        """
        xp = self.backend.xp
        measured = counts if isinstance(counts, losses.Measurements) else \
            losses.Measurements(counts, mask)
        object_slices, probe, positions = params["object"], params["probe"], params["positions"]
        probe_k = self.fft2(probe)
        focus = self.probe_factor(params)
        if focus is not None:
            probe_k *= focus                                   # P' = P F
        want_probe = "probe" in refine
        want_positions = "positions" in refine
        want_defocus = "defocus" in refine
        want_aberrations = "aberrations" in refine and len(self.aberration_names) > 0
        want_tilt = "tilt" in refine and self.n_slices > 1
        propagator = propagator_adjoint = None
        if params.get("tilt") is not None and self.n_slices > 1:
            propagator, propagator_adjoint = self.propagators(params["tilt"])
        n = self.window
        corners_all, fractional_all = self.split_positions(positions)
        evaluation = _Evaluation(
            measured=measured, loss_fn=losses.by_name(loss_name), object_slices=object_slices,
            views=self.window_views(object_slices), probe_k=probe_k, corners=corners_all,
            fractional=fractional_all, want_object="object" in refine,
            probe_side=want_probe or want_defocus or want_aberrations,
            want_positions=want_positions,
            groups=None if want_positions else self.shifted_probes(probe_k, fractional_all),
            grad_positions=xp.zeros(positions.shape, dtype=xp.float64) if want_positions
            else None, want_tilt=want_tilt,
            propagator=self.propagator if propagator is None else propagator,
            propagator_adjoint=getattr(self, "propagator_adjoint", None)
            if propagator_adjoint is None else propagator_adjoint)
        starts = list(range(0, measured.counts.shape[0], batch_size))
        lanes = max(1, min(self.lanes(), len(starts)))

        def run_lane(lane):
            sums = self._new_sums(evaluation)
            for start in starts[lane::lanes]:
                self._add_batch(evaluation, slice(start, start + batch_size), sums)
            return sums

        if lanes == 1:
            lane_sums = [run_lane(0)]
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=lanes) as pool:
                lane_sums = list(pool.map(run_lane, range(lanes)))
        sums = lane_sums[0]
        for other in lane_sums[1:]:
            sums.add(other)
        total, validation = sums.total, sums.validation
        grad_object, grad_probe_k = sums.grad_object, sums.grad_probe_k
        grad_positions = evaluation.grad_positions
        if sums.group_sums is not None:
            grad_probe_k += xp.einsum("gmyx,gyx->myx", self.fft2(sums.group_sums),
                                      xp.conj(self.ramps(evaluation.groups[0])))
        gradients = {}
        if grad_object is not None:
            gradients["object"] = grad_object
        if want_defocus or want_aberrations:
            torque = xp.sum((xp.conj(grad_probe_k) * probe_k).imag, axis=0, dtype=xp.float64)
        if want_defocus:
            # ∂L/∂Δf = −πλ Σ |k|² Im(conj(g_P') P'), g_P' = grad_probe_k / n²
            value = -math.pi * self.wavelength_A / n ** 2 * xp.sum(
                self.squared_frequencies_invA() * torque)
            gradients["defocus"] = xp.asarray([float(value)], dtype=xp.float64)
        if want_aberrations:
            # ∂L/∂δC_c = Σ B_c Im(conj(g_P') P')
            gradients["aberrations"] = xp.sum(self.aberration_basis() * torque[None],
                                              axis=(1, 2)) / n ** 2
        if want_probe:
            if focus is not None:
                grad_probe_k *= xp.conj(focus)
            gradients["probe"] = self.ifft2(grad_probe_k).astype(self.complex_dtype)
        if want_positions:
            gradients["positions"] = grad_positions
        if want_tilt:
            gradients["tilt"] = xp.asarray(sums.grad_tilt, dtype=xp.float64) * (
                2.0 * math.pi * self.slice_thickness_A * 1e-3 / n ** 2)
        if with_validation:
            return total, gradients, validation
        return total, gradients

    def lanes(self) -> int:
        """Threads sharing the batches: 1 on a GPU; on a CPU as many as the FFTs use (the
        cores this process may run on, or XPR_FFT_WORKERS as xpr.parallel sets it), at most
        8. The float32 sums are added in lane order, so gradients agree to ~1e-6 relative
        (not bit for bit) between machines with different core counts; pin XPR_FFT_WORKERS
        for identical results."""
        if self.backend.is_gpu:
            return 1
        import os

        from xpr.backend import default_fft_workers

        workers = default_fft_workers()
        if workers <= 0:
            workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
                else (os.cpu_count() or 1)
        return max(1, min(int(workers), 8))

    def _new_sums(self, evaluation) -> "_Sums":
        xp = self.backend.xp
        e = evaluation
        group_sums = None
        if e.groups is not None and e.probe_side:
            group_sums = xp.zeros((len(e.groups[0]),) + e.probe_k.shape, dtype=e.probe_k.dtype)
        return _Sums(grad_object=xp.zeros_like(e.object_slices) if e.want_object else None,
                     grad_probe_k=xp.zeros_like(e.probe_k) if e.probe_side else None,
                     group_sums=group_sums,
                     grad_tilt=np.zeros(2) if e.want_tilt else None)

    def _add_batch(self, evaluation, batch, sums):
        """Forward model, loss and the adjoint pass of one batch of patterns, into `sums`."""
        xp = self.backend.xp
        e = evaluation
        n = self.window
        corners, fractional = e.corners[batch], e.fractional[batch]
        grouped = None if e.groups is None else (e.groups[1], e.groups[2][batch])
        far, (ramps, incident, windows) = self.far_field(
            e.object_slices, e.probe_k, corners, fractional, keep=True, grouped=grouped,
            views=e.views, propagator=e.propagator)
        intensity = self.mode_sum(self.power(far))
        intensity *= 1.0 / n ** 2
        value, d_intensity, held_out = e.loss_fn(intensity, e.measured, batch, xp)
        sums.total += value
        sums.validation += held_out
        # far field: g_φ = n IFFT[g_Ψ] with g_Ψ = 2 ∂ℓ/∂I · Ψ and Ψ = far / n, i.e.
        # g_φ = IFFT[2 ∂ℓ/∂I · far]; near field: detector_adjoint
        d_intensity *= 2.0
        far *= d_intensity[:, None, :, :]
        g_phi = self.detector_adjoint(far)
        del far, intensity, d_intensity
        grad_object = sums.grad_object
        indices = None if grad_object is None else \
            self.window_indices(corners, e.object_slices.shape[-1])
        for s in range(self.n_slices - 1, -1, -1):
            need_wave_gradient = s > 0 or e.probe_side or e.want_positions
            if need_wave_gradient:
                window = windows[s]
                xp.conjugate(window, out=window)
            incident_spectrum = self.fft2(incident[s]) if e.want_tilt and s > 0 else None
            if grad_object is not None:
                psi = incident[s]
                xp.conjugate(psi, out=psi)
                psi *= g_phi
                self.scatter_add(grad_object[s], self.mode_sum(psi), corners, indices)
                del psi
            incident[s] = None
            if not need_wave_gradient:
                break
            g_phi *= window[:, None, :, :]               # now g_ψ⁽ˢ⁾
            if s > 0:
                spectrum = self.fft2(g_phi)
                if incident_spectrum is not None:       # Σ k Im(conj(G_s) Ψ_s), k in Å⁻¹
                    torque = xp.sum((xp.conj(spectrum) * incident_spectrum).imag, axis=(0, 1),
                                    dtype=xp.float64)
                    k = self.frequencies.astype(xp.float64) / self.pixel_size_A
                    sums.grad_tilt[0] += float(xp.sum(torque * k[:, None]))
                    sums.grad_tilt[1] += float(xp.sum(torque * k[None, :]))
                    del incident_spectrum
                spectrum *= e.propagator_adjoint
                g_phi = self.ifft2(spectrum)
        if sums.group_sums is not None:
            # Σ_{j in group g} g_ψ_j⁽⁰⁾ (a batch meets few groups; no BLAS call, whose
            # threads stall on a loaded machine)
            members = grouped[1]
            for group in np.unique(members).tolist():
                sums.group_sums[group] += g_phi[xp.asarray(members == group)].sum(axis=0)
        elif e.probe_side or e.want_positions:
            g_big = self.fft2(g_phi)
            if e.probe_side:
                sums.grad_probe_k += xp.einsum("bmyx,byx->myx", g_big, xp.conj(ramps))
            if e.want_positions:
                xp.conjugate(g_big, out=g_big)
                g_big *= e.probe_k[None]
                g_big *= ramps[:, None]
                torque = self.mode_sum(g_big).imag
                k = self.frequencies
                scale = 2.0 * math.pi / n ** 2
                e.grad_positions[batch, 0] = scale * xp.sum(torque * k[None, :, None],
                                                            axis=(1, 2), dtype=xp.float64)
                e.grad_positions[batch, 1] = scale * xp.sum(torque * k[None, None, :],
                                                            axis=(1, 2), dtype=xp.float64)


@dataclass
class _Evaluation:
    """What every batch of one loss-and-gradient evaluation reads (and the position
    gradient, whose rows the batches fill without overlap)."""

    measured: object
    loss_fn: object
    object_slices: object
    views: list
    probe_k: object
    corners: object
    fractional: object
    want_object: bool
    probe_side: bool
    want_positions: bool
    groups: tuple | None
    grad_positions: object
    want_tilt: bool = False
    propagator: object = None
    propagator_adjoint: object = None


@dataclass
class _Sums:
    """One lane's running sums: loss, held-out loss, object and probe gradients."""

    grad_object: object = None
    grad_probe_k: object = None
    group_sums: object = None
    total: float = 0.0
    validation: float = 0.0
    grad_tilt: object = None            # (2,) host float64: Σ k Im(conj(G_s) Ψ_s) for y, x

    def add(self, other: "_Sums"):
        self.total += other.total
        self.validation += other.validation
        if self.grad_tilt is not None:
            self.grad_tilt += other.grad_tilt
        for name in ("grad_object", "grad_probe_k", "group_sums"):
            mine = getattr(self, name)
            if mine is not None:
                mine += getattr(other, name)
