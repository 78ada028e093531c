"""The compiled loops of xpr.phasing.loops as CUDA elementwise kernels, for the cupy backend.

On a GPU each array expression of a projection is a kernel launch and a pass through device
memory; the modulus projection's |F|, max, min, divide and product, or RAAR's support test and
weighted sums, cost several times the FFT pair at 512^2 (benchmarks/bench_gpu.py). Here each is
one launch that reads and writes every pixel once, written as the same formula as its CPU loop:

* band_modulus(F, lower, upper, tiny): F <- F * clip(|F| + tiny, lower, upper) / (|F| + tiny);
* feedback(x, pm, support, a, b, positivity, imag_limit): x <- pm (its |Im| clipped to
  imag_limit |Re| where imag_limit >= 0) where pm is feasible, a x + b pm elsewhere.

The array module comes from the backend (xpr.backend.Backend.compiled_loops); nothing here
imports cupy. Arrays broadcast as in loops.py: lower/upper and a one-row support serve every
repeat. Scalars come in the arrays' real precision.
"""
from __future__ import annotations

import functools

real_c = {"float32": "float", "float64": "double"}        # the C type of a real dtype

_BAND_MODULUS = """
T model = abs(F) + tiny;
F = F * (min(max(model, lower), upper) / model);
"""

_FEEDBACK = """
if (support && (!positivity || pm.real() >= 0)) {
    if (imag_limit >= 0) {
        R bound = imag_limit * abs(pm.real());
        x = C(pm.real(), min(max(pm.imag(), -bound), bound));
    } else {
        x = pm;
    }
} else {
    x = a * x + b * pm;
}
"""


class DeviceLoops:
    """band_modulus and feedback as elementwise kernels of the array module `xp` (cupy)."""

    def __init__(self, xp):
        self._xp = xp
        self._band_modulus = xp.ElementwiseKernel("T lower, T upper, T tiny", "C F", _BAND_MODULUS,
                                                  "xpr_band_modulus")
        self._feedbacks = {}           # real dtype name -> kernel (a scalar cannot set a type placeholder)

    def _feedback(self, real):
        kernel = self._feedbacks.get(real)
        if kernel is None:
            kernel = self._feedbacks[real] = self._xp.ElementwiseKernel(
                f"C pm, bool support, {real} a, {real} b, bool positivity, {real} imag_limit", "C x",
                _FEEDBACK, f"xpr_feedback_{real}", preamble=f"typedef {real_c[real]} R;")
        return kernel

    def band_modulus(self, F, lower, upper, tiny):
        """In place, as xpr.phasing.loops.band_modulus. F: (repeats, pixels); lower, upper: (pixels,)."""
        self._band_modulus(lower, upper, lower.dtype.type(tiny), F)

    def feedback(self, x, pm, support, a, b, positivity, imag_limit):
        """In place, as xpr.phasing.loops.feedback. support: (repeats or 1, pixels) bool."""
        real = {"complex64": "float32", "complex128": "float64"}[x.dtype.name]
        self._feedback(real)(pm, support, a, b, bool(positivity), imag_limit, x)


@functools.lru_cache(maxsize=None)
def for_module(xp) -> DeviceLoops:
    """The kernels of `xp`, built once per process (cupy compiles each on its first launch)."""
    return DeviceLoops(xp)
