"""Backend FFTs (dtype, normalisation, threads) and the parallel engines' reproducibility."""
from __future__ import annotations

import numpy as np
import pytest

from xpr import parallel
from xpr.backend import Backend, gpu_available
from xpr.errors import SettingsError
from xpr.settings import Frozen


def test_fft_round_trip_and_parseval_complex64():
    backend = Backend.from_settings(Frozen({"GPU": {"use": False}}))
    assert backend.complex_dtype == np.complex64 and not backend.is_gpu
    rng = backend.rng(3)
    x = (rng.normal(size=(2, 32, 32)) + 1j * rng.normal(size=(2, 32, 32))).astype(backend.complex_dtype)
    X = backend.fftn(x, axes=(-2, -1))
    assert X.dtype == np.complex64                  # no silent promotion to complex128
    np.testing.assert_allclose(backend.ifftn(X, axes=(-2, -1)), x, atol=1e-5)
    # Parseval with numpy's backward normalisation: sum|X|^2 = N sum|x|^2
    np.testing.assert_allclose(np.sum(np.abs(X) ** 2), 32 * 32 * np.sum(np.abs(x) ** 2), rtol=1e-5)
    # a shifted delta has a linear phase ramp: the sign convention is numpy's
    delta = np.zeros(8, np.complex64)
    delta[1] = 1
    np.testing.assert_allclose(backend.fft(delta), np.exp(-2j * np.pi * np.arange(8) / 8), atol=1e-6)


def test_double_precision_on_request():
    backend = Backend.from_settings(Frozen({"GPU": {"use": False, "precision": "double"}}))
    assert backend.complex_dtype == np.complex128


@pytest.mark.skipif(gpu_available(), reason="the error path exists only without a GPU")
def test_gpu_true_without_device_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("XPR_DEVICE", raising=False)       # the emulated device would stand in
    with pytest.raises(SettingsError, match="GPU.use is true"):
        Backend.from_settings(Frozen({"GPU": {"use": True}}))


def _noisy_sum(seed):
    return float(np.random.default_rng(seed).normal(size=1000).sum())


def test_results_identical_whatever_the_engine():
    seeds = parallel.task_seeds(1234, 6)
    assert len(set(seeds)) == 6
    serial = parallel.map(_noisy_sum, seeds, Frozen({"n_processes": 1}))
    local = parallel.map(_noisy_sum, seeds, Frozen({"n_processes": 2}))
    assert serial == local
    assert parallel.task_seeds(1234, 6) == seeds


def test_bad_engine_settings():
    with pytest.raises(SettingsError):
        parallel.map(_noisy_sum, [1, 2], Frozen({"n_processes": 0}))
    with pytest.raises(SettingsError):
        parallel.map(_noisy_sum, [1, 2], Frozen({"engine": "mpi"}))


def _timed_square(task):
    """(index, start, end, index²) after sleeping; start/end on this machine's wall clock."""
    import time

    index, seconds = task
    start = time.time()
    time.sleep(seconds)
    return index, start, time.time(), float(index * index)


def _warm(_):
    import time

    time.sleep(0.3)
    return 0


def test_streamed_reduce_consumes_in_task_order_and_holds_a_bounded_window():
    """Task 0 is slow: tasks 1-3 finish first and wait in the reorder window; nothing beyond the
    window (2 workers × in_flight 2 = 4 tasks) is started until task 0 is handed over, and the
    fold sees the results in task order, however they arrive."""
    settings = Frozen({"engine": "local", "n_processes": 2, "in_flight": 2})
    tasks = [(i, 1.0 if i == 0 else 0.02) for i in range(14)]
    arrived, consumed, held, times = [], [], [], {}

    def on_result(index, result):
        arrived.append(index)
        held.append(len(arrived) - len(consumed))   # handed over by the engine, not yet folded

    def combine(total, result):
        index, start, end, square = result
        consumed.append(index)
        times[index] = (start, end)
        return (total or 0.0) + square

    with parallel.Session(settings) as session:
        session.map(_warm, range(2))                # both worker processes up before timing
        reduction = session.reduce(_timed_square, tasks, combine, on_result=on_result)
    assert consumed == list(range(14))              # folded in task order ...
    assert arrived != sorted(arrived) and arrived[0] != 0    # ... although they arrived out of order
    assert max(held) <= 4                           # never more than the window held at once
    assert all(times[i][0] >= times[0][1] for i in range(4, 14))   # nothing started past the window
    assert reduction.value == sum(float(i * i) for i in range(14)) and reduction.failures == []


def test_compiled_loops_are_numpy_free_on_a_device_and_fall_back_to_no_cache_on_read_only_installs(monkeypatch):
    """Backend.compiled_loops: the phasing loops on the CPU (threaded, as many threads as the
    FFTs), none on the (emulated) device. Where
    numba can write no cache (a read-only install: njit(cache=True) raises "no locator
    available" at decoration) xpr.compiled compiles without one, and the loop gives the same
    numbers: a band projection with lower = upper = 2 sets every |F| to 2, phase kept."""
    import numba

    from xpr import compiled as compiled_module
    from xpr.phasing import loops

    cpu = Backend(fft_workers=3)
    assert isinstance(cpu.compiled_loops, loops.ThreadedLoops) and cpu.compiled_loops.threads == 3
    assert cpu.compiled_loops is cpu.compiled_loops                 # one per backend
    assert Backend(device="emulated").compiled_loops is None
    real_njit, asked = numba.njit, []

    def read_only_njit(*function, **options):
        if function:                 # numba's own uses, as @njit
            return real_njit(*function, **options)
        asked.append(options.get("cache", False))
        if options.get("cache"):
            raise RuntimeError("cannot cache function 'band_modulus': no locator available for file '/ro/loops.py'")
        return real_njit(**options)

    monkeypatch.setattr(compiled_module.numba, "njit", read_only_njit)
    band = compiled_module.compiled(error_model="numpy")(loops.band_modulus_range.py_func)
    assert asked == [True, False]
    F = np.array([[3 + 4j, -1j, 0.5 + 0j]], dtype=np.complex64)
    expected = 2 * F / np.abs(F)
    bound = np.full(3, 2.0, np.float32)
    band(F, bound, bound, np.float32(0), 0, 3)
    assert np.allclose(F, expected, atol=1e-6)
