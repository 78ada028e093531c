"""ptycho: iterative multislice electron ptychography from a calibrated 4D-STEM data set.

1. Calibration (xpr.em.ptychography.calibration, PyPty's append_exp_params): patterns binned, flipped,
   centred and padded; reciprocal and real pixel sizes; PL rotation; scan positions as corners
   of the pattern-sized probe windows on the reconstruction grid. Settings left null take the
   data file's calibration attributes. `experiment.positions_path` replaces the raster by
   measured positions ((N, 2) [y, x] in Å).
2. Initial guess: object of ones (num_slices slices of total_thickness / num_slices); probe
   from the aperture and aberrations (optics.probe_real) scaled to the mean counts per pattern,
   with extra Hermite or focal-spread modes for partial coherence; or a previous checkpoint.
3. Reconstruction (xpr.em.ptychography): far-field multislice model, loss ml (default) / lsq_sqrt / lsq
   on measured detector pixels only (padding masked out), analytic Wirtinger gradients, L-BFGS
   with a strong-Wolfe line search; staged refinement of object, probe, positions and
   (optionally) the probe's defocus;
   regularisers; early stopping on held-out detector pixels (the result is the iterate with
   the lowest held-out loss), optionally at the noise floor of the counts.
4. Output `<structure_name>.h5`: object (complex, [y, x, slice]), probe ([y, x, mode]),
   positions_px, loss, pixel_size_A, the refined extra defocus and the probe's C10, and —
   when the data file carries a true phase — the
   correlation of the reconstructed phase with it over the scanned area. loss.csv, checkpoints,
   and PNGs of phase, amplitude, probe and loss.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from xpr import backend as backends
from xpr import memory
from xpr.em.ptychography import calibration, direct
from xpr.em import optics
from xpr.em.ptychography import checkpoints
from xpr.em.ptychography.forward import Model
from xpr.em.ptychography.reconstruct import (History, Options, aberration_names, reconstruct,
                                             refines_defocus, resolve_aberrations)
from xpr.errors import InputError, SettingsError


# -- 1. data ----------------------------------------------------------------------------------

def measured_positions(path, n_scan: int, pixel_size_A: float, key="experiment.positions_path"):
    """Window corners (px) from a file of (N, 2) [y, x] probe positions in Å."""
    from xpr.io import read_array

    positions = np.asarray(read_array(path, dataset="positions_A" if str(path).endswith(".h5")
                                      else None, dtype="float64", key=key), dtype=np.float64)
    if positions.shape != (n_scan, 2):
        raise InputError(f"positions must have shape [{n_scan}, 2] ([y, x] in Å for each of the "
                         f"{n_scan} patterns), got {list(positions.shape)}", file=path, key=key)
    return (positions - positions.min(axis=0)) / pixel_size_A


def detector_mask(n: int, pad: int, xp):
    """1 on measured pixels, 0 on the zero padding; FFT order (zero frequency at index 0)."""
    mask = np.zeros((n, n), dtype=np.float32)
    mask[pad:n - pad, pad:n - pad] = 1.0
    return xp.asarray(np.fft.ifftshift(mask))


CPU_WORK_ARRAY_BYTES = 1.5e6      # one (B, M, n, n) complex64 work array of a CPU batch


def batch_size_for(memory_GB: float, n: int, modes: int, slices: int, on_gpu: bool = False) -> int:
    """Patterns per batch so that the batch's complex64 work arrays fit in memory_GB; on a CPU
    also small enough for them to stay in the processor cache (≈ 1.5 MB per work array, at
    least 8 patterns; each of the model's threads holds one batch): the element-wise steps
    between FFTs then cost little (benchmarks/bench_em_ptycho.py: one 4-slice evaluation took
    11–13 FFT pairs of CPU time with all 1024 patterns in one batch, ≈ 8.5 with 45)."""
    arrays_per_pattern = modes * (2 * slices + 4) + 6
    memory_bound = max(1, int(memory_GB * 1e9 // (arrays_per_pattern * n * n * 8)))
    if on_gpu:
        return memory_bound
    cache_bound = max(8, int(CPU_WORK_ARRAY_BYTES // (modes * n * n * 8)))
    return min(memory_bound, cache_bound)


MEMORY_KEY = "reconstruction.max_memory_GB"
BATCH_WORK_GB = 2.0               # at most this much for the work arrays of one batch


def data_memory(n_patterns: int, detector_shape, data_bin=1, data_pad=0,
                validation_fraction=0.0) -> tuple:
    """(memory.Estimate of reading the scan, dict of the data arrays resident while
    reconstructing), counted from the code: the file read as float32, then two prepared float32
    copies alive at once (calibration: clip → roll → pad); resident: the calibrated patterns,
    their copy in FFT order (the counts) and the held-out pixel set as booleans."""
    ky, kx = (int(d) // max(1, int(data_bin)) for d in detector_shape)
    pad = calibration.pad_px(data_pad, kx)
    prepared = 4 * int(n_patterns) * (ky + 2 * pad) * (kx + 2 * pad)
    raw = 4 * int(n_patterns) * int(np.prod(detector_shape))
    reading = memory.Estimate().add("reading and calibrating the scan", {
        "scan as float32": raw, "two calibrated copies": 2 * prepared})
    resident = {"calibrated patterns": prepared, "counts in FFT order": prepared}
    if validation_fraction > 0:
        resident["held-out pixels (bool)"] = prepared // 4
    return reading, resident


def reconstruction_memory(resident: dict, object_shape, slices: int, modes: int, n: int,
                          batch_size: int, lanes: int, history: int) -> memory.Estimate:
    """The peak while reconstructing: the resident data, the object and probe with L-BFGS's
    2 × history curvature pairs and ≈ 6 working copies (iterate, gradient, direction, trial
    point, best iterate, preconditioner), and one batch of work arrays per thread."""
    unknowns = 8 * (int(slices) * int(np.prod(object_shape)) + int(modes) * n * n)
    arrays_per_pattern = modes * (2 * slices + 4) + 6
    return memory.Estimate().add("reconstructing", dict(resident, **{
        "object, probe and L-BFGS state": (2 * int(history) + 6) * unknowns,
        "batch work arrays": int(lanes) * int(batch_size) * arrays_per_pattern * n * n * 8}))


def check_data_fits(settings, data_path, log=None):
    """Stop (exit 2, key reconstruction.max_memory_GB) before reading a scan whose data would
    not fit, even streamed from the file: the scan's shape is read from the file without its
    data. Returns the memory limit."""
    return data_plan(settings, data_path, log)[0]


STREAM_FRACTION = 0.25     # of the usable limit for a streamed scan's blocks and file reads


def data_plan(settings, data_path, log=None):
    """(memory limit, streaming budget in GB or None): None when the scan read, calibrated and
    held in memory fits the limit; else the data are streamed from the file
    (streaming.StreamedCounts) with STREAM_FRACTION of the usable limit for the blocks read at
    once, and only the held-out set (as bits) resident — exit 2 if even that cannot fit."""
    from xpr.io.stem4d import open_scan

    experiment = settings.experiment
    given = calibration.experiment_dict(experiment)
    with open_scan(Path(data_path).expanduser(), given.get("dataset"),
                   given.get("scan_size")) as scan:
        n_patterns, detector = scan.n_patterns, scan.detector_shape
        raw_bytes = scan.nbytes_float32
    fraction = float(settings.reconstruction.validation_fraction)
    data_bin, data_pad = calibration.detector_processing(given)
    reading, resident = data_memory(n_patterns, detector, data_bin, data_pad, fraction)
    reading.add("holding the data", resident)
    limit = memory_limit(settings)
    what = f"ptycho on {n_patterns} patterns of {detector[0]}x{detector[1]} px"
    if reading.bytes() <= memory.USABLE_FRACTION * limit.bytes:
        memory.log_plan(log, what, reading, limit)
        return limit, None
    budget = STREAM_FRACTION * memory.USABLE_FRACTION * limit.bytes
    streamed = memory.Estimate().add("streaming the scan", streamed_resident(
        n_patterns, detector, data_bin, data_pad, fraction, budget))
    memory.require(streamed, limit, MEMORY_KEY, what + " (streamed from the file)",
                   _memory_hint())
    memory.log_plan(log, what + f" streamed from the file (it needs {reading.describe()} "
                    "in memory)", streamed, limit)
    # at most half the scan at once, so that the calibration streams too
    return limit, min(budget, 0.5 * raw_bytes) / 1e9


def streamed_resident(n_patterns, detector_shape, data_bin, data_pad, validation_fraction,
                      budget_bytes) -> dict:
    """The data arrays resident while a streamed scan is reconstructed: the blocks read from
    the file (the budget) and the held-out pixel set as bits."""
    ky, kx = (int(d) // max(1, int(data_bin)) for d in detector_shape)
    pad = calibration.pad_px(data_pad, kx)
    resident = {"file blocks and their preparation": int(budget_bytes)}
    if validation_fraction > 0:
        resident["held-out pixels (bits)"] = int(n_patterns) * -(-(ky + 2 * pad) * (kx + 2 * pad) // 8)
    return resident


def batch_work_GB(experiment, settings, limit: memory.Limit, stream_GB=None) -> float:
    """Memory for one batch's work arrays: what the resident data leave of the usable limit,
    shared by the threads, at most BATCH_WORK_GB (the batch then has at least one pattern)."""
    fraction = float(settings.reconstruction.validation_fraction)
    if stream_GB is not None:
        resident = streamed_resident(experiment.n_scan, experiment.pattern_shape, 1, 0, fraction,
                                     stream_GB * 1e9)
    else:
        _, resident = data_memory(experiment.n_scan, experiment.pattern_shape, 1, 0, fraction)
    left = memory.USABLE_FRACTION * limit.bytes - sum(resident.values())
    return max(1e-6, min(BATCH_WORK_GB, left / 1e9 / 8))


def memory_limit(settings) -> memory.Limit:
    """The smallest of reconstruction.max_memory_GB, the cgroup's grant and MemAvailable."""
    cap = settings.reconstruction.max_memory_GB
    return memory.available(None if cap is None else float(cap), MEMORY_KEY)


def _memory_hint() -> str:
    return ("raise reconstruction.max_memory_GB if the machine has the memory, bin the detector "
            "(experiment.data_bin), pad less (experiment.data_pad), hold out no pixels "
            "(reconstruction.validation_fraction: 0), or reconstruct a part of the scan (a scan "
            "larger than memory is streamed from the file, but its held-out pixels and the "
            "reconstruction's arrays stay in memory)")


# -- 2. initial guess -----------------------------------------------------------------------

def initial_probe(experiment, probe_settings, be):
    """Probe modes (M, n, n) in real space, total intensity = mean counts per pattern."""
    n = experiment.pattern_shape[-1]
    if experiment.conv_semiangle_mrad is None:
        raise InputError("experiment.conv_semiangle_mrad is needed to model the probe",
                         key="experiment.conv_semiangle_mrad")
    args = ((n, n), experiment.rez_pixel_size_invA, experiment.wavelength_A,
            experiment.conv_semiangle_mrad)
    modes = int(probe_settings["modes"])
    if probe_settings["mode_type"] == "defocus_spread" and modes > 1:
        probe = optics.defocus_spread_modes(*args, experiment.probe_aberrations,
                                            probe_settings["focal_spread_A"], modes, be)
    else:
        main = optics.probe_real(*args, experiment.probe_aberrations, be)
        probe = optics.hermite_modes(main, modes, probe_settings["higher_mode_power"], be.xp)
    if experiment.streamed:                 # the mean pattern was summed while streaming
        counts = float(np.sum(experiment.mean_pattern))
    else:
        counts = float(np.mean(experiment.patterns.sum(axis=(1, 2))))
    return (probe * math.sqrt(counts)).astype(be.complex_dtype)


def prepare(experiment, options: Options, probe_settings, be, margin_px: int = 4,
            positions_px=None, memory_GB: float = BATCH_WORK_GB, num_slices=None,
            total_thickness_A=None, stream_GB=None):
    """Model, counts (FFT order), detector mask, initial parameters and the options with the
    batch size that fits `memory_GB`, for an experiment.

    A streamed experiment (calibration.load_experiment with memory_GB) gets counts read from its
    file block by block (streaming.StreamedCounts) within `stream_GB`."""
    xp = be.xp
    n = experiment.pattern_shape[-1]
    if experiment.pattern_shape[0] != n:
        raise InputError(f"patterns must be square after binning/padding, got "
                         f"{list(experiment.pattern_shape)}", key="experiment.data_path")
    options = dataclasses.replace(options, refine_aberrations=resolve_aberrations(
        options.refine_aberrations, probe_settings["modes"]))
    slices = int(num_slices or experiment.num_slices)
    thickness = float(total_thickness_A or experiment.total_thickness_A)
    model = Model(be, n, experiment.pixel_size_A, experiment.wavelength_A, thickness / slices,
                  slices, complex_dtype=np.dtype(be.complex_dtype).name,
                  aberration_names=aberration_names(options))
    corners = np.asarray(experiment.scan_positions_px if positions_px is None else positions_px,
                         dtype=np.float64) + margin_px
    shape = (int(math.ceil(corners[:, 0].max())) + n + margin_px + 1,
             int(math.ceil(corners[:, 1].max())) + n + margin_px + 1)
    mask = detector_mask(n, experiment.data_pad, xp) if experiment.data_pad else None
    probe = initial_probe(experiment, probe_settings, be)
    options = dataclasses.replace(options, batch_size=batch_size_for(memory_GB, n, probe.shape[0], slices,
                                                                     be.is_gpu))
    options = dataclasses.replace(options, object_band_limit=band_limit_invA(
        options.object_band_limit, experiment))
    if experiment.streamed:
        counts = streamed_counts(experiment, options.batch_size, model.lanes(), be,
                                 stream_GB or memory_GB)
    else:
        counts = xp.asarray(np.fft.ifftshift(experiment.patterns, axes=(-2, -1)),
                            dtype=be.real_dtype)
    params = {"object": xp.ones((slices,) + shape, dtype=be.complex_dtype), "probe": probe,
              "positions": xp.asarray(corners), "defocus": xp.zeros(1, dtype=xp.float64)}
    if model.aberration_names:
        params["aberrations"] = xp.zeros(len(model.aberration_names), dtype=xp.float64)
    if options.refine_scan_affine:
        params["scan_affine"] = xp.zeros(4, dtype=xp.float64)
        params["scan_centre"] = xp.mean(params["positions"], axis=0)
    return model, counts, mask, params, options


# The 180° branch of a PL rotation fitted with C10 unknown (θ, C10 or θ + 180°, −C10) explains
# the data equally well: on abTEM's focal-spread MoS2 ten epochs on either branch reach the same
# loss (to 2·10⁻⁵) with the phase negated (r −0.91 against +0.91). Atoms make the true phase
# peak positive, and after ten epochs the phase's skewness told the branches apart by −1.59
# against +1.57 where the calibration's tcBF score differed by 0.010.
BRANCH_TRIAL_EPOCHS = 10


def phase_skewness(object_slices, corners_px, window: int) -> float:
    """Skewness of the summed phase (mean removed) over the scanned area (first to last probe
    centre): positive where sharp positive peaks (atoms) dominate."""
    phase = np.sum(np.angle(np.asarray(object_slices)), axis=0)
    centres = probe_centres_px(corners_px, window)
    low = np.floor(centres.min(axis=0)).astype(int)
    high = np.ceil(centres.max(axis=0)).astype(int) + 1
    values = phase[low[0]:high[0], low[1]:high[1]]
    values = values - values.mean()
    return float(np.mean(values ** 3) / max(float(np.mean(values ** 2)), 1e-300) ** 1.5)


def branch_uncertain(experiment) -> bool:
    """The PL rotation's 180° branch came from the tcBF score and the score was not clear."""
    fit = experiment.parallax_fit
    return bool(experiment.c10_from_parallax and fit is not None
                and fit.branch_score < calibration.rotation_branch_margin())


def branch_trial_skewness(experiment, options: Options, probe_settings, be, **prepare_args):
    """phase_skewness after BRANCH_TRIAL_EPOCHS epochs of the reconstruction on `experiment`."""
    trial = dataclasses.replace(options, epochs=min(BRANCH_TRIAL_EPOCHS, options.epochs))
    model, counts, mask, params, trial = prepare(experiment, trial, probe_settings, be,
                                                 **prepare_args)
    params, _ = reconstruct(model, counts, params, trial, mask=mask)
    return phase_skewness(be.asnumpy(params["object"]), be.asnumpy(params["positions"]),
                          model.window)


def band_limit_invA(value, experiment):
    """reconstruction.regularisation.object_band_limit in Å⁻¹: "auto" is the measured detector's
    edge (measured_k_max), a number is taken as given, null stays None (no limit)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return measured_k_max(experiment)
        raise SettingsError(f"object_band_limit must be auto, a frequency in Å⁻¹ or null, got "
                            f"{value!r}", key="reconstruction.regularisation.object_band_limit")
    if not float(value) > 0:
        raise SettingsError(f"object_band_limit must be > 0 Å⁻¹, got {value}",
                            key="reconstruction.regularisation.object_band_limit")
    return float(value)


def streamed_counts(experiment, batch_size: int, lanes: int, be, budget_GB: float):
    """streaming.StreamedCounts of a streamed experiment: blocks of whole batches, one kept per
    thread of the model plus one, all within budget_GB (as float32 and their preparation)."""
    from xpr.em.ptychography.streaming import StreamedCounts

    cached = int(lanes) + 1
    pattern_bytes = 4 * int(np.prod(experiment.pattern_shape))
    # a block is prepared from its raw patterns with calibration.WORK_COPIES copies alive
    per_block = budget_GB * 1e9 / (cached + calibration.WORK_COPIES)
    batches = max(1, int(per_block // (batch_size * pattern_bytes)))
    return StreamedCounts(experiment.patterns, be, batches * batch_size, cached)


# ---------------------------------------------------------------------------------------------
# the reconstruction's estimate from the header, before the run folder exists

def ptycho_reconstruction(settings, n_patterns, detector, file_calibration, scan_shape=None,
                          limit=None, stream_GB=None):
    """reconstruction_memory (the data held, object, probe and L-BFGS state, one batch of
    work arrays per thread) from what is known before the scan is read: the settings and the
    file's calibration (settings first, as Experiment.from_settings). The object's extent comes
    from the raster (scan_size, scan_step_A) and the reconstruction pixel 1 / (Δk · n); with
    `PLRotation_deg: auto` the widest rotation (45°) is assumed; `stream_GB`: the streaming
    budget of data_plan (None: the scan is held in memory). None when a value it needs is
    neither in the settings nor in the file (the run then checks after calibrating)."""
    from xpr.backend import from_settings
    from xpr.em.optics import electron_wavelength_A
    from xpr.em.ptychography.calibration import PROCESSING_KEYS, experiment_dict, raster_positions_A

    experiment = experiment_dict(settings["experiment"])
    given = {k: v for k, v in (file_calibration or {}).items() if v is not None and k not in PROCESSING_KEYS}
    given.update({k: v for k, v in experiment.items() if v is not None})
    data_bin, data_pad = calibration.detector_processing(experiment)
    ky, kx = (int(d) // data_bin for d in detector)
    if ky != kx:
        return None
    pad = calibration.pad_px(data_pad, kx)
    n = kx + 2 * pad
    try:
        if given.get("rez_pixel_size_A") is not None:
            rez = float(given["rez_pixel_size_A"]) * data_bin
        elif given.get("rez_pixel_size_mrad") is not None and given.get("acc_voltage"):
            rez = float(given["rez_pixel_size_mrad"]) * 1e-3 / electron_wavelength_A(float(given["acc_voltage"])) * data_bin
        else:
            return None
        step = float(given["scan_step_A"])
        scan_size = given.get("scan_size")
        scan_size = [int(s) for s in np.ravel(scan_shape if scan_size is None else scan_size)]
        rotation = given.get("PLRotation_deg", "auto")
        rotation = 45.0 if isinstance(rotation, str) else float(rotation)
    except (KeyError, TypeError, ValueError):
        return None
    if len(scan_size) != 2 or scan_size[0] * scan_size[1] != int(n_patterns) or rez <= 0 or step <= 0:
        return None
    pixel = 1.0 / (rez * n)
    positions = raster_positions_A(scan_size, step, rotation)
    corners = (positions - positions.min(axis=0)) / pixel
    margin = int(settings.reconstruction.object_margin_px)
    shape = tuple(int(math.ceil(c + margin)) + n + margin + 1 for c in corners.max(axis=0))
    r = settings.reconstruction
    slices = int(given.get("num_slices", 1) or 1)
    modes = int(settings.probe.modes)
    fraction = float(r.validation_fraction)
    limit = limit or memory_limit(settings)
    if stream_GB is not None:              # as run(): blocks read from the file, held-out bits
        resident = streamed_resident(int(n_patterns), (n, n), 1, 0, fraction, stream_GB * 1e9)
    else:
        _, resident = data_memory(int(n_patterns), (n, n), 1, 0, fraction)
    left = memory.USABLE_FRACTION * limit.bytes - sum(resident.values())     # as batch_work_GB
    resident.pop("calibrated patterns", None)                                # released once counted
    memory_GB = max(1e-6, min(BATCH_WORK_GB, left / 1e9 / 8))
    on_gpu = from_settings(settings).is_gpu
    batch = batch_size_for(memory_GB, n, modes, slices, on_gpu)
    lanes = 1 if on_gpu else _cpu_lanes()
    estimate = reconstruction_memory(resident, shape, slices, modes, n, batch, lanes,
                                            int(r.lbfgs.history))
    return estimate, shape, slices


def _cpu_lanes() -> int:
    """Model.lanes() on a CPU (threads sharing the batches, at most 8)."""
    import os

    from xpr.backend import default_fft_workers

    workers = default_fft_workers()
    if workers <= 0:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(int(workers), 8))


def validate_reconstruction(settings, data_path, limit=None):
    """Exit 2 (key reconstruction.max_memory_GB) before the run folder exists when the
    reconstruction's estimate (ptycho_reconstruction, from the file's header) would not fit."""
    from xpr.io.stem4d import open_scan

    experiment = settings["experiment"]
    try:
        with open_scan(Path(data_path).expanduser(), experiment.get("dataset"), experiment.get("scan_size")) as scan:
            n, detector = int(scan.n_patterns), tuple(scan.detector_shape)
            calibration, scan_shape = dict(scan.calibration), scan.scan_shape
    except (OSError, ValueError, InputError):
        return
    _, stream_GB = data_plan(settings, data_path)
    planned = ptycho_reconstruction(settings, n, detector, calibration, scan_shape, limit, stream_GB)
    if planned is None:
        return
    estimate, shape, slices = planned
    limit = limit or memory_limit(settings)
    memory.require(estimate, limit, MEMORY_KEY,
                   f"ptycho of a {slices}x{shape[0]}x{shape[1]} object", _memory_hint())


# -- evaluation against a known truth ----------------------------------------------------------

def _remove_plane(image):
    y, x = np.mgrid[:image.shape[0], :image.shape[1]]
    design = np.stack([np.ones(image.size), y.ravel(), x.ravel()], axis=1)
    coefficients, *_ = np.linalg.lstsq(design, image.ravel(), rcond=None)
    return image - (design @ coefficients).reshape(image.shape)


def band_limited(image, pixel_size_A: float, k_max_invA: float):
    """The image with spatial frequencies above k_max (Å⁻¹) removed (sharp circular cut)."""
    ky = np.fft.fftfreq(image.shape[0], pixel_size_A)[:, None]
    kx = np.fft.fftfreq(image.shape[1], pixel_size_A)[None, :]
    keep = ky ** 2 + kx ** 2 <= k_max_invA ** 2
    return np.fft.ifft2(np.fft.fft2(image) * keep).real


def probe_centres_px(corners_px, window: int):
    """Probe centres of windows with top-left corners `corners_px`: the probe of an n-pixel
    window is centred on its pixel (n // 2, n // 2) (xpr.em.optics.probe_real)."""
    return np.asarray(corners_px, dtype=np.float64) + window // 2


def fit_affine(source, target):
    """Least-squares affine map (3, 2) with [source, 1] @ A ≈ target, for (N, 2) point sets."""
    design = np.hstack([np.asarray(source, dtype=np.float64), np.ones((len(source), 1))])
    matrix, *_ = np.linalg.lstsq(design, np.asarray(target, dtype=np.float64), rcond=None)
    return matrix


def phase_correlation(object_slices, corner0_px, scan_corners_px, window, true_phase,
                      true_corner0_px, pixel_size_A, true_pixel_size_A, k_max_invA=None,
                      true_centres_px=None):
    """Pearson r between reconstructed and true phase over the scanned area (planes removed).

    The scanned area runs from the first to the last probe centre. The truth is first limited
    to the spatial frequencies the detector measured (k ≤ k_max: far-field ptychography cannot
    recover more), then resampled (cubic) onto the reconstruction grid.

    How the grids are aligned: with `true_centres_px` (the truth-grid probe centre of every scan
    point, (N, 2)), by the least-squares affine map from the reconstruction's probe centres
    (window corners + window // 2) to those — right whatever the window size (binning,
    padding), the positions (measured, refined) or a rotation; without, the reconstruction's
    first window corner is taken to lie on `true_corner0_px` with the pixel ratio as scale
    (right only when the windows and positions are the simulation's).
    """
    from scipy import ndimage

    if k_max_invA is not None:
        true_phase = band_limited(np.asarray(true_phase, dtype=np.float64), true_pixel_size_A,
                                  k_max_invA)
    phase = np.sum(np.angle(object_slices), axis=0)
    low = np.floor(np.min(scan_corners_px, axis=0) + window / 2).astype(int)
    high = np.ceil(np.max(scan_corners_px, axis=0) + window / 2).astype(int) + 1
    rows, cols = np.mgrid[low[0]:high[0], low[1]:high[1]].astype(np.float64)
    ours = phase[low[0]:high[0], low[1]:high[1]]
    if true_centres_px is not None:
        matrix = fit_affine(probe_centres_px(scan_corners_px, window), true_centres_px)
        grid = np.stack([rows.ravel(), cols.ravel(), np.ones(rows.size)], axis=1) @ matrix
        coordinates = [grid[:, 0].reshape(rows.shape), grid[:, 1].reshape(rows.shape)]
    else:
        scale = pixel_size_A / true_pixel_size_A
        coordinates = [(rows - corner0_px[0]) * scale + true_corner0_px[0],
                       (cols - corner0_px[1]) * scale + true_corner0_px[1]]
    truth = ndimage.map_coordinates(true_phase.astype(np.float64), coordinates, order=3)
    a, b = _remove_plane(ours), _remove_plane(truth)
    return float(np.sum(a * b) / math.sqrt(np.sum(a * a) * np.sum(b * b)))


def measured_k_max(experiment) -> float:
    """Largest spatial frequency on the measured (unpadded) detector along its axes, Å⁻¹."""
    measured = experiment.pattern_shape[-1] - 2 * experiment.data_pad   # (no read when streamed)
    return measured // 2 * experiment.rez_pixel_size_invA


class Truth(NamedTuple):
    phase: np.ndarray            # true phase (y, x), rad
    corner0_px: np.ndarray       # truth-grid pixel of the first simulated window's corner
    pixel_size_A: float
    centres_px: np.ndarray       # truth-grid probe centre of every scan point (N, 2)


def read_truth(path):
    """The ground truth a simulate_4dstem file carries (Truth), or None.

    The probe centres come from the simulated positions (`positions_A`, window corners in Å)
    and the simulation's window (the detector size): centre_j = corner0 + (r_j − r_0)/pixel +
    n // 2.
    """
    import h5py

    path = Path(path)
    if path.suffix.lower() not in (".h5", ".hdf5"):
        return None
    with h5py.File(path, "r") as handle:
        if "true_phase" not in handle:
            return None
        corner0 = np.asarray(handle["true_phase_corner_px"][()], dtype=np.float64)
        pixel = float(handle["pixel_size_A"][()])
        centres = None
        if "positions_A" in handle and "data" in handle:
            positions = np.asarray(handle["positions_A"][()], dtype=np.float64)
            centres = corner0 + (positions - positions[0]) / pixel + handle["data"].shape[-1] // 2
        return Truth(handle["true_phase"][()], corner0, pixel, centres)


# -- the worker --------------------------------------------------------------------------------

def check_aberration_names(names):
    """SettingsError (key reconstruction.refine.aberrations) unless a list of Krivanek names."""
    key = "reconstruction.refine.aberrations"
    if names is None or names == "auto":
        return
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise SettingsError(f"expected auto or a list of Krivanek coefficient names such as "
                            f"[C12a, C12b, C30], got {names!r}", key=key)
    for name in names:
        try:
            optics.krivanek_index(str(name))
        except ValueError as error:
            raise SettingsError(str(error), key=key) from None
    if len(set(names)) != len(names):
        raise SettingsError(f"a coefficient is named twice in {list(names)}", key=key)


def validate(settings):
    """Before the run folder exists: exit 2 (key reconstruction.max_memory_GB) when the scan
    named by experiment.data_path could not be read and held, or reconstructed (sizes from the
    file's header and the calibration; the latest simulate_4dstem result, the default input, is
    checked in run())."""
    check_aberration_names(settings.reconstruction.refine.get("aberrations"))
    data_path = settings.experiment.get("data_path")
    if data_path and Path(data_path).expanduser().is_file():
        check_data_fits(settings, data_path)
        validate_reconstruction(settings, data_path)     # the reconstruction's estimate


def run(settings, archive):
    """Calibrate, reconstruct, write object / probe / positions / loss and figures."""
    be = backends.from_settings(settings)
    data_path = direct.default_data_path(settings, archive)
    limit, stream_GB = data_plan(settings, data_path, archive.log)
    experiment, data_path = calibration.load_experiment(settings.experiment, data_path,
                                                        memory_GB=stream_GB)
    archive.log.info("%s", experiment.summary())
    for note in experiment.notes:
        archive.log.info("%s", note)
    positions_px = None
    if settings.experiment.positions_path:
        positions_px = measured_positions(settings.experiment.positions_path, experiment.n_scan,
                                          experiment.pixel_size_A)
    options = Options.from_settings(settings)
    if experiment.c10_from_parallax and not refines_defocus(options):
        # the parallax's C10 is ≈ 8 % off on abTEM's MoS2 (−108 Å for −100 Å): refining it
        # recovers −98 Å and r 0.940 → 0.953
        options = dataclasses.replace(options, refine_defocus=True)
        archive.log.info("C10 came from the bright-field parallax: the probe's defocus is refined "
                         "from epoch %d (reconstruction.refine.defocus)", options.defocus_from_epoch)
    if branch_uncertain(experiment) and not settings.checkpoint.resume_from:
        skewness = branch_trial_skewness(
            experiment, options, settings.probe, be,
            margin_px=settings.reconstruction.object_margin_px, positions_px=positions_px,
            memory_GB=batch_work_GB(experiment, settings, limit, stream_GB), stream_GB=stream_GB)
        angle = (experiment.pl_rotation_deg + 360.0) % 360.0 - 180.0
        c10 = -float(experiment.aberrations[0])
        archive.log.info("the PL rotation's 180° branch was uncertain: the phase after %d epochs "
                         "has skewness %.2f (atoms make it positive)%s", BRANCH_TRIAL_EPOCHS,
                         skewness, "" if skewness >= 0 else
                         f": the other branch is taken (PL rotation {angle:.2f}°, C10 {c10:.1f} Å)")
        if skewness < 0:
            other = dict(calibration.experiment_dict(settings.experiment), PLRotation_deg=angle,
                         aberrations=[c10], defocus=None,
                         transposed=bool(experiment.parallax_fit.transposed))
            experiment, data_path = calibration.load_experiment(other, data_path,
                                                                memory_GB=stream_GB)
    model, counts, mask, params, options = prepare(
        experiment, options, settings.probe, be, margin_px=settings.reconstruction.object_margin_px,
        positions_px=positions_px,
        memory_GB=batch_work_GB(experiment, settings, limit, stream_GB), stream_GB=stream_GB)
    if options.object_band_limit is not None:
        archive.log.info("object spectra kept to |k| ≤ %.4g Å⁻¹ (object_band_limit; the object "
                         "grid's Nyquist frequency is %.4g Å⁻¹)", options.object_band_limit,
                         0.5 / experiment.pixel_size_A)
    n = model.window
    if experiment.streamed:
        resident = streamed_resident(experiment.n_scan, experiment.pattern_shape, 1, 0,
                                     options.validation_fraction, stream_GB * 1e9)
        archive.log.info("counts read from the file in blocks of %d patterns (%d kept)",
                         counts.block_patterns, counts.cached_blocks)
    else:
        # the counts (a copy in FFT order, made by prepare) hold the calibrated patterns now:
        # release the experiment's copy, keeping its shape (n_scan, pattern_shape and
        # measured_k_max read only that; nothing after this point reads its values)
        experiment.patterns = np.broadcast_to(np.zeros((), np.float32), experiment.patterns.shape)
        resident = data_memory(experiment.n_scan, experiment.pattern_shape, 1, 0,
                               options.validation_fraction)[1]
        resident.pop("calibrated patterns")
    needed = reconstruction_memory(
        resident, params["object"].shape[1:], model.n_slices, params["probe"].shape[0], n,
        options.batch_size, model.lanes(), options.history)
    what = f"ptycho of a {'x'.join(map(str, params['object'].shape))} object"
    memory.require(needed, limit, MEMORY_KEY, what, _memory_hint())
    memory.log_plan(archive.log, what, needed, limit, 1)
    start_epoch, history = 0, History()
    if settings.checkpoint.resume_from:
        params, start_epoch, history = checkpoints.load(settings.checkpoint.resume_from, params, be)
        archive.log.info("resumed from %s at epoch %d", settings.checkpoint.resume_from, start_epoch)

    csv_path = archive.file("loss.csv")
    csv_path.write_text("epoch,loss,held_out_loss,evaluations,seconds\n")
    every = int(settings.checkpoint.every)

    def on_epoch(epoch, current, hist):
        with open(csv_path, "a") as handle:
            handle.write(f"{epoch},{hist.loss[-1]:.9g},{hist.validation[-1]:.9g},"
                         f"{hist.evaluations[-1]},{hist.seconds[-1]:.4f}\n")
        if every > 0 and (epoch + 1) % every == 0:
            checkpoints.save(archive.file("checkpoint.h5"), current, epoch + 1, hist, be)

    params, history = reconstruct(model, counts, params, options, mask=mask,
                                  start_epoch=start_epoch, history=history, on_epoch=on_epoch,
                                  log=archive.log, progress=archive.progress)
    object_slices = be.asnumpy(params["object"])
    defocus_change = float(be.asnumpy(params["defocus"])[0])
    probe = be.asnumpy(model.ifft2(model.fft2(params["probe"])
                                   * model.probe_factor(params)))   # as the data see it
    positions = be.asnumpy(params["positions"])
    c10 = (experiment.probe_aberrations or [0.0])[0] - defocus_change
    if refines_defocus(options):
        archive.log.info("defocus refined by %.2f Å: probe C10 = %.2f Å (defocus %.2f Å)",
                         defocus_change, c10, -c10)
    refined_aberrations = {}
    if model.aberration_names:
        changes = np.asarray(be.asnumpy(params["aberrations"]), dtype=np.float64)
        krivanek = [float(c) for c in (experiment.probe_aberrations or [0.0])]
        krivanek[0] = c10
        for name, change in zip(model.aberration_names, changes):
            index = optics.krivanek_index(name)
            krivanek += [0.0] * (index + 1 - len(krivanek))
            krivanek[index] += float(change)
            archive.log.info("%s refined by %.2f Å: %.2f Å", name, change, krivanek[index])
        refined_aberrations = {"aberration_names": np.asarray(model.aberration_names, dtype="S"),
                               "aberration_changes_A": changes,
                               "aberrations_A": np.asarray(krivanek)}
    result = {
        "object": np.moveaxis(object_slices, 0, -1), "probe": np.moveaxis(probe, 0, -1),
        "positions_px": positions, "loss": np.asarray(history.loss),
        "held_out_loss": np.asarray(history.validation), "best_epoch": int(history.best_epoch),
        "seconds": np.asarray(history.seconds), "pixel_size_A": experiment.pixel_size_A,
        "object_corner0_px": positions[0],
        "defocus_change_A": defocus_change, "C10_A": c10, **refined_aberrations,
    }
    if params.get("scan_affine") is not None:
        matrix = np.eye(2) + np.asarray(be.asnumpy(params["scan_affine"])).reshape(2, 2)
        result["scan_affine"] = matrix
        archive.log.info("scan affine map (positions told → refined, about their centre): "
                         "[[%.4f, %.4f], [%.4f, %.4f]]", *matrix.ravel())
    truth = read_truth(data_path)
    if truth is not None and truth.centres_px is not None \
            and len(truth.centres_px) == len(positions):
        result["phase_correlation"] = phase_correlation(
            object_slices, positions[0], positions, model.window, truth.phase, truth.corner0_px,
            experiment.pixel_size_A, truth.pixel_size_A, measured_k_max(experiment),
            true_centres_px=truth.centres_px)
        archive.log.info("phase correlation with the truth: %.4f (truth aligned on the probe "
                         "centres of the %d scan points)", result["phase_correlation"],
                         len(positions))
    name = f"{settings.structure_name}.h5"
    archive.set_link_name(name)
    archive.save_h5(name, result, main=True, attrs={
        "acc_voltage": experiment.acc_voltage_kV, "wavelength_A": experiment.wavelength_A,
        "rez_pixel_size_A": experiment.rez_pixel_size_invA, "data_path": str(data_path),
        "num_slices": model.n_slices, "slice_thickness_A": model.slice_thickness_A,
        "loss_name": options.loss})
    _figures(archive, object_slices, probe, history)
    return result


def _figures(archive, object_slices, probe, history):
    from xpr import plot

    fig, axes = plot.figure(1, 2)
    plot.image(axes[0], np.sum(np.angle(object_slices), axis=0), title="phase (rad)", cmap="gray")
    plot.image(axes[1], np.prod(np.abs(object_slices), axis=0), title="amplitude", cmap="gray")
    archive.savefig(fig, "object.png")
    fig, axes = plot.figure(1, probe.shape[0], squeeze=False)
    for mode in range(probe.shape[0]):
        plot.image(axes[0][mode], np.abs(probe[mode]), title=f"|probe| mode {mode}")
    archive.savefig(fig, "probe.png")
    fig, ax = plot.figure()
    epochs = np.asarray(history.epoch) + 1
    loss = np.asarray(history.loss)
    positive = bool(np.all(loss > 0))
    draw = ax.semilogy if positive else ax.plot          # the ml loss may be negative
    draw(epochs, loss, label="fitted pixels")
    held = np.asarray(history.validation, dtype=np.float64)
    if np.isfinite(held).any():
        scaled = held * (loss[0] / held[0]) if positive else held - held[0] + loss[0]
        draw(epochs, scaled, label="held-out pixels (scaled to start together)")
        ax.axvline(history.best_epoch + 1, color="gray", linestyle=":")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    archive.savefig(fig, "loss.png")
