"""Benchmark of fxs reconstruct: time per phasing iteration / time of one transform pair.

    python benchmarks/bench_fxs_reconstruct.py [--radial 128] [--order 63] [--theta 72] [--phi 140]
                                               [--iterations 5] [--batch 1] [--quality]

Figures (measured in the same run, printed as ratios; never pass/fail):
* t_iter: one HIO iteration of one batch (reciprocal projection with the Procrustes fits per order
  + real-space constraints) on the grid given (default: xFrame's tutorial grid, 128 radial points,
  max_order 63, 72 x 140 angles; xFrame measures ~1 s per iteration per process there);
* t_pair: one forward + inverse transform (harmonic + Hankel) of the same batch;
* the Procrustes step (intensity coefficients -> change per order) as the library does it (BLAS
  matrix products on the coefficients as they lie, stacked SVDs) against the straightforward
  per-order einsum formulation it replaced (kept here as the reference), and the modulus step
  (project_amplitude) with its error integrals against the full-grid weight-array version;
* --quality: 2-D and 3-D reconstructions from exact invariants and the relative mismatch between
  the invariants of the final densities and the input V_l V_l^dagger (xFrame: ~20 % at l = 0 in
  2-D, 0.5-1 % for l <= 20 in 3-D); in 3-D with the default fit metrics, the plain Frobenius fit
  throughout and RAAR with the modulus fit throughout, then RAAR started at the exact solution with
  the invariant projection and with the whole intensity known (the floor of the figures).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from xpr.backend import Backend
from xpr.fxs.grids import build_grid
from xpr.fxs.grids import gaussian_blobs as blobs
from xpr.fxs.iterate import RealSpaceOptions, phase
from xpr.fxs.real_space import density_guess, radial_field
from xpr.fxs.reciprocal_projection import (InvariantProjection, KnownIntensityProjection, OrderConstraints3D,
                                           PointwiseRefinement, constraint_from_density,
                                           invariants_from_coefficients)
from xpr.fxs.transforms import FourierTransformPair, blas_threads
from xpr.phasing.schedule import parse_blocks


def reference_project_coefficients_3d(coefficients, constraint, ms):
    """The straightforward formulation (einsum per order, transposed copies): the reference."""
    change = np.zeros_like(coefficients)
    for l in range(coefficients.shape[1]):
        rows = np.flatnonzero(np.abs(ms) <= l)
        mask = constraint.q_masks[l]
        current = coefficients[rows, l]
        if l == 0:
            target = np.broadcast_to(constraint.zeroth_order.astype(current.dtype), current.shape)
        elif l % 2 == 1:
            target = np.zeros_like(current)
        else:
            V = constraint.projection_vectors[l].astype(current.dtype) * mask[:, None]
            I = np.transpose(current, (1, 2, 0)) * mask[None, :, None]
            W, _, Zh = np.linalg.svd(np.einsum("qr,bqk->brk", V.conj(), I), full_matrices=False)
            target = np.einsum("qr,brk->kbq", V, W @ Zh)
        change[rows, l] = np.where(mask, target - current, 0)
    return change


def reference_modulus_error(modulus, new, grid):
    weights = grid.volume_weights("reciprocal")
    axes = tuple(range(len(grid.angular_shape))) + (modulus.ndim - 1,)
    mismatch = np.sum((modulus - np.abs(new)) ** 2 * weights, axis=axes)
    return np.sqrt(mismatch / np.sum(np.abs(new) ** 2 * weights, axis=axes))


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
    constraint, _ = constraint_from_density(model.astype(np.float32), transform)
    projection = InvariantProjection(transform, constraint)
    rng = np.random.default_rng(0)
    x = density_guess(grid, args.batch, 200.0, "bump", 0.3, "random", 2.0, rng, 1.0).astype(np.float32)
    support = radial_field(grid, grid.real_radii < 200, args.batch).astype(bool)
    def iteration_time(method):
        """Seconds per iteration of `method` in reconstruct's default fit metric for it."""
        steps = parse_blocks({"sub_loops": {"order": ["b"], "b": {"iterations": 1, "order": [method],
                                                                 "methods": {method: {"iterations": args.iterations}}}}})
        start = time.perf_counter()
        phase(transform, projection, steps, x, support, RealSpaceOptions(),
              fit_metrics={"HIO": "intensity", "ER": "modulus"})
        return (time.perf_counter() - start) / args.iterations

    with blas_threads(1):
        t_pair = timed(lambda: transform.real_inverse(transform.forward(x)), 3)
        t_iter = iteration_time("HIO")
        t_er = iteration_time("ER")
    print(f"grid {grid.n_radial} x {grid.angular_shape[1]} x {grid.angular_shape[0]} (r x theta x phi), "
          f"L = {grid.max_order}, batch {args.batch}")
    print(f"  transform pair (forward + inverse): {t_pair * 1e3:8.1f} ms")
    print(f"  phasing iteration (HIO):            {t_iter * 1e3:8.1f} ms   "
          f"= {t_iter / t_pair:.2f} x the transform pair, {t_iter / args.batch:.3f} s per reconstruction")
    print(f"  vs xFrame's ~1 s per iteration per process on this grid: {1.0 / (t_iter / args.batch):.1f} x faster")
    print(f"  phasing iteration (ER, modulus fit with its pointwise refinement): {t_er * 1e3:.1f} ms   "
          f"= {t_er / t_pair:.2f} x the transform pair")
    with blas_threads(1):
        amplitude = transform.forward(x)
        intensity = np.abs(amplitude) ** 2
        coefficients = transform.real_harmonic_coefficients(intensity)
        half = transform.harmonic_half_of_real(intensity)
        fast = projection.orders_3d.change(half)                         # m >= 0 rows, the reference's plain fit
        slow = reference_project_coefficients_3d(coefficients, constraint, transform.ms)[:grid.max_order + 1]
        deviation = np.linalg.norm(fast - slow) / np.linalg.norm(slow)
        full_rank = OrderConstraints3D(constraint, grid.max_order, backend, rank_tolerance=0.0)
        ranks = [o[3].shape[1] for o in projection.orders_3d.orders if o[1] == "fit"]
        ranks_full = [o[3].shape[1] for o in full_rank.orders if o[1] == "fit"]
        t_fast = timed(lambda: projection.orders_3d.change(half, np, projection.fit_weights), 3)   # as in ER
        t_full = timed(lambda: full_rank.change(half, np, projection.fit_weights), 3)
        t_slow = timed(lambda: reference_project_coefficients_3d(coefficients, constraint, transform.ms), 3)
        t_refined = timed(lambda: projection.project_amplitude(amplitude), 3)
        projection.use_metric("intensity")
        new, e_mod = projection.project_amplitude(amplitude)
        t_amplitude = timed(lambda: projection.project_amplitude(amplitude), 3)
        t_error = timed(lambda: reference_modulus_error(np.abs(amplitude), new, grid), 3)
        e_ref = reference_modulus_error(np.abs(amplitude), new, grid)
    print(f"  Procrustes step (all orders):       {t_fast * 1e3:8.1f} ms   (real basis, m >= 0 half, V_l rank "
          f"{min(ranks)}-{max(ranks)} after the float32 cut); keeping every positive eigenvalue (rank "
          f"{min(ranks_full)}-{max(ranks_full)}): {t_full * 1e3:.1f} ms; the complex einsum formulation on all m "
          f"{t_slow * 1e3:.1f} ms: {t_slow / t_fast:.1f} x / {t_slow / t_full:.1f} x slower "
          f"(results agree to {deviation:.1e})")
    print(f"  modulus step (project_amplitude):   {t_amplitude * 1e3:8.1f} ms   its two error integrals on "
          f"full-grid weights alone took {t_error * 1e3:.1f} ms (e_mod {float(e_mod[0]):.4f} vs {float(e_ref[0]):.4f}); "
          f"in the modulus metric with the pointwise refinement: {t_refined * 1e3:.1f} ms")


