"""Throughput of the parallel engines on CDI 2-D phasing repeats, and their overhead per task;
fxs correlate's streamed reduction of pattern chunks.

    python benchmarks/bench_parallel_engines.py [--repeats 8] [--size 128] [--iterations 800]
        [--patterns 1600] [--chunk 20] [--only cdi|correlate]

Prints, measured in this run on this machine:
  * repeats per minute for serial (one process, repeats one after another), local (2 processes)
    and dask (LocalCluster, 2 workers, started beforehand), each repeat one task;
  * each engine's overhead per task: wall time per task of an empty task, as a fraction of one
    repeat's compute time;
  * fxs correlate (256² detector, 48 q × 50 φ, chunks of --chunk patterns): patterns per second,
    serial vs local (2 processes), through the streamed in-order reduction (parallel.reduce);
  * the client's memory for partial sums, before (parallel.map keeps every chunk's sums, then
    add_sums) and after (parallel.reduce adds each as it arrives, in chunk order, and drops it):
    most partial sums held at once and tracemalloc peak, as ratios; and whether the sums agree
    bit for bit.
Never pass/fail: figures only.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import h5py
import numpy as np

from xpr import parallel
from xpr.backend import BackendSpec
from xpr.cdi import phasing
from xpr.cdi.objects import far_field_intensity, model_object
from xpr.fxs.correlate import accumulate, add_sums, chunk_tasks, correlate_chunk, finish, polar_geometry
from xpr.fxs.detector import Detector
from xpr.fxs.grids import reciprocal_radial_points
from xpr.fxs.models import model_from_settings
from xpr.fxs.simulate_patterns import simulate_chunk
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
        "init_model": None, "steps": steps, "backend": BackendSpec("cpu", "single"),
        "options": {"background": False, "positivity": True, "value_threshold": None, "imag_limit": 0.0,
                    "support_size": None, "metrics_every": 10,
                    "shrink_wrap": {"threshold": 0.15, "sigma": [3.0, 1.0], "confine_to_initial": True,
                                    "max_shrink": None}},
    }


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


# ------------------------------------------------------------- fxs correlate: streamed reduction

def correlate_problem(n_patterns: int, chunk: int, folder: Path, distinct: int = 50):
    """Simulated 256² patterns (six spheres, Poisson noise; `distinct` of them, repeated to
    n_patterns: simulating costs more than correlating) in one file; correlate's tasks and inputs."""
    spheres = dict(types=["sphere"] * 6, centers=[(0, 0, 0)] + [(140.0, np.pi / 2, k * 2 * np.pi / 5) for k in range(5)],
                   sizes=[70] * 6, densities=[25, 50, 25, 50, 25, 50], random_orientation=[False] * 6)
    detector = Detector((256, 256), 400.0, 800.0, 1.23984, (127.5, 127.5))
    patterns = simulate_chunk({"model": model_from_settings(spheres, 3), "detector": detector, "dimensions": 3,
                               "seed": 1, "n_patterns": min(distinct, n_patterns), "n_particles": 1,
                               "fluence": 1.0e4, "poisson": True})["data"]
    path = folder / "patterns.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=np.resize(patterns, (n_patterns,) + patterns.shape[1:]))
    q = reciprocal_radial_points(0.3, 48)
    shared = {"geometry": polar_geometry(detector, q, 50, True), "order": 3, "n_phi": 50,
              "dataset": "data", "intensity_limits": None}
    return chunk_tasks([str(path)], [n_patterns], chunk), shared


def correlate_before(tasks, shared, settings, counter):
    """The former way: every chunk's partial sums kept by parallel.map, added at the end."""
    parts = parallel.map(correlate_chunk, tasks, settings, shared=shared, on_result=counter.arrived)
    counter.consumed_all()
    return add_sums(parts)


def correlate_after(tasks, shared, settings, counter):
    """Streamed: added in chunk order as they arrive, each dropped once added."""
    def combine(total, part):
        counter.consumed()
        return accumulate(total, part)

    return parallel.reduce(correlate_chunk, tasks, combine, settings, shared=shared,
                           on_result=counter.arrived).value


class Held:
    """Partial sums that arrived at the client and are not yet added (most at once)."""

    def __init__(self):
        self.n_arrived = self.n_consumed = self.most = 0

    def arrived(self, index, result):
        self.n_arrived += 1
        self.most = max(self.most, self.n_arrived - self.n_consumed)

    def consumed(self):
        self.n_consumed += 1

    def consumed_all(self):
        self.n_consumed = self.n_arrived


def _warm(_):
    return 0


def bench_correlate(n_patterns: int, chunk: int):
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        tasks, shared = correlate_problem(n_patterns, chunk, Path(folder))
        print(f"\nfxs correlate: {n_patterns} simulated 256² patterns ({time.perf_counter() - t0:.1f} s to simulate "
              f"50 distinct), {len(tasks)} chunks of {chunk}, 48 q × 50 φ; partial sums "
              f"{2 * 48 * 48 * 26 * 16 / 2 ** 20:.2f} MiB per chunk")
        engines = {"serial": Frozen({"engine": "serial"}),
                   "local (2 processes)": Frozen({"engine": "local", "n_processes": 2})}
        rates, sums = {}, {}
        for name, settings in engines.items():
            start = time.perf_counter()
            with parallel.Session(settings) as session:
                session.map(_warm, range(2))            # workers up: steady-state throughput
                warm = time.perf_counter()
                sums[name] = session.reduce(correlate_chunk, tasks, accumulate, shared=shared).value
                end = time.perf_counter()
            rates[name] = (n_patterns / (end - warm), n_patterns / (end - start))
        base = rates["serial"][0]
        print(f"  {'engine':22s} {'patterns/s':>10s} {'÷ serial':>9s} {'incl. start-up':>15s}")
        for name, (rate, with_start) in rates.items():
            print(f"  {name:22s} {rate:10.1f} {rate / base:8.2f}x {with_start:15.1f}")
        identical = all(np.array_equal(finish(s, 50)[0], finish(sums["serial"], 50)[0]) for s in sums.values())
        print(f"  serial and local sums bit-identical: {identical}")

        settings = engines["local (2 processes)"]
        memory = {}
        for label, fn in (("before (map, then add_sums)", correlate_before),
                          ("after (streamed reduce)", correlate_after)):
            held = Held()
            tracemalloc.start()
            _, total = timed(fn, tasks, shared, settings, held)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            memory[label] = (held.most, peak, total)
        (h0, p0, s0), (h1, p1, s1) = memory.values()
        print("  client memory for partial sums, local (2 processes, in_flight 4: window of 8 chunks):")
        for label, (held_most, peak, _) in memory.items():
            print(f"  {label:28s} partial sums held at most {held_most:4d}, client peak {peak / 2 ** 20:8.1f} MiB "
                  f"(tracemalloc)")
        print(f"  after / before: partial sums held {h1 / h0:.3f}, client peak memory {p1 / p0:.3f}; "
              f"same sums bit for bit: {np.array_equal(finish(s0, 50)[0], finish(s1, 50)[0])}")


def bench_cdi(args):
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=800)
    parser.add_argument("--patterns", type=int, default=1600, help="fxs correlate: patterns")
    parser.add_argument("--chunk", type=int, default=20, help="fxs correlate: patterns per chunk")
    parser.add_argument("--only", choices=["cdi", "correlate"], default=None)
    args = parser.parse_args()
    if args.only != "correlate":
        bench_cdi(args)
    if args.only != "cdi":
        bench_correlate(args.patterns, args.chunk)


if __name__ == "__main__":
    main()
