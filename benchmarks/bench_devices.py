"""Benchmark of the device machinery: what the emulated device costs, and threads per worker.

Printed, all measured in this run (fastest of a few repeats, to be least disturbed by other load):

* CDI: one chunk of 8 repeats × 60 ER iterations at 128² (xpr.cdi.phasing.phase_chunk) on numpy
  and on the emulated device (XPR_DEVICE=emulated's backend), and their ratio: the wrapper's
  overhead per array operation, i.e. how much slower a CI run of the device path is;
* ptycho: one loss + gradients evaluation (object, probe, positions) of the multislice model,
  64 patterns of 64², 2 slices, on numpy and on the emulated device, their ratio (the device path
  runs the batches one after another, as on a GPU; numpy shares them over threads), and the
  device-to-host synchronisations (float(), bool(), ...) one evaluation makes (each a stall on a GPU);
* threads per worker: 2 × cores tasks of batched 2-D FFTs on the local engine with one process
  per core, each FFT on the worker's share of the cores (xpr.parallel's worker_environment: what
  every worker now gets) against every worker running all-core FFTs (what dask workers and
  job-script workers did before), as a ratio of wall times.

    python benchmarks/bench_devices.py
"""
from __future__ import annotations

import os
import time

import numpy as np

from xpr import parallel
from xpr.backend import Backend, BackendSpec
from xpr.cdi.objects import far_field_intensity, model_object
from xpr.cdi.phasing import PhasingOptions
from xpr.phasing import schedule
from xpr.phasing.projections import centred_radius
from xpr.settings import Frozen


def fastest(work, repeats=3):
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def cdi_problem(size=128):
    truth = model_object("random_smooth", (size, size), size // 4, seed=1)
    intensity = far_field_intensity(truth)
    return {
        "intensity_fft": np.fft.ifftshift(intensity).astype(np.float32),
        "measured_fft": np.ones((size, size), bool),
        "initial_support": np.asarray(centred_radius((size, size))) <= size / 4,
        "init_model": None, "steps": schedule.parse_string("60ER"),
        "options": PhasingOptions(positivity=True, imag_limit=0.0, sw_sigma=2.0),
    }


def ptycho_evaluation(backend, n=64, patterns=64, slices=2, batch=16):
    from xpr.em.ptychography.forward import Model

    rng = np.random.default_rng(0)
    size = 3 * n
    model = Model(backend, n, 0.3, 0.025, 8.0, slices)
    params = {"object": np.exp(0.3j * rng.standard_normal((slices, size, size))).astype(np.complex64),
              "probe": (rng.standard_normal((1, n, n)) + 1j * rng.standard_normal((1, n, n))).astype(np.complex64),
              "positions": rng.uniform(0.0, size - n - 1.0, (patterns, 2))}
    params = {k: backend.asarray(v) for k, v in params.items()}
    counts = backend.asarray(rng.poisson(4.0, (patterns, n, n)).astype(np.float32))
    return lambda: model.loss_and_gradients(params, counts, "lsq_sqrt", {"object", "probe", "positions"}, batch)


def fft_task(task):
    """A worker's task: batched 2-D FFT pairs, with the FFT threads task['workers'] (None: the
    worker's share, XPR_FFT_WORKERS)."""
    backend = Backend(False, fft_workers=task["workers"])
    x = np.random.default_rng(task["seed"]).standard_normal((16, 256, 256)).astype(np.complex64)
    for _ in range(10):
        x = backend.ifftn(backend.fftn(x, axes=(-2, -1)), axes=(-2, -1))
    return float(np.abs(x).sum())


def main():
    from xpr.cdi.phasing import phase_chunk

    problem = cdi_problem()
    times = {}
    for device in ("cpu", "emulated"):
        shared = dict(problem, backend=BackendSpec(device))
        times[device] = fastest(lambda: phase_chunk({"seeds": list(range(8))}, shared=shared))
    print(f"CDI 8 x 60 ER at 128^2: numpy {times['cpu']:.3f} s, emulated {times['emulated']:.3f} s, "
          f"ratio {times['emulated'] / times['cpu']:.2f}")

    for device in ("cpu", "emulated"):
        times[device] = fastest(ptycho_evaluation(BackendSpec(device).create()))
    backend = BackendSpec("emulated").create()
    ptycho_evaluation(backend)()                       # one evaluation, its synchronisations counted
    print(f"ptycho loss+gradients, 64 x 64^2, 2 slices: numpy {times['cpu']:.3f} s, emulated "
          f"{times['emulated']:.3f} s, ratio {times['emulated'] / times['cpu']:.2f}; host synchronisations "
          f"in one evaluation (device to host, as on cupy): {dict(backend.emulator.syncs)}")

    cores = parallel.physical_cores()
    settings = Frozen({"engine": "local", "n_processes": cores})
    with parallel.Session(settings) as session:
        session.map(fft_task, [{"seed": 0, "workers": None}] * cores)          # start the workers
        share = fastest(lambda: session.map(fft_task, [{"seed": i, "workers": None} for i in range(2 * cores)]))
        every = fastest(lambda: session.map(fft_task, [{"seed": i, "workers": -1} for i in range(2 * cores)]))
    print(f"{2 * cores} FFT tasks on {cores} local workers: share of the cores "
          f"({parallel.available_cpus() // cores} thread(s)/FFT) {share:.3f} s, all cores per FFT "
          f"{every:.3f} s: ratio all/share {every / share:.2f} (XPR_FFT_WORKERS here: "
          f"{os.environ.get('XPR_FFT_WORKERS', 'unset')})")


if __name__ == "__main__":
    main()
