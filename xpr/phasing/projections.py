"""The two projections every iterative phasing algorithm is built from.

Arrays carry independent repeats along a leading axis: an object batch has shape
(repeats, *grid), and every projection acts on each repeat separately. Objects live in real space
centred in their array; Fourier-space quantities (measured amplitudes, mask, background) are kept
in FFT order (zero frequency at index 0), which the caller sets up once. The real-space centring
only multiplies the Fourier transform by a phase ramp, so it does not touch any modulus.

Modulus projection P_M (the reciprocal-space constraint). With F = FT[x]:

    P_M x = FT^-1[ F * sqrt(I) / sqrt(|F|^2 + B^2) ]   where the pixel is measured,
    P_M x = x's own F                                  where it is not (masked pixels float).

B is an optional radially symmetric background amplitude (spipy): it is updated by the same
factor, B <- B * sqrt(I)/sqrt(|F|^2+B^2), and then replaced by its average over each shell of
|q|, i.e. projected onto radially symmetric functions. Without background B = 0 and the factor is
the familiar sqrt(I)/|F|. The same pass yields the modulus error (no extra transform)

    eMod = sqrt( sum_measured (sqrt(|F|^2+B^2) - sqrt(I))^2 / sum_measured I ).

Support projection P_S (the real-space constraint): values outside the support are set to zero;
optionally also where the real part is negative (positivity) or where the amplitude falls below a
fraction of the repeat's maximum (value threshold); where a value is kept, its imaginary part can
be limited to |Im| <= imag_limit * |Re| (imag_limit 0: a real object).

Anything with the call signature of `ModulusProjection` -- `P_M(x) -> (P_M x, eMod per repeat)`
-- can stand in for it: `fxs reconstruct` supplies a projection onto invariant-consistent
intensities through harmonic transforms and reuses the algorithms and schedules unchanged.
"""
from __future__ import annotations

import numpy as np


def squared_frequency(shape, pixels=False):
    """|q|^2 on an FFT-ordered grid of this shape (numpy): q in cycles per pixel along every axis,
    or, with pixels, in Fourier pixels (q n)."""
    q2 = 0.0
    for axis, n in enumerate(shape):
        q = np.fft.fftfreq(n) * (n if pixels else 1)
        expand = [None] * len(shape)
        expand[axis] = slice(None)
        q2 = q2 + (q ** 2)[tuple(expand)]
    return q2


def fft_radius(shape, xp=np):
    """|q| in pixels for every frequency of an FFT-ordered grid of this shape."""
    return xp.asarray(np.sqrt(squared_frequency(shape, pixels=True)))


def centred_radius(shape, xp=np):
    """Distance in pixels from the array centre (index n//2 on every axis)."""
    r2 = 0.0
    for axis, n in enumerate(shape):
        r = np.arange(n) - n // 2
        expand = [None] * len(shape)
        expand[axis] = slice(None)
        r2 = r2 + (r ** 2)[tuple(expand)]
    return xp.asarray(np.sqrt(r2))


