"""local_ali3d: seconds per refinement iteration, criterion evaluations per image, and their parts.

Data: `xpr.em.ali3d.phantom.simulate` — 10 Gaussian blobs, SNR 1, angles 3° and shifts 1.5 px off;
default 500 images of 64² (the issue's benchmark; the SPARX-like numpy prototype took 35 s per
iteration on 2 cores).  One iteration (chunk 0.2, all cores through xpr.parallel) is timed.

Printed, measured in this run: seconds per iteration; criterion evaluations per image; the time of
one criterion evaluation (projection + masked correlation) and of one full reconstruction, and the
iteration time divided by (images × evaluations × one evaluation / cores) — the share of the
iteration spent in the simplex searches; and the angular / shift error before and after.
Never pass/fail on time.

    python benchmarks/bench_em_local_ali3d.py [--images 500] [--box 64] [--processes auto]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from xpr import parallel
from xpr.backend import cpu
from xpr.em.ali3d import local_ali3d as ali
from xpr.em.ali3d import euler, phantom
from xpr.em.ali3d.project import prepare_projector
from xpr.em.ali3d.refine import masked_ccc, normalise_in_mask, single_threaded_backend


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--processes", default="auto")
    parser.add_argument("--max-evaluations", type=int, default=200)
    args = parser.parse_args()
    processes = args.processes if args.processes == "auto" else int(args.processes)
    multi_process = {"engine": "local", "n_processes": processes}
    workers = parallel.n_workers(multi_process, 10 ** 6)
    backend = cpu()
    data = phantom.simulate(np.random.default_rng(0), args.images, args.box, snr=1.0, backend=backend)
    options = ali.Ali3dOptions(ou=args.box // 2 - 2, maxit=1, chunk=0.2, max_evaluations=args.max_evaluations)
    truth = (data.true_angles, data.true_shifts)

    start = time.perf_counter()
    state = ali.local_ali3d(data.images, data.start_angles, data.start_shifts, options, backend=backend,
                            multi_process=multi_process, truth=truth)
    seconds = time.perf_counter() - start
    evaluations = np.mean([h["evaluations_per_image"] for h in state.history])
    radius = state.history[-1]["slice_radius_px"]

    projector = prepare_projector(state.reference, backend, radius=radius)
    small = single_threaded_backend()
    mask = np.zeros((args.box, args.box), bool)
    axis = np.arange(args.box) - args.box // 2
    mask[axis[:, None] ** 2 + axis[None, :] ** 2 <= options.ou ** 2] = True
    target = normalise_in_mask(data.images[0], mask)
    matrices = euler.rotation_matrices(*data.start_angles[:200].T)
    tick = time.perf_counter()
    for matrix in matrices:
        masked_ccc(projector.project(matrix, small, shift_px=(0.5, -0.5)), target, mask)
    one_evaluation = (time.perf_counter() - tick) / len(matrices)

    tick = time.perf_counter()
    grid = ali.fourier_sums(data.images, np.arange(args.images), None, (data.start_angles, data.start_shifts),
                            options, None)
    ali.reconstruction(grid, np.arange(args.images), (data.start_angles, data.start_shifts), data.images, options,
                       None, backend)
    reconstruction = time.perf_counter() - tick

    before = ali.parameter_errors(data.start_angles, data.start_shifts, truth, options.group)
    after = ali.parameter_errors(state.angles, state.shifts_px, truth, options.group)
    search = args.images * evaluations * one_evaluation / workers
    print(f"images {args.images} of {args.box}², {workers} worker process(es), slice radius {radius:.0f} px")
    print(f"seconds per iteration            {seconds:8.2f}")
    print(f"criterion evaluations per image  {evaluations:8.1f}")
    print(f"one criterion evaluation (ms)    {1e3 * one_evaluation:8.3f}")
    print(f"one reconstruction, all images   {reconstruction:8.2f} s  (with its residual correction)")
    print(f"simplex share of the iteration   {search / seconds:8.2f}  (images × evaluations × evaluation / cores ÷ iteration)")
    print(f"iteration / prototype (35 s, 2 cores)  {seconds / 35.0:6.2f}  (different machine: indicative only)")
    print(f"angular error  {before[0]:.2f}° -> {after[0]:.2f}°   shift error  {before[1]:.2f} px -> {after[1]:.2f} px")


if __name__ == "__main__":
    main()
