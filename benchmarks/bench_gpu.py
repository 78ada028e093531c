"""GPU (cupy) figures, all measured in one run on a machine with a CUDA device.

Printed (every GPU time taken between device synchronisations; best of a few calls):

* CDI engine: one iteration of RAAR, HIO and ER with shrink-wrap every 20 (the default run's
  projections: 5 % free pixels, eMod every 10, positivity) on cupy, as a ratio to one cupy
  complex64 FFT pair of the same batch (the CPU's target, <= 1.5, applies here too), for
  512^2 x 1 and x 8 repeats and 128^3 x 1; beside it, the same iteration on numpy (all cores)
  over the cupy one (the speed-up a user gets from `GPU.use: true`), and the projections' array
  expressions over their CUDA kernels (xpr.phasing.device_loops) on cupy;
* whole CLI runs, `cdi phase2d` and `cdi phase3d` with default settings (8 repeats, 3 GA
  generations) on the issue-20 class (512^2 and 64^3, true size given), with `GPU.use` true and
  false: wall times, their ratio, and the merged real-space error of each -- the GPU path must
  recover the same object, not just a faster one;
* ptycho: one loss + gradients evaluation of the multislice model (128 patterns of 128^2,
  2 slices, batches of 32) on numpy and on cupy, and their ratio.

Without cupy or a CUDA device it says so and exits 0.

    python benchmarks/bench_gpu.py [--rounds 3] [--skip-cli | --cli-dims 2 3] [--emulated]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from bench_cdi_phasing import problem
from bench_devices import ptycho_evaluation
from xpr.backend import BackendSpec, gpu_available
from xpr.phasing import engine, schedule


def synchronise(backend):
    if backend.device == "cuda":
        backend.xp.cuda.runtime.deviceSynchronize()


def best_time(backend, work, rounds=3):
    """Shortest wall time of work() over `rounds` calls, the device idle before and after each."""
    work()
    synchronise(backend)
    best = np.inf
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        synchronise(backend)
        best = min(best, time.perf_counter() - start)
    return best


def fft_pair_seconds(backend, shape, repeats):
    xp = backend.xp
    a = xp.asarray((np.random.default_rng(0).standard_normal((repeats,) + shape) * (1 + 1j)).astype(np.complex64))
    axes = tuple(range(1, len(shape) + 1))
    return best_time(backend, lambda: backend.ifftn(backend.fftn(a, axes=axes), axes=axes), rounds=10)


def cdi_iteration_seconds(backend, shape, repeats, text, with_sw, iterations=40, rounds=3, kernels=True):
    """Seconds per iteration of `text` (RAAR, HIO, ER) on a batch of `repeats`, default projections
    (bench_cdi_phasing's problem, with positivity); kernels=False: without the backend's compiled
    loops (the projections' array expressions)."""
    P_M, P_S, shrink, support, x = problem(shape, repeats, backend, positivity=True)
    if not kernels:
        P_M._loops = P_S.loops = None
    steps = schedule.parse_string(f"{iterations}{text}", beta=0.8)
    if with_sw:
        steps = schedule.with_periodic_shrink_wrap(steps, 20, 20, stop=iterations, sigma=1.0)
    return best_time(backend, lambda: engine.iterate(steps, x, support, P_M, P_S, shrink, backend.xp),
                     rounds) / iterations


def cdi_engine(gpu, cpu, rounds):
    print("CDI engine, seconds per iteration on cupy / one cupy FFT pair of the batch; in brackets: "
          "numpy (all cores) / cupy, and the array expressions (no kernels) / the kernels on cupy")
    print(f"{'size':>16} {'FFT pair':>10} {'RAAR':>24} {'HIO':>24} {'ER+SW/20':>24}")
    algorithms = (("RAAR", False), ("HIO", False), ("ER", True))
    for shape, repeats in (((512, 512), 1), ((512, 512), 8), ((128, 128, 128), 1)):
        unit = fft_pair_seconds(gpu, shape, repeats)
        cells = []
        for name, sw in algorithms:
            on_gpu = cdi_iteration_seconds(gpu, shape, repeats, name, sw, rounds=rounds)
            on_cpu = cdi_iteration_seconds(cpu, shape, repeats, name, sw, iterations=20, rounds=1)
            plain = cdi_iteration_seconds(gpu, shape, repeats, name, sw, rounds=rounds, kernels=False)
            cells.append(f"{on_gpu / unit:6.2f}x ({on_cpu / on_gpu:5.1f}x, {plain / on_gpu:4.2f}x)")
        label = "x".join(map(str, shape)) + f" x{repeats}"
        print(f"{label:>16} {unit * 1e3:8.3f}ms " + " ".join(f"{c:>24}" for c in cells), flush=True)


def cli_runs(dims):
    """phase2d / phase3d with defaults on the issue class, GPU.use true and false."""
    import bench_cdi_robustness as robustness

    cases = [robustness.Case("random_smooth", n=512, oversampling=4, photons=2e6, beamstop=5, seed=6),
             robustness.Case("random_smooth", n=64, dim=3, oversampling=4, photons=2e7, beamstop=3)]
    cases = [case for case in cases if case.dim in dims]
    print("whole CLI runs (defaults, 8 repeats, 3 generations, true size given): wall and merged error")
    with robustness.bench_home() as tmp:
        for case in cases:
            row = {}
            for use in ("false", "true"):
                result = robustness.run_case(case, tmp, [f"GPU.use={use}"], support_size=True)
                row[use] = result
            cpu_run, gpu_run = row["false"], row["true"]
            print(f"  {case.label}: CPU {cpu_run['wall']:.1f} s (merged {cpu_run['merged']:.3f}), GPU "
                  f"{gpu_run['wall']:.1f} s (merged {gpu_run['merged']:.3f}): GPU {cpu_run['wall'] / gpu_run['wall']:.1f}x "
                  "faster", flush=True)


def ptycho(gpu, cpu, n=128, patterns=128, slices=2, batch=32):
    def evaluation(backend):
        return ptycho_evaluation(backend, n=n, patterns=patterns, slices=slices, batch=batch)

    on_cpu = best_time(cpu, evaluation(cpu), rounds=2)
    on_gpu = best_time(gpu, evaluation(gpu), rounds=5)
    print(f"ptycho loss + gradients, {patterns} x {n}^2, {slices} slices, batches of {batch}: numpy "
          f"{on_cpu * 1e3:.1f} ms, cupy {on_gpu * 1e3:.1f} ms: GPU {on_cpu / on_gpu:.1f}x faster")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-cli", action="store_true", help="leave out the whole CLI runs")
    parser.add_argument("--cli-dims", nargs="+", type=int, default=[2, 3], help="the CLI runs' dimensions")
    parser.add_argument("--emulated", action="store_true",
                        help="run the script on the emulated device instead (checks it without a GPU; "
                             "its figures mean nothing)")
    args = parser.parse_args()
    if args.emulated:
        gpu = BackendSpec("emulated").create()
        print("device: the emulated one (figures meaningless)")
    elif not gpu_available():
        print("no cupy or no CUDA device here: nothing to measure")
        return
    else:
        gpu = BackendSpec("cuda").create()
        name = gpu.xp.cuda.runtime.getDeviceProperties(0)["name"].decode()
        print(f"device: {name}; cupy {gpu.xp.__version__}")
    cpu = BackendSpec("cpu").create()
    cdi_engine(gpu, cpu, args.rounds)
    ptycho(gpu, cpu)
    if not args.skip_cli:
        cli_runs(args.cli_dims)


if __name__ == "__main__":
    main()
