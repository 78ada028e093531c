"""Noise-aware pieces for photon-counting data: a Poisson band modulus projection, free pixels and
the free Poisson deviance that scores repeats on pixels held out of the fit (PyNX's LLKf).

Band modulus projection. For Poisson counts k with mean lambda = |F|^2, sqrt(k) scatters about
sqrt(lambda) with a standard deviation close to 1/2 whatever lambda (the square root stabilises
the variance; Anscombe 1948). Forcing |F| to equal sqrt(k) exactly -- the plain P_M -- makes the
iterate fit that scatter: on a sparse pattern (most pixels counting 0 or 1) it chases zeros and
ones instead of the object. The band projection instead moves |F| only as far as the band

    max(sqrt(k) - delta, 0) <= |F| <= sqrt(k) + delta          (delta = `band`, in sqrt(counts))

and leaves it unchanged inside: the projection onto a set of amplitudes consistent with the
counts, still a pointwise projection, so ER/HIO/RAAR/DM use it unchanged. band = 0 is the plain
P_M. Masked and free pixels have the band [0, inf): they float, with no separate branch.

Free pixels. A random `fraction` of the measured pixels (together with their Friedel mates
-q, which a real object ties to q) is taken out of the modulus constraint and kept only for
scoring: the fit never sees them, so how well a repeat predicts them measures the object, not
how closely it fitted the noise.

Free deviance. Per repeat, the Poisson deviance per free pixel,

    D = (2 / n_free) sum_free [ lambda - k + k log(k / lambda) ],    lambda = |FT[x]|^2,

which averages about 1 for the true object (asymptotically, for k not too small) and grows as the
model departs from it. Lower is better; repeats are chosen and merged by it (xpr.cdi.phasing).
"""
from __future__ import annotations

import functools

import numpy as np

from xpr.phasing.projections import ModulusProjection


def free_pixels(measured_fft, fraction=0.05, seed=0):
    """Boolean (FFT order): a random `fraction` of the measured pixels and their Friedel mates."""
    measured = np.asarray(measured_fft, dtype=bool)
    if not fraction:
        return np.zeros_like(measured)
    rng = np.random.default_rng(seed)
    pick = (rng.random(measured.shape) < float(fraction) / 2.0) & measured
    mate = np.roll(np.flip(pick), 1, axis=tuple(range(pick.ndim)))   # index -q in FFT order
    return (pick | mate) & measured


def _model_at(model_intensity, pixels, xp):
    """(lambda, flat indices): the model intensity of every repeat at `pixels`, float64 and at
    least 1e-12, as (repeats, n_pixels); lambda is None when `pixels` holds none."""
    repeats = model_intensity.shape[0]
    flat_pixels = xp.flatnonzero(xp.asarray(pixels).ravel())
    if flat_pixels.size == 0:
        return None, flat_pixels
    lam = model_intensity.reshape(repeats, -1)[:, flat_pixels].astype(np.float64)
    return xp.maximum(lam, 1e-12), flat_pixels


def poisson_deviance(model_intensity, counts, pixels, xp=np, at=None):
    """Mean Poisson deviance over `pixels` per repeat: model (repeats, *grid), counts/pixels grid.
    at: `_model_at(model_intensity, pixels, xp)` when the caller has it already."""
    lam, flat_pixels = at if at is not None else _model_at(model_intensity, pixels, xp)
    if lam is None:
        return xp.zeros(model_intensity.shape[0])
    k = xp.asarray(counts).ravel()[flat_pixels].astype(np.float64)
    k_log = xp.where(k > 0, k * xp.log(xp.maximum(k, 1e-300) / lam), 0.0)
    return 2.0 * xp.mean(lam - k + k_log, axis=1)


def free_deviance(objects, counts_fft, free, backend, expected=False):
    """Free Poisson deviance of each repeat of a (repeats, *grid) batch of centred objects; with
    `expected`, also the deviance each repeat's own model expects of counts it would generate
    (`expected_deviance`), as a second array."""
    xp = backend.xp
    axes = tuple(range(1, objects.ndim))
    x = xp.asarray(objects)
    # centring only multiplies F by a phase ramp: |F| is the same with or without ifftshift
    F = backend.fftn(x.astype(backend.complex_dtype), axes=axes)
    model = (F.real * F.real + F.imag * F.imag)
    at = _model_at(model, free, xp)                 # the free pixels, picked once for both
    observed = backend.asnumpy(poisson_deviance(model, xp.asarray(counts_fft), free, xp, at=at))
    if not expected:
        return observed
    return observed, backend.asnumpy(expected_deviance(model, free, xp, at=at))


def _mean_deviance_of_poisson(lam):
    """E[d(k, lam)], k ~ Poisson(lam), d = 2 [lam - k + k log(k / lam)], summed over k exactly."""
    from scipy.special import gammaln

    k = np.arange(0, int(lam + 12 * np.sqrt(lam) + 40))
    log_p = k * np.log(lam) - lam - gammaln(k + 1)
    d = 2 * (lam - k + np.where(k > 0, k * np.log(np.maximum(k, 1) / lam), 0.0))
    return float(np.sum(np.exp(log_p) * d))


