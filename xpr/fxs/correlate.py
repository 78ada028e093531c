"""fxs correlate: single-shot patterns → averaged angular cross-correlation (ccd.h5).

1. Geometry: each pattern is sampled on the polar grid (q_k, φ_j), q_k = (k+½)·max_q/N,
   φ_j = 2πj/n_φ, at the detector positions where these momentum transfers are recorded
   (``detector``), by spline interpolation of the given order. Points off the detector or on
   masked pixels (negative or non-finite values) are masked. With ``solid_angle_correction`` the
   samples are divided by the pixel solid angle ΔΩ(q) (photons per sr).
2. ``is_good``: a pattern is used if it is finite and (with ``intensity_filter.use``) its mean
   over the polar samples lies in [min_mean, max_mean]. Junk is refused, not skipped: every
   frame, as it is read, is checked (``xpr.io.checks.check_intensities``: real numbers, some
   finite pixel, some positive signal; NaN/inf pixels count as masked); the first junk frame in
   file order stops the run with exit 2 naming the file, the frame index and what is wrong,
   before ccd.h5 is written.
3. ``waxs_aver``: Ī(q) = Σ_p Σ_φ m I / Σ_p Σ_φ m.
4. ``ccf_q1q2``: with F_p(q, n) the FFT over φ of m·I and G_p of the mask m,

       C(q1, q2, Δ) = Σ_p IFFT[F_p(q1) F_p*(q2)](Δ) / Σ_p IFFT[G_p(q1) G_p*(q2)](Δ)
                    = ⟨I(q1, φ+Δ) I(q2, φ)⟩ over patterns and valid φ,

   the convention of ``invariants`` (C_n = B_n). Orders above ``fc_n_max`` can be dropped.
Patterns are processed in chunks spread over processes or a dask cluster (``multi_process``).
Memory (``memory_plan.correlate``): the partial sums are 2·16·N²·(n_φ//2+1) bytes each; before
the chunks start, the sums held at once (the running total, each worker's, and in_flight per
worker waiting) are compared with the memory the run may use, and in_flight is lowered (logged)
or the run refused (exit 2) when even one per worker would not fit.
Each chunk returns its partial sums (Σ F F*, Σ G G*, Σ m I, Σ m and the pattern counts); the
client adds them in chunk order as they arrive and drops them (``parallel.reduce``: at most
``multi_process.in_flight`` × workers chunks in flight or waiting for an earlier one), so memory
does not grow with the number of patterns and the result is bit for bit the same whatever the
engine or the number of processes. A chunk that still fails after ``multi_process.retries``
(unreadable file, lost worker) is logged and recorded in ccd.h5 (``failed_chunks``: file, first
and last pattern index, error); its patterns are left out, and the run fails only when fewer than
``multi_process.min_success`` chunks succeeded (ccd.h5 of the others is then still written into
the failed, unlinked run folder).
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from scipy.ndimage import map_coordinates

from xpr import parallel
from xpr.backend import cpu, cpu_only
from xpr.errors import InputError
from xpr.io import load_tree
from xpr.io.checks import check_intensities, check_stack
from . import cross_correlation as ccd_file
from . import memory_plan
from .detector import MM_TO_A, UM_TO_A, Detector
from .grids import reciprocal_radial_points


# ------------------------------------------------------------- inputs

def pattern_sources(settings, archive):
    """(list of pattern files, dataset name, Detector, number_of_particles)."""
    given_list = settings.input.pattern_list
    if given_list:
        list_path = Path(str(given_list)).expanduser()
        if not list_path.is_file():
            raise InputError("pattern list not found", file=list_path, key="input.pattern_list")
        lines = [ln.strip() for ln in list_path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        files = [(Path(ln) if Path(ln).is_absolute() else list_path.parent / ln) for ln in lines]
        detector = Detector.from_settings(settings.detector)
        dataset, n_particles = settings.input.dataset, 1
        origin = list_path
    else:
        main = settings.input.patterns_file
        main = Path(str(main)).expanduser() if main else \
            archive.home.data / "fxs" / "patterns" / f"{settings.dimensions}d_{settings.structure_name}.h5"
        if not main.exists():
            raise InputError("patterns file not found (run `xpr fxs simulate_patterns` first, or set "
                             "input.patterns_file or input.pattern_list)", file=main, key="input.patterns_file")
        tree = load_tree(main)
        folder = main.resolve().parent
        files = [folder / name for name in tree["pattern_files"]]
        det = tree["detector"]
        detector = Detector(tuple(int(v) for v in det["image_dimensions"]), float(det["pixel_size"]),
                            float(det["sample_distance"]), float(det["wavelength"]),
                            tuple(float(v) for v in det["detector_origin"]))
        detector.check(file=main, key_prefix="detector")
        dataset, n_particles = str(tree.get("dataset", "data")), int(tree.get("number_of_particles", 1))
        origin = main
    if not files:
        raise InputError("no pattern files listed", file=origin, key="input")
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise InputError(f"{len(missing)} of {len(files)} pattern files are missing, e.g. {missing[0]}",
                         file=origin, key="input")
    return [str(f) for f in files], dataset, detector, n_particles


def pattern_counts(files, dataset, detector, dtypes=None):
    """Frames in each file (their dtypes appended to `dtypes` when given); the dataset's shape
    and dtype, and its first and last frame, checked."""
    counts = []
    for f in files:
        try:
            with h5py.File(f, "r") as h:
                if dataset not in h:
                    raise InputError(f"no dataset '{dataset}' in the pattern file", file=f, key="input.dataset")
                shape = h[dataset].shape
                if dtypes is not None:
                    dtypes.append(h[dataset].dtype)
                check_stack(h[dataset], file=f, key="input.dataset", what="pattern intensities",
                            nonfinite_masked=True, negative_masked=True)
        except OSError as err:
            raise InputError(f"not a readable HDF5 pattern file ({err})", file=f) from None
        frames = shape if len(shape) == 3 else (1,) + tuple(shape)
        if tuple(frames[1:]) != tuple(detector.shape):
            raise InputError(f"patterns are {frames[1]}×{frames[2]} pixels but the detector is "
                             f"{detector.shape[0]}×{detector.shape[1]}", file=f, key="detector.image_dimensions")
        counts.append(frames[0])
    return counts


# ------------------------------------------------------------- polar sampling and sums

def polar_geometry(detector: Detector, q, n_phi: int, solid_angle_correction: bool) -> dict:
    phis = 2 * np.pi * np.arange(n_phi) / n_phi
    coordinates = detector.polar_coordinates(q, phis)
    inside = detector.polar_inside(q, phis)
    radius = detector.radius_of_q(q)
    distance = detector.sample_distance * MM_TO_A
    solid_angle = (detector.pixel_size * UM_TO_A) ** 2 * distance / (radius ** 2 + distance ** 2) ** 1.5
    scale = 1 / solid_angle if solid_angle_correction else np.ones_like(radius)
    return {"coordinates": coordinates, "inside": inside, "scale": scale}


def sample_polar(image, geometry, order: int):
    """(I (N_q, n_φ), mask) of one detector image on the polar grid."""
    image = np.asarray(image, dtype=np.float64)
    valid_pixels = np.isfinite(image) & (image >= 0)
    clean = np.where(valid_pixels, image, 0.0)
    coords = geometry["coordinates"]
    values = map_coordinates(clean, coords, order=order, mode="nearest", prefilter=order > 1)
    if valid_pixels.all():
        mask = geometry["inside"].copy()
    else:
        weight = map_coordinates(valid_pixels.astype(float), coords, order=1, mode="constant", cval=0.0)
        mask = geometry["inside"] & (weight > 1 - 1e-9)
    return values * geometry["scale"][:, None], mask


def correlate_chunk(task, shared) -> dict:
    """Partial sums of one chunk of patterns (module level, for processes)."""
    geometry, order, n_phi = shared["geometry"], shared["order"], shared["n_phi"]
    n_q = geometry["coordinates"].shape[1]
    n_freq = n_phi // 2 + 1
    sums = {"ccf": np.zeros((n_q, n_q, n_freq), np.complex128),
            "mask_ccf": np.zeros((n_q, n_q, n_freq), np.complex128),
            "intensity": np.zeros(n_q), "weight": np.zeros(n_q), "n_good": 0, "n_bad": 0}
    limits = shared["intensity_limits"]
    fft = cpu()
    with h5py.File(task["file"], "r") as h:
        data = h[shared["dataset"]]
        for index in range(task["start"], task["stop"]):
            image = data[index] if data.ndim == 3 else data[()]
            junk = frame_problem(image, task["file"], index if data.ndim == 3 else None)
            if junk is not None:           # handed to the client, which refuses the run (exit 2)
                sums["junk"] = [junk]
                return sums
            values, mask = sample_polar(image, geometry, order)
            good = np.all(np.isfinite(values[mask]))
            if good and limits is not None and mask.any():
                mean = values[mask].mean()
                good = limits[0] <= mean <= limits[1]
            if not good:
                sums["n_bad"] += 1
                continue
            m = mask.astype(float)
            f = fft.rfft(values * m, axis=-1)
            g = fft.rfft(m, axis=-1)
            sums["ccf"] += f[:, None, :] * np.conj(f[None, :, :])
            sums["mask_ccf"] += g[:, None, :] * np.conj(g[None, :, :])
            sums["intensity"] += (values * m).sum(axis=-1)
            sums["weight"] += m.sum(axis=-1)
            sums["n_good"] += 1
    return sums


def frame_problem(image, file, index) -> dict | None:
    """None for a usable frame; else {file, frame, problem} of a junk one: not real numbers, no
    finite pixel, no positive signal (``check_intensities``; NaN/inf and negative pixels are the
    pixels ``sample_polar`` masks, so neither is junk by itself)."""
    try:
        check_intensities(image, file=file, key="input.dataset", what="pattern intensities",
                          nonfinite_masked=True, negative_masked=True)
    except InputError as error:
        return {"file": str(file), "frame": index, "problem": error.message}
    return None


def refuse_junk(part):
    """The reduction's check of each chunk's result, in chunk order: exit 2 at the first junk
    frame (its file, index and problem), before anything is written."""
    junk = part.get("junk") if isinstance(part, dict) else None
    if junk:
        first = junk[0]
        where = "the pattern" if first["frame"] is None else f"frame {first['frame']}"
        raise InputError(f"{where} of {first['file']} is not a usable pattern: {first['problem']}",
                         file=first["file"], key="input.dataset" + (
                             "" if first["frame"] is None else f" (frame {first['frame']})"))
    return part


def accumulate(total, part) -> dict:
    """total + part, element by element, added into total (a copy of part when total is None).

    The reduction step of ``run`` (one chunk at a time, in chunk order); ``add_sums`` of a list
    gives bit for bit the same."""
    if total is None:
        return {k: (np.array(v, copy=True) if isinstance(v, np.ndarray) else v) for k, v in part.items()}
    for k, v in part.items():
        if isinstance(total[k], np.ndarray):
            np.add(total[k], v, out=total[k])
        else:
            total[k] = total[k] + v
    return total


def add_sums(parts) -> dict:
    total = None
    for part in parts:
        total = accumulate(total, part)
    return total


def chunk_tasks(files, counts, chunk_size: int, limit=None) -> list[dict]:
    """{file, start, stop} of every chunk of at most chunk_size patterns, at most limit in all."""
    tasks, taken = [], 0
    for f, n in zip(files, counts):
        for start in range(0, n, chunk_size):
            if limit is not None and taken >= limit:
                break
            stop = min(n, start + chunk_size)
            if limit is not None:
                stop = min(stop, start + limit - taken)
            tasks.append({"file": f, "start": start, "stop": stop})
            taken += stop - start
    return tasks


def failed_chunk_records(tasks, failures) -> list[dict]:
    """What ccd.h5 records of each chunk that failed after its retries (xFrame-style list)."""
    return [{"chunk": int(f.index), "file": str(tasks[f.index]["file"]),
             "first_pattern": int(tasks[f.index]["start"]), "last_pattern": int(tasks[f.index]["stop"]) - 1,
             "error": str(f.error)} for f in failures]


def finish(sums, n_phi: int, fc_n_max=None):
    """(C (N_q, N_q, n_φ), Ī (N_q), valid-pair counts) from the summed spectra."""
    ccf = sums["ccf"].copy()
    if fc_n_max is not None:
        ccf[..., int(fc_n_max) + 1:] = 0
    numerator = cpu().irfft(ccf, axis=-1, n=n_phi)
    pairs = cpu().irfft(sums["mask_ccf"], axis=-1, n=n_phi)
    valid = pairs > 0.5
    cc = np.where(valid, numerator / np.where(valid, pairs, 1.0), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        average = np.where(sums["weight"] > 0, sums["intensity"] / sums["weight"], 0.0)
    return cc, average, valid


def validate(settings):
    """Before a run folder exists: refuse (exit 2) a grid whose partial sums would not fit in
    memory even one per worker (memory_plan.plan_correlate; the frame size counted from
    `detector` when the patterns come from input.pattern_list). The worker plans again with the
    frames' real size and lowers multi_process.in_flight where needed."""
    pixels = 0
    if settings.input.pattern_list:
        try:
            pixels = int(np.prod([int(n) for n in settings.detector.image_dimensions]))
        except (TypeError, ValueError):
            pixels = 0           # Detector.check names the key when the worker reads it
    memory_plan.plan_correlate(settings, pixels, 1 << 20)


