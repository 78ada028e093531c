"""Data-fidelity terms between model intensities I and measured counts D (per detector pixel).

Each returns (ℓ summed over fitted pixels, ∂ℓ/∂I, ℓ summed over held-out pixels) so that the
far-field Wirtinger gradient is 2 ∂ℓ/∂I · Ψ; a detector mask (1 measured, 0 not: padding,
dead pixels) removes pixels from all three.

* lsq_sqrt: ℓ = (√I − √D)²           Gaussian noise on amplitudes; the variance-stabilised form
                                       of Poisson counts (var √D ≈ 1/4), the robust default.
* ml:       ℓ = I − D − D log(I/D)     Poisson negative log-likelihood less its value at I = D.
* lsq:      ℓ = (I − D)²               Gaussian noise on intensities.
"""
from __future__ import annotations

EPSILON = 1e-6
# ml's ε as a fraction of the scan's mean count per measured pixel. Where the model's intensity
# is ~0 (outside the initial probe's aperture) and the pixel has counts, ∂ℓ/∂I = 1 − D/(I + ε)
# times the wave's float32 rounding is the gradient: with ε = 1e-6 counts the first steps
# followed rounding noise (the in-memory and streamed runs, identical but for the batch order,
# differed by 4 % after 8 epochs) and needed two more epochs on abTEM's MoS2 (r 0.950 at epoch 2
# against 0.985 with this fraction; 0.991 either way later). 10⁻³ of the mean is far below
# one count wherever it matters and keeps the scale of the data's units.
ML_EPSILON_FRACTION = 1e-3

LOSSES = ("lsq_sqrt", "ml", "lsq")


class Measurements:
    """Counts D (N, n, n) in FFT order, the detector mask (n, n) and an optional held-out set
    (N, n, n) of pixels kept out of the fit for validation.

    Only the counts are held at full size: the held-out set is boolean (a quarter of the
    counts' bytes), and the square roots and the fitted / held-out weights of a batch are
    formed when the batch is evaluated (a square root and a multiplication per pixel, small
    beside the batch's FFTs) — so the resident data are 1.25 × the counts, not 5 ×.
    """

    def __init__(self, counts, mask=None, holdout=None, epsilon: float = EPSILON):
        self.counts = counts
        self.mask = mask
        self.holdout = holdout                      # bool (N, n, n) or None
        self.epsilon = float(epsilon)               # ml's intensity offset (counts)

    def amplitudes(self, batch):
        """√D of a batch."""
        return self.counts[batch] ** 0.5

    def weights(self, batch):
        """Weights of the fitted pixels of a batch, or None when every pixel is fitted."""
        if self.holdout is None:
            return self.mask
        fitted = ~self.holdout[batch]
        return fitted if self.mask is None else fitted * self.mask

    def held(self, batch):
        if self.holdout is None:
            return None
        return self.holdout[batch] if self.mask is None else self.holdout[batch] * self.mask


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
    residual = amplitude - measured.amplitudes(batch)
    value, validation = _masked_sums(residual, measured, batch, xp)
    residual /= amplitude
    return value, residual, validation


def ml(intensity, measured, batch, xp):
    """ℓ = I − D − D log((I + ε)/(D + ε)): the Poisson negative log-likelihood less its value at
    I = D (the saturated model), so that every pixel's term is ≥ 0 and of the order of the
    noise (≈ ½ χ²₁). Without the constant the terms were I − D log I, as large as D log D:
    at 10⁴ counts a pixel their float32 rounding outweighed the changes the line search
    compares (a near-field fit stalled at r 0.988 where lsq_sqrt reaches 0.9995) and summing
    in another batch order changed the iterate by 4 % after 8 epochs. ε is
    Measurements.epsilon: reconstruct sets it to ML_EPSILON_FRACTION of the mean count per
    measured pixel (see there)."""
    counts = measured.counts[batch]
    eps = measured.epsilon
    shifted = intensity + eps
    pointwise = intensity - counts - counts * xp.log(shifted / (counts + eps))
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


def mean_pattern(counts, xp):
    """The scan's mean pattern (n, n) on the host, float64 (streamed counts: block by block)."""
    from xpr.backend import to_host

    blocks = counts.blocks() if hasattr(counts, "blocks") else [counts]
    total = 0.0
    for block in blocks:
        total = total + to_host(xp.sum(block, axis=0, dtype=xp.float64))
    return total / counts.shape[0]


def ml_epsilon(mean, mask=None) -> float:
    """ML_EPSILON_FRACTION of the mean count per measured pixel (EPSILON if that is 0)."""
    import numpy as np

    from xpr.backend import to_host

    weight = np.ones_like(mean) if mask is None else to_host(mask).astype(np.float64)
    level = float(np.sum(mean * weight) / max(float(np.sum(weight)), 1.0))
    return ML_EPSILON_FRACTION * level if level > 0 else EPSILON


def noise_floor(counts, name: str, xp, mask=None, mean=None) -> float:
    """Expected loss at the true model for Poisson counts (the discrepancy-principle level):
    N Σ_k e(λ̄_k), with λ̄_k the scan-averaged counts of detector pixel k as the Poisson mean
    (expected_loss_per_pixel); masked pixels do not count. The ml loss is itself relative to
    the saturated model, as expected_loss_per_pixel's value for ml. `mean`: mean_pattern, if
    already at hand.
    """
    import numpy as np

    from xpr.backend import to_host

    # streaming.StreamedCounts: one pass over the file, block by block
    if mean is None:
        mean = mean_pattern(counts, xp)
    weight = 1.0 if mask is None else to_host(mask)
    return counts.shape[0] * float(np.sum(expected_loss_per_pixel(name, mean) * weight))