class ModulusProjection:
    """P_M for a batch of objects against one measured pattern (FFT order)."""

    def __init__(self, backend, intensity, measured, background=False, repeats=1):
        xp = backend.xp
        self.backend = backend
        self.ndim = intensity.ndim
        self.axes = tuple(range(-self.ndim, 0))
        real = backend.real_dtype
        measured = xp.asarray(measured, dtype=bool)
        intensity = xp.clip(xp.asarray(intensity, dtype=real), 0, None)
        self.amplitude = xp.sqrt(intensity) * measured            # sqrt(I), 0 where unmeasured
        self.unmeasured = xp.flatnonzero(~measured.ravel())        # flat indices that float
        self.intensity_norm = float(xp.sum(self.amplitude ** 2))  # sum_measured I
        self.tiny = real(1e-7) * real(float(xp.max(self.amplitude)) or 1.0)
        self.background = None
        if background:
            self.shell = xp.asarray(np.rint(np.asarray(fft_radius(intensity.shape))).astype(np.int64))
            self.n_shells = int(self.shell.max()) + 1
            start = self._radial_average(self.amplitude[None])[0] * real(0.1)
            self.background = xp.broadcast_to(start, (repeats,) + intensity.shape).copy()

    def _radial_average(self, values):
        """Replace each repeat's values by their mean over shells of integer |q|."""
        xp = self.backend.xp
        repeats = values.shape[0]
        flat = values.reshape(repeats, -1)
        offsets = (xp.arange(repeats) * self.n_shells)[:, None]
        index = (self.shell.ravel()[None, :] + offsets).ravel()
        sums = xp.bincount(index, weights=flat.ravel().astype(np.float64),
                           minlength=repeats * self.n_shells)
        counts = xp.bincount(self.shell.ravel(), minlength=self.n_shells)
        means = sums.reshape(repeats, self.n_shells) / xp.maximum(counts, 1)[None, :]
        return means[:, self.shell].astype(values.dtype)

    def _buffers(self, shape):
        """Two real work arrays of the batch's shape, kept between calls (no per-call allocation)."""
        if getattr(self, "_work_shape", None) != shape:
            xp = self.backend.xp
            self._work = (xp.empty(shape, dtype=self.amplitude.dtype),
                          xp.empty(shape, dtype=self.amplitude.dtype))
            self._work_shape = shape
        return self._work

    def __call__(self, x):
        """(P_M x, eMod per repeat) for a batch x of shape (repeats, *grid)."""
        model, factor = self._buffers(x.shape)
        F = self._transform_and_model_amplitude(x, model)
        self.backend.xp.divide(self.amplitude, model, out=factor)  # sqrt(I) / model amplitude
        return self._scale_and_invert(F, factor, model)

    def _transform_and_model_amplitude(self, x, model):
        """F = FT[x], and the model amplitude sqrt(|F|^2 + B^2) (+ tiny) written into `model`."""
        xp = self.backend.xp
        F = self.backend.fftn(x, axes=self.axes)
        xp.abs(F, out=model)
        if self.background is not None:
            xp.sqrt(model * model + self.background * self.background, out=model)
        model += self.tiny
        return F

    def _scale_and_invert(self, F, factor, model):
        """(FT^-1[factor F], eMod per repeat): unmeasured pixels float (factor 1, no residual),
        eMod from the residual amplitude model - sqrt(I) (made in `model`), and the background
        takes the same factor, then its shell average."""
        xp = self.backend.xp
        repeats = F.shape[0]
        model -= self.amplitude                                   # residual amplitude
        flat_factor = factor.reshape(repeats, -1)
        flat_residual = model.reshape(repeats, -1)
        if self.unmeasured.size:
            flat_factor[:, self.unmeasured] = 1                   # unmeasured pixels float
            flat_residual[:, self.unmeasured] = 0
        e_mod = xp.sqrt(xp.einsum("ij,ij->i", flat_residual, flat_residual)
                        / max(self.intensity_norm, 1e-30))
        F *= factor
        if self.background is not None:
            self.background *= factor
            self.background = self._radial_average(self.background)
        return self.backend.ifftn(F, axes=self.axes, overwrite_x=True), e_mod

    def poisson_step(self, x):
        """(x - 0.5 grad, eMod): one gradient step on the Poisson negative log-likelihood of the
        counts I on the fitted pixels, L = sum (lambda - I ln lambda), lambda = |F|^2, F = FT[x]
        (xpr.phasing.algorithms.poisson_maximum_likelihood; masked and free pixels float).

        The Wirtinger gradient with respect to x* is FT^-1[(1 - I/lambda) F] (FT^H in numpy's
        unscaled forward convention), so the step multiplies each F by 1 - (1 - t)/2 = (1 + t)/2,
        t = I/lambda, keeping its phase: at lambda = I this is Newton's step along |F| (the
        curvature of L there is 4 in |F|), as the plain P_M's factor sqrt(t) is to first order.
        Where the model is too weak (t > 1) the step (1 + t)/2 overshoots sqrt(t) and, for
        lambda -> 0, diverges; there the factor is sqrt(t): |F| is moved onto sqrt(I) and no
        further (still a descent step of L per pixel, and the fixed points are unchanged). Where
        the model is too strong (t < 1) -- above all the many counts of 0 and 1 -- |F| is only
        halved toward its maximum-likelihood value instead of being set to sqrt(I) (which for
        counts of 0 also forgets the mean of zero-count pixels is not 0). With a background B
        the model intensity is |F|^2 + B^2 and B takes the same factor, then its shell average,
        as in P_M.
        """
        xp = self.backend.xp
        model, factor = self._buffers(x.shape)
        F = self._transform_and_model_amplitude(x, model)
        xp.multiply(model, model, out=factor)
        xp.divide(self._counts(), factor, out=factor)               # t = I / lambda
        over = factor > 1
        factor += 1
        factor *= factor.dtype.type(0.5)                            # (1 + t) / 2
        xp.copyto(factor, xp.divide(self.amplitude, model), where=over)    # sqrt(t)
        return self._scale_and_invert(F, factor, model)

    def _counts(self):
        """I on the fitted pixels (0 elsewhere), kept after the first call."""
        if getattr(self, "_counts_array", None) is None:
            self._counts_array = self.amplitude * self.amplitude
        return self._counts_array


