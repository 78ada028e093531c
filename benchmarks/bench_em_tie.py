"""Benchmark of `xpr em tie`'s stages on the issue-7 sphere (300 kV, ±5 µm, 1 % shot noise).

Prints, measured in this run: wall time of the plain TIE solve, of the Gerchberg–Saxton–Misell
and least-squares (L-BFGS) refinements and of the near-field fit (PyPty's near-field mode: all
images fitted by L-BFGS, here coherent, from the TIE start and from a flat wave), their ratios,
and the rms errors with the error ratio refined / plain; and one GS–Misell sweep over one FFT
pair of the image size (the sweep keeps the wave in Fourier space between the planes: 2 FFTs
per plane and one back, 3.5 pairs for 3 planes). Never pass/fail on time.

    python benchmarks/bench_em_tie.py [--size 256] [--iterations 50]
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np

from xpr.backend import Backend
from xpr.em.tie import focal_series, specimens, solvers as tie_solvers
from xpr.em.optics import electron_wavelength_A


def sphere_series(backend, size, defocus):
    """The issue-7 specimen scaled to `size` pixels over 150 nm."""
    pixel = 150e-9 / size
    thickness = specimens.sphere_thickness_m((size, size), pixel, 30e-9)
    phase, amplitude = specimens.electrostatic_phase_and_amplitude(thickness, 17.0, 1.0, 300.0)
    wavelength = electron_wavelength_A(300.0) * 1e-10
    transfers = [focal_series.transfer_function(backend, (size, size), pixel, wavelength, d)
                 for d in defocus]
    images = focal_series.focal_series_images(
        backend, (amplitude * np.exp(1j * phase)).astype(backend.complex_dtype), transfers)
    images = focal_series.add_noise(backend.asnumpy(images), "poisson", 0.01,
                                    np.random.default_rng(0)).astype(np.float32)
    return phase, images, transfers, pixel, wavelength


def timed(function, repeats=1):
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=50)
    args = parser.parse_args()
    backend = Backend(False, "single")
    defocus = (-5e-6, 0.0, 5e-6)
    exact, images, transfers, pixel, wavelength = sphere_series(backend, args.size, defocus)
    operators = tie_solvers.FourierOperators(backend, images.shape[1:], pixel,
                                             q_c=0.02 / (args.size * pixel))
    k = 2 * math.pi / wavelength

    def plain_tie():
        derivative, _ = tie_solvers.intensity_derivative(np, images, defocus)
        return tie_solvers.solve_tie_full(operators, derivative.astype(np.float32), k, images[1], 0.01)

    t_tie, phase_tie = timed(plain_tie, repeats=3)
    start = phase_tie.astype(np.float32)
    log_amplitude = (0.5 * np.log(images[1])).astype(np.float32)
    amplitudes = [np.sqrt(np.maximum(image, 0)) for image in images]
    t_gsm, (phase_gsm, _, _) = timed(lambda: tie_solvers.refine_gs_misell(
        backend, start, log_amplitude, transfers, amplitudes, args.iterations))
    t_lsq, (phase_lsq, _, _) = timed(lambda: tie_solvers.refine_least_squares(
        backend, start, log_amplitude, transfers, amplitudes, args.iterations))

    t_near, (phase_near, _, _) = timed(lambda: tie_solvers.refine_least_squares(
        backend, start, log_amplitude, transfers, amplitudes, 2 * args.iterations,
        blurs=tie_solvers.coherence_blurs(backend, images.shape[1:], pixel, defocus, 0.0)))
    flat = np.zeros_like(start)
    mean_log_amplitude = np.full_like(start, math.log(float(np.mean(amplitudes))))
    t_flat, (phase_flat, _, _) = timed(lambda: tie_solvers.refine_least_squares(
        backend, flat, mean_log_amplitude, transfers, amplitudes, 4 * args.iterations))

    errors = {name: tie_solvers.rms_error_in_window(phase, exact, 0.35)
              for name, phase in (("tie", phase_tie), ("gs_misell", phase_gsm),
                                  ("least_squares", phase_lsq), ("near_field", phase_near),
                                  ("near_field_flat", phase_flat))}
    print(f"sphere {args.size}², 300 kV, ±5 µm, 1 % shot noise, {args.iterations} iterations")
    print(f"  plain TIE            {t_tie * 1e3:9.1f} ms   rms {errors['tie']:.4f} rad")
    print(f"  GS–Misell            {t_gsm * 1e3:9.1f} ms   rms {errors['gs_misell']:.4f} rad")
    print(f"  least squares L-BFGS {t_lsq * 1e3:9.1f} ms   rms {errors['least_squares']:.4f} rad")
    print(f"  near field, TIE start, {2 * args.iterations:3d} it. {t_near * 1e3:9.1f} ms   rms {errors['near_field']:.4f} rad")
    print(f"  near field, flat start, {4 * args.iterations:3d} it. {t_flat * 1e3:8.1f} ms   rms {errors['near_field_flat']:.4f} rad")
    print(f"  time ratio GS–Misell / TIE          {t_gsm / t_tie:8.1f}")
    fft_pair, _ = timed(lambda: backend.ifft2(backend.fft2(images[0].astype(backend.complex_dtype))),
                        repeats=20)
    print(f"  one GS–Misell sweep / FFT pair      {t_gsm / args.iterations / fft_pair:8.1f}"
          f"   ({len(transfers)} planes)")
    print(f"  time ratio near field / GS–Misell   {t_near / t_gsm:8.2f}")
    print(f"  time ratio least squares / GS–Misell {t_lsq / t_gsm:7.2f}")
    print(f"  error ratio GS–Misell / TIE         {errors['gs_misell'] / errors['tie']:8.3f}")
    print(f"  error ratio least squares / TIE     {errors['least_squares'] / errors['tie']:8.3f}")
    print(f"  error ratio near field / GS–Misell  {errors['near_field'] / errors['gs_misell']:8.3f}")


if __name__ == "__main__":
    main()
