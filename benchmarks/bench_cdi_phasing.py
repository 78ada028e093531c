"""Cost of one phasing iteration, in units of one FFT pair of the same size, measured in one run.

For 512^2 and 128^3 (override with --sizes) it times:
  * one complex64 forward + inverse FFT pair with scipy.fft on all cores (the unit),
  * one iteration of RAAR, HIO and ER with shrink-wrap every 20 iterations (xpr.phasing), with
    the default run's projections (5 % free pixels, eMod every 10; compiled loops on the CPU),
and prints per-iteration time / FFT-pair time (target <= 1.5). Then what the compiled loops'
threads save (RAAR with the loops on one thread / on all), and the throughput of 8 repeats run as
one batch versus 8 run one after another. Ratios only; never pass/fail on time.

--whole-run (issue 20 item 4): the cost per iteration a user's run pays, measured as the issue
asks -- two `cdi phase2d` CLI runs (in this process) of 100 and 600 RAAR iterations at 512^2, one
repeat, defaults otherwise (free pixels, eMod every 10, positivity, shrink-wrap every 20 with its
size floor, eCon every 10, the progress bar): (cost(600) - cost(100)) / 500 / cost(one FFT pair)
-- and the engine alone (xpr.phasing.engine.iterate on the same projections, no CLI). Costs are
CPU seconds of this process (time.process_time: every thread's, so the FFTs' worker threads
count), which other jobs on a shared machine do not inflate the way they inflate wall time; the
FFT pair (the backend's complex64 fftn + ifftn, all cores) is timed between the runs.

    python benchmarks/bench_cdi_phasing.py [--sizes 512x512 128x128x128] [--iterations 20] [--rounds 3]
    python benchmarks/bench_cdi_phasing.py --whole-run [--rounds 3]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.fft

from timing import best_of, fft_pair_seconds
from xpr.cdi.objects import far_field_intensity, model_object
from xpr.backend import cpu
from xpr.phasing import engine, schedule
from xpr.phasing.likelihood import BandModulusProjection, free_pixels
from xpr.phasing.projections import SupportProjection, centred_radius
from xpr.phasing.shrinkwrap import ShrinkWrap


def problem(shape, repeats, backend, positivity=False):
    """(P_M, P_S, shrink-wrap, support, starts) of a batch of `repeats`, on the backend's device
    (benchmarks/bench_gpu.py times the same problem on cupy)."""
    xp = backend.xp
    truth = model_object("random_smooth", shape, shape[0] / 2.5, seed=1)
    intensity = np.fft.ifftshift(far_field_intensity(truth))
    measured = np.fft.ifftshift(np.asarray(centred_radius(shape)) > 3)
    initial = xp.asarray(np.asarray(centred_radius(shape)) <= shape[0] / 4)
    # the default run's modulus projection: exact moduli, 5 % free pixels, eMod every 10
    P_M = BandModulusProjection(backend, xp.asarray(intensity), xp.asarray(measured), band=0.0,
                                free=xp.asarray(free_pixels(measured, 0.05)), repeats=repeats,
                                metrics_every=10)
    support = xp.broadcast_to(initial, (repeats,) + shape).copy()
    x = engine.random_starts(backend, P_M.amplitude, support, list(range(repeats)))
    shrink = ShrinkWrap(backend, shape, threshold=0.2, sigma=1.0, confine_to=initial)
    return P_M, SupportProjection(positivity=positivity, backend=backend), shrink, support, x


def per_iteration(text, shape, iterations, backend, repeats=1, with_sw=False, rounds=3):
    P_M, P_S, shrink, support, x = problem(shape, repeats, backend)
    steps = schedule.parse_string(f"{iterations}{text}", beta=0.8)
    if with_sw:
        steps = schedule.with_periodic_shrink_wrap(steps, 20, 20, stop=iterations, sigma=1.0)
    engine.iterate(schedule.parse_string(f"2{text}"), x, support, P_M, P_S, shrink, np)  # warm-up
    return best_of(lambda: engine.iterate(steps, x, support, P_M, P_S, shrink, np), rounds)[0] / iterations


def fft_pair(shape):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    scipy.fft.ifftn(scipy.fft.fftn(a, workers=-1), workers=-1)
    return fft_pair_seconds(a)


def _cpu_time(fn):
    start = time.process_time()
    fn()
    return time.process_time() - start


def fft_pair_cpu(backend, shape, count=40):
    """CPU seconds of one complex64 FFT pair through the backend (as the engine calls it)."""
    a = (np.random.default_rng(0).standard_normal(shape) * (1 + 1j)).astype(np.complex64)
    backend.ifftn(backend.fftn(a))
    return _cpu_time(lambda: [backend.ifftn(backend.fftn(a)) for _ in range(count)]) / count


def whole_run(n=512, rounds=3):
    """Whole CLI run and engine alone, CPU time per RAAR iteration over the FFT pair's."""
    import os
    import tempfile
    from pathlib import Path

    from bench_cdi_robustness import Case, make_case, run_cli

    backend = cpu()
    shape = (n, n)
    case = Case("random_smooth", n, 2, 4, 2e6, 5, 0.0, 1)
    pattern, masked, truth = make_case(case)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.save(tmp / "data.npy", pattern.astype(np.float32))
        np.save(tmp / "mask.npy", masked.astype(np.uint8))
        os.environ["HOME"] = str(tmp)            # --setup_home records its home in ~/.xpr: not the user's
        run_cli(["--setup_home", tmp / "home"])
        os.environ["XPR_HOME"] = str(tmp / "home")

        def cli(iterations):
            settings = tmp / f"run{iterations}.yaml"
            settings.write_text(
                f"structure_name: speed\ninput:\n  data_path: {tmp / 'data.npy'}\n"
                f"  mask_path: {tmp / 'mask.npy'}\nphasing:\n  iters: {iterations}RAAR\n"
                f"  repeats: 1\nphasing_parameters:\n  support_size: {int(np.count_nonzero(truth))}\n")
            return _cpu_time(lambda: run_cli(["-q", "cdi", "phase2d", settings]))

        cli(20)                                             # warm-up (imports, plans)
        whole, alone = [], []
        intensity, measured = np.fft.ifftshift(pattern), np.fft.ifftshift(~masked)
        P_M = BandModulusProjection(backend, intensity, measured, band=0.0,
                                    free=free_pixels(measured, 0.05), metrics_every=10)
        initial = np.asarray(centred_radius(shape)) <= np.sqrt(2.5 * np.count_nonzero(truth) / np.pi)
        shrink = ShrinkWrap(backend, shape, threshold=0.15, sigma=1.0, confine_to=initial,
                            support_size=int(np.count_nonzero(truth)), size_rule="floor")
        steps = schedule.with_periodic_shrink_wrap(schedule.parse_string("200RAAR", beta=0.9),
                                                   20, 20, stop=200, sigma=1.0)
        support = initial[None].copy()
        x = engine.random_starts(backend, P_M.amplitude, support, [0])
        P_S = SupportProjection(positivity=True, backend=backend)
        for _ in range(rounds):
            units = [fft_pair_cpu(backend, shape)]
            costs = {}
            for iterations in (100, 600):
                costs[iterations] = cli(iterations)
                units.append(fft_pair_cpu(backend, shape))
            engine_cost = _cpu_time(lambda: engine.iterate(steps, x, support, P_M, P_S, shrink, np,
                                                           metrics_every=10)) / 200
            units.append(fft_pair_cpu(backend, shape))
            unit = float(np.median(units))
            whole.append((costs[600] - costs[100]) / 500 / unit)
            alone.append(engine_cost / unit)
            print(f"{n}^2: FFT pair {unit * 1e3:.2f} ms CPU; whole run (CLI 600 - 100 RAAR) "
                  f"{whole[-1]:.2f}x FFT pair per iteration; engine alone {alone[-1]:.2f}x", flush=True)
    print(f"whole run: median {np.median(whole):.2f}x ({min(whole):.2f}-{max(whole):.2f} over {rounds} "
          f"rounds); engine alone: median {np.median(alone):.2f}x ({min(alone):.2f}-{max(alone):.2f})"
          "; target <= 1.5")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["512x512", "128x128x128"])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--batch-sizes", nargs="+", default=["64x64", "256x256"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--whole-run", action="store_true",
                        help="only the whole CLI run's and the engine's CPU cost per iteration at 512^2")
    args = parser.parse_args()
    backend = cpu()
    if args.whole_run:
        whole_run(rounds=args.rounds)
        return

    # On a shared machine the load changes from second to second: the FFT pair and the three
    # algorithms are timed in interleaved rounds and the best time of each is kept.
    print(f"{'size':>12} {'FFT pair':>10} {'RAAR':>12} {'HIO':>12} {'ER+SW/20':>12}")
    algorithms = (("RAAR", False), ("HIO", False), ("ER", True))
    for text in args.sizes:
        shape = tuple(int(n) for n in text.split("x"))
        unit, times = np.inf, [np.inf] * len(algorithms)
        for _ in range(args.rounds):
            unit = min(unit, fft_pair(shape))
            for i, (name, sw) in enumerate(algorithms):
                t = per_iteration(name, shape, args.iterations, backend, with_sw=sw, rounds=1)
                times[i] = min(times[i], t)
        print(f"{text:>12} {unit * 1e3:8.2f}ms " + " ".join(f"{t / unit:10.2f}x " for t in times))

    # The compiled loops (xpr.phasing.loops.ThreadedLoops) on one thread instead of all of the
    # FFTs' threads, in interleaved rounds: what splitting them over the cores saves.
    one_thread = cpu()
    one_thread.compiled_loops.threads = 1
    for text in args.sizes:
        shape = tuple(int(n) for n in text.split("x"))
        threaded, single = np.inf, np.inf
        for _ in range(args.rounds):
            threaded = min(threaded, per_iteration("RAAR", shape, args.iterations, backend, rounds=1))
            single = min(single, per_iteration("RAAR", shape, args.iterations, one_thread, rounds=1))
        print(f"RAAR at {text}: compiled loops on one thread / on {backend.compiled_loops.threads} "
              f"threads {single / threaded:.2f}x per iteration")

    for text in args.batch_sizes:
        shape = tuple(int(n) for n in text.split("x"))
        batched = per_iteration("RAAR", shape, args.iterations, backend, repeats=8)
        single = per_iteration("RAAR", shape, args.iterations, backend, repeats=1)
        print(f"8 repeats of RAAR at {text}: batched {batched * 1e3:.2f} ms/iteration, "
              f"sequential {8 * single * 1e3:.2f} ms/iteration; batched throughput "
              f"{8 * single / batched:.2f}x sequential")


if __name__ == "__main__":
    main()
