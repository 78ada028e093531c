"""Shrink-wrap: re-estimate the support from the current object (Marchesini et al. 2003).

Two rules, both on the amplitude |x| blurred by a Gaussian of width sigma (pixels):

* relative threshold -- keep pixels where the blurred amplitude is at least `threshold` times its
  maximum (per repeat);
* brightest voxels (spipy's `support_size` / `voxel_number`) -- keep the N pixels with the
  largest blurred amplitude (sigma 0 = no blur, as spipy); size_rule "exact".
* both (size_rule "floor", a guard against collapse as PyNX's SupportTooSmall): the relative
  threshold, lowered where it would keep fewer than N pixels. A known size then only stops the
  support from collapsing; its shape follows the threshold's contour, not the N brightest
  pixels (measured: docs/cdi.md).

A support may shrink by at most `max_shrink` (a fraction of its pixels) per update: when the
rule would remove more, the brightest (1 - max_shrink) x |old support| pixels are kept instead.
This stops the collapse seen when missing low frequencies (a beamstop) make the object peaky,
while letting the support tighten over successive updates. Optionally the new support is confined to the initial support (so a loose initial circle or
sphere bounds every later support). The blur is a multiplication by exp(-2 pi^2 sigma^2 q^2) in
Fourier space, so it runs through the same backend FFTs on CPU and GPU.

Per-repeat thresholds (`threshold_factors`, one per repeat of the batch): repeat i's relative
threshold is threshold x factor_i. No single relative threshold suits every object: a weak plate
carrying bright overlaps (densities 0.3 to 3) lies below 0.15 of the blurred maximum and is cut
away, while 0.05 lets a particle cluster's support swell over the gaps between its particles.
Repeats phased with several thresholds let the data choose: the wrong one leaves the object
unable to fit the pixels held out of the fit (xpr.cdi.phasing, docs/cdi.md).

`fxs reconstruct` on a polar/spherical grid supplies its own object with the same call
signature, `shrink_wrap(x, support, sigma=None, threshold=None) -> new support`.
"""
from __future__ import annotations

import numpy as np

from xpr.phasing.projections import squared_frequency


class ShrinkWrap:
    def __init__(self, backend, shape, threshold=0.1, support_size=None, sigma=2.0,
                 confine_to=None, max_shrink=None, size_rule="exact", threshold_factors=None,
                 reference="max"):
        xp = backend.xp
        self.backend = backend
        self.axes = tuple(range(-len(shape), 0))
        self.threshold = threshold
        self.support_size = support_size
        self.sigma = sigma
        self.max_shrink = max_shrink
        if size_rule not in ("exact", "floor"):
            raise ValueError(f"unknown support size rule {size_rule!r}")
        self.size_rule = size_rule
        if reference not in ("max", "rms"):
            raise ValueError(f"unknown shrink-wrap threshold reference {reference!r}")
        self.reference = reference
        self.confine_to = None if confine_to is None else xp.asarray(confine_to, dtype=bool)
        self.q2 = xp.asarray(squared_frequency(shape), dtype=backend.real_dtype)
        self.threshold_factors = None if threshold_factors is None else \
            np.asarray(threshold_factors, dtype=float)

    def blurred_amplitude(self, x, sigma):
        """|x| convolved with a unit-sum Gaussian of width sigma (pixels), per repeat."""
        xp = self.backend.xp
        amplitude = xp.abs(x)
        if not sigma:
            return amplitude
        kernel = xp.exp(self.q2 * np.float32(-2.0 * np.pi ** 2 * sigma ** 2))
        spectrum = self.backend.fftn(amplitude.astype(self.backend.complex_dtype), axes=self.axes)
        spectrum *= kernel
        return self.backend.ifftn(spectrum, axes=self.axes, overwrite_x=True).real

    def __call__(self, x, support, sigma=None, threshold=None, support_size=None,
                 threshold_factors=None):
        """The new support of every repeat of the batch x; threshold_factors (one per repeat)
        replace the ones given at construction for this call."""
        xp = self.backend.xp
        sigma = self.sigma if sigma is None else sigma
        threshold = self.threshold if threshold is None else threshold
        factors = self.threshold_factors if threshold_factors is None else \
            np.asarray(threshold_factors, dtype=float)
        if factors is not None:
            if factors.shape != (x.shape[0],):
                raise ValueError(f"{factors.size} threshold factors for {x.shape[0]} repeats")
            threshold = xp.asarray(threshold * factors, dtype=self.q2.dtype)
        support_size = self.support_size if support_size is None else support_size
        blurred = self.blurred_amplitude(x * support, sigma)
        if self.confine_to is not None:
            blurred = blurred * self.confine_to
        repeats = x.shape[0]
        flat = blurred.reshape(repeats, -1)
        level = self._reference_level(flat, support)
        if support_size:
            n = min(int(support_size), flat.shape[1])
            cut = xp.partition(flat, flat.shape[1] - n, axis=1)[:, flat.shape[1] - n]
            if self.size_rule == "floor":
                cut = xp.minimum(cut, threshold * level)
        else:
            cut = threshold * level
        if self.max_shrink is not None and not support_size:
            cut = self._limit_shrinking(flat, support.reshape(repeats, -1), cut)
        cut = cut.reshape((repeats,) + (1,) * (x.ndim - 1))
        new = (blurred >= cut) & (blurred > 0)
        if self.confine_to is not None:
            new &= self.confine_to
        return new

    def _reference_level(self, flat, support):
        """What the relative threshold multiplies, per repeat: the blurred amplitude's maximum, or
        (reference "rms", PyNX's default) its root-mean-square over the current support."""
        xp = self.backend.xp
        if self.reference == "max":
            return xp.max(flat, axis=1)
        inside = xp.broadcast_to(support.reshape(-1, flat.shape[1]), flat.shape)   # one or per repeat
        power = xp.sum(flat * flat * inside, axis=1)
        return xp.sqrt(power / xp.maximum(xp.sum(inside, axis=1), 1))

    def _limit_shrinking(self, flat, old, cut):
        """Lower each repeat's cut so that at least (1 - max_shrink) of its old support stays."""
        xp = self.backend.xp
        kept = xp.sum(flat >= cut[:, None], axis=1)
        floor = xp.ceil((1.0 - self.max_shrink) * xp.sum(old, axis=1)).astype(int)
        cut = cut.copy()
        for i in range(flat.shape[0]):
            n = int(floor[i])
            if int(kept[i]) < n and n > 0:
                cut[i] = min(float(cut[i]), float(xp.partition(flat[i], flat.shape[1] - n)[flat.shape[1] - n]))
        return cut
