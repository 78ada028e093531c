"""Peak-memory estimates of the fxs commands, and their plans (xpr.memory's machinery).

Each estimate counts the arrays a command holds at each stage of its code (bytes per element of
the command's grids, named as in the code) and, where counting every temporary of a library call
is impractical (a phasing iteration, an alignment), the bytes per grid point measured with
tracemalloc; tests/fxs/test_memory_fxs.py and benchmarks/bench_memory.py compare the estimates
with measured peaks. Each plan compares the estimate with what the command may use
(`memory.available`: cgroup limit, MemAvailable) and shrinks what it can (the partial sums
correlate keeps in flight, the reconstructions phased per batch), logging a warning, or stops
with exit 2 naming the key, the estimate and the limit.

Units below: N radial points, L = max_order, n_Δ angles (n_f = n_Δ//2 + 1 frequencies), P
detector pixels, G grid points of a reconstruction (n_φ·n_θ·N in 3-D, n_φ·N in 2-D).
"""
from __future__ import annotations

from xpr import memory
from xpr.memory import Estimate


def _n(value) -> int:
    return max(int(value), 0)


# ---------------------------------------------------------------------------------------------
# simulate_ccd


def intensity_band(max_q: float, extent: float, max_order: int, dimensions: int) -> int:
    """The band to which `invariants.model_intensity_coefficients` samples the model intensity
    (its own rule: 2 q_max·extent + 16, at least L)."""
    import math

    band = int(math.ceil(2 * max_q * extent)) + 16
    return max(max_order, band) if dimensions == 2 else max(max_order, (band + max_order + 1) // 2)


def simulate_ccd(n_radial, max_order, dimensions=3, method="back_substitution", band=None) -> Estimate:
    """`fxs simulate_ccd`. Stages (U = (L+1)·N² elements of the invariants B_l):
    sampling the intensity -- per shell the directions of the angular grid of `band`
    (invariants.model_intensity_coefficients: 3-D (band+1)·2(band+1) points, 2-D 2(band+1)) and
    the model amplitude's temporaries there, ~190 bytes per point (measured), beside the
    coefficients I_lm (complex128, N(L+1)(2L+1));
    the invariants -- I_lm, the per-order copy and its conjugate (16 each) and B (16 U);
    the cross-correlation -- B (16 U), and by back_substitution / legendre the harmonic C_n
    (8 U), its rfft spectrum, that spectrum scaled (16·N²·n_f each) and C (8·N²·n_Δ); by lstsq
    C and one q1 row of Legendre polynomials ((L+1)·N·n_Δ float64, twice); 2-D the spectrum,
    its scaled copy and C."""
    n, L = _n(n_radial), _n(max_order)
    n_delta = 2 * (L + 1)
    n_f = n_delta // 2 + 1
    u = (L + 1) * n * n
    band = L if band is None else int(band)
    points = (band + 1) * 2 * (band + 1) if dimensions == 3 else 2 * (band + 1)
    coefficients = 16 * n * (L + 1) * (2 * L + 1) if dimensions == 3 else 16 * n * (2 * L + 1)
    estimate = Estimate()
    estimate.add("sampling the model intensity", {"coefficients I_lm": coefficients,
                                                  "one shell's directions and amplitudes": 190 * points})
    if dimensions == 3:
        estimate.add("computing the invariants", {"I_lm, per-order copy and conjugate": 3 * coefficients,
                                                  "B_l": 16 * u})
    else:
        estimate.add("computing the invariants", {"I_n": coefficients, "B_n": 16 * u})
    cc = 8 * n * n * n_delta
    if dimensions == 3 and method == "lstsq":
        parts = {"B_l": 16 * u, "C": cc, "Legendre rows": 16 * (L + 1) * n * n_delta}
    elif dimensions == 3:
        parts = {"B_l": 16 * u, "C_n": 8 * u, "spectrum and its scaled copy": 32 * n * n * n_f, "C": cc}
    else:
        parts = {"B_n": 16 * u, "spectrum and its scaled copy": 32 * n * n * n_f, "C": cc}
    estimate.add("computing the cross-correlation", parts)
    return estimate


def plan_simulate_ccd(settings, log=None, limit=None):
    """Stop (exit 2, key grid.n_radial_points) when simulate_ccd of these settings would not fit."""
    grid = settings.grid
    import numpy as np

    from xpr.errors import XprUserError
    from xpr.fxs.models import model_from_settings

    try:       # the model's extent sets the band its intensity is sampled to
        model = model_from_settings(settings.shapes, settings.dimensions, np.random.default_rng(0))
        band = intensity_band(float(grid.max_q), model.extent, int(grid.max_order), int(settings.dimensions))
    except (XprUserError, ValueError, TypeError, KeyError):
        band = None            # a malformed model: the worker reports it, with its key
    estimate = simulate_ccd(grid.n_radial_points, grid.max_order, int(settings.dimensions),
                            str(settings.cross_correlation.method), band)
    limit = limit or memory.available()
    what = f"simulating invariants of {grid.n_radial_points} radial points up to order {grid.max_order}"
    memory.require(estimate, limit, "grid.n_radial_points", what,
                   "fewer grid.n_radial_points or a lower grid.max_order")
    memory.log_plan(log, what, estimate, limit)
    return estimate


# ---------------------------------------------------------------------------------------------
# correlate


FRAME_BYTES_PER_PIXEL = 44     # see correlate(): the frame as read, as float64, its valid mask,
#                                the cleaned copy, the spline coefficients, the checks' masks


def correlate(n_radial, n_phi, pixels, workers=1, engine="serial", frame_itemsize=8) -> Estimate:
    """`fxs correlate`, items = partial sums held by the client (in_flight × workers with
    processes). A set of partial sums is Σ F F* and Σ G G* (complex128, 2·16·N²·n_f = 32 S).
    Stages: correlating -- the running total (32 S); in each worker process the chunk's own
    sums (32 S), one pattern's outer product F(q1) F*(q2) (16 S) and the frame: as read
    (itemsize), as float64, its valid-pixel mask, the cleaned copy, map_coordinates' spline
    coefficients and the junk check's masks (~44 bytes per pixel); with processes each held
    result (32 S); finishing -- the total, the kept orders' copy (16 S), the two irfft outputs,
    the quotient and C (8·N²·n_Δ each) and the valid-pair mask (1·N²·n_Δ)."""
    n, n_phi = _n(n_radial), _n(n_phi)
    n_f = n_phi // 2 + 1
    s = n * n * n_f
    real = n * n * n_phi
    frame = (FRAME_BYTES_PER_PIXEL - 8 + int(frame_itemsize)) * int(pixels)
    in_process = engine == "serial"
    estimate = Estimate()
    worker = {"chunk sums": 32 * s, "one pattern's outer product": 16 * s, "frame and its masks": frame}
    if in_process:
        estimate.add("correlating", dict({"running total": 32 * s}, **worker))
    else:               # local processes share this machine; dask workers run on theirs
        here = int(workers) if engine == "local" else 0
        estimate.add("correlating", {"running total": 32 * s,
                                     f"{here} worker process(es): chunk sums, products, frames":
                                         here * sum(worker.values())},
                     {"partial sums held": 32 * s})
    estimate.add("finishing", {"running total": 32 * s, "kept orders": 16 * s,
                               "inverse transforms, quotient, C and mask": 4 * 8 * real + real})
    return estimate


def correlate_workers(settings, n_tasks) -> tuple[int, str]:
    """(worker processes, engine as run: serial/local/dask) for n_tasks chunks."""
    from xpr import parallel

    spread = settings.multi_process
    engine = str(parallel.SpreadOptions.from_block(spread).engine)
    workers = parallel.n_workers(spread, n_tasks) if engine != "serial" else 1
    if engine == "local" and (workers == 1 or n_tasks <= 1):
        engine = "serial"
    return workers, engine


def plan_correlate(settings, pixels, n_tasks, frame_itemsize=8, log=None, limit=None) -> int:
    """The partial sums per worker correlate may keep in flight (multi_process.in_flight, or
    fewer when they would not fit: logged); exit 2 when even one per worker does not fit, naming
    multi_process.n_processes (fewer would fit) or grid.n_radial_points."""
    from xpr import parallel

    limit = limit or memory.available()
    n, n_phi = int(settings.grid.n_radial_points), int(settings.n_angular_points)
    workers, engine = correlate_workers(settings, n_tasks)
    wanted = int(settings.multi_process.get("in_flight", parallel.IN_FLIGHT) or parallel.IN_FLIGHT)
    estimate = correlate(n, n_phi, pixels, workers, engine, frame_itemsize)
    what = f"correlating on {n} radial x {n_phi} angular points"
    if engine == "serial":
        memory.require(estimate, limit, "grid.n_radial_points", what,
                       "fewer grid.n_radial_points or n_angular_points")
        memory.log_plan(log, what, estimate, limit)
        return wanted
    held = workers * wanted if engine == "local" else wanted
    fitting = memory.largest_batch(estimate, limit, held)
    per_worker = fitting // workers if engine == "local" else fitting
    if per_worker < 1:
        one = correlate(n, n_phi, pixels, 1, "serial", frame_itemsize)
        if engine == "local" and workers > 1 and one.bytes() <= memory.USABLE_FRACTION * limit.bytes:
            memory.refuse(estimate.describe(workers), limit, "multi_process.n_processes", what,
                          f"fewer processes than {workers}")
        memory.refuse(estimate.describe(workers if engine == "local" else 1), limit,
                      "grid.n_radial_points", what, "fewer grid.n_radial_points or n_angular_points")
    batch = per_worker * workers if engine == "local" else per_worker
    if per_worker < wanted and log is not None:
        log.warning("memory: %d partial sums in flight per worker (%s) would exceed %.0f%% of %s: "
                    "%d per worker instead", wanted, estimate.describe(held), 100 * memory.USABLE_FRACTION,
                    limit, per_worker)
    memory.log_plan(log, what, estimate, limit, batch)
    return min(per_worker, wanted)


# ---------------------------------------------------------------------------------------------
# extract


def extract(n_radial, n_delta, max_order, dimensions=3, method="back_substitution", file_invariants=0,
            odd_orders_zero=True) -> Estimate:
    """`fxs extract` (U = (L+1)·N²). The data as read: C (8·N²·n_Δ) and, when the file holds
    them (simulate_ccd's), its exact invariants (file_invariants bytes). Stages: extracting --
    C's copy, its Fourier coefficients scaled by 1/n_Δ (16·N²·(n_Δ//2+1), kept whole by the
    slice of orders), back substitution's residual and B (16 U each) and one order's coupling
    products (~12 U); lstsq: B (8 U) and per q1 row the design matrix, its weighted copy and Q
    (3·8·N·n_Δ·(L+1)); rebuilding B from the projection matrices -- B, masks (U), V_l and the
    per-order products V_l V_l† with their stacked copy (2·16 U); the error estimate -- B, the
    rebuilt B, the estimate (16 U each), the nonzero mask and three gathered copies of the
    nonzero entries (48 per entry of the orders kept: even orders only with odd orders zero)."""
    n, n_delta, L = _n(n_radial), _n(n_delta), _n(max_order)
    u = (L + 1) * n * n
    cc = 8 * n * n * n_delta
    data = {"C and the file's B_l as read": cc + int(file_invariants)}
    projections = 16 * n * sum(min(n, 2 * l + 1) for l in range(L + 1)) if dimensions == 3 else 16 * n * (L + 1)
    kept_orders = (L // 2 + 1) if odd_orders_zero else (L + 1)
    estimate = Estimate()
    if dimensions == 3 and method == "lstsq":
        estimate.add("extracting B_l", dict(data, **{"C's copy": cc, "B_l": 8 * u,
                                                     "one row's design and QR": 3 * 8 * n * n_delta * (L + 1)}))
    else:
        parts = dict(data, **{"C's copy": cc, "scaled spectrum": 16 * n * n * (n_delta // 2 + 1)})
        if dimensions == 3:
            parts.update({"residual and B_l": 32 * u, "one order's coupling products": 12 * u})
        else:
            parts.update({"B_n": 16 * u})
        estimate.add("extracting B_l", parts)
    held = dict(data, **{"B_l": 16 * u, "masks": u, "V_l": projections})
    estimate.add("rebuilding B_l from V_l", dict(held, **{"V_l V_l† and their stack": 32 * u}))
    estimate.add("estimating the errors", dict(held, **{"rebuilt B_l and the error": 32 * u, "nonzero mask": u,
                                                        "gathered entries": 48 * kept_orders * n * n}))
    return estimate


def ccd_header(path, dataset="I1I1"):
    """(N, n_Δ, bytes of the file's B_l) of a ccd.h5 from its header; None when the file cannot
    tell (read_ccd then says what is wrong with it)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            shape = f["cross_correlation"][dataset].shape
            name = f"deg_2_invariant/{dataset}"
            invariants = f[name].size * f[name].dtype.itemsize if name in f else 0
    except (OSError, KeyError, TypeError, AttributeError):
        return None
    if len(shape) != 3:
        return None
    return int(shape[0]), int(shape[2]), int(invariants)


def plan_extract(settings, path, log=None, limit=None):
    """Stop (exit 2) before reading a cross-correlation whose extraction would not fit: key
    max_order when a lower order would fit, else input.ccd_file (too large for this machine)."""
    header = ccd_header(path)
    if header is None:
        return None
    n, n_delta, invariants = header
    opt = settings.cross_correlation.datasets.I1I1
    L, dims = int(settings.max_order), int(settings.dimensions)
    args = dict(dimensions=dims, method=str(opt.bl_extraction_method), file_invariants=invariants,
                odd_orders_zero=bool(opt.assume_zero_odd_orders))
    limit = limit or memory.available()
    estimate = extract(n, n_delta, L, **args)
    what = f"extracting B_l up to order {L} from a {n}x{n}x{n_delta} cross-correlation"
    usable = memory.USABLE_FRACTION * limit.bytes
    if estimate.bytes() > usable:
        if extract(n, n_delta, 0, **args).bytes() <= usable:
            memory.refuse(estimate.describe(), limit, "max_order", what, "a lower max_order")
        memory.refuse(estimate.describe(), limit, "input.ccd_file", what,
                      "the cross-correlation is too large for this machine", file=path, settings=False)
    memory.log_plan(log, what, estimate, limit)
    return estimate


# ---------------------------------------------------------------------------------------------
# reconstruct


def grid_points(dimensions, n_radial, n_phi, n_theta=1) -> int:
    return _n(n_phi) * (_n(n_theta) if dimensions == 3 else 1) * _n(n_radial)


REPEAT_BYTES = {4: 78, 8: 114}    # per grid point and reconstruction at work, by real itemsize (measured)
RESULT_BYTES = {4: 22, 8: 44}     # per grid point of one finished result (measured)
FIGURES = 12 * 1024 ** 2           # the figures' matplotlib objects (measured, about constant)


def reconstruct(dimensions, n_radial, max_order, n_phi, n_theta, n_reconstructions, workers=1,
                engine="serial", real_itemsize=4, vtk=True, on_gpu=False, plots=True) -> Estimate:
    """`fxs reconstruct`, items = reconstructions phased at once in one batch. Stages:
    phasing -- in each worker the transforms (forward and inverse Hankel matrices, (L+1)·N² in
    3-D, (2L+1)·N² in 2-D, and the float64 arrays they are built from: ~40 bytes per element),
    and per reconstruction at work the iterate, its support, the engine's copies, the harmonic
    and Hankel intermediates of the projections and the tracker's best density and support
    (REPEAT_BYTES per grid point, measured; on a GPU these live in device memory, not counted
    here); in this process the finished results: the best, last and initial densities, the two
    amplitudes and the two supports (RESULT_BYTES per grid point, measured) and the invariants
    B_l of each (complex128, (L+1)·N²); finishing -- the results, the figures and the VTK files'
    float64 copies of three reconstructions (3-D). Workers of the dask engine run on their own
    machines: only the results are counted here then."""
    g = grid_points(dimensions, n_radial, n_phi, n_theta)
    n, L = _n(n_radial), _n(max_order)
    orders = (L + 1) if dimensions == 3 else (2 * L + 1)
    r = int(real_itemsize)
    per_result = RESULT_BYTES[r] * g + 16 * (L + 1) * n * n
    results = per_result * int(n_reconstructions)
    per_worker = {"serial": 1, "local": int(workers)}.get(engine, 0)     # dask workers: their own machines
    estimate = Estimate()
    estimate.add("phasing", {"finished results": results,
                             "transforms": per_worker * (2 * r + 40) * orders * n * n},
                 {"reconstruction at work": 0 if on_gpu else per_worker * REPEAT_BYTES[r] * g})
    estimate.add("finishing", {"results": results, "figures": FIGURES if plots else 0,
                               "VTK copies": 6 * 8 * g if (vtk and dimensions == 3) else 0})
    return estimate


def plan_reconstruct(grid, settings, real_itemsize=4, on_gpu=False, log=None, limit=None) -> int:
    """Reconstructions per batch: multi_process.batch_size when it fits, fewer when not
    (logged); exit 2 when even one at a time does not fit (key n_reconstructions when the
    results of all are what does not fit, multi_process.n_processes when fewer processes
    would fit, else grid.n_radial_grid_points)."""
    from xpr import parallel

    limit = limit or memory.available()
    n = int(settings.n_reconstructions)
    batch = max(1, min(int(settings.multi_process.batch_size), n))
    n_tasks = -(-n // batch)
    spread = settings.multi_process
    engine = str(parallel.SpreadOptions.from_block(spread).engine)
    workers = parallel.n_workers(spread, n_tasks) if engine != "serial" else 1
    if engine == "local" and (workers == 1 or n_tasks <= 1):
        engine = "serial"
    thetas = len(grid.thetas) if grid.dimensions == 3 else 1
    args = (grid.dimensions, grid.n_radial, grid.max_order, len(grid.phis), thetas)
    options = dict(real_itemsize=real_itemsize, vtk=bool(settings.output.vtk), on_gpu=on_gpu,
                   plots=bool(settings.output.plots))
    estimate = reconstruct(*args, n, workers, engine, **options)
    shape = "x".join(map(str, grid.angular_shape + (grid.n_radial,)))
    what = f"phasing {n} reconstructions on a {shape} grid"
    usable = memory.USABLE_FRACTION * limit.bytes
    fitting = memory.largest_batch(estimate, limit, batch)
    if fitting == 0:
        if estimate.stage_bytes("finishing") > usable:
            key, hint = "n_reconstructions", "fewer reconstructions per run (average several runs with `fxs average`)"
        elif engine == "local" and workers > 1 and \
                reconstruct(*args, n, 1, "serial", **options).bytes(1) <= usable:
            key, hint = "multi_process.n_processes", f"fewer processes than {workers}"
        else:
            key, hint = "grid.n_radial_grid_points", "a smaller grid (n_radial_grid_points, max_order, n_phi, n_theta)"
        memory.refuse(estimate.describe(1), limit, key, what, hint)
    if fitting < batch and log is not None:
        log.warning("memory: batches of %d reconstructions (%s) would exceed %.0f%% of %s: batches of "
                    "%d instead", batch, estimate.describe(batch), 100 * memory.USABLE_FRACTION, limit, fitting)
    memory.log_plan(log, f"{what} in batches of {fitting}", estimate, limit, fitting)
    return fitting


# ---------------------------------------------------------------------------------------------
# average


ALIGN_BYTES = 75      # per grid point and selected density, measured: ~50 in a fresh process, ~100
#                       in one that ran other commands first (the alignment's cyclic garbage is
#                       collected later there); see average()


def average(file_bytes, dimensions, n_radial, max_order, n_phi, n_theta, n_selected, plots=True) -> Estimate:
    """`fxs average`, items = reconstructions selected. The data.h5 files are read whole
    (file_bytes: the sum of their datasets); then per selected reconstruction the density as
    float64, its normalised, centred and aligned copies, its amplitude (complex128) in the
    PRTF's stack and the alignment's working arrays (ALIGN_BYTES per grid point, measured),
    beside the transforms (float64 Hankel matrices and the arrays they are built from, ~48
    bytes per element of (L+1)·N² in 3-D, (2L+1)·N² in 2-D) and the figures."""
    g = grid_points(dimensions, n_radial, n_phi, n_theta)
    n, L = _n(n_radial), _n(max_order)
    orders = (L + 1) if dimensions == 3 else (2 * L + 1)
    estimate = Estimate()
    estimate.add("aligning and averaging", {"data.h5 files": int(file_bytes),
                                            "transforms": 48 * orders * n * n,
                                            "figures": FIGURES if plots else 0},
                 {"selected density": ALIGN_BYTES * g})
    return estimate


def reconstructions_header(paths):
    """(file bytes, dimensions, N, L, n_phi, n_theta, reconstructions) of reconstruct data.h5
    files from their headers; None when they cannot tell (the worker's reader then says why)."""
    import h5py

    try:
        total = sum(memory.h5_bytes(p) for p in paths)
        count = 0
        for p in paths:
            with h5py.File(p, "r") as f:
                count += len(f["reconstruction_results"])
        with h5py.File(paths[0], "r") as f:
            config = f["configuration"]
            grid = config["internal_grid"]
            dims = int(config["dimensions"][()])
            sizes = (dims, len(grid["real_radii"]), int(config["max_order"][()]), len(grid["phis"]),
                     len(grid["thetas"]) if dims == 3 else 1)
    except (OSError, KeyError, TypeError, ValueError, IndexError):
        return None
    return (total,) + sizes + (count,)


def plan_average(settings, paths, log=None, limit=None):
    """Stop (exit 2) before reading reconstructions whose alignment would not fit: key
    selection.n_reconstructions when fewer would fit, else reconstruction_files."""
    header = reconstructions_header(paths) if paths else None
    if header is None:
        return None
    total, dims, n, L, n_phi, n_theta, count = header
    selection = settings.selection
    wanted = len(selection.manual_specifier) if selection.method == "manual" \
        else min(int(selection.n_reconstructions), count)
    limit = limit or memory.available()
    estimate = average(total, dims, n, L, n_phi, n_theta, wanted, bool(settings.output.plots))
    what = f"aligning {wanted} reconstructions of {len(paths)} file(s) ({memory.size(total)} of data)"
    if estimate.bytes(wanted) > memory.USABLE_FRACTION * limit.bytes:
        if selection.method != "manual" and memory.largest_batch(estimate, limit, wanted) >= 1:
            memory.refuse(estimate.describe(wanted), limit, "selection.n_reconstructions", what,
                          f"at most {memory.largest_batch(estimate, limit, wanted)} reconstructions")
        memory.refuse(estimate.describe(wanted), limit, "reconstruction_files", what,
                      "fewer or smaller reconstruction files")
    memory.log_plan(log, what, estimate, limit, wanted)
    return estimate


# ---------------------------------------------------------------------------------------------
# simulate_patterns

# bytes per detector pixel of one pattern at work (q vectors, solid angles, the summed intensity
# and the model's amplitude temporaries, the expected counts and their Poisson draw), measured
# with tracemalloc on tetrahedra (the tutorial's model), 128² and 256² detectors: 506-514 in
# 2-D, 784-793 in 3-D
PATTERN_WORK_BYTES = {2: 520, 3: 800}


def simulate_patterns(pixels, chunk_size, dimensions=3, workers=1) -> Estimate:
    """`fxs simulate_patterns`, items = chunks held until written (a batch of chunks is made at
    once). Each of `workers` tasks holds its chunk (float32) and one pattern at work; the
    finished chunks of a batch wait to be written."""
    P, c = _n(pixels), _n(chunk_size)
    return Estimate().add("simulating", {
        "patterns at work": _n(workers) * PATTERN_WORK_BYTES[int(dimensions)] * P,
        "chunks being made": _n(workers) * 4 * c * P}, {"chunk waiting to be written": 4 * c * P})


def plan_simulate_patterns(settings, n_tasks, log=None, limit=None) -> int:
    """Chunks made per batch (4 per worker, fewer when they would not fit, logged); exit 2 when
    not even one chunk per worker fits, naming multi_process.n_processes, chunk_size or the
    detector."""
    from xpr import parallel

    rows, columns = (int(v) for v in settings.detector.image_dimensions)
    pixels, chunk = rows * columns, int(settings.chunk_size)
    spread = settings.multi_process
    serial = parallel.SpreadOptions.from_block(spread).engine == "serial"
    workers = 1 if serial else parallel.n_workers(spread, n_tasks)
    estimate = simulate_patterns(pixels, chunk, settings.dimensions, workers)
    limit = limit or memory.available()
    wanted = 4 * workers
    what = f"simulating patterns of {rows}x{columns} px in chunks of {chunk} on {workers} worker(s)"
    batch = memory.largest_batch(estimate, limit, wanted)
    if batch == 0:
        key, hint = ("multi_process.n_processes", "fewer processes") if workers > 1 else \
            (("chunk_size", "smaller chunks") if chunk > 1 else ("detector.image_dimensions", "a smaller detector"))
        memory.refuse(estimate.describe(1), limit, key, what, hint)
    if batch < wanted and log is not None:
        log.warning("memory: %d chunks at once (%s) would exceed %.0f%% of %s: %d at once instead",
                    wanted, estimate.describe(wanted), 100 * memory.USABLE_FRACTION, limit, batch)
    memory.log_plan(log, what, estimate, limit, batch)
    return batch