def run(settings, archive):
    """Patterns → C(q1, q2, Δ) and Ī(q) in ccd.h5."""
    cpu_only(settings, archive.log, "fxs correlate", "pattern chunks are read, resampled to polar grids and "
             "correlated with small FFTs, spread over processes")
    files, dataset, detector, n_particles = pattern_sources(settings, archive)
    dtypes = []
    counts = pattern_counts(files, dataset, detector, dtypes)
    q = reciprocal_radial_points(settings.grid.max_q, settings.grid.n_radial_points)
    if settings.grid.max_q * detector.wavelength / (4 * np.pi) >= 1:
        raise InputError(f"max_q beyond 4π/λ = {4 * np.pi / detector.wavelength:.4g} 1/Å", key="grid.max_q")
    n_phi = settings.n_angular_points
    if settings.fc_n_max is not None and 2 * settings.fc_n_max > n_phi:
        raise InputError(f"fc_n_max {settings.fc_n_max} needs at least {2 * settings.fc_n_max} angular points, "
                         f"n_angular_points is {n_phi}", key="fc_n_max")
    geometry = polar_geometry(detector, q, n_phi, settings.solid_angle_correction)
    if not geometry["inside"].any():
        raise InputError("no polar sampling point lies on the detector: check max_q and the geometry",
                         key="grid.max_q")
    if not geometry["inside"].all():
        archive.log.warning("rings beyond q = %.4g 1/Å are partly off the detector and masked there",
                            detector.max_full_ring_q())
    tasks = chunk_tasks(files, counts, settings.chunk_size, settings.max_n_patterns)
    taken = sum(t["stop"] - t["start"] for t in tasks)
    in_flight = memory_plan.plan_correlate(settings, int(np.prod(detector.shape)), len(tasks),
                                           max(d.itemsize for d in dtypes), log=archive.log)
    filt = settings.intensity_filter
    shared = {"geometry": geometry, "order": settings.interpolation_order, "n_phi": n_phi,
              "dataset": dataset, "intensity_limits": (filt.min_mean, filt.max_mean) if filt.use else None}
    archive.log.info("%d patterns in %d chunks → C on %d q × %d Δ", taken, len(tasks), len(q), n_phi)
    bar = archive.progress(total=taken, desc="correlate")

    def progress(index, result):
        task = tasks[index]
        bar.update(task["stop"] - task["start"])

    # partial sums added in chunk order as they arrive, then dropped; failed chunks come back as
    # TaskFailure after their retries and are left out
    def combine(total, part):
        return accumulate(total, refuse_junk(part))

    reduction = parallel.reduce(correlate_chunk, tasks, combine, settings.multi_process, shared=shared,
                                on_result=progress, tolerate_failures=True, in_flight=in_flight)
    bar.close()
    failed = failed_chunk_records(tasks, reduction.failures)
    for record in failed:
        archive.log.warning("chunk %d (%s, patterns %d-%d) failed after %d retries, left out: %s",
                            record["chunk"], record["file"], record["first_pattern"], record["last_pattern"],
                            settings.multi_process.retries, record["error"])
    sums = reduction.value
    if sums is None:                   # no chunk succeeded
        parallel.require_success(reduction, settings.multi_process)
        raise RuntimeError(f"all {len(tasks)} chunks of patterns failed")
    if sums["n_good"] == 0:
        raise InputError("no pattern passed the is_good selection", key="intensity_filter")
    cc, average, _ = finish(sums, n_phi, settings.fc_n_max)
    lost = sum(r["last_pattern"] - r["first_pattern"] + 1 for r in failed)
    archive.log.info("used %d patterns, rejected %d%s", sums["n_good"], sums["n_bad"],
                     f", lost {lost} in {len(failed)} failed chunk(s)" if failed else "")
    tree = ccd_file.ccd_tree(q, cc, detector.wavelength, average, n_particles,
                             dimensions=settings.dimensions, cc_counts=sums["n_good"])
    tree["failed_chunks"] = failed
    ccd_file.write_xframe_h5(archive.file("ccd.h5"), tree)
    # fewer than min_success chunks succeeded: the run fails here (exit 1, not linked); the
    # ccd.h5 of the chunks that did succeed stays in its folder
    if reduction.n_success < parallel.required_successes(len(tasks), settings.multi_process):
        archive.log.error("ccd.h5 of the %d chunk(s) that succeeded is kept in %s (not linked)",
                          reduction.n_success, archive.path)
    parallel.require_success(reduction, settings.multi_process)
    archive.set_main("ccd.h5")
    archive.savefig(ccd_file.cc_figure(cc, q, f"cross-correlation of {sums['n_good']} patterns"),
                    "cross_correlation.png")
    return {"cross_correlation": cc, "average_intensity": average, "radial_points": q,
            "n_good": sums["n_good"], "failed_chunks": failed}
