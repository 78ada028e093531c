"""Measuring a command's memory in the tests (tests/test_memory.py, tests/em/test_memory_em.py,
tests/fxs/test_memory_fxs.py): the peak numpy and Python allocations of one in-process CLI run
(tracemalloc traces numpy's arrays), and a fixed memory limit in place of the machine's."""
from __future__ import annotations

import gc
import tracemalloc

from xpr import memory


def traced_peak(run_xpr, args, warm=None, fresh_collector=False):
    """Peak traced bytes of one in-process CLI run (exit 0 required), after an untraced `warm`
    run of the same command when given (its imports and caches).

    fresh_collector: run with the garbage collector as the command's own process has it. Its
    oldest generation is swept once the objects created since the last sweep reach a quarter of
    those that survived it; in a test session holding millions of objects (the whole suite) that
    sweep waits, and the run's cyclic garbage (matplotlib's figures) counts in its peak (fxs
    extract 3-D: estimate / peak 0.84 alone, 0.68 after the suite). Freezing what exists before
    the run, then sweeping, restores a fresh process's timing (0.86). Every memory test measures
    so (cdi's estimates read 1.4-1.8x alone and passed only after the suite had run before them)."""
    if warm is not None:
        assert run_xpr(warm).exit_code == 0
    if fresh_collector:
        gc.collect()
        gc.freeze()
        gc.collect()          # resets the count of survivors the next full sweep waits on
    tracemalloc.start()
    try:
        result = run_xpr(args)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        if fresh_collector:
            gc.unfreeze()
    assert result.exit_code == 0, result.output
    return peak


def working_peak(run_xpr, tiny, big):
    """Peak of `big` less that of `tiny` (run twice first: imports and caches settle)."""
    traced_peak(run_xpr, tiny)
    base = traced_peak(run_xpr, tiny)
    return traced_peak(run_xpr, big) - base


def limit_memory(monkeypatch, nbytes):
    """memory.available() says `nbytes` ("test limit") for the rest of the test."""
    monkeypatch.setattr(memory, "available", lambda *a, **k: memory.Limit(int(nbytes), "test limit"))
