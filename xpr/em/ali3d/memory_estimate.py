"""Peak-memory estimate of `local_ali3d`, checked before the run folder exists.

Counted from xpr.em.ali3d (box n, padding p = alignment.npad, kernel width w, g rotations of the
point group, G = (p n + 2⌊w/2⌋ + 3)³ points of a Fourier accumulator grid), as the larger of two
stages of the main process:

* inserting images: the stack and its prepared float32 copy (8 bytes per image pixel); the two
  half sets' accumulators (D complex128, T and N float64: 32 bytes per grid point each) and the
  grid being filled (a half set inserted afresh, or a chunk's take-out), which the compiled
  spreading loop (xpr.em.ali3d.spreading) adds into in place; and, where a half set's insertion
  is split between threads (reconstruct.threaded: more kernel contributions, π (p n / 2)² / 2 ×
  w³ × g per image, than 32 per grid point), a grid of their own for each thread (32 G each);
* reconstructing the half volumes: the stack, the accumulators, their union and the volume's
  transforms in grid_to_volume: ≈ 150 bytes per grid point in all -- the two half sets'
  accumulators (64), their residual corrections' D (32), their union (32) and grid_to_volume's
  transforms (17 measured with tracemalloc; 180 in all before the queue of the residuals'
  insertion gave way to the compiled loop);
* in both, per worker process (one in the serial engine) 32 G for its share (its projector and
  search buffers).

(Measured, 100 images of 32², serial: 47 MB traced above a 20-image run of 16²; 97.6 MB, in the
insertion stage, while kernel contributions were queued for np.bincount.)
The worker processes are the batch that shrinks: fewer are used when the estimate with
multi_process.n_processes would not fit; exit 2 when not even one fits.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from xpr import memory
from xpr.em.ali3d.reconstruct import insertion_threads, threaded

GRID_BYTES_PARENT = 150        # per grid point: the half-set accumulators, their union, the volume's transforms
GRID_BYTES_WORKER = 32         # per grid point: one accumulator grid (D, T, N)


def local_ali3d(n_images, box, npad=2, kernel_width=3, group_size=1, threads=None, ctf=False) -> memory.Estimate:
    """(npad, kernel_width: the settings' defaults.)
    Items = worker processes; `threads`: the cores an insertion may split a half set's images
    between (reconstruct.insertion_threads; default: this process's)."""
    n_images, box, npad, width = int(n_images), int(box), int(npad), int(kernel_width)
    side = npad * box + 2 * (width // 2) + 3
    grid = side ** 3
    radius = npad * box // 2 - 1
    per_image = int(math.pi * radius * radius / 2) * width ** 3 * int(group_size)
    half_set = -(-n_images // 2)
    threads = int(threads or insertion_threads(half_set)) if threaded(half_set * per_image, grid) else 1
    stack = 8 * n_images * box * box
    worker = {"worker's share": GRID_BYTES_WORKER * grid}
    estimate = memory.Estimate().add("inserting images", {
        "stack and prepared copy": stack,
        "half-set grids and the grid being filled": 3 * GRID_BYTES_WORKER * grid,
        "insertion threads' own sums": GRID_BYTES_WORKER * grid * threads if threads > 1 else 0,
    }, worker)
    return estimate.add("reconstructing the half sets", {
        "stack and prepared copy": stack,
        "half-set grids and volume transforms": GRID_BYTES_PARENT * grid,
    }, worker)


def stack_shape(settings):
    """(images, box) from the settings (a simulated phantom) or the stack file's header; None
    where only reading tells (images named by a STAR table; the worker then checks)."""
    inp = settings["input"]
    if inp.get("stack") is None:
        if inp.get("parameters") is not None:
            return None
        sim = inp["simulate"]
        return int(sim["n_images"]), int(sim["box"])
    path = Path(str(inp["stack"])).expanduser()
    suffix = path.suffix.lower()
    try:
        if suffix in (".mrcs", ".mrc", ".st"):
            import mrcfile
            with mrcfile.open(path, permissive=True, header_only=True) as mrc:
                header = mrc.header
                return int(header.nz), int(header.nx)
        if suffix == ".npy":
            shape = np.load(path, mmap_mode="r").shape
        elif suffix in (".h5", ".hdf5"):
            import h5py
            with h5py.File(path, "r") as handle:
                shape = handle["images"].shape
        else:
            return None
    except (OSError, KeyError, ValueError):
        return None
    return (int(shape[0]), int(shape[-1])) if len(shape) == 3 else None


def plan(settings, log=None, limit=None, shape=None):
    """The multi_process settings to run with: n_processes lowered to what fits (logged), or
    exit 2 naming input.simulate.box / input.stack when not even one worker fits."""
    from xpr import parallel
    from xpr.em.ali3d.symmetry import point_group

    spread = settings.get("multi_process")
    shape = shape or stack_shape(settings)
    if shape is None:
        return spread
    n_images, box = shape
    ali = settings["alignment"]
    group = point_group(ali["sym"], "alignment.sym")
    engine = parallel.SpreadOptions.from_block(spread).engine
    workers = 1 if engine == "serial" else parallel.n_workers(spread, n_images)
    threads = max(1, parallel.available_cpus() // workers)      # each worker's share of the cores
    estimate = local_ali3d(n_images, box, ali["npad"], ali["kernel_width"], len(group), threads,
                           str(ali.get("CTF", "none")) != "none")
    limit = limit or memory.available()
    what = f"local_ali3d on {n_images} images of {box}x{box} px"
    fitting = memory.largest_batch(estimate, limit, workers)
    if fitting == 0:
        key = "input.stack" if settings["input"].get("stack") is not None else "input.simulate.box"
        memory.refuse(estimate.describe(1), limit, key, what + " with one worker process",
                      "a smaller box (binned images)", settings=key != "input.stack")
    memory.log_plan(log, what + f" with {fitting} worker process{'es' if fitting > 1 else ''}",
                    estimate, limit, fitting)
    if fitting < workers:
        if log is not None:
            log.warning("memory: %d worker processes instead of %d to fit", fitting, workers)
        return dict(spread or {}, n_processes=fitting)
    return spread