def xframe_like_schedule(n_main, n_refinement):
    """n_main x (60 HIO, SW, 20 ER), then n_refinement ER: xFrame's tutorial pattern, shortened."""
    return parse_blocks({"sub_loops": {"order": ["m", "r"],
                                       "m": {"iterations": n_main, "order": ["HIO", "SW", "ER"],
                                             "methods": {"HIO": {"iterations": 60}, "SW": {"iterations": 1},
                                                         "ER": {"iterations": 20}}},
                                       "r": {"iterations": 1, "order": ["ER"],
                                             "methods": {"ER": {"iterations": n_refinement}}}}})


def quality(thresholds=(0.1, 0.02)):
    """2-D, exact invariants of three Gaussian blobs; the best of 4 reconstructions' invariant
    mismatch, for each final shrink-wrap threshold. The l = 0 mismatch comes from the support: a
    threshold of 0.1 x the blurred maximum cuts the blobs' low-density tails (on the particle itself
    its own shrink-wrap support at sigma 6 drops 6.4 % of the mass at 0.1, 1.3 % at 0.02), and
    B_0 ~ mass^4 at q -> 0."""
    backend = Backend(False, "double")
    grid = build_grid(2, 64, 0.5, 32)
    transform = FourierTransformPair(grid, backend)
    model = blobs(grid, [(0, 0), (60, 10), (-20, 55)], [25, 14, 14], [1.0, 2.0, 1.5])
    constraint, invariants = constraint_from_density(model, transform)
    projection = InvariantProjection(transform, constraint)
    steps = xframe_like_schedule(6, 100)
    for threshold in thresholds:
        rng = np.random.default_rng(1)
        x = density_guess(grid, 4, 150.0, "bump", 0.3, "random", 2.0, rng, float(np.sum(model ** 2)))
        support = radial_field(grid, grid.real_radii < 150, 4).astype(bool)
        options = RealSpaceOptions(sw_sigmas=(20.0, 6.0), sw_thresholds=(threshold, threshold))
        with blas_threads(1):
            result = phase(transform, projection, steps, x, support, options,
                           fit_metrics={"HIO": "intensity", "ER": "modulus"})
        best = int(np.argmin(result["best_error"]))
        density = result["real_density"][..., best:best + 1, :]
        c = transform.real_harmonic_coefficients(np.abs(transform.forward(density)) ** 2)[..., 0, :]
        b = invariants_from_coefficients(c, 2, transform.ms)
        mismatch = [np.linalg.norm(b[l] - invariants[l]) / np.linalg.norm(invariants[l]) for l in (0, 2, 4, 8, 16)]
        print(f"2-D quality, shrink-wrap threshold {threshold}: relative invariant mismatch of the best "
              "of 4 (l = 0, 2, 4, 8, 16): " + " ".join(f"{m * 100:.2f}%" for m in mismatch))


