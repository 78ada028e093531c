"""Light task functions for the engine tests (worker processes import only numpy for them)."""
import os
import time

import numpy as np


def seeded_sum(seed):
    return float(np.random.default_rng(seed).normal(size=1000).sum())


def slow_seeded_sum(seed):
    time.sleep(0.4)
    return seeded_sum(seed)


def weighted(seed, shared):
    return float(np.dot(np.random.default_rng(seed).normal(size=shared.size), shared))


def dies_once(task):
    """Kills its own worker process the first time (marker file), succeeds when retried."""
    index, marker_dir = task
    marker = os.path.join(marker_dir, f"died_{index}")
    if index == 1 and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    return index * 10


def weighted_dies_once(task, shared):
    """`weighted` of a seed that kills its own worker the first time it runs (marker file), the
    shared input in hand: the worker that dies may hold the map's only copy of it."""
    seed, marker_dir, dies = task
    marker = os.path.join(marker_dir, f"died_{seed}")
    if dies and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    return weighted(seed, shared)


def fails_for_two(index):
    if index == 2:
        raise ValueError("diverged")
    return index


def worker_pid(_):
    time.sleep(0.05)
    return os.getpid()


def worker_setup(_):
    """What a worker process was given: its pid, GPU, thread counts and scipy.fft workers."""
    from xpr.backend import Backend

    time.sleep(0.3)           # long enough for every worker to take a task
    return (os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("XPR_FFT_WORKERS"),
            os.environ.get("OMP_NUM_THREADS"), Backend(False)._fft_kwargs["workers"])


def blas_threads(_):
    """The thread counts of the BLAS/OpenMP libraries loaded in this worker (threadpoolctl)."""
    from threadpoolctl import threadpool_info

    return sorted({entry["num_threads"] for entry in threadpool_info() if entry["user_api"] == "blas"})
