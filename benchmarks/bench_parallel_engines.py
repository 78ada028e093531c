"""Throughput of the parallel engines on CDI 2-D phasing repeats, and their overhead per task.

    python benchmarks/bench_parallel_engines.py [--repeats 8] [--size 128] [--iterations 800]

Prints, measured in this run on this machine:
  * repeats per minute for serial (one process, repeats one after another), local (2 processes)
    and dask (LocalCluster, 2 workers, started beforehand), each repeat one task;
  * each engine's overhead per task: wall time per task of an empty task, as a fraction of one
    repeat's compute time.
Never pass/fail: figures only.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from xpr import parallel
from xpr.cdi import phasing
from xpr.cdi.objects import far_field_intensity, model_object
from xpr.phasing import schedule
from xpr.phasing.projections import centred_radius
from xpr.settings import Frozen


def empty(task):
    return task


def problem(size, iterations):
    truth = model_object("random_smooth", (size, size), size * 0.35, seed=1)
    intensity = far_field_intensity(truth)
    masked = np.zeros(intensity.shape, bool)
    steps = schedule.compile_schedule(f"{int(iterations * 0.6)}HIO {int(iterations * 0.3)}RAAR "
                                      f"{int(iterations * 0.1)}ER", beta=0.9)
    steps = schedule.with_periodic_shrink_wrap(steps, 50, 20, None, sigma=[3.0, 1.0])
    return {
        "intensity_fft": np.fft.ifftshift(intensity).astype(np.float32),
        "measured_fft": np.fft.ifftshift(~masked),
        "initial_support": np.asarray(centred_radius(intensity.shape)) <= size / 4,
        "init_model": None, "steps": steps, "use_gpu": False, "precision": "single",
        "options": {"background": False, "positivity": True, "value_threshold": None, "imag_limit": 0.0,
                    "support_size": None, "metrics_every": 10,
                    "shrink_wrap": {"threshold": 0.15, "sigma": [3.0, 1.0], "confine_to_initial": True,
                                    "max_shrink": None}},
    }


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=800)
    args = parser.parse_args()
    shared = problem(args.size, args.iterations)
    tasks = [{"seeds": [seed]} for seed in parallel.task_seeds(0, args.repeats)]

    from dask.distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    engines = {
        "serial": Frozen({"engine": "serial"}),
        "local (2 processes)": Frozen({"engine": "local", "n_processes": 2}),
        "dask (LocalCluster, 2 workers)": Frozen({"engine": "dask"}),
    }
    one_repeat, _ = timed(phasing.phase_chunk, tasks[0], shared=shared)
    print(f"CDI 2-D {args.size}x{args.size}, {args.iterations} iterations per repeat, {args.repeats} repeats; "
          f"one repeat alone: {one_repeat:.2f} s")
    print(f"{'engine':34s} {'repeats/min':>12s} {'speed-up':>9s} {'overhead/task':>14s} {'÷ repeat':>9s}")
    baseline = None
    reference = None
    for name, settings in engines.items():
        kwargs = {"client": client} if "dask" in name else {}
        wall, results = timed(parallel.map, phasing.phase_chunk, tasks, settings, shared=shared, **kwargs)
        objects = np.concatenate([r["object"] for r in results])
        reference = objects if reference is None else reference
        identical = np.array_equal(objects, reference)
        n_empty = 200
        overhead, _ = timed(parallel.map, empty, range(n_empty), settings, **kwargs)
        per_task = overhead / n_empty
        rate = args.repeats / wall * 60
        baseline = baseline or rate
        print(f"{name:34s} {rate:12.1f} {rate / baseline:8.2f}x {per_task * 1e3:11.2f} ms {per_task / one_repeat:9.4f}"
              f"{'' if identical else '   (results differ!)'}")
    client.close()
    cluster.close()


if __name__ == "__main__":
    main()