_TABLE_LOG_LAMBDA = np.linspace(np.log(1e-6), np.log(1e4), 241)


@functools.lru_cache(maxsize=1)
def _expected_deviance_table():
    """E[d(k, lambda)] at the lambdas of _TABLE_LOG_LAMBDA (made once per process, about 0.2 s)."""
    return np.array([_mean_deviance_of_poisson(v) for v in np.exp(_TABLE_LOG_LAMBDA)])


def expected_deviance(model_intensity, pixels, xp=np, at=None):
    """Per repeat, the mean over `pixels` of the Poisson deviance a model expects of its own counts:
    E[d(k, lambda)] for k ~ Poisson(lambda), lambda = the model intensity at each pixel.

    It is 1 + 1/(6 lambda) + O(lambda^-2) for bright pixels and falls to 2 lambda log(1 / lambda)
    at lambda << 1, so a sparse pattern's right model scores well below 1: the free
    deviance of a repeat divided by this is about 1 when the repeat explains the held-out counts
    as well as any model can, whatever the dose (a convergence check, not a score to rank by).
    Tabulated once in log lambda (exact sums over k) and interpolated; 1 + 1/(6 lambda) above 1e4.
    at: `_model_at(model_intensity, pixels, xp)` when the caller has it already."""
    lam, _ = at if at is not None else _model_at(model_intensity, pixels, xp)
    if lam is None:
        return xp.zeros(model_intensity.shape[0])
    log_lam = xp.log(lam)
    table = xp.interp(log_lam, xp.asarray(_TABLE_LOG_LAMBDA), xp.asarray(_expected_deviance_table()))
    bright = 1.0 + 1.0 / (6.0 * lam)
    return xp.mean(xp.where(log_lam > _TABLE_LOG_LAMBDA[-1], bright, table), axis=1)


class BandModulusProjection(ModulusProjection):
    """P_M onto |F| within sqrt(I) +- band on measured pixels; masked and `free` pixels float.

    eMod (the usual sqrt(sum_measured (|F| - sqrt(I))^2 / sum_measured I), over the fitted
    pixels) costs a pass over the batch; it is computed every `metrics_every` calls and the last
    value is returned in between.
    """

    def __init__(self, backend, intensity, measured, band=0.5, free=None, background=False,
                 repeats=1, metrics_every=1):
        xp = backend.xp
        fitted = xp.asarray(measured, dtype=bool)
        if free is not None:
            fitted = fitted & ~xp.asarray(free, dtype=bool)
        super().__init__(backend, intensity, fitted, background=background, repeats=repeats)
        real = backend.real_dtype
        band = real(band)
        self.band = float(band)
        self.lower = xp.where(fitted, xp.maximum(self.amplitude - band, 0), 0).astype(real)
        self.upper = xp.where(fitted, self.amplitude + band, xp.inf).astype(real)
        self.weight = fitted.astype(real)
        self._flat_lower, self._flat_upper = self.lower.ravel(), self.upper.ravel()
        self._loops = backend.compiled_loops          # None on the emulated device
        self.metrics_every = max(int(metrics_every or 1), 1)
        self._calls = 0
        self._e_mod = None

    def __call__(self, x):
        backend, xp = self.backend, self.backend.xp
        repeats = x.shape[0]
        metrics_due = self._e_mod is None or self._calls % self.metrics_every == 0
        if self._loops is not None and self.background is None and not metrics_due:
            # between metrics: the projection as one compiled sweep over F (xpr.phasing.loops)
            self._calls += 1
            F = backend.fftn(x, axes=self.axes)
            self._loops.band_modulus(F.reshape(repeats, -1), self._flat_lower, self._flat_upper, self.tiny)
            return backend.ifftn(F, axes=self.axes, overwrite_x=True), self._e_mod
        model, factor = self._buffers(x.shape)
        F = backend.fftn(x, axes=self.axes)
        xp.abs(F, out=model)
        if self.background is not None:
            xp.sqrt(model * model + self.background * self.background, out=model)
        model += self.tiny
        xp.maximum(model, self.lower, out=factor)                    # the nearest allowed amplitude
        xp.minimum(factor, self.upper, out=factor)                   # (two passes: faster than clip)
        if metrics_due:
            self._e_mod = self._modulus_error(model, repeats, xp)
        self._calls += 1
        factor /= model
        F *= factor
        if self.background is not None:
            self.background *= factor
            self.background = self._radial_average(self.background)
        return backend.ifftn(F, axes=self.axes, overwrite_x=True), self._e_mod

    def _modulus_error(self, model, repeats, xp):
        residual = (model - self.amplitude) * self.weight
        flat = residual.reshape(repeats, -1)
        return xp.sqrt(xp.einsum("ij,ij->i", flat, flat) / max(self.intensity_norm, 1e-30))
