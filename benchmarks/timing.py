"""Timing shared by the benchmark scripts (run as `python benchmarks/<script>.py`, so this module
is importable beside them): the best of a few calls, and the FFT pair every ratio is taken
against."""
from __future__ import annotations

import time

import scipy.fft


def best_of(fn, repeats=3):
    """(the shortest wall time of `repeats` calls of fn(), the last call's result)."""
    best, result = float("inf"), None
    for _ in range(max(1, int(repeats))):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def fft_pair_seconds(array, axes=None, repeats=5):
    """Best time of one forward + inverse FFT (scipy.fft, all cores) of `array` over `axes`."""
    return best_of(lambda: scipy.fft.ifftn(scipy.fft.fftn(array, axes=axes, workers=-1), axes=axes,
                                           workers=-1), repeats)[0]
