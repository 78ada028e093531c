"""Benchmark of the fxs data side: `correlate` throughput and `extract` time.

Prints figures measured in this run and their ratios (never pass/fail):

* correlate: patterns per second for 512×512 detectors (polar interpolation + cross-correlation
  of every ring pair), in this process and spread over all cores (xpr.parallel, engine local);
* extract: time of back_substitution, lstsq and legendre on the 3-D tutorial grid
  (48 radial points, max_order 24), and of the projection matrices.

    python benchmarks/bench_fxs_data.py [--patterns 32] [--radial 64] [--angles 256]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from xpr import parallel
from xpr.fxs.correlate import add_sums, correlate_chunk, finish, polar_geometry
from xpr.fxs.detector import Detector
from xpr.fxs.extraction import extract_from_cc, projection_matrices_3d
from xpr.fxs.grids import reciprocal_radial_points
from xpr.fxs.invariants import deg2_invariants_3d, invariants_to_cc, model_intensity_coefficients
from xpr.fxs.models import model_from_settings
from xpr.fxs.simulate_patterns import simulate_chunk

SPHERES = dict(types=["sphere"] * 6, centers=[(0, 0, 0)] + [(140.0, np.pi / 2, k * 2 * np.pi / 5) for k in range(5)],
               sizes=[70] * 6, densities=[25, 50, 25, 50, 25, 50], random_orientation=[False] * 6)
TETRAHEDRA = dict(types=["tetrahedron"] * 6, centers=[(0, 0, 0)] + [(100.0, np.pi / 2, k * 2 * np.pi / 5) for k in range(5)],
                  sizes=[50] * 6, densities=[25, 50, 25, 50, 25, 50], random_orientation=[True] * 6)


def bench_correlate(n_patterns: int, n_radial: int, n_angles: int, folder: Path):
    detector = Detector((512, 512), 200.0, 800.0, 1.23984, (255.2, 255.5))
    model = model_from_settings(SPHERES, 3)
    t0 = time.perf_counter()
    result = simulate_chunk({"model": model, "detector": detector, "dimensions": 3, "seed": 1,
                             "n_patterns": n_patterns, "n_particles": 1, "fluence": 1.0e4, "poisson": True})
    t_simulate = time.perf_counter() - t0
    path = folder / "patterns.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=result["data"])
    q = reciprocal_radial_points(min(0.3, detector.max_full_ring_q()), n_radial)
    shared = {"geometry": polar_geometry(detector, q, n_angles, True), "order": 2, "n_phi": n_angles,
              "dataset": "data", "intensity_limits": None}
    chunk = max(1, n_patterns // (2 * parallel.physical_cores()))
    tasks = [{"file": str(path), "start": s, "stop": min(n_patterns, s + chunk)} for s in range(0, n_patterns, chunk)]
    t0 = time.perf_counter()
    serial = add_sums(parallel.map(correlate_chunk, tasks, {"engine": "serial"}, shared=shared))
    t_serial = time.perf_counter() - t0
    t0 = time.perf_counter()
    spread = add_sums(parallel.map(correlate_chunk, tasks, {"engine": "local", "n_processes": "auto"}, shared=shared))
    t_local = time.perf_counter() - t0
    same = np.allclose(finish(serial, n_angles)[0], finish(spread, n_angles)[0])
    print(f"simulate_patterns 512²: {n_patterns / t_simulate:8.2f} patterns/s (one process, six spheres)")
    print(f"correlate 512², {n_radial} q × {n_angles} φ: {n_patterns / t_serial:8.2f} patterns/s in one process, "
          f"{n_patterns / t_local:8.2f} patterns/s on {parallel.physical_cores()} cores "
          f"(ratio {t_serial / t_local:.2f}; identical sums: {same})")


def bench_extract():
    q = reciprocal_radial_points(0.3, 48)
    model = model_from_settings(TETRAHEDRA, 3, np.random.default_rng(1))
    t0 = time.perf_counter()
    b = deg2_invariants_3d(model_intensity_coefficients(model, q, 24))
    t_model = time.perf_counter() - t0
    cc = invariants_to_cc(b, q, 3, 50, 1.23984)
    times = {}
    for method in ("back_substitution", "lstsq", "legendre"):
        t0 = time.perf_counter()
        extract_from_cc(cc, q, 3, 24, method, 1.23984, True, None, False)
        times[method] = time.perf_counter() - t0
    t0 = time.perf_counter()
    projection_matrices_3d(b)
    t_proj = time.perf_counter() - t0
    print(f"tutorial model invariants (48 q, L = 24): {t_model:.2f} s")
    print("extract on the tutorial grid: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items())
          + f"; projection matrices {t_proj * 1e3:.1f} ms")
    print(f"  lstsq / back_substitution time ratio: {times['lstsq'] / times['back_substitution']:.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patterns", type=int, default=32)
    parser.add_argument("--radial", type=int, default=64)
    parser.add_argument("--angles", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        bench_correlate(args.patterns, args.radial, args.angles, Path(folder))
    bench_extract()


if __name__ == "__main__":
    main()
