"""The phasing iteration's elementwise passes as single compiled loops (numba, CPU backend only).

With numpy each pass of an iteration outside its FFT pair is a separate sweep over the batch:
|F|, + tiny, max, min, divide, F *= factor for the modulus projection; the support test, two
subtractions, a weight and two in-place products for RAAR. At 512^2 these sweeps cost as much as
the FFT pair itself (about 2 ms against 2.3 ms on 2 cores). Here each projection is one sweep that
reads and writes every pixel once. Backend.compiled_loops hands this module to the projections on
the CPU, the same two loops as CUDA kernels (xpr.phasing.device_loops) on cupy; on the emulated
device they keep their array expressions.

Arrays come flattened to (repeats, pixels), C-contiguous; a support or bound with one row serves
every repeat. Scalars come in the arrays' real precision (float32 for complex64), so no pass is
widened to double.
"""
from __future__ import annotations

import numpy as np

from xpr.compiled import compiled


@compiled(error_model="numpy")
def band_modulus(F, lower, upper, tiny):  # pragma: no cover - compiled
    """F <- F * clip(|F| + tiny, lower, upper) / (|F| + tiny), in place: the nearest Fourier
    amplitude within [lower, upper] with F's phase (BandModulusProjection; lower = upper = sqrt(I)
    is the exact modulus projection, lower = 0, upper = inf leaves a pixel free).
    F: (repeats, pixels) complex; lower, upper: (pixels,) real."""
    for r in range(F.shape[0]):
        for j in range(F.shape[1]):
            f = F[r, j]
            model = np.sqrt(f.real * f.real + f.imag * f.imag) + tiny
            F[r, j] = f * (min(max(model, lower[j]), upper[j]) / model)


@compiled(error_model="numpy")
def feedback(x, pm, support, a, b, positivity, imag_limit):  # pragma: no cover - compiled
    """x <- P_S pm where pm is feasible (in the support and, with positivity, Re pm >= 0), and
    a x + b pm elsewhere, in place: ER is (a, b) = (0, 0), HIO (1, -beta), RAAR (beta, 1 - 2 beta).
    P_S pm is pm, or with imag_limit >= 0 pm with |Im| clipped to imag_limit |Re| (0: a real
    object); imag_limit < 0: no limit.
    x, pm: (repeats, pixels), same dtype; support: (repeats or 1, pixels) bool."""
    shared = support.shape[0] == 1
    for r in range(x.shape[0]):
        s = 0 if shared else r
        for j in range(x.shape[1]):
            p = pm[r, j]
            if support[s, j] and (not positivity or p.real >= 0):
                if imag_limit >= 0:
                    bound = imag_limit * abs(p.real)
                    x[r, j] = complex(p.real, min(max(p.imag, -bound), bound))
                else:
                    x[r, j] = p
            else:
                x[r, j] = a * x[r, j] + b * p