class SupportProjection:
    """P_S: zero outside the support (and where other real-space constraints fail)."""

    def __init__(self, positivity=False, threshold=None, imag_limit=None, batch_axis=0, backend=None):
        """backend: where given, its compiled loops (numba on the CPU, CUDA kernels on cupy) serve
        `combine` when they can."""
        self.positivity = bool(positivity)
        self.threshold = threshold
        self.imag_limit = imag_limit
        self.batch_axis = batch_axis          # axis of the repeats (engine.iterate's batch_axis)
        self.loops = None if backend is None else backend.compiled_loops

    @property
    def is_plain_support(self) -> bool:
        return not self.positivity and self.threshold is None and self.imag_limit is None

    def feasible(self, y, support, xp):
        """Where y may keep its value: inside the support and satisfying every constraint."""
        ok = support
        if self.positivity:
            ok = ok & (y.real >= 0)
        if self.threshold is not None:
            amplitude = xp.abs(y)
            axes = tuple(a for a in range(y.ndim) if a != self.batch_axis % y.ndim)
            peak = xp.max(amplitude * support, axis=axes, keepdims=True)    # per repeat
            ok = ok & (amplitude >= self.threshold * peak)
        return ok

    def inside(self, y, xp):
        """The value P_S gives a kept pixel: y itself, or y with its imaginary part limited."""
        if self.imag_limit is None:
            return y
        bound = self.imag_limit * xp.abs(y.real)
        return (y.real + 1j * xp.clip(y.imag, -bound, bound)).astype(y.dtype)

    def __call__(self, y, support, xp):
        return xp.where(self.feasible(y, support, xp), self.inside(y, xp), 0).astype(y.dtype, copy=False)

    def combine(self, x, pm, support, a, b, xp):
        """x <- P_S pm where pm is feasible, a x + b pm elsewhere, in place: the common step of
        ER (a, b) = (0, 0), HIO (1, -beta) and RAAR (beta, 1 - 2 beta)."""
        if self._compiled_combine(x, pm, support, a, b):
            return
        kept = self.feasible(pm, support, xp)
        if a == 0 and b == 0:
            xp.multiply(self.inside(pm, xp), kept, out=x)
            return
        if self.imag_limit is None:
            # x' = pm + [not kept] (a x + b pm - pm): arithmetic passes instead of a masked copy
            # (a masked copy costs ~0.17 FFT pair at 512^2)
            weight = xp.logical_not(kept).astype(x.real.dtype)
            if a != 1:
                x *= x.real.dtype.type(a)
            if b != 1:
                x += x.real.dtype.type(b - 1) * pm
            x *= weight
            x += pm
            return
        x *= x.real.dtype.type(a)
        x += x.real.dtype.type(b) * pm
        xp.copyto(x, self.inside(pm, xp), where=kept)

    def _compiled_combine(self, x, pm, support, a, b) -> bool:
        """`combine` as one compiled loop (Backend.compiled_loops' feedback: numba on the CPU, a
        CUDA kernel on cupy) where it applies: repeats on the leading axis, support and positivity
        and the imaginary-part limit (no value threshold), contiguous arrays."""
        if (self.loops is None or self.threshold is not None
                or self.batch_axis % x.ndim != 0 or x.shape != pm.shape or x.dtype != pm.dtype
                or support.shape[1:] != x.shape[1:] or support.shape[0] not in (1, x.shape[0])
                or not (x.flags.c_contiguous and pm.flags.c_contiguous and support.flags.c_contiguous)):
            return False
        repeats, real = x.shape[0], x.real.dtype.type
        limit = real(-1 if self.imag_limit is None else self.imag_limit)
        self.loops.feedback(x.reshape(repeats, -1), pm.reshape(repeats, -1),
                            support.reshape(support.shape[0], -1), real(a), real(b), self.positivity, limit)
        return True
