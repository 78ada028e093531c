"""Benchmark of fxs reconstruct: time per phasing iteration / time of one transform pair.

    python benchmarks/bench_fxs_reconstruct.py [--radial 128] [--order 63] [--theta 72] [--phi 140]
                                               [--iterations 5] [--batch 1] [--quality]

Figures (measured in the same run, printed as ratios; never pass/fail):
* t_iter: one HIO iteration of one batch (reciprocal projection with the Procrustes fits per order
  + real-space constraints) on the grid given (default: xFrame's tutorial grid, 128 radial points,
  max_order 63, 72 x 140 angles; xFrame measures ~1 s per iteration per process there);
* t_pair: one forward + inverse transform (harmonic + Hankel) of the same batch;
* --quality: a 2-D reconstruction from exact invariants and the relative mismatch between the
  invariants of the final densities and the input V_l V_l^dagger (xFrame: ~20 % at l = 0 in 2-D).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from xpr.backend import Backend
from xpr.fxs.fxs_phasing import (FourierTransformPair, RealSpaceOptions, blas_threads, build_grid, density_guess,
                                 phase, radial_field)
from xpr.fxs.reciprocal_projection import InvariantConstraint, InvariantProjection, invariants_from_coefficients
from xpr.phasing.schedule import parse_blocks


def blobs(grid, centres, widths, heights):
    x = grid.cartesian_points("real")
    rho = np.zeros(x.shape[:-1])
    for c, w, h in zip(centres, widths, heights):
        rho += h * np.exp(-np.sum((x - np.asarray(c, float)) ** 2, -1) / (2 * w ** 2))
    return rho


def exact_constraint(density, transform):
    d = transform.grid.dimensions
    intensity = np.abs(transform.forward(density[..., None, :])) ** 2
    coefficients = transform.backend.asnumpy(transform.real_harmonic_coefficients(intensity))[..., 0, :]
    invariants = invariants_from_coefficients(coefficients, d, transform.ms)
    vectors, masks = {}, {}
    n_q = transform.grid.n_radial
    for l, B in enumerate(invariants):
        values, vecs = np.linalg.eigh(B)
        rank = 1 if d == 2 else min(2 * l + 1, n_q)
        keep = np.argsort(values)[::-1][:rank]
        V = vecs[:, keep] * np.sqrt(np.clip(values[keep], 0, None))
        vectors[l], masks[l] = (V[:, 0] if d == 2 else V), np.ones(n_q, bool)
    i0 = coefficients[0, 0] if d == 3 else coefficients[0]
    return InvariantConstraint(vectors, masks, zeroth_order=i0.real, max_order=transform.grid.max_order), invariants


def timed(fn, repeats):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def speed(args):
    backend = Backend(False, "single")
    grid = build_grid(3, args.radial, 0.3, args.order, args.theta, args.phi)
    transform = FourierTransformPair(grid, backend)
    model = blobs(grid, [(0, 0, 0), (90, 0, 0), (-40, 70, 30)], [40, 25, 25], [1.0, 2.0, 1.5])
    constraint, _ = exact_constraint(model.astype(np.float32), transform)
    projection = InvariantProjection(transform, constraint)
    rng = np.random.default_rng(0)
    x = density_guess(grid, args.batch, 200.0, "bump", 0.3, "random", 2.0, rng, 1.0).astype(np.float32)
    support = radial_field(grid, grid.real_radii < 200, args.batch).astype(bool)
    steps = parse_blocks({"sub_loops": {"order": ["b"], "b": {"iterations": 1, "order": ["HIO"],
                                                             "methods": {"HIO": {"iterations": args.iterations}}}}})
    with blas_threads(1):
        t_pair = timed(lambda: transform.inverse(transform.forward(x)), 3)
        start = time.perf_counter()
        phase(transform, projection, steps, x, support, RealSpaceOptions())
        t_iter = (time.perf_counter() - start) / args.iterations
    print(f"grid {grid.n_radial} x {grid.angular_shape[1]} x {grid.angular_shape[0]} (r x theta x phi), "
          f"L = {grid.max_order}, batch {args.batch}")
    print(f"  transform pair (forward + inverse): {t_pair * 1e3:8.1f} ms")
    print(f"  phasing iteration (HIO):            {t_iter * 1e3:8.1f} ms   "
          f"= {t_iter / t_pair:.2f} x the transform pair, {t_iter / args.batch:.3f} s per reconstruction")
    print(f"  vs xFrame's ~1 s per iteration per process on this grid: {1.0 / (t_iter / args.batch):.1f} x faster")


def quality():
    backend = Backend(False, "double")
    grid = build_grid(2, 64, 0.5, 32)
    transform = FourierTransformPair(grid, backend)
    model = blobs(grid, [(0, 0), (60, 10), (-20, 55)], [25, 14, 14], [1.0, 2.0, 1.5])
    constraint, invariants = exact_constraint(model, transform)
    projection = InvariantProjection(transform, constraint)
    rng = np.random.default_rng(1)
    x = density_guess(grid, 4, 150.0, "bump", 0.3, "random", 2.0, rng, float(np.sum(model ** 2)))
    support = radial_field(grid, grid.real_radii < 150, 4).astype(bool)
    steps = parse_blocks({"sub_loops": {"order": ["m", "r"],
                                        "m": {"iterations": 6, "order": ["HIO", "SW", "ER"],
                                              "methods": {"HIO": {"iterations": 60}, "SW": {"iterations": 1},
                                                          "ER": {"iterations": 20}}},
                                        "r": {"iterations": 1, "order": ["ER"], "methods": {"ER": {"iterations": 100}}}}})
    with blas_threads(1):
        result = phase(transform, projection, steps, x, support, RealSpaceOptions(sw_sigmas=(20.0, 6.0)))
    best = int(np.argmin(result["best_error"]))
    density = result["real_density"][..., best:best + 1, :]
    c = transform.real_harmonic_coefficients(np.abs(transform.forward(density)) ** 2)[..., 0, :]
    b = invariants_from_coefficients(c, 2, transform.ms)
    mismatch = [np.linalg.norm(b[l] - invariants[l]) / np.linalg.norm(invariants[l]) for l in (0, 2, 4, 8, 16)]
    print("2-D quality, relative invariant mismatch of the best of 4 (l = 0, 2, 4, 8, 16): "
          + " ".join(f"{m * 100:.2f}%" for m in mismatch))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--radial", type=int, default=128)
    parser.add_argument("--order", type=int, default=63)
    parser.add_argument("--theta", type=int, default=72)
    parser.add_argument("--phi", type=int, default=140)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--quality", action="store_true")
    args = parser.parse_args()
    speed(args)
    if args.quality:
        quality()


if __name__ == "__main__":
    main()
