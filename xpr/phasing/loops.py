"""The phasing iteration's elementwise passes as single compiled loops (numba, CPU backend only).

With numpy each pass of an iteration outside its FFT pair is a separate sweep over the batch:
|F|, + tiny, max, min, divide, F *= factor for the modulus projection; the support test, two
subtractions, a weight and two in-place products for RAAR. At 512^2 these sweeps cost as much as
the FFT pair itself (about 2 ms against 2.3 ms on 2 cores). Here each projection is one sweep that
reads and writes every pixel once, split over the process's cores (ThreadedLoops).
Backend.compiled_loops hands a ThreadedLoops to the projections on the CPU, the same two loops as
CUDA kernels (xpr.phasing.device_loops) on cupy; on the emulated device they keep their array
expressions.

Arrays come flattened to (repeats, pixels), C-contiguous; a support or bound with one row serves
every repeat. Scalars come in the arrays' real precision (float32 for complex64), so no pass is
widened to double.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from xpr.compiled import compiled


@compiled(error_model="numpy")
def band_modulus_range(F, lower, upper, tiny, start, stop):  # pragma: no cover - compiled
    """F <- F * clip(|F| + tiny, lower, upper) / (|F| + tiny), in place, for pixels start..stop-1:
    the nearest Fourier amplitude within [lower, upper] with F's phase (BandModulusProjection;
    lower = upper = sqrt(I) is the exact modulus projection, lower = 0, upper = inf leaves a pixel
    free). F: (repeats, pixels) complex; lower, upper: (pixels,) real."""
    for r in range(F.shape[0]):
        for j in range(start, stop):
            f = F[r, j]
            model = np.sqrt(f.real * f.real + f.imag * f.imag) + tiny
            F[r, j] = f * (min(max(model, lower[j]), upper[j]) / model)


@compiled(error_model="numpy")
def feedback_range(x, pm, support, a, b, positivity, imag_limit, start, stop):  # pragma: no cover - compiled
    """x <- P_S pm where pm is feasible (in the support and, with positivity, Re pm >= 0), and
    a x + b pm elsewhere, in place, for pixels start..stop-1: ER is (a, b) = (0, 0), HIO (1, -beta), RAAR (beta, 1 - 2 beta).
    P_S pm is pm, or with imag_limit >= 0 pm with |Im| clipped to imag_limit |Re| (0: a real
    object); imag_limit < 0: no limit.
    x, pm: (repeats, pixels), same dtype; support: (repeats or 1, pixels) bool."""
    shared = support.shape[0] == 1
    for r in range(x.shape[0]):
        s = 0 if shared else r
        for j in range(start, stop):
            p = pm[r, j]
            if support[s, j] and (not positivity or p.real >= 0):
                if imag_limit >= 0:
                    bound = imag_limit * abs(p.real)
                    x[r, j] = complex(p.real, min(max(p.imag, -bound), bound))
                else:
                    x[r, j] = p
            else:
                x[r, j] = a * x[r, j] + b * p


class ThreadedLoops:
    """The two loops above over all of the process's cores: the pixels split into one range per
    thread (the loops release the GIL), the caller's thread taking the first range. This is what
    Backend.compiled_loops hands out on the CPU, with as many threads as its FFTs use.

    Threads are this object's own (a pool started on first use, and again in a forked child);
    numba's parallel layer is not used, since its default (workqueue) may not be entered from two
    threads at once, as dask's threads do. Below `min_pixels_per_thread` pixels x repeats per
    thread the work stays in one thread: a hand-off costs ~20 us."""

    min_pixels_per_thread = 1 << 15

    def __init__(self, threads: int):
        self.threads = max(int(threads), 1)
        self._pool = None
        self._pool_pid = None

    def band_modulus(self, F, lower, upper, tiny):
        """As band_modulus_range over every pixel. F: (repeats, pixels); lower, upper: (pixels,)."""
        self._run(band_modulus_range, F.shape, (F, lower, upper, tiny))

    def feedback(self, x, pm, support, a, b, positivity, imag_limit):
        """As feedback_range over every pixel. x, pm: (repeats, pixels); support: (repeats or 1, pixels)."""
        self._run(feedback_range, x.shape, (x, pm, support, a, b, positivity, imag_limit))

    def ranges(self, repeats, pixels):
        """[start, stop) pixel ranges, one per thread; boundaries on multiples of 64 pixels."""
        count = min(self.threads, max(repeats * pixels // self.min_pixels_per_thread, 1))
        edges = [min(pixels, (pixels * i // count + 63) // 64 * 64) for i in range(count)] + [pixels]
        return [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]

    def _run(self, loop, shape, args):
        ranges = self.ranges(*shape)
        if len(ranges) == 1:
            loop(*args, *ranges[0])
            return
        pool = self._executor()
        pending = [pool.submit(loop, *args, lo, hi) for lo, hi in ranges[1:]]
        loop(*args, *ranges[0])
        for task in pending:
            task.result()

    def _executor(self):
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="xpr-loops")
            self._pool_pid = os.getpid()
        return self._pool
