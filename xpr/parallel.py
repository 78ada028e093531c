"""Many independent tasks (phasing repeats, pattern chunks, image chunks) on the chosen engine.

    results = parallel.map(fn, tasks, settings.multi_process)

`fn` is a module-level function of one task; results come back in task order. Engines:
  serial  one after another in this process (also used for a single task or n_processes: 1)
  local   processes on this machine (default: one per physical core), each FFT-threaded on its share
Seeded work takes its seeds from `task_seeds(seed, n)`, fixed per task index, so results are
identical whatever the engine and however many workers. A further engine (dask) plugs into ENGINES.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from xpr.errors import SettingsError


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads not counted)."""
    cpus = available_cpus()
    cores = set()
    for cpu in range(os.cpu_count() or 1):
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            return cpus
    return max(1, min(cpus, len(cores)))


def task_seeds(seed, n: int) -> list[int]:
    """Independent, reproducible seeds for n tasks (numpy SeedSequence spawning)."""
    children = np.random.SeedSequence(seed).spawn(n)
    return [int(child.generate_state(1, dtype=np.uint64)[0]) for child in children]


def n_workers(settings, n_tasks: int) -> int:
    requested = "auto" if settings is None else settings.get("n_processes", "auto")
    if requested in ("auto", None):
        workers = physical_cores()
    elif isinstance(requested, int) and not isinstance(requested, bool) and requested >= 1:
        workers = requested
    else:
        raise SettingsError(f"n_processes must be 'auto' or an integer >= 1, got {requested!r}",
                            key="multi_process.n_processes")
    return max(1, min(workers, n_tasks))


def _serial(fn, tasks, workers, on_result):
    results = []
    for task in tasks:
        results.append(fn(task))
        if on_result:
            on_result(results[-1])
    return results


def _init_worker(fft_threads: int):
    os.environ["XPR_FFT_WORKERS"] = str(fft_threads)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(fft_threads)


def _local(fn, tasks, workers, on_result):
    threads = max(1, available_cpus() // workers)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context,
                             initializer=_init_worker, initargs=(threads,)) as pool:
        futures = [pool.submit(fn, task) for task in tasks]
        results = []
        for future in futures:
            results.append(future.result())
            if on_result:
                on_result(results[-1])
    return results


ENGINES = {"serial": _serial, "local": _local}


def map(fn, tasks, settings=None, on_result=None):  # noqa: A001 - the natural name
    """fn(task) for every task, in order, on the engine the `multi_process` settings choose."""
    tasks = list(tasks)
    engine = "local" if settings is None else settings.get("engine", "local")
    if engine not in ENGINES:
        raise SettingsError(f"unknown engine '{engine}' (known: {', '.join(ENGINES)})",
                            key="multi_process.engine")
    workers = n_workers(settings, len(tasks))
    if workers == 1 or len(tasks) <= 1:
        engine = "serial"
    return ENGINES[engine](fn, tasks, workers, on_result)
