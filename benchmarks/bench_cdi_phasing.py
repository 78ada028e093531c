"""Cost of one phasing iteration, in units of one FFT pair of the same size, measured in one run.

For 512^2 and 128^3 (override with --sizes) it times:
  * one complex64 forward + inverse FFT pair with scipy.fft on all cores (the unit),
  * one iteration of RAAR, HIO and ER with shrink-wrap every 20 iterations (xpr.phasing),
and prints per-iteration time / FFT-pair time (target <= 1.5). Then the throughput of 8 repeats
run as one batch versus 8 run one after another. Ratios only; never pass/fail on time.

    python benchmarks/bench_cdi_phasing.py [--sizes 512x512 128x128x128] [--iterations 20] [--rounds 3]
"""
from __future__ import annotations

import argparse

import numpy as np
import scipy.fft

from timing import best_of, fft_pair_seconds
from xpr.cdi.objects import far_field_intensity, model_object
from xpr.backend import cpu
from xpr.phasing import engine, schedule
from xpr.phasing.projections import ModulusProjection, SupportProjection, centred_radius
from xpr.phasing.shrinkwrap import ShrinkWrap


def problem(shape, repeats, backend):
    truth = model_object("random_smooth", shape, shape[0] / 2.5, seed=1)
    intensity = np.fft.ifftshift(far_field_intensity(truth))
    measured = np.fft.ifftshift(np.asarray(centred_radius(shape)) > 3)
    initial = np.asarray(centred_radius(shape)) <= shape[0] / 4
    P_M = ModulusProjection(backend, intensity, measured, repeats=repeats)
    support = np.broadcast_to(initial, (repeats,) + shape).copy()
    x = engine.random_starts(backend, P_M.amplitude, support, list(range(repeats)))
    shrink = ShrinkWrap(backend, shape, threshold=0.2, sigma=1.0, confine_to=initial)
    return P_M, SupportProjection(), shrink, support, x


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["512x512", "128x128x128"])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--batch-sizes", nargs="+", default=["64x64", "256x256"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    backend = cpu()

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

    for text in args.batch_sizes:
        shape = tuple(int(n) for n in text.split("x"))
        batched = per_iteration("RAAR", shape, args.iterations, backend, repeats=8)
        single = per_iteration("RAAR", shape, args.iterations, backend, repeats=1)
        print(f"8 repeats of RAAR at {text}: batched {batched * 1e3:.2f} ms/iteration, "
              f"sequential {8 * single * 1e3:.2f} ms/iteration; batched throughput "
              f"{8 * single / batched:.2f}x sequential")


if __name__ == "__main__":
    main()
