"""Data-fidelity terms between model intensities I and measured counts D (per detector pixel).

Each returns (ℓ summed over fitted pixels, ∂ℓ/∂I, ℓ summed over held-out pixels) so that the
far-field Wirtinger gradient is 2 ∂ℓ/∂I · Ψ; a detector mask (1 measured, 0 not: padding,
dead pixels) removes pixels from all three.

* lsq_sqrt: ℓ = (√I − √D)²           Gaussian noise on amplitudes; the variance-stabilised form
                                       of Poisson counts (var √D ≈ 1/4), the robust default.
* ml:       ℓ = I − D log(I + ε)       Poisson negative log-likelihood (constant dropped).
* lsq:      ℓ = (I − D)²               Gaussian noise on intensities.
"""
from __future__ import annotations

EPSILON = 1e-6

LOSSES = ("lsq_sqrt", "ml", "lsq")


class Measurements:
    """Counts D (N, n, n) in FFT order, their square roots, the detector mask (n, n) and an
    optional held-out set (N, n, n) of pixels kept out of the fit for validation.

    The fitted weights (mask × not held out) and held-out weights (mask × held out) are formed
    once, so each loss evaluation costs a single multiplication for each.
    """

    def __init__(self, counts, mask=None, holdout=None):
        self.counts = counts
        self.mask = mask
        self.holdout = holdout
        self._amplitudes = None
        self._fitted = None
        self._held = None
        if holdout is not None:
            self._held = holdout if mask is None else holdout * mask
            self._fitted = (1.0 - holdout) if mask is None else (1.0 - holdout) * mask

    @property
    def amplitudes(self):
        if self._amplitudes is None:
            self._amplitudes = self.counts ** 0.5
        return self._amplitudes

    def weights(self, batch):
        """Weights of the fitted pixels of a batch, or None when every pixel is fitted."""
        return self.mask if self._fitted is None else self._fitted[batch]

    def held(self, batch):
        return None if self._held is None else self._held[batch]


def _masked_sums(residual, measured, batch, xp):
    """(Σ fitted r², Σ held-out r²), zeroing r on pixels that are not fitted (in place)."""
    held = measured.held(batch)
    validation = 0.0
    if held is not None:
        held_residual = residual * held
        validation = float(xp.vdot(held_residual.ravel(), held_residual.ravel()))
    weights = measured.weights(batch)
    if weights is not None:
        residual *= weights
    return float(xp.vdot(residual.ravel(), residual.ravel())), validation


def lsq_sqrt(intensity, measured, batch, xp):
    """(fitted loss, ∂ℓ/∂I, held-out loss); intensity is overwritten to save memory passes."""
    intensity += EPSILON
    amplitude = xp.sqrt(intensity, out=intensity)
    residual = amplitude - measured.amplitudes[batch]
    value, validation = _masked_sums(residual, measured, batch, xp)
    residual /= amplitude
    return value, residual, validation


def ml(intensity, measured, batch, xp):
    counts = measured.counts[batch]
    shifted = intensity + EPSILON
    pointwise = intensity - counts * xp.log(shifted)
    derivative = 1.0 - counts / shifted
    held = measured.held(batch)
    validation = 0.0 if held is None else float(xp.sum(pointwise * held, dtype=xp.float64))
    weights = measured.weights(batch)
    if weights is not None:
        pointwise, derivative = pointwise * weights, derivative * weights
    return float(xp.sum(pointwise, dtype=xp.float64)), derivative, validation


def lsq(intensity, measured, batch, xp):
    residual = intensity - measured.counts[batch]
    value, validation = _masked_sums(residual, measured, batch, xp)
    residual *= 2.0
    return value, residual, validation


def by_name(name: str):
    return {"lsq_sqrt": lsq_sqrt, "ml": ml, "lsq": lsq}[name]


def expected_loss_per_pixel(name: str, mean_counts):
    """E[ℓ(λ, X)] for X ~ Poisson(λ): the loss one pixel contributes at the true model.

    lsq_sqrt: 2λ − 2√λ E[√X]  (→ 2λ for λ ≪ 1, → 1/4 for λ ≫ 1)
    ml:       E[X log X] − λ log λ, relative to the saturated model (→ 1/2 for λ ≫ 1)
    lsq:      λ
    Evaluated by summing the Poisson distribution on a table of λ and interpolating in log λ.
    """
    import numpy as np
    from scipy.special import gammaln

    lam = np.asarray(mean_counts, dtype=np.float64)
    if name == "lsq":
        return lam
    table = np.geomspace(1e-4, 1e3, 281)
    x = np.arange(0, int(table[-1] + 12 * np.sqrt(table[-1]) + 40))[:, None]
    pmf = np.exp(x * np.log(table) - table - gammaln(x + 1.0))
    if name == "lsq_sqrt":
        values = 2 * table - 2 * np.sqrt(table) * np.sum(np.sqrt(x) * pmf, axis=0)
        small, large = 2.0 * np.clip(lam, 0, None), 0.25
    else:
        xlogx = np.where(x > 0, x * np.log(np.maximum(x, 1)), 0.0)
        values = np.sum(xlogx * pmf, axis=0) - table * np.log(table)
        small, large = 0.0, 0.5
    inside = np.interp(np.log(np.clip(lam, table[0], table[-1])), np.log(table), values)
    return np.where(lam < table[0], small, np.where(lam > table[-1], large, inside))


def noise_floor(counts, name: str, xp, mask=None) -> float:
    """Expected loss at the true model for Poisson counts (the discrepancy-principle level):
    N Σ_k e(λ̄_k), with λ̄_k the scan-averaged counts of detector pixel k as the Poisson mean
    (expected_loss_per_pixel); masked pixels do not count. For ml the level is relative to
    the saturated model, Σ (D − D log D), which is added back.
    """
    import numpy as np

    from xpr.backend import to_host

    mean = to_host(xp.mean(counts, axis=0, dtype=xp.float64))
    weight = 1.0 if mask is None else to_host(mask)
    level = counts.shape[0] * float(np.sum(expected_loss_per_pixel(name, mean) * weight))
    if name == "ml":
        data = counts if mask is None else counts * mask
        level += float(xp.sum(data - data * xp.log(data + EPSILON), dtype=xp.float64))
    return level