QUALITY_3D_RUNS = (("200HIO 400ER", {"HIO": "intensity", "ER": "modulus"}, "the default metrics"),
                   ("200HIO 400ER", {"HIO": "intensity", "ER": "intensity"}, "the plain fit throughout (xFrame's)"),
                   ("600RAAR 400ER", {"RAAR": "modulus", "ER": "modulus"}, "RAAR, the modulus fit throughout"))


def quality_3d(n_radial=40, max_order=32, max_q=0.2, n_repeats=4, runs=QUALITY_3D_RUNS):
    """3-D, xFrame's tutorial particle (five spheres on a pentagon of radius 140 Å around a sixth,
    densities 25/50) as Gaussians of width 25 Å, on a grid where it is reachable: its in-band
    version differs from it by 1e-5 and is positive to 3e-6, so its exact invariants on the grid
    have an exact solution and the figure measures convergence, not the grid. n_repeats random
    starts per run (schedule, fit metric per algorithm; reciprocal_projection's docstring),
    support r < 250 Å with positivity; relative invariant mismatch per even order and the final
    modulus error. xFrame: 0.5-1 % for l <= 20. Then the floor: RAAR started at the exact
    solution, with the invariant projection and with the whole intensity known."""
    from xpr.phasing.schedule import parse_string

    backend = Backend(False, "single")
    grid = build_grid(3, n_radial, max_q, max_order)
    transform = FourierTransformPair(grid, backend)
    centres = [(0.0, 0.0, 0.0)] + [(140 * np.cos(2 * np.pi * k / 5), 140 * np.sin(2 * np.pi * k / 5), 0.0)
                                   for k in range(5)]
    model = blobs(grid, centres, [25.0] * 6, [25, 50, 25, 50, 25, 50]).astype(np.float32)
    constraint, invariants = constraint_from_density(model, transform)
    radius = 250.0
    weights = grid.volume_weights()[..., 0, :]
    orders = list(range(0, max_order + 1, 2))

    def mismatch(density):
        c = transform.real_harmonic_coefficients(np.abs(transform.forward(density)) ** 2)[..., 0, :]
        b_l = invariants_from_coefficients(c.astype(np.complex128), 3, transform.ms)
        return " ".join(f"{np.linalg.norm(b_l[l] - invariants[l]) / np.linalg.norm(invariants[l]) * 100:5.2f}%"
                        for l in orders)

    print(f"3-D quality, xFrame's particle (Gaussian spheres) on {grid.n_radial} radial points, L = {max_order}, "
          f"{n_repeats} random starts: relative invariant mismatch per even l")
    print("  l:          " + " ".join(f"{l:6d}" for l in orders))
    for schedule, metrics, label in runs:
        rng = np.random.default_rng(2)
        x = density_guess(grid, n_repeats, radius, "bump", 0.3, "random", 2.0, rng,
                          float(np.sum(model.astype(float) ** 2 * weights)))
        support = radial_field(grid, grid.real_radii < radius, n_repeats).astype(bool)
        start = time.perf_counter()
        with blas_threads(1):
            result = phase(transform, InvariantProjection(transform, constraint), parse_string(schedule),
                           x.astype(np.float32), support, RealSpaceOptions(), fit_metrics=metrics)
        seconds = time.perf_counter() - start
        print(f"  {schedule}, {label} ({seconds:.0f} s):")
        for b in range(n_repeats):
            print(f"    {b}:       " + mismatch(result["real_density"][..., b:b + 1, :])
                  + f"   (final modulus error {result['errors_modulus'][b, -1]:.4f})")
    known = KnownIntensityProjection(transform, np.abs(transform.forward(model[..., None, :])) ** 2)
    support = radial_field(grid, grid.real_radii < radius, 1).astype(bool)
    print("  RAAR started at the exact solution, modulus error after 0 / 100 / 400 iterations, then 400 ER:")
    for label, projection in (("whole intensity known", known),
                              ("invariants, modulus fit, refined (default)", InvariantProjection(transform, constraint)),
                              ("invariants, modulus fit, shell metric only",
                               InvariantProjection(transform, constraint, PointwiseRefinement(steps=0)))):
        with blas_threads(1):
            result = phase(transform, projection, parse_string("400RAAR 400ER"), model[..., None, :].copy(),
                           support, RealSpaceOptions(), fit_metrics={"RAAR": "modulus", "ER": "modulus"})
        e = result["errors_modulus"][0]
        print(f"    {label}: {e[0]:.1e} / {e[100]:.1e} / {e[399]:.1e} -> {e[-1]:.1e}; invariant mismatch of the "
              f"last density: {mismatch(result['last_real_density'])}")


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
        quality_3d()


if __name__ == "__main__":
    main()
